//! Property tests of the verifier against real clusters: on identical data nothing is reported;
//! any single changed cell (for every column type), a deleted row and an inserted row are each
//! found and named by key (and found in a copy of the table without a key) — over many seeds, with chunk sizes, bisection depth and parallelism
//! varied per seed so ranges, sub-ranges and leaves are all exercised.
//!
//! `CUTOVER_VERIFY_SEEDS=N` runs N seeds (default four of each change).

use cutover_operator::postgres::Dsn;
use cutover_operator::postgres::verify::{
    Difference, Key, Method, TableName, VerifyOptions, verify,
};
use cutover_tests::{BlueGreen, PgCluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A change applied to the target, and what the verifier must report.
#[derive(Clone, Copy, Debug)]
enum Change {
    TextNullToEmpty,
    TextEmptyToNull,
    NumericLastDigit,
    FloatMinusZero,
    FloatNan,
    TimestamptzMicrosecond,
    JsonbKey,
    ArrayElement,
    ByteaByte,
    Enum,
    ToastedOneCharLonger,
    DeletedRow,
    InsertedRow,
    NumericScale,
    BoolFlip,
    UuidLastDigit,
    TimestampMicrosecond,
    SmallintPlusOne,
    ValuesSwappedBetweenRows,
    BigintFoldedTwin,
    IntervalSameLength,
    ArrayLowerBound,
    ByteaNullToEmpty,
    CharTrailingSpace,
    NullsArrayAndNullTradePlaces,
}

const CHANGES: [Change; 25] = [
    Change::TextNullToEmpty,
    Change::TextEmptyToNull,
    Change::NumericLastDigit,
    Change::FloatMinusZero,
    Change::FloatNan,
    Change::TimestamptzMicrosecond,
    Change::JsonbKey,
    Change::ArrayElement,
    Change::ByteaByte,
    Change::Enum,
    Change::ToastedOneCharLonger,
    Change::DeletedRow,
    Change::InsertedRow,
    Change::NumericScale,
    Change::BoolFlip,
    Change::UuidLastDigit,
    Change::TimestampMicrosecond,
    Change::SmallintPlusOne,
    Change::ValuesSwappedBetweenRows,
    Change::BigintFoldedTwin,
    Change::IntervalSameLength,
    Change::ArrayLowerBound,
    Change::ByteaNullToEmpty,
    Change::CharTrailingSpace,
    Change::NullsArrayAndNullTradePlaces,
];

impl Change {
    /// Whether row `g` (key `2g`) is one this change applies to.
    fn applies_to(self, g: i64) -> bool {
        match self {
            Self::TextNullToEmpty => g % 3 == 0,
            Self::TextEmptyToNull => g % 3 == 1,
            Self::FloatMinusZero => g % 5 == 0,
            Self::FloatNan => g % 5 != 0 && g % 7 != 0,
            Self::ToastedOneCharLonger => g % 10 == 0,
            Self::ByteaByte => g % 4 != 0,
            Self::ByteaNullToEmpty => g % 4 == 0,
            // A row with a text and the row before it, whose text is '' (g ≥ 2).
            Self::ValuesSwappedBetweenRows => g % 3 == 2,
            _ => true,
        }
    }

    /// The change to row `id` of `table` (`props` or its keyless copy).
    fn sql(self, table: &str, id: i64) -> String {
        let set = |assignment: &str| format!("UPDATE {table} SET {assignment} WHERE id = {id}");
        match self {
            Self::TextNullToEmpty => set("t = ''"),
            Self::TextEmptyToNull => set("t = NULL"),
            Self::NumericLastDigit => set("n = n + 0.001"),
            Self::FloatMinusZero => set("f = '-0'"),
            Self::FloatNan => set("f = 'NaN'"),
            Self::TimestamptzMicrosecond => set("ts = ts + interval '1 microsecond'"),
            Self::JsonbKey => set("j = (j - 'b') || jsonb_build_object('bb', j -> 'b')"),
            Self::ArrayElement => set("arr[2] = arr[2] + 1"),
            Self::ByteaByte => set("b = set_byte(b, 7, (get_byte(b, 7) + 1) % 256)"),
            Self::Enum => {
                set("e = CASE e WHEN 'sad' THEN 'ok' WHEN 'ok' THEN 'happy' ELSE 'sad' END::mood")
            }
            Self::ToastedOneCharLonger => set("big = big || 'x'"),
            Self::DeletedRow => format!("DELETE FROM {table} WHERE id = {id}"),
            Self::InsertedRow => {
                format!("INSERT INTO {table} (id, t) VALUES ({}, 'new')", id + 1)
            }
            // The same value, one more digit of display scale: 1.370 becomes 1.3700.
            Self::NumericScale => set("n = round(n, scale(n) + 1)"),
            Self::BoolFlip => set("flag = NOT flag"),
            Self::UuidLastDigit => set(
                "u = overlay(u::text PLACING CASE WHEN right(u::text, 1) = '0' THEN '1' ELSE '0' END \
                 FROM 36)::uuid",
            ),
            Self::TimestampMicrosecond => set("lts = lts + interval '1 microsecond'"),
            Self::SmallintPlusOne => set("small = small + 1"),
            // Each row keeps a value, but the two rows trade theirs: every row's own content
            // changed while the table's multiset of column values did not.
            // PostgreSQL's own bigint hash folds the halves together: this value hashes like
            // the old one there.
            Self::BigintFoldedTwin => set("counter = counter # 4294967297"),
            // Equal as intervals, different as values: '2 days' becomes '1 day 24:00:00'.
            Self::IntervalSameLength => set("iv = iv - interval '1 day' + interval '24 hours'"),
            // The same elements from index 0.
            Self::ArrayLowerBound => {
                set("arr = ('[0:2]={' || arr[1] || ',' || arr[2] || ',' || arr[3] || '}')::int[]")
            }
            // A NULL among the columns hashed together as bytes becomes an empty value.
            Self::ByteaNullToEmpty => set("b = ''::bytea"),
            // Unbounded `bpchar` keeps what it is given: 'c5' becomes 'c5 ', equal as
            // `bpchar`, different text.
            Self::CharTrailingSpace => set("ch = ch::text || ' '"),
            // The array hash ignores its seed for an array of NULLs: `{NULL}` in one column and
            // NULL in the other must not look like NULL and `{NULL}`.
            Self::NullsArrayAndNullTradePlaces => set("e1 = e2, e2 = e1"),
            Self::ValuesSwappedBetweenRows => format!(
                "UPDATE {table} p SET t = o.t FROM {table} o
                  WHERE (p.id, o.id) IN (({id}, {previous}), ({previous}, {id}))",
                previous = id - 2
            ),
        }
    }

    fn expected(self, id: i64) -> Vec<Difference> {
        let key = |id: i64| Key {
            columns: vec!["id".into()],
            values: vec![id.to_string()],
        };
        match self {
            Self::DeletedRow => vec![Difference::MissingOnTarget { key: key(id) }],
            Self::InsertedRow => vec![Difference::ExtraOnTarget { key: key(id + 1) }],
            Self::ValuesSwappedBetweenRows => vec![
                Difference::Changed { key: key(id - 2) },
                Difference::Changed { key: key(id) },
            ],
            _ => vec![Difference::Changed { key: key(id) }],
        }
    }
}

/// The same rows on both sides; `seed` varies values and size. Keys are even, so an inserted
/// odd key lands between existing ones.
fn fill_sql(seed: u64, rows: i64) -> String {
    format!(
        "DROP TABLE IF EXISTS props;
         CREATE TABLE props (id bigint PRIMARY KEY, t text, n numeric, f float8, ts timestamptz,
                             j jsonb, arr int[], b bytea, e mood, big text, flag boolean,
                             u uuid, lts timestamp, small smallint, counter bigint,
                             iv interval, ch bpchar, e1 int[], e2 int[]);
         INSERT INTO props
         SELECT g * 2,
                CASE g % 3 WHEN 0 THEN NULL WHEN 1 THEN '' ELSE 'v' || g || '-' || {seed} END,
                round((g * 1.37 + {seed})::numeric, 3),
                CASE WHEN g % 5 = 0 THEN 0 WHEN g % 7 = 0 THEN 'NaN' ELSE g / 7.0 + {seed} END,
                timestamptz '2024-03-01 12:00:00+00' + g * interval '1 hour 1.000001 second',
                jsonb_build_object('a', g, 'b', 'x' || g, 'c', jsonb_build_array(g, NULL)),
                ARRAY[g, g + 1, {seed}],
                CASE WHEN g % 4 <> 0 THEN decode(md5(g::text || '{seed}'), 'hex') END,
                (enum_range(NULL::mood))[g % 3 + 1],
                CASE WHEN g % 10 = 0
                     THEN (SELECT string_agg(md5(i::text || g), '') FROM generate_series(1, 250) i)
                END,
                g % 2 = 0,
                md5(g::text || '{seed}')::uuid,
                timestamp '2024-03-01 12:00:00' + g * interval '1.000001 second',
                (g % 1000)::smallint,
                g * 7 + {seed},
                g * interval '1 day' + interval '1 hour',
                'c' || g,
                '{{NULL}}',
                NULL
           FROM generate_series(1, {rows}) g;
         DROP TABLE IF EXISTS props_keyless;
         CREATE TABLE props_keyless AS SELECT * FROM props;"
    )
}

/// Over the Unix socket (trusted): many verifications open many connections, and SCRAM's key
/// stretching in an unoptimised test build would dominate the run time. Password and TLS
/// handling have their own tests.
fn socket_dsn(cluster: &PgCluster) -> Dsn {
    Dsn::new(format!(
        "host={} port={} user=postgres dbname=app sslmode=disable",
        cluster.socket_dir().display(),
        cluster.port()
    ))
}

fn seeds() -> u64 {
    std::env::var("CUTOVER_VERIFY_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CHANGES.len() as u64 * 4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_single_change_is_found_and_named_and_identical_data_matches() {
    every_single_change_is_found(BlueGreen::start().unwrap(), seeds()).await;
}

/// Across a major upgrade each type's output and send functions run in two versions: the same
/// properties must hold with the source on 15 and the target on 18, and the other way round
/// (a verification after a rollback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn between_postgresql_15_and_18_every_change_is_found_and_identical_data_matches() {
    for (blue, green) in [(15, 18), (18, 15)] {
        let bg = BlueGreen::start_with(
            PgCluster::builder().major(blue),
            PgCluster::builder().major(green),
        )
        .unwrap();
        assert_eq!((bg.blue.major(), bg.green.major()), (blue, green));
        // Each change twice per direction: the single-version test covers the seed variety.
        every_single_change_is_found(bg, CHANGES.len() as u64 * 2).await;
    }
}

async fn every_single_change_is_found(bg: BlueGreen, seeds: u64) {
    let (source, target) = (socket_dsn(&bg.blue), socket_dsn(&bg.green));
    let blue = bg.blue.connect("app").await.unwrap();
    let green = bg.green.connect("app").await.unwrap();
    // Green's enum gets other OIDs than blue's: an enum must be hashed by its labels.
    green
        .batch_execute("CREATE TYPE filler AS ENUM ('a', 'b', 'c', 'd')")
        .await
        .unwrap();
    for client in [&blue, &green] {
        client
            .batch_execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
            .await
            .unwrap();
    }
    let label_oid = "SELECT oid::int8 FROM pg_enum WHERE enumlabel = 'ok'";
    assert_ne!(
        blue.query_one(label_oid, &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        green
            .query_one(label_oid, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    );
    let table = TableName::new("public", "props");
    let keyless = TableName::new("public", "props_keyless");

    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let change = CHANGES[(seed % CHANGES.len() as u64) as usize];
        let rows: i64 = rng.random_range(120..=360);
        let fill = fill_sql(seed, rows);
        blue.batch_execute(&fill).await.unwrap();
        green.batch_execute(&fill).await.unwrap();
        let options = VerifyOptions {
            tables: vec![table.clone()],
            parallelism: rng.random_range(1..=3),
            chunk_rows: rng.random_range(7..=90),
            leaf_rows: rng.random_range(1..=12),
            ..VerifyOptions::default()
        };
        let context = format!("seed {seed}, {change:?}, {rows} rows, {options:?}");

        let same = verify(&source, &target, &options).await.unwrap();
        assert!(
            same.matched,
            "identical data reported different: {context}\n{same:#?}"
        );
        assert_eq!(same.tables.len(), 1, "{context}");
        let t = &same.tables[0];
        assert_eq!((t.source_rows, t.target_rows), (rows, rows), "{context}");
        assert_eq!(t.method, Method::Chunked, "{context}");
        assert!(t.differences.is_empty(), "{context}");
        assert!(
            t.chunks > 1 || rows <= options.chunk_rows as i64,
            "{context}: {t:?}"
        );

        let g = loop {
            let g = rng.random_range(1..=rows);
            if change.applies_to(g) {
                break g;
            }
        };
        let id = g * 2;
        green.batch_execute(&change.sql("props", id)).await.unwrap();
        if matches!(change, Change::ToastedOneCharLonger) {
            // The value really lives out of line in the TOAST table.
            let row = green
                .query_one(
                    "SELECT pg_column_size(big) < octet_length(big) OR pg_relation_size(
                        (SELECT reltoastrelid FROM pg_class WHERE relname = 'props')) > 0
                       FROM props WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            assert!(row.get::<_, bool>(0), "{context}: big value not TOASTed");
        }

        let report = verify(&source, &target, &options).await.unwrap();
        assert!(!report.matched, "change not found: {context}");
        let t = &report.tables[0];
        assert!(!t.matched, "{context}");
        assert_eq!(t.differences, change.expected(id), "{context}\n{report:#?}");
        assert!(!t.differences_truncated, "{context}");
        let target_rows = match change {
            Change::DeletedRow => rows - 1,
            Change::InsertedRow => rows + 1,
            _ => rows,
        };
        assert_eq!(
            (t.source_rows, t.target_rows),
            (rows, target_rows),
            "{context}"
        );
        // The difference reaches the resource's status, naming the key.
        let status = cutover_operator::api::status::VerificationStatus::from(&report);
        assert!(!status.matched);
        assert!(
            status.tables[0].differences[0]
                .contains(&format!("id={}", change.expected(id)[0].key_id())),
            "{context}: {status:?}"
        );

        // The same data without a key: one hash of the whole table, equal until the same
        // change is made to it.
        let keyless_options = VerifyOptions {
            tables: vec![keyless.clone()],
            ..options.clone()
        };
        let same = verify(&source, &target, &keyless_options).await.unwrap();
        assert!(same.matched, "keyless copy: {context}\n{same:#?}");
        assert_eq!(same.tables[0].method, Method::FullHash, "{context}");
        green
            .batch_execute(&change.sql("props_keyless", id))
            .await
            .unwrap();
        let report = verify(&source, &target, &keyless_options).await.unwrap();
        assert!(!report.matched, "keyless copy, change not found: {context}");
        assert_eq!(
            (report.tables[0].source_rows, report.tables[0].target_rows),
            (rows, target_rows),
            "{context}"
        );
    }
}

trait KeyId {
    fn key_id(&self) -> String;
}

impl KeyId for Difference {
    fn key_id(&self) -> String {
        match self {
            Difference::MissingOnTarget { key }
            | Difference::ExtraOnTarget { key }
            | Difference::Changed { key } => key.values.join(","),
            _ => String::new(),
        }
    }
}

/// Many differences in one table: the list stops at the limit and says so, the ranges past the
/// limit are not narrowed (cheap), and a wholly missing target table side is counted right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_differences_are_capped_and_flagged() {
    let bg = BlueGreen::start().unwrap();
    let (source, target) = (socket_dsn(&bg.blue), socket_dsn(&bg.green));
    let fill = "CREATE TABLE many (id int PRIMARY KEY, v text);
                INSERT INTO many SELECT g, 'v' || g FROM generate_series(1, 5000) g;";
    bg.blue.execute("app", fill).unwrap();
    bg.green.execute("app", fill).unwrap();
    bg.green
        .execute("app", "UPDATE many SET v = v || '!' WHERE id % 10 = 0")
        .unwrap();
    let options = VerifyOptions {
        chunk_rows: 500,
        leaf_rows: 50,
        max_differences: 7,
        ..VerifyOptions::default()
    };
    let report = verify(&source, &target, &options).await.unwrap();
    let t = &report.tables[0];
    assert!(!t.matched);
    assert_eq!(t.differences.len(), 7, "{t:#?}");
    assert!(t.differences_truncated);
    assert_eq!(
        t.chunks_differing, t.chunks,
        "every range has a changed row"
    );
    let first: Vec<String> = t.differences.iter().map(ToString::to_string).collect();
    assert_eq!(first[0], "changed: id=10", "{first:?}");

    bg.green.execute("app", "TRUNCATE many").unwrap();
    let report = verify(&source, &target, &options).await.unwrap();
    let t = &report.tables[0];
    assert_eq!((t.source_rows, t.target_rows), (5000, 0));
    assert_eq!(t.differences.len(), 7);
    assert!(
        t.differences
            .iter()
            .all(|d| matches!(d, Difference::MissingOnTarget { .. })),
        "{t:#?}"
    );
    assert_eq!(report.source_rows, 5000);
}
