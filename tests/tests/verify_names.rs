//! The verifier on awkward databases: composite keys, non-public schemas, identifiers with
//! spaces, capitals, quotes and `;`, a column named like its table, tables without a key,
//! sequences, schema differences, table selection, and an unreachable side.

use cutover_operator::postgres::Dsn;
use cutover_operator::postgres::verify::{
    Difference, Key, Method, SequenceValue, TableName, VerifyError, VerifyOptions, verify,
};
use cutover_tests::{BlueGreen, PgCluster};

const SCHEMA: &str = r#"
CREATE SCHEMA "Sales Dept";
CREATE TABLE "Sales Dept"."Order Lines; DROP" (
    "Region" text,
    "order id" int,
    "Order Lines; DROP" text,
    "we""ird" numeric,
    PRIMARY KEY ("Region", "order id")
);
INSERT INTO "Sales Dept"."Order Lines; DROP"
SELECT (ARRAY['eu', 'us', 'Asia Pacific', 'o''hare'])[g % 4 + 1], g, 'line ' || g, g * 0.5
  FROM generate_series(1, 400) g;

-- A table named like one of its columns: `SELECT t::text FROM t` would hash only the column.
CREATE TABLE public.t (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, t text, other text);
INSERT INTO public.t (t, other) SELECT 'same', 'o' || g FROM generate_series(1, 50) g;

CREATE TABLE public.keyless (a int, b text);
INSERT INTO public.keyless SELECT g % 7, 'b' || g FROM generate_series(1, 70) g;

CREATE SEQUENCE "Sales Dept"."Invoice No";
SELECT setval('"Sales Dept"."Invoice No"', 41);
"#;

fn socket_dsn(cluster: &PgCluster) -> Dsn {
    Dsn::new(format!(
        "host={} port={} user=postgres dbname=app sslmode=disable",
        cluster.socket_dir().display(),
        cluster.port()
    ))
}

fn small() -> VerifyOptions {
    VerifyOptions {
        chunk_rows: 25,
        leaf_rows: 3,
        parallelism: 3,
        ..VerifyOptions::default()
    }
}

fn start() -> (BlueGreen, Dsn, Dsn) {
    let bg = BlueGreen::start().unwrap();
    bg.blue.execute("app", SCHEMA).unwrap();
    bg.green.execute("app", SCHEMA).unwrap();
    let (s, t) = (socket_dsn(&bg.blue), socket_dsn(&bg.green));
    (bg, s, t)
}

