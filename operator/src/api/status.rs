//! What the operator reports about a cutover: the phase, conditions, the per-step timing record,
//! preflight results, replication progress and verification results.
//!
//! Status follows the Kubernetes API conventions: a machine-readable `phase` (a Rust enum,
//! PascalCase on the wire), `observedGeneration`, and `conditions` whose `lastTransitionTime`
//! moves only when their status flips. No connection string or password is ever stored here.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a cutover is in its sequence.
#[derive(
    JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
pub enum Phase {
    /// Accepted, nothing done yet.
    #[default]
    Pending,
    /// Checking both databases: versions, settings, privileges, keys, schema.
    Preflight,
    /// Applying schema migrations to the target.
    Migrating,
    /// Initial copy and catch-up through logical replication.
    Replicating,
    /// Stopping writes on the source.
    Freezing,
    /// Waiting for the target to apply the source's last writes; copying sequences.
    FinalSync,
    /// Comparing source and target.
    Verifying,
    /// Verified; waiting to pass the point of no return.
    AwaitingApproval,
    /// Past the point of no return: pointing the application at the target.
    Switching,
    /// The application runs on the target; the source is kept ready for rollback.
    Hypercare,
    /// Done; replication objects removed.
    Completed,
    /// Undoing a cutover that stopped before the point of no return.
    Aborting,
    /// Stopped before the point of no return; the source is writable and authoritative.
    Aborted,
    /// Moving the application back to the source after the switch.
    RollingBack,
    /// The application is back on the source.
    RolledBack,
}

impl Phase {
    /// Every phase, in sequence order.
    pub const ALL: [Phase; 15] = [
        Phase::Pending,
        Phase::Preflight,
        Phase::Migrating,
        Phase::Replicating,
        Phase::Freezing,
        Phase::FinalSync,
        Phase::Verifying,
        Phase::AwaitingApproval,
        Phase::Switching,
        Phase::Hypercare,
        Phase::Completed,
        Phase::Aborting,
        Phase::Aborted,
        Phase::RollingBack,
        Phase::RolledBack,
    ];

