//! The `DatabaseCutover` custom resource: what a platform team writes.
//!
//! Every field carries a `///` doc because it becomes the schema description that
//! `kubectl explain` shows. Cross-field rules the OpenAPI types cannot express are CEL rules
//! (`x-kubernetes-validations`) so that bad input is rejected at admission with a message a
//! person understands, instead of failing an hour into a cutover.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::DatabaseCutoverStatus;
use super::units::{
    ByteSize, DURATION_LIST_RULE, DURATION_MESSAGE, DURATION_RULE, HumanDuration, Rfc3339,
    SIZE_MESSAGE, SIZE_RULE, TIMESTAMP_MESSAGE, TIMESTAMP_RULE,
};

/// Moves an application from one PostgreSQL database (the source, "blue") to another (the
/// target, "green") with seconds of write downtime: logical replication, a short write freeze,
/// verification, a point of no return, the switch of the application's connection Secret, and
/// hypercare with a way back.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cutover.dbops.dev",
    version = "v1alpha1",
    kind = "DatabaseCutover",
    plural = "databasecutovers",
    singular = "databasecutover",
    shortname = "dbcut",
    namespaced,
    status = "DatabaseCutoverStatus",
    derive = "PartialEq",
    doc = "A move of one application from a source PostgreSQL database to a target one, driven by the cutover operator.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Where the cutover is in its sequence"),
    printcolumn(name = "Step", type_ = "string", json_path = ".status.currentStep", description = "What the current step is doing"),
    printcolumn(name = "Lag", type_ = "string", json_path = ".status.replication.lag", description = "Replication lag from source to target"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.pointOfNoReturnAt) || (self.spec.source == oldSelf.spec.source && self.spec.target == oldSelf.spec.target)"
    ).message("spec.source and spec.target cannot change after the point of no return (status.pointOfNoReturnAt is set); create a new DatabaseCutover instead"),
)]
#[x_kube(
    validation = Rule::new(
        "!(self.source.connectionSecretRef.name == self.target.connectionSecretRef.name && self.source.connectionSecretRef.key == self.target.connectionSecretRef.key)"
    ).message("source and target must be different databases, but both name the same Secret key"),
    validation = Rule::new(
        "!has(self.rollback) || !self.rollback.readiness || (has(self.replication) && self.replication.reverseForRollback)"
    ).message("rollback.readiness needs replication.reverseForRollback: true, otherwise blue falls behind after the switch and cannot be rolled back to"),
    validation = Rule::new(
        "!has(self.rollback) || !self.rollback.requested || self.rollback.readiness"
    ).message("rollback.requested needs rollback.readiness: true; without reverse replication there is nothing safe to roll back to"),
    validation = Rule::new(
        "!has(self.freeze) || self.freeze.method != 'RevokeLogin' || size(self.applicationRoles) > 0"
    ).message("freeze.method RevokeLogin needs at least one entry in applicationRoles: those are the roles whose login is revoked"),
    validation = Rule::new(
        "self.mode != 'Rehearsal' || !has(self.rollback) || !self.rollback.requested"
    ).message("a rehearsal never switches the application, so it cannot be rolled back; it undoes its freeze by itself"),
)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseCutoverSpec {
    /// `Production` switches the application to the target for real. `Rehearsal` runs the
    /// whole sequence against staging databases, never touches the application Secret (it
    /// writes `switch.rehearsalSecretRef` if set) and ends by undoing the freeze, leaving a
    /// timing report in the status.
    #[serde(default)]
    pub mode: Mode,

    /// The database the application uses today (blue). Writes are frozen here during the cutover.
    pub source: DatabaseRef,

    /// The database the application moves to (green).
    pub target: DatabaseRef,

    /// PostgreSQL roles the application connects as. They are frozen on the source during the
    /// freeze (read-only or login revoked, their sessions terminated) and allowed to log in on
    /// the target at the switch.
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub application_roles: Vec<String>,

    /// What is replicated from source to target, and when the lag is small enough to freeze.
    #[serde(default)]
    pub replication: ReplicationSpec,

    /// Schema migrations applied to the target before replication starts, as Kubernetes Jobs
    /// running `cutover migrate` under a PostgreSQL advisory lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrations: Option<MigrationsSpec>,

    /// How writes on the source are stopped for the final sync.
    #[serde(default)]
    pub freeze: FreezeSpec,

    /// How the target is compared with the source before the point of no return.
    #[serde(default)]
    pub verification: VerificationSpec,

    /// The gate before the switch: after it, the application writes to the target.
    #[serde(default)]
    pub point_of_no_return: PointOfNoReturnSpec,

    /// Where the application reads its connection string, and which workloads restart to pick
    /// the new one up.
    pub switch: SwitchSpec,

    /// Timing: when to freeze, how long each step may take, how long hypercare lasts.
    #[serde(default)]
    pub schedule: ScheduleSpec,

    /// Rollback readiness and the rollback request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackSpec>,

    /// Set to true to abort the cutover. Honoured only before the point of no return: the
    /// source is unfrozen and every replication object is removed from both servers.
    #[serde(default)]
    pub abort: bool,
}

