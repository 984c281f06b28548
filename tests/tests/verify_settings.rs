//! Two clusters with different session defaults (TimeZone, DateStyle, extra_float_digits,
//! bytea_output, IntervalStyle), or databases of different encodings, hold identical data: the
//! verifier must call it equal, because it hashes under one canonical session on both sides and
//! text as UTF-8 when the encodings differ — and must still see a real change.

use cutover_operator::postgres::Dsn;
use cutover_operator::postgres::verify::{Difference, Key, TableName, VerifyOptions, verify};
use cutover_tests::{BlueGreen, PgCluster};

const TABLE: &str = "
CREATE TABLE probe (
    id int PRIMARY KEY, ts timestamptz, t timestamp, d date, tm time, tz timetz, iv interval,
    f4 real, f8 float8, b bytea, m money, n numeric, fa float8[], j jsonb, r tstzrange,
    c circle
);
-- Only time-zone-independent arithmetic: whole hours and seconds on timestamptz.
INSERT INTO probe
SELECT g,
       timestamptz '2024-03-10 01:30:00.123456+00' + g * interval '7 hours 1.000001 seconds',
       timestamp '2024-02-29 23:59:59.999999' + g * interval '1 day 1 microsecond',
       date '1999-12-31' + g,
       time '13:14:15.161718' + g * interval '1 minute',
       timetz '04:05:06.789+05:30',
       make_interval(years => g % 3, months => g % 13, days => -g, secs => g * 1.5),
       (g / 3.0)::real,
       CASE g % 4 WHEN 0 THEN 1e-300 * g WHEN 1 THEN 0.1 * g WHEN 2 THEN -0.0 ELSE g / 7.0 END,
       decode(repeat(to_hex(g % 16), 4) || '005c27', 'hex'),
       (g * 100.25)::numeric::money,
       g * 1.10,
       ARRAY[g / 3.0, 1e300, 'NaN', '-Infinity']::float8[],
       jsonb_build_object('x', g / 3.0, 'when', '2024-01-01'),
       tstzrange(timestamptz '2024-01-01 00:00+00', timestamptz '2024-01-01 00:00+00' + g * interval '1 hour'),
       circle(point(g / 3.0, 1), 2)
  FROM generate_series(1, 200) g;
";

