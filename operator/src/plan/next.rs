//! `next_action`: what to do next, decided from the spec, the recorded status, fresh
//! observations and the clock — and `record`: how the status changes once an action is done.
//!
//! Both are pure. The executor (the controller, or local mode) observes, asks `next_action`,
//! performs exactly that one action, and writes the status `record` returns. Every action is
//! idempotent at the IO layer, and every one-shot action leaves a [`Milestone`] in the status, so a
//! process killed at any moment resumes without doing a step twice or skipping one.

use std::time::Duration;

use crate::api::units::parse_timestamp;
use crate::api::{
    Approval, CheckOutcome, CheckResult, CheckpointStatus, DatabaseCutoverStatus, DeferredIndex,
    InitialCopy, InitialCopyStatus, LargeObjects, Milestone, Mode, OnlineVerificationStatus, Phase,
    Problem, ProblemKind, ReplicationStatus, RetryStatus, ServerVersions, StepOutcome, StepRecord,
    ValidSpec, VerificationMode, VerificationStatus,
};

/// `status.onlineVerification.state` of a verification that cannot run online.
pub const ONLINE_UNAVAILABLE: &str = "Unavailable";

/// How often a waiting step looks again.
pub const POLL: Duration = Duration::from_secs(5);
/// How often the final sync looks again: the write freeze is running.
pub const FAST_POLL: Duration = Duration::from_millis(200);
/// How long to look again when nothing is left to do (a finished cutover).
pub const IDLE: Duration = Duration::from_secs(300);
/// How long the final sync's observation waits in place for green to pass the sync point
/// (writes are frozen: a round trip through a new step would only lengthen the freeze).
pub const SYNC_WAIT: Duration = Duration::from_secs(1);
/// How long a hypercare checkpoint waits for reverse replication to bring blue up to date.
pub const CHECKPOINT_CATCH_UP: Duration = Duration::from_secs(30);
/// How long a rollback waits in one step for blue to apply what green wrote.
pub const REVERSE_CATCH_UP: Duration = Duration::from_secs(60);
/// The first retry after a transient failure while writes are frozen, doubling up to
/// [`FROZEN_RETRY_MAX`]: a database back after a restart should cost the freeze little.
pub const FROZEN_RETRY_MIN: Duration = Duration::from_millis(200);
/// The longest pause between retries while writes are frozen.
pub const FROZEN_RETRY_MAX: Duration = Duration::from_secs(5);

/// A run of apply failures on the target this long, the count still rising, aborts the cutover
/// before the freeze (PostgreSQL would retry the failing change forever).
pub const APPLY_FAILING_FOR: Duration = Duration::from_secs(30);
/// The same while writes are frozen: the final sync cannot finish, so the freeze ends soon.
pub const APPLY_FAILING_IN_FREEZE: Duration = Duration::from_secs(10);
/// A run of apply failures ends after this long without a new one (a restart of either server
/// costs a few failed attempts).
pub const APPLY_QUIET: Duration = Duration::from_secs(15);

/// What the IO layer saw just now (cheap reads only; never the result of an action).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observations {
    /// The resource is being deleted.
    pub deleting: bool,
    /// The migration Job, when one exists.
    pub migration_job: Option<JobState>,
    /// Replication progress, when the subscription exists.
    pub replication: Option<ReplicationObservation>,
    /// The target applied everything up to `status.freezeLsn`.
    pub applied_past_freeze: bool,
    /// Reverse replication's lag in bytes, when it exists.
    pub reverse_lag_bytes: Option<u64>,
    /// The source applied everything written on the target up to the rollback freeze.
    pub reverse_caught_up: bool,
    /// Set when reverse replication (target to source) exists and is broken, with why.
    pub reverse_broken: Option<String>,
    /// Restarted workloads whose rollout is stuck, each with why.
    pub rollout_problems: Vec<String>,
    /// What the change witness saw on the source since it last looked.
    pub source_writes: Option<WitnessObservation>,
    /// The online verification running in this process, if one does (`verification.mode:
    /// Online`, from Replicating to Verifying).
    pub online: Option<OnlineVerificationStatus>,
    /// The forward subscription's apply on the target: during Replicating, and during the final
    /// sync once green has not passed the sync point within [`SYNC_WAIT`].
    pub apply: Option<ApplyObservation>,
    /// The operator's parallel initial copy running (or ended) in this process, until the
    /// subscription exists (`replication.initialCopy: Parallel`).
    pub copy: Option<CopyObservation>,
}

/// The parallel initial copy, as this process sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CopyObservation {
    /// Its progress, as the status shows it.
    pub status: InitialCopyStatus,
    /// Still at work (not failed, not finished).
    pub running: bool,
}

/// The forward subscription's apply, as the target's statistics show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyObservation {
    /// Failed attempts of its apply and table-sync workers so far (cumulative).
    pub errors: u64,
    /// Why they fail, read when the count rose since the status recorded it.
    pub cause: Option<String>,
    /// Rows the source updated or deleted that the target lacked, which PostgreSQL skips
    /// silently (its conflict statistics, 18 and newer), for people.
    pub missing_rows: Option<String>,
    /// Set when the subscription or its slot is gone or disabled, with why.
    pub broken: Option<String>,
}

/// One look of the change witness on the source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WitnessObservation {
    /// Changes committed after the sync point by anyone but the cutover, new since the last
    /// look.
    pub writes: u64,
    /// Some of them, for people.
    pub samples: Vec<String>,
    /// The WAL position looked up to.
    pub up_to: Option<String>,
    /// The witness slot is gone or its WAL was removed.
    pub lost: bool,
}

/// Which set of migrations a Job applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationSet {
    /// `spec.migrations.configMapRef`, applied to the target before replication starts.
    Initial,
    /// `spec.migrations.postSwitchConfigMapRef`, applied to the target during the switch.
    PostSwitch,
}

/// A Job's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Still running (or pending).
    Running,
    /// Completed successfully.
    Succeeded,
    /// Failed for good, with the reason Kubernetes gives.
    Failed(String),
}

