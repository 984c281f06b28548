//! `cutover run -f PLAN.yaml`: the whole sequence from a plan file, without Kubernetes.
//!
//! The plan's Secret references are resolved from a directory laid out like mounted Secrets
//! (`DIR/<secret>/<key>`) or from environment variables (`CUTOVER_SECRET_<SECRET>_<KEY>`,
//! upper-cased, every other character `_`). The switch writes the application's connection
//! string into `DIR/<secret>/<key>` when a directory is given. Progress goes to stdout; the run
//! ends with the timing report, and exits non-zero unless the cutover completed.
//!
//! The status is saved after every step to a state file (beside the plan unless
//! `--state-file` says otherwise), as the operator saves it to the API server. Running the same
//! plan again after the process was killed resumes where it stopped; `--abort` undoes a stopped
//! run. A file rather than a table in the source database: the status must be readable when a
//! database is not — an abort with blue unreachable still has to know what was done — and it
//! holds no secret (connection strings live only in the Secrets).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use cutover_operator::api::units::human_bytes;
use cutover_operator::api::{
    CheckOutcome, DatabaseCutover, DatabaseCutoverStatus, Phase, SecretKeyRef, ValidSpec,
};
use cutover_operator::engine::{Databases, Engine, Sink, drive};
use cutover_operator::plan::{self, Action};
use cutover_operator::platform::LocalPlatform;
use cutover_operator::platform::local::write_private;
use cutover_operator::postgres::{ConnectOptions, Dsn};

/// Settings of local mode.
#[derive(Debug)]
pub struct LocalArgs {
    /// The plan file.
    pub plan: PathBuf,
    /// Where Secrets live as files.
    pub secrets_dir: Option<PathBuf>,
    /// Where the run's status is kept between invocations (default: beside the plan).
    pub state_file: Option<PathBuf>,
    /// Undo a stopped run instead of continuing it.
    pub abort: bool,
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

/// What is kept of a local run between invocations: enough to resume it.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct SavedRun {
    /// The cutover's id (`local/<metadata.name>`): a state file of another plan is refused.
    cutover: String,
    /// The status as of the last step.
    status: DatabaseCutoverStatus,
}

/// The default state file of a plan: beside it, `<plan>.state.json`.
pub fn default_state_file(plan: &Path) -> PathBuf {
    let mut name = plan.file_name().unwrap_or_default().to_os_string();
    name.push(".state.json");
    plan.with_file_name(name)
}

fn load_state(path: &Path, id: &str) -> anyhow::Result<Option<DatabaseCutoverStatus>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
    };
    let saved: SavedRun = serde_json::from_str(&text)
        .with_context(|| format!("failed to parse the state file {}", path.display()))?;
    if saved.cutover != id {
        bail!(
            "the state file {} belongs to cutover {}, not {id}: pass --state-file for this plan",
            path.display(),
            saved.cutover
        );
    }
    Ok(Some(saved.status))
}

/// Local mode's [`Sink`]: each status is saved to the state file (atomically, before the step's
/// action runs when it is an intent) and shown as progress.
struct LocalSink {
    plan: PathBuf,
    state_file: PathBuf,
    cutover: String,
    last: Option<DatabaseCutoverStatus>,
    printer: Printer,
}

impl Sink for LocalSink {
    type Error = anyhow::Error;

    async fn write(
        &mut self,
        status: &DatabaseCutoverStatus,
        action: &Action,
    ) -> anyhow::Result<DatabaseCutoverStatus> {
        if self.last.as_ref() != Some(status) {
            let saved = SavedRun {
                cutover: self.cutover.clone(),
                status: status.clone(),
            };
            let text = serde_json::to_string_pretty(&saved)?;
            write_private(&self.state_file, &text).with_context(|| {
                format!(
                    "failed to save the state file {}",
                    self.state_file.display()
                )
            })?;
            self.printer.show(status, action);
            self.last = Some(status.clone());
        }
        // An abort that keeps failing (a server away or refusing) does not hang the run: it
        // ends, saying what is left and how to finish; the state file keeps the abort.
        if status.phase == Phase::Aborting
            && let Some(r) = status
                .retry
                .as_ref()
                .filter(|r| r.attempts >= ABORT_ATTEMPTS)
        {
            bail!(
                "the abort could not finish after {} attempts: {}\n\
                 Writes on blue are allowed again unless blue itself is what cannot be reached. \
                 Once the server is back (or its connection fixed), finish the abort with \
                 `cutover run -f {plan} --abort`, or remove what is left with \
                 `cutover cleanup -f {plan}` (the state is kept in {state}).",
                r.attempts,
                r.message,
                plan = self.plan.display(),
                state = self.state_file.display()
            );
        }
        Ok(status.clone())
    }
}

