//! `cutover wait`: block until the history shows a version applied — the init-container
//! entrypoint that keeps application pods from starting before their migration ran. Needs only
//! the database: no Kubernetes API access.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use thiserror::Error;
use tokio_postgres::Client;

use super::files::Version;
use super::history::{History, HistoryTable};
use crate::postgres::{ConnectOptions, Dsn, connect};

/// How `wait` behaves.
#[derive(Clone, Debug)]
pub struct WaitOptions {
    /// Give up after this long.
    pub timeout: Duration,
    /// How often to look at the history.
    pub poll_interval: Duration,
    /// Schema of `cutover_schema_history`.
    pub history_schema: String,
}

impl Default for WaitOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(600),
            poll_interval: Duration::from_millis(500),
            history_schema: "public".into(),
        }
    }
}

/// Why the wait ended without the version.
#[derive(Debug, Error)]
pub enum WaitError {
    /// The deadline passed.
    #[error("timed out after {}s waiting for migration version {version} to be applied: {state}", waited.as_secs())]
    Timeout {
        /// The version.
        version: String,
        /// How long it waited.
        waited: Duration,
        /// What was seen last: the current version, or why the database was unreachable.
        state: String,
    },
    /// The version's last attempt failed.
    #[error(
        "migration version {version} failed ({script}): {error}; fix the file, let the migration Job run again, then this pod starts"
    )]
    Failed {
        /// The version.
        version: String,
        /// Its file.
        script: String,
        /// The recorded error.
        error: String,
    },
    /// An earlier version failed, so this one will not be applied until that is fixed.
    #[error(
        "migration version {version} cannot be applied: the earlier version {failed} failed ({script}): {error}"
    )]
    Blocked {
        /// The version waited for.
        version: String,
        /// The failed version.
        failed: String,
        /// Its file.
        script: String,
        /// The recorded error.
        error: String,
    },
}

/// What the history says about `version`.
enum Verdict {
    Applied,
    Pending(String),
    Failed(WaitError),
}

fn judge(history: &History, version: &Version) -> Verdict {
    if history.is_applied(version) {
        return Verdict::Applied;
    }
    for (v, state) in history.versions.range(..=version.clone()) {
        if state.applied.is_some() {
            continue;
        }
        if let Some(f) = &state.last_failure {
            let error = f.error.clone().unwrap_or_default();
            return Verdict::Failed(if v == version {
                WaitError::Failed {
                    version: version.to_string(),
                    script: f.script.clone(),
                    error,
                }
            } else {
                WaitError::Blocked {
                    version: version.to_string(),
                    failed: v.to_string(),
                    script: f.script.clone(),
                    error,
                }
            });
        }
    }
    Verdict::Pending(match history.current() {
        Some(v) => format!("the latest applied version is {v}"),
        None => "no migration has been applied yet".into(),
    })
}

/// Waits until `version` is applied. Connection failures are retried with backoff until the
/// deadline; the error then says what was seen last.
pub async fn wait_for_version(
    dsn: &Dsn,
    connect_opts: &ConnectOptions,
    version: &Version,
    opts: &WaitOptions,
) -> Result<(), WaitError> {
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let table = HistoryTable::new(&opts.history_schema);
    let mut client: Option<Client> = None;
    let mut state = "nothing seen yet".to_owned();
    let mut reconnect_delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .with_jitter()
        .build();
    let mut logged = String::new();
    loop {
        let mut delay = opts.poll_interval;
        if client.is_none() {
            let mut attempt = connect_opts.clone();
            attempt.connect_timeout = attempt
                .connect_timeout
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(100));
            match connect(dsn, &attempt).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    state = format!("the database is not reachable: {e}");
                    delay = reconnect_delays.next().unwrap_or(Duration::from_secs(5));
                }
            }
        }
        if let Some(c) = &client {
            match table.read(c).await {
                Ok(history) => match judge(&history, version) {
                    Verdict::Applied => {
                        tracing::info!("migration version {version} is applied");
                        return Ok(());
                    }
                    Verdict::Failed(e) => return Err(e),
                    Verdict::Pending(s) => state = s,
                },
                Err(e) => {
                    state = format!("failed to read the migration history: {e}");
                    client = None;
                }
            }
        }
        if state != logged {
            tracing::info!("waiting for migration version {version}: {state}");
            logged.clone_from(&state);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitError::Timeout {
                version: version.to_string(),
                waited: started.elapsed(),
                state,
            });
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
    }
}
