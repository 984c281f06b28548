//! The executor shared by the controller, local mode and the tests: it observes the databases,
//! performs the one action `plan::next_action` chose, and reports the outcome for
//! `plan::record`. [`Engine::step`] is the one loop body all of them run.
//!
//! Everything that differs between Kubernetes and a laptop — migration Jobs, the application
//! Secret, workload restarts — sits behind [`Platform`]; everything that talks SQL is the
//! `postgres` engines. Every action is idempotent: the databases' own catalogs say what is done.

mod copy;
mod error;
pub mod online;
mod step;

pub use error::{ActionError, Category, Side, sqlstate_transient, transient_cause};
pub use step::{NoSink, Sink, Step, Watch, drive};

use std::time::Instant;

use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use crate::api::{
    DatabaseCutoverStatus, InitialCopy, InitialCopyStatus, LargeObjects, Milestone,
    OnlineVerificationStatus, Phase, TableCopyStatus, ValidSpec, VerificationMode,
    VerificationStatus, WitnessLoss,
};
use crate::plan::{
    Action, ApplyObservation, CleanupScope, CopyObservation, Failure, JobState, MigrationSet,
    Observations, Outcome, ReplicationObservation, WitnessObservation,
};
use crate::platform::Platform;
use crate::postgres::checkpoint::{self, CountState, ReverseLink};
use crate::postgres::cleanup;
use crate::postgres::copy::{CopyConfig, CopyStage};
use crate::postgres::freeze::{self, FreezeConfig};
use crate::postgres::large_objects;
use crate::postgres::preflight::{self, PreflightOptions};
use crate::postgres::replication::{self, Names, TableSelection};
use crate::postgres::reverse;
use crate::postgres::sync::copy_sequences;
use crate::postgres::verify::online::{OnlineConfig, OnlineError};
use crate::postgres::verify::{self, TableName, VerifyOptions};
use crate::postgres::witness;
use crate::postgres::{ConnectOptions, Dsn, connect};

/// The two databases, as the operator reaches them and as each reaches the other.
#[derive(Clone, Debug)]
pub struct Databases {
    /// The source.
    pub blue: Dsn,
    /// The target.
    pub green: Dsn,
    /// The source as the target's subscription reaches it (usually the same as `blue`).
    pub blue_from_green: Dsn,
    /// The target as the source's reverse subscription reaches it.
    pub green_from_blue: Dsn,
    /// How to connect (CA bundle, application name).
    pub connect: ConnectOptions,
}