/// Prints progress as the status changes.
struct Printer {
    started: Instant,
    last_phase: Option<Phase>,
    last_progress: Instant,
    last_problems: Vec<String>,
    last_retry: Option<i32>,
}

impl Printer {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_phase: None,
            last_progress: Instant::now(),
            last_problems: Vec::new(),
            last_retry: None,
        }
    }

    fn show(&mut self, s: &DatabaseCutoverStatus, action: &Action) {
        if self.last_phase != Some(s.phase) {
            self.last_phase = Some(s.phase);
            let detail = match (&s.message, s.phase) {
                (
                    Some(m),
                    Phase::Aborting | Phase::Aborted | Phase::RollingBack | Phase::RolledBack,
                ) => m.clone(),
                _ => plan::summary(s.phase).message.to_owned(),
            };
            println!(
                "[{:>7.1}s] {:<16} {detail}",
                self.started.elapsed().as_secs_f64(),
                s.phase.as_str()
            );
        }
        if matches!(action, Action::RunPreflight) {
            if let Some(v) = &s.server_versions {
                println!("           {}", versions_line(v));
            }
            // Warnings are worth a look even when the run goes on; failures say why it stops.
            for c in s
                .preflight
                .iter()
                .filter(|c| c.outcome != CheckOutcome::Pass)
            {
                println!(
                    "           preflight {} {}: {}",
                    match c.outcome {
                        CheckOutcome::Fail => "FAIL",
                        _ => "warn",
                    },
                    c.name,
                    c.message
                );
            }
        }
        let attempts = s.retry.as_ref().map(|r| r.attempts);
        if attempts != self.last_retry {
            if let Some(r) = &s.retry {
                println!(
                    "           retrying ({} {}): {}",
                    r.attempts,
                    if r.attempts == 1 {
                        "failure"
                    } else {
                        "failures"
                    },
                    r.message
                );
            }
            self.last_retry = attempts;
        }
        if self.last_progress.elapsed().as_secs() >= 2
            && matches!(action, Action::Wait(_))
            && let Some(r) = &s.replication
        {
            self.last_progress = Instant::now();
            println!(
                "           tables {}/{} ready, lag {}",
                r.tables_ready,
                r.tables_total,
                r.lag_bytes.map_or_else(
                    || "?".into(),
                    |b| human_bytes(u64::try_from(b).unwrap_or(0))
                )
            );
            if let Some(c) = r.initial_copy.as_ref().filter(|c| c.stage != "Done") {
                println!("           {}", copy_line(c));
            }
            if let Some(o) = &s.online_verification {
                println!("           {}", online_line(o));
            }
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
        if problems != self.last_problems {
            for p in problems.iter().filter(|p| !self.last_problems.contains(p)) {
                println!("           PROBLEM {p}");
            }
            self.last_problems = problems;
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
                    (true, true) if c.unsettled.is_empty() => "same counts on the source".into(),
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
    }
}

/// Runs the plan to its end, resuming a run that was stopped (its state file says where), or
/// with `abort`, undoing a stopped run before the point of no return.
/// Reads a plan file strictly: a misspelt field is refused, not ignored (`mdoe: Rehearsal` would
/// run a Production cutover), and the spec must be valid.
fn read_plan(path: &Path) -> anyhow::Result<DatabaseCutover> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let doc: serde_json::Value = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow::anyhow!("failed to parse {}: {e}", path.display()))?;
    let unknown = cutover_operator::api::unknown_fields(&doc);
    if !unknown.is_empty() {
        bail!(
            "{} is not a valid plan:\n  - {}",
            path.display(),
            unknown.join("\n  - ")
        );
    }
    let cutover: DatabaseCutover = serde_json::from_value(doc)
        .map_err(|e| anyhow::anyhow!("failed to parse {}: {e}", path.display()))?;
    ValidSpec::new(cutover.spec.clone()).map_err(|invalid| invalid_plan(path, invalid))?;
    Ok(cutover)
}

fn invalid_plan(path: &Path, invalid: cutover_operator::api::InvalidSpec) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is not a valid plan:\n  - {}",
        path.display(),
        invalid.0.join("\n  - ")
    )
}