fn lines() -> TableName {
    TableName::new("Sales Dept", "Order Lines; DROP")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_names_composite_keys_and_keyless_tables() {
    let (bg, source, target) = start();
    let report = verify(&source, &target, &small()).await.unwrap();
    assert!(report.matched, "{}", report.render_text());
    let names: Vec<String> = report.tables.iter().map(|t| t.table.to_string()).collect();
    assert_eq!(
        names,
        [
            r#""Sales Dept"."Order Lines; DROP""#,
            "public.keyless",
            "public.t"
        ]
    );
    assert_eq!(report.tables[0].method, Method::Chunked);
    assert!(report.tables[0].chunks > 10, "{:?}", report.tables[0]);
    assert_eq!(report.tables[1].method, Method::FullHash);
    assert_eq!(report.source_rows, 400 + 70 + 50);
    // Sequences: the standalone one and the identity column's.
    let seqs: Vec<String> = report
        .sequences
        .iter()
        .map(|s| s.sequence.to_string())
        .collect();
    assert_eq!(seqs, [r#""Sales Dept"."Invoice No""#, "public.t_id_seq"]);
    assert!(report.sequences.iter().all(|s| s.matched));

    bg.green
        .execute(
            "app",
            r#"UPDATE "Sales Dept"."Order Lines; DROP" SET "we""ird" = "we""ird" + 0.01
                WHERE "Region" = 'o''hare' AND "order id" = 3;
               DELETE FROM "Sales Dept"."Order Lines; DROP" WHERE "Region" = 'Asia Pacific' AND "order id" = 202;
               UPDATE public.t SET other = other || '.' WHERE id = 17;
               UPDATE public.keyless SET b = 'B' WHERE b = 'b9';
               SELECT setval('"Sales Dept"."Invoice No"', 41, false);"#,
        )
        .unwrap();
    let report = verify(&source, &target, &small()).await.unwrap();
    assert!(!report.matched);
    let key = |region: &str, id: i32| Key {
        columns: vec!["Region".into(), "order id".into()],
        values: vec![region.into(), id.to_string()],
    };
    assert_eq!(
        report.tables[0].differences,
        vec![
            // Key order is the type's order: 'Asia Pacific' sorts before 'o''hare'.
            Difference::MissingOnTarget {
                key: key("Asia Pacific", 202)
            },
            Difference::Changed {
                key: key("o'hare", 3)
            },
        ],
    );
    assert_eq!(
        report.tables[0].differences.len(),
        2,
        "{:?}",
        report.tables[0]
    );
    assert_eq!(
        report.tables[1].differences,
        vec![Difference::Content {
            source_rows: 70,
            target_rows: 70
        }]
    );
    assert_eq!(
        report.tables[2].differences,
        vec![Difference::Changed {
            key: Key {
                columns: vec!["id".into()],
                values: vec!["17".into()]
            }
        }]
    );
    let invoice = &report.sequences[0];
    assert!(!invoice.matched);
    assert_eq!(
        (invoice.source, invoice.target),
        (
            Some(SequenceValue {
                last_value: 41,
                is_called: true
            }),
            Some(SequenceValue {
                last_value: 41,
                is_called: false
            })
        )
    );
    let lines: Vec<String> = report.mismatches();
    assert!(
        lines.contains(&r#"table "Sales Dept"."Order Lines; DROP": changed: (Region, order id)=('o''hare', 3)"#.to_owned()),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&r#"sequence "Sales Dept"."Invoice No": 41 (is_called true) on source, 41 (is_called false) on target"#.to_owned()),
        "{lines:#?}"
    );
    assert_eq!(lines.len(), 5, "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_differences_are_named_and_selection_narrows_the_comparison() {
    let (bg, source, target) = start();
    bg.green
        .execute(
            "app",
            r#"ALTER TABLE public.t ALTER COLUMN id TYPE bigint;
               ALTER TABLE public.t ALTER COLUMN other TYPE varchar(40);
               ALTER TABLE public.t ALTER COLUMN t SET NOT NULL;
               ALTER TABLE public.t ADD COLUMN added int;
               DROP TABLE public.keyless;
               CREATE TABLE public.only_on_green (x int);
               DROP SEQUENCE "Sales Dept"."Invoice No";"#,
        )
        .unwrap();
    let report = verify(&source, &target, &small()).await.unwrap();
    assert!(!report.matched);
    let schema: Vec<String> = report
        .schema_mismatches
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        schema,
        [
            "public.keyless: table missing on target",
            "public.t: column id is integer on source, bigint on target",
            "public.t: column t is nullable on source, NOT NULL on target",
            "public.t: column other is text on source, character varying(40) on target",
            "public.t: column added extra on target",
            "public.only_on_green: table extra on target",
        ],
    );
    // The rows of the common columns still match (text and varchar print alike; a key whose
    // type differs is hashed as its text on both sides).
    let t = report.tables.iter().find(|t| t.table.name == "t").unwrap();
    assert!(t.matched, "{t:?}");
    // What migrations may add to the target is no mismatch when allowed; what the source has
    // still must be there, equal.
    let additions = VerifyOptions {
        target_may_add: true,
        ..small()
    };
    let allowed = verify(&source, &target, &additions).await.unwrap();
    let schema: Vec<String> = allowed
        .schema_mismatches
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        schema,
        [
            "public.keyless: table missing on target",
            "public.t: column id is integer on source, bigint on target",
            "public.t: column t is nullable on source, NOT NULL on target",
            "public.t: column other is text on source, character varying(40) on target",
        ],
    );
    let invoice = &report.sequences[0];
    assert_eq!(invoice.target, None);
    assert!(!invoice.matched);

    // Only one table: its sequence-free comparison matches; other tables are not looked at.
    let only = VerifyOptions {
        tables: vec![lines()],
        ..small()
    };
    let report = verify(&source, &target, &only).await.unwrap();
    assert!(report.matched, "{}", report.render_text());
    assert_eq!(report.tables.len(), 1);
    assert!(report.sequences.is_empty());

    // A schema filter.
    let sales = VerifyOptions {
        schemas: vec!["Sales Dept".into()],
        ..small()
    };
    let report = verify(&source, &target, &sales).await.unwrap();
    assert_eq!(report.tables.len(), 1);
    assert_eq!(report.sequences.len(), 1, "the dropped sequence is named");
    assert!(!report.matched);

    let missing = VerifyOptions {
        tables: vec![TableName::new("public", "nope")],
        ..small()
    };
    let err = verify(&source, &target, &missing).await.unwrap_err();
    assert!(matches!(err, VerifyError::UnknownTable(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "failed to find table public.nope on the source database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_side_is_a_clear_error_without_the_password() {
    let bg = BlueGreen::start().unwrap();
    let source = Dsn::new(bg.blue_dsn());
    // A port nothing listens on, with a password that must not show.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let target = Dsn::new(format!(
        "postgres://postgres:hunter2-secret@127.0.0.1:{port}/app"
    ));
    let err = verify(&source, &target, &VerifyOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.category(), "Unreachable");
    let mut chain = err.to_string();
    let mut source_err: Option<&dyn std::error::Error> = std::error::Error::source(&err);
    while let Some(e) = source_err {
        chain.push_str(": ");
        chain.push_str(&e.to_string());
        source_err = e.source();
    }
    assert!(chain.starts_with("failed to connect to the target database: failed to connect to postgres://postgres@127.0.0.1:"), "{chain}");
    assert!(!chain.contains("hunter2"), "{chain}");
    assert!(!format!("{err:?}").contains("hunter2"));

    // A wrong password over TCP (SCRAM) is refused the same way.
    let wrong = Dsn::new(format!(
        "postgres://postgres:wrong-secret@127.0.0.1:{}/app",
        bg.green.port()
    ));
    let err = verify(&source, &wrong, &VerifyOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, VerifyError::Connect { .. }), "{err:?}");
    assert!(!format!("{err:?} {err}").contains("wrong-secret"));

    // Over TCP with the right password it works.
    let report = verify(
        &source,
        &Dsn::new(bg.green_dsn()),
        &VerifyOptions::default(),
    )
    .await
    .unwrap();
    assert!(report.matched);
    assert!(report.consistent_snapshot);
}