/// Runs the actions of one cutover.
#[derive(Debug)]
pub struct Engine<P> {
    /// The cutover id (names of replication objects, the freeze record).
    pub id: String,
    /// What the cutover should do, validated.
    pub spec: ValidSpec,
    /// Where the databases are.
    pub dbs: Databases,
    /// Kubernetes or local.
    pub platform: P,
    names: Names,
    /// While set and false, this process may no longer act (it lost the lead): work running
    /// beside the steps (online verification) stops.
    fence: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl<P: Platform> Engine<P> {
    /// An engine for the cutover `id`.
    pub fn new(id: impl Into<String>, spec: ValidSpec, dbs: Databases, platform: P) -> Self {
        let id = id.into();
        Self {
            names: Names::for_cutover(&id),
            id,
            spec,
            dbs,
            platform,
            fence: None,
        }
    }

    /// Stops background work when `flag` turns false (the controller's leadership).
    pub fn with_fence(mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.fence = Some(flag);
        self
    }

    /// The tables the plan replicates.
    fn selection(&self) -> TableSelection {
        TableSelection::from_spec(&self.spec.replication.tables)
    }

    /// The names of this cutover's replication objects.
    pub fn names(&self) -> &Names {
        &self.names
    }

    async fn blue(&self) -> Result<Client, ActionError> {
        connect(&self.dbs.blue, &self.dbs.connect)
            .await
            .map_err(ActionError::connect(Side::Blue))
    }

    async fn green(&self) -> Result<Client, ActionError> {
        connect(&self.dbs.green, &self.dbs.connect)
            .await
            .map_err(ActionError::connect(Side::Green))
    }

    /// The forward subscription's apply: its failure count, and when the count rose since the
    /// status recorded it, why (conflict statistics where PostgreSQL has them, and a comparison
    /// of the replicated tables, since DDL run on blue only is the usual cause).
    async fn observe_apply(
        &self,
        blue: &Client,
        green: &Client,
        status: &DatabaseCutoverStatus,
        broken: Option<String>,
    ) -> Result<ApplyObservation, ActionError> {
        let health = replication::apply_health(green, &self.names.subscription).await?;
        let recorded = status
            .replication
            .as_ref()
            .and_then(|r| r.apply_errors)
            .unwrap_or(0);
        let cause = if health.errors > recorded {
            let mut parts = Vec::new();
            if !health.blocking_conflicts.is_empty() {
                parts.push(format!(
                    "a change would duplicate a key green already holds ({})",
                    conflict_list(&health.blocking_conflicts)
                ));
            }
            let selection = self.selection();
            if let Ok(tables) = replication::resolve_tables(blue, &selection).await
                && let Some(diff) = preflight::schema_difference(blue, green, &tables).await
            {
                parts.push(format!(
                    "green's tables no longer match blue's — DDL run on blue is not replicated, \
                     run the same change on green: {diff}"
                ));
            }
            if parts.is_empty() {
                parts
                    .push("green's server log names the error of the subscription's worker".into());
            }
            Some(parts.join("; "))
        } else {
            None
        };
        let missing_rows = (!health.skipped_conflicts.is_empty()).then(|| {
            format!(
                "blue updated or deleted rows green lacks, which the apply skipped ({}, \
                 pg_stat_subscription_stats)",
                conflict_list(&health.skipped_conflicts)
            )
        });
        Ok(ApplyObservation {
            errors: u64::try_from(health.errors).unwrap_or(0),
            cause,
            missing_rows,
            broken,
        })
    }

    /// Cheap reads that the next decision needs: exactly what `plan::observation_needs` asks.
    pub async fn observe(
        &self,
        status: &DatabaseCutoverStatus,
        deleting: bool,
    ) -> Result<Observations, ActionError> {
        let needs = crate::plan::observation_needs(&self.spec, status, deleting);
        let mut obs = Observations {
            deleting,
            ..Observations::default()
        };
        if let Some(set) = needs.migration_job {
            obs.migration_job = self.platform.migration_job(set).await?;
        }
        if needs.replication {
            let green = self.green().await?;
            if replication::subscription_exists(&green, &self.names.subscription).await? {
                let progress = replication::progress(&green, &self.names).await?;
                let blue = self.blue().await?;
                let lag = replication::lag(&blue, &self.names).await?;
                let broken =
                    replication::health(&green, &blue, &self.names.subscription, &self.names.slot)
                        .await?;
                obs.apply = Some(self.observe_apply(&blue, &green, status, None).await?);
                obs.replication = Some(ReplicationObservation {
                    tables_ready: u32::try_from(progress.tables_ready).unwrap_or(0),
                    tables_total: u32::try_from(progress.tables_total).unwrap_or(0),
                    lag_bytes: lag.bytes.and_then(|b| u64::try_from(b).ok()).unwrap_or(0),
                    broken,
                });
            }
        }
        if needs.replication && self.spec.replication.initial_copy == InitialCopy::Parallel {
            obs.copy = copy::view(&self.online_key()).map(|v| copy_observation(&v));
        }
        if needs.applied_past_freeze
            && let Some(lsn) = status.freeze_lsn.as_deref().and_then(parse_lsn)
        {
            // Writes are frozen: wait here a moment rather than come back later; the
            // subscriber's received position passes the sync point within a keepalive.
            let blue = self.blue().await?;
            let green = self.green().await?;
            let deadline = Instant::now() + crate::plan::SYNC_WAIT;
            obs.applied_past_freeze =
                replication::wait_applied_by(&blue, &green, &self.names, lsn, deadline)
                    .await
                    .is_ok();
            if !obs.applied_past_freeze {
                // Not there within a second: is the apply failing, or replication gone?
                let broken =
                    replication::health(&green, &blue, &self.names.subscription, &self.names.slot)
                        .await?;
                obs.apply = Some(self.observe_apply(&blue, &green, status, broken).await?);
            }
        }
        if needs.reverse_lag || needs.reverse_health {
            let green = self.green().await?;
            let lag = reverse::reverse_lag(&green, &self.names).await?;
            obs.reverse_lag_bytes = lag.bytes.and_then(|b| u64::try_from(b).ok());
            obs.reverse_caught_up = lag.bytes.is_some_and(|b| b <= 0);
            if needs.reverse_health {
                // Blue unreachable is itself a broken way back.
                obs.reverse_broken = match self.blue().await {
                    Ok(blue) => {
                        replication::health(
                            &blue,
                            &green,
                            &self.names.reverse_subscription,
                            &self.names.reverse_slot,
                        )
                        .await?
                    }
                    Err(e) => Some(e.to_string()),
                };
            }
        }
        if needs.rollouts {
            obs.rollout_problems = self.platform.rollout_problems().await?;
        }
        if self.spec.verification.mode == VerificationMode::Online
            && matches!(
                status.phase,
                Phase::Replicating | Phase::Freezing | Phase::FinalSync | Phase::Verifying
            )
        {
            obs.online = online::view(&self.online_key()).map(|v| online_status(&v));
        }
        if needs.witness
            && let Some(after) = status.freeze_lsn.as_deref().and_then(parse_lsn)
        {
            let blue = self.blue().await?;
            let slot = &self.names.witness_slot;
            // What the status already counted is let go of first.
            if let Some(counted) = status
                .source_writes
                .as_ref()
                .and_then(|w| w.checked_up_to.as_deref())
                .and_then(parse_lsn)
            {
                witness::advance(&blue, slot, counted).await?;
            }
            let seen = witness::look(&blue, slot, after).await?;
            obs.source_writes = Some(WitnessObservation {
                writes: seen.writes,
                samples: seen.samples,
                up_to: seen.upto.map(|l| l.to_string()),
                lost: seen.lost,
            });
        }
        Ok(obs)
    }

    /// Performs one action. Failures come back as [`Outcome::Failed`] with a message for people
    /// (never a connection string) and whether retrying may help.
    pub async fn perform(&self, action: &Action, status: &DatabaseCutoverStatus) -> Outcome {
        match self.try_perform(action, status).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(failure(&e)),
        }
    }

