//! Cutover-window benchmark: how long the application cannot write during a whole cutover
//! driven by the engine (what `cutover run` and the operator execute), under a steady load.
//!
//! `cargo run --release -p cutover-tests --bin bench_cutover_window -- [rounds] [tps] [clients]`
//! (defaults 6, 300, 4). Each round starts a fresh blue/green pair with the bank workload, an
//! application that reads its connection string from a file (the Secret, as `cutover run`'s
//! local platform writes it) and reconnects when the file names another server, then runs the
//! production sequence of `cutover-plans/production-with-rollback.yaml` (automatic approval,
//! reverse replication, no hypercare wait) with `engine::drive`. Per round it prints:
//! - `freeze_s`: the engine's own measure, `status.writeFreezeSeconds` (freeze → switch);
//! - the steps inside the freeze: final sync, verification, approval, switch;
//! - `write_gap_s`: the longest gap between two successful commits the application saw from
//!   a second before the freeze until it wrote on green again — the downtime it felt;
//!
//! and, measured in the same run, the baseline: the longest gap between commits in one-second
//! windows of the same load without a cutover.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_operator::api::units::parse_timestamp;
use cutover_operator::api::{
    Approval, DatabaseCutover, DatabaseCutoverSpec, DatabaseCutoverStatus, FreezeMethod, Phase,
};
use cutover_operator::engine::{Engine, Watch, drive};
use cutover_operator::platform::LocalPlatform;
use cutover_tests::workload::{self, Load, LoadConfig};
use cutover_tests::{BlueGreen, wait_until};

const ROLE: &str = "bench_app";
const PASSWORD: &str = "bench";
const ACCOUNTS: i64 = 1_000;

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn spec() -> Result<DatabaseCutoverSpec> {
    let text = include_str!("../../../cutover-plans/production-with-rollback.yaml");
    let mut spec = serde_saphyr::from_str::<DatabaseCutover>(text)?.spec;
    spec.application_roles = vec![ROLE.into()];
    spec.freeze.method = FreezeMethod::ReadOnly;
    spec.freeze.drain_timeout = "5s".into();
    spec.replication.max_lag_before_freeze = "1MiB".into();
    spec.point_of_no_return.approval = Approval::Automatic;
    spec.schedule.freeze_at = None;
    spec.schedule.hypercare = "0s".into();
    spec.schedule.checkpoints = vec![];
    spec.switch.restart = vec![];
    Ok(spec)
}

/// Seconds the step `phase` took in `status` (its first record).
fn step_seconds(status: &DatabaseCutoverStatus, phase: Phase) -> f64 {
    status
        .steps
        .iter()
        .find(|s| s.name == phase)
        .and_then(|s| {
            let start = parse_timestamp(&s.started_at).ok()?;
            let end = parse_timestamp(s.finished_at.as_deref()?).ok()?;
            Some(end.duration_since(start).as_secs_f64())
        })
        .unwrap_or(f64::NAN)
}

struct Round {
    freeze: f64,
    final_sync: f64,
    verifying: f64,
    approval: f64,
    switching: f64,
    gap: f64,
    baseline: Vec<f64>,
    tps: f64,
    lost: usize,
}