/// Replication as observed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicationObservation {
    /// Tables whose initial copy is done.
    pub tables_ready: u32,
    /// Tables replicated.
    pub tables_total: u32,
    /// Bytes of WAL the target has not applied.
    pub lag_bytes: u64,
    /// Set when replication is broken (worker erroring, slot lost), with why.
    pub broken: Option<String>,
}

/// The one thing to do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Nothing to do until something changes.
    Idle,
    /// Look again after this long (status may still be refreshed from observations).
    Wait(Duration),
    /// Move to the next phase (status only).
    Advance(Phase),
    /// Stop before the point of no return: go to `Aborting`, with why.
    Abort(String),
    /// Run the preflight checks.
    RunPreflight,
    /// Create the migration Job of this set (if it does not exist yet).
    LaunchMigrations(MigrationSet),
    /// List green's secondary indexes and constraints to set aside during the parallel copy
    /// (recorded before any is dropped).
    DeferIndexes,
    /// Create the publication and the subscription (if they do not exist yet); with the
    /// parallel copy, start the copy, which creates the subscription when it is done.
    StartReplication,
    /// Start comparing rows while the application writes (a new pass, in this process).
    StartOnlineVerification,
    /// Stop writes on the source and read its WAL position afterwards.
    Freeze,
    /// Compare source and target.
    Verify,
    /// Record the point of no return and enter `Switching`.
    PassPointOfNoReturn,
    /// One irreversible step of the switch (or of a rollback).
    Do(Milestone),
    /// Re-run row counts and spot checks (hypercare checkpoint number `n`, from 0).
    Checkpoint(usize),
    /// Rehearsal is over: undo the freeze, remove replication objects, record the report.
    EndRehearsal,
    /// Hypercare is over: remove reverse replication and every replication object.
    Complete,
    /// Finish an abort: unfreeze the source, remove everything of ours from both servers.
    FinishAbort,
    /// The resource is being deleted: clean up and let it go.
    Finalize,
}

impl Action {
    /// Whether the action changes what the application sees and must be recorded as intent
    /// first (so a restart finishes or verifies it instead of repeating it blindly).
    pub fn is_irreversible(&self) -> bool {
        matches!(
            self,
            Action::PassPointOfNoReturn
                | Action::Do(Milestone::SecretSwitched | Milestone::SecretSwitchedBack)
        )
    }
}

/// Decides the next action.
pub fn next_action(
    spec: &ValidSpec,
    status: &DatabaseCutoverStatus,
    obs: &Observations,
    now: jiff::Timestamp,
) -> Action {
    let phase = status.phase;
    if obs.deleting {
        return Action::Finalize;
    }
    if phase.is_terminal() {
        return Action::Idle;
    }
    if let Some(intent) = status.intent {
        // An irreversible step was started and not confirmed: finish or verify it first.
        return Action::Do(intent);
    }
    let before_point_of_no_return = !phase.is_past_point_of_no_return() && phase != Phase::Aborting;
    if before_point_of_no_return {
        if spec.abort {
            return Action::Abort("abort requested (spec.abort)".into());
        }
        if let Some(reason) = over_budget(spec, status, now) {
            return Action::Abort(reason);
        }
    }
    match phase {
        Phase::Pending => Action::Advance(Phase::Preflight),
        Phase::Preflight => preflight(spec, status),
        Phase::Migrating => match &obs.migration_job {
            None => Action::LaunchMigrations(MigrationSet::Initial),
            Some(JobState::Running) => Action::Wait(POLL),
            Some(JobState::Failed(why)) => Action::Abort(format!("migrations failed: {why}")),
            Some(JobState::Succeeded) => Action::Advance(Phase::Replicating),
        },
        Phase::Replicating => replicating(spec, status, obs, now),
        Phase::Freezing => match status.frozen_at {
            None => Action::Freeze,
            Some(_) => Action::Advance(Phase::FinalSync),
        },
        Phase::FinalSync => {
            if !obs.applied_past_freeze {
                let apply = obs.apply.as_ref();
                if let Some(why) = apply.and_then(|a| a.broken.as_ref()) {
                    return Action::Abort(format!("the final sync cannot finish: {why}"));
                }
                if let Some(why) = apply.and_then(|a| a.missing_rows.as_ref()) {
                    return Action::Abort(format!("green has diverged from blue: {why}"));
                }
                match apply_failing(status, now) {
                    Some((failing_for, why)) if failing_for >= APPLY_FAILING_IN_FREEZE => {
                        Action::Abort(format!("the final sync cannot finish: {why}"))
                    }
                    _ => Action::Wait(FAST_POLL),
                }
            } else if !done(status, Milestone::SequencesCopied) {
                Action::Do(Milestone::SequencesCopied)
            } else if spec.replication.large_objects == Some(LargeObjects::Carry)
                && !done(status, Milestone::LargeObjectsCopied)
            {
                Action::Do(Milestone::LargeObjectsCopied)
            } else {
                Action::Advance(Phase::Verifying)
            }
        }
        Phase::Verifying | Phase::AwaitingApproval
            if let Some(why) = source_written(status, obs) =>
        {
            Action::Abort(why)
        }
        Phase::Verifying => match &status.verification {
            None => Action::Verify,
            Some(v) if v.matched => Action::Advance(Phase::AwaitingApproval),
            Some(v) => Action::Abort(describe_mismatch(v)),
        },
        Phase::AwaitingApproval => approval(spec, status, now),
        Phase::Switching => switching(spec, status, obs),
        Phase::Hypercare => hypercare(spec, status, obs, now),
        Phase::Aborting => Action::FinishAbort,
        Phase::RollingBack => rolling_back(status, obs),
        Phase::Completed | Phase::Aborted | Phase::RolledBack => Action::Idle,
    }
}

fn done(status: &DatabaseCutoverStatus, m: Milestone) -> bool {
    status.milestones.contains(&m)
}