    /// The wire name, as in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Preflight => "Preflight",
            Phase::Migrating => "Migrating",
            Phase::Replicating => "Replicating",
            Phase::Freezing => "Freezing",
            Phase::FinalSync => "FinalSync",
            Phase::Verifying => "Verifying",
            Phase::AwaitingApproval => "AwaitingApproval",
            Phase::Switching => "Switching",
            Phase::Hypercare => "Hypercare",
            Phase::Completed => "Completed",
            Phase::Aborting => "Aborting",
            Phase::Aborted => "Aborted",
            Phase::RollingBack => "RollingBack",
            Phase::RolledBack => "RolledBack",
        }
    }

    /// A phase the cutover never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Aborted | Phase::RolledBack)
    }

    /// Whether the application may already be writing to the target in this phase.
    pub fn is_past_point_of_no_return(self) -> bool {
        matches!(
            self,
            Phase::Switching
                | Phase::Hypercare
                | Phase::Completed
                | Phase::RollingBack
                | Phase::RolledBack
        )
    }

    /// Whether writes on the source may be frozen in this phase.
    pub fn source_may_be_frozen(self) -> bool {
        matches!(
            self,
            Phase::Freezing
                | Phase::FinalSync
                | Phase::Verifying
                | Phase::AwaitingApproval
                | Phase::Switching
                | Phase::Hypercare
                | Phase::Aborting
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The observed state of a `DatabaseCutover`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseCutoverStatus {
    /// Where the cutover is in its sequence.
    #[serde(default)]
    pub phase: Phase,

    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`, `Progressing` and `Degraded`, each with a reason and a message for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// What the current step is doing, in a few words (shown by `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<String>,

    /// One record per step taken, in order: the rehearsal timing report is built from these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepRecord>,

    /// One line per preflight check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preflight: Vec<CheckResult>,

    /// The PostgreSQL versions of source and target, read at preflight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_versions: Option<ServerVersions>,

    /// Initial-copy progress and replication lag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationStatus>,

    /// Result of the comparison of source and target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationStatus>,

    /// When writes on the source were stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_at: Option<String>,

    /// The source's WAL position read right after the freeze; the target must apply past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_lsn: Option<String>,

    /// When the point of no return was passed. Set once; after it the application may write
    /// to the target and `spec.source` / `spec.target` are immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_of_no_return_at: Option<String>,

    /// When the application Secret was pointed at the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_at: Option<String>,

    /// When hypercare ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypercare_until: Option<String>,

    /// Seconds between the freeze and the switch (or the unfreeze): the write downtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_freeze_seconds: Option<f64>,

    /// Why the cutover stopped, when it aborted or rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// One-shot actions already done, in the order they were done. The operator records each
    /// before it moves on, so after a restart it neither repeats nor skips one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub milestones: Vec<Milestone>,

    /// An irreversible action the operator started and has not yet confirmed. After a restart
    /// the operator finishes or verifies it before doing anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Milestone>,

    /// Hypercare checkpoints already run (in `schedule.checkpoints` order, earliest first).
    #[serde(default)]
    pub checkpoints_done: i32,

    /// What hypercare watches: problems present now and the latest checkpoint's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypercare: Option<HypercareStatus>,

    /// Set while the current step keeps failing in a way worth retrying (a database
    /// restarting, a connection reset, the API server busy); cleared by the next success. The
    /// step is retried with backoff within its budget; past it, the cutover aborts (or, during
    /// the switch, rolls back) saying so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryStatus>,

    /// What the change witness on the source saw after the freeze: writes the target would
    /// miss. Before the point of no return one of them aborts the cutover; after the switch
    /// it is a hypercare problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_writes: Option<SourceWrites>,

    /// The comparison made while the application still writes (`verification.mode: Online`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_verification: Option<OnlineVerificationStatus>,
}

/// Progress of the online comparison.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OnlineVerificationStatus {
    /// `Comparing` (the first pass), `Current` (every range proven; changed keys compared in
    /// rounds), `Diverged`, `Restarting` (its evidence was lost or the operator restarted: a
    /// new pass), `Paused` (the freeze began), `Unavailable` (cannot run: why in `lastError`).
    pub state: String,
    /// When this pass started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Tables compared online.
    #[serde(default)]
    pub tables_online: i64,
    /// Tables hashed whole inside the freeze, each with why (no primary key, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables_in_freeze: Vec<String>,
    /// Their rows (the source's estimate): what the freeze will hash whole.
    #[serde(default)]
    pub rows_in_freeze: i64,
    /// Key ranges of the online tables.
    #[serde(default)]
    pub ranges_total: i64,
    /// Of which proven equal.
    #[serde(default)]
    pub ranges_proven: i64,
    /// Rows in the proven ranges.
    #[serde(default)]
    pub rows_proven: i64,
    /// Keys changed since they were last proven equal (compared again in rounds, and inside
    /// the freeze).
    #[serde(default)]
    pub dirty_keys: i64,
    /// Rounds done.
    #[serde(default)]
    pub rounds: i64,
    /// Row changes the change witness saw on the source.
    #[serde(default)]
    pub changes_seen: i64,
    /// How long the first complete pass took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_seconds: Option<f64>,
    /// New passes started (evidence lost, operator restarted).
    #[serde(default)]
    pub restarts: i64,
    /// The last error (retried), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// A difference no later change explains: the cutover stops before the freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergence: Option<String>,
}

/// Writes committed on the source after the freeze by anyone but the cutover.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceWrites {
    /// How many changes (rows) since the sync point.
    pub count: i64,
    /// Some of them, for people (table, operation, key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<String>,
    /// The WAL position up to which the witness has looked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_up_to: Option<String>,
    /// The witness slot was lost: nothing after `checkedUpTo` can be proven.
    #[serde(default)]
    pub witness_lost: bool,
}

/// A step being retried after transient failures.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetryStatus {
    /// Failures in a row.
    pub attempts: i32,
    /// When the first of them happened (RFC 3339).
    pub since: String,
    /// The kind of failure (`DatabaseUnreachable`, `KubeApi`, …).
    pub reason: String,
    /// The latest failure, for people.
    pub message: String,
}

/// What hypercare found.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HypercareStatus {
    /// Problems present now; any one makes the `Degraded` condition true. A problem that goes
    /// away (replication repaired, rollout finished, a later checkpoint matching) is removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
    /// The latest checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointStatus>,
}

/// Something wrong during hypercare.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// The kind of problem (also the `Degraded` condition's reason).
    pub reason: ProblemKind,
    /// What is wrong, for people.
    pub message: String,
}

/// The kinds of hypercare problems.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// Reverse replication (target to source) is disabled, missing or lost its slot: a
    /// rollback would lose the writes made on the target since.
    ReplicationBroken,
    /// A restarted workload does not finish rolling out.
    RolloutStuck,
    /// A checkpoint found row counts that differ between target and source.
    CheckpointMismatch,
    /// Something wrote to the source after the switch that reverse replication did not bring:
    /// a rollback would overwrite it, and the target does not have it.
    SourceWrittenAfterSwitch,
}

impl ProblemKind {
    /// Every kind.
    pub const ALL: [ProblemKind; 4] = [
        ProblemKind::ReplicationBroken,
        ProblemKind::RolloutStuck,
        ProblemKind::CheckpointMismatch,
        ProblemKind::SourceWrittenAfterSwitch,
    ];

