//! Runners at the same time, and `CREATE INDEX CONCURRENTLY` next to application sessions:
//! exactly once, no deadlock, waits explained, invalid indexes rebuilt.

mod migrate_support;

use std::time::Duration;

use cutover_operator::postgres::migrate::{Action, Event, IndexAction, NO_TRANSACTION_MARKER};
use migrate_support::{Bed, DB, expect_event, fast_options, observed_options, run_in};

fn cic_set(bed: &Bed) {
    bed.write(
        "V1__orders.sql",
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer bigint NOT NULL);\n\
         INSERT INTO orders SELECT g, g % 100 FROM generate_series(1, 20000) g;\n\
         CREATE TABLE runs (n int);\n",
    );
    bed.write(
        "V2__orders_customer_idx.sql",
        &format!(
            "{NO_TRANSACTION_MARKER}\nCREATE INDEX CONCURRENTLY orders_customer_idx ON orders (customer);\n"
        ),
    );
    bed.write("V3__count.sql", "INSERT INTO runs VALUES (3);\n");
}

fn index_valid(bed: &Bed, name: &str) -> Option<String> {
    bed.value(&format!(
        "SELECT i.indisvalid::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE c.relname = '{name}'"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runners_with_cic_and_an_idle_transaction_finish_without_deadlock() {
    let bed = Bed::start();
    bed.pg
        .execute(DB, "CREATE TABLE app_events (id bigint)")
        .unwrap();
    cic_set(&bed);

    // The application: a read-committed transaction, idle, holding a transaction id and locks
    // on another table.
    let app = bed.pg.connect(DB).await.unwrap();
    app.batch_execute("BEGIN; INSERT INTO app_events VALUES (1); SELECT count(*) FROM app_events;")
        .await
        .unwrap();

    let dsn = bed.dsn();
    let mut runners = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let dsn = dsn.clone();
        let dir = bed.dir.path().to_owned();
        runners.spawn(async move { run_in(&dir, &dsn, Action::Apply, fast_options()).await });
    }
    let results = tokio::time::timeout(Duration::from_secs(60), runners.join_all())
        .await
        .expect("runners deadlocked: not done within 60 s");
    let mut applied = 0;
    for r in results {
        applied += r.unwrap().steps.len();
    }
    assert_eq!(applied, 3, "each migration applied by exactly one runner");
    assert_eq!(
        bed.history(),
        ["1|migrate|true", "2|migrate|true", "3|migrate|true"]
    );
    assert_eq!(bed.value("SELECT count(*) FROM runs").as_deref(), Some("1"));
    assert_eq!(
        index_valid(&bed, "orders_customer_idx").as_deref(),
        Some("true")
    );
    app.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cic_waiting_on_an_old_snapshot_names_the_backend() {
    let bed = Bed::start();
    cic_set(&bed);
    bed.remove("V2__orders_customer_idx.sql");
    bed.remove("V3__count.sql");
    bed.run(Action::Apply).await.unwrap();
    bed.write(
        "V2__orders_customer_idx.sql",
        &format!(
            "{NO_TRANSACTION_MARKER}\nCREATE INDEX CONCURRENTLY orders_customer_idx ON orders (customer);\n"
        ),
    );

    // A repeatable-read transaction holding its snapshot: CIC must wait for it (by design).
    let app = bed.pg.connect(DB).await.unwrap();
    app.batch_execute(
        "SET application_name = 'reporting-job';
         BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM orders;",
    )
    .await
    .unwrap();
    let app_pid: i32 = app
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    let (opts, mut events) = observed_options();
    let bed_ref = &bed;
    let run = async move { bed_ref.run_with(Action::Apply, opts).await };
    let observe = async {
        let event = expect_event(
            &mut events,
            Duration::from_secs(30),
            "a report naming the repeatable-read backend",
            |e| matches!(e, Event::Blocked { blockers, .. } if blockers.iter().any(|b| b.pid == app_pid)),
        )
        .await;
        let Event::Blocked {
            file,
            line,
            blockers,
            ..
        } = &event
        else {
            unreachable!()
        };
        assert_eq!(file, "V2__orders_customer_idx.sql");
        assert_eq!(*line, 2);
        let b = blockers.iter().find(|b| b.pid == app_pid).unwrap();
        assert_eq!(b.application_name, "reporting-job");
        let text = event.to_string();
        assert!(
            text.contains(&format!("pid {app_pid}")) && text.contains("reporting-job"),
            "{text}"
        );
        assert!(text.contains("open for"), "{text}");
        // The migration is still running: ending the transaction lets it finish.
        assert_eq!(
            index_valid(&bed, "orders_customer_idx").as_deref(),
            Some("false")
        );
        app.batch_execute("COMMIT").await.unwrap();
    };
    let (outcome, ()) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(run, observe)
    })
    .await
    .expect("the migration did not finish after the snapshot was released");
    outcome.unwrap();
    assert_eq!(
        index_valid(&bed, "orders_customer_idx").as_deref(),
        Some("true")
    );
}

#[tokio::test]
async fn an_invalid_index_left_by_an_earlier_run_is_rebuilt_not_skipped() {
    let bed = Bed::start();
    bed.write(
        "V1__t.sql",
        "CREATE TABLE t (id bigint PRIMARY KEY, code text);\n\
         INSERT INTO t VALUES (1, 'a'), (2, 'a'), (3, 'b');\n",
    );
    bed.run(Action::Apply).await.unwrap();
    // What a killed or failed earlier attempt leaves: an INVALID index of the same name.
    let err = bed
        .pg
        .execute(
            DB,
            "CREATE UNIQUE INDEX CONCURRENTLY t_code_key ON t (code)",
        )
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("could not create unique index"),
        "{err:#}"
    );
    assert_eq!(index_valid(&bed, "t_code_key").as_deref(), Some("false"));
    bed.pg.execute(DB, "DELETE FROM t WHERE id = 2").unwrap();

    bed.write(
        "V2__t_code_key.sql",
        &format!(
            "{NO_TRANSACTION_MARKER}\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_code_key ON t (code);\n"
        ),
    );
    let (opts, mut events) = observed_options();
    bed.run_with(Action::Apply, opts).await.unwrap();
    expect_event(&mut events, Duration::ZERO, "the rebuild", |e| {
        matches!(e, Event::InvalidIndex { action: IndexAction::Rebuilding, index, .. } if index.contains("t_code_key"))
    })
    .await;
    assert_eq!(index_valid(&bed, "t_code_key").as_deref(), Some("true"));
    // Unique for real now.
    assert!(bed.pg.execute(DB, "INSERT INTO t VALUES (9, 'b')").is_err());
}

