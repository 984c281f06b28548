//! The initial copy, side by side: the subscription's own copy (`initialCopy: Native`), the
//! operator's parallel copy (`initialCopy: Parallel`) and `pgcopydb clone` (Debian's package),
//! on the same pgbench database plus a table of mixed types, the same two clusters, rounds
//! interleaved.
//!
//! `cargo run --release -p cutover-tests --bin bench_initial_copy -- [scale] [rounds] [jobs]
//! [mixed_rows]` (defaults 60, 3, 4, 1000000).
//!
//! What is timed is how long until green holds all the data with its indexes:
//! - Native and Parallel: from the first step of Replicating (the engine, the code path of
//!   `cutover run` and the operator) until every table of the subscription is ready. Native's
//!   indexes are in place during the copy; Parallel builds green's secondary indexes after it and
//!   creates the subscription only then. Green's database is created afresh each round with
//!   blue's schema (`pg_dump --schema-only`), not timed.
//! - pgcopydb: `pgcopydb clone --table-jobs J --index-jobs J --split-tables-larger-than 256MB
//!   --skip-vacuum` into an empty database, the whole run (its schema restore included, about a
//!   second). Its database is dropped right after.
//!
//! Blue is vacuumed (`FREEZE, ANALYZE`) once after loading, and both servers checkpoint before
//! each run, so no run pays for another's hint bits or checkpoint.
//!
//! It also prints the CPU seconds each server spent in each run (the postmaster's own and its
//! reaped children's times, plus those of its children still alive, from `/proc`) and the
//! client's: this process (the engine, whose copy relays the rows) or pgcopydb's processes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cutover_operator::api::{
    Approval, DatabaseCutover, DatabaseCutoverSpec, DatabaseCutoverStatus, FreezeMethod,
    InitialCopy, Mode, Phase,
};
use cutover_operator::engine::{Engine, NoSink};
use cutover_operator::platform::LocalPlatform;
use cutover_tests::{BlueGreen, PgCluster};

const MIXED: &str = "
CREATE TABLE mixed (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    doc jsonb,
    amount numeric(14, 2),
    at timestamptz,
    tags text[],
    blob bytea,
    flag boolean
);
CREATE INDEX mixed_name_idx ON mixed (name);
CREATE INDEX mixed_at_idx ON mixed (at);
";

fn mixed_rows(n: u64) -> String {
    format!(
        "INSERT INTO mixed
         SELECT g, md5(g::text), jsonb_build_object('k', g, 'v', md5(g::text), 'n', g % 97),
                g * 1.25, timestamptz '2026-01-01' - g * interval '1 second',
                ARRAY[md5(g::text), 'x'],
                CASE WHEN g % 100 = 0 THEN convert_to(repeat(md5(g::text), 300), 'UTF8')
                     ELSE convert_to(md5(g::text), 'UTF8') END,
                g % 2 = 0
           FROM generate_series(1, {n}) g;
         ANALYZE mixed;"
    )
}

fn spec(copy: InitialCopy, jobs: i32) -> Result<DatabaseCutoverSpec> {
    let text = include_str!("../../../cutover-plans/production-with-rollback.yaml");
    let mut spec = serde_saphyr::from_str::<DatabaseCutover>(text)?.spec;
    spec.mode = Mode::Rehearsal;
    spec.application_roles = vec![];
    spec.freeze.method = FreezeMethod::Strict;
    spec.replication.reverse_for_rollback = false;
    spec.replication.initial_copy = copy;
    spec.replication.copy_parallelism = jobs;
    spec.replication.copy_split_size = "256MiB".into();
    spec.rollback = None;
    spec.point_of_no_return.approval = Approval::Automatic;
    spec.schedule.freeze_at = None;
    spec.schedule.checkpoints = vec![];
    spec.switch.restart = vec![];
    Ok(spec)
}

fn tool(cluster: &PgCluster, name: &str) -> Command {
    let mut c = Command::new(cluster.bin_dir().join(name));
    c.env("PGPASSWORD", cluster.password())
        .args(["-h", cluster.host(), "-p", &cluster.port().to_string()])
        .args(["-U", "postgres"]);
    c
}

fn run(mut c: Command, what: &str) -> Result<String> {
    let out = c.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS: f64 = 100.0;

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// CPU seconds of a server so far: the postmaster's own and reaped children's, plus its live
/// children's.
fn server_cpu(cluster: &PgCluster) -> f64 {
    let Some(pm) = cluster.pid() else {
        return f64::NAN;
    };
    let field = |f: &[String], i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    let mut ticks = 0.0;
    if let Some(f) = stat_fields(pm) {
        // After the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
        ticks += (11..=14).filter_map(|i| field(&f, i)).sum::<f64>();
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(f) = stat_fields(pid)
                && field(&f, 1) == Some(f64::from(pm))
            {
                ticks += (11..=12).filter_map(|i| field(&f, i)).sum::<f64>();
            }
        }
    }
    ticks / TICKS
}

