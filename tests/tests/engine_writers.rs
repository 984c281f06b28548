//! No acknowledged write is lost, whoever writes. A production cutover with the default
//! (`Strict`) freeze runs while four loads write to blue: the application, the application's
//! role with `default_transaction_read_only = off` for every session, a role the plan does not
//! list, and the superuser. Every write any of them was told was committed is on green when the
//! cutover completes; after the freeze blue acknowledges none of them.

mod common;

use std::time::Duration;

use common::*;
use cutover_operator::api::{
    Approval, DatabaseCutoverSpec, DatabaseCutoverStatus, FreezeMethod, Phase, ValidSpec,
};
use cutover_operator::engine::{Engine, NoSink};
use cutover_operator::platform::LocalPlatform;
use cutover_tests::workload::{self, Load, LoadConfig};

fn spec(method: FreezeMethod) -> DatabaseCutoverSpec {
    let mut spec = production_spec();
    spec.freeze.method = method;
    spec
}

/// Runs the cutover with `method` under the four loads; returns each load's report by name.
async fn cutover_under_every_writer(
    method: FreezeMethod,
) -> (
    cutover_tests::BlueGreen,
    DatabaseCutoverStatus,
    Vec<(&'static str, workload::LoadReport)>,
) {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(50, 1000)).unwrap();
    for c in [&bg.blue, &bg.green] {
        c.create_role("batch", "batch-pw", "LOGIN").unwrap();
        c.execute(APP, &workload::grants("batch")).unwrap();
    }
    let config = |dsn: String| LoadConfig {
        dsn,
        clients: 2,
        tps: 60.0,
        accounts: 50,
    };
    let read_write = "?options=-c%20default_transaction_read_only%3Doff";
    let loads = [
        ("application", app_dsn(&bg.blue)),
        (
            "application with read-only off",
            format!("{}{read_write}", app_dsn(&bg.blue)),
        ),
        (
            "a role not listed",
            format!("{}{read_write}", bg.blue.dsn("batch", "batch-pw", APP)),
        ),
        ("the superuser", format!("{}{read_write}", bg.blue_dsn())),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (name, dsn))| {
        let first = i32::try_from(i * 100).unwrap();
        (name, Load::start_from(config(dsn), first))
    })
    .collect::<Vec<_>>();
    for (name, load) in &loads {
        wait_for(name, Duration::from_secs(30), || async {
            load.commits() > 10
        })
        .await;
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = Engine::new(
        "shop/writers",
        ValidSpec::new(spec(method)).unwrap(),
        cutover_tests::databases(&bg),
        LocalPlatform {
            secret_file: Some(dir.path().join("DATABASE_URL")),
            rehearsal_secret_file: None,
        },
    );
    let mut status = DatabaseCutoverStatus::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut frozen_commits: Option<Vec<usize>> = None;
    while !status.phase.is_terminal() {
        assert!(
            std::time::Instant::now() < deadline,
            "stuck in {}",
            status.phase
        );
        let step = engine.step(&status, false, &mut NoSink).await.unwrap();
        status = step.status;
        if status.frozen_at.is_some() && frozen_commits.is_none() {
            frozen_commits = Some(loads.iter().map(|(_, l)| l.commits()).collect());
        }
        tokio::time::sleep(step.pause.min(Duration::from_millis(200))).await;
    }
    let mut reports = Vec::new();
    for (name, load) in loads {
        reports.push((name, load.stop().await));
    }
    (bg, status, reports)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_freeze_loses_no_acknowledged_write_whoever_writes() {
    let (bg, status, reports) = cutover_under_every_writer(FreezeMethod::Strict).await;
    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    let frozen_at: jiff::Timestamp = status.frozen_at.as_deref().unwrap().parse().unwrap();
    for (name, report) in &reports {
        assert!(report.acknowledged.len() > 10, "{name} barely wrote");
        let mut missing = 0;
        for (client, seq) in &report.acknowledged {
            if count(
                &bg.green,
                &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"),
            ) != 1
            {
                missing += 1;
            }
        }
        assert_eq!(
            missing, 0,
            "{name}: {missing} acknowledged writes are not on green"
        );
        eprintln!(
            "{name}: {} acknowledged, all on green; refusals: {:?}",
            report.acknowledged.len(),
            report.errors.keys().collect::<Vec<_>>()
        );
    }
    // Blue took no write after the freeze, from anyone.
    assert_eq!(
        count(
            &bg.blue,
            &format!("SELECT count(*) FROM ledger WHERE at > '{frozen_at}'")
        ),
        0
    );
    assert_eq!(
        count(&bg.green, "SELECT sum(balance) FROM accounts"),
        50 * 1000
    );
}

/// `ReadOnly` and `RevokeLogin` stop only the application roles. Under them the other writers
/// go on writing to blue — and the cutover must then refuse before the point of no return
/// (verification or the change witness sees their writes), with every acknowledged write on
/// blue, where the application stays. Either way no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_weaker_freeze_the_cutover_refuses_rather_than_lose_a_write() {
    for method in [FreezeMethod::ReadOnly, FreezeMethod::RevokeLogin] {
        let (bg, status, reports) = cutover_under_every_writer(method).await;
        let side = match status.phase {
            Phase::Completed => &bg.green,
            Phase::Aborted => {
                assert!(status.point_of_no_return_at.is_none());
                &bg.blue
            }
            other => panic!("{method:?}: ended {other}: {:?}", status.message),
        };
        for (name, report) in &reports {
            for (client, seq) in &report.acknowledged {
                assert_eq!(
                    count(
                        side,
                        &format!(
                            "SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"
                        ),
                    ),
                    1,
                    "{method:?}, {name}: acknowledged write ({client}, {seq}) lost"
                );
            }
        }
        assert_eq!(leftovers(&bg.green), Vec::<String>::new());
        eprintln!(
            "{method:?}: ended {}: {}",
            status.phase,
            status.message.unwrap_or_default()
        );
    }
}

