//! `cutover migrate`: plan (pure) and apply under the advisory lock.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use thiserror::Error;
use tokio_postgres::Client;
use tokio_postgres::error::{ErrorPosition, SqlState};

use super::files::{MigrationSet, Script, Version};
use super::history::{History, HistoryTable};
use super::sql_text::{self, ConcurrentIndex, Special, TokenKind};
use super::{Backend, Event, IndexAction, MigrateOptions};
use crate::postgres::{ConnectError, ConnectOptions, Dsn, connect, quote_qualified};

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Apply every pending versioned file.
    Apply,
    /// Only say what [`Action::Apply`] would do (no lock taken, nothing written).
    DryRun,
    /// Run the rollback scripts of every applied version above this one, newest first.
    RollbackTo(Version),
    /// Only say what [`Action::RollbackTo`] would do.
    DryRunRollbackTo(Version),
}

/// One file to run.
#[derive(Clone, Debug)]
pub struct Step {
    /// The file.
    pub script: Script,
}

/// What a run did (or, for a dry run, would do).
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Files run (or to run), in order.
    pub steps: Vec<Step>,
    /// The current version afterwards (for a dry run: now).
    pub version: Option<String>,
    /// Applied versions whose file is no longer in the directory.
    pub missing_files: Vec<String>,
}

/// Why a run stopped.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// No connection.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A statement of the runner itself failed.
    #[error("failed to {what}: {source}")]
    Sql {
        /// What the runner was doing.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// An applied file was edited.
    #[error(
        "failed to validate {file}: version {version} was applied with checksum {applied}, but the file now has checksum {current}; an applied migration must not change — restore the file and put the change in a new version"
    )]
    ChecksumMismatch {
        /// The file.
        file: String,
        /// Its version.
        version: String,
        /// The checksum in the history.
        applied: String,
        /// The file's checksum now.
        current: String,
    },
    /// A pending file is older than the newest applied one.
    #[error(
        "failed to plan: {file} (version {version}) is not applied but version {current} already is; give it a version above {current}"
    )]
    OutOfOrder {
        /// The file.
        file: String,
        /// Its version.
        version: String,
        /// The newest applied version.
        current: String,
    },
    /// Rolling back needs scripts that are missing.
    #[error(
        "failed to plan the rollback to {target}: no rollback script R<version>__….sql for version(s) {missing}"
    )]
    MissingRollback {
        /// The target.
        target: String,
        /// Versions without a script.
        missing: String,
    },
    /// A transactional file has its own BEGIN/COMMIT.
    #[error(
        "failed to plan: {file}:{line} controls its own transaction ({statement}); each file already runs in one transaction — remove it, or mark the file `-- cutover:no-transaction`"
    )]
    OwnTransaction {
        /// The file.
        file: String,
        /// The line.
        line: u32,
        /// The keyword.
        statement: String,
    },
    /// The lock did not come free in time.
    #[error("failed to take the migration lock {key} within {waited:?}{holder}")]
    LockWait {
        /// The key.
        key: i64,
        /// How long it waited.
        waited: Duration,
        /// Who holds it.
        holder: String,
    },
    /// A migration file failed; it was rolled back (as far as it ran in a transaction) and
    /// recorded as failed. Fix the file and run again.
    #[error("failed to apply {file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Script {
        /// The file.
        file: String,
        /// The line of the failing statement, when PostgreSQL says.
        line: Option<u32>,
        /// The error and what happened to the file's changes.
        message: String,
    },
}

