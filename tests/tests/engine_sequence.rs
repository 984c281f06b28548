//! The whole sequence driven by `plan::next_action` and the engines against two real PostgreSQL
//! clusters, with the bank workload writing to blue throughout: a production cutover ends
//! Completed with every acknowledged write on green and nothing of ours left; a rehearsal ends
//! Completed with blue writable and the application's connection string untouched; a row that
//! differs on green stops the cutover before the point of no return, naming the table.

mod common;

use std::time::Duration;

use common::*;
use cutover_operator::api::{
    Approval, DatabaseCutover, DatabaseCutoverSpec, DatabaseCutoverStatus, Milestone, Mode, Phase,
};
use cutover_operator::engine::{Databases, Engine, LocalPlatform, drive};
use cutover_operator::postgres::{ConnectOptions, Dsn};
use cutover_tests::BlueGreen;
use cutover_tests::workload::{self, Load, LoadConfig};

fn spec(mode: Mode) -> DatabaseCutoverSpec {
    let text = include_str!("../../cutover-plans/production-with-rollback.yaml");
    let mut spec = serde_saphyr::from_str::<DatabaseCutover>(text)
        .unwrap()
        .spec;
    spec.mode = mode;
    spec.application_roles = vec![APP_ROLE.into()];
    spec.freeze.method = cutover_operator::api::FreezeMethod::ReadOnly;
    spec.freeze.drain_timeout = "2s".into();
    spec.replication.max_lag_before_freeze = "1MiB".into();
    spec.point_of_no_return.approval = Approval::Automatic;
    spec.schedule.hypercare = "1s".into();
    spec.schedule.checkpoints = vec![];
    spec
}

fn engine(
    bg: &BlueGreen,
    spec: DatabaseCutoverSpec,
    dir: &std::path::Path,
) -> Engine<LocalPlatform> {
    let dbs = Databases {
        blue: Dsn::new(bg.blue_dsn()),
        green: Dsn::new(bg.green_dsn()),
        blue_from_green: Dsn::new(bg.blue_dsn()),
        green_from_blue: Dsn::new(bg.green_dsn()),
        connect: ConnectOptions::default(),
    };
    let platform = LocalPlatform {
        secret_file: Some(dir.join("DATABASE_URL")),
        rehearsal_secret_file: Some(dir.join("DATABASE_URL.rehearsal")),
    };
    Engine::new("shop/orders", spec, dbs, platform)
}

fn setup() -> BlueGreen {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(50, 1000)).unwrap();
    bg
}

fn start_load(bg: &BlueGreen) -> Load {
    Load::start(LoadConfig {
        dsn: app_dsn(&bg.blue),
        clients: 4,
        tps: 200.0,
        accounts: 50,
    })
}

