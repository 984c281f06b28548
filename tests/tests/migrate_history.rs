//! `cutover migrate` against real PostgreSQL: order, history, checksums, failures, lock_timeout.

mod migrate_support;

use std::time::Duration;

use cutover_operator::postgres::migrate::{Action, Event, MigrateError};
use migrate_support::{Bed, expect_event, observed_options};

#[tokio::test]
async fn applies_pending_files_in_numeric_version_order_once() {
    let bed = Bed::start();
    bed.write("V1__create_log.sql", "CREATE TABLE log (n int, at text);\n");
    bed.write("V1.9__first.sql", "INSERT INTO log VALUES (1, '1.9');\n");
    bed.write("V1.10__second.sql", "INSERT INTO log VALUES (2, '1.10');\n");
    bed.write("README.md", "not a migration");

    let dry = bed.run(Action::DryRun).await.unwrap();
    let planned: Vec<&str> = dry
        .steps
        .iter()
        .map(|s| s.script.file_name.as_str())
        .collect();
    assert_eq!(
        planned,
        ["V1__create_log.sql", "V1.9__first.sql", "V1.10__second.sql"]
    );
    assert_eq!(
        bed.value("SELECT to_regclass('cutover_schema_history')::text"),
        None,
        "a dry run writes nothing"
    );

    let outcome = bed.run(Action::Apply).await.unwrap();
    assert_eq!(outcome.steps.len(), 3);
    assert_eq!(outcome.version.as_deref(), Some("1.10"));
    assert_eq!(
        bed.value("SELECT string_agg(at, ',' ORDER BY n) FROM log")
            .as_deref(),
        Some("1.9,1.10")
    );
    assert_eq!(
        bed.history(),
        ["1|migrate|true", "1.9|migrate|true", "1.10|migrate|true"]
    );
    let row = &bed.rows(
        "SELECT description, script, length(checksum), duration >= '0'::interval, applied_at <= now()
         FROM cutover_schema_history WHERE version = '1.9'",
    )[0];
    assert_eq!(row[0].as_deref(), Some("first"));
    assert_eq!(row[1].as_deref(), Some("V1.9__first.sql"));
    assert_eq!(row[2].as_deref(), Some("64"));
    assert_eq!(row[3].as_deref(), Some("t"));

    // Again: nothing to do, nothing applied twice.
    let again = bed.run(Action::Apply).await.unwrap();
    assert!(again.steps.is_empty());
    assert_eq!(bed.value("SELECT count(*) FROM log").as_deref(), Some("2"));

    bed.write("V2__third.sql", "INSERT INTO log VALUES (3, '2');\n");
    let dry = bed.run(Action::DryRun).await.unwrap();
    assert_eq!(dry.steps.len(), 1);
    assert_eq!(dry.steps[0].script.file_name, "V2__third.sql");
}

#[tokio::test]
async fn an_edited_applied_file_fails_validation_naming_file_and_checksums() {
    let bed = Bed::start();
    bed.write("V1__t.sql", "CREATE TABLE t (id bigint);\n");
    bed.run(Action::Apply).await.unwrap();
    let applied = bed
        .value("SELECT checksum FROM cutover_schema_history")
        .unwrap();

    bed.write("V1__t.sql", "CREATE TABLE t (id bigint, extra text);\n");
    bed.write("V2__u.sql", "CREATE TABLE u (id bigint);\n");
    let now = bed.set().versioned[0].checksum.clone();
    let err = bed.run(Action::Apply).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, MigrateError::ChecksumMismatch { .. }),
        "{text}"
    );
    assert!(text.contains("V1__t.sql"), "{text}");
    assert!(text.contains(&applied) && text.contains(&now), "{text}");
    assert_ne!(applied, now);
    assert_eq!(
        bed.value("SELECT to_regclass('u')::text"),
        None,
        "nothing runs after a failed validation"
    );
    // The dry run validates too.
    assert!(bed.run(Action::DryRun).await.is_err());
}