    /// Performs one action, with its error as it is.
    pub async fn try_perform(
        &self,
        action: &Action,
        status: &DatabaseCutoverStatus,
    ) -> Result<Outcome, ActionError> {
        Ok(match action {
            Action::Idle | Action::Wait(_) | Action::Advance(_) | Action::Abort(_) => Outcome::Done,
            Action::RunPreflight => {
                let blue = self.blue().await?;
                let green = self.green().await?;
                let opts = PreflightOptions {
                    tables: self.selection(),
                    reverse: self.spec.replication.reverse_for_rollback,
                    application_roles: self.spec.application_roles.clone(),
                    migrations_first: self.spec.migrations.is_some(),
                    online_verification: self.spec.verification.mode == VerificationMode::Online,
                    large_objects: self.spec.replication.large_objects,
                    ..PreflightOptions::default()
                };
                let (mut checks, versions) = preflight::run(&blue, &green, &opts).await;
                if self.spec.replication.initial_copy == InitialCopy::Parallel {
                    checks.push(self.replication_session_check().await);
                }
                checks.extend(self.platform.preflight().await);
                Outcome::Preflight { checks, versions }
            }
            Action::LaunchMigrations(set) => {
                self.platform.launch_migrations(*set).await?;
                Outcome::Done
            }
            Action::DeferIndexes => {
                let blue = self.blue().await?;
                let green = self.green().await?;
                let tables = replication::resolve_tables(&blue, &self.selection()).await?;
                Outcome::Deferred(crate::postgres::copy::deferrable(&green, &tables).await?)
            }
            Action::StartReplication
                if self.spec.replication.initial_copy == InitialCopy::Parallel =>
            {
                self.start_parallel_copy(status).await?;
                Outcome::Done
            }
            Action::StartReplication => {
                let blue = self.blue().await?;
                let green = self.green().await?;
                let selection = self.selection();
                if self.spec.migrations.is_some() {
                    preflight::schema_ready(&blue, &green, &selection).await?;
                }
                // A new subscription copies into green's tables: they must be empty (rows of an
                // earlier attempt would stop the copy on duplicate keys). A subscription that
                // exists is this attempt's own, resumed.
                if !replication::subscription_exists(&green, &self.names.subscription).await? {
                    let tables = replication::resolve_tables(&blue, &selection).await?;
                    let full = replication::tables_with_rows(&green, &tables).await?;
                    if !full.is_empty() {
                        return Err(ActionError::TargetNotEmpty(full));
                    }
                }
                replication::ensure_publication(&blue, &self.names, &selection).await?;
                replication::ensure_subscription(
                    &blue,
                    &green,
                    &self.names,
                    &self.dbs.blue_from_green,
                )
                .await?;
                Outcome::Done
            }
            Action::StartOnlineVerification => {
                online::start(&self.online_key(), self.online_config(), self.fence.clone());
                Outcome::Done
            }
            Action::Freeze => {
                // No comparison round runs in the freeze: the Verify step takes what is left.
                online::pause(&self.online_key()).await;
                let blue = self.blue().await?;
                let cfg = FreezeConfig {
                    cutover_id: self.id.clone(),
                    method: self.spec.freeze.method,
                    roles: self.spec.application_roles.clone(),
                    drain_timeout: self.spec.settings().drain_timeout,
                    tables: replication::publication_tables(&blue, &self.names.publication).await?,
                };
                freeze::freeze(&blue, &cfg).await?;
                // The witness exists before the sync point is read: every transaction that
                // commits after the sync point is decoded by it.
                crate::postgres::witness::ensure(&blue, &self.names.witness_slot).await?;
                // A position every write before the freeze ends strictly before, which green
                // confirms as soon as it has received it.
                let lsn = replication::sync_point(&blue).await?;
                Outcome::Frozen {
                    lsn: lsn.to_string(),
                }
            }
            Action::Verify => Outcome::Verified(self.verify().await?),
            Action::PassPointOfNoReturn => Outcome::Done,
            Action::Do(m) => {
                self.milestone(*m, status).await?;
                Outcome::Done
            }
            Action::Checkpoint(_) => Outcome::Checked(self.checkpoint(status).await?),
            Action::FinishAbort => {
                self.undo(status).await?;
                Outcome::Done
            }
            // A rehearsal keeps what it copied: the rehearsal Secret names green, for a look
            // at the data (a new attempt on the same pair empties green's tables first).
            Action::EndRehearsal => {
                self.undo_keeping_rows(status).await?;
                Outcome::Done
            }
            Action::Complete => {
                online::stop(&self.online_key()).await;
                copy::stop(&self.online_key()).await;
                let blue = self.blue().await.ok();
                let green = self.green().await?;
                cleanup::cleanup(blue.as_ref(), Some(&green), &self.names).await?;
                Outcome::Done
            }
            Action::Finalize => {
                online::stop(&self.online_key()).await;
                copy::stop(&self.online_key()).await;
                match crate::plan::cleanup_scope(status) {
                    CleanupScope::Nothing => {}
                    CleanupScope::ReplicationOnly => {
                        let blue = self.blue().await.ok();
                        let green = self.green().await.ok();
                        cleanup::cleanup(blue.as_ref(), green.as_ref(), &self.names).await?;
                    }
                    CleanupScope::Abort => {
                        self.undo(status).await?;
                    }
                }
                Outcome::Done
            }
        })
    }

