//! The operator's parallel initial copy (`replication.initialCopy: Parallel`) against real
//! PostgreSQL: tables of every shape copied exactly (partitions, TOAST, generated columns,
//! quoted names, enums, a table without a key, ranges of pages), green's indexes and
//! constraints set aside and built again exactly as they were; a copy worker killed mid-copy
//! copies its range again; a copy whose process is lost starts over from a new snapshot; an
//! abort during the copy leaves green empty with its schema intact and nothing of ours behind.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use cutover_operator::api::{
    DatabaseCutoverSpec, DatabaseCutoverStatus, FreezeMethod, InitialCopy, InitialCopyStatus, Mode,
    Phase,
};
use cutover_tests::{BlueGreen, PgCluster};

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('calm', 'busy');
CREATE SCHEMA "Mixed Case";
CREATE TABLE "Mixed Case"."Order Lines" (
    id bigint PRIMARY KEY,
    "Note" text,
    body text,
    total bigint GENERATED ALWAYS AS (id * 2) STORED,
    feeling mood NOT NULL DEFAULT 'calm'
);
CREATE INDEX "Order Lines_note_idx" ON "Mixed Case"."Order Lines" ("Note") WHERE "Note" IS NOT NULL;
CREATE TABLE parent (id int PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE child (
    id int PRIMARY KEY,
    parent_id int NOT NULL REFERENCES parent (id) ON DELETE CASCADE,
    at timestamptz NOT NULL,
    code text,
    CONSTRAINT child_code_key UNIQUE (code) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX child_at_idx ON child (at DESC);
CREATE TABLE events (id bigint NOT NULL, at date NOT NULL, payload jsonb, PRIMARY KEY (id, at))
    PARTITION BY RANGE (at);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE events_other PARTITION OF events DEFAULT;
CREATE INDEX events_payload_idx ON events USING gin (payload);
CREATE TABLE keyless (a int, b text);
ALTER TABLE keyless REPLICA IDENTITY FULL;
"#;

const DATA: &str = r#"
INSERT INTO "Mixed Case"."Order Lines" (id, "Note", body, feeling)
SELECT g, CASE WHEN g % 3 = 0 THEN 'n' || g END,
       CASE WHEN g % 50 = 0 THEN repeat(md5(g::text), 400) ELSE md5(g::text) END,
       CASE WHEN g % 2 = 0 THEN 'busy'::mood ELSE 'calm'::mood END
  FROM generate_series(1, 40000) g;
INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 2000) g;
INSERT INTO child SELECT g, 1 + g % 2000, timestamptz '2026-01-01' + g * interval '1 minute',
       CASE WHEN g % 5 = 0 THEN 'c' || g END
  FROM generate_series(1, 30000) g;
INSERT INTO events SELECT g, date '2025-06-01' + (g % 900), jsonb_build_object('g', g)
  FROM generate_series(1, 20000) g;
INSERT INTO keyless SELECT g % 100, 'k' || (g % 7) FROM generate_series(1, 5000) g;
"#;

fn setup() -> BlueGreen {
    setup_of(DEFAULT_MAJORS)
}

fn setup_of(majors: Majors) -> BlueGreen {
    let bg = blue_green_of(majors);
    for c in [&bg.blue, &bg.green] {
        c.create_role(APP_ROLE, APP_PASSWORD, "LOGIN").unwrap();
        c.execute(APP, SCHEMA).unwrap();
    }
    bg.blue.execute(APP, DATA).unwrap();
    bg
}

/// More rows in the lines table (ids 100001..=upto), so the copy lasts long enough to act in.
fn more_lines(bg: &BlueGreen, upto: i64) {
    bg.blue
        .execute(
            APP,
            &format!(
                r#"INSERT INTO "Mixed Case"."Order Lines" (id, body)
                   SELECT g, repeat(md5(g::text), 8) FROM generate_series(100001, {upto}) g"#
            ),
        )
        .unwrap();
}

/// An engine for `bg` whose application Secret (in the returned directory) names blue.
fn engine_for(
    bg: &BlueGreen,
    id: &str,
    spec: DatabaseCutoverSpec,
) -> (
    tempfile::TempDir,
    cutover_operator::engine::Engine<cutover_operator::platform::LocalPlatform>,
) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = local_engine(id, bg, spec, dir.path());
    (dir, engine)
}

fn spec(mode: Mode) -> DatabaseCutoverSpec {
    let mut spec = production_spec();
    spec.mode = mode;
    spec.application_roles = vec![];
    spec.freeze.method = FreezeMethod::Strict;
    spec.replication.reverse_for_rollback = false;
    spec.rollback = None;
    spec.replication.initial_copy = InitialCopy::Parallel;
    spec.replication.copy_parallelism = 3;
    // Small ranges: every table of some size is split.
    spec.replication.copy_split_size = "256KiB".into();
    spec
}