/// The engine's connections from the plan's Secret references.
fn databases(
    spec: &cutover_operator::api::DatabaseCutoverSpec,
    dir: Option<&Path>,
) -> anyhow::Result<Databases> {
    let blue = Dsn::new(resolve(&spec.source.connection_secret_ref, dir)?);
    let green = Dsn::new(resolve(&spec.target.connection_secret_ref, dir)?);
    let ca = match &spec.source.ca_secret_ref {
        Some(r) => Some(resolve(r, dir)?.into_bytes()),
        None => None,
    };
    Ok(Databases {
        blue_from_green: blue.clone(),
        green_from_blue: green.clone(),
        blue,
        green,
        connect: ConnectOptions {
            ca_pem: ca,
            application_name: "cutover-local".into(),
            ..ConnectOptions::default()
        },
    })
}

/// The failures in a row after which a local run stops retrying an abort that cannot finish
/// and says what is left (the operator, which runs on, keeps retrying with backoff).
const ABORT_ATTEMPTS: i32 = 4;

pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    let cutover = read_plan(&args.plan)?;
    let invalid = |invalid: cutover_operator::api::InvalidSpec| invalid_plan(&args.plan, invalid);
    let mut spec = cutover.spec.clone();
    let dir = args.secrets_dir.as_deref();
    let dbs = databases(&spec, dir)?;
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
    let id = format!("local/{name}");
    let state_file = args
        .state_file
        .clone()
        .unwrap_or_else(|| default_state_file(&args.plan));

    let mut status = match load_state(&state_file, &id)? {
        Some(saved) if saved.phase == Phase::Completed && !args.abort => {
            println!(
                "cutover {name} already completed (state file {}); its report:",
                state_file.display()
            );
            println!(
                "\n{}",
                plan::timing_report(&saved, jiff::Timestamp::now()).render()
            );
            return Ok(());
        }
        Some(saved) if saved.phase.is_terminal() && !args.abort => {
            // A run that aborted or rolled back is over; this is a new attempt.
            let previous = state_file.with_extension("previous.json");
            std::fs::rename(&state_file, &previous)
                .with_context(|| format!("failed to move {} aside", state_file.display()))?;
            println!(
                "the previous attempt ended {} (its state is kept in {}); starting again",
                saved.phase,
                previous.display()
            );
            DatabaseCutoverStatus::default()
        }
        Some(saved) => {
            if !saved.phase.is_terminal() {
                println!(
                    "resuming cutover {name} in phase {} (state file {})",
                    saved.phase,
                    state_file.display()
                );
            }
            saved
        }
        None => DatabaseCutoverStatus::default(),
    };
    if args.abort {
        if status.phase.is_past_point_of_no_return() {
            bail!(
                "cutover {name} is past its point of no return ({}): it cannot be aborted; \
                 request a rollback in the plan (spec.rollback.requested) instead",
                status.phase
            );
        }
        if status.phase.is_terminal() {
            println!("cutover {name} has already ended {}", status.phase);
            return Ok(());
        }
        // Whatever a stopped run left — a frozen source, replication objects — is undone by
        // the abort, which finds it in the databases' own catalogs.
        spec.abort = true;
    }
    println!(
        "cutover {name}: {} → {} ({:?})",
        dbs.blue.redacted(),
        dbs.green.redacted(),
        spec.mode
    );
    let spec = ValidSpec::new(spec).map_err(invalid)?;
    let engine = Engine::new(id.clone(), spec, dbs, platform);
    let mut sink = LocalSink {
        plan: args.plan.clone(),
        state_file,
        cutover: id,
        last: Some(status.clone()),
        printer: Printer::new(),
    };
    if status == DatabaseCutoverStatus::default() {
        sink.last = None;
        status = sink.write(&status, &Action::Idle).await?;
    }
    let status = drive(&engine, status, &mut sink).await?;

    println!(
        "\n{}",
        plan::timing_report(&status, jiff::Timestamp::now()).render()
    );
    match status.phase {
        Phase::Completed => Ok(()),
        Phase::Aborted if args.abort => Ok(()),
        other => bail!(
            "the cutover ended {other}: {}",
            status.message.unwrap_or_default()
        ),
    }
}

/// What `cutover cleanup` is given.
#[derive(Debug)]
pub struct CleanupArgs {
    /// The plan file.
    pub plan: PathBuf,
    /// Where Secrets live as files.
    pub secrets_dir: Option<PathBuf>,
    /// The local run's state file (default: beside the plan).
    pub state_file: Option<PathBuf>,
    /// The plan was applied to Kubernetes in this namespace (the operator's cutover), not run
    /// locally.
    pub namespace: Option<String>,
    /// Unfreeze blue although no state says the cutover stopped before its point of no return.
    pub unfreeze: bool,
}