/// When the current step started (its running step record), if any.
fn step_started(status: &DatabaseCutoverStatus) -> Option<jiff::Timestamp> {
    status
        .steps
        .iter()
        .rev()
        .find(|s| s.name == status.phase && s.outcome == StepOutcome::Running)
        .and_then(|s| parse_timestamp(&s.started_at).ok())
}

fn over_budget(
    spec: &ValidSpec,
    status: &DatabaseCutoverStatus,
    now: jiff::Timestamp,
) -> Option<String> {
    // The status's times are written by the operator alone (RFC 3339). One that does not read
    // (the status edited by hand) must not switch a limit off: the step stops, saying why.
    let unreadable = |field: &str, text: &str| {
        format!("status.{field} {text:?} is not a timestamp: the step's time limits cannot be kept")
    };
    if let Some((name, budget)) = spec.settings().budgets.of(status.phase)
        && let Some(step) = status
            .steps
            .iter()
            .rev()
            .find(|s| s.name == status.phase && s.outcome == StepOutcome::Running)
    {
        let Ok(started) = parse_timestamp(&step.started_at) else {
            return Some(unreadable("steps[].startedAt", &step.started_at));
        };
        if elapsed(started, now) > budget {
            return Some(format!(
                "step {} exceeded its budget (schedule.budgets.{name}: {}){}",
                status.phase,
                spec.schedule
                    .budgets
                    .text_of(status.phase)
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                still_failing(status)
            ));
        }
    }
    if status.phase.source_may_be_frozen()
        && let Some(text) = status.frozen_at.as_deref()
    {
        let Ok(frozen) = parse_timestamp(text) else {
            return Some(unreadable("frozenAt", text));
        };
        if elapsed(frozen, now) > spec.settings().max_write_downtime {
            return Some(format!(
                "writes have been frozen longer than schedule.maxWriteDowntime ({}){}",
                spec.schedule.max_write_downtime,
                still_failing(status)
            ));
        }
    }
    None
}

/// What kept the step from finishing, when it was being retried: a budget that ran out while a
/// transient failure repeated is not the same story as a slow step.
fn still_failing(status: &DatabaseCutoverStatus) -> String {
    status
        .retry
        .as_ref()
        .map(|r| {
            format!(
                "; it kept failing ({} attempts since {}): {}",
                r.attempts, r.since, r.message
            )
        })
        .unwrap_or_default()
}

