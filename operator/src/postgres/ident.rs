//! The one place identifiers are quoted. Every schema, table, column, role, publication and
//! subscription name that reaches SQL text goes through [`quote_ident`]; values never do — they
//! are bound as parameters, except in the few DDL statements that cannot take them ([`quote_literal`]).

/// Quotes an identifier for PostgreSQL: wraps it in double quotes and doubles any double quote
/// inside, so names with spaces, capitals, quotes or `;` are taken literally.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes a qualified name `schema.name`.
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// Quotes a string literal, for the few statements that cannot take bound parameters (DDL such
/// as `CREATE SUBSCRIPTION … CONNECTION '…'` or `ALTER DATABASE … SET x = '…'`). Single quotes
/// are doubled; a value with backslashes becomes an `E'…'` literal with them doubled too, so the
/// result means the same whatever `standard_conforming_strings` is (as PostgreSQL's own
/// `quote_literal()` does). Everywhere else, values are bound.
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    if value.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str(r"\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_literals_for_ddl() {
        assert_eq!(quote_literal("on"), "'on'");
        assert_eq!(
            quote_literal("host=h password='it''s'"),
            "'host=h password=''it''''s'''"
        );
        assert_eq!(quote_literal(r"pa\ss'; x"), r"E'pa\\ss''; x'");
        assert_eq!(quote_literal(""), "''");
    }

    #[test]
    fn quotes_awkward_names() {
        assert_eq!(quote_ident("orders"), r#""orders""#);
        assert_eq!(quote_ident("Order Lines"), r#""Order Lines""#);
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_ident("x; DROP TABLE y"), r#""x; DROP TABLE y""#);
        assert_eq!(quote_qualified("my schema", "T"), r#""my schema"."T""#);
    }
}