fn sql(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> MigrateError {
    move |source| MigrateError::Sql { what, source }
}

/// Decides which files to run. Pure: the history and the files in, the steps out.
pub fn plan(
    set: &MigrationSet,
    history: &History,
    action: &Action,
) -> Result<Outcome, MigrateError> {
    let mut missing_files = Vec::new();
    for (version, row) in history.applied() {
        match set.versioned(version) {
            Some(file) if file.checksum != row.checksum => {
                return Err(MigrateError::ChecksumMismatch {
                    file: file.file_name.clone(),
                    version: version.to_string(),
                    applied: row.checksum.clone(),
                    current: file.checksum.clone(),
                });
            }
            Some(_) => {}
            None => missing_files.push(row.script.clone()),
        }
    }
    let current = history.current().cloned();
    let steps: Vec<Script> = match action {
        Action::Apply | Action::DryRun => {
            let pending: Vec<Script> = set
                .versioned
                .iter()
                .filter(|s| !history.is_applied(&s.version))
                .cloned()
                .collect();
            if let (Some(first), Some(current)) = (pending.first(), &current)
                && &first.version < current
            {
                return Err(MigrateError::OutOfOrder {
                    file: first.file_name.clone(),
                    version: first.version.to_string(),
                    current: current.to_string(),
                });
            }
            pending
        }
        Action::RollbackTo(target) | Action::DryRunRollbackTo(target) => {
            let to_undo: Vec<&Version> = history
                .applied()
                .rev()
                .map(|(v, _)| v)
                .filter(|v| *v > target)
                .collect();
            let missing: Vec<String> = to_undo
                .iter()
                .filter(|v| !set.rollbacks.contains_key(**v))
                .map(|v| v.to_string())
                .collect();
            if !missing.is_empty() {
                return Err(MigrateError::MissingRollback {
                    target: target.to_string(),
                    missing: missing.join(", "),
                });
            }
            to_undo
                .into_iter()
                .filter_map(|v| set.rollbacks.get(v).cloned())
                .collect()
        }
    };
    for script in &steps {
        check_transaction_control(script)?;
    }
    Ok(Outcome {
        steps: steps.into_iter().map(|script| Step { script }).collect(),
        version: current.map(|v| v.to_string()),
        missing_files,
    })
}

/// A transactional file must not commit half-way: the history row would not be atomic with it.
fn check_transaction_control(script: &Script) -> Result<(), MigrateError> {
    if script.no_transaction {
        return Ok(());
    }
    for stmt in sql_text::statements(&script.sql) {
        let first = match stmt.tokens.first().map(|t| &t.kind) {
            Some(TokenKind::Word(w)) => w.as_str(),
            _ => continue,
        };
        let second = match stmt.tokens.get(1).map(|t| &t.kind) {
            Some(TokenKind::Word(w)) => Some(w.as_str()),
            None => None,
            _ => Some(""),
        };
        let controls = match first {
            "begin" => second != Some("atomic"),
            "start" => second == Some("transaction"),
            "commit" | "rollback" | "abort" => !matches!(second, Some("prepared")),
            _ => false,
        };
        if controls {
            return Err(MigrateError::OwnTransaction {
                file: script.file_name.clone(),
                line: stmt.line,
                statement: first.to_uppercase(),
            });
        }
    }
    Ok(())
}

/// Connects, retrying with backoff while the server is unreachable, for up to `budget`.
pub(crate) async fn connect_retrying(
    dsn: &Dsn,
    opts: &ConnectOptions,
    budget: Duration,
) -> Result<Client, ConnectError> {
    let started = Instant::now();
    (|| connect(dsn, opts))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(budget))
                .without_max_times()
                .with_jitter(),
        )
        .sleep(tokio::time::sleep)
        .when(|e| matches!(e, ConnectError::Connect { .. }))
        .notify(|e, delay| {
            tracing::warn!(
                "{e}; retrying in {:.1}s ({:.0}s so far)",
                delay.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
        })
        .await
}

