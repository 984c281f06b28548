//! Benchmark of `cutover verify` (issue 4) on two local clusters holding the same mixed-type
//! table. Prints:
//!
//! - (a) the render floor: one side's `SELECT sum(length(t::text)) FROM t`;
//! - (b) our verification's wall time (both sides, default options);
//! - (c) a naive verifier: stream every row (as text, in key order, through a cursor) from both
//!   sides at once and hash it in the client;
//! - (d) our verification with exactly one differing row (the bisection's cost);
//!
//! and the ratios against the goals (b) ≤ 1.3 × (a), (c) / (b) ≥ 3, (d) ≤ 1.1 × (b).
//!
//! ```text
//! cargo run --release -p cutover-tests --bin bench_verify -- [--rows N] [--parallelism P] [--runs R] [--shared-buffers SIZE]
//! ```
//! Default 4,000,000 rows (about 1 GB of heap per side); `CUTOVER_BENCH_ROWS` also sets it.
//! `--shared-buffers` (default `512MB`, smaller than the table: pages come from the OS cache)
//! set to `2GB` keeps the whole table in PostgreSQL's own buffers.

use std::hash::{DefaultHasher, Hasher as _};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use cutover_operator::postgres::Dsn;
use cutover_operator::postgres::verify::{VerifyOptions, verify};
use cutover_tests::{BlueGreen, PgCluster};

const TABLE_SQL: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE bench (
    id bigint PRIMARY KEY, name text, amount numeric(12, 2), ratio float8, created timestamptz,
    doc jsonb, tags int[], blob bytea, m mood, flag boolean, note text
);
INSERT INTO bench
SELECT g,
       'customer ' || g || ' ' || repeat(chr(97 + g % 26), g % 20),
       (g * 1.37)::numeric(12, 2),
       g / 7.0,
       timestamptz '2020-01-01 00:00:00+00' + g * interval '1.5 seconds',
       jsonb_build_object('a', g, 'b', 'value ' || g, 'c', g % 2 = 0),
       ARRAY[g, g + 1, g * 2],
       decode(md5(g::text), 'hex'),
       (enum_range(NULL::mood))[g % 3 + 1],
       g % 2 = 0,
       md5(g::text) || md5((g + 1)::text) || repeat(' lorem ipsum', g % 8)
  FROM generate_series(1, $ROWS) g;
";

struct Args {
    rows: u64,
    parallelism: usize,
    runs: usize,
    shared_buffers: String,
}

