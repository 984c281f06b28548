//! Write freeze against database size: a pgbench database at two sizes, pgbench writing to blue
//! at a fixed rate throughout, the whole sequence driven by the engine (the code path of
//! `cutover run` and the operator) in Rehearsal mode, with `verification.mode: Online` and, in
//! the same run, `InFreeze` (every row hashed inside the freeze) for comparison.
//!
//! `cargo run --release -p cutover-tests --bin bench_online_freeze -- [small_scale] [large_scale]
//! [rounds] [tps]` (defaults 14, 140, 3, 200; pgbench scale 140 is about 2.1 GB).
//!
//! Per size: one blue/green pair, `pgbench -i` on blue, the same tables (no rows) on green.
//! Each round empties green's tables, starts `pgbench -R tps` against blue, and runs a
//! rehearsal (initial copy, online verification, freeze, final sync, verification, unfreeze).
//! It prints the write freeze the engine recorded (`status.writeFreezeSeconds`), the Verifying
//! step, the online pass and its time per GB, the changed keys compared inside the freeze, and
//! the CPU seconds blue's backends spent on verification (sampled from `/proc` for the sessions
//! of the online verifier, or of the in-freeze verifier).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cutover_operator::api::units::parse_timestamp;
use cutover_operator::api::{
    Approval, DatabaseCutover, DatabaseCutoverSpec, DatabaseCutoverStatus, FreezeMethod, Mode,
    Phase, VerificationMode,
};
use cutover_operator::engine::{Engine, Watch, drive};
use cutover_operator::platform::LocalPlatform;
use cutover_tests::{BlueGreen, PgCluster};

fn spec(mode: VerificationMode) -> Result<DatabaseCutoverSpec> {
    let text = include_str!("../../../cutover-plans/production-with-rollback.yaml");
    let mut spec = serde_saphyr::from_str::<DatabaseCutover>(text)?.spec;
    spec.mode = Mode::Rehearsal;
    spec.application_roles = vec![];
    spec.freeze.method = FreezeMethod::Strict;
    spec.freeze.drain_timeout = "5s".into();
    spec.replication.max_lag_before_freeze = "1MiB".into();
    spec.replication.reverse_for_rollback = false;
    spec.rollback = None;
    spec.point_of_no_return.approval = Approval::Automatic;
    spec.schedule.freeze_at = None;
    spec.schedule.hypercare = "0s".into();
    spec.schedule.checkpoints = vec![];
    spec.switch.restart = vec![];
    spec.verification.mode = mode;
    Ok(spec)
}

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

fn pgbench(cluster: &PgCluster) -> Command {
    let mut c = Command::new(cluster.bin_dir().join("pgbench"));
    c.env("PGPASSWORD", cluster.password())
        .args(["-h", cluster.host(), "-p", &cluster.port().to_string()])
        .args(["-U", "postgres"]);
    c
}

