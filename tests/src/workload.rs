//! A bank workload for replication tests and the freeze-window benchmark.
//!
//! Concurrent clients move money between accounts (the sum of balances never changes) and, in
//! the same transaction, append a `(client, seq)` row to `ledger`. A transaction counts as
//! *acknowledged* only when its `COMMIT` returned successfully; the report lists every
//! acknowledged `(client, seq)` and the instant of every successful commit, so a test can check
//! that nothing acknowledged was lost and a benchmark can measure the longest gap between
//! successful writes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

/// Schema of the workload (run on blue and green alike).
pub const SCHEMA: &str = "
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE ledger (
    id bigserial PRIMARY KEY,
    client int NOT NULL,
    seq bigint NOT NULL,
    amount bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (client, seq));
";

/// Fills `accounts` with `n` accounts of `balance` each (blue only).
pub fn seed(n: i64, balance: i64) -> String {
    format!("INSERT INTO accounts SELECT g, {balance} FROM generate_series(1, {n}) g;")
}

/// Grants the workload's role what it needs.
pub fn grants(role: &str) -> String {
    format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON accounts, ledger TO \"{role}\";
         GRANT USAGE ON SEQUENCE ledger_id_seq TO \"{role}\";"
    )
}

/// How the load runs.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Connection string of the application role.
    pub dsn: String,
    /// Concurrent clients (one connection each).
    pub clients: usize,
    /// Total transactions per second across clients; 0 for as fast as possible.
    pub tps: f64,
    /// Accounts `1..=accounts` exist.
    pub accounts: i64,
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Every acknowledged `(client, seq)`.
    pub acknowledged: Vec<(i32, i64)>,
    /// The instant of every successful commit, in order.
    pub commits: Vec<Instant>,
    /// Error messages seen, with counts.
    pub errors: BTreeMap<String, usize>,
}

impl LoadReport {
    /// The longest gap between consecutive successful commits within `[from, to]` (including
    /// the gaps from the last commit before `from` and to the first commit after `to`).
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let start = self
            .commits
            .partition_point(|t| *t < from)
            .saturating_sub(1);
        let end = (self.commits.partition_point(|t| *t <= to) + 1).min(self.commits.len());
        self.commits[start..end]
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Default)]
struct Shared {
    acknowledged: Vec<(i32, i64)>,
    commits: Vec<Instant>,
    errors: BTreeMap<String, usize>,
    /// Where each acknowledged write is also written, a line `client seq` (unbuffered).
    ack_log: Option<std::fs::File>,
}

/// A running workload, on its own tokio runtime: the clients' reconnects (SCRAM key derivation
/// is CPU-heavy in a debug build) must not stall the code under test on the caller's runtime.
pub struct Load {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Shared>>,
    tasks: Vec<JoinHandle<()>>,
    started: Instant,
}

impl std::fmt::Debug for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Load").finish_non_exhaustive()
    }
}

impl Load {
    /// Starts the clients on a runtime of their own (two worker threads).
    pub fn start(cfg: LoadConfig) -> Self {
        Self::spawn(cfg, None)
    }

    /// Like [`Load::start`], for an application that reads its connection string from
    /// `dsn_file` (as it would from a mounted Secret): each client reads the file when it
    /// connects and again after a failed write, and reconnects when the file names another
    /// server — the switch of a cutover, as the application sees it. `cfg.dsn` is unused.
    pub fn start_following(cfg: LoadConfig, dsn_file: std::path::PathBuf) -> Self {
        Self::spawn(cfg, Some(dsn_file))
    }

    /// Like [`start`](Self::start), with client ids from `first_client` on, so several loads
    /// can write the same ledger side by side (its `(client, seq)` is unique).
    pub fn start_from(cfg: LoadConfig, first_client: i32) -> Self {
        Self::spawn_from(cfg, None, first_client, None)
    }

    /// Like [`start_from`](Self::start_from), also writing every acknowledged write to
    /// `ack_log` as a line `client seq` the moment its `COMMIT` returns (one unbuffered write
    /// each): what a process that may be killed at any time has acknowledged, read by another.
    pub fn start_recording(cfg: LoadConfig, first_client: i32, ack_log: std::fs::File) -> Self {
        Self::spawn_from(cfg, None, first_client, Some(ack_log))
    }

    fn spawn(cfg: LoadConfig, dsn_file: Option<std::path::PathBuf>) -> Self {
        Self::spawn_from(cfg, dsn_file, 0, None)
    }

