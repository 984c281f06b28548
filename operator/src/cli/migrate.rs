//! `cutover migrate`: apply the migration files of a directory to the database named by an
//! environment variable, exactly once however many runners start at the same time.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use cutover_operator::api::units::parse_duration;
use cutover_operator::postgres::migrate::{self, Action, MigrateOptions, Version, files};
use cutover_operator::postgres::{ConnectOptions, Dsn};

/// Arguments of `cutover migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// Directory holding V<version>__<description>.sql (and R<version>__….sql) files; in a Job,
    /// the mounted ConfigMap.
    #[arg(long, env = "CUTOVER_MIGRATIONS_DIR")]
    pub dir: PathBuf,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Advisory lock key that serialises runners on one database.
    #[arg(long, default_value_t = 742_189)]
    pub lock_key: i64,

    /// lock_timeout for each migration (e.g. 5s, 500ms; 0s turns it off), so that a migration
    /// never queues behind a long transaction and blocks the application.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub lock_timeout: Duration,

    /// How often a migration that hit lock_timeout is retried (with exponential backoff).
    #[arg(long, default_value_t = 5)]
    pub lock_retries: usize,

    /// First delay between those retries (doubling, up to 30s).
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub lock_retry_delay: Duration,

    /// Give up waiting for the advisory lock after this long (default: wait).
    #[arg(long, value_parser = duration)]
    pub lock_wait_timeout: Option<Duration>,

    /// Schema of the cutover_schema_history table.
    #[arg(long, default_value = "public")]
    pub history_schema: String,

    /// Print what would run, change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Run the rollback scripts (R<version>__….sql) of every applied version above this one,
    /// newest first.
    #[arg(long, value_name = "VERSION")]
    pub rollback_to: Option<Version>,
}

/// Where the connection string comes from: an environment variable (in a Job, from the
/// Secret), never the command line.
#[derive(clap::Args, Debug)]
pub struct DatabaseArgs {
    /// Name of the environment variable holding the libpq connection string.
    #[arg(long, value_name = "VAR", default_value = "DATABASE_URL")]
    pub database_url_env: String,

    /// PEM CA bundle to verify the server with (sslmode=verify-ca / verify-full).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
}

impl DatabaseArgs {
    /// The connection string and the connect options.
    pub fn resolve(&self, application_name: &str) -> anyhow::Result<(Dsn, ConnectOptions)> {
        let text = std::env::var(&self.database_url_env).with_context(|| {
            format!(
                "failed to read the connection string: the environment variable {} is not set",
                self.database_url_env
            )
        })?;
        let ca_pem = match &self.ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("failed to read the CA bundle {}", path.display()))?,
            ),
            None => None,
        };
        Ok((
            Dsn::new(text),
            ConnectOptions {
                ca_pem,
                application_name: application_name.into(),
                ..ConnectOptions::default()
            },
        ))
    }
}

/// Parses `5s`, `1m30s`, `500ms`.
pub fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

/// Runs the verb.
pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let set = files::load_dir(&args.dir)?;
    let (dsn, connect) = args.database.resolve("cutover-migrate")?;
    let action = match (args.rollback_to, args.dry_run) {
        (Some(v), false) => Action::RollbackTo(v),
        (Some(v), true) => Action::DryRunRollbackTo(v),
        (None, false) => Action::Apply,
        (None, true) => Action::DryRun,
    };
    let dry = matches!(action, Action::DryRun | Action::DryRunRollbackTo(_));
    let opts = MigrateOptions {
        lock_key: args.lock_key,
        lock_timeout: args.lock_timeout,
        lock_retries: args.lock_retries,
        lock_retry_delay: args.lock_retry_delay,
        lock_wait_timeout: args.lock_wait_timeout,
        history_schema: args.history_schema,
        ..MigrateOptions::default()
    };
    tracing::info!(
        "{} migration file(s) and {} rollback script(s) in {}; database {}",
        set.versioned.len(),
        set.rollbacks.len(),
        args.dir.display(),
        dsn.redacted()
    );
    let outcome = migrate::migrate(&dsn, &connect, &set, action, &opts).await?;
    if dry {
        println!(
            "current version: {}",
            outcome.version.as_deref().unwrap_or("none")
        );
        if outcome.steps.is_empty() {
            println!("nothing to run");
        }
        for step in &outcome.steps {
            let s = &step.script;
            println!(
                "would run {} (version {}, {}{})",
                s.file_name,
                s.version,
                s.description,
                if s.no_transaction {
                    ", outside a transaction"
                } else {
                    ""
                }
            );
        }
    } else {
        println!(
            "ran {} file(s); current version: {}",
            outcome.steps.len(),
            outcome.version.as_deref().unwrap_or("none")
        );
    }
    Ok(())
}
