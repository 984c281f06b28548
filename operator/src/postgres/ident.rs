//! The one place identifiers are quoted. Every schema, table, column, role, publication and
//! subscription name that reaches SQL text goes through [`quote_ident`]; values never do — they
//! are bound as parameters.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_awkward_names() {
        assert_eq!(quote_ident("orders"), r#""orders""#);
        assert_eq!(quote_ident("Order Lines"), r#""Order Lines""#);
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_ident("x; DROP TABLE y"), r#""x; DROP TABLE y""#);
        assert_eq!(quote_qualified("my schema", "T"), r#""my schema"."T""#);
    }
}
