//! What a database has: tables with their columns and primary keys, and sequences — read once
//! here for preflight's schema check and for verification alike. Table definitions are
//! compared here too, each difference named.

use std::collections::BTreeMap;

use thiserror::Error;
use tokio_postgres::Client;

use super::ident::TableName;
use super::shared::{EXCLUDED_SCHEMAS, db_message};

/// The catalog could not be read.
#[derive(Debug, Error)]
#[error("failed to read the tables and sequences: {}", db_message(.0))]
pub struct CatalogError(#[source] pub tokio_postgres::Error);

/// One column of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Column {
    pub name: String,
    /// `format_type` with the type modifier, for comparing and for casting key values
    /// (`character varying(20)`).
    pub type_full: String,
    /// `format_type` without the modifier, for choosing how values are hashed
    /// (`character varying`).
    pub type_base: String,
    pub not_null: bool,
    /// Collation name, empty when the type has none.
    pub collation: String,
    /// Position in the primary key (1-based), if part of it.
    pub key_position: Option<i64>,
    /// Whether the type is an enum (whose values are hashed by their label's bytes).
    pub is_enum: bool,
    /// Whether the column is generated (`GENERATED ALWAYS AS … STORED`): its values are not
    /// replicated, the target computes them.
    pub generated: bool,
    /// The generation expression of a generated column, as PostgreSQL prints it.
    pub generated_expr: Option<String>,
}

/// One table as the catalog describes it.
#[derive(Clone, Debug)]
pub(crate) struct Table {
    pub columns: Vec<Column>,
    /// Indexes and foreign keys by name, with their definitions (`pg_get_indexdef`, an index
    /// that is not valid marked so; `pg_get_constraintdef` of a foreign key, `NOT VALID` when
    /// so). The parallel copy drops and builds them again: verification checks they came back
    /// alike.
    pub indexes: BTreeMap<String, String>,
    /// `pg_class.reltuples`: an estimate, negative when never analysed.
    pub estimated_rows: f64,
}

impl Table {
    /// The primary key's columns in key order; empty without a primary key.
    pub fn key(&self) -> Vec<&Column> {
        let mut key: Vec<&Column> = self
            .columns
            .iter()
            .filter(|c| c.key_position.is_some())
            .collect();
        key.sort_by_key(|c| c.key_position);
        key
    }
}

/// One side's catalog.
#[derive(Clone, Debug, Default)]
pub(crate) struct Catalog {
    pub tables: BTreeMap<TableName, Table>,
    /// Sequences, with the table owning them (serial / identity), if any.
    pub sequences: BTreeMap<TableName, Option<TableName>>,
    /// The database's encoding (`server_encoding`): the bytes its text is hashed as.
    pub encoding: String,
}

const TABLES_SQL: &str = r"
SELECT n.nspname, c.relname, c.reltuples::float8, a.attname,
       format_type(a.atttypid, a.atttypmod), format_type(a.atttypid, NULL), a.attnotnull,
       coalesce(co.collname, ''),
       (SELECT k.ord FROM pg_constraint con, unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
         WHERE con.conrelid = c.oid AND con.contype = 'p' AND k.attnum = a.attnum)::int8,
       (SELECT t.typtype = 'e' FROM pg_type t WHERE t.oid = a.atttypid),
       a.attgenerated <> '',
       (SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
         WHERE d.adrelid = c.oid AND d.adnum = a.attnum AND a.attgenerated <> '')
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_collation co ON co.oid = a.attcollation
 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND n.nspname <> ALL ($1) AND n.nspname NOT LIKE 'pg\_%'
 ORDER BY n.nspname, c.relname, a.attnum";

const INDEXES_SQL: &str = r"
SELECT n.nspname, c.relname, ic.relname::text,
       pg_get_indexdef(i.indexrelid) || CASE WHEN i.indisvalid THEN '' ELSE ' (not valid)' END
  FROM pg_index i
  JOIN pg_class c ON c.oid = i.indrelid
  JOIN pg_class ic ON ic.oid = i.indexrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND n.nspname <> ALL ($1) AND n.nspname NOT LIKE 'pg\_%'
UNION ALL
SELECT n.nspname, c.relname, con.conname::text, pg_get_constraintdef(con.oid)
  FROM pg_constraint con
  JOIN pg_class c ON c.oid = con.conrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE con.contype = 'f' AND con.conparentid = 0 AND NOT c.relispartition
   AND n.nspname <> ALL ($1) AND n.nspname NOT LIKE 'pg\_%'";

const SEQUENCES_SQL: &str = r"
SELECT n.nspname, c.relname, tn.nspname, t.relname
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
        AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
  LEFT JOIN pg_class t ON t.oid = d.refobjid
  LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
 WHERE c.relkind = 'S' AND n.nspname <> ALL ($1) AND n.nspname NOT LIKE 'pg\_%'
 ORDER BY 1, 2";