fn witness_slots(bg: &cutover_tests::BlueGreen) -> i64 {
    count(
        &bg.blue,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%\\_wit'",
    )
}

/// The change witness, exactly: a write on blue after verification — while the cutover waits
/// for its approval — is seen and aborts the cutover before the point of no return, naming the
/// table and key; the witness slot goes with every other replication object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_the_source_while_awaiting_approval_aborts_naming_it() {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(50, 1000)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(FreezeMethod::ReadOnly);
    s.point_of_no_return.approval = Approval::Manual;
    s.point_of_no_return.deadline = "5m".into();
    let engine = Engine::new(
        "shop/witness",
        ValidSpec::new(s).unwrap(),
        cutover_tests::databases(&bg),
        LocalPlatform {
            secret_file: Some(dir.path().join("DATABASE_URL")),
            rehearsal_secret_file: None,
        },
    );
    let waiting = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        s.phase == Phase::AwaitingApproval
    })
    .await;
    assert_eq!(
        witness_slots(&bg),
        1,
        "the witness watches from the freeze on"
    );
    // A superuser turns read-only off for the transaction and writes.
    bg.blue
        .execute(
            APP,
            "BEGIN READ WRITE; UPDATE accounts SET balance = balance + 1 WHERE id = 7;
             UPDATE accounts SET balance = balance - 1 WHERE id = 8; COMMIT",
        )
        .unwrap();
    let done = step_until(&engine, waiting, |s| s.phase.is_terminal()).await;
    assert_eq!(done.phase, Phase::Aborted);
    let message = done.message.unwrap_or_default();
    assert!(
        message.contains("writes on the source after the freeze: 2"),
        "{message}"
    );
    assert!(message.contains("public.accounts UPDATE id=7"), "{message}");
    assert_eq!(
        witness_slots(&bg),
        0,
        "the witness slot is dropped on abort"
    );
    assert_clean_and_writable(&bg).await;
}

/// After the switch, a write on blue that reverse replication did not bring — a superuser past
/// the `Strict` freeze in replica mode — is a hypercare problem, and a rollback waits until a
/// person acknowledges it; the application's own writes on green, carried back by reverse
/// replication, are not such writes. The witness slot is gone once the cutover ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_the_source_after_the_switch_is_reported_and_holds_a_rollback() {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(50, 1000)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let mut s = spec(FreezeMethod::Strict);
    s.schedule.hypercare = "10m".into();
    let engine_for = |s: DatabaseCutoverSpec| {
        Engine::new(
            "shop/after-switch",
            ValidSpec::new(s).unwrap(),
            cutover_tests::databases(&bg),
            LocalPlatform {
                secret_file: Some(dir.path().join("DATABASE_URL")),
                rehearsal_secret_file: None,
            },
        )
    };
    let engine = engine_for(s.clone());
    let hypercare = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        s.phase == Phase::Hypercare
    })
    .await;
    // The application writes on green; reverse replication brings it to blue.
    bg.green
        .execute(APP, "INSERT INTO accounts VALUES (900, 0)")
        .unwrap();
    wait_for("reverse replication", Duration::from_secs(30), || async {
        count(&bg.blue, "SELECT count(*) FROM accounts WHERE id = 900") == 1
    })
    .await;
    let quiet = step_until(&engine, hypercare, |s| {
        s.source_writes
            .as_ref()
            .is_some_and(|w| w.checked_up_to.is_some())
    })
    .await;
    let quiet = step_once(&engine, quiet).await;
    assert_eq!(
        quiet.source_writes.as_ref().map(|w| w.count),
        Some(0),
        "reverse replication's writes are not the source's own"
    );

    bg.blue
        .execute(
            APP,
            "BEGIN READ WRITE; SET LOCAL session_replication_role = replica;
             DELETE FROM accounts WHERE id = 900; COMMIT",
        )
        .unwrap();
    let reported = step_until(&engine, quiet, |s| {
        s.hypercare.as_ref().is_some_and(|h| !h.problems.is_empty())
    })
    .await;
    let problem = &reported.hypercare.as_ref().unwrap().problems[0];
    assert_eq!(
        problem.reason,
        cutover_operator::api::ProblemKind::SourceWrittenAfterSwitch
    );
    assert!(
        problem.message.contains("public.accounts DELETE id=900"),
        "{}",
        problem.message
    );

    // A rollback waits for a person; acknowledged, it goes.
    s.rollback.as_mut().unwrap().requested = true;
    let asked = engine_for(s.clone());
    let held = step_once(&asked, reported.clone()).await;
    let held = step_once(&asked, held).await;
    assert_eq!(
        held.phase,
        Phase::Hypercare,
        "the rollback waits for an acknowledgement"
    );
    s.rollback.as_mut().unwrap().acknowledge_source_writes = true;
    let acknowledged = engine_for(s);
    let rolled = step_until(&acknowledged, held, |s| s.phase.is_terminal()).await;
    assert_eq!(rolled.phase, Phase::RolledBack, "{:?}", rolled.message);
    assert_eq!(
        witness_slots(&bg),
        0,
        "the witness slot is dropped at the end"
    );
}
