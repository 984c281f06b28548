//! Every statement the verifier sends about a table's rows, built in one place. Identifiers go
//! through [`quote_ident`]; key values are bound as text parameters and cast to the key column's
//! type inside PostgreSQL, so they compare in the type's own order.

use crate::postgres::ident::{quote_ident, quote_qualified};

use super::TableName;

/// A key range: rows with `lower <= key < upper`; a missing bound is open. Bounds are the key
/// columns' values as text (in the canonical session).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Range {
    pub lower: Option<Vec<String>>,
    pub upper: Option<Vec<String>>,
}

/// The statements for one table.
#[derive(Clone, Debug)]
pub(crate) struct TableSql {
    relation: String,
    /// Quoted key columns, in key order; empty for a table without a key.
    key: Vec<String>,
    /// `format_type` of each key column (already quoted and schema-qualified by PostgreSQL).
    key_types: Vec<String>,
    /// The per-row hash: the listed columns rendered as row text, hashed to 64 bits.
    row_hash: String,
}

impl TableSql {
    /// `columns` (name, type without modifier) are hashed in the given order; `key` is
    /// `(name, type)` in key order.
    pub fn new(table: &TableName, columns: &[(&str, &str)], key: &[(&str, &str)]) -> Self {
        let listed: Vec<String> = columns
            .iter()
            .map(|(name, ty)| column_text(&quote_ident(name), ty))
            .collect();
        // ROW(c1, c2, …)::text names every column explicitly — a column called like the table
        // cannot stand in for the row — and renders NULL as nothing and '' as "", so the two
        // differ. COLLATE "C": hash the bytes, whatever the database's collation.
        let row_hash = format!(
            "hashtextextended(ROW({})::text COLLATE \"C\", 0)",
            listed.join(", ")
        );
        Self {
            relation: quote_qualified(&table.schema, &table.name),
            key: key.iter().map(|(name, _)| quote_ident(name)).collect(),
            key_types: key.iter().map(|(_, ty)| (*ty).to_owned()).collect(),
            row_hash,
        }
    }

    /// `SELECT count(*), sum(row hash)::text` over a range (or the whole table when keyless).
    pub fn chunk_hash(&self, range: &Range) -> (String, Vec<String>) {
        let (predicate, params) = self.predicate(range);
        (
            format!(
                "SELECT count(*), coalesce(sum({}), 0)::text FROM {}{predicate}",
                self.row_hash, self.relation
            ),
            params,
        )
    }