/// Every index and constraint of the application's tables (on PostgreSQL 18 its NOT NULL
/// constraints too), with its definition and validity.
fn definitions(c: &PgCluster) -> Vec<Vec<Option<String>>> {
    c.query(
        APP,
        "SELECT i.indrelid::regclass::text, i.indexrelid::regclass::text,
                pg_get_indexdef(i.indexrelid), i.indisvalid::text
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname IN ('public', 'Mixed Case')
         UNION ALL
         SELECT conrelid::regclass::text, conname, pg_get_constraintdef(con.oid),
                convalidated::text || condeferrable::text || condeferred::text
           FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace
          WHERE n.nspname IN ('public', 'Mixed Case')
         ORDER BY 1, 2, 3",
    )
    .unwrap()
}

fn copy_status(s: &DatabaseCutoverStatus) -> Option<&InitialCopyStatus> {
    s.replication.as_ref()?.initial_copy.as_ref()
}

fn rows(c: &PgCluster) -> Vec<i64> {
    [
        r#"SELECT count(*) FROM "Mixed Case"."Order Lines""#,
        "SELECT count(*) FROM parent",
        "SELECT count(*) FROM child",
        "SELECT count(*) FROM events",
        "SELECT count(*) FROM keyless",
    ]
    .iter()
    .map(|q| count(c, q))
    .collect()
}

/// A rehearsal with the parallel copy: every shape arrives exactly (verification compares every
/// row and, now, every index and foreign key definition), generated values are computed by
/// green, and green's indexes and constraints are back as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_is_copied_exactly_and_green_gets_its_indexes_back_alike() {
    every_shape(setup()).await;
}

/// The same from PostgreSQL 15 to 18: 18 records NOT NULL as constraints of its own, and a
/// primary key set aside and taken back must leave them as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_is_copied_exactly_from_15_to_18() {
    let bg = setup_of(UPGRADE);
    assert_eq!((bg.blue.major(), bg.green.major()), (15, 18));
    every_shape(bg).await;
}

async fn every_shape(bg: BlueGreen) {
    let before = definitions(&bg.green);
    let (_dir, engine) = engine_for(&bg, "shop/parallel", spec(Mode::Rehearsal));
    // Rows written while the copy runs arrive by streaming, exactly once.
    let status = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        copy_status(s).is_some_and(|c| c.stage == "Copying")
    })
    .await;
    bg.blue
        .execute(
            APP,
            r#"INSERT INTO "Mixed Case"."Order Lines" (id, body) VALUES (50001, 'during');
               UPDATE parent SET name = 'renamed' WHERE id = 7;
               DELETE FROM keyless WHERE a = 3;"#,
        )
        .unwrap();
    let status = step_until(&engine, status, |s| s.phase.is_terminal()).await;
    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    let verification = status.verification.as_ref().unwrap();
    assert!(verification.matched, "{verification:?}");
    let copy = copy_status(&status).unwrap();
    assert_eq!(copy.stage, "Done", "{copy:?}");
    assert_eq!((copy.tables_done, copy.tables_total), (5, 5), "{copy:?}");
    let chunks = |name: &str| {
        copy.tables
            .iter()
            .find(|t| t.table == name)
            .map(|t| (t.chunks, t.chunks_done))
            .unwrap()
    };
    let (lines, lines_done) = chunks("\"Mixed Case\".\"Order Lines\"");
    assert!(
        lines > 1 && lines == lines_done,
        "split into ranges: {copy:?}"
    );
    // A partitioned table is copied leaf by leaf.
    assert!(chunks("public.events").0 >= 3, "{copy:?}");
    assert!(
        copy.index_seconds.is_some() && copy.copy_seconds.is_some(),
        "{copy:?}"
    );
    let deferred: Vec<&str> = status
        .replication
        .as_ref()
        .unwrap()
        .deferred_indexes
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    for name in [
        "child_parent_id_fkey",
        "child_code_key",
        "child_at_idx",
        "parent_name_key",
        "Order Lines_note_idx",
        "Order Lines_pkey",
    ] {
        assert!(
            deferred.contains(&name),
            "{name} not set aside: {deferred:?}"
        );
    }
    assert!(
        !deferred.iter().any(|d| d.starts_with("events")),
        "a partitioned table's indexes stay: {deferred:?}"
    );
    // The rehearsal keeps green's copy: the same rows, the generated column computed there.
    assert_eq!(rows(&bg.green), rows(&bg.blue));
    assert_eq!(
        count(
            &bg.green,
            r#"SELECT count(*) FROM "Mixed Case"."Order Lines" WHERE total <> id * 2"#
        ),
        0
    );
    assert_eq!(
        one(&bg.green, "SELECT name FROM parent WHERE id = 7").as_deref(),
        Some("renamed")
    );
    assert_eq!(definitions(&bg.green), before, "green's schema changed");
    assert_clean_and_writable(&bg).await;
}