fn elapsed(since: jiff::Timestamp, now: jiff::Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

/// How long the apply on the target has been failing, with why, while failures still come
/// (the last within [`APPLY_QUIET`]).
fn apply_failing(
    status: &DatabaseCutoverStatus,
    now: jiff::Timestamp,
) -> Option<(Duration, String)> {
    let r = status.replication.as_ref()?;
    let since = parse_timestamp(r.apply_failing_since.as_deref()?).ok()?;
    let last = parse_timestamp(r.apply_failed_at.as_deref()?).ok()?;
    if elapsed(last, now) > APPLY_QUIET {
        return None;
    }
    let failing_for = elapsed(since, now);
    let why = format!(
        "its workers keep failing ({} failed attempts, the first of this run {} ago): {}",
        r.apply_errors.unwrap_or(0),
        super::format_duration(failing_for),
        r.apply_failure
            .as_deref()
            .unwrap_or("green's server log names the error")
    );
    Some((failing_for, why))
}

fn preflight(spec: &ValidSpec, status: &DatabaseCutoverStatus) -> Action {
    if status.preflight.is_empty() {
        return Action::RunPreflight;
    }
    let failed: Vec<&CheckResult> = status
        .preflight
        .iter()
        .filter(|c| c.outcome == CheckOutcome::Fail)
        .collect();
    if !failed.is_empty() {
        let list: Vec<String> = failed
            .iter()
            .map(|c| format!("{}: {}", c.name, c.message))
            .collect();
        return Action::Abort(format!("preflight failed: {}", list.join("; ")));
    }
    Action::Advance(if spec.migrations.is_some() {
        Phase::Migrating
    } else {
        Phase::Replicating
    })
}

fn replicating(
    spec: &ValidSpec,
    status: &DatabaseCutoverStatus,
    obs: &Observations,
    now: jiff::Timestamp,
) -> Action {
    let Some(r) = &obs.replication else {
        if spec.replication.initial_copy == InitialCopy::Parallel {
            if !done(status, Milestone::IndexesDeferred) {
                return Action::DeferIndexes;
            }
            if obs.copy.as_ref().is_some_and(|c| c.running) {
                return Action::Wait(POLL);
            }
        }
        return Action::StartReplication;
    };
    if let Some(why) = &r.broken {
        return Action::Abort(format!("replication is broken: {why}"));
    }
    if let Some(why) = obs.apply.as_ref().and_then(|a| a.missing_rows.as_ref()) {
        return Action::Abort(format!("green has diverged from blue: {why}"));
    }
    if let Some((failing_for, why)) = apply_failing(status, now) {
        if failing_for >= APPLY_FAILING_FOR {
            return Action::Abort(format!("replication cannot apply on green: {why}"));
        }
        // Never freeze while the apply fails: the final sync could not finish.
        return Action::Wait(POLL);
    }
    if r.tables_total == 0 || r.tables_ready < r.tables_total {
        return Action::Wait(POLL);
    }
    // The copy is done: green gets planner statistics while there is time, not after the
    // switch when the application's first queries need them.
    if !done(status, Milestone::TargetAnalyzed) {
        return Action::Do(Milestone::TargetAnalyzed);
    }
    if r.lag_bytes > spec.settings().max_lag_before_freeze {
        return Action::Wait(POLL);
    }
    if spec.verification.mode == VerificationMode::Online {
        match &obs.online {
            None => return Action::StartOnlineVerification,
            Some(o) => {
                if let Some(why) = &o.divergence {
                    return Action::Abort(format!("online verification: {why}"));
                }
                // A verification that cannot run online is done inside the freeze instead.
                let unavailable = o.state == ONLINE_UNAVAILABLE;
                let current = o.started_at.is_some()
                    && o.ranges_proven >= o.ranges_total
                    && o.dirty_keys <= spec.verification.max_dirty_keys;
                if !unavailable && !current {
                    return Action::Wait(POLL);
                }
            }
        }
    }
    if let Some(at) = spec.settings().freeze_at
        && now < at
    {
        return Action::Wait(elapsed(now, at).min(POLL * 12));
    }
    Action::Advance(Phase::Freezing)
}

fn describe_mismatch(v: &VerificationStatus) -> String {
    let mut parts: Vec<String> = v
        .tables
        .iter()
        .filter(|t| !t.matched)
        .map(|t| {
            let diffs = if t.differences.is_empty() {
                format!(
                    "{} rows on the source, {} on the target",
                    t.source_rows, t.target_rows
                )
            } else {
                t.differences.join(", ")
            };
            format!("table {} differs ({diffs})", t.table)
        })
        .collect();
    parts.extend(v.other_mismatches.iter().cloned());
    if parts.is_empty() {
        parts.push("source and target differ".into());
    }
    format!("verification failed: {}", parts.join("; "))
}

fn approval(spec: &ValidSpec, status: &DatabaseCutoverStatus, now: jiff::Timestamp) -> Action {
    let gate = &spec.point_of_no_return;
    if gate.approval == Approval::Automatic || gate.approved {
        return Action::PassPointOfNoReturn;
    }
    let deadline = spec.settings().approval_deadline;
    match step_started(status) {
        Some(started) if elapsed(started, now) > deadline => Action::Abort(format!(
            "no approval within pointOfNoReturn.deadline ({})",
            gate.deadline
        )),
        Some(started) => Action::Wait((deadline - elapsed(started, now)).min(POLL)),
        None => Action::Wait(POLL),
    }
}

/// The switch, in order. The forward subscription goes first: once the target takes writes,
/// nothing may flow into it from the source, and on PostgreSQL before 16 a reverse subscription
/// next to a forward one would loop changes back.
fn switching(spec: &ValidSpec, status: &DatabaseCutoverStatus, obs: &Observations) -> Action {
    let rehearsal = spec.mode == Mode::Rehearsal;
    match next_switch_step(spec, status) {
        // The Job runs on its own; the milestone is recorded once it has finished (the action
        // confirms the outcome, and a failed Job fails the switch, which then rolls back).
        // Writes are frozen meanwhile: look often.
        Some(Milestone::PostSwitchMigrated) => match obs.migration_job {
            None => Action::LaunchMigrations(MigrationSet::PostSwitch),
            Some(JobState::Running) => Action::Wait(FAST_POLL),
            Some(JobState::Succeeded | JobState::Failed(_)) => {
                Action::Do(Milestone::PostSwitchMigrated)
            }
        },
        Some(next) => Action::Do(next),
        None if rehearsal => Action::EndRehearsal,
        None => Action::Advance(Phase::Hypercare),
    }
}

/// The switch's steps in order, for this spec.
fn switch_steps(spec: &ValidSpec) -> Vec<Milestone> {
    let rehearsal = spec.mode == Mode::Rehearsal;
    let mut steps = vec![Milestone::ForwardReplicationDropped];
    if !rehearsal {
        if spec
            .migrations
            .as_ref()
            .is_some_and(|m| m.post_switch_config_map_ref.is_some())
        {
            steps.push(Milestone::PostSwitchMigrated);
        }
        if spec.rollback.as_ref().is_some_and(|r| r.readiness) {
            steps.push(Milestone::ReverseReplicationStarted);
        }
        steps.push(Milestone::TargetLoginAllowed);
    }
    if !rehearsal || spec.switch.rehearsal_secret_ref.is_some() {
        steps.push(Milestone::SecretSwitched);
    }
    if !rehearsal && !spec.switch.restart.is_empty() {
        steps.push(Milestone::WorkloadsRestarted);
    }
    steps
}

/// The first step of the switch not done yet.
fn next_switch_step(spec: &ValidSpec, status: &DatabaseCutoverStatus) -> Option<Milestone> {
    switch_steps(spec).into_iter().find(|m| !done(status, *m))
}

/// What the executor must observe before the next decision: exactly what `next_action` reads
/// in the current phase, nothing more (observations are cheap reads, but they are reads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// The state of this set's migration Job.
    pub migration_job: Option<MigrationSet>,
    /// Copy progress, lag and the forward subscription's health.
    pub replication: bool,
    /// Whether green applied past `status.freezeLsn` (waiting up to [`SYNC_WAIT`]).
    pub applied_past_freeze: bool,
    /// Reverse replication's lag.
    pub reverse_lag: bool,
    /// Whether reverse replication still works.
    pub reverse_health: bool,
    /// Whether the restarted workloads' rollouts are stuck.
    pub rollouts: bool,
    /// What the change witness saw on the source since the freeze.
    pub witness: bool,
}

/// What to observe for the next decision.
pub fn observation_needs(
    spec: &ValidSpec,
    status: &DatabaseCutoverStatus,
    deleting: bool,
) -> Needs {
    if deleting || status.phase.is_terminal() {
        return Needs::default();
    }
    // An abort requested before the point of no return needs nothing observed: a server that
    // cannot be reached must not keep it from starting.
    if spec.abort && !status.phase.is_past_point_of_no_return() {
        return Needs::default();
    }
    // The witness is looked at from the verification on: before the point of no return a write
    // on the source aborts, after the switch it is a hypercare problem.
    let witness = status.freeze_lsn.is_some()
        && matches!(
            status.phase,
            Phase::Verifying | Phase::AwaitingApproval | Phase::Hypercare
        );
    let needs = match status.phase {
        Phase::Migrating => Needs {
            migration_job: Some(MigrationSet::Initial),
            ..Needs::default()
        },
        Phase::Switching
            if status.intent.is_none()
                && next_switch_step(spec, status) == Some(Milestone::PostSwitchMigrated) =>
        {
            Needs {
                migration_job: Some(MigrationSet::PostSwitch),
                ..Needs::default()
            }
        }
        Phase::Replicating => Needs {
            replication: true,
            ..Needs::default()
        },
        Phase::FinalSync => Needs {
            applied_past_freeze: status.freeze_lsn.is_some(),
            ..Needs::default()
        },
        Phase::Hypercare => Needs {
            reverse_lag: true,
            reverse_health: done(status, Milestone::ReverseReplicationStarted),
            rollouts: done(status, Milestone::WorkloadsRestarted),
            ..Needs::default()
        },
        Phase::RollingBack => Needs {
            reverse_lag: true,
            ..Needs::default()
        },
        _ => Needs::default(),
    };
    Needs { witness, ..needs }
}

