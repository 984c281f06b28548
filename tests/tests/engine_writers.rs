//! No acknowledged write is lost, whoever writes. A production cutover with the default
//! (`Strict`) freeze runs while four loads write to blue: the application, the application's
//! role with `default_transaction_read_only = off` for every session, a role the plan does not
//! list, and the superuser. Every write any of them was told was committed is on green when the
//! cutover completes; after the freeze blue acknowledges none of them.

mod common;

use std::time::Duration;

use common::*;
use cutover_operator::api::{
    Approval, DatabaseCutover, DatabaseCutoverSpec, DatabaseCutoverStatus, FreezeMethod, Mode,
    Phase, ValidSpec,
};
use cutover_operator::engine::{Engine, NoSink};
use cutover_operator::platform::LocalPlatform;
use cutover_tests::workload::{self, Load, LoadConfig};

fn spec(method: FreezeMethod) -> DatabaseCutoverSpec {
    let text = include_str!("../../cutover-plans/production-with-rollback.yaml");
    let mut spec = serde_saphyr::from_str::<DatabaseCutover>(text)
        .unwrap()
        .spec;
    spec.mode = Mode::Production;
    spec.application_roles = vec![APP_ROLE.into()];
    spec.freeze.method = method;
    spec.freeze.drain_timeout = "2s".into();
    spec.replication.max_lag_before_freeze = "1MiB".into();
    spec.point_of_no_return.approval = Approval::Automatic;
    spec.schedule.hypercare = "1s".into();
    spec.schedule.checkpoints = vec![];
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