async fn run(engine: &Engine<LocalPlatform>) -> (DatabaseCutoverStatus, Vec<Phase>) {
    let mut phases = Vec::new();
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        drive(engine, DatabaseCutoverStatus::default(), 5, |s, _| {
            if phases.last() != Some(&s.phase) {
                phases.push(s.phase);
            }
        }),
    )
    .await
    .expect("the cutover finishes within two minutes")
    .expect("the databases stay reachable");
    (status, phases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_cutover_under_load_completes_losing_nothing() {
    let bg = setup();
    let dir = tempfile::tempdir().unwrap();
    let load = start_load(&bg);
    wait_for("the load commits", Duration::from_secs(30), || async {
        load.commits() > 20
    })
    .await;

    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = engine(&bg, spec(Mode::Production), dir.path());
    let (status, phases) = run(&engine).await;
    let report = load.stop().await;

    eprintln!(
        "{}",
        cutover_operator::plan::timing_report(&status, jiff::Timestamp::now()).render()
    );
    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    assert_eq!(
        phases,
        [
            Phase::Preflight,
            Phase::Replicating,
            Phase::Freezing,
            Phase::FinalSync,
            Phase::Verifying,
            Phase::AwaitingApproval,
            Phase::Switching,
            Phase::Hypercare,
            Phase::Completed
        ]
    );
    let verification = status.verification.as_ref().unwrap();
    assert!(verification.matched, "{verification:?}");
    assert!(status.point_of_no_return_at.is_some());
    let freeze = status
        .write_freeze_seconds
        .expect("the write freeze was measured");
    assert!(freeze > 0.0 && freeze < 60.0, "{freeze}");
    for m in [
        Milestone::SequencesCopied,
        Milestone::ForwardReplicationDropped,
        Milestone::ReverseReplicationStarted,
        Milestone::SecretSwitched,
    ] {
        assert!(
            status.milestones.contains(&m),
            "{m:?} missing: {:?}",
            status.milestones
        );
    }

    // The application's connection string now names green, with its own credentials.
    let secret = std::fs::read_to_string(dir.path().join("DATABASE_URL")).unwrap();
    assert_eq!(secret, app_dsn(&bg.green));

    // Every acknowledged write is on green; money was neither made nor lost.
    assert!(
        report.acknowledged.len() > 20,
        "the load barely ran: {report:?}"
    );
    let on_green = count(&bg.green, "SELECT count(*) FROM ledger");
    assert!(on_green >= report.acknowledged.len() as i64);
    for (client, seq) in &report.acknowledged {
        let n = count(
            &bg.green,
            &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"),
        );
        assert_eq!(
            n, 1,
            "acknowledged write ({client}, {seq}) missing on green"
        );
    }
    assert_eq!(
        count(&bg.green, "SELECT sum(balance) FROM accounts"),
        50 * 1000
    );
    assert_eq!(
        count(&bg.green, "SELECT last_value FROM ledger_id_seq"),
        count(&bg.blue, "SELECT last_value FROM ledger_id_seq"),
        "sequences copied"
    );

    // Nothing of ours is left on either server after completion.
    assert_eq!(leftovers(&bg.green), Vec::<String>::new(), "left on green");
    let on_blue: Vec<String> = leftovers(&bg.blue)
        .into_iter()
        .filter(|l| !l.starts_with("setting") && !l.starts_with("schema"))
        .collect();
    assert_eq!(
        on_blue,
        Vec::<String>::new(),
        "replication objects left on blue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehearsal_undoes_the_freeze_and_leaves_the_application_alone() {
    let bg = setup();
    let dir = tempfile::tempdir().unwrap();
    let load = start_load(&bg);
    wait_for("the load commits", Duration::from_secs(30), || async {
        load.commits() > 20
    })
    .await;

    let mut spec = spec(Mode::Rehearsal);
    spec.rollback = None;
    spec.replication.reverse_for_rollback = false;
    spec.switch.rehearsal_secret_ref = Some(cutover_operator::api::SecretKeyRef {
        name: "orders-db-rehearsal".into(),
        key: "DATABASE_URL".into(),
    });
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = engine(&bg, spec, dir.path());
    let (status, phases) = run(&engine).await;

    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    assert!(!phases.contains(&Phase::Hypercare), "{phases:?}");
    assert!(status.write_freeze_seconds.is_some());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("DATABASE_URL")).unwrap(),
        app_dsn(&bg.blue),
        "the application Secret was touched"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("DATABASE_URL.rehearsal")).unwrap(),
        app_dsn(&bg.green)
    );
    // Blue takes writes again after the rehearsal.
    let before = load.commits();
    wait_for(
        "the load commits on blue again",
        Duration::from_secs(30),
        || async { load.commits() > before + 10 },
    )
    .await;
    load.stop().await;
    assert_clean_and_writable(&bg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_changed_on_green_aborts_before_the_point_of_no_return() {
    let bg = setup();
    let dir = tempfile::tempdir().unwrap();
    // Green has a row blue does not: replication copies blue's rows next to it (no conflict
    // on a key blue never uses), and verification must find it.
    bg.green
        .execute(APP, "INSERT INTO accounts VALUES (9999, 1)")
        .unwrap();
    let engine = engine(&bg, spec(Mode::Production), dir.path());
    let (status, _) = run(&engine).await;

    assert_eq!(status.phase, Phase::Aborted);
    let message = status.message.clone().unwrap_or_default();
    assert!(message.contains("accounts"), "{message}");
    assert!(
        message.contains("9999"),
        "the differing key is named: {message}"
    );
    assert!(status.point_of_no_return_at.is_none());
    assert!(!dir.path().join("DATABASE_URL").exists());
    assert_clean_and_writable(&bg).await;
}