/// The source's writes after the freeze, counting what the witness sees now.
fn source_writes(status: &DatabaseCutoverStatus, obs: &Observations) -> (i64, bool) {
    let recorded = status.source_writes.as_ref();
    let count = recorded.map_or(0, |w| w.count)
        + obs
            .source_writes
            .as_ref()
            .map_or(0, |w| i64::try_from(w.writes).unwrap_or(i64::MAX));
    let lost = recorded.is_some_and(|w| w.witness_lost)
        || obs.source_writes.as_ref().is_some_and(|w| w.lost);
    (count, lost)
}

/// The examples of source writes, recorded and new.
fn source_write_samples(status: &DatabaseCutoverStatus, obs: &Observations) -> Vec<String> {
    let mut samples: Vec<String> = status
        .source_writes
        .iter()
        .flat_map(|w| w.samples.iter().cloned())
        .collect();
    samples.extend(
        obs.source_writes
            .iter()
            .flat_map(|w| w.samples.iter().cloned()),
    );
    samples.truncate(10);
    samples
}

/// Why the cutover must stop before the point of no return because of the witness, if it must.
fn source_written(status: &DatabaseCutoverStatus, obs: &Observations) -> Option<String> {
    let (count, lost) = source_writes(status, obs);
    if count > 0 {
        return Some(format!(
            "writes on the source after the freeze: {count} (the target would miss them), \
             for example {}",
            source_write_samples(status, obs).join("; ")
        ));
    }
    if lost {
        return Some(
            "the change witness on the source was lost: nothing proves that no one wrote to \
             the source after the freeze"
                .into(),
        );
    }
    None
}

/// What removing a cutover (deleting the resource) must undo, by how far it got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CleanupScope {
    /// Nothing of ours can be on either server: preflight only reads, and a finished cutover
    /// cleaned up after itself (the databases need not even be reachable).
    Nothing,
    /// Before the point of no return: unfreeze the source and remove every replication object.
    Abort,
    /// After it: remove replication objects only; the target stays writable and the Secret as
    /// it stands (the application may be on the target).
    ReplicationOnly,
}

/// What deleting the cutover in its current state must undo.
pub fn cleanup_scope(status: &DatabaseCutoverStatus) -> CleanupScope {
    match status.phase {
        Phase::Pending | Phase::Preflight => CleanupScope::Nothing,
        p if p.is_terminal() => CleanupScope::Nothing,
        p if p.is_past_point_of_no_return() => CleanupScope::ReplicationOnly,
        _ => CleanupScope::Abort,
    }
}

/// Checkpoint offsets, earliest first.
pub fn checkpoint_offsets(spec: &ValidSpec) -> Vec<Duration> {
    spec.settings().checkpoints.clone()
}

fn hypercare(
    spec: &ValidSpec,
    status: &DatabaseCutoverStatus,
    obs: &Observations,
    now: jiff::Timestamp,
) -> Action {
    if let Some(r) = spec
        .rollback
        .as_ref()
        .filter(|r| r.requested && r.readiness)
    {
        // Writes on the source after the switch would be overwritten by going back: a person
        // looks first and acknowledges them.
        let (written, _) = source_writes(status, obs);
        if written == 0 || r.acknowledge_source_writes {
            return Action::Advance(Phase::RollingBack);
        }
    }
    let Some(switched) = status
        .switched_at
        .as_deref()
        .and_then(|t| parse_timestamp(t).ok())
    else {
        // A switch without its timestamp cannot be timed; finishing hypercare needs it.
        return Action::Wait(POLL);
    };
    let since = elapsed(switched, now);
    let offsets = checkpoint_offsets(spec);
    let done_count = usize::try_from(status.checkpoints_done.max(0)).unwrap_or(0);
    if let Some(&offset) = offsets.get(done_count)
        && since >= offset
    {
        return Action::Checkpoint(done_count);
    }
    let length = spec.settings().hypercare;
    if since >= length {
        return Action::Complete;
    }
    let next_due = offsets
        .get(done_count)
        .copied()
        .unwrap_or(length)
        .min(length);
    Action::Wait((next_due - since).min(POLL * 6))
}

/// The way back, skipping what the switch never did: the target is frozen and its sequences
/// copied back only if the application could log in there, reverse replication is waited for
/// only if it was started, the Secret and the workloads are reverted only if they were changed.
fn rolling_back(status: &DatabaseCutoverStatus, obs: &Observations) -> Action {
    let app_reached_target = done(status, Milestone::TargetLoginAllowed);
    let steps = [
        (Milestone::TargetFrozen, app_reached_target),
        (
            Milestone::ReverseCaughtUp,
            done(status, Milestone::ReverseReplicationStarted),
        ),
        (Milestone::SequencesCopiedBack, app_reached_target),
        (
            Milestone::SecretSwitchedBack,
            done(status, Milestone::SecretSwitched),
        ),
        (
            Milestone::WorkloadsRestartedBack,
            done(status, Milestone::WorkloadsRestarted),
        ),
        (Milestone::SourceUnfrozen, true),
        (Milestone::ReplicationCleanedUp, true),
    ];
    let next = steps
        .into_iter()
        .filter(|(_, needed)| *needed)
        .map(|(m, _)| m)
        .find(|m| !done(status, *m));
    match next {
        Some(Milestone::ReverseCaughtUp) if !obs.reverse_caught_up => Action::Wait(FAST_POLL),
        Some(next) => Action::Do(next),
        None => Action::Advance(Phase::RolledBack),
    }
}

