//! Replication that cannot apply on green is seen before any freeze, against real PostgreSQL
//! under write load: DDL run on blue only, and a key green already holds, each stop the apply
//! worker; the cutover aborts from Replicating within `APPLY_FAILING_FOR` (never waiting out its
//! budget, never freezing), names the cause, and leaves blue writable with nothing behind.
//! Below it, `apply_health` itself on PostgreSQL 15 and 18.

mod common;

use std::time::{Duration, Instant};

use common::*;
use cutover_operator::api::{DatabaseCutoverSpec, DatabaseCutoverStatus, Phase, VerificationMode};
use cutover_operator::engine::NoSink;
use cutover_operator::plan::APPLY_FAILING_FOR;
use cutover_tests::BlueGreen;
use cutover_tests::workload::{self, Load, LoadConfig};

/// A production plan whose freeze is an hour away: the only way out of Replicating here is an
/// abort.
fn spec(verification: VerificationMode) -> DatabaseCutoverSpec {
    let mut spec = production_spec();
    spec.schedule.freeze_at = Some(
        (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1))
            .to_string()
            .into(),
    );
    spec.verification.mode = verification;
    spec
}

struct Run {
    status: DatabaseCutoverStatus,
    phases: Vec<Phase>,
    /// From the fault to the end of the abort.
    took: Duration,
}

/// Drives the cutover; once the initial copy is done (green analyzed), runs `fault` on blue and
/// green, then goes on until the cutover ends.
async fn run_with_fault(bg: &BlueGreen, spec: DatabaseCutoverSpec, fault: (&str, &str)) -> Run {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = local_engine("shop/health", bg, spec, dir.path());
    let mut status = DatabaseCutoverStatus::default();
    let mut phases = Vec::new();
    let mut faulted: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(180);
    while !status.phase.is_terminal() {
        assert!(
            Instant::now() < deadline,
            "stuck in {}: {:?} {:?}",
            status.phase,
            status.message,
            status.replication
        );
        if faulted.is_none()
            && status
                .milestones
                .contains(&cutover_operator::api::Milestone::TargetAnalyzed)
        {
            let (on_green, on_blue) = fault;
            if !on_green.is_empty() {
                bg.green.execute(APP, on_green).unwrap();
            }
            bg.blue.execute(APP, on_blue).unwrap();
            faulted = Some(Instant::now());
        }
        let step = engine.step(&status, false, &mut NoSink).await.unwrap();
        status = step.status;
        if phases.last() != Some(&status.phase) {
            phases.push(status.phase);
        }
        if !status.phase.is_terminal() {
            tokio::time::sleep(step.pause.min(Duration::from_millis(500))).await;
        }
    }
    Run {
        status,
        phases,
        took: faulted.expect("the fault ran").elapsed(),
    }
}

fn start_load(bg: &BlueGreen) -> Load {
    Load::start(LoadConfig {
        dsn: app_dsn(&bg.blue),
        clients: 2,
        tps: 100.0,
        accounts: 50,
    })
}

fn assert_aborted_before_the_freeze(run: &Run, needles: &[&str]) {
    let message = run.status.message.clone().unwrap_or_default();
    assert_eq!(run.status.phase, Phase::Aborted, "{message}");
    assert_eq!(
        run.phases,
        [
            Phase::Preflight,
            Phase::Replicating,
            Phase::Aborting,
            Phase::Aborted
        ],
        "{message}"
    );
    assert!(run.status.frozen_at.is_none(), "never frozen");
    for n in needles {
        assert!(message.contains(n), "{message:?} lacks {n:?}");
    }
    // The failures were seen and timed, not waited out: the abort came a poll or two after
    // APPLY_FAILING_FOR, far from the replication budget.
    assert!(
        run.took < APPLY_FAILING_FOR + Duration::from_secs(30),
        "aborted {:?} after the fault: {message}\n{:?}\n{:#?}",
        run.took,
        run.status.replication,
        run.status.steps
    );
    eprintln!("aborted {:?} after the fault: {message}", run.took);
}