/// Production or rehearsal.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Switch the application to the target for real.
    #[default]
    Production,
    /// Run every step against staging databases, do not switch the application, undo the freeze
    /// at the end and report the timings.
    Rehearsal,
}

/// A PostgreSQL database reached through a connection string kept in a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseRef {
    /// The Secret key holding a libpq connection URI (`postgres://user:password@host:5432/db?sslmode=verify-full`)
    /// for a role with the privileges the cutover needs (replication, ownership of the
    /// replicated tables). The URI never appears in status, events or logs.
    pub connection_secret_ref: SecretKeyRef,

    /// Optional Secret key holding a PEM CA bundle used to verify the server's certificate when
    /// the URI asks for `sslmode=verify-ca` or `verify-full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// A key in a Secret in the cutover's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("size(self.name) > 0").message("a Secret reference needs the Secret's name"))]
#[x_kube(validation = Rule::new("size(self.key) > 0").message("a Secret reference needs a key: the entry of the Secret that holds the value"))]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(max = 253))]
    pub key: String,
}

/// A ConfigMap in the cutover's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("size(self.name) > 0").message("a ConfigMap reference needs the ConfigMap's name"))]
pub struct ConfigMapRef {
    /// Name of the ConfigMap.
    #[schemars(length(max = 253))]
    pub name: String,
}

/// What is replicated and how.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationSpec {
    /// Tables to replicate, as `schema.table`. Empty (the default) means every table in the
    /// source database. Partitioned tables are published through their root.
    #[serde(default)]
    #[schemars(length(max = 10000), inner(length(min = 3, max = 129)))]
    #[x_kube(validation = Rule::new("self.all(t, t.matches('^[^.]+[.][^.]+$'))").message("each table must be written as schema.table"))]
    pub tables: Vec<String>,

    /// Freeze as soon as the replication lag is at most this many bytes (for example `16MiB`),
    /// unless `schedule.freezeAt` is later.
    #[serde(default = "default_max_lag")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(SIZE_RULE).message(SIZE_MESSAGE))]
    pub max_lag_before_freeze: ByteSize,

    /// Replicate the target back to the source after the switch (publication on the target,
    /// subscription on the source without copy), so the source stays current and a rollback
    /// loses nothing.
    #[serde(default)]
    pub reverse_for_rollback: bool,

    /// What to do with the source's large objects (`pg_largeobject`), which logical replication
    /// does not carry. Unset: preflight fails when the source has any, so none is lost unseen.
    /// `Carry`: copied to the target inside the write freeze (after the final sync) and compared
    /// by verification. `Ignore`: left behind on purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub large_objects: Option<LargeObjects>,

    /// How the rows already on the source reach the target. `Native`: the subscription's own
    /// copy (`copy_data`), one table at a time per table-sync worker, into the target's schema
    /// with every index in place. `Parallel`: the operator creates the slot with an exported
    /// snapshot, copies every table inside it with `copyParallelism` workers (large tables split
    /// into key ranges), builds the target's secondary indexes and constraints afterwards, then
    /// streams from the slot's consistent point (the default). Choose `Native` where the source
    /// forbids a replication-protocol session for the operator (some managed services).
    #[serde(default)]
    pub initial_copy: InitialCopy,

    /// Workers copying tables at once with `initialCopy: Parallel` (and indexes built at once).
    #[serde(default = "default_copy_parallelism")]
    #[schemars(range(min = 1, max = 64))]
    pub copy_parallelism: i32,

    /// With `initialCopy: Parallel`, tables larger than this on the source are split into key
    /// ranges of about this size (primary keys whose first column is an integer), copied by
    /// several workers at once.
    #[serde(default = "default_copy_split_size")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(SIZE_RULE).message(SIZE_MESSAGE))]
    pub copy_split_size: ByteSize,
}