/// What an action produced.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The action is done (or there was nothing to do).
    Done,
    /// Preflight ran.
    Preflight {
        /// One result per check.
        checks: Vec<CheckResult>,
        /// Both sides' versions, when they could be read.
        versions: Option<ServerVersions>,
    },
    /// The freeze is in place; the source's WAL position right after it.
    Frozen {
        /// `pg_current_wal_lsn()` read after the drain.
        lsn: String,
    },
    /// Verification ran.
    Verified(VerificationStatus),
    /// Green's indexes and constraints to set aside during the parallel copy.
    Deferred(Vec<DeferredIndex>),
    /// A hypercare checkpoint ran (its number and time are filled in by [`record`]).
    Checked(CheckpointStatus),
    /// The action (or the observation before it) failed. A transient failure is retried
    /// within the step's budget; a permanent one aborts before the point of no return, and
    /// rolls a switch back after it.
    Failed(Failure),
}

/// A failed action, as the plan needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// For people: what failed and why (never a connection string).
    pub message: String,
    /// The kind of failure (Event reason, metric label).
    pub reason: &'static str,
    /// Whether retrying the step may succeed.
    pub transient: bool,
}

impl Failure {
    /// A failure that retrying will not mend.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            reason: "Failed",
            transient: false,
        }
    }

    /// A failure worth retrying (a server restarting, a connection reset).
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            reason: "Failed",
            transient: true,
        }
    }
}

/// Keeps the run of apply failures: it begins when the count rises after a quiet spell of
/// [`APPLY_QUIET`] (or at the first failure) and ends after one.
fn record_apply(s: &mut DatabaseCutoverStatus, a: &ApplyObservation, now: jiff::Timestamp) {
    let stamp = now.to_string();
    let r = s.replication.get_or_insert_default();
    let errors = i64::try_from(a.errors).unwrap_or(i64::MAX);
    let quiet = r
        .apply_failed_at
        .as_deref()
        .and_then(|t| parse_timestamp(t).ok())
        .is_none_or(|at| elapsed(at, now) > APPLY_QUIET);
    if errors > r.apply_errors.unwrap_or(0) {
        if quiet || r.apply_failing_since.is_none() {
            r.apply_failing_since = Some(stamp.clone());
        }
        r.apply_failed_at = Some(stamp);
        if let Some(cause) = &a.cause {
            r.apply_failure = Some(cause.clone());
        }
    } else if quiet {
        r.apply_failing_since = None;
        r.apply_failure = None;
    }
    r.apply_errors = Some(errors);
}

