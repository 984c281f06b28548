//! Transient faults during the write freeze, against real PostgreSQL under write load: green is
//! stopped and started again while the cutover is in FinalSync, in Verifying and in Switching,
//! and blue while it is in Freezing. Each time the step that hit the stopped server is retried
//! (the status shows the retry) and the cutover completes with every acknowledged write on
//! green — a server restarting for a second is not a reason to abort.

mod common;

use std::time::{Duration, Instant};

use common::*;
use cutover_operator::api::{
    DatabaseCutoverSpec, DatabaseCutoverStatus, FreezeMethod, Phase, ValidSpec,
};
use cutover_operator::engine::{Engine, NoSink};
use cutover_operator::platform::LocalPlatform;
use cutover_tests::BlueGreen;
use cutover_tests::workload::{self, Load, LoadConfig};

/// How long the faulted server stays down.
const OUTAGE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
enum Side {
    Blue,
    Green,
}

fn spec() -> DatabaseCutoverSpec {
    let mut spec = production_spec();
    spec.freeze.method = FreezeMethod::ReadOnly;
    spec
}

/// Runs a production cutover under load; when it first enters `phase`, `side` is stopped (a
/// fast shutdown: every session is ended) and started again after [`OUTAGE`], while the
/// cutover goes on. Returns the phases in which a step was retried.
async fn cutover_with_restart(phase: Phase, side: Side) {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(50, 1000)).unwrap();
    let load = Load::start(LoadConfig {
        dsn: app_dsn(&bg.blue),
        clients: 4,
        tps: 200.0,
        accounts: 50,
    });
    wait_for("the load commits", Duration::from_secs(30), || async {
        load.commits() > 20
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = Engine::new(
        "shop/faults",
        ValidSpec::new(spec()).unwrap(),
        cutover_tests::databases(&bg),
        LocalPlatform {
            secret_file: Some(dir.path().join("DATABASE_URL")),
            rehearsal_secret_file: None,
        },
    );

    let mut status = DatabaseCutoverStatus::default();
    let mut retried_in = Vec::new();
    let mut fault: Option<std::thread::JoinHandle<BlueGreen>> = None;
    let mut bg = Some(bg);
    let deadline = Instant::now() + Duration::from_secs(180);
    while !status.phase.is_terminal() {
        assert!(
            Instant::now() < deadline,
            "stuck in {} (restart of {side:?} in {phase}): {:?}",
            status.phase,
            status.message
        );
        if status.phase == phase && fault.is_none() {
            let mut pair = bg
                .take()
                .expect("the pair is here until the fault takes it");
            let (down_tx, down_rx) = std::sync::mpsc::channel();
            fault = Some(std::thread::spawn(move || {
                let cluster = match side {
                    Side::Blue => &mut pair.blue,
                    Side::Green => &mut pair.green,
                };
                cluster.stop().unwrap();
                down_tx.send(()).unwrap();
                // The outage's length, not a condition: the cutover runs on meanwhile.
                std::thread::sleep(OUTAGE);
                cluster.restart().unwrap();
                pair
            }));
            tokio::task::spawn_blocking(move || down_rx.recv().unwrap())
                .await
                .unwrap();
        }
        let step = engine.step(&status, false, &mut NoSink).await.unwrap();
        status = step.status;
        if status.retry.is_some() && !retried_in.contains(&status.phase) {
            retried_in.push(status.phase);
        }
        if !status.phase.is_terminal() {
            tokio::time::sleep(step.pause.min(Duration::from_millis(500))).await;
        }
    }
    let bg = match fault {
        Some(handle) => tokio::task::spawn_blocking(move || handle.join().unwrap())
            .await
            .unwrap(),
        None => bg.take().unwrap(),
    };
    let report = load.stop().await;

    assert_eq!(
        status.phase,
        Phase::Completed,
        "restart of {side:?} in {phase}: {:?}",
        status.message
    );
    assert!(
        retried_in.contains(&phase),
        "the restart of {side:?} in {phase} was retried in that phase (retries seen in {retried_in:?})"
    );
    assert!(status.verification.as_ref().unwrap().matched);
    assert!(
        report.acknowledged.len() > 20,
        "the load barely ran: {report:?}"
    );
    for (client, seq) in &report.acknowledged {
        assert_eq!(
            count(
                &bg.green,
                &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"),
            ),
            1,
            "acknowledged write ({client}, {seq}) missing on green (restart of {side:?} in {phase})"
        );
    }
    assert_eq!(
        count(&bg.green, "SELECT sum(balance) FROM accounts"),
        50 * 1000
    );
    eprintln!(
        "restart of {side:?} in {phase}: completed, {} acknowledged writes all on green, retried in {retried_in:?}",
        report.acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_restarting_during_final_sync_is_retried() {
    cutover_with_restart(Phase::FinalSync, Side::Green).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_restarting_during_verification_is_retried() {
    cutover_with_restart(Phase::Verifying, Side::Green).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_restarting_during_the_switch_is_retried() {
    cutover_with_restart(Phase::Switching, Side::Green).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_restarting_during_the_freeze_is_retried() {
    cutover_with_restart(Phase::Freezing, Side::Blue).await;
}
