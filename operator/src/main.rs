//! The `cutover` command: the operator (`cutover run`), the CRD generator (`cutover crd`), and
//! the tools a DBA uses by hand. `anyhow` lives here, at the edge; the library has typed errors.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cutover_operator::{api, controller};
use tracing_subscriber::EnvFilter;

mod cli;

#[derive(Parser, Debug)]
#[command(
    name = "cutover",
    version,
    about = "Move an application from one PostgreSQL database to another with seconds of write downtime"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CUTOVER_LOG_FORMAT")]
    log_format: LogFormat,

    /// Colour in text logs: `auto` only when standard error is a terminal, so logs written to
    /// a file or a pipe carry no escape codes.
    #[arg(long, global = true, value_enum, default_value_t = Color::Auto, env = "CUTOVER_LOG_COLOR")]
    log_color: Color,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator: watch DatabaseCutover resources and drive them.
    Run(RunArgs),
    /// Print the CustomResourceDefinition YAML (what crds/ holds).
    Crd,
    /// Compare source and target: row checksums per key range, sequences, table definitions.
    Verify(cli::verify::Args),
    /// Apply migration files under an advisory lock (what the migration Job runs).
    Migrate(cli::migrate::MigrateArgs),
    /// Block until a migration version is applied (the init-container entrypoint).
    Wait(cli::wait::WaitArgs),
    /// Flag dangerous DDL in a migrations directory.
    Lint(cli::lint::LintArgs),
    /// Remove what a cutover left on both servers (after an abort that could not finish):
    /// before its point of no return blue is unfrozen, its replication objects dropped and the
    /// rows it copied into green's tables removed; past it, only the replication objects.
    Cleanup(CleanupArgs),
    /// Show a cutover's phase, conditions, replication and verification (kubectl plugin verb).
    Status(cli::kubectl::Target),
    /// Pass the point of no return of a cutover with manual approval (kubectl plugin verb).
    Approve(cli::kubectl::Target),
    /// Abort a cutover before the point of no return (kubectl plugin verb).
    Abort(cli::kubectl::Target),
    /// Move the application back to the source during hypercare (kubectl plugin verb).
    Rollback(cli::kubectl::Target),
    /// Per-step durations, the write-freeze window and the slowest step (kubectl plugin verb).
    Report(cli::kubectl::Target),
}

#[derive(clap::Args, Debug)]
struct CleanupArgs {
    /// The plan file the cutover was run or applied from.
    #[arg(short = 'f', long = "file")]
    file: std::path::PathBuf,

    /// Secrets as files, `DIR/<secret>/<key>` (else `CUTOVER_SECRET_<SECRET>_<KEY>`).
    #[arg(long)]
    secrets_dir: Option<std::path::PathBuf>,

    /// The local run's state file (default: `<plan>.state.json` beside the plan).
    #[arg(long)]
    state_file: Option<std::path::PathBuf>,

    /// The plan was applied to Kubernetes in this namespace: clean up the operator's cutover
    /// of that name (its objects are named after namespace and name).
    #[arg(long)]
    namespace: Option<String>,

    /// Also unfreeze blue when no local state says the cutover stopped before its point of no
    /// return (green's rows are emptied only when the state says this attempt copied them).
    #[arg(long)]
    unfreeze: bool,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Local mode: run this plan file without Kubernetes (the rehearsal on a laptop or in CI).
    #[arg(short = 'f', long = "file")]
    file: Option<std::path::PathBuf>,

    /// Local mode: Secrets as files, `DIR/<secret>/<key>` (also where the switch writes).
    /// Without it, `CUTOVER_SECRET_<SECRET>_<KEY>` environment variables are read.
    #[arg(long, requires = "file")]
    secrets_dir: Option<std::path::PathBuf>,

    /// Local mode: where the run's status is kept, so that running the same plan again
    /// resumes a stopped run (default: `<plan>.state.json` beside the plan).
    #[arg(long, requires = "file")]
    state_file: Option<std::path::PathBuf>,