    /// The wire name (also the Event reason and the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::ReplicationBroken => "ReplicationBroken",
            ProblemKind::RolloutStuck => "RolloutStuck",
            ProblemKind::CheckpointMismatch => "CheckpointMismatch",
            ProblemKind::SourceWrittenAfterSwitch => "SourceWrittenAfterSwitch",
        }
    }
}

/// The result of one hypercare checkpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// Which checkpoint (1 for the first of `schedule.checkpoints`).
    pub number: i32,
    /// When it ran.
    pub at: String,
    /// Tables counted.
    pub tables: i32,
    /// Rows on the target, all counted tables together.
    pub target_rows: i64,
    /// Whether the counts were compared with the source (only while reverse replication keeps
    /// the source current).
    pub compared_with_source: bool,
    /// Spot checks compared: small key ranges whose rows were hashed on both sides.
    #[serde(default)]
    pub spots: i32,
    /// Whether every compared table had the same count on both sides.
    pub matched: bool,
    /// Tables whose counts differ, and spots whose rows differ, once the source caught up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatches: Vec<String>,
    /// Tables and spots that kept changing under the write load, so no stable comparison was
    /// possible at this checkpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsettled: Vec<String>,
}

/// A one-shot action of the sequence.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Milestone {
    /// The subscription was created on the target, whose replicated tables were empty: an abort
    /// empties them again, so the next attempt starts clean.
    CopyStarted,
    /// The target's secondary indexes and constraints were listed in
    /// `status.replication.deferredIndexes` (parallel copy), before any was dropped.
    IndexesDeferred,
    /// Statistics gathered on the target (`ANALYZE` of the replicated tables) once the initial
    /// copy was done: rows copied by replication carry no planner statistics, and a major
    /// upgrade starts without any.
    TargetAnalyzed,
    /// Every sequence copied from the source to the target.
    SequencesCopied,
    /// Every large object copied from the source to the target (`replication.largeObjects:
    /// Carry`).
    LargeObjectsCopied,
    /// The source-to-target subscription dropped (before anything is written to the target).
    ForwardReplicationDropped,
    /// Post-switch migrations applied to the target.
    PostSwitchMigrated,
    /// Target-to-source replication started.
    ReverseReplicationStarted,
    /// The application roles may log in on the target.
    TargetLoginAllowed,
    /// The application Secret points at the target.
    SecretSwitched,
    /// The listed workloads were restarted.
    WorkloadsRestarted,
    /// Rollback: writes on the target stopped.
    TargetFrozen,
    /// Rollback: the source applied everything written on the target.
    ReverseCaughtUp,
    /// Rollback: sequences copied from the target back to the source.
    SequencesCopiedBack,
    /// Rollback: the application Secret points at the source again.
    SecretSwitchedBack,
    /// Rollback: the listed workloads were restarted again.
    WorkloadsRestartedBack,
    /// Writes on the source are allowed again.
    SourceUnfrozen,
    /// Publications, subscriptions and slots removed from both servers.
    ReplicationCleanedUp,
}

/// The record of one step.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    /// The phase this step belongs to.
    pub name: Phase,
    /// When the step started (RFC 3339).
    pub started_at: String,
    /// When the step finished (RFC 3339); unset while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// How the step ended.
    pub outcome: StepOutcome,
    /// Detail for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// How a step ended.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// Still running.
    Running,
    /// Done.
    Succeeded,
    /// Failed; the cutover aborted or rolled back.
    Failed,
    /// Not needed for this spec.
    Skipped,
}

/// One preflight check.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    /// What was checked (for example `wal_level`, `primary-keys`).
    pub name: String,
    /// Pass, Warn or Fail.
    pub outcome: CheckOutcome,
    /// Why, in words a DBA understands.
    pub message: String,
}

/// The PostgreSQL versions of both sides, as preflight read them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServerVersions {
    /// The source's `server_version` (for example `15.14`).
    pub blue: String,
    /// The target's `server_version`.
    pub green: String,
    /// The source's major version.
    pub blue_major: i32,
    /// The target's major version.
    pub green_major: i32,
    /// The target runs a newer major version than the source: the cutover is a major upgrade,
    /// and a rollback replicates from the newer major back to the older one.
    pub major_upgrade: bool,
}

/// The result of one check.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    /// Fine.
    Pass,
    /// Worth a look; does not stop the cutover.
    Warn,
    /// Stops the cutover.
    Fail,
}