#[tokio::test]
async fn a_failed_cic_drops_its_invalid_index_and_succeeds_once_the_data_is_fixed() {
    let bed = Bed::start();
    bed.write(
        "V1__t.sql",
        "CREATE TABLE t (id bigint PRIMARY KEY, code text);\n\
         INSERT INTO t VALUES (1, 'a'), (2, 'a');\n",
    );
    bed.write(
        "V2__t_code_key.sql",
        &format!(
            "{NO_TRANSACTION_MARKER}\nCREATE UNIQUE INDEX CONCURRENTLY t_code_key ON t (code);\n"
        ),
    );
    let (opts, mut events) = observed_options();
    let err = bed.run_with(Action::Apply, opts).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("V2__t_code_key.sql:2") && text.contains("23505"),
        "{text}"
    );
    expect_event(&mut events, Duration::ZERO, "the clean-up", |e| {
        matches!(
            e,
            Event::InvalidIndex {
                action: IndexAction::DroppedAfterFailure,
                ..
            }
        )
    })
    .await;
    assert_eq!(
        index_valid(&bed, "t_code_key"),
        None,
        "no invalid index left behind"
    );
    assert_eq!(bed.history(), ["1|migrate|true", "2|migrate|false"]);

    bed.pg.execute(DB, "DELETE FROM t WHERE id = 2").unwrap();
    bed.run(Action::Apply).await.unwrap();
    assert_eq!(index_valid(&bed, "t_code_key").as_deref(), Some("true"));
    assert_eq!(
        bed.history(),
        ["1|migrate|true", "2|migrate|false", "2|migrate|true"]
    );
}