async fn round(tps: f64, clients: usize, dir: &std::path::Path) -> Result<Round> {
    let bg = BlueGreen::start_with(
        cutover_tests::bench_builder("blue"),
        cutover_tests::bench_builder("green"),
    )?;
    eprintln!("{}", cutover_tests::versions_of(&bg));
    for c in [&bg.blue, &bg.green] {
        c.create_role(ROLE, PASSWORD, "LOGIN")?;
        c.execute(BlueGreen::DATABASE, workload::SCHEMA)?;
        c.execute(BlueGreen::DATABASE, &workload::grants(ROLE))?;
    }
    bg.blue
        .execute(BlueGreen::DATABASE, &workload::seed(ACCOUNTS, 1_000))?;
    let secret = dir.join("DATABASE_URL");
    let blue_app = bg.blue.dsn(ROLE, PASSWORD, BlueGreen::DATABASE);
    let green_app = bg.green.dsn(ROLE, PASSWORD, BlueGreen::DATABASE);
    std::fs::write(&secret, &blue_app)?;
    let load = Load::start_following(
        LoadConfig {
            dsn: blue_app.clone(),
            clients,
            tps,
            accounts: ACCOUNTS,
        },
        secret.clone(),
    );
    let warm = Instant::now();
    wait_until("the load warmed up", Duration::from_secs(30), || {
        warm.elapsed() >= Duration::from_secs(1)
    })
    .await?;
    // Baseline: the same load, no cutover.
    let mut baseline = Vec::new();
    for _ in 0..3 {
        let from = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        baseline.push(
            load.snapshot()
                .longest_gap(from, Instant::now())
                .as_secs_f64(),
        );
    }

    let dbs = cutover_tests::databases(&bg);
    let platform = LocalPlatform {
        secret_file: Some(secret.clone()),
        rehearsal_secret_file: None,
    };
    let spec = cutover_operator::api::ValidSpec::new(spec()?)?;
    let engine = Engine::new("bench/cutover-window", spec, dbs, platform);
    let started = Instant::now();
    let mut frozen_at: Option<Instant> = None;
    let mut watch = Watch(|s: &DatabaseCutoverStatus, _: &_| {
        if s.frozen_at.is_some() && frozen_at.is_none() {
            frozen_at = Some(Instant::now());
        }
    });
    let status = drive(&engine, DatabaseCutoverStatus::default(), &mut watch)
        .await
        .context("drive the cutover")?;
    if status.phase != Phase::Completed {
        bail!("the cutover ended {}: {:?}", status.phase, status.message);
    }
    if std::fs::read_to_string(&secret)? != green_app {
        bail!("the Secret file does not name green");
    }
    let switched = Instant::now();
    wait_until(
        "the application writes on green",
        Duration::from_secs(30),
        || load.commits_since(switched) >= 20,
    )
    .await?;
    let report = load.stop().await;
    let from = frozen_at.unwrap_or(started) - Duration::from_secs(1);
    let gap = report.longest_gap(from, Instant::now()).as_secs_f64();
    // Every acknowledged write must be on green.
    let on_green = bg.green.query(
        BlueGreen::DATABASE,
        "SELECT client || ',' || seq FROM ledger",
    )?;
    let on_green: std::collections::HashSet<String> =
        on_green.into_iter().filter_map(|r| r[0].clone()).collect();
    let lost = report
        .acknowledged
        .iter()
        .filter(|(c, s)| !on_green.contains(&format!("{c},{s}")))
        .count();
    let seconds = started.elapsed().as_secs_f64() + 4.0;
    Ok(Round {
        freeze: status.write_freeze_seconds.unwrap_or(f64::NAN),
        final_sync: step_seconds(&status, Phase::FinalSync),
        verifying: step_seconds(&status, Phase::Verifying),
        approval: step_seconds(&status, Phase::AwaitingApproval),
        switching: step_seconds(&status, Phase::Switching),
        gap,
        baseline,
        tps: report.commits.len() as f64 / seconds,
        lost,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.first().map_or(Ok(6), |a| a.parse())?;
    let tps: f64 = args.get(1).map_or(Ok(300.0), |a| a.parse())?;
    let clients: usize = args.get(2).map_or(Ok(4), |a| a.parse())?;
    let dir = tempfile::tempdir()?;

    println!(
        "round  freeze_s  final_sync_s  verifying_s  approval_s  switching_s  write_gap_s  baseline_gap_s  tps  writes_lost"
    );
    let (mut freezes, mut gaps, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
    let mut lost = 0;
    for n in 1..=rounds {
        let r = round(tps, clients, dir.path()).await?;
        let base = r.baseline.iter().copied().fold(0.0, f64::max);
        println!(
            "{n:>5}  {:>8.3}  {:>12.3}  {:>11.3}  {:>10.3}  {:>11.3}  {:>11.3}  {:>14.3}  {:>3.0}  {:>11}",
            r.freeze,
            r.final_sync,
            r.verifying,
            r.approval,
            r.switching,
            r.gap,
            base,
            r.tps,
            r.lost
        );
        freezes.push(r.freeze);
        gaps.push(r.gap);
        baseline.extend(r.baseline);
        lost += r.lost;
    }
    println!();
    println!("rounds {rounds}, target {tps} tps over {clients} clients");
    println!(
        "write freeze recorded by the engine (freeze → switch): p50 {:.3} s, p95 {:.3} s, max {:.3} s",
        percentile(&freezes, 50.0),
        percentile(&freezes, 95.0),
        percentile(&freezes, 100.0)
    );
    println!(
        "longest gap between the application's writes:          p50 {:.3} s, p95 {:.3} s, max {:.3} s",
        percentile(&gaps, 50.0),
        percentile(&gaps, 95.0),
        percentile(&gaps, 100.0)
    );
    let base95 = percentile(&baseline, 95.0);
    println!(
        "baseline: longest gap in a 1 s window without a cutover: p50 {:.3} s, p95 {:.3} s",
        percentile(&baseline, 50.0),
        base95
    );
    println!(
        "ratio write-gap p95 / baseline p95: {:.1}x",
        percentile(&gaps, 95.0) / base95.max(1e-6)
    );
    println!("acknowledged writes missing on green: {lost}");
    Ok(())
}