    /// Preflight's `initial-copy` check for the parallel copy: the operator's role on blue can
    /// open a replication-protocol session (`REPLICATION` privilege, `pg_hba.conf`), as the copy
    /// will to create its slot.
    async fn replication_session_check(&self) -> crate::api::CheckResult {
        use crate::api::{CheckOutcome, CheckResult};
        use crate::postgres::walsender::WalsenderConnection;
        let result = async {
            let mut session =
                WalsenderConnection::connect(&self.dbs.blue, &self.dbs.connect).await?;
            session.simple_query("IDENTIFY_SYSTEM").await?;
            session.close().await;
            Ok::<(), crate::postgres::walsender::WalsenderError>(())
        }
        .await;
        let (outcome, message) = match result {
            Ok(()) => (
                CheckOutcome::Pass,
                format!(
                    "the operator opens a replication session to blue: the parallel copy \
                     ({} workers) creates the slot with an exported snapshot",
                    self.spec.replication.copy_parallelism
                ),
            ),
            Err(e) => (
                CheckOutcome::Fail,
                format!(
                    "the operator cannot open a replication session to blue ({e}): grant its \
                     role REPLICATION and allow it in pg_hba.conf, or set \
                     replication.initialCopy: Native"
                ),
            ),
        };
        CheckResult {
            name: "initial-copy".into(),
            outcome,
            message,
        }
    }

    /// Starts the parallel copy (or, when a run of this process failed, reports its failure
    /// after clearing what it left, so that the next attempt starts clean). A subscription that
    /// exists means the copy is done.
    async fn start_parallel_copy(&self, status: &DatabaseCutoverStatus) -> Result<(), ActionError> {
        let key = self.online_key();
        let view = copy::view(&key);
        if view.as_ref().is_some_and(|v| v.failure.is_none()) {
            return Ok(());
        }
        let blue = self.blue().await?;
        let green = self.green().await?;
        let selection = self.selection();
        if self.spec.migrations.is_some() {
            preflight::schema_ready(&blue, &green, &selection).await?;
        }
        if replication::subscription_exists(&green, &self.names.subscription).await? {
            return Ok(());
        }
        copy::stop(&key).await;
        let tables = replication::resolve_tables(&blue, &selection).await?;
        // What an earlier attempt of this cutover left: its slot (and snapshot, gone with its
        // session) and its rows. Both go; the copy starts over from a new snapshot.
        crate::postgres::slots::drop_slot(
            &blue,
            &self.names.slot,
            std::time::Duration::from_secs(10),
        )
        .await
        .map_err(replication::ReplicationError::from)?;
        if status.milestones.contains(&Milestone::CopyStarted) {
            replication::truncate(&green, &tables).await?;
        }
        if let Some((why, transient)) = view.and_then(|v| v.failure) {
            return Err(ActionError::Copy {
                message: why,
                transient,
            });
        }
        let full = replication::tables_with_rows(&green, &tables).await?;
        if !full.is_empty() {
            return Err(ActionError::TargetNotEmpty(full));
        }
        replication::ensure_publication(&blue, &self.names, &selection).await?;
        let deferred = status
            .replication
            .as_ref()
            .map(|r| r.deferred_indexes.clone())
            .unwrap_or_default();
        crate::postgres::copy::drop_deferred(&green, &deferred).await?;
        let parallelism =
            usize::try_from(self.spec.replication.copy_parallelism.max(1)).unwrap_or(1);
        let cfg = CopyConfig {
            blue: self.dbs.blue.clone(),
            green: self.dbs.green.clone(),
            connect: ConnectOptions {
                application_name: "cutover-copy".into(),
                ..self.dbs.connect.clone()
            },
            tables,
            slot: self.names.slot.clone(),
            parallelism,
            split_bytes: i64::try_from(self.spec.settings().copy_split_size).unwrap_or(i64::MAX),
            deferred,
            slot_wait: COPY_SLOT_WAIT,
        };
        copy::start(
            &key,
            cfg,
            copy::Subscribe {
                name: self.names.subscription.clone(),
                publication: self.names.publication.clone(),
                publisher: self.dbs.blue_from_green.clone(),
            },
            self.fence.clone(),
        );
        Ok(())
    }

    /// Undoes a cutover before the point of no return (an abort, a rehearsal's end, a deletion):
    /// blue unfrozen, every replication object removed from both servers, and the rows this
    /// attempt copied into green's tables (empty before it) removed, so that the next attempt
    /// starts clean. A server that cannot be reached does not stop the rest: what could be
    /// undone is, and the error lists what is left (the step is retried).
    /// Returns what was removed, for people.
    pub async fn undo(&self, status: &DatabaseCutoverStatus) -> Result<Vec<String>, ActionError> {
        self.undo_with(status, true).await
    }

