//! Freeze-window benchmark: how long writes stop when blue is frozen, synced and its sequences
//! copied, under a steady write load.
//!
//! `cargo run --release -p cutover-tests --bin bench_freeze_window -- [rounds] [tps] [clients]`
//! (defaults 12, 500, 4). Starts a blue/green pair, replicates a bank workload, then per round:
//! waits until the lag is ≤ 1 MiB, freezes blue (`ReadOnly`), runs the final sync (wait until
//! green applied blue's position, copy the sequences), unfreezes and waits until writes flow
//! again. Prints per-round figures and p50/p95 of
//! (a) the DB-side window: freeze start → sequences copied, and
//! (b) the longest gap between successful commits the load generator saw around the round
//!     (the window plus unfreeze and reconnect — the stand-in for the switch),
//! and the baseline: the longest gap between commits in equally long windows without a freeze,
//! measured in the same run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_operator::api::FreezeMethod;
use cutover_operator::postgres::freeze::{self, FreezeConfig};
use cutover_operator::postgres::replication::{self, Names, TableSelection};
use cutover_operator::postgres::{ConnectOptions, Dsn, connect, sync};
use cutover_tests::workload::{self, Load, LoadConfig};
use cutover_tests::{BlueGreen, wait_until};

const ROLE: &str = "bench_app";
const PASSWORD: &str = "bench";
const ACCOUNTS: i64 = 1_000;

fn percentile(values: &[Duration], p: f64) -> Duration {
    let mut v = values.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.first().map_or(Ok(12), |a| a.parse())?;
    let tps: f64 = args.get(1).map_or(Ok(500.0), |a| a.parse())?;
    let clients: usize = args.get(2).map_or(Ok(4), |a| a.parse())?;

    let bg = BlueGreen::start_with(
        cutover_tests::bench_builder("blue"),
        cutover_tests::bench_builder("green"),
    )?;
    eprintln!("{}", cutover_tests::versions_of(&bg));
    for c in [&bg.blue, &bg.green] {
        c.create_role(ROLE, PASSWORD, "LOGIN")?;
        c.execute("app", workload::SCHEMA)?;
        c.execute("app", &workload::grants(ROLE))?;
    }
    bg.blue.execute("app", &workload::seed(ACCOUNTS, 1_000))?;
    let opts = ConnectOptions::default();
    let blue = connect(&Dsn::new(bg.blue_dsn()), &opts).await?;
    let green = connect(&Dsn::new(bg.green_dsn()), &opts).await?;
    let names = Names::for_cutover("bench/freeze-window");
    replication::ensure_publication(&blue, &names, &TableSelection::All).await?;
    replication::ensure_subscription(&blue, &green, &names, &Dsn::new(bg.blue_dsn())).await?;
    replication::wait_ready(&green, &names, Instant::now() + Duration::from_secs(60)).await?;

    let load = Load::start(LoadConfig {
        dsn: bg.blue.dsn(ROLE, PASSWORD, "app"),
        clients,
        tps,
        accounts: ACCOUNTS,
    });
    // Warm up: two seconds of load.
    let warm = Instant::now();
    wait_until("the load warmed up", Duration::from_secs(30), || {
        warm.elapsed() >= Duration::from_secs(2)
    })
    .await?;
    let measured_from = Instant::now();
    let commits_before = load.commits();

    // Baseline: longest gap between commits in 1-second windows without a freeze.
    let mut baseline = Vec::new();
    for _ in 0..rounds {
        let from = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        baseline.push(load.snapshot().longest_gap(from, Instant::now()));
    }

    let cfg = FreezeConfig {
        tables: Vec::new(),
        cutover_id: "bench/freeze-window".into(),
        method: FreezeMethod::ReadOnly,
        roles: vec![ROLE.into()],
        drain_timeout: Duration::from_secs(5),
    };
    println!(
        "round  lag_at_freeze_B  freeze_ms  drain_ms  apply_wait_ms  seq_copy_ms  db_window_ms  unfreeze_ms  write_gap_ms"
    );
    let (mut windows, mut gaps) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        // Lag ≤ 1 MiB at the freeze.
        let mut lag = replication::lag(&blue, &names).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while lag.bytes.is_none_or(|b| b > 1 << 20) {
            if Instant::now() >= deadline {
                bail!("lag stayed at {lag:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            lag = replication::lag(&blue, &names).await?;
        }
        let t0 = Instant::now();
        let frozen = freeze::freeze(&blue, &cfg).await.context("freeze")?;
        let t_frozen = Instant::now();
        let fs = sync::final_sync(
            &blue,
            &green,
            &names,
            Instant::now() + Duration::from_secs(30),
        )
        .await
        .context("final sync")?;
        let window = t0.elapsed();
        let t_unfreeze = Instant::now();
        freeze::unfreeze(&blue, &cfg.cutover_id)
            .await
            .context("unfreeze")?;
        let unfreeze = t_unfreeze.elapsed();
        wait_until("writes resumed", Duration::from_secs(30), || {
            load.commits_since(t_unfreeze) >= 20
        })
        .await?;
        let gap = load.snapshot().longest_gap(t0, t_unfreeze);
        println!(
            "{round:>5}  {:>15}  {:>9}  {:>8}  {:>13}  {:>11}  {:>12}  {:>11}  {:>12}",
            lag.bytes.unwrap_or_default(),
            ms(t_frozen - t0),
            ms(frozen.drain),
            ms(fs.wait),
            ms(fs.sequence_copy),
            ms(window),
            ms(unfreeze),
            ms(gap)
        );
        windows.push(window);
        gaps.push(gap);
        // Let the load run undisturbed for a moment between rounds.
        let settle = Instant::now();
        wait_until("the load settled", Duration::from_secs(30), || {
            settle.elapsed() >= Duration::from_millis(500)
        })
        .await?;
    }
    let report = load.stop().await;
    let elapsed = measured_from.elapsed().as_secs_f64();
    let achieved = (report.commits.len() - commits_before) as f64 / elapsed;
    println!();
    println!(
        "rounds {rounds}, target {tps} tps over {clients} clients, achieved {achieved:.0} tps"
    );
    println!(
        "(a) DB-side window (freeze → final sync → sequences copied): p50 {} ms, p95 {} ms, max {} ms",
        ms(percentile(&windows, 50.0)),
        ms(percentile(&windows, 95.0)),
        ms(percentile(&windows, 100.0))
    );
    println!(
        "(b) longest gap between successful writes around a round:    p50 {} ms, p95 {} ms, max {} ms",
        ms(percentile(&gaps, 50.0)),
        ms(percentile(&gaps, 95.0)),
        ms(percentile(&gaps, 100.0))
    );
    let base95 = percentile(&baseline, 95.0);
    println!(
        "baseline: longest gap in a 1 s window without a freeze:        p50 {} ms, p95 {} ms",
        ms(percentile(&baseline, 50.0)),
        ms(base95)
    );
    println!(
        "ratio (b) p95 / baseline p95: {:.1}x",
        percentile(&gaps, 95.0).as_secs_f64() / base95.as_secs_f64().max(1e-6)
    );
    let errors: Vec<String> = report
        .errors
        .iter()
        .map(|(e, n)| format!("{n}× {e}"))
        .collect();
    println!("errors seen by the load generator: {}", errors.join("; "));
    cutover_operator::postgres::cleanup::cleanup(Some(&blue), Some(&green), &names).await?;
    Ok(())
}