fn args() -> Result<Args> {
    let mut parsed = Args {
        rows: std::env::var("CUTOVER_BENCH_ROWS")
            .ok()
            .map(|v| v.parse())
            .transpose()
            .context("CUTOVER_BENCH_ROWS must be a number")?
            .unwrap_or(4_000_000),
        parallelism: VerifyOptions::default().parallelism,
        runs: 2,
        shared_buffers: "512MB".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().context("missing value");
        match arg.as_str() {
            "--rows" => parsed.rows = value()?.parse()?,
            "--parallelism" => parsed.parallelism = value()?.parse()?,
            "--runs" => parsed.runs = value()?.parse()?,
            "--shared-buffers" => parsed.shared_buffers = value()?,
            // `cargo bench` / `cargo test` pass these; nothing to do.
            "--bench" | "--test" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(parsed)
}

/// The best of `runs` timings of `f`.
async fn best<T, F, Fut>(runs: usize, mut f: F) -> Result<(Duration, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let out = f().await?;
        let took = start.elapsed();
        if best.as_ref().is_none_or(|(b, _)| took < *b) {
            best = Some((took, out));
        }
    }
    Ok(best.expect("at least one run"))
}

async fn floor(client: &tokio_postgres::Client) -> Result<i64> {
    let row = client
        .query_one("SELECT sum(length(t::text))::int8 FROM bench t", &[])
        .await?;
    Ok(row.get(0))
}

/// The naive way: every row to the client, hashed there, in key order through a cursor.
async fn naive_side(cluster: &PgCluster) -> Result<(u64, u64)> {
    let mut client = cluster.connect("app").await?;
    let tx = client.transaction().await?;
    let portal = tx
        .bind("SELECT t::text FROM bench t ORDER BY id", &[])
        .await?;
    let mut hasher = DefaultHasher::new();
    let mut rows = 0u64;
    loop {
        let batch = tx.query_portal(&portal, 10_000).await?;
        if batch.is_empty() {
            break;
        }
        for row in &batch {
            let text: &str = row.get(0);
            hasher.write(text.as_bytes());
            hasher.write_u8(0xff);
            rows += 1;
        }
    }
    tx.commit().await?;
    Ok((rows, hasher.finish()))
}

async fn naive(bg: &BlueGreen) -> Result<bool> {
    let (a, b) = tokio::try_join!(naive_side(&bg.blue), naive_side(&bg.green))?;
    Ok(a == b)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    eprintln!(
        "starting two clusters and loading {} rows on each…",
        args.rows
    );
    let builder = |side: &str| {
        cutover_tests::bench_builder(side)
            .setting("shared_buffers", &args.shared_buffers)
            .setting("max_parallel_workers_per_gather", "0")
            .setting("autovacuum", "off")
            .start_timeout(Duration::from_secs(120))
    };
    let bg = BlueGreen::start_with(builder("blue"), builder("green"))?;
    eprintln!("{}", cutover_tests::versions_of(&bg));
    let load = TABLE_SQL.replace("$ROWS", &args.rows.to_string());
    let started = Instant::now();
    // VACUUM sets hint bits and the visibility map, so no timed run pays for them.
    let fill = |cluster: &PgCluster| {
        cluster.execute("app", &load)?;
        cluster.execute("app", "VACUUM (FREEZE, ANALYZE) bench")
    };
    std::thread::scope(|s| -> Result<()> {
        let blue = s.spawn(|| fill(&bg.blue));
        let green = s.spawn(|| fill(&bg.green));
        blue.join().expect("load thread")?;
        green.join().expect("load thread")?;
        Ok(())
    })?;
    let size: String = bg
        .blue
        .query("app", "SELECT pg_size_pretty(pg_table_size('bench'))")?[0][0]
        .clone()
        .unwrap_or_default();
    eprintln!(
        "loaded in {:.1} s; table size {size} per side",
        started.elapsed().as_secs_f64()
    );

    let source = Dsn::new(bg.blue_dsn());
    let target = Dsn::new(bg.green_dsn());
    let options = VerifyOptions {
        parallelism: args.parallelism,
        ..VerifyOptions::default()
    };

    // Warm both sides' caches once.
    let blue = bg.blue.connect("app").await?;
    let green = bg.green.connect("app").await?;
    floor(&blue).await?;
    floor(&green).await?;

    let (a, _) = best(args.runs, || floor(&blue)).await?;
    eprintln!("(a) render floor: {:.2} s", secs(a));
    let (b, report) = best(args.runs, || async {
        Ok(verify(&source, &target, &options).await?)
    })
    .await?;
    if !report.matched {
        bail!(
            "identical tables reported different:\n{}",
            report.render_text()
        );
    }
    eprintln!("(b) verify: {:.2} s", secs(b));
    let (c, same) = best(1, || naive(&bg)).await?;
    if !same {
        bail!("the naive verifier saw a difference in identical tables");
    }
    eprintln!("(c) naive: {:.2} s", secs(c));

    let middle = args.rows / 2;
    bg.green.execute(
        "app",
        &format!("UPDATE bench SET note = note || 'x' WHERE id = {middle}"),
    )?;
    bg.green.execute("app", "VACUUM bench")?;
    let (d, report) = best(args.runs, || async {
        Ok(verify(&source, &target, &options).await?)
    })
    .await?;
    let differences: Vec<String> = report.mismatches();
    if differences != [format!("table public.bench: changed: id={middle}")] {
        bail!("expected exactly the changed row, got {differences:?}");
    }
    eprintln!("(d) verify, one differing row: {:.2} s", secs(d));

    let chunks = report.tables[0].chunks;
    println!("rows per side:            {}", args.rows);
    println!("table size per side:      {size}");
    println!(
        "key ranges:               {chunks} (parallelism {}, shared_buffers {})",
        args.parallelism, args.shared_buffers
    );
    println!("(a) render floor:         {:>8.2} s", secs(a));
    println!("(b) verify (both sides):  {:>8.2} s", secs(b));
    println!("(c) naive client-side:    {:>8.2} s", secs(c));
    println!(
        "(d) verify, 1 row differs:{:>8.2} s  -> {differences:?}",
        secs(d)
    );
    let check = |ok: bool| if ok { "met" } else { "NOT met" };
    let ba = secs(b) / secs(a);
    let cb = secs(c) / secs(b);
    let db = secs(d) / secs(b);
    println!("(b)/(a) = {ba:.2}  (goal <= 1.3: {})", check(ba <= 1.3));
    println!("(c)/(b) = {cb:.2}  (goal >= 3:   {})", check(cb >= 3.0));
    println!("(d)/(b) = {db:.2}  (goal <= 1.1: {})", check(db <= 1.1));
    Ok(())
}