/// Runs `action` against the database: takes the lock (not for dry runs), validates, applies.
pub async fn migrate(
    dsn: &Dsn,
    connect_opts: &ConnectOptions,
    set: &MigrationSet,
    action: Action,
    opts: &MigrateOptions,
) -> Result<Outcome, MigrateError> {
    let client = connect_retrying(dsn, connect_opts, Duration::from_secs(60)).await?;
    let table = HistoryTable::new(&opts.history_schema);
    if matches!(action, Action::DryRun | Action::DryRunRollbackTo(_)) {
        let history = table
            .read(&client)
            .await
            .map_err(sql("read the migration history"))?;
        return plan(set, &history, &action);
    }
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), current_setting('server_version_num')::int",
            &[],
        )
        .await
        .map_err(sql("identify the session"))?;
    let pid: i32 = row.get(0);
    let server_version: i32 = row.get(1);
    if server_version >= 140_000 {
        // A killed runner's statement is cancelled within a second, its transaction rolled
        // back and its lock released, instead of running on without a client.
        // Best effort: platforms without the kernel support refuse non-zero values.
        if let Err(e) = client
            .batch_execute("SET client_connection_check_interval = '1s'")
            .await
        {
            tracing::warn!(
                "could not set client_connection_check_interval ({e}); a killed runner's \
                 statement will run to its end before its transaction is rolled back"
            );
        }
    }
    let mut watch_opts = connect_opts.clone();
    watch_opts.application_name = format!("{}-watch", connect_opts.application_name);
    let runner = Runner {
        client,
        pid,
        table,
        opts,
        watcher: None,
    };
    runner.acquire_lock().await?;
    let mut runner = runner;
    runner.watcher = match connect(dsn, &watch_opts).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("{e}; blocked statements will not be explained");
            None
        }
    };
    let result = runner.run_locked(set, &action).await;
    // The lock also goes when the connection closes; unlocking first is just tidy.
    let _ = runner
        .client
        .execute("SELECT pg_advisory_unlock($1)", &[&opts.lock_key])
        .await;
    result
}

struct Runner<'a> {
    client: Client,
    pid: i32,
    table: HistoryTable,
    opts: &'a MigrateOptions,
    watcher: Option<Client>,
}

/// Why one attempt at a file or statement failed.
#[derive(Debug)]
struct StepError {
    message: String,
    line: Option<u32>,
    lock_timeout: bool,
}

impl StepError {
    fn from_db(e: &tokio_postgres::Error, sql: &str, first_line: u32) -> Self {
        let lock_timeout = e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE);
        let Some(db) = e.as_db_error() else {
            return Self {
                message: e.to_string(),
                line: None,
                lock_timeout,
            };
        };
        let mut message = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            message.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            message.push_str(&format!(" (hint: {hint})"));
        }
        if let Some(context) = db.where_() {
            message.push_str(&format!(" (context: {context})"));
        }
        let line = match db.position() {
            Some(ErrorPosition::Original(pos)) => {
                let chars = usize::try_from(*pos).unwrap_or(0).saturating_sub(1);
                let byte = sql.char_indices().nth(chars).map_or(sql.len(), |(b, _)| b);
                Some(first_line + sql_text::line_of(sql, byte) - 1)
            }
            _ => None,
        };
        Self {
            message,
            line,
            lock_timeout,
        }
    }

    fn plain(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            line: None,
            lock_timeout: false,
        }
    }
}

