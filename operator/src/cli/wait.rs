//! `cutover wait`: the init-container entrypoint — block until a migration version is applied.

use std::time::Duration;

use cutover_operator::postgres::migrate::{Version, WaitOptions, wait_for_version};

use super::migrate::{DatabaseArgs, duration};

/// Arguments of `cutover wait`.
#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// The version that must be applied (successfully) before this returns.
    #[arg(long, value_name = "VERSION")]
    pub until_version: Version,

    /// Give up (exit 1) after this long.
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub timeout: Duration,

    /// How often to look at the history table.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    pub poll_interval: Duration,

    /// Schema of the cutover_schema_history table.
    #[arg(long, default_value = "public")]
    pub history_schema: String,
}

/// Runs the verb.
pub async fn run(args: WaitArgs) -> anyhow::Result<()> {
    let (dsn, connect) = args.database.resolve("cutover-wait")?;
    let opts = WaitOptions {
        timeout: args.timeout,
        poll_interval: args.poll_interval,
        history_schema: args.history_schema,
    };
    wait_for_version(&dsn, &connect, &args.until_version, &opts).await?;
    Ok(())
}