/// How the initial copy is made.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitialCopy {
    /// The subscription's own copy (`copy_data = true`).
    Native,
    /// The operator's parallel copy from a snapshot exported with the slot, indexes after
    /// (the default).
    #[default]
    Parallel,
}

fn default_copy_parallelism() -> i32 {
    4
}

fn default_copy_split_size() -> ByteSize {
    "256MiB".into()
}

/// How large objects cross over.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LargeObjects {
    /// Copy every large object (data and owner) inside the write freeze; verification compares
    /// their contents.
    Carry,
    /// Leave them behind; the target gets none.
    Ignore,
}

fn default_max_lag() -> ByteSize {
    "16MiB".into()
}

impl Default for ReplicationSpec {
    fn default() -> Self {
        Self {
            tables: Vec::new(),
            max_lag_before_freeze: default_max_lag(),
            reverse_for_rollback: false,
            large_objects: None,
            initial_copy: InitialCopy::default(),
            copy_parallelism: default_copy_parallelism(),
            copy_split_size: default_copy_split_size(),
        }
    }
}

/// Schema migrations run as Jobs against the target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationsSpec {
    /// ConfigMap whose keys are migration files `V<version>__<description>.sql` (and optional
    /// `R<version>__<description>.sql` rollback scripts), applied before replication starts.
    pub config_map_ref: ConfigMapRef,

    /// ConfigMap of migrations applied to the target during the switch, after the point of no
    /// return (for example dropping columns only the old application used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_switch_config_map_ref: Option<ConfigMapRef>,

    /// Container image that runs `cutover migrate`; defaults to the operator's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,

    /// Key of the PostgreSQL advisory lock that serialises migration runners.
    #[serde(default = "default_lock_key")]
    pub lock_key: i64,

    /// `lock_timeout` for each migration statement, so a migration never queues behind a long
    /// transaction and blocks the application.
    #[serde(default = "default_lock_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub lock_timeout: HumanDuration,
}

fn default_lock_key() -> i64 {
    742_189
}

fn default_lock_timeout() -> HumanDuration {
    "5s".into()
}

/// How writes on the source stop.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FreezeSpec {
    /// `ReadOnly` sets `default_transaction_read_only` on the database and the application
    /// roles and terminates their sessions; `RevokeLogin` sets the application roles `NOLOGIN`,
    /// revokes CONNECT and terminates their sessions.
    #[serde(default)]
    pub method: FreezeMethod,

    /// How long in-flight transactions may run after the freeze before they are terminated.
    #[serde(default = "default_drain_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub drain_timeout: HumanDuration,
}

fn default_drain_timeout() -> HumanDuration {
    "30s".into()
}

impl Default for FreezeSpec {
    fn default() -> Self {
        Self {
            method: FreezeMethod::default(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

/// The ways writes can be stopped on the source.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FreezeMethod {
    /// Stop every writer of the source, not only the application roles: `ReadOnly`'s
    /// settings, every client session that predates the freeze ended, and a trigger on every
    /// replicated table refusing writes whatever the role. Only logical replication's apply and
    /// a superuser who deliberately sets `session_replication_role = replica` (or drops the
    /// trigger) get past it.
    #[default]
    Strict,
    /// Make new transactions read-only for the database and the application roles (a session
    /// can turn it off with `SET default_transaction_read_only = off`; other roles are not
    /// stopped).
    ReadOnly,
    /// Forbid the application roles to log in at all.
    RevokeLogin,
}

/// How thoroughly source and target are compared before the point of no return.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(
    "!has(self.mode) || self.mode != 'Online' || !has(self.checksums) || self.checksums == 'Full'"
).message("verification.mode Online compares row hashes while the application writes; with checksums: RowCount set mode: InFreeze"))]
#[serde(rename_all = "camelCase")]
pub struct VerificationSpec {
    /// `Full` hashes every row on both sides (chunked by primary key, inside PostgreSQL);
    /// `RowCount` compares counts, sequences and schema only.
    #[serde(default)]
    pub checksums: ChecksumMode,