    fn spawn_from(
        cfg: LoadConfig,
        dsn_file: Option<std::path::PathBuf>,
        first_client: i32,
        ack_log: Option<std::fs::File>,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("workload")
            .enable_all()
            .build()
            .expect("building the workload's runtime");
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Shared {
            ack_log,
            ..Shared::default()
        }));
        let tasks = (0..cfg.clients)
            .map(|i| {
                let cfg = cfg.clone();
                let stop = stop.clone();
                let shared = shared.clone();
                let dsn_file = dsn_file.clone();
                runtime.spawn(async move {
                    let id = first_client + i32::try_from(i).unwrap_or(0);
                    client_loop(id, cfg, dsn_file, stop, shared).await
                })
            })
            .collect();
        Self {
            runtime: Some(runtime),
            stop,
            shared,
            tasks,
            started: Instant::now(),
        }
    }

    /// Successful commits so far.
    pub fn commits(&self) -> usize {
        self.shared.lock().unwrap().commits.len()
    }

    /// Successful commits after `t`.
    pub fn commits_since(&self, t: Instant) -> usize {
        let s = self.shared.lock().unwrap();
        s.commits.len() - s.commits.partition_point(|c| *c <= t)
    }

    /// The instant of the last successful commit.
    pub fn last_commit(&self) -> Option<Instant> {
        self.shared.lock().unwrap().commits.last().copied()
    }

    /// When the load started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// A copy of what was seen so far.
    pub fn snapshot(&self) -> LoadReport {
        let s = self.shared.lock().unwrap();
        LoadReport {
            acknowledged: s.acknowledged.clone(),
            commits: s.commits.clone(),
            errors: s.errors.clone(),
        }
    }

    /// Stops the clients and returns what they saw.
    pub async fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let s = std::mem::take(&mut *self.shared.lock().unwrap());
        drop(s.ack_log);
        LoadReport {
            acknowledged: s.acknowledged,
            commits: s.commits,
            errors: s.errors,
        }
    }
}

/// A small xorshift generator: deterministic per client, no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: i64) -> i64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        i64::try_from(self.0 % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }
}

async fn client_loop(
    id: i32,
    cfg: LoadConfig,
    dsn_file: Option<std::path::PathBuf>,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Shared>>,
) {
    // The connection string in use: the file's content when following one.
    let current_dsn = || match &dsn_file {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| cfg.dsn.clone()),
        None => cfg.dsn.clone(),
    };
    let mut dsn = current_dsn();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((u64::try_from(id).unwrap_or(0) + 1) * 0x1000_0001));
    let interval = if cfg.tps > 0.0 {
        Duration::from_secs_f64(cfg.clients as f64 / cfg.tps)
    } else {
        Duration::ZERO
    };
    let mut next = Instant::now()
        + interval
            .mul_f64(f64::from(id.rem_euclid(cfg.clients.max(1) as i32)) / cfg.clients as f64);
    let mut seq: i64 = 0;
    let mut conn: Option<(tokio_postgres::Client, Statements)> = None;
    let note = |msg: String| {
        *shared.lock().unwrap().errors.entry(msg).or_default() += 1;
    };
    while !stop.load(Ordering::SeqCst) {
        if conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            dsn = current_dsn();
            match connect(&dsn).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    note(message(&e));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let (client, statements) = conn.as_mut().expect("connected above");
        if !interval.is_zero() {
            let now = Instant::now();
            if next > now {
                tokio::time::sleep(next - now).await;
            }
            next = next.max(now - interval * 4) + interval;
        }
        seq += 1;
        let a = 1 + rng.below(cfg.accounts);
        let mut b = 1 + rng.below(cfg.accounts - 1);
        if b >= a {
            b += 1;
        }
        let amount = 1 + rng.below(100);
        match transfer(client, statements, id, seq, a, b, amount).await {
            Ok(()) => {
                let mut s = shared.lock().unwrap();
                s.acknowledged.push((id, seq));
                s.commits.push(Instant::now());
                if let Some(log) = s.ack_log.as_mut() {
                    use std::io::Write;
                    log.write_all(format!("{id} {seq}\n").as_bytes())
                        .expect("write the acknowledgement log");
                }
            }
            Err(e) => {
                note(message(&e));
                let read_only = e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION);
                if !read_only || (dsn_file.is_some() && current_dsn() != dsn) {
                    conn = None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// The workload's statements, prepared once per connection.
struct Statements {
    update: tokio_postgres::Statement,
    insert: tokio_postgres::Statement,
}

async fn connect(dsn: &str) -> Result<(tokio_postgres::Client, Statements), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let update = client
        .prepare("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
        .await?;
    let insert = client
        .prepare("INSERT INTO ledger (client, seq, amount) VALUES ($1, $2, $3)")
        .await?;
    Ok((client, Statements { update, insert }))
}

async fn transfer(
    client: &mut tokio_postgres::Client,
    statements: &Statements,
    id: i32,
    seq: i64,
    from: i64,
    to: i64,
    amount: i64,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // Lower id first: no deadlocks between clients.
    let (first, second, sign) = if from < to {
        (from, to, -1)
    } else {
        (to, from, 1)
    };
    let (first, second) = (
        i32::try_from(first).unwrap_or(1),
        i32::try_from(second).unwrap_or(2),
    );
    tx.execute(&statements.update, &[&first, &(sign * amount)])
        .await?;
    tx.execute(&statements.update, &[&second, &(-sign * amount)])
        .await?;
    tx.execute(&statements.insert, &[&id, &seq, &amount])
        .await?;
    tx.commit().await
}

fn message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    }
}