fn run(mut c: Command, what: &str) -> Result<()> {
    let out = c.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// CPU seconds of blue's backends whose `application_name` is `app`, sampled every 100 ms
/// (a backend's last sample counts once it has gone).
struct CpuSampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<i32, f64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CpuSampler {
    fn start(cluster: &PgCluster, app: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<HashMap<i32, f64>>> = Arc::default();
        let dsn = cluster.superuser_dsn(BlueGreen::DATABASE);
        let (s, m) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut client = postgres_sync(&dsn).ok();
            while !s.load(Ordering::SeqCst) {
                // The freeze ends every session that predates it, this one included.
                if client.as_ref().is_none_or(|c| c.client.is_closed()) {
                    client = postgres_sync(&dsn).ok();
                }
                if let Some(client) = client.as_mut()
                    && let Ok(rows) = client.query(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                        &[&app],
                    )
                {
                    for row in rows {
                        let pid: i32 = row.get(0);
                        if let Some(cpu) = cpu_seconds(pid) {
                            m.lock().unwrap().insert(pid, cpu);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn total(mut self) -> f64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen.lock().unwrap().values().sum()
    }
}

fn postgres_sync(dsn: &str) -> Result<SyncClient> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (client, conn) = rt.block_on(tokio_postgres::connect(dsn, tokio_postgres::NoTls))?;
    rt.spawn(conn);
    Ok(SyncClient { rt, client })
}

struct SyncClient {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl SyncClient {
    fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        self.rt.block_on(self.client.query(sql, params))
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS: f64 = 100.0;

fn cpu_seconds(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS)
}

struct RoundResult {
    freeze: f64,
    freezing: f64,
    final_sync: f64,
    verifying: f64,
    online_pass: Option<f64>,
    keys_in_freeze: Option<i64>,
    rows_in_freeze: i64,
    cpu: f64,
}

async fn round(
    bg: &BlueGreen,
    mode: VerificationMode,
    tps: u32,
    dir: &std::path::Path,
) -> Result<RoundResult> {
    bg.green.execute(
        BlueGreen::DATABASE,
        "TRUNCATE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history",
    )?;
    let mut load: Child = pgbench(&bg.blue)
        .args([
            "-n",
            "-R",
            &tps.to_string(),
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            "100000",
        ])
        .arg(BlueGreen::DATABASE)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start pgbench")?;
    let app = match mode {
        VerificationMode::Online => "cutover-online-verify",
        VerificationMode::InFreeze => "cutover-verify",
    };
    let sampler = CpuSampler::start(&bg.blue, app);
    let dbs = cutover_tests::databases(bg);
    let platform = LocalPlatform {
        secret_file: Some(dir.join("DATABASE_URL")),
        rehearsal_secret_file: None,
    };
    let engine = Engine::new(
        "bench/online-freeze",
        cutover_operator::api::ValidSpec::new(spec(mode)?)?,
        dbs,
        platform,
    );
    let mut last_retry = String::new();
    let mut last = std::time::Instant::now();
    let mut watch = Watch(
        |s: &DatabaseCutoverStatus, a: &cutover_operator::plan::Action| {
            if std::env::var_os("BENCH_DEBUG").is_some() && s.frozen_at.is_some() {
                eprintln!("{:>8.3}s {} {a:?}", last.elapsed().as_secs_f64(), s.phase);
            }
            last = std::time::Instant::now();
            if let Some(r) = &s.retry
                && r.message != last_retry
            {
                eprintln!("retrying in {}: {}", s.phase, r.message);
                last_retry = r.message.clone();
            }
        },
    );
    let status = drive(&engine, DatabaseCutoverStatus::default(), &mut watch).await;
    let cpu = sampler.total();
    let _ = load.kill();
    let _ = load.wait();
    let status = status.context("drive the rehearsal")?;
    if status.phase != Phase::Completed {
        bail!("the rehearsal ended {}: {:?}", status.phase, status.message);
    }
    let v = status.verification.clone().unwrap_or_default();
    if !v.matched {
        bail!("verification did not match: {v:?}");
    }
    let online = status.online_verification.clone().unwrap_or_default();
    Ok(RoundResult {
        freeze: status.write_freeze_seconds.unwrap_or(f64::NAN),
        freezing: step_seconds(&status, Phase::Freezing),
        final_sync: step_seconds(&status, Phase::FinalSync),
        verifying: v.in_freeze_seconds.unwrap_or(f64::NAN),
        online_pass: online.pass_seconds,
        keys_in_freeze: v.keys_in_freeze,
        rows_in_freeze: online.rows_in_freeze,
        cpu,
    })
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let small: u32 = args.first().map_or(Ok(14), |a| a.parse())?;
    let large: u32 = args.get(1).map_or(Ok(140), |a| a.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(3), |a| a.parse())?;
    let tps: u32 = args.get(3).map_or(Ok(200), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    println!(
        "scale  size_MB  mode      round  freeze_s  freezing_s  final_sync_s  verify_in_freeze_s  online_pass_s  online_s_per_GB  keys_in_freeze  keyless_rows_in_freeze  blue_cpu_s"
    );
    let mut summary = Vec::new();
    for scale in [small, large] {
        let settings = |b: cutover_tests::pg::PgClusterBuilder| {
            b.setting("wal_receiver_status_interval", "1s")
                .setting("wal_retrieve_retry_interval", "200ms")
                .setting("max_wal_size", "4GB")
        };
        let bg = BlueGreen::start_with(
            settings(cutover_tests::bench_builder("blue")),
            settings(cutover_tests::bench_builder("green")),
        )?;
        eprintln!("{}", cutover_tests::versions_of(&bg));
        let mut init = pgbench(&bg.blue);
        init.args(["-i", "-q", "-s", &scale.to_string()])
            .arg(BlueGreen::DATABASE);
        run(init, "pgbench -i on blue")?;
        let mut schema = pgbench(&bg.green);
        schema
            .args(["-i", "-q", "-I", "dtp", "-s", &scale.to_string()])
            .arg(BlueGreen::DATABASE);
        run(schema, "pgbench -i -I dtp on green")?;
        // pgbench's history table has no key; it is only inserted into. Replication needs a
        // replica identity for it, and verification hashes it whole inside the freeze.
        for c in [&bg.blue, &bg.green] {
            c.execute(
                BlueGreen::DATABASE,
                "ALTER TABLE pgbench_history REPLICA IDENTITY FULL",
            )?;
        }
        let size: f64 = bg.blue.query(
            BlueGreen::DATABASE,
            "SELECT pg_database_size(current_database())",
        )?[0][0]
            .as_deref()
            .unwrap_or("0")
            .parse()?;
        let gb = size / 1e9;
        let mut freezes = Vec::new();
        let modes = std::iter::repeat_n(VerificationMode::Online, rounds)
            .chain(std::iter::once(VerificationMode::InFreeze));
        for (n, mode) in modes.enumerate() {
            let r = round(&bg, mode, tps, dir.path()).await?;
            if mode == VerificationMode::Online {
                freezes.push(r.freeze);
            }
            println!(
                "{scale:>5}  {:>7.0}  {:<8}  {:>5}  {:>8.3}  {:>10.3}  {:>12.3}  {:>17.3}  {:>13}  {:>15}  {:>14}  {:>22}  {:>10.2}",
                size / 1e6,
                format!("{mode:?}"),
                n + 1,
                r.freeze,
                r.freezing,
                r.final_sync,
                r.verifying,
                r.online_pass.map_or("-".into(), |p| format!("{p:.1}")),
                r.online_pass
                    .map_or("-".into(), |p| format!("{:.1}", p / gb)),
                r.keys_in_freeze.map_or("-".into(), |k| k.to_string()),
                if mode == VerificationMode::Online {
                    r.rows_in_freeze.to_string()
                } else {
                    "-".into()
                },
                r.cpu
            );
        }
        summary.push((
            scale,
            size,
            percentile(&freezes, 50.0),
            percentile(&freezes, 95.0),
        ));
    }
    println!();
    println!("scale  size_MB  online_freeze_p50_s  online_freeze_p95_s");
    for (scale, size, p50, p95) in &summary {
        println!("{scale:>5}  {:>7.0}  {p50:>19.3}  {p95:>19.3}", size / 1e6);
    }
    if let [(_, _, small, _), (_, _, large, _)] = summary.as_slice() {
        println!("freeze(large)/freeze(small), p50: {:.2}", large / small);
    }
    Ok(())
}