    /// [`undo`](Self::undo) without removing the copied rows (a rehearsal's end).
    async fn undo_keeping_rows(
        &self,
        status: &DatabaseCutoverStatus,
    ) -> Result<Vec<String>, ActionError> {
        self.undo_with(status, false).await
    }

    async fn undo_with(
        &self,
        status: &DatabaseCutoverStatus,
        remove_rows: bool,
    ) -> Result<Vec<String>, ActionError> {
        online::stop(&self.online_key()).await;
        copy::stop(&self.online_key()).await;
        // Stopped at preflight: nothing was created on either server, so nothing needs one.
        let created = status.steps.iter().any(|s| {
            !matches!(
                s.name,
                Phase::Pending | Phase::Preflight | Phase::Aborting | Phase::Aborted
            )
        });
        if !created {
            return Ok(Vec::new());
        }
        let blue = self.blue().await;
        let green = self.green().await;
        let mut left = Vec::new();
        // Which tables this attempt filled: blue knows what was published; without blue, the
        // subscription on green still says (until it is dropped below).
        let copied = if remove_rows && status.milestones.contains(&Milestone::CopyStarted) {
            let selection = self.selection();
            match (&blue, &green) {
                (Ok(b), _) => Some(replication::resolve_tables(b, &selection).await?),
                (Err(_), Ok(g)) => {
                    Some(replication::subscription_tables(g, &self.names.subscription).await?)
                        .filter(|t| !t.is_empty())
                }
                (Err(_), Err(_)) => None,
            }
        } else {
            Some(Vec::new())
        };
        match &blue {
            Ok(b) => {
                freeze::unfreeze(b, &self.id).await?;
            }
            Err(_) => left.push(
                "blue's freeze, if it was frozen (read-only settings, triggers cutover_freeze)"
                    .to_owned(),
            ),
        }
        let report = cleanup::cleanup(blue.as_ref().ok(), green.as_ref().ok(), &self.names).await?;
        left.extend(report.skipped);
        let mut removed = report.dropped;
        if let Ok(g) = &green
            && remove_rows
            && status.milestones.contains(&Milestone::LargeObjectsCopied)
        {
            let n = large_objects::remove_all(g).await?;
            removed.push(format!("{n} large objects copied to green"));
        }
        let deferred = status
            .replication
            .as_ref()
            .map(|r| r.deferred_indexes.as_slice())
            .unwrap_or_default();
        match (&green, copied) {
            (Ok(g), Some(tables)) => {
                replication::truncate(g, &tables).await?;

                if !tables.is_empty() {
                    removed.push(format!(
                        "the rows copied into green's tables ({})",
                        tables
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            (_, None) | (Err(_), Some(_))
                if remove_rows && status.milestones.contains(&Milestone::CopyStarted) =>
            {
                left.push("the rows this attempt copied into green's replicated tables".into());
            }
            _ => {}
        }
        // Indexes and constraints set aside for a parallel copy are green's schema: they are
        // built again (on the emptied tables, cheaply), whatever else happened.
        if let Ok(g) = &green
            && !deferred.is_empty()
        {
            crate::postgres::copy::restore(g, deferred).await?;
        }
        incomplete(blue, green, left).map(|()| removed)
    }

    /// Removes every replication object of the cutover from both servers, leaving blue's
    /// freeze and green's rows as they are (past the point of no return). Returns what was
    /// removed.
    pub async fn remove_replication(&self) -> Result<Vec<String>, ActionError> {
        online::stop(&self.online_key()).await;
        copy::stop(&self.online_key()).await;
        let blue = self.blue().await;
        let green = self.green().await;
        let report = cleanup::cleanup(blue.as_ref().ok(), green.as_ref().ok(), &self.names).await?;
        incomplete(blue, green, report.skipped).map(|()| report.dropped)
    }

    fn verify_options(&self) -> VerifyOptions {
        VerifyOptions {
            tables: self
                .spec
                .replication
                .tables
                .iter()
                .filter_map(|t| TableName::parse(t).ok())
                .collect(),
            parallelism: usize::try_from(self.spec.verification.parallelism.max(1)).unwrap_or(1),
            connect: ConnectOptions {
                application_name: "cutover-verify".into(),
                ..self.dbs.connect.clone()
            },
            // What the migrations added to green is not a difference.
            target_may_add: self.spec.migrations.is_some(),
            ..VerifyOptions::default()
        }
    }

    /// Which online verification run is this cutover's: its id and the two servers (one
    /// process may drive cutovers of the same name against other servers, as the tests do).
    fn online_key(&self) -> String {
        format!("{} {} {}", self.id, self.dbs.blue, self.dbs.green)
    }

    fn online_config(&self) -> OnlineConfig {
        let mut options = self.verify_options();
        options.connect.application_name = "cutover-online-verify".into();
        OnlineConfig {
            source: self.dbs.blue.clone(),
            target: self.dbs.green.clone(),
            options,
            source_slot: self.names.online_source_slot.clone(),
            target_slot: self.names.online_target_slot.clone(),
            subscription: self.names.subscription.clone(),
            forward_slot: self.names.slot.clone(),
            keys_per_round: 50_000,
        }
    }

    /// The verification inside the freeze: with `mode: Online`, only what changed since the
    /// online pass proved it (and the tables it cannot follow); every row otherwise, or when
    /// the online evidence is gone (unless the plan says to abort then).
    async fn verify(&self) -> Result<VerificationStatus, ActionError> {
        let mut status = self.verify_rows().await?;
        if self.spec.replication.large_objects == Some(LargeObjects::Carry) {
            let blue = self.blue().await?;
            let green = self.green().await?;
            let differences = large_objects::compare(&blue, &green).await?;
            if !differences.is_empty() {
                status.matched = false;
                status.other_mismatches.extend(differences);
            }
        }
        Ok(status)
    }

    async fn verify_rows(&self) -> Result<VerificationStatus, ActionError> {
        let started = Instant::now();
        let mut options = self.verify_options();
        if self.spec.verification.mode == VerificationMode::InFreeze {
            let report = verify::verify(&self.dbs.blue, &self.dbs.green, &options).await?;
            return Ok(VerificationStatus {
                method: Some("InFreeze".into()),
                ..VerificationStatus::from(&report)
            });
        }
        let fallback = match online::take(&self.online_key()).await {
            Some(mut verifier) => {
                let p = verifier.progress().clone();
                if p.divergence.is_some() || !p.pass_complete {
                    Some(format!(
                        "the online pass had not proven every range ({} of {})",
                        p.ranges_proven, p.ranges_total
                    ))
                } else {
                    let keys = p.dirty_keys;
                    match verifier.finish().await {
                        Ok(online_tables) => {
                            options.hash_only = Some(verifier.tables_in_freeze());
                            let mut report =
                                verify::verify(&self.dbs.blue, &self.dbs.green, &options).await?;
                            report.add_online(online_tables);
                            online::stop(&self.online_key()).await;
                            return Ok(VerificationStatus {
                                method: Some("Online".into()),
                                in_freeze_seconds: Some(started.elapsed().as_secs_f64()),
                                keys_in_freeze: i64::try_from(keys).ok(),
                                ..VerificationStatus::from(&report)
                            });
                        }
                        Err(OnlineError::WitnessLost(slot)) => Some(format!(
                            "the change witness slot {slot} is gone or lost its WAL"
                        )),
                        Err(e) => {
                            // Evidence intact: the step is retried with it.
                            online::give_back(&self.online_key(), verifier).await;
                            return Err(e.into());
                        }
                    }
                }
            }
            None => Some(
                "no online comparison in this process (the operator restarted, or it could not \
                 run)"
                    .to_owned(),
            ),
        };
        online::stop(&self.online_key()).await;
        let reason = fallback.unwrap_or_default();
        if self.spec.verification.on_witness_loss == WitnessLoss::Abort {
            return Err(ActionError::OnlineLost(format!(
                "online verification's evidence is incomplete: {reason}; \
                 verification.onWitnessLoss is Abort"
            )));
        }
        tracing::warn!(cutover = %self.id, %reason, "verifying every row inside the freeze");
        let report = verify::verify(&self.dbs.blue, &self.dbs.green, &options).await?;
        Ok(VerificationStatus {
            method: Some("InFreeze".into()),
            fallback_reason: Some(reason),
            ..VerificationStatus::from(&report)
        })
    }

    async fn milestone(
        &self,
        m: Milestone,
        status: &DatabaseCutoverStatus,
    ) -> Result<(), ActionError> {
        let rehearsal = self.spec.mode == crate::api::Mode::Rehearsal;
        match m {
            // Recorded by StartReplication and DeferIndexes themselves.
            Milestone::CopyStarted | Milestone::IndexesDeferred => {}
            Milestone::ForwardReplicationDropped => {
                let blue = self.blue().await.ok();
                let green = self.green().await?;
                let mut report = cleanup::CleanupReport::default();
                cleanup::drop_subscription(
                    Some(&green),
                    blue.as_ref(),
                    &self.names.subscription,
                    &self.names.slot,
                    &mut report,
                    ("green", "blue"),
                )
                .await?;
            }
            Milestone::ReverseReplicationStarted => {
                let blue = self.blue().await?;
                let green = self.green().await?;
                let tables =
                    replication::publication_tables(&blue, &self.names.publication).await?;
                reverse::start_reverse(
                    &blue,
                    &green,
                    &self.names,
                    &tables,
                    &self.dbs.green_from_blue,
                )
                .await?;
            }
            Milestone::SecretSwitched => {
                self.platform
                    .switch_secret(&self.dbs.green, rehearsal)
                    .await?;
            }
            Milestone::SecretSwitchedBack => {
                self.platform.switch_secret(&self.dbs.blue, false).await?;
            }
            Milestone::WorkloadsRestarted | Milestone::WorkloadsRestartedBack => {
                let generation = format!(
                    "{m:?}-{}",
                    status.point_of_no_return_at.as_deref().unwrap_or("")
                );
                self.platform.restart_workloads(&generation).await?;
            }
            Milestone::TargetAnalyzed => {
                let blue = self.blue().await?;
                let green = self.green().await?;
                let selection = self.selection();
                let tables = replication::resolve_tables(&blue, &selection).await?;
                replication::analyze(&green, &tables).await?;
            }
            Milestone::LargeObjectsCopied => {
                let blue = self.blue().await?;
                let green = self.green().await?;
                large_objects::copy(&blue, &green).await?;
            }
            Milestone::SequencesCopied => {
                let blue = self.blue().await?;
                let green = self.green().await?;
                copy_sequences(&blue, &green).await?;
            }
            Milestone::SequencesCopiedBack => {
                let blue = self.blue().await?;
                let green = self.green().await?;
                copy_sequences(&green, &blue).await?;
            }
            Milestone::TargetFrozen => {
                let green = self.green().await?;
                let cfg = FreezeConfig {
                    cutover_id: format!("{}-rollback", self.id),
                    method: self.spec.freeze.method,
                    roles: self.spec.application_roles.clone(),
                    drain_timeout: self.spec.settings().drain_timeout,
                    tables: replication::publication_tables(
                        &green,
                        &self.names.reverse_publication,
                    )
                    .await?,
                };
                freeze::freeze(&green, &cfg).await?;
            }
            Milestone::ReverseCaughtUp => {
                let green = self.green().await?;
                let lsn = replication::current_lsn(&green).await?;
                replication::wait_applied_slot(
                    &green,
                    &self.names.reverse_slot,
                    lsn,
                    Instant::now() + crate::plan::REVERSE_CATCH_UP,
                )
                .await?;
            }
            Milestone::SourceUnfrozen => {
                let blue = self.blue().await?;
                freeze::unfreeze(&blue, &self.id).await?;
            }
            Milestone::ReplicationCleanedUp => {
                let blue = self.blue().await?;
                let green = self.green().await.ok();
                cleanup::cleanup(Some(&blue), green.as_ref(), &self.names).await?;
            }
            Milestone::PostSwitchMigrated => {
                match self
                    .platform
                    .migration_job(MigrationSet::PostSwitch)
                    .await?
                {
                    Some(JobState::Succeeded) => {}
                    Some(JobState::Failed(why)) => {
                        return Err(ActionError::MigrationsFailed(why));
                    }
                    Some(JobState::Running) | None => {
                        return Err(ActionError::MigrationsRunning);
                    }
                }
            }
            Milestone::TargetLoginAllowed => {
                let blue = self.blue().await?;
                let green = self.green().await?;
                crate::postgres::roles::allow_application(
                    &blue,
                    &green,
                    &self.spec.application_roles,
                )
                .await?;
            }
        }
        Ok(())
    }
}

impl<P: Platform> Engine<P> {
    /// A hypercare checkpoint: the replicated tables' row counts on green, compared with blue
    /// while reverse replication keeps blue current (see `postgres::checkpoint`).
    async fn checkpoint(
        &self,
        status: &DatabaseCutoverStatus,
    ) -> Result<crate::api::CheckpointStatus, ActionError> {
        let green = self.green().await?;
        let reverse_started = status
            .milestones
            .contains(&Milestone::ReverseReplicationStarted);
        let blue = if reverse_started {
            Some(self.blue().await?)
        } else {
            None
        };
        // Blue is compared only while reverse replication works (a broken one is reported by
        // observation; waiting for it here would only time out).
        let blue = match blue {
            Some(blue) => replication::health(
                &blue,
                &green,
                &self.names.reverse_subscription,
                &self.names.reverse_slot,
            )
            .await?
            .is_none()
            .then_some(blue),
            None => None,
        };
        let reverse = blue.is_some();
        let tables = if reverse_started {
            replication::publication_tables(&green, &self.names.reverse_publication).await
        } else {
            replication::resolve_tables(&green, &self.selection()).await
        }?;
        let link = blue.as_ref().map(|source| ReverseLink {
            source,
            subscription: &self.names.reverse_subscription,
            slot: &self.names.reverse_slot,
            catch_up: crate::plan::CHECKPOINT_CATCH_UP,
        });
        let report = checkpoint::run(&green, link.as_ref(), &tables).await?;
        let mut mismatches: Vec<String> = report
            .counts
            .iter()
            .filter(|c| c.state == CountState::Differs)
            .map(|c| {
                format!(
                    "{}: {} rows on green, {} on blue",
                    c.table,
                    c.target_rows,
                    c.source_rows.unwrap_or_default()
                )
            })
            .collect();
        mismatches.extend(
            report
                .spots
                .iter()
                .filter(|s| s.state == CountState::Differs)
                .map(|s| format!("{} ({} rows): the rows differ on blue", s.spot, s.rows)),
        );
        let mut unsettled: Vec<String> = report
            .counts
            .iter()
            .filter(|c| c.state == CountState::Unsettled)
            .map(|c| c.table.to_string())
            .collect();
        unsettled.extend(
            report
                .spots
                .iter()
                .filter(|s| s.state == CountState::Unsettled)
                .map(|s| s.spot.clone()),
        );
        Ok(crate::api::CheckpointStatus {
            tables: i32::try_from(report.counts.len()).unwrap_or(i32::MAX),
            target_rows: report.counts.iter().map(|c| c.target_rows).sum(),
            compared_with_source: reverse,
            spots: i32::try_from(report.spots.len()).unwrap_or(i32::MAX),
            matched: mismatches.is_empty(),
            mismatches,
            unsettled,
            ..crate::api::CheckpointStatus::default()
        })
    }
}

/// The status's view of an online verification run.
/// How long the parallel copy's slot creation waits for transactions running on the source
/// before it gives up, naming them (the step is retried).
const COPY_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// How long `stage` of the copy took (to the millisecond), once it is over.
fn stage_seconds(p: &crate::postgres::copy::CopyProgress, stage: CopyStage) -> Option<f64> {
    p.stage_seconds
        .iter()
        .find(|(s, _)| *s == stage)
        .map(|(_, secs)| (secs * 1000.0).round() / 1000.0)
}

/// The parallel copy as the status shows it.
fn copy_observation(view: &copy::CopyView) -> CopyObservation {
    let p = &view.progress;
    let i32_of = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let stage = if view.failure.is_some() {
        "Failed"
    } else {
        p.stage.as_str()
    };
    CopyObservation {
        status: InitialCopyStatus {
            stage: stage.into(),
            tables_done: i32_of(p.tables_done()),
            tables_total: i32_of(p.tables.len()),
            bytes_copied: p.bytes(),
            bytes_total: p.bytes_total(),
            rows_copied: p.rows(),
            eta_seconds: p.eta_seconds().map(|s| s.round()),
            indexes_built: i32::try_from(p.indexes_built).unwrap_or(i32::MAX),
            indexes_total: i32::try_from(p.indexes_total).unwrap_or(i32::MAX),
            consistent_point: p.consistent_point.clone(),
            restarts: 0,
            failure: view.failure.as_ref().map(|(why, _)| why.clone()),
            slot_seconds: stage_seconds(p, CopyStage::CreatingSlot),
            copy_seconds: stage_seconds(p, CopyStage::Copying),
            index_seconds: stage_seconds(p, CopyStage::Indexing),
            tables: p
                .tables
                .iter()
                .map(|t| TableCopyStatus {
                    table: t.table.clone(),
                    bytes: t.bytes,
                    bytes_total: t.bytes_total,
                    rows: t.rows,
                    chunks: i32::try_from(t.chunks).unwrap_or(i32::MAX),
                    chunks_done: i32::try_from(t.chunks_done).unwrap_or(i32::MAX),
                    retries: i32::try_from(t.retries).unwrap_or(i32::MAX),
                })
                .collect(),
        },
        running: view.failure.is_none() && !view.finished,
    }
}

fn online_status(view: &online::OnlineView) -> OnlineVerificationStatus {
    let Some(p) = &view.progress else {
        return OnlineVerificationStatus {
            state: if view.unavailable.is_some() {
                crate::plan::ONLINE_UNAVAILABLE.into()
            } else {
                "Starting".into()
            },
            restarts: i64::from(view.restarts),
            last_error: view.unavailable.clone().or_else(|| view.last_error.clone()),
            ..OnlineVerificationStatus::default()
        };
    };
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let state = if p.divergence.is_some() {
        "Diverged"
    } else if view.paused {
        "Paused"
    } else if p.pass_complete {
        "Current"
    } else {
        "Comparing"
    };
    OnlineVerificationStatus {
        state: state.into(),
        started_at: view.started_at.map(|t| t.to_string()),
        tables_online: count(p.tables_online),
        tables_in_freeze: p
            .tables_in_freeze
            .iter()
            .map(|(t, why)| format!("{t} ({why})"))
            .collect(),
        rows_in_freeze: p.rows_in_freeze,
        ranges_total: count(p.ranges_total),
        ranges_proven: count(p.ranges_proven),
        rows_proven: p.rows_proven,
        dirty_keys: count(p.dirty_keys),
        rounds: i64::try_from(p.rounds).unwrap_or(i64::MAX),
        changes_seen: i64::try_from(p.changes_seen).unwrap_or(i64::MAX),
        pass_seconds: p.pass_seconds,
        restarts: i64::from(view.restarts),
        last_error: view.last_error.clone(),
        divergence: p.divergence.clone(),
    }
}

/// An error listing `left` when either side could not be reached.
fn incomplete(
    blue: Result<Client, ActionError>,
    green: Result<Client, ActionError>,
    left: Vec<String>,
) -> Result<(), ActionError> {
    match (blue, green) {
        (Err(e), _) | (_, Err(e)) => Err(ActionError::Incomplete {
            cause: Box::new(e),
            left,
        }),
        _ => Ok(()),
    }
}

/// `insert_exists 3, update_exists 1`.
fn conflict_list(conflicts: &[(String, i64)]) -> String {
    conflicts
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_lsn(text: &str) -> Option<PgLsn> {
    text.parse().ok()
}

/// What the plan needs to know of an error: its message, kind and transience.
pub fn failure(e: &ActionError) -> Failure {
    Failure {
        message: e.to_string(),
        reason: e.category().as_str(),
        transient: e.is_transient(),
    }
}
