//! `cutover wait`: returns as soon as the version is applied, fails fast when it failed, times
//! out cleanly, and survives the database being down.

mod migrate_support;

use std::time::{Duration, Instant};

use cutover_operator::postgres::ConnectOptions;
use cutover_operator::postgres::migrate::{Action, WaitError, WaitOptions, wait_for_version};
use migrate_support::{Bed, DB, eventually};

fn opts(timeout: Duration) -> WaitOptions {
    WaitOptions {
        timeout,
        poll_interval: Duration::from_millis(100),
        ..WaitOptions::default()
    }
}

fn connect_as(name: &str) -> ConnectOptions {
    ConnectOptions {
        application_name: name.into(),
        connect_timeout: Duration::from_secs(2),
        ..ConnectOptions::default()
    }
}

async fn waiting_sessions(bed: &Bed, name: &str) -> bool {
    let c = bed.pg.connect(DB).await.unwrap();
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    n > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_right_after_the_version_is_applied() {
    let bed = Bed::start();
    bed.write("V1__a.sql", "CREATE TABLE a (id bigint);\n");
    bed.write("V2__b.sql", "CREATE TABLE b (id bigint);\n");
    let dsn = bed.dsn();
    let waiter = tokio::spawn(async move {
        let r = wait_for_version(
            &dsn,
            &connect_as("init-container"),
            &"2".parse().unwrap(),
            &opts(Duration::from_secs(60)),
        )
        .await;
        (r, Instant::now())
    });
    // Started before anything exists (not even the history table), and still waiting.
    eventually("the waiter is connected", Duration::from_secs(20), || {
        waiting_sessions(&bed, "init-container")
    })
    .await;
    assert!(!waiter.is_finished());

    bed.run(Action::Apply).await.unwrap();
    let applied_at = Instant::now();
    let (result, returned_at) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("wait did not return after the version was applied")
        .unwrap();
    result.unwrap();
    let lag = returned_at.saturating_duration_since(applied_at);
    assert!(
        lag < Duration::from_secs(2),
        "returned {lag:?} after the apply"
    );
}

#[tokio::test]
async fn times_out_cleanly_naming_the_current_version() {
    let bed = Bed::start();
    bed.write("V1__a.sql", "CREATE TABLE a (id bigint);\n");
    bed.run(Action::Apply).await.unwrap();
    let started = Instant::now();
    let err = wait_for_version(
        &bed.dsn(),
        &connect_as("init-container"),
        &"2".parse().unwrap(),
        &opts(Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, WaitError::Timeout { .. }), "{err}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("timed out after 1s waiting for migration version 2"),
        "{text}"
    );
    assert!(text.contains("latest applied version is 1"), "{text}");
}

#[tokio::test]
async fn fails_fast_when_the_version_or_an_earlier_one_failed() {
    let bed = Bed::start();
    bed.write("V1__a.sql", "CREATE TABLE a (id bigint);\n");
    bed.write("V2__b.sql", "SELECT 1/0;\n");
    bed.write("V3__c.sql", "CREATE TABLE c (id bigint);\n");
    bed.run(Action::Apply).await.unwrap_err();

    let started = Instant::now();
    let err = wait_for_version(
        &bed.dsn(),
        &connect_as("init-container"),
        &"2".parse().unwrap(),
        &opts(Duration::from_secs(30)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, WaitError::Failed { .. }), "{err}");
    assert!(err.to_string().contains("V2__b.sql") && err.to_string().contains("division by zero"));
    assert!(started.elapsed() < Duration::from_secs(5));

    let err = wait_for_version(
        &bed.dsn(),
        &connect_as("init-container"),
        &"3".parse().unwrap(),
        &opts(Duration::from_secs(30)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, WaitError::Blocked { .. }), "{err}");
    assert!(
        err.to_string().contains("earlier version 2 failed"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_retrying_while_the_database_is_down() {
    let mut bed = Bed::start();
    bed.write("V1__a.sql", "CREATE TABLE a (id bigint);\n");
    bed.pg.stop().unwrap();
    let dsn = bed.dsn();
    let waiter = tokio::spawn(async move {
        wait_for_version(
            &dsn,
            &connect_as("init-container"),
            &"1".parse().unwrap(),
            &opts(Duration::from_secs(60)),
        )
        .await
    });
    // The waiter keeps trying while nothing listens.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished());
    bed.pg.restart().unwrap();
    bed.run(Action::Apply).await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("wait did not notice the database coming back")
        .unwrap()
        .unwrap();
}
