//! Schema migrations (DESIGN §4): versioned files applied exactly once under a session-level
//! advisory lock, a history table with checksums, one transaction per file (or none, for
//! `CREATE INDEX CONCURRENTLY`), `lock_timeout` with bounded retries, rollback scripts, waiting
//! for a version from an init container, and linting with squawk.
//!
//! Concurrency model: every runner connects and polls `pg_try_advisory_lock` between short
//! sleeps, so a waiting runner is an *idle* session — no open transaction, no snapshot. A runner
//! blocked in `pg_advisory_lock` would hold a snapshot for as long as it waits, and
//! `CREATE INDEX CONCURRENTLY` run by the lock holder waits for every older snapshot: the two
//! would wait for each other forever (the Flyway #1654 / golang-migrate #960 trap). The lock is
//! a session lock, so it goes away with the holder's connection; the holder sets
//! `client_connection_check_interval` so a killed pod's statement is cancelled (and its
//! transaction rolled back) within a second instead of running to completion.

pub mod files;
pub mod history;
pub mod lint;
mod runner;
pub mod sql_text;
pub mod wait;

use std::fmt;
use std::time::Duration;

pub use files::{LoadError, MigrationSet, NO_TRANSACTION_MARKER, Script, ScriptKind, Version};
pub use history::{History, HistoryRow, HistoryTable};
pub use runner::{Action, MigrateError, Outcome, Step, migrate, plan};
pub use wait::{WaitError, WaitOptions, wait_for_version};

/// How `migrate` behaves.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// Advisory lock key that serialises runners on one database.
    pub lock_key: i64,
    /// `lock_timeout` for every statement that can block the application (0 = none).
    pub lock_timeout: Duration,
    /// How many times a file (or statement, outside a transaction) is retried after hitting
    /// `lock_timeout`.
    pub lock_retries: usize,
    /// First delay between those retries; it doubles, with jitter, up to 30 s.
    pub lock_retry_delay: Duration,
    /// Give up waiting for the advisory lock after this long (none: wait; a Job's
    /// `activeDeadlineSeconds` bounds it).
    pub lock_wait_timeout: Option<Duration>,
    /// Schema of `cutover_schema_history`.
    pub history_schema: String,
    /// Report what a statement waits on once it has waited this long.
    pub report_blocked_after: Duration,
    /// Where events go besides the log (tests, the operator).
    pub events: Option<tokio::sync::mpsc::UnboundedSender<Event>>,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            lock_key: 742_189,
            lock_timeout: Duration::from_secs(5),
            lock_retries: 5,
            lock_retry_delay: Duration::from_secs(1),
            lock_wait_timeout: None,
            history_schema: "public".into(),
            report_blocked_after: Duration::from_secs(2),
            events: None,
        }
    }
}

/// Another session, as `pg_stat_activity` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    /// Its process id (`pg_terminate_backend(pid)` ends it).
    pub pid: i32,
    /// Its `application_name`.
    pub application_name: String,
    /// Its role.
    pub user: String,
    /// `active`, `idle in transaction`, …
    pub state: String,
    /// How long its transaction (or, outside one, its connection) has been open.
    pub age: Duration,
    /// The start of its current or last query.
    pub query: String,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} (application_name {:?}, user {:?}, {}, open for {}s, query {:?})",
            self.pid,
            self.application_name,
            self.user,
            if self.state.is_empty() {
                "state unknown"
            } else {
                &self.state
            },
            self.age.as_secs(),
            self.query
        )
    }
}

/// What happened to an invalid index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexAction {
    /// An invalid index left by an earlier failed or killed run was dropped; the statement
    /// builds it again.
    Rebuilding,
    /// The statement failed and left an invalid index (which slows every write); it was dropped.
    DroppedAfterFailure,
}

/// Progress of a run, logged and optionally sent to [`MigrateOptions::events`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Another runner holds the lock.
    WaitingForLock {
        /// The key.
        key: i64,
        /// Who holds it, if visible.
        holder: Option<Backend>,
    },
    /// This runner holds the lock.
    LockAcquired {
        /// The key.
        key: i64,
        /// How long it waited.
        waited: Duration,
    },
    /// Nothing to do.
    UpToDate {
        /// The current version.
        version: Option<String>,
    },
    /// A file starts.
    Running {
        /// The file.
        file: String,
    },
    /// A file was applied (or, for a rollback script, run).
    Done {
        /// The file.
        file: String,
        /// How long it took.
        took: Duration,
    },
    /// A file failed; it was rolled back (as far as it ran in a transaction) and recorded.
    Failed {
        /// The file.
        file: String,
        /// Why.
        error: String,
    },
    /// A statement hit `lock_timeout`; it is retried after `delay`.
    Retrying {
        /// The file.
        file: String,
        /// Which retry comes next (1-based).
        attempt: usize,
        /// The delay before it.
        delay: Duration,
    },
    /// A statement has been waiting on other sessions.
    Blocked {
        /// The file.
        file: String,
        /// The statement's line.
        line: u32,
        /// How long it has waited.
        waited: Duration,
        /// For `CREATE INDEX CONCURRENTLY`, its phase (`waiting for old snapshots`, …).
        phase: Option<String>,
        /// The sessions it waits for.
        blockers: Vec<Backend>,
    },
    /// An invalid index was found and dealt with.
    InvalidIndex {
        /// The file.
        file: String,
        /// The index, qualified.
        index: String,
        /// What was done.
        action: IndexAction,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::WaitingForLock { key, holder } => {
                write!(f, "waiting for the migration lock {key}")?;
                match holder {
                    Some(h) => write!(f, ", held by {h}"),
                    None => Ok(()),
                }
            }
            Event::LockAcquired { key, waited } => write!(
                f,
                "took the migration lock {key} after {:.1}s",
                waited.as_secs_f64()
            ),
            Event::UpToDate { version } => match version {
                Some(v) => write!(f, "schema is up to date at version {v}"),
                None => write!(f, "no migrations to apply"),
            },
            Event::Running { file } => write!(f, "running {file}"),
            Event::Done { file, took } => {
                write!(f, "finished {file} in {:.3}s", took.as_secs_f64())
            }
            Event::Failed { file, error } => write!(f, "{file} failed: {error}"),
            Event::Retrying {
                file,
                attempt,
                delay,
            } => write!(
                f,
                "{file} hit lock_timeout (another session holds a conflicting lock); retry {attempt} in {:.1}s",
                delay.as_secs_f64()
            ),
            Event::Blocked {
                file,
                line,
                waited,
                phase,
                blockers,
            } => {
                write!(f, "{file}:{line} has waited {}s", waited.as_secs())?;
                if let Some(phase) = phase {
                    write!(f, " ({phase})")?;
                }
                write!(f, " for ")?;
                for (i, b) in blockers.iter().enumerate() {
                    if i > 0 {
                        write!(f, "; ")?;
                    }
                    write!(f, "backend {b}")?;
                }
                write!(
                    f,
                    " — it cannot finish before that transaction ends: commit or end it, or \
                     pg_terminate_backend() it"
                )
            }
            Event::InvalidIndex {
                file,
                index,
                action,
            } => match action {
                IndexAction::Rebuilding => write!(
                    f,
                    "{file}: index {index} is INVALID (left by an earlier failed or killed \
                     CREATE INDEX CONCURRENTLY); dropping it and building it again"
                ),
                IndexAction::DroppedAfterFailure => write!(
                    f,
                    "{file}: dropped the INVALID index {index} the failed CREATE INDEX \
                     CONCURRENTLY left behind"
                ),
            },
        }
    }
}
