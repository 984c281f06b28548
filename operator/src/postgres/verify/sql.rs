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
    /// The per-row hash (64 bits), see [`row_hash`].
    row_hash: String,
}

impl TableSql {
    /// `columns` (name, type without modifier) are hashed in the given order; `key` is
    /// `(name, type with its modifier, for casting bounds)` in key order (empty for a table
    /// without a usable key). With `transcode`
    /// (the two databases' encodings differ), text is hashed as its UTF-8 bytes rather than
    /// in the database's own encoding.
    pub fn new(
        table: &TableName,
        columns: &[(&str, &str)],
        key: &[(&str, &str)],
        transcode: bool,
    ) -> Self {
        Self {
            relation: quote_qualified(&table.schema, &table.name),
            key: key.iter().map(|(name, _)| quote_ident(name)).collect(),
            key_types: key.iter().map(|(_, ty)| (*ty).to_owned()).collect(),
            row_hash: row_hash(columns, key, transcode),
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

    /// Like [`Self::chunk_hash`] over the rows of `range` whose key is not among `excluded`:
    /// the keys are bound as one `text[]` per key column, after the range's parameters
    /// (online verification leaves out the keys it compares one by one).
    pub fn chunk_hash_excluding(&self, range: &Range, excluded: &KeyList) -> (String, Params) {
        let (predicate, mut params) = self.predicate(range);
        let clause = self.not_in(excluded, params.len());
        let joined = join_predicate(&predicate, &clause);
        let sql = format!(
            "SELECT count(*), coalesce(sum({}), 0)::text FROM {}{joined}",
            self.row_hash, self.relation
        );
        let mut out: Params = params.drain(..).map(Param::Text).collect();
        out.extend(excluded.arrays());
        (sql, out)
    }

    /// Like [`Self::rows`] over the rows of `range` whose key is not among `excluded`.
    pub fn rows_excluding(&self, range: &Range, excluded: &KeyList) -> (String, Params) {
        let (predicate, mut params) = self.predicate(range);
        let clause = self.not_in(excluded, params.len());
        let joined = join_predicate(&predicate, &clause);
        let keys: Vec<String> = self.key.iter().map(|k| format!("{k}::text")).collect();
        let order: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("{}.{k}", self.relation))
            .collect();
        let sql = format!(
            "SELECT {}, {} FROM {}{joined} ORDER BY {}",
            keys.join(", "),
            self.row_hash,
            self.relation,
            order.join(", ")
        );
        let mut out: Params = params.drain(..).map(Param::Text).collect();
        out.extend(excluded.arrays());
        (sql, out)
    }

    /// The row hash of each key of `keys` (bound as one `text[]` per key column), NULL where
    /// the table has no such row. Rows come back as the keys were given (the given text,
    /// then the hash), so they are matched by what was asked, whatever the type's output.
    pub fn rows_for_keys(&self, keys: &KeyList) -> (String, Params) {
        let names: Vec<String> = (0..self.key.len()).map(|i| format!("u{i}")).collect();
        let unnest: Vec<String> = (0..self.key.len())
            .map(|i| format!("${}::text[]", i + 1))
            .collect();
        let on: Vec<String> = self
            .key
            .iter()
            .zip(&self.key_types)
            .enumerate()
            .map(|(i, (k, ty))| format!("t.{k} = CAST(u.u{i} AS {ty})"))
            .collect();
        let sql = format!(
            "SELECT {names}, (SELECT {hash} FROM {rel} t WHERE {on}) \
               FROM unnest({unnest}) AS u({names})",
            names = names.join(", "),
            hash = self.row_hash,
            rel = self.relation,
            on = on.join(" AND "),
            unnest = unnest.join(", "),
        );
        (sql, keys.arrays())
    }

    /// ` NOT (key IN (the listed keys))`, the lists being parameters after the first `offset`.
    fn not_in(&self, excluded: &KeyList, offset: usize) -> String {
        if excluded.is_empty() {
            return String::new();
        }
        let names: Vec<String> = (0..self.key.len()).map(|i| format!("u{i}")).collect();
        let casts: Vec<String> = self
            .key_types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("CAST(u.u{i} AS {ty})"))
            .collect();
        let unnest: Vec<String> = (0..self.key.len())
            .map(|i| format!("${}::text[]", offset + i + 1))
            .collect();
        format!(
            "NOT ({} IN (SELECT {} FROM unnest({}) AS u({})))",
            tuple(&self.key),
            casts.join(", "),
            unnest.join(", "),
            names.join(", ")
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

    /// Up to `$2::int8` keys picked at random from a block sample of `$1::float8` percent of the
    /// table: where spot checks start.
    pub fn spot_starts(&self) -> String {
        format!(
            "SELECT {outer} FROM (SELECT {inner} FROM {rel} TABLESAMPLE SYSTEM ($1::float8) \
             ORDER BY random() LIMIT $2::int8) s",
            outer = self.aliases("::text"),
            inner = self.aliased_keys(),
            rel = self.relation,
        )
    }

    /// The key `$n::int8` rows after `from` (inclusive) in key order, if there is one: where a
    /// spot check of that many rows ends.
    pub fn spot_end(&self, from: &[String]) -> (String, Vec<String>) {
        let (predicate, params) = self.predicate(&Range {
            lower: Some(from.to_vec()),
            upper: None,
        });
        let offset = params.len() + 1;
        let keys: Vec<String> = self.key.iter().map(|k| format!("{k}::text")).collect();
        let order: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("{}.{k}", self.relation))
            .collect();
        (
            format!(
                "SELECT {} FROM {}{predicate} ORDER BY {} OFFSET ${offset}::int8 LIMIT 1",
                keys.join(", "),
                self.relation,
                order.join(", ")
            ),
            params,
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

/// The per-row hash expression (64 bits, `int8`).
///
/// Every column becomes a part, an exact 64-bit hash seeded with its position (see
/// [`Encoding`]): a type with a hash expression on its own; the columns whose bytes are hashed
/// (`bytea` and the types hashed through their binary send form) together, as one array of
/// their bytes; every other column as its text. A NULL column contributes 0 — an empty string
/// or array hashes to something else. The parts are combined with xor into `x`.
///
/// **With a key**, the key columns are hashed only into `k` (negative seeds) and the row's hash
/// is `hashtextextended(x::text, k)`: every part is bound to its row, so a value moved from one
/// row to another changes both rows' hashes (a plain sum of per-column hashes would not
/// notice), and the position in each seed tells two columns holding the same value apart.
///
/// **Without a key**, every column goes into `x` and the row's hash is
/// `hashtextextended(x::text, 0)`.
fn row_hash(columns: &[(&str, &str)], key: &[(&str, &str)], transcode: bool) -> String {
    let mut parts = Vec::new();
    let mut bytes = Vec::new();
    for (i, (name, ty)) in columns.iter().enumerate() {
        if key.iter().any(|(k, _)| k == name) {
            continue;
        }
        let quoted = quote_ident(name);
        match encoding(ty, transcode) {
            Encoding::Bytes(bytes_of) => bytes.push(bytes_of.replace("{c}", &quoted)),
            _ => parts.push(format!(
                "coalesce({}, 0)",
                column_hash(&quoted, ty, transcode, i as i64 + 1)
            )),
        }
    }
    if !bytes.is_empty() {
        // Never NULL: a NULL element hashes as 0, an empty one as something else; the
        // element's position in the array keeps columns apart.
        parts.push(format!(
            "hash_array_extended(ARRAY[{}], 0)",
            bytes.join(", ")
        ));
    }
    let x = if parts.is_empty() {
        "0".to_owned()
    } else {
        parts.join(" # ")
    };
    let k = if key.is_empty() {
        "0".to_owned()
    } else {
        // Hashed by the type both sides agree on (as in `columns`), text otherwise.
        let hashed_as = |name: &str| {
            columns
                .iter()
                .find(|(c, _)| *c == name)
                .map_or("", |(_, ty)| *ty)
        };
        key.iter()
            .enumerate()
            .map(|(j, (name, _))| {
                column_hash(
                    &quote_ident(name),
                    hashed_as(name),
                    transcode,
                    -(j as i64) - 1,
                )
            })
            .collect::<Vec<_>>()
            .join(" # ")
    };
    format!("hashtextextended(({x})::text, {k})")
}

/// How a column of a type is hashed. Every encoding gives two values with different text
/// different 64-bit hashes (but for chance), the same on every server version and whatever
/// the session's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    /// An expression (`{c}` the column, `{s}` an integer seed) that runs no output function —
    /// several times cheaper per value than rendering text.
    Hash(&'static str),
    /// Bytes: an expression of type `bytea` (`{c}` the column), hashed as an array element.
    Bytes(&'static str),
    /// The value's text by its output function (an expression of type `text`, NULL when the
    /// value is NULL), hashed as bytes.
    Text(&'static str),
}

/// Types hashed by an expression:
/// - `smallint`, `integer`, `boolean` (as an integer), `uuid`: their hash functions, exact
///   (PostgreSQL's `hashint8extended` folds 64 bits into 32 before hashing — `0` and
///   `4294967297` hash alike — so `bigint` adds a hash of its upper half);
/// - `text` and `varchar` under `COLLATE "C"`: the bytes;
/// - `real` and `double precision`: their hash, except that a zero is hashed as its text, so
///   `0` and `-0` differ (every NaN renders alike anyway, and their hash agrees);
/// - one-dimensional arrays of `smallint`, `integer`, `text` and `uuid` starting at 1: the array
///   hash over their elements; other arrays of those types as text.
///
/// These are the functions hash partitioning uses, stable across server versions.
const HASH_FUNCTIONS: &[(&str, &str)] = &[
    ("smallint", "hashint2extended({c}, {s})"),
    ("integer", "hashint4extended({c}, {s})"),
    (
        "bigint",
        "(hashint8extended({c}, {s}) # hashint8extended({c} >> 32, ~{s}))",
    ),
    ("boolean", "hashint4extended({c}::int4, {s})"),
    ("text", "hashtextextended({c} COLLATE \"C\", {s})"),
    (
        "character varying",
        "hashtextextended({c} COLLATE \"C\", {s})",
    ),
    ("uuid", "uuid_hash_extended({c}, {s})"),
    // Its byte as a number: the text of a byte above 127 changed in PostgreSQL 15.
    ("\"char\"", "hashint4extended({c}::int4, {s})"),
    (
        "double precision",
        "CASE WHEN {c} = 0 THEN hashtextextended({c}::text, {s}) ELSE hashfloat8extended({c}, {s}) END",
    ),
    (
        "real",
        "CASE WHEN {c} = 0 THEN hashtextextended({c}::text, {s}) ELSE hashfloat4extended({c}, {s}) END",
    ),
    ("smallint[]", ARRAY_HASH),
    ("integer[]", ARRAY_HASH),
    ("uuid[]", ARRAY_HASH),
    (
        "text[]",
        "(CASE WHEN array_ndims({c}) = 1 AND array_lower({c}, 1) = 1 \
         THEN hash_array_extended({c} COLLATE \"C\", {s}) ELSE hashtextextended({c}::text, {s}) END) # {k}",
    ),
];

/// Arrays: the element hashes for the usual one-dimensional, 1-based ones (the array hash does
/// not see the bounds), the text for the others; xored with the column's constant (`{k}`, see
/// [`seed_constant`]).
const ARRAY_HASH: &str = "(CASE WHEN array_ndims({c}) = 1 AND array_lower({c}, 1) = 1 \
     THEN hash_array_extended({c}, {s}) ELSE hashtextextended({c}::text, {s}) END) # {k}";

/// The type name [`TableSql::new`] takes for a column of an enum type (any enum, on both
/// sides): hashed by its label's bytes.
pub(crate) const ENUM: &str = "anyenum";

/// Types hashed as bytes: `bytea`, and the types whose binary send form is cheaper to produce
/// than their text and, like the text, tells every two values apart — `numeric` keeps its
/// scale (`1.5` and `1.50` differ), `interval` its fields (`1 day` and `24 hours` differ),
/// `character` its padding (its cast to `text` would drop trailing spaces), an enum is its
/// label (its own hash is of the label's OID, which differs between databases). The bytes are
/// hashed by the array hash (`bytea`'s own hash function is not callable from SQL).
///
/// Send functions that carry text (`character`, enums) convert it to the session's client
/// encoding, UTF-8 on every verifying connection, so they agree between databases of different
/// encodings.
const BYTES: &[(&str, &str)] = &[
    ("bytea", "{c}"),
    ("numeric", "numeric_send({c})"),
    ("timestamp with time zone", "timestamptz_send({c})"),
    ("timestamp without time zone", "timestamp_send({c})"),
    ("date", "date_send({c})"),
    ("interval", "interval_send({c})"),
    ("character", "bpcharsend({c})"),
    (ENUM, "enum_send({c})"),
];

/// Text as UTF-8 bytes, for databases of different encodings: `hashtextextended` hashes the
/// database's own bytes, which differ between, say, LATIN1 and UTF8 for `é`.
const TRANSCODED: &str = "convert_to(CASE WHEN {c} IS NOT NULL THEN format('%s', {c}) END, 'UTF8')";

/// [`TRANSCODED`] for the types whose `::text` is their output (text itself, `varchar`, text
/// arrays, [`TEXT_IS_OUTPUT`]).
const TRANSCODED_TEXT: &str = "convert_to({c}::text, 'UTF8')";

/// The types whose hash reads the database's bytes of text.
const TEXT_HASHES: &[&str] = &["text", "character varying", "text[]"];

fn encoding(ty: &str, transcode: bool) -> Encoding {
    if transcode && (TEXT_HASHES.contains(&ty) || TEXT_IS_OUTPUT.contains(&ty)) {
        Encoding::Bytes(TRANSCODED_TEXT)
    } else if let Some((_, f)) = HASH_FUNCTIONS.iter().find(|(t, _)| *t == ty) {
        Encoding::Hash(f)
    } else if let Some((_, bytes_of)) = BYTES.iter().find(|(t, _)| *t == ty) {
        Encoding::Bytes(bytes_of)
    } else if transcode {
        Encoding::Bytes(TRANSCODED)
    } else if TEXT_IS_OUTPUT.contains(&ty) {
        Encoding::Text("{c}::text")
    } else {
        Encoding::Text(OUTPUT)
    }
}

/// `quoted` (of type `ty`) hashed on its own with the integer `seed`: NULL when it is NULL, but
/// for bytes, which hash a NULL as the array hash hashes a NULL element.
fn column_hash(quoted: &str, ty: &str, transcode: bool, seed: i64) -> String {
    // The seed and the constant first: a column's name may itself contain `{s}`.
    let fill = |template: &str| {
        template
            .replace("{s}", &format!("({seed})"))
            .replace("{k}", &seed_constant(seed).to_string())
            .replace("{c}", quoted)
    };
    match encoding(ty, transcode) {
        Encoding::Hash(f) => fill(f),
        Encoding::Bytes(bytes_of) => {
            fill(&format!("hash_array_extended(ARRAY[{bytes_of}], {{s}})"))
        }
        Encoding::Text(text) => fill(&format!("hashtextextended({text} COLLATE \"C\", {{s}})")),
    }
}

/// A constant that differs from column to column (splitmix64 of the seed, 63 bits so it is a
/// plain `int8` literal): xored into hashes that ignore their seed for some values — the array
/// hash of `{NULL}` is 31 and of `{NULL,NULL}` 961 whatever the seed — so that such values in
/// two columns do not cancel out or trade places unseen.
fn seed_constant(seed: i64) -> i64 {
    let mut z = (seed as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// A value's text by its type's output function, NULL when it is NULL. `::text` would take a
/// cast to text where the type has one of its own, and some differ from the output: `xml`'s
/// keeps the stored declaration that `xml_out` drops, `character`'s (also for a domain over it)
/// drops trailing spaces. `format('%s', …)` always calls the output function.
const OUTPUT: &str = "CASE WHEN {c} IS NOT NULL THEN format('%s', {c}) END";

/// Types whose `::text` is their output function (no cast of their own), cheaper than
/// [`OUTPUT`]'s `format`.
const TEXT_IS_OUTPUT: &[&str] = &["jsonb", "json"];

/// `a` for one element (a plain comparison), `(a, b)` for more (a row comparison, which a
/// composite primary key index serves).
/// `predicate` (empty or ` WHERE …`) and one more clause (empty or a condition).
fn join_predicate(predicate: &str, clause: &str) -> String {
    match (predicate.is_empty(), clause.is_empty()) {
        (_, true) => predicate.to_owned(),
        (true, false) => format!(" WHERE {clause}"),
        (false, false) => format!("{predicate} AND {clause}"),
    }
}

/// A statement parameter: a key bound as text, or a list of keys' column as `text[]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Param {
    Text(String),
    Texts(Vec<String>),
}

/// A statement's parameters, in order.
pub(crate) type Params = Vec<Param>;

impl Param {
    pub fn as_sql(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Param::Text(t) => t,
            Param::Texts(t) => t,
        }
    }
}

/// Keys of one table, as text, column by column.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct KeyList {
    columns: Vec<Vec<String>>,
}

impl KeyList {
    /// The keys (each as many values as the key has columns).
    pub fn new<'a>(width: usize, keys: impl IntoIterator<Item = &'a Vec<String>>) -> Self {
        let mut columns = vec![Vec::new(); width];
        for key in keys {
            for (column, value) in columns.iter_mut().zip(key) {
                column.push(value.clone());
            }
        }
        Self { columns }
    }

    pub fn is_empty(&self) -> bool {
        self.columns.first().is_none_or(Vec::is_empty)
    }

    fn arrays(&self) -> Vec<Param> {
        if self.is_empty() {
            return Vec::new();
        }
        self.columns.iter().cloned().map(Param::Texts).collect()
    }
}

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

    /// The whole-table hash statement of a table `s.t` with these columns and key.
    fn whole_table(columns: &[(&str, &str)], key: &[(&str, &str)], transcode: bool) -> String {
        TableSql::new(&TableName::new("s", "t"), columns, key, transcode)
            .chunk_hash(&Range::default())
            .0
    }

    #[test]
    fn builds_range_statements_with_quoted_names_and_bound_values() {
        let sql = TableSql::new(
            &TableName::new("my schema", "Order\"s"),
            &[("t", "integer"), ("a b", "text")],
            &[("t", "integer"), ("a b", "text")],
            false,
        );
        let range = Range {
            lower: Some(vec!["1".into(), "x".into()]),
            upper: Some(vec!["5".into(), "y".into()]),
        };
        let (text, params) = sql.chunk_hash(&range);
        let k = r#"hashint4extended("t", (-1)) # hashtextextended("a b" COLLATE "C", (-2))"#;
        // Both columns are the key: nothing is left for `x`.
        let x = "0";
        assert_eq!(
            text,
            format!(
                "SELECT count(*), coalesce(sum(hashtextextended(({x})::text, {k})), 0)::text \
                 FROM \"my schema\".\"Order\"\"s\" WHERE (\"t\", \"a b\") >= (CAST($1::text AS integer), CAST($2::text AS text)) \
                 AND (\"t\", \"a b\") < (CAST($3::text AS integer), CAST($4::text AS text))"
            )
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
        // Without a key, every column goes into `x`: the bytes together, in column order.
        let text = whole_table(
            &[
                ("n", "numeric"),
                ("at", "timestamp with time zone"),
                ("x", "real"),
                ("c", "character"),
                ("b", "bytea"),
                ("e", ENUM),
            ],
            &[],
            false,
        );
        assert!(
            text.contains(
                r#"sum(hashtextextended((coalesce(CASE WHEN "x" = 0 THEN hashtextextended("x"::text, (3)) ELSE hashfloat4extended("x", (3)) END, 0) # hash_array_extended(ARRAY[numeric_send("n"), timestamptz_send("at"), bpcharsend("c"), "b", enum_send("e")], 0))::text, 0))"#
            ),
            "{text}"
        );
        // A key of a type without a hash expression is bound through its text, a numeric one
        // through its bytes; key columns are not hashed again in `x`; a bigint hashes both
        // halves; jsonb is hashed as its `::text`, a type not passed as an enum by its output.
        let text = whole_table(
            &[
                ("d", "mood"),
                ("id", "bigint"),
                ("doc", "jsonb"),
                ("n", "numeric"),
            ],
            &[("d", "mood"), ("n", "numeric")],
            false,
        );
        assert!(
            text.contains(
                r#"sum(hashtextextended((coalesce((hashint8extended("id", (2)) # hashint8extended("id" >> 32, ~(2))), 0) # coalesce(hashtextextended("doc"::text COLLATE "C", (3)), 0))::text, hashtextextended(CASE WHEN "d" IS NOT NULL THEN format('%s', "d") END COLLATE "C", (-1)) # hash_array_extended(ARRAY[numeric_send("n")], (-2))))"#
            ),
            "{text}"
        );
    }

    #[test]
    fn names_are_filled_in_last_arrays_get_their_own_constant_and_key_casts_keep_modifiers() {
        let sql = TableSql::new(
            &TableName::new("s", "t"),
            &[
                ("k", "character"),
                ("x{s}{k}", "integer"),
                ("a", "integer[]"),
                ("b", "integer[]"),
                ("c", "\"char\""),
            ],
            &[("k", "character(6)")],
            false,
        );
        let (text, _) = sql.chunk_hash(&Range {
            lower: Some(vec!["abcdef".into()]),
            upper: None,
        });
        // A column called `x{s}{k}` keeps its name.
        assert!(
            text.contains(r#"hashint4extended("x{s}{k}", (2))"#),
            "{text}"
        );
        // Two array columns: each its own constant, so `{NULL}` in one and NULL in the other do
        // not trade places unseen.
        let (a, b) = (seed_constant(3), seed_constant(4));
        assert_ne!(a, b);
        assert!(a >= 0 && b >= 0);
        assert!(
            text.contains(&format!(
                "ELSE hashtextextended(\"a\"::text, (3)) END) # {a}"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "ELSE hashtextextended(\"b\"::text, (4)) END) # {b}"
            )),
            "{text}"
        );
        assert!(
            text.contains(r#"hashint4extended("c"::int4, (5))"#),
            "{text}"
        );
        // The bound is cast to the key's full type: `character` alone is `character(1)`.
        assert!(text.contains(r#"CAST($1::text AS character(6))"#), "{text}");
        assert!(
            text.contains(r#"hash_array_extended(ARRAY[bpcharsend("k")], (-1))"#),
            "{text}"
        );
    }

    #[test]
    fn databases_of_different_encodings_hash_text_as_utf8() {
        let columns = [
            ("id", "text"),
            ("v", "character varying"),
            ("tags", "text[]"),
            ("doc", "jsonb"),
            ("c", "character"),
            ("n", "integer"),
        ];
        let key = [("id", "text")];
        let text = whole_table(&columns, &key, false);
        assert!(!text.contains("convert_to"), "{text}");
        let text = whole_table(&columns, &key, true);
        // Integers and the send forms are the same bytes in any encoding; text is converted.
        assert!(
            text.contains(
                r#"sum(hashtextextended((coalesce(hashint4extended("n", (6)), 0) # hash_array_extended(ARRAY[convert_to("v"::text, 'UTF8'), convert_to("tags"::text, 'UTF8'), convert_to("doc"::text, 'UTF8'), bpcharsend("c")], 0))::text, hash_array_extended(ARRAY[convert_to("id"::text, 'UTF8')], (-1))))"#
            ),
            "{text}"
        );
    }
}
