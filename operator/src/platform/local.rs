//! The platform of local mode (`cutover run -f PLAN`): the application's "Secret" is a file
//! holding its connection string, there are no workloads to restart and no Jobs to run.

use super::{Platform, PlatformError};
use crate::plan::{JobState, MigrationSet};
use crate::postgres::Dsn;

/// The platform of local mode: the "application Secret" is a file holding the connection
/// string, there are no workloads to restart and no Jobs to run.
#[derive(Debug, Default)]
pub struct LocalPlatform {
    /// Where the application's connection string is written at the switch.
    pub secret_file: Option<std::path::PathBuf>,
    /// Where the rehearsal's connection string is written.
    pub rehearsal_secret_file: Option<std::path::PathBuf>,
}

const NO_JOBS: &str = "local mode runs no migration Jobs: apply the migrations with \
                       `cutover migrate` and drop spec.migrations from the plan";

impl Platform for LocalPlatform {
    async fn migration_job(&self, _set: MigrationSet) -> Result<Option<JobState>, PlatformError> {
        Err(PlatformError::Unsupported(NO_JOBS))
    }

    async fn launch_migrations(&self, _set: MigrationSet) -> Result<(), PlatformError> {
        Err(PlatformError::Unsupported(NO_JOBS))
    }

    async fn rollout_problems(&self) -> Result<Vec<String>, PlatformError> {
        Ok(Vec::new())
    }

    async fn preflight(&self) -> Vec<crate::api::CheckResult> {
        // The files are written at the switch, created if missing: nothing to check before.
        Vec::new()
    }

    async fn switch_secret(&self, target: &Dsn, rehearsal: bool) -> Result<(), PlatformError> {
        let file = if rehearsal {
            &self.rehearsal_secret_file
        } else {
            &self.secret_file
        };
        let Some(path) = file else {
            return Ok(());
        };
        // Like the Kubernetes switch: the application's own connection string (if the file has
        // one) keeps its credentials and parameters, only the server changes.
        let value = match self.secret_file.as_deref().map(std::fs::read_to_string) {
            Some(Ok(current)) => crate::postgres::retarget(&Dsn::new(current), target)
                .map_err(PlatformError::Retarget)?,
            _ => target.clone(),
        };
        write_private(path, value.expose()).map_err(|source| PlatformError::Io {
            action: format!("write {}", path.display()),
            source,
        })
    }

    async fn restart_workloads(&self, _generation: &str) -> Result<(), PlatformError> {
        tracing::info!("local mode: no workloads to restart");
        Ok(())
    }
}

/// Writes a file readable by its owner only, replacing it atomically.
pub fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}