    /// How many chunk hashes run at once on each side.
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1, max = 64))]
    pub parallelism: i32,

    /// `Online` (the default) compares every row during Replicating, while the application
    /// still writes, and inside the write freeze only the keys that changed since they were
    /// last proven equal (plus tables without a primary key): the freeze follows the write
    /// rate, not the database's size. `InFreeze` hashes every row inside the freeze.
    #[serde(default)]
    pub mode: VerificationMode,

    /// With `mode: Online`, Replicating moves to Freezing only once every key range has been
    /// proven equal and at most this many changed keys wait to be compared again (they are
    /// compared inside the freeze).
    #[serde(default = "default_max_dirty_keys")]
    #[schemars(range(min = 0))]
    pub max_dirty_keys: i64,

    /// What happens when the online comparison's evidence is lost before the freeze ends (a
    /// change witness slot invalidated or dropped, the operator restarted during the freeze):
    /// `VerifyInFreeze` (the default) hashes every row inside the freeze, as `mode: InFreeze`
    /// does — never a weaker check; `Abort` stops the cutover instead.
    #[serde(default)]
    pub on_witness_loss: WitnessLoss,
}

fn default_parallelism() -> i32 {
    4
}

fn default_max_dirty_keys() -> i64 {
    10_000
}

impl Default for VerificationSpec {
    fn default() -> Self {
        Self {
            checksums: ChecksumMode::default(),
            parallelism: default_parallelism(),
            mode: VerificationMode::default(),
            max_dirty_keys: default_max_dirty_keys(),
            on_witness_loss: WitnessLoss::default(),
        }
    }
}

/// When rows are compared.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VerificationMode {
    /// While the application writes, then only what changed inside the freeze.
    #[default]
    Online,
    /// Every row inside the freeze.
    InFreeze,
}

/// What replaces a lost online comparison.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WitnessLoss {
    /// Hash every row inside the freeze.
    #[default]
    VerifyInFreeze,
    /// Abort the cutover.
    Abort,
}

/// Verification depth.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChecksumMode {
    /// Hash every row on both sides.
    #[default]
    Full,
    /// Compare row counts, sequence values and schema only.
    RowCount,
}

/// The gate before the switch.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PointOfNoReturnSpec {
    /// `Automatic` passes the gate as soon as verification matched; `Manual` waits for
    /// `kubectl cutover approve` (which sets `approved: true`).
    #[serde(default)]
    pub approval: Approval,

    /// How long a manual approval may take after verification; when it passes, the cutover
    /// aborts and the source is unfrozen.
    #[serde(default = "default_deadline")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub deadline: HumanDuration,

    /// Set by `kubectl cutover approve`: the switch may go ahead.
    #[serde(default)]
    pub approved: bool,
}

fn default_deadline() -> HumanDuration {
    "30m".into()
}

impl Default for PointOfNoReturnSpec {
    fn default() -> Self {
        Self {
            approval: Approval::default(),
            deadline: default_deadline(),
            approved: false,
        }
    }
}

/// Who passes the point of no return.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Approval {
    /// The operator, as soon as verification matched.
    #[default]
    Automatic,
    /// A person, with `kubectl cutover approve`.
    Manual,
}

/// The switch of the application to the target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SwitchSpec {
    /// The Secret key the application reads its connection string from. At the switch only this
    /// key changes: it receives the target's connection string.
    pub secret_ref: SecretKeyRef,

    /// In `Rehearsal` mode, the Secret key that receives the target's connection string instead
    /// (nothing is written when unset). The Secret must exist (an empty one is enough): the
    /// operator patches Secrets and never creates them; preflight fails naming it otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rehearsal_secret_ref: Option<SecretKeyRef>,

    /// Workloads restarted after the switch (a pod-template annotation, like
    /// `kubectl rollout restart`) so they reconnect to the target.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub restart: Vec<WorkloadRef>,
}