/// The status after `action` ended with `outcome`, at `now`. Observations refresh the
/// replication numbers shown by `kubectl get`.
pub fn record(
    spec: &ValidSpec,
    status: &DatabaseCutoverStatus,
    action: &Action,
    outcome: Outcome,
    obs: &Observations,
    now: jiff::Timestamp,
) -> DatabaseCutoverStatus {
    let mut s = status.clone();
    let stamp = now.to_string();
    if let Some(r) = &obs.replication {
        s.replication = Some(ReplicationStatus {
            tables_ready: i32::try_from(r.tables_ready).unwrap_or(i32::MAX),
            tables_total: i32::try_from(r.tables_total).unwrap_or(i32::MAX),
            lag_bytes: i64::try_from(r.lag_bytes).ok(),
            lag: Some(crate::api::units::human_bytes(r.lag_bytes)),
            reverse_lag_bytes: obs.reverse_lag_bytes.and_then(|b| i64::try_from(b).ok()),
            ..s.replication.take().unwrap_or_default()
        });
    }
    if let Some(a) = &obs.apply {
        record_apply(&mut s, a, now);
    }
    if let Some(c) = &obs.copy {
        let r = s.replication.get_or_insert_default();
        let restarts = r.initial_copy.as_ref().map_or(0, |p| p.restarts);
        r.bytes_copied = Some(c.status.bytes_copied);
        r.initial_copy = Some(InitialCopyStatus {
            restarts: restarts.max(c.status.restarts),
            ..c.status.clone()
        });
    }
    if let Some(w) = &obs.source_writes {
        let (count, lost) = source_writes(&s, obs);
        let samples = source_write_samples(&s, obs);
        let recorded = s.source_writes.get_or_insert_default();
        recorded.count = count;
        recorded.samples = samples;
        recorded.witness_lost = lost;
        if w.up_to.is_some() {
            recorded.checked_up_to = w.up_to.clone();
        }
    }
    if let Some(online) = &obs.online {
        let restarts = s.online_verification.as_ref().map_or(0, |o| o.restarts);
        s.online_verification = Some(OnlineVerificationStatus {
            restarts: restarts.max(online.restarts),
            ..online.clone()
        });
    }
    refresh_problems(&mut s, obs);
    if let Outcome::Failed(failure) = &outcome {
        if failure.transient {
            match retry_allowed(spec, &s, now) {
                Ok(()) => {
                    let retry = s.retry.get_or_insert_with(|| RetryStatus {
                        since: stamp.clone(),
                        ..RetryStatus::default()
                    });
                    retry.attempts = retry.attempts.saturating_add(1);
                    retry.reason = failure.reason.to_owned();
                    retry.message = failure.message.clone();
                    return s;
                }
                Err(limit) => {
                    let attempts = s.retry.as_ref().map_or(1, |r| r.attempts + 1);
                    let why = format!(
                        "{} (still failing after {attempts} attempts, past {limit})",
                        failure.message
                    );
                    return fail(s, why, failure.reason, &stamp);
                }
            }
        }
        return fail(s, failure.message.clone(), failure.reason, &stamp);
    }
    if !matches!(action, Action::Idle) {
        s.retry = None;
    }
    match action {
        Action::Idle | Action::Wait(_) => {}
        Action::Advance(to) => {
            if *to == Phase::Hypercare {
                s.switched_at.get_or_insert(stamp.clone());
                s.write_freeze_seconds = freeze_seconds(&s, now);
                s.hypercare_until = hypercare_end(spec, &s);
            }
            enter(&mut s, *to, StepOutcome::Succeeded, None, &stamp);
            if *to == Phase::RolledBack {
                s.message = Some(rolled_back_message(&s));
            }
        }
        Action::Abort(why) => {
            enter(
                &mut s,
                Phase::Aborting,
                StepOutcome::Failed,
                Some(why.clone()),
                &stamp,
            );
            s.message = Some(why.clone());
        }
        Action::RunPreflight => {
            if let Outcome::Preflight { checks, versions } = outcome {
                s.preflight = checks;
                s.server_versions = versions;
            }
        }
        Action::LaunchMigrations(_) => {}
        Action::DeferIndexes => {
            if let Outcome::Deferred(list) = outcome {
                s.replication.get_or_insert_default().deferred_indexes = list;
            }
            add_milestone(&mut s, Milestone::IndexesDeferred);
        }
        Action::StartReplication => {
            // A parallel copy started again after its process (and snapshot) was lost.
            if let Some(c) = s.replication.as_mut().and_then(|r| r.initial_copy.as_mut())
                && done(status, Milestone::CopyStarted)
            {
                c.restarts += 1;
                c.stage = "Restarting".into();
            }
            add_milestone(&mut s, Milestone::CopyStarted);
        }
        Action::StartOnlineVerification => {
            // A pass that ran in a process gone since is started again.
            if let Some(o) = s.online_verification.as_mut()
                && obs.online.is_none()
            {
                o.state = "Restarting".into();
                o.restarts += 1;
            }
        }
        Action::Freeze => {
            if let Outcome::Frozen { lsn } = outcome {
                s.frozen_at = Some(stamp.clone());
                s.freeze_lsn = Some(lsn);
            }
        }
        Action::Verify => {
            if let Outcome::Verified(v) = outcome {
                s.verification = Some(v);
            }
        }
        Action::PassPointOfNoReturn => {
            s.point_of_no_return_at.get_or_insert(stamp.clone());
            enter(
                &mut s,
                Phase::Switching,
                StepOutcome::Succeeded,
                None,
                &stamp,
            );
        }
        Action::Do(m) => {
            add_milestone(&mut s, *m);
            s.intent = None;
            if *m == Milestone::SecretSwitched {
                s.switched_at.get_or_insert(stamp.clone());
            }
        }
        Action::Checkpoint(n) => {
            let number = i32::try_from(*n + 1).unwrap_or(i32::MAX);
            s.checkpoints_done = s.checkpoints_done.max(number);
            if let Outcome::Checked(result) = outcome {
                s.hypercare.get_or_insert_default().last_checkpoint = Some(CheckpointStatus {
                    number,
                    at: stamp.clone(),
                    ..result
                });
            }
        }
        Action::EndRehearsal => {
            add_milestone(&mut s, Milestone::SourceUnfrozen);
            add_milestone(&mut s, Milestone::ReplicationCleanedUp);
            s.write_freeze_seconds = freeze_seconds(&s, now);
            enter(
                &mut s,
                Phase::Completed,
                StepOutcome::Succeeded,
                None,
                &stamp,
            );
            s.message =
                Some("rehearsal complete: the freeze was undone; see the step timings".into());
        }
        Action::Complete => {
            add_milestone(&mut s, Milestone::ReplicationCleanedUp);
            enter(
                &mut s,
                Phase::Completed,
                StepOutcome::Succeeded,
                None,
                &stamp,
            );
        }
        Action::FinishAbort => {
            add_milestone(&mut s, Milestone::SourceUnfrozen);
            add_milestone(&mut s, Milestone::ReplicationCleanedUp);
            if s.frozen_at.is_some() && s.write_freeze_seconds.is_none() {
                s.write_freeze_seconds = freeze_seconds(&s, now);
            }
            enter(&mut s, Phase::Aborted, StepOutcome::Succeeded, None, &stamp);
        }
        Action::Finalize => {}
    }
    refresh_problems(&mut s, obs);
    s
}

/// The status after a failure that retrying will not mend (or that was retried long enough):
/// before the point of no return the cutover aborts; a failed switch rolls back unless writes
/// would be stranded; hypercare and rollback steps keep retrying with the reason shown.
fn fail(
    mut s: DatabaseCutoverStatus,
    why: String,
    reason: &str,
    stamp: &str,
) -> DatabaseCutoverStatus {
    let phase = s.phase;
    let previous = s.retry.take();
    if s.phase.is_past_point_of_no_return() {
        // A failed switch goes back to the source at once — unless the application may
        // already have written to the target with nothing carrying those writes back:
        // then going back would lose them, so the step is retried instead.
        let writes_stranded =
            done(&s, Milestone::SecretSwitched) && !done(&s, Milestone::ReverseReplicationStarted);
        if s.phase == Phase::Switching && !writes_stranded {
            s.intent = None;
            enter(
                &mut s,
                Phase::RollingBack,
                StepOutcome::Failed,
                Some(why.clone()),
                stamp,
            );
            s.message = Some(format!("the switch failed, rolling back: {why}"));
        } else {
            // Hypercare and rollback steps retry; the controller marks Degraded.
            s.message = Some(why.clone());
        }
    } else if s.phase == Phase::Aborting {
        s.message = Some(format!("abort not finished, retrying: {why}"));
    } else {
        enter(
            &mut s,
            Phase::Aborting,
            StepOutcome::Failed,
            Some(why.clone()),
            stamp,
        );
        s.message = Some(why.clone());
    }
    if s.phase == phase {
        // Still here (an abort or a post-switch step that must finish): tried again, with the
        // same backoff as a transient failure, never in a tight loop.
        let mut retry = previous.unwrap_or_else(|| RetryStatus {
            since: stamp.to_owned(),
            ..RetryStatus::default()
        });
        retry.attempts = retry.attempts.saturating_add(1);
        retry.reason = reason.to_owned();
        retry.message = why;
        s.retry = Some(retry);
    }
    s
}