/// Reads a database's tables and sequences (outside PostgreSQL's own schemas and the
/// operator's).
pub(crate) async fn read(client: &Client) -> Result<Catalog, CatalogError> {
    let err = CatalogError;
    let excluded: Vec<&str> = EXCLUDED_SCHEMAS.to_vec();
    let mut catalog = Catalog {
        encoding: client
            .query_one("SELECT current_setting('server_encoding')", &[])
            .await
            .map_err(err)?
            .get(0),
        ..Catalog::default()
    };
    for row in client.query(TABLES_SQL, &[&excluded]).await.map_err(err)? {
        let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let table = catalog.tables.entry(name).or_insert_with(|| Table {
            columns: Vec::new(),
            indexes: BTreeMap::new(),
            estimated_rows: row.get(2),
        });
        table.columns.push(Column {
            name: row.get(3),
            type_full: row.get(4),
            type_base: row.get(5),
            not_null: row.get(6),
            collation: row.get(7),
            key_position: row.get(8),
            is_enum: row.get(9),
            generated: row.get(10),
            generated_expr: row.get(11),
        });
    }
    for row in client.query(INDEXES_SQL, &[&excluded]).await.map_err(err)? {
        let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        if let Some(table) = catalog.tables.get_mut(&name) {
            table.indexes.insert(row.get(2), row.get(3));
        }
    }
    for row in client
        .query(SEQUENCES_SQL, &[&excluded])
        .await
        .map_err(err)?
    {
        let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let owner = match (
            row.get::<_, Option<String>>(2),
            row.get::<_, Option<String>>(3),
        ) {
            (Some(schema), Some(table)) => Some(TableName::new(schema, table)),
            _ => None,
        };
        catalog.sequences.insert(name, owner);
    }
    Ok(catalog)
}

/// The differences between the source's and the target's definition of one table, for people.
/// With `target_may_add`, columns only the target has are not differences (migrations added
/// them).
pub(crate) fn compare_table(source: &Table, target: &Table, target_may_add: bool) -> Vec<String> {
    let mut out = Vec::new();
    for s in &source.columns {
        let Some(t) = target.columns.iter().find(|t| t.name == s.name) else {
            out.push(format!("column {} missing on target", s.name));
            continue;
        };
        if s.type_full != t.type_full {
            out.push(format!(
                "column {} is {} on source, {} on target",
                s.name, s.type_full, t.type_full
            ));
        }
        if s.not_null != t.not_null {
            let word = |n: bool| if n { "NOT NULL" } else { "nullable" };
            out.push(format!(
                "column {} is {} on source, {} on target",
                s.name,
                word(s.not_null),
                word(t.not_null)
            ));
        }
        if s.collation != t.collation {
            out.push(format!(
                "column {} has collation {:?} on source, {:?} on target",
                s.name, s.collation, t.collation
            ));
        }
    }
    for t in target.columns.iter().filter(|_| !target_may_add) {
        if !source.columns.iter().any(|s| s.name == t.name) {
            out.push(format!("column {} extra on target", t.name));
        }
    }
    let names = |table: &Table| {
        table
            .key()
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    for (name, def) in &source.indexes {
        match target.indexes.get(name) {
            None => out.push(format!("index {name} missing on target ({def})")),
            Some(other) if other != def => {
                out.push(format!(
                    "index {name} is {def:?} on source, {other:?} on target"
                ));
            }
            Some(_) => {}
        }
    }
    for name in target.indexes.keys().filter(|_| !target_may_add) {
        if !source.indexes.contains_key(name) {
            out.push(format!("index {name} extra on target"));
        }
    }
    let (sk, tk) = (names(source), names(target));
    if sk != tk {
        let show = |k: &[String]| {
            if k.is_empty() {
                "none".to_owned()
            } else {
                format!("({})", k.join(", "))
            }
        };
        out.push(format!(
            "primary key {} on source, {} on target",
            show(&sk),
            show(&tk)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: &str, key: Option<i64>) -> Column {
        Column {
            name: name.into(),
            type_full: ty.into(),
            type_base: ty.into(),
            not_null: key.is_some(),
            collation: String::new(),
            key_position: key,
            is_enum: false,
            generated: false,
            generated_expr: None,
        }
    }

    #[test]
    fn names_every_schema_difference() {
        let source = Table {
            columns: vec![
                col("id", "integer", Some(1)),
                col("a", "text", None),
                col("b", "text", None),
            ],
            indexes: BTreeMap::from([
                (
                    "t_pkey".into(),
                    "CREATE UNIQUE INDEX t_pkey ON public.t USING btree (id)".into(),
                ),
                (
                    "t_a_idx".into(),
                    "CREATE INDEX t_a_idx ON public.t USING btree (a)".into(),
                ),
            ]),
            estimated_rows: 0.0,
        };
        let mut target = source.clone();
        target.indexes.remove("t_a_idx");
        target.indexes.insert(
            "t_pkey".into(),
            "CREATE UNIQUE INDEX t_pkey ON public.t USING btree (id) (not valid)".into(),
        );
        target.columns[0].type_full = "bigint".into();
        target.columns[1].not_null = true;
        target.columns.remove(2);
        target.columns.push(col("c", "text", None));
        target.columns[0].key_position = None;
        let diffs = compare_table(&source, &target, false);
        assert!(
            !compare_table(&source, &target, true)
                .iter()
                .any(|d| d.contains("extra on target")),
            "with target additions allowed, an extra column is no difference"
        );
        assert_eq!(
            diffs,
            vec![
                "column id is integer on source, bigint on target",
                "column a is nullable on source, NOT NULL on target",
                "column b missing on target",
                "column c extra on target",
                "index t_a_idx missing on target (CREATE INDEX t_a_idx ON public.t USING btree (a))",
                "index t_pkey is \"CREATE UNIQUE INDEX t_pkey ON public.t USING btree (id)\" on source, \"CREATE UNIQUE INDEX t_pkey ON public.t USING btree (id) (not valid)\" on target",
                "primary key (id) on source, none on target",
            ]
        );
        assert!(compare_table(&source, &source, false).is_empty());
    }
}
