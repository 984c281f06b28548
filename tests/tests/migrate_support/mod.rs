//! Shared set-up of the `migrate_*` tests: a cluster with a database `app`, a directory of
//! migration files, and runs of the library's `migrate` with its events collected.

#![allow(dead_code)] // each test file uses a different part

use std::path::Path;
use std::time::{Duration, Instant};

use cutover_operator::postgres::migrate::{
    self, Action, Event, MigrateError, MigrateOptions, MigrationSet, Outcome, files,
};
use cutover_operator::postgres::{ConnectOptions, Dsn};
use cutover_tests::PgCluster;
use tempfile::TempDir;
use tokio::sync::mpsc;

pub const DB: &str = "app";

pub struct Bed {
    pub pg: PgCluster,
    pub dir: TempDir,
}

impl Bed {
    pub fn start() -> Self {
        let pg = PgCluster::start().unwrap();
        pg.create_database(DB).unwrap();
        Self {
            pg,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn dsn(&self) -> Dsn {
        Dsn::new(format!("{}?sslmode=disable", self.pg.superuser_dsn(DB)))
    }

    pub fn write(&self, name: &str, sql: &str) {
        std::fs::write(self.dir.path().join(name), sql).unwrap();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).unwrap();
    }

    pub fn set(&self) -> MigrationSet {
        files::load_dir(self.dir.path()).unwrap()
    }

    pub async fn run(&self, action: Action) -> Result<Outcome, MigrateError> {
        self.run_with(action, fast_options()).await
    }

    pub async fn run_with(
        &self,
        action: Action,
        opts: MigrateOptions,
    ) -> Result<Outcome, MigrateError> {
        run_in(self.dir.path(), &self.dsn(), action, opts).await
    }

    /// Rows of a query, as text.
    pub fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        self.pg.query(DB, sql).unwrap()
    }

    /// One value.
    pub fn value(&self, sql: &str) -> Option<String> {
        self.rows(sql)
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
    }

    /// `version|kind|success` for every history row, in order.
    pub fn history(&self) -> Vec<String> {
        self.rows(
            "SELECT version || '|' || kind || '|' || success FROM cutover_schema_history ORDER BY id",
        )
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect()
    }
}

pub async fn run_in(
    dir: &Path,
    dsn: &Dsn,
    action: Action,
    opts: MigrateOptions,
) -> Result<Outcome, MigrateError> {
    let set = files::load_dir(dir).unwrap();
    let connect = ConnectOptions {
        application_name: "cutover-migrate".into(),
        ..ConnectOptions::default()
    };
    migrate::migrate(dsn, &connect, &set, action, &opts).await
}

/// Options with short delays, so retries in tests take tenths of seconds.
pub fn fast_options() -> MigrateOptions {
    MigrateOptions {
        lock_timeout: Duration::from_millis(300),
        lock_retries: 2,
        lock_retry_delay: Duration::from_millis(100),
        report_blocked_after: Duration::from_millis(300),
        ..MigrateOptions::default()
    }
}

/// Options whose events arrive on the returned receiver.
pub fn observed_options() -> (MigrateOptions, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        MigrateOptions {
            events: Some(tx),
            ..fast_options()
        },
        rx,
    )
}

/// Receives events until one satisfies `pred`, failing the test after `timeout`.
pub async fn expect_event(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(e)) => seen.push(e.to_string()),
            Ok(None) => panic!("the run ended before {what}; events: {seen:#?}"),
            Err(_) => panic!("no event {what} within {timeout:?}; events: {seen:#?}"),
        }
    }
}

/// Polls `cond` until it holds, failing after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