#[tokio::test]
async fn a_failed_migration_is_rolled_back_recorded_and_proceeds_once_fixed() {
    let bed = Bed::start();
    bed.write("V1__base.sql", "CREATE TABLE base (id bigint);\n");
    bed.write(
        "V2__broken.sql",
        "CREATE TABLE half (id bigint);\nINSERT INTO base VALUES (1);\nSELECT * FROM no_such_table;\n",
    );
    bed.write("V3__after.sql", "CREATE TABLE after_two (id bigint);\n");

    let err = bed.run(Action::Apply).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("V2__broken.sql:3"), "file and line: {text}");
    assert!(
        text.contains("no_such_table") && text.contains("42P01"),
        "{text}"
    );
    assert!(text.contains("rolled back"), "{text}");
    // Rolled back: nothing of V2 stays; V3 did not run.
    assert_eq!(bed.value("SELECT to_regclass('half')::text"), None);
    assert_eq!(bed.value("SELECT count(*) FROM base").as_deref(), Some("0"));
    assert_eq!(bed.value("SELECT to_regclass('after_two')::text"), None);
    assert_eq!(bed.history(), ["1|migrate|true", "2|migrate|false"]);
    let recorded = bed
        .value("SELECT error FROM cutover_schema_history WHERE NOT success")
        .unwrap();
    assert!(recorded.contains("no_such_table"), "{recorded}");

    // Running again without a fix fails the same way (no dirty state, no skipping).
    assert!(bed.run(Action::Apply).await.is_err());

    bed.write(
        "V2__broken.sql",
        "CREATE TABLE half (id bigint);\nINSERT INTO base VALUES (1);\n",
    );
    let outcome = bed.run(Action::Apply).await.unwrap();
    assert_eq!(outcome.steps.len(), 2);
    assert_eq!(outcome.version.as_deref(), Some("3"));
    assert_eq!(
        bed.history(),
        [
            "1|migrate|true",
            "2|migrate|false",
            "2|migrate|false",
            "2|migrate|true",
            "3|migrate|true"
        ]
    );
    assert_eq!(bed.value("SELECT count(*) FROM base").as_deref(), Some("1"));
}

#[tokio::test]
async fn lock_timeout_is_retried_a_bounded_number_of_times() {
    let bed = Bed::start();
    bed.write("V1__t.sql", "CREATE TABLE t (id bigint);\n");
    bed.run(Action::Apply).await.unwrap();
    bed.write("V2__add.sql", "ALTER TABLE t ADD COLUMN note text;\n");

    // An application transaction that keeps a lock on t.
    let app = bed.pg.connect(migrate_support::DB).await.unwrap();
    app.batch_execute("BEGIN; SELECT * FROM t;").await.unwrap();

    let (opts, mut events) = observed_options();
    let err = bed.run_with(Action::Apply, opts).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("55P03") && text.contains("lock timeout"),
        "{text}"
    );
    assert!(text.contains("gave up after 2 retries"), "{text}");
    let mut retries = 0;
    while let Ok(e) = events.try_recv() {
        if matches!(e, Event::Retrying { .. }) {
            retries += 1;
        }
    }
    assert_eq!(retries, 2);
    assert_eq!(bed.history(), ["1|migrate|true", "2|migrate|false"]);

    // The lock goes away during the retries: the migration gets through.
    let (opts, mut events) = observed_options();
    let bed_ref = &bed;
    let run = async move { bed_ref.run_with(Action::Apply, opts).await };
    let release = async {
        expect_event(&mut events, Duration::from_secs(20), "a retry", |e| {
            matches!(e, Event::Retrying { .. })
        })
        .await;
        app.batch_execute("COMMIT").await.unwrap();
    };
    let (outcome, ()) = tokio::join!(run, release);
    outcome.unwrap();
    assert_eq!(
        bed.value("SELECT count(*) FROM information_schema.columns WHERE table_name = 't' AND column_name = 'note'")
            .as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn a_runner_waits_for_the_lock_and_names_its_holder() {
    let bed = Bed::start();
    bed.write("V1__t.sql", "CREATE TABLE t (id bigint);\n");
    let holder = bed.pg.connect(migrate_support::DB).await.unwrap();
    holder
        .batch_execute("SET application_name = 'manual-dba'; SELECT pg_advisory_lock(742189);")
        .await
        .unwrap();

    let (mut opts, mut events) = observed_options();
    opts.lock_wait_timeout = Some(Duration::from_millis(500));
    let err = bed.run_with(Action::Apply, opts).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, MigrateError::LockWait { .. }), "{text}");
    assert!(text.contains("manual-dba"), "{text}");
    let waiting = expect_event(&mut events, Duration::ZERO, "the waiting report", |e| {
        matches!(e, Event::WaitingForLock { .. })
    })
    .await;
    assert!(waiting.to_string().contains("manual-dba"), "{waiting}");
    assert_eq!(bed.value("SELECT to_regclass('t')::text"), None);

    // Released: the next run goes through.
    holder
        .batch_execute("SELECT pg_advisory_unlock(742189)")
        .await
        .unwrap();
    bed.run(Action::Apply).await.unwrap();
    assert_eq!(
        bed.value("SELECT to_regclass('t')::text").as_deref(),
        Some("t")
    );
}
