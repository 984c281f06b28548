//! Rollback scripts: apply V1..V3, roll back to V1, and the catalog matches a database that
//! only ever saw V1.

mod migrate_support;

use cutover_operator::postgres::migrate::{Action, MigrateError};
use migrate_support::{Bed, DB};

const V1: &str = "CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL);\n\
                  CREATE INDEX customers_name_idx ON customers (name);\n";
const V2: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, customer bigint REFERENCES customers (id), total numeric(12,2) DEFAULT 0);\n\
                  CREATE SEQUENCE invoice_no;\n";
const R2: &str = "DROP SEQUENCE invoice_no;\nDROP TABLE orders;\n";
const V3: &str = "ALTER TABLE customers ADD COLUMN email text;\n\
                  ALTER TABLE customers ALTER COLUMN name TYPE varchar(200);\n\
                  CREATE VIEW big_customers AS SELECT id FROM customers;\n\
                  CREATE UNIQUE INDEX customers_email_key ON customers (email);\n";
const R3: &str = "DROP VIEW big_customers;\nDROP INDEX customers_email_key;\n\
                  ALTER TABLE customers ALTER COLUMN name TYPE text;\n\
                  ALTER TABLE customers DROP COLUMN email;\n";

/// The user-visible schema: relations, columns (live ones), indexes, constraints, sequences and
/// views, without the history table and without OIDs or attnums (a dropped column leaves a hole).
const CATALOG: &str = "
SELECT 'rel ' || c.relname || ' ' || c.relkind::text FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname = 'public' AND c.relname NOT LIKE 'cutover_schema_history%'
UNION ALL
SELECT 'col ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
       || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
  WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped
    AND c.relname NOT LIKE 'cutover_schema_history%'
UNION ALL
SELECT 'idx ' || indexdef FROM pg_indexes
  WHERE schemaname = 'public' AND tablename <> 'cutover_schema_history'
UNION ALL
SELECT 'con ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
    AND conrelid <> 'cutover_schema_history'::regclass
UNION ALL
SELECT 'view ' || viewname || ' ' || definition FROM pg_views WHERE schemaname = 'public'
ORDER BY 1";

fn catalog(bed: &Bed) -> Vec<String> {
    bed.rows(CATALOG)
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect()
}

#[tokio::test]
async fn rolling_back_to_v1_restores_the_v1_schema() {
    // The reference: a database that only ever had V1.
    let reference = Bed::start();
    reference.write("V1__customers.sql", V1);
    reference.run(Action::Apply).await.unwrap();
    let v1_schema = catalog(&reference);
    assert!(v1_schema.iter().any(|l| l.contains("customers_name_idx")));

    let bed = Bed::start();
    for (name, sql) in [
        ("V1__customers.sql", V1),
        ("V2__orders.sql", V2),
        ("R2__orders.sql", R2),
        ("V3__customer_email.sql", V3),
        ("R3__customer_email.sql", R3),
    ] {
        bed.write(name, sql);
    }
    bed.run(Action::Apply).await.unwrap();
    let v3_schema = catalog(&bed);
    assert_ne!(v3_schema, v1_schema);

    let target = "1".parse().unwrap();
    let dry = bed.run(Action::DryRunRollbackTo(target)).await.unwrap();
    let planned: Vec<&str> = dry
        .steps
        .iter()
        .map(|s| s.script.file_name.as_str())
        .collect();
    assert_eq!(planned, ["R3__customer_email.sql", "R2__orders.sql"]);
    assert_eq!(catalog(&bed), v3_schema, "a dry run changes nothing");

    let outcome = bed
        .run(Action::RollbackTo("1".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(outcome.version.as_deref(), Some("1"));
    assert_eq!(catalog(&bed), v1_schema);
    assert_eq!(
        bed.history(),
        [
            "1|migrate|true",
            "2|migrate|true",
            "3|migrate|true",
            "3|rollback|true",
            "2|rollback|true"
        ]
    );

    // Forward again: V2 and V3 are pending once more.
    let again = bed.run(Action::Apply).await.unwrap();
    assert_eq!(again.steps.len(), 2);
    assert_eq!(catalog(&bed), v3_schema);
}

#[tokio::test]
async fn a_rollback_without_scripts_is_refused_before_anything_runs() {
    let bed = Bed::start();
    bed.write("V1__customers.sql", V1);
    bed.write("V2__orders.sql", V2);
    bed.write("V3__customer_email.sql", V3);
    bed.write("R3__customer_email.sql", R3);
    bed.run(Action::Apply).await.unwrap();
    let before = catalog(&bed);
    let err = bed
        .run(Action::RollbackTo("1".parse().unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::MissingRollback { .. }), "{err}");
    assert!(err.to_string().contains("version(s) 2"), "{err}");
    assert_eq!(catalog(&bed), before);
    assert_eq!(
        bed.pg
            .query(
                DB,
                "SELECT count(*) FROM cutover_schema_history WHERE kind = 'rollback'"
            )
            .unwrap()[0][0]
            .as_deref(),
        Some("0")
    );
}