/// Replication progress.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationStatus {
    /// Tables whose initial copy is done and that stream changes.
    pub tables_ready: i32,
    /// Tables replicated.
    pub tables_total: i32,
    /// Bytes copied so far by the initial copy, where PostgreSQL reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_copied: Option<i64>,
    /// Bytes of WAL the target has not applied yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    /// Seconds behind the source, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// The lag for people (`1.2 MiB`), shown by `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<String>,
    /// Lag of the reverse replication (target to source) during hypercare, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_lag_bytes: Option<i64>,
    /// Failed attempts of the subscription's apply and table-sync workers on the target so far
    /// (`pg_stat_subscription_stats`; PostgreSQL restarts a failed worker after
    /// `wal_retrieve_retry_interval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_errors: Option<i64>,
    /// When the current run of failures began (RFC 3339); unset once none came for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_failing_since: Option<String>,
    /// When the failure count last rose (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_failed_at: Option<String>,
    /// Why the workers fail, as far as the catalogs tell (a table that differs after DDL on the
    /// source, a key the target already holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_failure: Option<String>,
    /// The operator's own initial copy (`replication.initialCopy: Parallel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_copy: Option<InitialCopyStatus>,
    /// The target's secondary indexes and constraints set aside for the parallel copy and built
    /// again after it (an abort builds them again too), exactly as they were defined.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deferred_indexes: Vec<DeferredIndex>,
}

/// The progress of the operator's parallel initial copy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InitialCopyStatus {
    /// `CreatingSlot`, `Copying`, `Indexing`, `Done` or `Failed`.
    pub stage: String,
    /// Tables copied completely, of `tablesTotal`.
    pub tables_done: i32,
    /// Tables to copy.
    pub tables_total: i32,
    /// Bytes streamed from the source so far.
    pub bytes_copied: i64,
    /// The source's size of the copied tables (heap and TOAST), the basis of the estimate.
    pub bytes_total: i64,
    /// Rows committed on the target.
    pub rows_copied: i64,
    /// Seconds left at the rate so far, while rows are copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Deferred indexes and constraints built again so far, of `indexesTotal`.
    #[serde(default)]
    pub indexes_built: i32,
    /// Deferred indexes and constraints in all.
    #[serde(default)]
    pub indexes_total: i32,
    /// The WAL position the exported snapshot pairs with: the subscription streams from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_point: Option<String>,
    /// Times the whole copy started over (its process was restarted, its snapshot lost).
    #[serde(default)]
    pub restarts: i32,
    /// Why the last attempt failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Seconds the slot's creation took (waiting for transactions running on the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_seconds: Option<f64>,
    /// Seconds the rows took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_seconds: Option<f64>,
    /// Seconds building the deferred indexes and constraints took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_seconds: Option<f64>,
    /// Each table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<TableCopyStatus>,
}

/// One table of the parallel copy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TableCopyStatus {
    /// `schema.table`.
    pub table: String,
    /// Bytes streamed from the source.
    pub bytes: i64,
    /// Its size on the source.
    pub bytes_total: i64,
    /// Rows committed on the target.
    pub rows: i64,
    /// Key ranges it was split into.
    pub chunks: i32,
    /// Ranges committed.
    pub chunks_done: i32,
    /// Ranges tried again after a failure.
    #[serde(default)]
    pub retries: i32,
}

/// A secondary index or constraint of the target set aside during the parallel copy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeferredIndex {
    /// `schema.table` it belongs to.
    pub table: String,
    /// Its name.
    pub name: String,
    /// `Index`, `Constraint` (unique or exclusion) or `ForeignKey`.
    pub kind: String,
    /// Its definition (`pg_get_indexdef` / `pg_get_constraintdef`).
    pub definition: String,
    /// The index of a primary key or unique constraint, built first (in parallel with the
    /// others) and then taken over by the constraint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
    /// That index's definition (`pg_get_indexdef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_definition: Option<String>,
}

/// The comparison of source and target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VerificationStatus {
    /// Whether everything compared equal.
    pub matched: bool,
    /// Rows compared on the source.
    #[serde(default)]
    pub rows_compared: i64,
    /// One entry per table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<TableVerification>,
    /// Mismatches outside tables (sequences, schema), each named.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_mismatches: Vec<String>,
    /// `Online` (rows compared before the freeze, the changed keys inside it) or `InFreeze`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Why the rows were hashed inside the freeze although `mode` is `Online`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    /// Seconds spent comparing inside the freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_freeze_seconds: Option<f64>,
    /// Keys compared again inside the freeze (changed since they were proven online).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_in_freeze: Option<i64>,
}

/// The comparison of one table.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TableVerification {
    /// `schema.table`.
    pub table: String,
    /// Rows on the source.
    pub source_rows: i64,
    /// Rows on the target.
    pub target_rows: i64,
    /// Whether the table compared equal.
    pub matched: bool,
    /// The first differing keys or key ranges, for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
}