/// Database `db` of `cluster` over the Unix socket (trusted).
fn dsn_of(cluster: &PgCluster, db: &str) -> Dsn {
    Dsn::new(format!(
        "host={} port={} user=postgres dbname={db} sslmode=disable",
        cluster.socket_dir().display(),
        cluster.port()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_data_matches_whatever_the_servers_session_defaults() {
    let bg = BlueGreen::start_with(
        PgCluster::builder()
            .setting("TimeZone", "America/New_York")
            .setting("DateStyle", "SQL, DMY")
            .setting("extra_float_digits", "-2")
            .setting("bytea_output", "escape")
            .setting("IntervalStyle", "sql_standard"),
        PgCluster::builder()
            .setting("TimeZone", "Asia/Kolkata")
            .setting("DateStyle", "German")
            .setting("extra_float_digits", "1")
            .setting("bytea_output", "hex")
            .setting("IntervalStyle", "iso_8601"),
    )
    .unwrap();
    bg.blue.execute("app", TABLE).unwrap();
    bg.green.execute("app", TABLE).unwrap();

    // The defaults really differ: under each server's own settings the same rows print
    // differently, so a verifier that did not canonicalise would see a difference.
    let render = |cluster: &PgCluster| {
        cluster
            .query(
                "app",
                "SELECT string_agg(probe::text, '|' ORDER BY id) FROM probe",
            )
            .unwrap()
    };
    assert_ne!(render(&bg.blue), render(&bg.green));

    // The data matches, and a real difference still shows: one microsecond.
    matches_then_finds(
        &bg,
        "app",
        200,
        "UPDATE probe SET ts = ts + interval '1 microsecond' WHERE id = 123",
        (TableName::new("public", "probe"), "id", "123"),
    )
    .await;
}

/// Verifies `db` of blue against `db` of green: identical, with `rows` rows on each side; then
/// runs `change` on green and verifies again: exactly the row `key` of `table` changed.
async fn matches_then_finds(
    bg: &BlueGreen,
    db: &str,
    rows: i64,
    change: &str,
    (table, column, key): (TableName, &str, &str),
) {
    let (source, target) = (dsn_of(&bg.blue, db), dsn_of(&bg.green, db));
    let options = VerifyOptions {
        chunk_rows: 30,
        leaf_rows: 4,
        ..VerifyOptions::default()
    };
    let report = verify(&source, &target, &options).await.unwrap();
    assert!(report.matched, "{}", report.render_text());
    assert_eq!(report.tables[0].source_rows, rows);
    assert_eq!(report.tables[0].target_rows, rows);

    bg.green.execute(db, change).unwrap();
    let report = verify(&source, &target, &options).await.unwrap();
    assert!(!report.matched);
    assert_eq!(report.tables[0].table, table);
    assert_eq!(
        report.tables[0].differences,
        vec![Difference::Changed {
            key: Key {
                columns: vec![column.into()],
                values: vec![key.into()]
            }
        }]
    );
}

/// Non-ASCII text in every shape the hash treats differently: a text key, `varchar`, unbounded
/// `bpchar`, a text array, `jsonb`, an enum label, plus a column hashed by its own function.
const ACCENTED: &str = "
CREATE TYPE mood AS ENUM ('gelassen', 'müde', 'fröhlich');
CREATE TABLE words (
    w text PRIMARY KEY, v varchar(40), c bpchar, a text[], j jsonb, m mood, n int
);
INSERT INTO words
SELECT w || ' ' || g, 'Straße ' || g, 'naïve ' || g, ARRAY[w, 'Ærø', g::text],
       jsonb_build_object('wort', w, 'zahl', g), (enum_range(NULL::mood))[g % 3 + 1], g
  FROM generate_series(1, 120) g, (VALUES ('café'), ('Größe'), ('señor')) AS s(w);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_text_matches_between_a_latin1_and_a_utf8_database() {
    let bg = BlueGreen::start().unwrap();
    // Template 0 and the C locale allow any encoding.
    let create = |encoding: &str| {
        format!(
            "CREATE DATABASE words ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' \
             TEMPLATE template0"
        )
    };
    bg.blue.execute("app", &create("LATIN1")).unwrap();
    bg.green.execute("app", &create("UTF8")).unwrap();
    bg.blue.execute("words", ACCENTED).unwrap();
    bg.green.execute("words", ACCENTED).unwrap();
    // The bytes really differ: `é` is one byte in LATIN1 and two in UTF-8.
    let bytes = |cluster: &PgCluster| {
        cluster
            .query("words", "SELECT sum(octet_length(w))::text FROM words")
            .unwrap()
    };
    assert_ne!(bytes(&bg.blue), bytes(&bg.green));

    // The text matches, and one accent changed on the target is found and named.
    matches_then_finds(
        &bg,
        "words",
        360,
        "UPDATE words SET a[2] = 'Ærö' WHERE w = 'Größe 77'",
        (TableName::new("public", "words"), "w", "Größe 77"),
    )
    .await;
}

/// Types whose own cast to text differs from their output: `xml` keeps a stored declaration
/// that its output (and a copy made through it) drops; a domain over unbounded `bpchar` would
/// take `bpchar`'s cast, which drops trailing spaces. And a `character(6)` key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_compared_by_their_output_not_their_cast_to_text() {
    let bg = BlueGreen::start().unwrap();
    let table = |declaration: &str| {
        format!(
            "CREATE DOMAIN padded AS bpchar;
             CREATE TABLE docs (code character(6) PRIMARY KEY, x xml, d padded);
             INSERT INTO docs
             SELECT 'c' || lpad(g::text, 5, '0'), ('{declaration}<a n=\"' || g || '\"/>')::xml,
                    'v' || g || ' '
               FROM generate_series(1, 300) g;"
        )
    };
    // Blue stores the declaration; green holds what a copy through the output gives.
    bg.blue
        .execute("app", &table(r#"<?xml version="1.0" encoding="UTF-8"?>"#))
        .unwrap();
    bg.green.execute("app", &table("")).unwrap();
    let cast = |cluster: &PgCluster| {
        cluster
            .query("app", "SELECT x::text FROM docs WHERE code = 'c00001'")
            .unwrap()
    };
    assert_ne!(cast(&bg.blue), cast(&bg.green));

    // The data matches, and a dropped trailing space is found and named.
    matches_then_finds(
        &bg,
        "app",
        300,
        "UPDATE docs SET d = rtrim(d::text)::padded WHERE code = 'c00150'",
        (TableName::new("public", "docs"), "code", "c00150"),
    )
    .await;
}