    /// Local mode: undo a stopped run (unfreeze the source, remove every replication object)
    /// instead of continuing it. Refused past the point of no return.
    #[arg(long, requires = "file")]
    abort: bool,

    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, default_value = "0.0.0.0:8080", env = "CUTOVER_METRICS_ADDR")]
    metrics_addr: SocketAddr,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "CUTOVER_WATCH_NAMESPACE")]
    namespace: Option<String>,

    /// Take part in leader election so that several replicas are safe.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "CUTOVER_LEADER_ELECT")]
    leader_elect: bool,

    /// Namespace of the leader Lease (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,

    /// Name of the leader Lease.
    #[arg(
        long,
        default_value = "cutover-operator-leader",
        env = "CUTOVER_LEASE_NAME"
    )]
    lease_name: String,

    /// Seconds a leader Lease stays valid without renewal.
    #[arg(long, default_value_t = 15, env = "CUTOVER_LEASE_SECONDS")]
    lease_seconds: u64,

    /// This replica's name (in a pod: the pod name).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,

    /// The image migration Jobs run when a cutover names none (the operator's own image).
    #[arg(long, env = "CUTOVER_IMAGE", default_value = concat!("ghcr.io/dbops/cutover:", env!("CARGO_PKG_VERSION")))]
    image: String,
}

fn init_tracing(format: LogFormat, color: Color) {
    use std::io::IsTerminal as _;
    let filter = EnvFilter::try_from_env("CUTOVER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = match color {
        Color::Auto => std::io::stderr().is_terminal(),
        Color::Always => true,
        Color::Never => false,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", api::crd_yaml());
            Ok(())
        }
        Command::Verify(args) => {
            init_tracing(cli.log_format, cli.log_color);
            std::process::exit(cli::verify::run(args).await)
        }
        Command::Migrate(args) => {
            init_tracing(cli.log_format, cli.log_color);
            cli::migrate::run(args).await
        }
        Command::Wait(args) => {
            init_tracing(cli.log_format, cli.log_color);
            cli::wait::run(args).await
        }
        Command::Lint(args) => cli::lint::run(args),
        Command::Run(args) if args.file.is_some() => {
            init_tracing(cli.log_format, cli.log_color);
            let plan = args.file.expect("checked by the match guard");
            cli::local::run(cli::local::LocalArgs {
                plan,
                secrets_dir: args.secrets_dir,
                state_file: args.state_file,
                abort: args.abort,
            })
            .await
        }
        Command::Cleanup(args) => {
            init_tracing(cli.log_format, cli.log_color);
            cli::local::cleanup(cli::local::CleanupArgs {
                plan: args.file,
                secrets_dir: args.secrets_dir,
                state_file: args.state_file,
                namespace: args.namespace,
                unfreeze: args.unfreeze,
            })
            .await
        }
        Command::Status(t) => cli::kubectl::run(cli::kubectl::Verb::Status, t).await,
        Command::Approve(t) => cli::kubectl::run(cli::kubectl::Verb::Approve, t).await,
        Command::Abort(t) => cli::kubectl::run(cli::kubectl::Verb::Abort, t).await,
        Command::Rollback(t) => cli::kubectl::run(cli::kubectl::Verb::Rollback, t).await,
        Command::Report(t) => cli::kubectl::run(cli::kubectl::Verb::Report, t).await,
        Command::Run(args) => {
            init_tracing(cli.log_format, cli.log_color);
            rustls::crypto::ring::default_provider()
                .install_default()
                .map_err(|_| anyhow::anyhow!("failed to install the TLS crypto provider"))?;
            let client = kube::Client::try_default()
                .await
                .context("failed to build a Kubernetes client from the kubeconfig or the pod's service account")?;
            let instance = args.instance.unwrap_or_else(default_instance);
            let opts = controller::RunOptions {
                metrics_addr: args.metrics_addr,
                namespace: args.namespace,
                leader_election: args.leader_elect.then_some(controller::LeaderElection {
                    namespace: args.lease_namespace,
                    lease_name: args.lease_name,
                    duration_seconds: args.lease_seconds,
                }),
                instance,
                default_image: args.image,
            };
            controller::run(client, opts).await
        }
    }
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "cutover".into());
    format!("{host}-{}", std::process::id())
}
