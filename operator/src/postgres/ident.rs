//! The one place identifiers are quoted. Every schema, table, column, role, publication and
//! subscription name that reaches SQL text goes through [`quote_ident`]; values never do — they
//! are bound as parameters, except in the few DDL statements that cannot take them ([`quote_literal`]).

/// Quotes an identifier for PostgreSQL: wraps it in double quotes and doubles any double quote
/// inside, so names with spaces, capitals, quotes or `;` are taken literally. This is
/// `postgres-protocol`'s translation of libpq's `PQescapeIdentifier`.
pub fn quote_ident(name: &str) -> String {
    postgres_protocol::escape::escape_identifier(name)
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

/// A schema-qualified table or sequence name, as stored in the catalog (no case folding).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct TableName {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
}

impl TableName {
    /// A qualified name.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// The quoted, qualified name for SQL text.
    pub fn quoted(&self) -> String {
        quote_qualified(&self.schema, &self.name)
    }

    /// Parses `schema.table` (or `table`, meaning `public.table`). Either part may be written
    /// in double quotes (`"my schema"."Order.Lines"`, `""` for a quote inside); unquoted parts
    /// are taken literally, without case folding.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut chars = text.chars().peekable();
        loop {
            let mut part = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err(format!("unterminated quote in {text:?}")),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    part.push(c);
                    chars.next();
                }
            }
            if part.is_empty() {
                return Err(format!("empty name in {text:?}"));
            }
            parts.push(part);
            match chars.next() {
                None => break,
                Some('.') => continue,
                Some(c) => return Err(format!("unexpected {c:?} after a quoted name in {text:?}")),
            }
        }
        match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) => Ok(Self { schema, name }),
            Err(parts) if parts.len() == 1 => Ok(Self::new("public", parts[0].clone())),
            Err(_) => Err(format!("expected schema.table, got {text:?}")),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let part = |s: &str| {
            let plain = !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !s.starts_with(|c: char| c.is_ascii_digit());
            if plain { s.to_owned() } else { quote_ident(s) }
        };
        write!(f, "{}.{}", part(&self.schema), part(&self.name))
    }
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

    #[test]
    fn parses_table_names() {
        assert_eq!(TableName::parse("s.t").unwrap(), TableName::new("s", "t"));
        assert_eq!(
            TableName::parse("orders").unwrap(),
            TableName::new("public", "orders")
        );
        assert_eq!(
            TableName::parse(r#""my schema"."Order.Lines""x""#).unwrap(),
            TableName::new("my schema", "Order.Lines\"x")
        );
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("\"a").is_err());
        assert!(TableName::parse("a.").is_err());
        assert_eq!(
            TableName::new("my schema", "T").to_string(),
            r#""my schema"."T""#
        );
        assert_eq!(TableName::new("public", "t_1").to_string(), "public.t_1");
    }
}