impl Runner<'_> {
    fn emit(&self, event: Event) {
        match &event {
            Event::Blocked { .. }
            | Event::Retrying { .. }
            | Event::InvalidIndex { .. }
            | Event::Failed { .. }
            | Event::WaitingForLock { .. } => tracing::warn!("{event}"),
            _ => tracing::info!("{event}"),
        }
        if let Some(tx) = &self.opts.events {
            let _ = tx.send(event);
        }
    }

    /// Polls `pg_try_advisory_lock` from this idle session (no transaction, no snapshot held
    /// between polls) until it is ours.
    async fn acquire_lock(&self) -> Result<(), MigrateError> {
        let key = self.opts.lock_key;
        let started = Instant::now();
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .without_max_times()
            .with_jitter()
            .build();
        let mut reported: Option<Instant> = None;
        loop {
            let got: bool = self
                .client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await
                .map_err(sql("try the migration lock"))?
                .get(0);
            if got {
                self.emit(Event::LockAcquired {
                    key,
                    waited: started.elapsed(),
                });
                return Ok(());
            }
            if let Some(limit) = self.opts.lock_wait_timeout
                && started.elapsed() >= limit
            {
                let holder = self.lock_holder().await;
                return Err(MigrateError::LockWait {
                    key,
                    waited: started.elapsed(),
                    holder: holder.map(|h| format!(", held by {h}")).unwrap_or_default(),
                });
            }
            if reported.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                let holder = self.lock_holder().await;
                self.emit(Event::WaitingForLock { key, holder });
                reported = Some(Instant::now());
            }
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(2))).await;
        }
    }

    async fn lock_holder(&self) -> Option<Backend> {
        let sql = format!(
            "SELECT {BACKEND_COLUMNS} FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid = (($1::bigint >> 32) & 4294967295)::oid
               AND l.objid = ($1::bigint & 4294967295)::oid
               AND l.objsubid = 1
             LIMIT 1"
        );
        match self.client.query_opt(&sql, &[&self.opts.lock_key]).await {
            Ok(row) => row.map(|r| backend_from_row(&r)),
            Err(e) => {
                tracing::debug!("could not look up the lock holder: {e}");
                None
            }
        }
    }

    async fn run_locked(
        &self,
        set: &MigrationSet,
        action: &Action,
    ) -> Result<Outcome, MigrateError> {
        self.table
            .ensure(&self.client)
            .await
            .map_err(sql("create the migration history table"))?;
        // Read after taking the lock: what earlier holders did is committed and visible.
        let history = self
            .table
            .read(&self.client)
            .await
            .map_err(sql("read the migration history"))?;
        let mut outcome = plan(set, &history, action)?;
        for file in &outcome.missing_files {
            tracing::warn!(
                "{file} is recorded as applied but is not in the migrations directory any more"
            );
        }
        if outcome.steps.is_empty() {
            self.emit(Event::UpToDate {
                version: outcome.version.clone(),
            });
            return Ok(outcome);
        }
        for step in &outcome.steps {
            self.run_script(&step.script).await?;
        }
        outcome.version = self
            .table
            .read(&self.client)
            .await
            .map_err(sql("read the migration history"))?
            .current()
            .map(ToString::to_string);
        Ok(outcome)
    }

    async fn run_script(&self, script: &Script) -> Result<(), MigrateError> {
        self.emit(Event::Running {
            file: script.file_name.clone(),
        });
        let started = Instant::now();
        let result = if script.no_transaction {
            self.run_outside_transaction(script, started).await
        } else {
            self.run_in_transaction(script, started).await
        };
        match result {
            Ok(()) => {
                self.emit(Event::Done {
                    file: script.file_name.clone(),
                    took: started.elapsed(),
                });
                Ok(())
            }
            Err(e) => {
                let mut message = e.message;
                if let Err(record) = self
                    .table
                    .record(&self.client, script, started.elapsed(), Some(&message))
                    .await
                {
                    message.push_str(&format!(
                        "; the failure could not be recorded in the history either: {record}"
                    ));
                }
                self.emit(Event::Failed {
                    file: script.file_name.clone(),
                    error: message.clone(),
                });
                Err(MigrateError::Script {
                    file: script.file_name.clone(),
                    line: e.line,
                    message,
                })
            }
        }
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.opts.lock_retry_delay)
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(self.opts.lock_retries)
            .with_jitter()
    }

    /// Retries `attempt` with backoff while it fails on `lock_timeout`.
    async fn with_lock_retries<F, Fut>(&self, file: &str, attempt: F) -> Result<(), StepError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), StepError>>,
    {
        let retries = AtomicUsize::new(0);
        attempt
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(|e: &StepError| e.lock_timeout)
            .notify(|_, delay| {
                let n = retries.fetch_add(1, Ordering::Relaxed) + 1;
                self.emit(Event::Retrying {
                    file: file.to_owned(),
                    attempt: n,
                    delay,
                });
            })
            .await
            .map_err(|mut e| {
                if e.lock_timeout {
                    e.message.push_str(&format!(
                        " (gave up after {} retries)",
                        retries.load(Ordering::Relaxed)
                    ));
                }
                e
            })
    }

    async fn set_lock_timeout(&self, timeout: Duration, local: bool) -> Result<(), StepError> {
        self.client
            .execute(
                "SELECT set_config('lock_timeout', $1, $2)",
                &[&timeout.as_millis().to_string(), &local],
            )
            .await
            .map(drop)
            .map_err(|e| StepError::from_db(&e, "", 1))
    }

    /// BEGIN; file; history row; COMMIT — all or nothing.
    async fn run_in_transaction(&self, script: &Script, started: Instant) -> Result<(), StepError> {
        let c = &self.client;
        self.with_lock_retries(&script.file_name, || async {
            c.batch_execute("BEGIN")
                .await
                .map_err(|e| StepError::from_db(&e, "", 1))?;
            let result = async {
                self.set_lock_timeout(self.opts.lock_timeout, true).await?;
                self.watched(&script.file_name, 1, c.batch_execute(&script.sql))
                    .await
                    .map_err(|e| StepError::from_db(&e, &script.sql, 1))?;
                self.table
                    .record(c, script, started.elapsed(), None)
                    .await
                    .map_err(|e| StepError::from_db(&e, "", 1))?;
                c.batch_execute("COMMIT")
                    .await
                    .map_err(|e| StepError::from_db(&e, "", 1))
            }
            .await;
            if let Err(e) = &result
                && let Err(rollback) = c.batch_execute("ROLLBACK").await
            {
                tracing::warn!("ROLLBACK after {} failed: {rollback}", e.message);
            }
            result
        })
        .await
        .map_err(|mut e| {
            e.message.push_str("; the transaction was rolled back");
            e
        })
    }

    /// Statement by statement, each in its own implicit transaction.
    async fn run_outside_transaction(
        &self,
        script: &Script,
        started: Instant,
    ) -> Result<(), StepError> {
        let statements = sql_text::statements(&script.sql);
        for (i, stmt) in statements.iter().enumerate() {
            let result = match sql_text::classify(stmt, &script.sql) {
                Some(Special::CreateIndexConcurrently(ci)) => {
                    self.create_index_concurrently(script, stmt.text, stmt.line, &ci)
                        .await
                }
                Some(Special::OtherConcurrent) => {
                    // Waits for other transactions but never blocks the application: no
                    // lock_timeout, but say what it waits for.
                    self.set_lock_timeout(Duration::ZERO, false).await?;
                    self.watched(
                        &script.file_name,
                        stmt.line,
                        self.client.batch_execute(stmt.text),
                    )
                    .await
                    .map_err(|e| StepError::from_db(&e, stmt.text, stmt.line))
                }
                None => {
                    self.with_lock_retries(&script.file_name, || async {
                        self.set_lock_timeout(self.opts.lock_timeout, false).await?;
                        self.watched(
                            &script.file_name,
                            stmt.line,
                            self.client.batch_execute(stmt.text),
                        )
                        .await
                        .map_err(|e| StepError::from_db(&e, stmt.text, stmt.line))
                    })
                    .await
                }
            };
            if let Err(mut e) = result {
                e.line.get_or_insert(stmt.line);
                if i > 0 {
                    e.message.push_str(&format!(
                        "; this file runs outside a transaction: the {i} statement(s) before \
                         line {} stay applied and run again on the next attempt, so they must \
                         be idempotent",
                        stmt.line
                    ));
                }
                return Err(e);
            }
        }
        self.table
            .record(&self.client, script, started.elapsed(), None)
            .await
            .map_err(|e| StepError::from_db(&e, "", 1))
    }

    /// `CREATE INDEX CONCURRENTLY`, made safe to repeat: an invalid index of the same name
    /// (left by a failed or killed run, which `IF NOT EXISTS` would silently keep) is dropped
    /// and built again; an invalid index left by this statement's own failure is dropped; the
    /// index must be valid afterwards.
    async fn create_index_concurrently(
        &self,
        script: &Script,
        text: &str,
        line: u32,
        ci: &ConcurrentIndex,
    ) -> Result<(), StepError> {
        let file = &script.file_name;
        let db = |e: tokio_postgres::Error| StepError::from_db(&e, "", 1);
        let table_oid: Option<u32> = self
            .client
            .query_one("SELECT to_regclass($1)::oid", &[&ci.table])
            .await
            .map_err(db)?
            .get(0);
        let mut invalid_before = BTreeSet::new();
        if let Some(oid) = table_oid {
            for (schema, name) in self.invalid_indexes(oid).await.map_err(db)? {
                if ci.index.as_deref() == Some(name.as_str()) {
                    let index = quote_qualified(&schema, &name);
                    self.emit(Event::InvalidIndex {
                        file: file.clone(),
                        index: index.clone(),
                        action: IndexAction::Rebuilding,
                    });
                    self.set_lock_timeout(Duration::ZERO, false).await?;
                    self.watched(
                        file,
                        line,
                        self.client
                            .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}")),
                    )
                    .await
                    .map_err(db)?;
                } else {
                    invalid_before.insert((schema, name));
                }
            }
        }
        self.set_lock_timeout(Duration::ZERO, false).await?;
        let result = self
            .watched(file, line, self.client.batch_execute(text))
            .await
            .map_err(|e| StepError::from_db(&e, text, line));
        let Some(oid) = table_oid else {
            return result;
        };
        match result {
            Ok(()) => {
                let Some(name) = &ci.index else { return Ok(()) };
                let valid: Option<bool> = self
                    .client
                    .query_opt(
                        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                         WHERE i.indrelid = $1 AND c.relname = $2",
                        &[&oid, name],
                    )
                    .await
                    .map_err(db)?
                    .map(|r| r.get(0));
                match valid {
                    Some(false) => Err(StepError::plain(format!(
                        "index {name} is INVALID after line {line}: an invalid index of that name \
                         survived (IF NOT EXISTS skips it); drop it and run again"
                    ))),
                    _ => Ok(()),
                }
            }
            Err(e) => {
                for (schema, name) in self.invalid_indexes(oid).await.unwrap_or_default() {
                    if invalid_before.contains(&(schema.clone(), name.clone())) {
                        continue;
                    }
                    let index = quote_qualified(&schema, &name);
                    let dropped = self
                        .client
                        .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}"))
                        .await;
                    match dropped {
                        Ok(()) => self.emit(Event::InvalidIndex {
                            file: file.clone(),
                            index,
                            action: IndexAction::DroppedAfterFailure,
                        }),
                        Err(d) => tracing::warn!(
                            "{file}: could not drop the INVALID index {index} left by the failed \
                             statement ({d}); the next run rebuilds it"
                        ),
                    }
                }
                Err(e)
            }
        }
    }

    async fn invalid_indexes(
        &self,
        table: u32,
    ) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
        Ok(self
            .client
            .query(
                "SELECT n.nspname::text, c.relname::text
                 FROM pg_index i
                 JOIN pg_class c ON c.oid = i.indexrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE i.indrelid = $1 AND NOT i.indisvalid",
                &[&table],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// Runs `fut` (a statement on the runner's session) while a second session watches what it
    /// waits for and reports it.
    async fn watched<T, E>(
        &self,
        file: &str,
        line: u32,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let Some(watcher) = &self.watcher else {
            return fut.await;
        };
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(Vec<i32>, Instant)> = None;
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                result = &mut fut => return result,
                _ = tick.tick() => {
                    if started.elapsed() < self.opts.report_blocked_after {
                        continue;
                    }
                    let (phase, blockers) = match blockers(watcher, self.pid).await {
                        Ok(found) => found,
                        Err(e) => {
                            tracing::debug!("could not look at what the migration waits for: {e}");
                            continue;
                        }
                    };
                    if blockers.is_empty() {
                        last = None;
                        continue;
                    }
                    let pids: Vec<i32> = blockers.iter().map(|b| b.pid).collect();
                    let due = match &last {
                        Some((prev, at)) => *prev != pids || at.elapsed() >= Duration::from_secs(30),
                        None => true,
                    };
                    if due {
                        self.emit(Event::Blocked {
                            file: file.to_owned(),
                            line,
                            waited: started.elapsed(),
                            phase,
                            blockers,
                        });
                        last = Some((pids, Instant::now()));
                    }
                }
            }
        }
    }
}

