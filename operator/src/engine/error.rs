//! Why an observation or an action failed, kept typed until it is shown.
//!
//! [`ActionError`] wraps the errors of the `postgres` modules and of the platform as sources.
//! Two facts come out of it for the plan: a [`Category`] (the Event and condition reason, and
//! the metric label) and whether the failure is transient — worth retrying within the step's
//! budget — or permanent. Transience is read from the causes themselves (the driver's SQLSTATE,
//! the socket's error kind, the API server's status code), not from message text.

use std::error::Error as StdError;

use thiserror::Error;

use crate::platform::PlatformError;
use crate::postgres::ConnectError;
use crate::postgres::checkpoint::CheckpointError;
use crate::postgres::cleanup::{AbortError, CleanupError};
use crate::postgres::freeze::FreezeError;
use crate::postgres::preflight::SchemaError;
use crate::postgres::replication::ReplicationError;
use crate::postgres::roles::RolesError;
use crate::postgres::sync::SyncError;
use crate::postgres::verify::VerifyError;

/// Which database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The source.
    Blue,
    /// The target.
    Green,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Blue => "blue",
            Side::Green => "green",
        })
    }
}

/// Why an observation or an action failed.
#[derive(Debug, Error)]
pub enum ActionError {
    /// A database could not be reached.
    #[error("failed to reach the {side} database: {source}")]
    Connect {
        /// Which one.
        side: Side,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// Green's schema is not what replication needs.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// Replication could not be set up, observed or waited for.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// Writes could not be frozen or unfrozen.
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    /// Sequences could not be copied.
    #[error(transparent)]
    Sequences(#[from] SyncError),
    /// Verification could not run (a difference it finds is not an error).
    #[error("failed to verify: {source}")]
    Verify {
        /// Why.
        #[from]
        source: VerifyError,
    },
    /// A hypercare checkpoint could not run.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// An abort or a rehearsal's end could not undo everything.
    #[error(transparent)]
    Abort(#[from] AbortError),
    /// Replication objects could not be removed.
    #[error(transparent)]
    Cleanup(#[from] CleanupError),
    /// The application roles could not be let in on green.
    #[error(transparent)]
    Roles(#[from] RolesError),
    /// Kubernetes (or local mode's files) refused.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The change witness on the source could not be created or read.
    #[error(transparent)]
    Witness(#[from] crate::postgres::witness::WitnessError),
    /// Online verification could not go on (its comparison inside the freeze failed).
    #[error("online verification: {0}")]
    Online(#[from] crate::postgres::verify::online::OnlineError),
    /// The parallel initial copy failed (its run ended; the next attempt starts over).
    #[error("the parallel initial copy failed: {message}")]
    Copy {
        /// Why.
        message: String,
        /// Whether starting it over may succeed.
        transient: bool,
    },
    /// A step of the parallel copy's preparation failed.
    #[error(transparent)]
    CopySetup(#[from] crate::postgres::copy::CopyError),
    /// The online comparison's evidence was lost and the plan says to abort then.
    #[error("{0}")]
    OnlineLost(String),
    /// The post-switch migration Job failed.
    #[error("post-switch migrations failed: {0}")]
    MigrationsFailed(String),
    /// The post-switch migration Job has not finished yet.
    #[error("post-switch migrations have not finished")]
    MigrationsRunning,
    /// Large objects could not be copied or compared.
    #[error(transparent)]
    LargeObjects(#[from] crate::postgres::large_objects::LargeObjectError),
    /// Green's replicated tables already hold rows: a new copy would stop on duplicate keys.
    #[error(
        "green's replicated tables already hold rows: {}; the initial copy would stop on \
         duplicate keys. Empty them on green (TRUNCATE) if an earlier attempt left them, or \
         point the cutover at an empty database",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    TargetNotEmpty(Vec<crate::postgres::replication::TableName>),
    /// An abort or a rehearsal's end undid what it could; a server it needs is unreachable or
    /// refuses, and what is listed is still there.
    #[error("{cause}; left to undo: {}", .left.join("; "))]
    Incomplete {
        /// Why a server could not be used.
        #[source]
        cause: Box<ActionError>,
        /// What is still there, for people.
        left: Vec<String>,
    },
    /// A value of the spec does not parse (admission should have refused it).
    #[error("invalid spec: {0}")]
    Spec(#[from] crate::api::units::UnitError),
}

/// What kind of failure, for people and dashboards: the Event reason, the `Degraded`
/// condition's reason while retrying, and the `category` label of the error metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// A database refused the connection or could not be reached.
    DatabaseUnreachable,
    /// A statement failed on a database.
    DatabaseError,
    /// Replication is broken or did not progress in time.
    ReplicationFailed,
    /// The write freeze could not be put in place, proven or undone.
    FreezeFailed,
    /// Verification could not run.
    VerificationFailed,
    /// A cleanup could not finish.
    CleanupFailed,
    /// The application roles cannot work on green.
    RolesRefused,
    /// Green's schema does not match.
    SchemaMismatch,
    /// The Kubernetes API server refused or could not be reached.
    KubeApi,
    /// A migration Job failed or has not finished.
    MigrationFailed,
    /// Local mode cannot do this.
    Unsupported,
    /// The spec holds a value that does not parse.
    InvalidSpec,
}

impl Category {
    /// The label as written in Events, conditions and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::DatabaseUnreachable => "DatabaseUnreachable",
            Category::DatabaseError => "DatabaseError",
            Category::ReplicationFailed => "ReplicationFailed",
            Category::FreezeFailed => "FreezeFailed",
            Category::VerificationFailed => "VerificationFailed",
            Category::CleanupFailed => "CleanupFailed",
            Category::RolesRefused => "RolesRefused",
            Category::SchemaMismatch => "SchemaMismatch",
            Category::KubeApi => "KubeApi",
            Category::MigrationFailed => "MigrationFailed",
            Category::Unsupported => "Unsupported",
            Category::InvalidSpec => "InvalidSpec",
        }
    }
}

impl ActionError {
    /// A connection failure on `side`.
    pub fn connect(side: Side) -> impl FnOnce(ConnectError) -> Self {
        move |source| ActionError::Connect { side, source }
    }

    /// What kind of failure this is.
    pub fn category(&self) -> Category {
        if self.is_unreachable() {
            return Category::DatabaseUnreachable;
        }
        match self {
            ActionError::Connect { .. } => Category::DatabaseUnreachable,
            ActionError::Schema(SchemaError::Differs(_)) => Category::SchemaMismatch,
            ActionError::Replication(ReplicationError::Sql { .. }) | ActionError::Schema(_) => {
                Category::DatabaseError
            }
            ActionError::Replication(_) | ActionError::Copy { .. } => Category::ReplicationFailed,
            ActionError::CopySetup(_) => Category::DatabaseError,
            ActionError::Freeze(_) => Category::FreezeFailed,
            ActionError::Sequences(_)
            | ActionError::Checkpoint(_)
            | ActionError::Witness(_)
            | ActionError::LargeObjects(_) => Category::DatabaseError,
            ActionError::Verify { .. } | ActionError::Online(_) | ActionError::OnlineLost(_) => {
                Category::VerificationFailed
            }
            ActionError::Abort(_) | ActionError::Cleanup(_) => Category::CleanupFailed,
            ActionError::Incomplete { cause, .. } => cause.category(),
            ActionError::TargetNotEmpty(_) => Category::SchemaMismatch,
            ActionError::Roles(RolesError::Sql { .. }) => Category::DatabaseError,
            ActionError::Roles(_) => Category::RolesRefused,
            ActionError::Platform(PlatformError::Unsupported(_)) => Category::Unsupported,
            ActionError::Platform(_) => Category::KubeApi,
            ActionError::MigrationsFailed(_) | ActionError::MigrationsRunning => {
                Category::MigrationFailed
            }
            ActionError::Spec(_) => Category::InvalidSpec,
        }
    }

    /// Whether retrying the same step may succeed: the server restarting or unreachable, a
    /// connection reset, a serialization failure or deadlock, the API server's conflicts and
    /// timeouts, a Job still running, a condition not reached in time. Everything else —
    /// a wrong password, a missing database, a refused privilege, a schema difference — is
    /// permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            ActionError::MigrationsRunning => true,
            ActionError::Copy { transient, .. } => *transient,
            ActionError::CopySetup(e) => e.is_transient(),
            ActionError::MigrationsFailed(_)
            | ActionError::Spec(_)
            | ActionError::TargetNotEmpty(_)
            | ActionError::OnlineLost(_) => false,
            ActionError::Incomplete { cause, .. } => cause.is_transient(),
            ActionError::Online(crate::postgres::verify::online::OnlineError::Behind(..)) => true,
            ActionError::Online(crate::postgres::verify::online::OnlineError::WitnessLost(_)) => {
                false
            }
            ActionError::Replication(ReplicationError::Timeout { .. }) => true,
            ActionError::Platform(PlatformError::Unsupported(_)) => false,
            _ => transient_cause(self).unwrap_or(false),
        }
    }

    fn is_unreachable(&self) -> bool {
        matches!(self, ActionError::Connect { .. })
            || chain(self).any(|e| {
                e.downcast_ref::<tokio_postgres::Error>()
                    .is_some_and(tokio_postgres::Error::is_closed)
                    || e.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io_transient(io.kind()))
            })
    }
}

fn chain<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |e: &&'a (dyn StdError + 'static)| (*e).source())
}

/// The first cause in `e`'s chain that says whether it is transient.
pub fn transient_cause(e: &(dyn StdError + 'static)) -> Option<bool> {
    for cause in chain(e) {
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            if let Some(code) = pg.code() {
                return Some(sqlstate_transient(code.code()));
            }
            if pg.is_closed() {
                return Some(true);
            }
        } else if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return Some(io_transient(io.kind()));
        } else if let Some(k) = cause.downcast_ref::<kube::Error>() {
            return Some(kube_transient(k));
        }
    }
    None
}