/// CPU seconds of this process and its reaped children (pgcopydb) so far.
fn own_cpu() -> f64 {
    let Some(f) = stat_fields(std::process::id()) else {
        return f64::NAN;
    };
    (11..=14)
        .filter_map(|i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>()
        / TICKS
}

/// Drops and creates green's database `db` (empty).
fn fresh_database(green: &PgCluster, db: &str) -> Result<()> {
    green.execute(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    )?;
    green.create_database(db)
}

/// Blue's schema into green's `app` database, afresh.
fn schema_to_green(bg: &BlueGreen, dir: &std::path::Path) -> Result<()> {
    fresh_database(&bg.green, BlueGreen::DATABASE)?;
    let file = dir.join("schema.sql");
    let mut dump = tool(&bg.blue, "pg_dump");
    dump.args([
        "--schema-only",
        "--no-publications",
        "--no-subscriptions",
        "-f",
    ])
    .arg(&file)
    .arg(BlueGreen::DATABASE);
    run(dump, "pg_dump --schema-only of blue")?;
    let mut restore = tool(&bg.green, "psql");
    restore
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&file)
        .arg(BlueGreen::DATABASE);
    run(restore, "psql of the schema on green")?;
    Ok(())
}

/// Runs the engine through preflight and Replicating until every table of the subscription is
/// ready; returns the seconds from the first step of Replicating.
async fn engine_copy(
    bg: &BlueGreen,
    copy: InitialCopy,
    jobs: i32,
    dir: &std::path::Path,
) -> Result<f64> {
    let platform = LocalPlatform {
        secret_file: Some(dir.join("DATABASE_URL")),
        rehearsal_secret_file: None,
    };
    let engine = Engine::new(
        "bench/initial-copy",
        cutover_operator::api::ValidSpec::new(spec(copy, jobs)?)?,
        cutover_tests::databases(bg),
        platform,
    );
    let mut status = DatabaseCutoverStatus::default();
    let mut started: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        if status.phase == Phase::Replicating && started.is_none() {
            started = Some(Instant::now());
        }
        // Green's own catalog says when every table is ready (the engine's next step would
        // first gather statistics).
        if started.is_some() && subscription_ready(&bg.green)? {
            break;
        }
        if status.phase.is_terminal()
            || status.phase == Phase::Aborting
            || Instant::now() > deadline
        {
            bail!("the copy ended {}: {:?}", status.phase, status.message);
        }
        if let Some(r) = &status.retry {
            eprintln!("retrying: {}", r.message);
        }
        let step = engine.step(&status, false, &mut NoSink).await?;
        if std::env::var_os("BENCH_DEBUG").is_some() {
            eprintln!(
                "  {:>7.3} s {:?}",
                started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
                step.action
            );
        }
        status = step.status;
        if status.phase == Phase::Replicating {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let seconds = started.map_or(f64::NAN, |s| s.elapsed().as_secs_f64());
    if let Some(c) = status
        .replication
        .as_ref()
        .and_then(|r| r.initial_copy.as_ref())
    {
        eprintln!(
            "  parallel copy: {} rows, {} MB streamed, {} tables, {} indexes built after; \
             slot {:?} s, rows {:?} s, indexes {:?} s",
            c.rows_copied,
            c.bytes_copied / 1_000_000,
            c.tables_total,
            c.indexes_total,
            c.slot_seconds,
            c.copy_seconds,
            c.index_seconds
        );
    }
    // Replication objects go (green's database is dropped next round anyway).
    engine.undo(&status).await?;
    Ok(seconds)
}

/// Every table of green's subscription is ready (copied and streaming).
fn subscription_ready(green: &PgCluster) -> Result<bool> {
    let row = green.query(
        BlueGreen::DATABASE,
        "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel",
    )?;
    Ok(row[0][0].as_deref() == Some("t"))
}

fn pgcopydb(bg: &BlueGreen, jobs: i32, dir: &std::path::Path) -> Result<f64> {
    fresh_database(&bg.green, "pgcopydb_target")?;
    let work = dir.join("pgcopydb");
    let _ = std::fs::remove_dir_all(&work);
    let started = Instant::now();
    let out = Command::new("pgcopydb")
        .args(["clone", "--source"])
        .arg(bg.blue.superuser_dsn(BlueGreen::DATABASE))
        .arg("--target")
        .arg(bg.green.superuser_dsn("pgcopydb_target"))
        .args([
            "--table-jobs",
            &jobs.to_string(),
            "--index-jobs",
            &jobs.to_string(),
        ])
        .args([
            "--split-tables-larger-than",
            "256MB",
            "--skip-vacuum",
            "--dir",
        ])
        .arg(&work)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bg.blue.bin_dir().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdout(Stdio::null())
        .output()
        .context("run pgcopydb (apt-get install pgcopydb)")?;
    let seconds = started.elapsed().as_secs_f64();
    // Its database goes at once: autovacuum working through it would slow the next run.
    fresh_database(&bg.green, "pgcopydb_target")?;
    if !out.status.success() {
        let log = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        bail!(
            "pgcopydb clone failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(seconds)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scale: u32 = args.first().map_or(Ok(60), |a| a.parse())?;
    let rounds: usize = args.get(1).map_or(Ok(3), |a| a.parse())?;
    let jobs: i32 = args.get(2).map_or(Ok(4), |a| a.parse())?;
    let mixed: u64 = args.get(3).map_or(Ok(1_000_000), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let settings = |b: cutover_tests::pg::PgClusterBuilder| {
        b.setting("wal_receiver_status_interval", "1s")
            .setting("wal_retrieve_retry_interval", "200ms")
            .setting("max_wal_size", "8GB")
            .setting("checkpoint_timeout", "30min")
            .setting("maintenance_work_mem", "256MB")
            .setting("max_sync_workers_per_subscription", jobs.to_string())
            .setting("max_logical_replication_workers", (jobs + 4).to_string())
            .setting("max_worker_processes", (jobs + 12).to_string())
    };
    let bg = BlueGreen::start_with(
        settings(cutover_tests::bench_builder("blue")),
        settings(cutover_tests::bench_builder("green")),
    )?;
    eprintln!("{}", cutover_tests::versions_of(&bg));
    let mut init = tool(&bg.blue, "pgbench");
    init.args(["-i", "-q", "-s", &scale.to_string()])
        .arg(BlueGreen::DATABASE);
    run(init, "pgbench -i on blue")?;
    bg.blue.execute(BlueGreen::DATABASE, MIXED)?;
    bg.blue.execute(BlueGreen::DATABASE, &mixed_rows(mixed))?;
    // pgbench's history table has no key; replication needs a replica identity for it.
    bg.blue.execute(
        BlueGreen::DATABASE,
        "ALTER TABLE pgbench_history REPLICA IDENTITY FULL",
    )?;
    // Every run reads blue as it will stay: hint bits set, statistics current.
    bg.blue
        .execute(BlueGreen::DATABASE, "VACUUM (FREEZE, ANALYZE)")?;
    let size_mb: f64 = bg.blue.query(
        BlueGreen::DATABASE,
        "SELECT pg_database_size(current_database()) / 1e6",
    )?[0][0]
        .as_deref()
        .unwrap_or("0")
        .parse()?;
    println!("# scale {scale} + mixed {mixed} rows: blue's database {size_mb:.0} MB, {jobs} jobs");
    println!("round  method    seconds  blue_cpu_s  green_cpu_s  client_cpu_s");
    let mut times: [Vec<f64>; 3] = Default::default();
    let mut cpus: [Vec<f64>; 3] = Default::default();
    let only = std::env::var("BENCH_METHODS").unwrap_or_default();
    for round in 1..=rounds {
        for (i, method) in ["native", "parallel", "pgcopydb"].iter().enumerate() {
            if !only.is_empty() && !only.split(',').any(|m| m == *method) {
                continue;
            }
            if i < 2 {
                schema_to_green(&bg, dir.path())?;
            }
            // No checkpoint left over from the previous run lands in this one.
            for c in [&bg.blue, &bg.green] {
                c.execute("postgres", "CHECKPOINT")?;
            }
            let before = server_cpu(&bg.blue);
            let green_before = server_cpu(&bg.green);
            let own_before = own_cpu();
            let seconds = match i {
                0 => engine_copy(&bg, InitialCopy::Native, jobs, dir.path()).await?,
                1 => engine_copy(&bg, InitialCopy::Parallel, jobs, dir.path()).await?,
                _ => pgcopydb(&bg, jobs, dir.path())?,
            };
            let cpu = server_cpu(&bg.blue) - before;
            let green_cpu = server_cpu(&bg.green) - green_before;
            // pgcopydb's own process is a child of this one (reaped: counted in cutime).
            let own = own_cpu() - own_before;
            println!(
                "{round:>5}  {method:<8}  {seconds:>7.2}  {cpu:>10.2}  {green_cpu:>11.2}  {own:>12.2}"
            );
            times[i].push(seconds);
            cpus[i].push(cpu);
        }
    }
    println!("# medians over {rounds} rounds");
    for (i, method) in ["native", "parallel", "pgcopydb"].iter().enumerate() {
        println!(
            "# {method:<8} {:>7.2} s  blue CPU {:>6.2} s",
            median(&times[i]),
            median(&cpus[i])
        );
    }
    println!(
        "# parallel / pgcopydb = {:.2}; parallel / native = {:.2}",
        median(&times[1]) / median(&times[2]),
        median(&times[1]) / median(&times[0])
    );
    Ok(())
}