const BACKEND_COLUMNS: &str = "a.pid, coalesce(a.application_name, ''), coalesce(a.usename::text, ''), \
     coalesce(a.state, ''), \
     coalesce(extract(epoch FROM now() - coalesce(a.xact_start, a.backend_start)), 0)::float8, \
     left(coalesce(a.query, ''), 120)";

fn backend_from_row(r: &tokio_postgres::Row) -> Backend {
    let age: f64 = r.get(4);
    Backend {
        pid: r.get(0),
        application_name: r.get(1),
        user: r.get(2),
        state: r.get(3),
        age: Duration::from_secs_f64(age.max(0.0)),
        query: r
            .get::<_, String>(5)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// The sessions `pid` waits for: lock holders (`pg_blocking_pids`, which covers the virtual
/// transaction locks `CREATE INDEX CONCURRENTLY` waits on) and the backend CIC's progress view
/// names, with CIC's phase.
async fn blockers(
    watcher: &Client,
    pid: i32,
) -> Result<(Option<String>, Vec<Backend>), tokio_postgres::Error> {
    let phase: Option<String> = watcher
        .query_opt(
            "SELECT phase FROM pg_stat_progress_create_index WHERE pid = $1",
            &[&pid],
        )
        .await?
        .map(|r| r.get(0));
    let sql = format!(
        "SELECT {BACKEND_COLUMNS} FROM pg_stat_activity a
         WHERE a.pid <> $1 AND (a.pid = ANY (pg_blocking_pids($1))
            OR a.pid = (SELECT p.current_locker_pid FROM pg_stat_progress_create_index p
                        WHERE p.pid = $1 AND p.current_locker_pid <> 0))
         ORDER BY a.pid"
    );
    let rows = watcher.query(&sql, &[&pid]).await?;
    Ok((phase, rows.iter().map(backend_from_row).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::migrate::history::HistoryRow;

    fn set(files: &[(&str, &str)]) -> MigrationSet {
        MigrationSet::from_files(files.iter().copied()).unwrap()
    }

    fn applied(set: &MigrationSet, versions: &[&str]) -> History {
        History::from_rows(
            versions
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let s = set.versioned(&v.parse().unwrap()).unwrap();
                    HistoryRow {
                        id: i64::try_from(i).unwrap(),
                        version: v.to_string(),
                        description: s.description.clone(),
                        kind: "migrate".into(),
                        script: s.file_name.clone(),
                        checksum: s.checksum.clone(),
                        success: true,
                        error: None,
                    }
                })
                .collect(),
        )
    }

    fn names(o: &Outcome) -> Vec<&str> {
        o.steps
            .iter()
            .map(|s| s.script.file_name.as_str())
            .collect()
    }

    #[test]
    fn plans_pending_files_in_version_order() {
        let s = set(&[
            ("V1__a.sql", "select 1;"),
            ("V1.10__c.sql", "select 3;"),
            ("V1.9__b.sql", "select 2;"),
        ]);
        let o = plan(&s, &applied(&s, &["1"]), &Action::Apply).unwrap();
        assert_eq!(names(&o), ["V1.9__b.sql", "V1.10__c.sql"]);
        assert_eq!(o.version.as_deref(), Some("1"));
    }

    #[test]
    fn rejects_edited_files_out_of_order_files_and_own_transactions() {
        let s = set(&[("V1__a.sql", "select 1;"), ("V2__b.sql", "select 2;")]);
        let h = applied(&s, &["1"]);
        let edited = set(&[("V1__a.sql", "select 42;"), ("V2__b.sql", "select 2;")]);
        let err = plan(&edited, &h, &Action::Apply).unwrap_err().to_string();
        assert!(
            err.contains("V1__a.sql") && err.contains(&s.versioned[0].checksum),
            "{err}"
        );
        assert!(err.contains(&edited.versioned[0].checksum), "{err}");

        let h2 = applied(&s, &["2"]);
        let err = plan(&s, &h2, &Action::Apply).unwrap_err();
        assert!(matches!(err, MigrateError::OutOfOrder { .. }), "{err}");

        let own = set(&[("V1__a.sql", "select 1;\nCOMMIT;\n")]);
        let err = plan(&own, &History::default(), &Action::Apply).unwrap_err();
        assert!(err.to_string().contains("V1__a.sql:2"), "{err}");
    }

    #[test]
    fn plans_rollbacks_newest_first_and_requires_scripts() {
        let s = set(&[
            ("V1__a.sql", "select 1;"),
            ("V2__b.sql", "select 2;"),
            ("V3__c.sql", "select 3;"),
            ("R2__b.sql", "select -2;"),
            ("R3__c.sql", "select -3;"),
        ]);
        let h = applied(&s, &["1", "2", "3"]);
        let o = plan(&s, &h, &Action::RollbackTo("1".parse().unwrap())).unwrap();
        assert_eq!(names(&o), ["R3__c.sql", "R2__b.sql"]);
        let err = plan(&s, &h, &Action::RollbackTo("0".parse().unwrap())).unwrap_err();
        assert!(err.to_string().contains("version(s) 1"), "{err}");
    }
}