/// `ALTER TABLE … ADD COLUMN` on blue only, while the application writes the new column: the
/// apply cannot store the rows. The abort names the table and the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_on_blue_during_replication_aborts_before_the_freeze_naming_the_column() {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(50, 1000)).unwrap();
    let load = start_load(&bg);
    let run = run_with_fault(
        &bg,
        spec(VerificationMode::Online),
        (
            "",
            "ALTER TABLE ledger ADD COLUMN note text NOT NULL DEFAULT 'added on blue';
             INSERT INTO ledger (client, seq, amount, note) VALUES (900, 1, 0, 'new column');",
        ),
    )
    .await;
    let _ = load.stop().await;
    assert_aborted_before_the_freeze(
        &run,
        &[
            "replication cannot apply on green",
            "DDL run on blue is not replicated",
            "ledger",
            "note",
        ],
    );
    let r = run.status.replication.as_ref().unwrap();
    assert!(r.apply_errors.unwrap_or(0) > 1, "{r:?}");
    assert_clean_and_writable(&bg).await;
}

/// A row written on green whose key blue then inserts too: PostgreSQL 18 counts the conflict
/// (`insert_exists`), and the abort says a change would duplicate a key green holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_green_already_holds_aborts_before_the_freeze_naming_the_conflict_on_18() {
    let bg = blue_green_of(UPGRADE);
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(50, 1000)).unwrap();
    let load = start_load(&bg);
    // Verified inside the freeze: online verification would catch the write on green first,
    // and this test is about the apply.
    let run = run_with_fault(
        &bg,
        spec(VerificationMode::InFreeze),
        (
            "INSERT INTO ledger (id, client, seq, amount) VALUES (-1, 901, 1, 5)",
            "INSERT INTO ledger (id, client, seq, amount) VALUES (-2, 901, 1, 5)",
        ),
    )
    .await;
    let _ = load.stop().await;
    assert_aborted_before_the_freeze(
        &run,
        &[
            "replication cannot apply on green",
            "a change would duplicate a key green already holds",
            "insert_exists",
        ],
    );
    assert_clean_and_writable(&bg).await;
}

/// `apply_health` reads the subscription's statistics in one query on every major: nothing to
/// report on a healthy subscription, and on a PostgreSQL 18 green the changes it had to skip
/// (blue updated and deleted rows green had lost) — which 15 does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_health_reads_every_major_and_the_skipped_changes_of_18() {
    use cutover_operator::postgres::replication::{self, ApplyHealth, TableSelection};
    for majors in [DEFAULT_MAJORS, UPGRADE] {
        let bg = blue_green_of(majors);
        with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
        bg.blue.execute(APP, &workload::seed(10, 100)).unwrap();
        let (blue, green) = engine_clients(&bg).await;
        let names = names("health");
        replication::ensure_publication(&blue, &names, &TableSelection::All)
            .await
            .unwrap();
        replication::ensure_subscription(&blue, &green, &names, &blue_dsn(&bg))
            .await
            .unwrap();
        replication::wait_ready(&green, &names, Instant::now() + Duration::from_secs(30))
            .await
            .unwrap();
        let health = replication::apply_health(&green, &names.subscription)
            .await
            .unwrap();
        assert_eq!(health, ApplyHealth::default(), "green {}", bg.green.major());

        // Green loses two rows; blue updates one and deletes the other; a marker row after
        // them shows the apply went past both.
        bg.green
            .execute(APP, "DELETE FROM accounts WHERE id IN (1, 2)")
            .unwrap();
        bg.blue
            .execute(
                APP,
                "UPDATE accounts SET balance = 0 WHERE id = 1;
                 DELETE FROM accounts WHERE id = 2;
                 INSERT INTO ledger (client, seq, amount) VALUES (99, 1, 0);",
            )
            .unwrap();
        wait_for("the marker on green", Duration::from_secs(30), || async {
            count(&bg.green, "SELECT count(*) FROM ledger WHERE client = 99") == 1
        })
        .await;
        let skipped = vec![
            ("update_missing".to_owned(), 1),
            ("delete_missing".to_owned(), 1),
        ];
        if bg.green.major() >= 18 {
            // The apply worker reports its statistics a moment after the transaction.
            wait_for(
                "the skipped changes counted",
                Duration::from_secs(30),
                || async {
                    replication::apply_health(&green, &names.subscription)
                        .await
                        .unwrap()
                        .skipped_conflicts
                        == skipped
                },
            )
            .await;
        }
        let health = replication::apply_health(&green, &names.subscription)
            .await
            .unwrap();
        assert_eq!(health.errors, 0);
        assert!(health.blocking_conflicts.is_empty(), "{health:?}");
        if bg.green.major() < 18 {
            assert!(health.skipped_conflicts.is_empty(), "{health:?}");
        }
    }
}