/// SQLSTATEs that come and go: connection exceptions (class 08), the server shutting down or
/// starting (`57P01`–`57P03`), too many connections, serialization failures and deadlocks,
/// a lock not available, an object (such as a replication slot) in use for a moment.
pub fn sqlstate_transient(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" | "55P03" | "55006"
        )
}

fn io_transient(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        kind,
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | NotConnected
            | BrokenPipe
            | TimedOut
            | UnexpectedEof
            | Interrupted
            | AddrNotAvailable
            | HostUnreachable
            | NetworkUnreachable
    )
}

fn kube_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => matches!(status.code, 409 | 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_restarts_and_resets_are_transient_and_refusals_are_not() {
        for code in ["08006", "08001", "57P01", "57P03", "40001", "40P01"] {
            assert!(sqlstate_transient(code), "{code}");
        }
        // Wrong password, no such database, permission denied, undefined table, syntax.
        for code in ["28P01", "3D000", "42501", "42P01", "42601"] {
            assert!(!sqlstate_transient(code), "{code}");
        }
    }

    #[test]
    fn io_errors_are_classified_through_the_chain() {
        #[derive(Debug, Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let refused = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(transient_cause(&refused), Some(true));
        let denied = Outer(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(transient_cause(&denied), Some(false));
    }

    #[test]
    fn job_outcomes_and_timeouts() {
        assert!(ActionError::MigrationsRunning.is_transient());
        assert!(!ActionError::MigrationsFailed("BackoffLimitExceeded".into()).is_transient());
        let timeout = ActionError::Replication(ReplicationError::Timeout {
            what: "wait".into(),
            waited: std::time::Duration::from_secs(1),
            detail: None,
        });
        assert!(timeout.is_transient());
        assert_eq!(timeout.category(), Category::ReplicationFailed);
        let unsupported = ActionError::Platform(PlatformError::Unsupported("no Jobs"));
        assert!(!unsupported.is_transient());
        assert_eq!(unsupported.category(), Category::Unsupported);
    }
}
