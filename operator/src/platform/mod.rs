//! What differs between running a cutover in Kubernetes and running it from a plan file: the
//! migration Jobs, the application's connection Secret, and the workloads restarted at the
//! switch. [`KubePlatform`] and [`LocalPlatform`] are the two implementations; the engine
//! talks to either through [`Platform`].

pub mod kube;
pub mod local;

use std::future::Future;

use thiserror::Error;

use crate::api::CheckResult;
use crate::plan::{JobState, MigrationSet};
use crate::postgres::Dsn;

pub use self::kube::{KubePlatform, SecretError, read_dsn, read_secret_key};
pub use self::local::LocalPlatform;

/// What the platform does for the engine.
pub trait Platform: Send + Sync {
    /// The state of the Job applying `set`; `None` when it was never launched.
    fn migration_job(
        &self,
        set: MigrationSet,
    ) -> impl Future<Output = Result<Option<JobState>, PlatformError>> + Send;
    /// Launches the Job applying `set` (idempotent).
    fn launch_migrations(
        &self,
        set: MigrationSet,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;
    /// Points the application at `target` (the rehearsal Secret when `rehearsal`).
    fn switch_secret(
        &self,
        target: &Dsn,
        rehearsal: bool,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;
    /// Restarts the listed workloads (idempotent per `generation`).
    fn restart_workloads(
        &self,
        generation: &str,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;
    /// Restarted workloads whose rollout is stuck, each with why (empty when all is well).
    fn rollout_problems(&self) -> impl Future<Output = Result<Vec<String>, PlatformError>> + Send;
    /// Preflight checks of what the switch will touch (the Secrets, the workloads), so a
    /// cutover that could not switch stops before anything changes rather than at the switch.
    fn preflight(&self) -> impl Future<Output = Vec<CheckResult>> + Send;
}

/// Why the platform could not do what was asked. Messages name objects and files, never a
/// Secret's value.
#[derive(Debug, Error)]
pub enum PlatformError {
    /// The API server refused or could not be reached.
    #[error("failed to {action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client's error.
        #[source]
        source: ::kube::Error,
    },
    /// A Secret could not be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// A file could not be written (local mode).
    #[error("failed to {action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The application's connection string could not be pointed at the other server.
    #[error("failed to point the application's connection string at the other database: {0}")]
    Retarget(#[source] crate::postgres::ConnectError),
    /// The migration Job could not be built from the spec.
    #[error(transparent)]
    JobBuild(#[from] crate::cluster::migration_job::JobBuildError),
    /// This platform cannot do it at all (for good, whatever is retried).
    #[error("{0}")]
    Unsupported(&'static str),
}

impl PlatformError {
    /// A [`PlatformError::Kube`] for `action`.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(::kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Kube { action, source }
    }
}