/// Whether a transient failure in the current phase may be retried now; `Err` names the limit
/// that is exhausted.
fn retry_allowed(
    spec: &ValidSpec,
    s: &DatabaseCutoverStatus,
    now: jiff::Timestamp,
) -> Result<(), String> {
    // Before the point of no return each step's budget bounds the retries (`over_budget`); the
    // switch is bounded by the write downtime it may still take.
    if s.phase == Phase::Switching
        && let Some(frozen) = s.frozen_at.as_deref().and_then(|t| parse_timestamp(t).ok())
        && elapsed(frozen, now) > spec.settings().max_write_downtime
    {
        return Err(format!(
            "schedule.maxWriteDowntime ({})",
            spec.schedule.max_write_downtime
        ));
    }
    Ok(())
}

/// Hypercare's problems, from this pass's observations and the latest checkpoint: a problem
/// that went away is removed. Outside hypercare there is nothing to watch.
fn refresh_problems(s: &mut DatabaseCutoverStatus, obs: &Observations) {
    if s.phase != Phase::Hypercare {
        return;
    }
    let mut problems = Vec::new();
    if let Some(why) = &obs.reverse_broken {
        problems.push(Problem {
            reason: ProblemKind::ReplicationBroken,
            message: format!("reverse replication is broken, a rollback would lose writes: {why}"),
        });
    }
    problems.extend(obs.rollout_problems.iter().map(|why| Problem {
        reason: ProblemKind::RolloutStuck,
        message: why.clone(),
    }));
    if let Some(w) = &s.source_writes
        && (w.count > 0 || w.witness_lost)
    {
        problems.push(Problem {
            reason: ProblemKind::SourceWrittenAfterSwitch,
            message: if w.count > 0 {
                format!(
                    "{} writes on the source after the freeze that the target does not have \
                     (a rollback would overwrite them; set rollback.acknowledgeSourceWrites to \
                     roll back anyway), for example {}",
                    w.count,
                    w.samples.join("; ")
                )
            } else {
                "the change witness on the source was lost: writes to the source can no longer \
                 be seen"
                    .into()
            },
        });
    }
    let hypercare = s.hypercare.get_or_insert_default();
    if let Some(c) = &hypercare.last_checkpoint
        && !c.matched
    {
        problems.push(Problem {
            reason: ProblemKind::CheckpointMismatch,
            message: format!(
                "checkpoint {} found the target and the source differ: {}",
                c.number,
                c.mismatches.join("; ")
            ),
        });
    }
    hypercare.problems = problems;
}

/// Why the cutover ended on the source. A switch that failed keeps its reason (recorded on the
/// Switching step when the rollback began); messages of rollback steps that were retried on the
/// way are not the story.
fn rolled_back_message(s: &DatabaseCutoverStatus) -> String {
    let failed_switch = s
        .steps
        .iter()
        .rev()
        .find(|st| st.name == Phase::Switching && st.outcome == StepOutcome::Failed)
        .and_then(|st| st.message.as_deref());
    match failed_switch {
        Some(why) => {
            format!("rolled back, the application is on the source again; the switch failed: {why}")
        }
        None => "rolled back: the application is on the source again".into(),
    }
}

/// When hypercare ends: `schedule.hypercare` after the switch.
fn hypercare_end(spec: &ValidSpec, s: &DatabaseCutoverStatus) -> Option<String> {
    let switched = parse_timestamp(s.switched_at.as_deref()?).ok()?;
    let length = jiff::SignedDuration::try_from(spec.settings().hypercare).ok()?;
    switched.checked_add(length).ok().map(|t| t.to_string())
}

/// The status to write *before* an irreversible action runs.
pub fn record_intent(
    status: &DatabaseCutoverStatus,
    action: &Action,
) -> Option<DatabaseCutoverStatus> {
    match action {
        Action::Do(m) if action.is_irreversible() && status.intent != Some(*m) => {
            let mut s = status.clone();
            s.intent = Some(*m);
            Some(s)
        }
        _ => None,
    }
}

fn add_milestone(s: &mut DatabaseCutoverStatus, m: Milestone) {
    if !s.milestones.contains(&m) {
        s.milestones.push(m);
    }
}

fn freeze_seconds(s: &DatabaseCutoverStatus, now: jiff::Timestamp) -> Option<f64> {
    let frozen = parse_timestamp(s.frozen_at.as_deref()?).ok()?;
    let end = s
        .switched_at
        .as_deref()
        .and_then(|t| parse_timestamp(t).ok())
        .unwrap_or(now);
    Some(elapsed(frozen, end).as_secs_f64())
}

/// Closes the running step with `outcome` and opens the step of `to`; no-op when already there.
fn enter(
    s: &mut DatabaseCutoverStatus,
    to: Phase,
    outcome: StepOutcome,
    message: Option<String>,
    stamp: &str,
) {
    if s.phase == to {
        return;
    }
    debug_assert!(super::can_transition(s.phase, to), "{} -> {to}", s.phase);
    if let Some(step) = s
        .steps
        .iter_mut()
        .rev()
        .find(|st| st.outcome == StepOutcome::Running)
    {
        step.finished_at = Some(stamp.to_owned());
        step.outcome = outcome;
        step.message = message;
    }
    s.phase = to;
    s.current_step = Some(super::summary(to).message.to_owned());
    s.steps.push(StepRecord {
        name: to,
        started_at: stamp.to_owned(),
        finished_at: if to.is_terminal() {
            Some(stamp.to_owned())
        } else {
            None
        },
        outcome: if to.is_terminal() {
            StepOutcome::Succeeded
        } else {
            StepOutcome::Running
        },
        message: None,
    });
}