/// A workload in the cutover's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("size(self.name) > 0").message("a workload reference needs the workload's name"))]
pub struct WorkloadRef {
    /// `Deployment` or `StatefulSet`.
    pub kind: WorkloadKind,
    /// Name of the workload.
    #[schemars(length(max = 253))]
    pub name: String,
}

/// Kinds of workload that can be restarted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// An `apps/v1` Deployment.
    Deployment,
    /// An `apps/v1` StatefulSet.
    StatefulSet,
}

/// Timing of the cutover.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// Earliest time to freeze writes, RFC 3339 (`2026-12-01T02:00:00Z`). Unset: freeze as soon
    /// as the lag is below `replication.maxLagBeforeFreeze`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(TIMESTAMP_RULE).message(TIMESTAMP_MESSAGE))]
    pub freeze_at: Option<Rfc3339>,

    /// Time budget of each step; a step that exceeds its budget before the point of no return
    /// aborts the cutover and unfreezes the source.
    #[serde(default)]
    pub budgets: Budgets,

    /// Longest the source may stay frozen, from the freeze to the switch (or to the unfreeze).
    #[serde(default = "default_max_write_downtime")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub max_write_downtime: HumanDuration,

    /// How long the source is kept in sync and ready for rollback after the switch.
    #[serde(default = "default_hypercare")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub hypercare: HumanDuration,

    /// Offsets after the switch (for example `15m`, `1h`) at which row counts and spot checks
    /// are re-run during hypercare.
    #[serde(default)]
    #[schemars(length(max = 32), inner(length(max = 32)))]
    #[x_kube(validation = Rule::new(DURATION_LIST_RULE).message("each checkpoint must be a duration such as 15m or 1h"))]
    pub checkpoints: Vec<HumanDuration>,
}

fn default_max_write_downtime() -> HumanDuration {
    "10m".into()
}

fn default_hypercare() -> HumanDuration {
    "24h".into()
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            freeze_at: None,
            budgets: Budgets::default(),
            max_write_downtime: default_max_write_downtime(),
            hypercare: default_hypercare(),
            checkpoints: Vec::new(),
        }
    }
}

/// Per-step time budgets. Unset steps use the defaults shown.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Budgets {
    /// Preflight checks (default 5m).
    #[serde(default = "budget_preflight")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub preflight: HumanDuration,
    /// Migrations on the target (default 30m).
    #[serde(default = "budget_migrations")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub migrations: HumanDuration,
    /// Initial copy and catch-up until the freeze may start (default 24h).
    #[serde(default = "budget_replication")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub replication: HumanDuration,
    /// Stopping writes, including the drain (default 1m).
    #[serde(default = "budget_freeze")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub freeze: HumanDuration,
    /// Waiting for the target to apply everything written before the freeze (default 5m).
    #[serde(default = "budget_final_sync")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub final_sync: HumanDuration,
    /// Comparing source and target (default 15m).
    #[serde(default = "budget_verification")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub verification: HumanDuration,
}

fn budget_preflight() -> HumanDuration {
    "5m".into()
}
fn budget_migrations() -> HumanDuration {
    "30m".into()
}
fn budget_replication() -> HumanDuration {
    "24h".into()
}
fn budget_freeze() -> HumanDuration {
    "1m".into()
}
fn budget_final_sync() -> HumanDuration {
    "5m".into()
}
fn budget_verification() -> HumanDuration {
    "15m".into()
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            preflight: budget_preflight(),
            migrations: budget_migrations(),
            replication: budget_replication(),
            freeze: budget_freeze(),
            final_sync: budget_final_sync(),
            verification: budget_verification(),
        }
    }
}

/// Rollback readiness and the rollback request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RollbackSpec {
    /// Keep the source in sync after the switch (needs `replication.reverseForRollback`) so the
    /// application can be moved back during hypercare without losing writes.
    #[serde(default)]
    pub readiness: bool,

    /// Set by `kubectl cutover rollback` during hypercare: freeze the target, let reverse
    /// replication catch up, point the application back at the source and unfreeze it.
    #[serde(default)]
    pub requested: bool,

    /// Roll back even though something wrote to the source after the switch (status
    /// `sourceWrites`): those writes are overwritten or lost. A person sets this after looking.
    #[serde(default)]
    pub acknowledge_source_writes: bool,
}
