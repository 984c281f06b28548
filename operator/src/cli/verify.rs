//! `cutover verify`: compare a source and a target database by hand — in rehearsal, before the
//! point of no return, or after a cutover. Exit code 0 only when everything matches, 1 when
//! something differs (the list is printed), 2 when the comparison could not run.

use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_operator::postgres::Dsn;
use cutover_operator::postgres::verify::{self, Progress, TableName, VerifyOptions};

/// Exit code when source and target differ.
pub const EXIT_MISMATCH: i32 = 1;
/// Exit code when the comparison could not be made.
pub const EXIT_ERROR: i32 = 2;

/// `cutover verify`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Compare two databases: row checksums per key range, sequences and table definitions",
    after_help = "Exit status: 0 when everything matches, 1 when something differs, 2 on error."
)]
pub struct Args {
    /// Source (blue) connection string, libpq URI or key=value form.
    #[arg(
        long,
        env = "CUTOVER_SOURCE_DSN",
        hide_env_values = true,
        required_unless_present = "source_env",
        conflicts_with = "source_env"
    )]
    source: Option<String>,

    /// Name of an environment variable holding the source connection string (keeps the
    /// password off the command line).
    #[arg(long, value_name = "VAR")]
    source_env: Option<String>,

    /// Target (green) connection string.
    #[arg(
        long,
        env = "CUTOVER_TARGET_DSN",
        hide_env_values = true,
        required_unless_present = "target_env",
        conflicts_with = "target_env"
    )]
    target: Option<String>,

    /// Name of an environment variable holding the target connection string.
    #[arg(long, value_name = "VAR")]
    target_env: Option<String>,

    /// Compare only this schema (repeatable). Default: every schema but PostgreSQL's own and
    /// the operator's `cutover` schema.
    #[arg(long = "schema", value_name = "SCHEMA")]
    schemas: Vec<String>,

    /// Compare only this table, `schema.table` (repeatable; quote parts with `"` as in SQL).
    #[arg(long = "table", value_name = "SCHEMA.TABLE", value_parser = TableName::parse)]
    tables: Vec<TableName>,

    /// Connections per side.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallelism: u16,

    /// Rows per key range, roughly.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    chunk_rows: u64,

    /// Differences listed per table at most.
    #[arg(long, default_value_t = 20)]
    max_differences: usize,

    /// Tables, columns and sequences only the target has are not mismatches (migrations
    /// added them); everything the source has must still be on the target, equal.
    #[arg(long)]
    allow_target_additions: bool,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Runs the comparison and prints the report; returns the process exit code.
pub async fn run(args: Args) -> i32 {
    match compare(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            EXIT_ERROR
        }
    }
}

async fn compare(args: Args) -> anyhow::Result<i32> {
    // TLS connections need a crypto provider; another command may have installed it already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let source = dsn("source", args.source, args.source_env.as_deref())?;
    let target = dsn("target", args.target, args.target_env.as_deref())?;
    let mut options = VerifyOptions {
        schemas: args.schemas,
        tables: args.tables,
        parallelism: usize::from(args.parallelism),
        chunk_rows: args.chunk_rows,
        max_differences: args.max_differences,
        target_may_add: args.allow_target_additions,
        ..VerifyOptions::default()
    };
    let progress = std::io::stderr().is_terminal().then(ProgressLine::new);
    if let Some(line) = &progress {
        let line = Arc::clone(line);
        options.progress = Some(Arc::new(move |p: &Progress| line.update(p)));
    }
    let report = verify::verify(&source, &target, &options).await;
    if let Some(line) = &progress {
        line.clear();
    }
    let report = report?;
    let mut stdout = std::io::stdout().lock();
    match args.output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut stdout, &report)?;
            writeln!(stdout)?;
        }
        Output::Text => write!(stdout, "{}", report.render_text())?,
    }
    stdout.flush()?;
    Ok(if report.matched { 0 } else { EXIT_MISMATCH })
}

fn dsn(side: &str, value: Option<String>, var: Option<&str>) -> anyhow::Result<Dsn> {
    match (value, var) {
        (Some(value), _) => Ok(Dsn::new(value)),
        (None, Some(var)) => std::env::var(var).map(Dsn::new).map_err(|_| {
            anyhow::anyhow!(
                "failed to read the {side} connection string: environment variable {var} is not set"
            )
        }),
        (None, None) => anyhow::bail!("no {side} connection string: give --{side} or --{side}-env"),
    }
}

/// One self-overwriting line on stderr: chunks done / total of the table last reported.
struct ProgressLine {
    last: Mutex<Instant>,
}

impl ProgressLine {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            last: Mutex::new(Instant::now()),
        })
    }

    fn update(&self, p: &Progress) {
        let mut last = self.last.lock().expect("progress lock poisoned");
        let finished = p.chunks_done == p.chunks_total;
        if !finished && last.elapsed() < Duration::from_millis(200) {
            return;
        }
        *last = Instant::now();
        eprint!(
            "\r\x1b[2K{}: {}/{} ranges",
            p.table, p.chunks_done, p.chunks_total
        );
    }

    fn clear(&self) {
        eprint!("\r\x1b[2K");
    }
}
