//! `cutover run -f PLAN.yaml`: the whole sequence from a plan file, without Kubernetes.
//!
//! The plan's Secret references are resolved from a directory laid out like mounted Secrets
//! (`DIR/<secret>/<key>`) or from environment variables (`CUTOVER_SECRET_<SECRET>_<KEY>`,
//! upper-cased, every other character `_`). The switch writes the application's connection
//! string into `DIR/<secret>/<key>` when a directory is given. Progress goes to stdout; the run
//! ends with the timing report, and exits non-zero unless the cutover completed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use cutover_operator::api::units::human_bytes;
use cutover_operator::api::{self, DatabaseCutover, DatabaseCutoverStatus, Phase, SecretKeyRef};
use cutover_operator::engine::{Databases, Engine, LocalPlatform, drive};
use cutover_operator::plan::{self, Action};
use cutover_operator::postgres::{ConnectOptions, Dsn};

/// Settings of local mode.
#[derive(Debug)]
pub struct LocalArgs {
    /// The plan file.
    pub plan: PathBuf,
    /// Where Secrets live as files.
    pub secrets_dir: Option<PathBuf>,
}

fn env_name(r: &SecretKeyRef) -> String {
    let clean = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    format!("CUTOVER_SECRET_{}_{}", clean(&r.name), clean(&r.key))
}

fn resolve(r: &SecretKeyRef, dir: Option<&Path>) -> anyhow::Result<String> {
    if let Some(dir) = dir {
        let path = dir.join(&r.name).join(&r.key);
        if path.is_file() {
            return std::fs::read_to_string(&path)
                .map(|v| v.trim_end_matches('\n').to_owned())
                .with_context(|| format!("failed to read {}", path.display()));
        }
    }
    let var = env_name(r);
    match std::env::var(&var) {
        Ok(v) => Ok(v),
        Err(_) => {
            let in_dir = dir
                .map(|d| format!(" or put it in {}", d.join(&r.name).join(&r.key).display()))
                .unwrap_or_default();
            bail!(
                "Secret {} key {:?} not found: set {var}{in_dir}",
                r.name,
                r.key
            )
        }
    }
}

/// Runs the plan to its end.
pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.plan)
        .with_context(|| format!("failed to read {}", args.plan.display()))?;
    let cutover: DatabaseCutover = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow::anyhow!("failed to parse {}: {e}", args.plan.display()))?;
    let problems = api::validate(&cutover.spec);
    if !problems.is_empty() {
        bail!(
            "{} is not a valid plan:\n  - {}",
            args.plan.display(),
            problems.join("\n  - ")
        );
    }
    let spec = cutover.spec.clone();
    let dir = args.secrets_dir.as_deref();
    let blue = Dsn::new(resolve(&spec.source.connection_secret_ref, dir)?);
    let green = Dsn::new(resolve(&spec.target.connection_secret_ref, dir)?);
    let ca = match &spec.source.ca_secret_ref {
        Some(r) => Some(resolve(r, dir)?.into_bytes()),
        None => None,
    };
    let file_of = |r: &SecretKeyRef| dir.map(|d| d.join(&r.name).join(&r.key));
    let platform = LocalPlatform {
        secret_file: file_of(&spec.switch.secret_ref),
        rehearsal_secret_file: spec.switch.rehearsal_secret_ref.as_ref().and_then(file_of),
    };
    let name = cutover
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "plan".into());
    println!(
        "cutover {name}: {} → {} ({:?})",
        blue.redacted(),
        green.redacted(),
        spec.mode
    );
    let dbs = Databases {
        blue_from_green: blue.clone(),
        green_from_blue: green.clone(),
        blue,
        green,
        connect: ConnectOptions {
            ca_pem: ca,
            application_name: "cutover-local".into(),
            ..ConnectOptions::default()
        },
    };
    let engine = Engine::new(format!("local/{name}"), spec, dbs, platform);

    let started = Instant::now();
    let mut last_phase = None;
    let mut last_progress = Instant::now();
    let mut last_problems: Vec<String> = Vec::new();
    let status = drive(
        &engine,
        DatabaseCutoverStatus::default(),
        10,
        |s, action| {
            if last_phase != Some(s.phase) {
                last_phase = Some(s.phase);
                let detail = match (&s.message, s.phase) {
                    (
                        Some(m),
                        Phase::Aborting | Phase::Aborted | Phase::RollingBack | Phase::RolledBack,
                    ) => m.clone(),
                    _ => plan::summary(s.phase).message.to_owned(),
                };
                println!(
                    "[{:>7.1}s] {:<16} {detail}",
                    started.elapsed().as_secs_f64(),
                    s.phase.as_str()
                );
            }
            if last_progress.elapsed().as_secs() >= 2
                && matches!(action, Action::Wait(_))
                && let Some(r) = &s.replication
            {
                last_progress = Instant::now();
                println!(
                    "           tables {}/{} ready, lag {}",
                    r.tables_ready,
                    r.tables_total,
                    r.lag_bytes.map_or_else(
                        || "?".into(),
                        |b| human_bytes(u64::try_from(b).unwrap_or(0))
                    )
                );
            }
            let problems: Vec<String> = s
                .hypercare
                .iter()
                .flat_map(|h| {
                    h.problems
                        .iter()
                        .map(|p| format!("{:?}: {}", p.reason, p.message))
                })
                .collect();
            if problems != last_problems {
                for p in problems.iter().filter(|p| !last_problems.contains(p)) {
                    println!("           PROBLEM {p}");
                }
                last_problems = problems;
            }
            if let (Action::Checkpoint(_), Some(c)) = (
                action,
                s.hypercare
                    .as_ref()
                    .and_then(|h| h.last_checkpoint.as_ref()),
            ) {
                println!(
                    "           checkpoint {}: {} tables, {} rows on the target, {}",
                    c.number,
                    c.tables,
                    c.target_rows,
                    match (c.compared_with_source, c.matched) {
                        (false, _) => "counted on the target only".to_owned(),
                        (true, true) if c.unsettled.is_empty() =>
                            "same counts on the source".into(),
                        (true, true) => format!("no stable count for {}", c.unsettled.join(", ")),
                        (true, false) => format!("DIFFERENT: {}", c.mismatches.join("; ")),
                    }
                );
            }
            if let (Action::Verify, Some(v)) = (action, &s.verification) {
                println!(
                    "           verification: {} rows compared, {}",
                    v.rows_compared,
                    if v.matched {
                        "everything matches"
                    } else {
                        "DIFFERENCES FOUND"
                    }
                );
            }
        },
    )
    .await?;

    println!(
        "\n{}",
        plan::timing_report(&status, jiff::Timestamp::now()).render()
    );
    match status.phase {
        Phase::Completed => Ok(()),
        other => bail!(
            "the cutover ended {other}: {}",
            status.message.unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_are_shell_friendly() {
        let r = SecretKeyRef {
            name: "orders-blue-admin".into(),
            key: "uri".into(),
        };
        assert_eq!(env_name(&r), "CUTOVER_SECRET_ORDERS_BLUE_ADMIN_URI");
    }

    #[test]
    fn missing_secrets_say_where_to_put_them() {
        let r = SecretKeyRef {
            name: "nowhere-to-be-found".into(),
            key: "uri".into(),
        };
        let err = resolve(&r, Some(Path::new("/secrets")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CUTOVER_SECRET_NOWHERE_TO_BE_FOUND_URI"),
            "{err}"
        );
        assert!(err.contains("/secrets/nowhere-to-be-found/uri"), "{err}");
    }
}
