//! Aborts that finish and attempts that can be made again, against real PostgreSQL: an abort
//! empties what its copy wrote to green so that the next attempt completes; green's tables
//! holding rows are refused before anything is created; an abort with green away undoes what it
//! can on blue, lists what is left (the subscription whose connection string holds blue's
//! password among it) and finishes once green is back, leaving no such row.

mod common;

use common::*;
use cutover_operator::api::{DatabaseCutoverStatus, Milestone, Phase};

use cutover_tests::BlueGreen;
use cutover_tests::workload;

fn bank() -> BlueGreen {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(50, 1000)).unwrap();
    bg.blue
        .execute(
            APP,
            "INSERT INTO ledger (client, seq, amount) SELECT 1, g, 0 FROM generate_series(1, 300) g",
        )
        .unwrap();
    bg
}

fn copied(s: &DatabaseCutoverStatus) -> bool {
    s.milestones.contains(&Milestone::TargetAnalyzed)
}

fn held_in_replicating() -> cutover_operator::api::DatabaseCutoverSpec {
    let mut spec = production_spec();
    spec.schedule.freeze_at = Some(
        (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1))
            .to_string()
            .into(),
    );
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_attempt_empties_green_and_the_next_one_completes() {
    let bg = bank();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();

    // The first attempt copies everything, then is aborted.
    let first = local_engine("shop/again", &bg, held_in_replicating(), dir.path());
    let status = step_until(&first, DatabaseCutoverStatus::default(), copied).await;
    assert_eq!(count(&bg.green, "SELECT count(*) FROM ledger"), 300);
    let mut abort = held_in_replicating();
    abort.abort = true;
    let aborting = local_engine("shop/again", &bg, abort, dir.path());
    let status = step_until(&aborting, status, |s| s.phase == Phase::Aborted).await;
    assert_clean_and_writable(&bg).await;
    assert_eq!(
        count(
            &bg.green,
            "SELECT (SELECT count(*) FROM ledger) + (SELECT count(*) FROM accounts)"
        ),
        0,
        "the abort emptied what its copy wrote"
    );
    assert!(status.milestones.contains(&Milestone::CopyStarted));

    // A new attempt from scratch completes, every row copied once.
    let second = local_engine("shop/again", &bg, production_spec(), dir.path());
    let done = step_until(&second, DatabaseCutoverStatus::default(), |s| {
        s.phase.is_terminal()
    })
    .await;
    assert_eq!(done.phase, Phase::Completed, "{:?}", done.message);
    assert_eq!(count(&bg.green, "SELECT count(*) FROM ledger"), 300);
    assert_eq!(
        count(&bg.green, "SELECT sum(balance) FROM accounts"),
        50 * 1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_already_on_green_are_refused_at_preflight_naming_the_tables() {
    let bg = bank();
    bg.green
        .execute(APP, "INSERT INTO accounts VALUES (1, 5)")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = local_engine("shop/full", &bg, production_spec(), dir.path());
    let done = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        s.phase.is_terminal()
    })
    .await;
    assert_eq!(done.phase, Phase::Aborted);
    let message = done.message.unwrap_or_default();
    assert!(
        message.contains("target-empty")
            && message.contains("public.accounts")
            && !message.contains("public.ledger"),
        "{message}"
    );
    // Green's own row is untouched: the abort empties only what an attempt copied.
    assert_eq!(count(&bg.green, "SELECT count(*) FROM accounts"), 1);
    assert_clean_and_writable(&bg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_with_green_away_lists_what_is_left_and_finishes_once_it_is_back() {
    let mut bg = bank();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = local_engine("shop/away", &bg, held_in_replicating(), dir.path());
    let status = step_until(&engine, DatabaseCutoverStatus::default(), copied).await;
    let mut abort = held_in_replicating();
    abort.abort = true;
    let aborting = local_engine("shop/away", &bg, abort, dir.path());

    bg.green.stop().unwrap();
    // Two steps: into Aborting, then the abort itself, which cannot reach green.
    let mut status = status;
    for _ in 0..2 {
        status = step_once(&aborting, status).await;
    }
    assert_eq!(status.phase, Phase::Aborting);
    let retry = status.retry.clone().expect("the abort is retried");
    assert!(
        retry.message.contains("left to undo")
            && retry.message.contains("subscription")
            && retry.message.contains("on green")
            && retry.message.contains("rows this attempt copied"),
        "{retry:?}"
    );
    assert!(!retry.message.contains(bg.blue.password()), "{retry:?}");
    // What blue holds is gone already: its publication and the subscription's slot.
    assert_eq!(leftovers(&bg.blue), Vec::<String>::new(), "left on blue");

    bg.green.restart().unwrap();
    let status = step_until(&aborting, status, |s| s.phase == Phase::Aborted).await;
    assert!(status.retry.is_none());
    assert_clean_and_writable(&bg).await;
    // No catalog row holds a connection string any more, and green is empty again.
    assert_eq!(count(&bg.green, "SELECT count(*) FROM pg_subscription"), 0);
    assert_eq!(count(&bg.green, "SELECT count(*) FROM ledger"), 0);
}