    /// Every key (as text) and row hash in a range, in key order.
    pub fn rows(&self, range: &Range) -> (String, Vec<String>) {
        let (predicate, params) = self.predicate(range);
        let keys: Vec<String> = self.key.iter().map(|k| format!("{k}::text")).collect();
        // Qualified: a bare `ORDER BY "id"` would sort by the output column of that name, the
        // key's text.
        let order: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("{}.{k}", self.relation))
            .collect();
        (
            format!(
                "SELECT {}, {} FROM {}{predicate} ORDER BY {}",
                keys.join(", "),
                self.row_hash,
                self.relation,
                order.join(", ")
            ),
            params,
        )
    }

    /// Every `step`-th key of a range in key order (`step` is the last parameter, `$n::int8`):
    /// the bounds of sub-ranges of about `step` rows.
    pub fn split_points(&self, range: &Range) -> (String, Vec<String>) {
        let (predicate, params) = self.predicate(range);
        let step = params.len() + 1;
        (
            format!(
                "SELECT {outer} FROM (SELECT {inner}, row_number() OVER (ORDER BY {order}) AS rn \
                 FROM {rel}{predicate}) s WHERE rn % ${step}::int8 = 0 ORDER BY rn",
                outer = self.aliases("::text"),
                inner = self.aliased_keys(),
                order = self.key.join(", "),
                rel = self.relation,
            ),
            params,
        )
    }

    /// Like [`Self::split_points`] over a block sample of the table (`$1::float8` percent,
    /// `$2::int8` step): cheap boundaries for big tables.
    pub fn sampled_split_points(&self) -> String {
        format!(
            "SELECT {outer} FROM (SELECT {inner}, row_number() OVER (ORDER BY {order}) AS rn \
             FROM {rel} TABLESAMPLE SYSTEM ($1::float8)) s WHERE rn % $2::int8 = 0 ORDER BY rn",
            outer = self.aliases("::text"),
            inner = self.aliased_keys(),
            order = self.key.join(", "),
            rel = self.relation,
        )
    }

    fn aliased_keys(&self) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} AS k{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn aliases(&self, suffix: &str) -> String {
        (0..self.key.len())
            .map(|i| format!("k{i}{suffix}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// ` WHERE (k1, k2) >= (…) AND (k1, k2) < (…)` with its parameters; empty when unbounded.
    fn predicate(&self, range: &Range) -> (String, Vec<String>) {
        let mut clauses = Vec::new();
        let mut params = Vec::new();
        for (op, bound) in [(">=", &range.lower), ("<", &range.upper)] {
            let Some(values) = bound else { continue };
            let casts: Vec<String> = self
                .key_types
                .iter()
                .enumerate()
                .map(|(i, ty)| format!("CAST(${}::text AS {ty})", params.len() + i + 1))
                .collect();
            params.extend(values.iter().cloned());
            clauses.push(format!("{} {op} {}", tuple(&self.key), tuple(&casts)));
        }
        if clauses.is_empty() {
            (String::new(), params)
        } else {
            (format!(" WHERE {}", clauses.join(" AND ")), params)
        }
    }
}

/// The types whose binary send form is cheaper to render than their text and, like the text,
/// distinguishes every value (numeric keeps its scale: `1.5` and `1.50` differ) and is the same
/// on every server version and whatever the session settings. Record output then prints the
/// bytes in hex.
const SEND_FUNCTIONS: &[(&str, &str)] = &[
    ("numeric", "numeric_send"),
    ("timestamp with time zone", "timestamptz_send"),
    ("timestamp without time zone", "timestamp_send"),
    ("date", "date_send"),
    ("interval", "interval_send"),
];

/// How a column enters the row text: as itself, or through its send function.
fn column_text(quoted: &str, ty: &str) -> String {
    match SEND_FUNCTIONS.iter().find(|(t, _)| *t == ty) {
        Some((_, send)) => format!("{send}({quoted})"),
        None => quoted.to_owned(),
    }
}

/// `a` for one element (a plain comparison), `(a, b)` for more (a row comparison, which a
/// composite primary key index serves).
fn tuple(items: &[String]) -> String {
    if items.len() == 1 {
        items[0].clone()
    } else {
        format!("({})", items.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_range_statements_with_quoted_names_and_bound_values() {
        let sql = TableSql::new(
            &TableName::new("my schema", "Order\"s"),
            &[("t", "integer"), ("a b", "text")],
            &[("t", "integer"), ("a b", "text")],
        );
        let range = Range {
            lower: Some(vec!["1".into(), "x".into()]),
            upper: Some(vec!["5".into(), "y".into()]),
        };
        let (text, params) = sql.chunk_hash(&range);
        assert_eq!(
            text,
            "SELECT count(*), coalesce(sum(hashtextextended(ROW(\"t\", \"a b\")::text COLLATE \"C\", 0)), 0)::text \
             FROM \"my schema\".\"Order\"\"s\" WHERE (\"t\", \"a b\") >= (CAST($1::text AS integer), CAST($2::text AS text)) \
             AND (\"t\", \"a b\") < (CAST($3::text AS integer), CAST($4::text AS text))"
        );
        assert_eq!(params, ["1", "x", "5", "y"]);
        let (text, params) = sql.split_points(&Range {
            lower: None,
            upper: Some(vec!["5".into(), "y".into()]),
        });
        assert!(
            text.ends_with("WHERE rn % $3::int8 = 0 ORDER BY rn"),
            "{text}"
        );
        assert_eq!(params.len(), 2);
        let (text, params) = sql.chunk_hash(&Range::default());
        assert!(!text.contains("WHERE"));
        assert!(params.is_empty());
        let sql = TableSql::new(
            &TableName::new("s", "t"),
            &[
                ("n", "numeric"),
                ("at", "timestamp with time zone"),
                ("x", "real"),
            ],
            &[],
        );
        let (text, _) = sql.chunk_hash(&Range::default());
        assert!(
            text.contains(r#"ROW(numeric_send("n"), timestamptz_send("at"), "x")"#),
            "{text}"
        );
    }
}