/// Copy workers' sessions are killed while they copy. On blue, the range is copied again
/// (nothing of the failed attempt is on green). On green, the range is copied again too — or, when
/// the kill lands while the range commits and it cannot be known whether its rows are there, the
/// whole copy starts over. Either way the data arrives exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_workers_killed_mid_copy_copy_their_range_again() {
    let bg = setup();
    more_lines(&bg, 400000);
    let (_dir, engine) = engine_for(&bg, "shop/killed", spec(Mode::Rehearsal));
    let status = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        copy_status(s).is_some_and(|c| c.stage == "Copying")
    })
    .await;
    let retries = |s: &DatabaseCutoverStatus| -> i32 {
        copy_status(s).map_or(0, |c| c.tables.iter().map(|t| t.retries).sum())
    };
    let restarts = |s: &DatabaseCutoverStatus| copy_status(s).map_or(0, |c| c.restarts);
    let status = kill_a_copying_session(&engine, &bg.blue, status).await;
    let status = step_until(&engine, status, |s| retries(s) >= 1).await;
    assert_eq!(restarts(&status), 0, "{:?}", copy_status(&status));
    let before = retries(&status);
    let status = kill_a_copying_session(&engine, &bg.green, status).await;
    let status = step_until(&engine, status, |s| retries(s) > before || restarts(s) >= 1).await;
    let status = step_until(&engine, status, |s| s.phase.is_terminal()).await;
    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    assert!(status.verification.as_ref().unwrap().matched);
    assert_eq!(rows(&bg.green), rows(&bg.blue));
    assert_clean_and_writable(&bg).await;
}

/// Steps `engine` until one of the copy's sessions on `c` is seen running its COPY, and
/// terminates it; the copy must still be under way.
async fn kill_a_copying_session(
    engine: &cutover_operator::engine::Engine<cutover_operator::platform::LocalPlatform>,
    c: &PgCluster,
    mut status: DatabaseCutoverStatus,
) -> DatabaseCutoverStatus {
    let kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'cutover-copy' AND backend_type = 'client backend'
                   AND query LIKE 'COPY%' AND state = 'active' LIMIT 1";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            copy_status(&status).is_some_and(|c| c.stage != "Done")
                && std::time::Instant::now() < deadline,
            "no copying session seen to kill while the copy ran: {:?}",
            copy_status(&status)
        );
        if one(c, kill).as_deref() == Some("t") {
            return status;
        }
        status = engine
            .step(&status, false, &mut cutover_operator::engine::NoSink)
            .await
            .unwrap()
            .status;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The process running the copy loses the lead mid-copy (its fence drops): the copy stops, and
/// the next attempt drops the slot, empties what was copied and starts over from a new
/// snapshot — counted as a restart — and the data arrives exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_process_is_lost_starts_over_from_a_new_snapshot() {
    let bg = setup();
    more_lines(&bg, 300000);
    let lead = Arc::new(AtomicBool::new(true));
    let (_dir, engine) = engine_for(&bg, "shop/lost", spec(Mode::Rehearsal));
    let engine = engine.with_fence(lead.clone());
    let status = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        copy_status(s).is_some_and(|c| c.stage == "Copying" && c.bytes_copied > 0)
    })
    .await;
    let first_point = copy_status(&status).unwrap().consistent_point.clone();
    lead.store(false, Ordering::SeqCst);
    let status = step_until(&engine, status, |s| {
        copy_status(s).is_some_and(|c| c.stage == "Failed")
    })
    .await;
    lead.store(true, Ordering::SeqCst);
    let status = step_until(&engine, status, |s| s.phase.is_terminal()).await;
    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    assert!(status.verification.as_ref().unwrap().matched);
    let copy = copy_status(&status).unwrap();
    assert_eq!(copy.restarts, 1, "{copy:?}");
    assert_ne!(
        copy.consistent_point, first_point,
        "a new snapshot: {copy:?}"
    );
    assert_eq!(rows(&bg.green), rows(&bg.blue));
    assert_clean_and_writable(&bg).await;
}

/// An abort while rows are being copied: the copy stops, its slot is dropped, green's tables
/// are emptied and every index and constraint set aside is built again — green is as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_during_the_copy_leaves_green_empty_with_its_schema_intact() {
    let bg = setup();
    more_lines(&bg, 300000);
    let before = definitions(&bg.green);
    let (dir, engine) = engine_for(&bg, "shop/abort", spec(Mode::Production));
    let status = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        copy_status(s).is_some_and(|c| c.stage == "Copying" && c.bytes_copied > 0)
    })
    .await;
    assert_ne!(definitions(&bg.green), before, "indexes were set aside");
    let mut aborting = spec(Mode::Production);
    aborting.abort = true;
    let engine = local_engine("shop/abort", &bg, aborting, dir.path());
    let status = step_until(&engine, status, |s| s.phase.is_terminal()).await;
    assert_eq!(status.phase, Phase::Aborted, "{:?}", status.message);
    assert_eq!(rows(&bg.green), vec![0, 0, 0, 0, 0]);
    assert_eq!(
        definitions(&bg.green),
        before,
        "green's schema is as it was"
    );
    assert_clean_and_writable(&bg).await;
}