/// `cutover cleanup -f PLAN`: removes what a cutover left on both servers, from the catalogs —
/// after an abort that could not finish, or when a cutover's state is lost. Before the point of
/// no return (as the local state file says, or with `--unfreeze`) that is an abort's undo: blue
/// unfrozen, every replication object dropped, the rows the attempt copied into green's tables
/// removed. Past it, or with no state, only the replication objects (blue's freeze after a
/// switch keeps the old database read-only on purpose).
pub async fn cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    let cutover = read_plan(&args.plan)?;
    let spec = ValidSpec::new(cutover.spec.clone()).map_err(|i| invalid_plan(&args.plan, i))?;
    let name = cutover
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "plan".into());
    let id = match &args.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => format!("local/{name}"),
    };
    let state = match &args.namespace {
        Some(_) => None,
        None => load_state(
            &args
                .state_file
                .clone()
                .unwrap_or_else(|| default_state_file(&args.plan)),
            &id,
        )?,
    };
    let undo = match &state {
        Some(s) => !s.phase.is_past_point_of_no_return(),
        None => args.unfreeze,
    };
    let dbs = databases(spec.spec(), args.secrets_dir.as_deref())?;
    println!(
        "cleaning up cutover {id}: {} → {}",
        dbs.blue.redacted(),
        dbs.green.redacted()
    );
    let engine = Engine::new(id, spec, dbs, LocalPlatform::default());
    let status = state.unwrap_or_default();
    let removed = if undo {
        engine.undo(&status).await
    } else {
        engine.remove_replication().await
    };
    match removed {
        Ok(done) => {
            for d in &done {
                println!("  removed {d}");
            }
            if done.is_empty() {
                println!("  nothing of it was left");
            }
            if !undo {
                println!(
                    "  blue's freeze (if any) was left as it is: the state says the cutover passed \
                     its point of no return, or there is no state (pass --unfreeze to undo it too)"
                );
            }
            Ok(())
        }
        Err(e) => bail!("cleanup could not finish: {e}"),
    }
}

/// `versions: blue 15.14 → green 18.6 (a major upgrade)`.
pub(crate) fn versions_line(v: &cutover_operator::api::ServerVersions) -> String {
    format!(
        "versions: blue {} → green {} ({})",
        v.blue,
        v.green,
        if v.major_upgrade {
            "a major upgrade"
        } else if v.green_major == v.blue_major {
            "the same major"
        } else {
            "a downgrade"
        }
    )
}

/// One line of online verification progress, for people.
/// The parallel initial copy in one line: `initial copy Copying: 2/5 tables, 310 MiB of 1.2 GiB
/// (812040 rows), about 41 s left; indexes 0/6`.
pub(crate) fn copy_line(c: &crate::api::InitialCopyStatus) -> String {
    let bytes = |b: i64| human_bytes(u64::try_from(b).unwrap_or(0));
    let mut line = format!(
        "initial copy {}: {}/{} tables, {} of {} ({} rows)",
        c.stage,
        c.tables_done,
        c.tables_total,
        bytes(c.bytes_copied),
        bytes(c.bytes_total),
        c.rows_copied
    );
    if let Some(eta) = c.eta_seconds {
        line.push_str(&format!(", about {eta:.0} s left"));
    }
    line.push_str(&format!(
        "; indexes {}/{}",
        c.indexes_built, c.indexes_total
    ));
    if c.restarts > 0 {
        line.push_str(&format!("; started over {} times", c.restarts));
    }
    if let Some(why) = &c.failure {
        line.push_str(&format!("; failed: {why}"));
    }
    line
}

pub(crate) fn online_line(o: &crate::api::OnlineVerificationStatus) -> String {
    let mut line = format!(
        "online verification {}: {}/{} ranges proven ({} rows), {} changed keys to compare again, {} rounds",
        o.state, o.ranges_proven, o.ranges_total, o.rows_proven, o.dirty_keys, o.rounds
    );
    if !o.tables_in_freeze.is_empty() {
        line.push_str(&format!(
            "; hashed whole inside the freeze: {} (~{} rows)",
            o.tables_in_freeze.join(", "),
            o.rows_in_freeze
        ));
    }
    if let Some(e) = &o.last_error {
        line.push_str(&format!("; last error: {e}"));
    }
    line
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
