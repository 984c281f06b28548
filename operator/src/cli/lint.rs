//! `cutover lint`: dangerous DDL in a migrations directory, via the squawk linter.

use std::path::PathBuf;

use cutover_operator::postgres::migrate::files;
use cutover_operator::postgres::migrate::lint::{
    LintOptions, OFF_BY_DEFAULT, active_rules, lint_set,
};

/// Arguments of `cutover lint`.
#[derive(clap::Args, Debug)]
pub struct LintArgs {
    /// Directory of migration files.
    pub dir: PathBuf,

    /// Turn on a rule that is off by default (squawk's rule names), e.g. require-lock-timeout.
    #[arg(long, value_name = "RULE", value_delimiter = ',')]
    pub include: Vec<String>,

    /// Turn a rule off, e.g. prefer-bigint-over-int.
    #[arg(long, value_name = "RULE", value_delimiter = ',')]
    pub exclude: Vec<String>,

    /// PostgreSQL version the migrations target, e.g. 16.
    #[arg(long)]
    pub pg_version: Option<String>,

    /// List the rules that would run and exit.
    #[arg(long)]
    pub list_rules: bool,
}

/// Runs the verb: findings on stdout, exit 1 when there are any.
pub fn run(args: LintArgs) -> anyhow::Result<()> {
    let opts = LintOptions {
        include: args.include,
        exclude: args.exclude,
        pg_version: args.pg_version,
    };
    if args.list_rules {
        for rule in active_rules(&opts)? {
            println!("{rule}");
        }
        for (rule, why) in OFF_BY_DEFAULT {
            println!("# off by default: {rule} ({why})");
        }
        return Ok(());
    }
    let set = files::load_dir(&args.dir)?;
    let findings = lint_set(&set, &opts)?;
    for f in &findings {
        println!("{f}");
    }
    let count = set.versioned.len() + set.rollbacks.len();
    if findings.is_empty() {
        println!("{count} file(s) checked, no findings");
        return Ok(());
    }
    anyhow::bail!(
        "{} finding(s) in {count} file(s); silence a deliberate one with a `-- squawk-ignore <rule>` comment above the statement",
        findings.len()
    )
}
