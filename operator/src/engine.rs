//! The executor shared by the controller and local mode: it observes the databases, performs the
//! one action `plan::next_action` chose, and reports the outcome for `plan::record`.
//!
//! Everything that differs between Kubernetes and a laptop — migration Jobs, the application
//! Secret, workload restarts — sits behind [`Platform`]; everything that talks SQL is the
//! `postgres` engines. Every action is idempotent: the databases' own catalogs say what is done.

use std::future::Future;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use crate::api::units::parse_duration;
use crate::api::{
    DatabaseCutoverSpec, DatabaseCutoverStatus, Milestone, Phase, VerificationStatus,
};
use crate::plan::{Action, JobState, MigrationSet, Observations, Outcome, ReplicationObservation};
use crate::postgres::checkpoint::{self, CountState, ReverseLink};
use crate::postgres::cleanup;
use crate::postgres::freeze::{self, FreezeConfig};
use crate::postgres::preflight::{self, PreflightOptions, preflight};
use crate::postgres::replication::{self, Names, TableSelection};
use crate::postgres::reverse;
use crate::postgres::sync::copy_sequences;
use crate::postgres::verify::{self, TableName, VerifyOptions};
use crate::postgres::{ConnectOptions, Dsn, connect, quote_ident};

/// What differs between running in Kubernetes and running locally.
pub trait Platform: Send + Sync {
    /// The state of the Job applying `set`; `None` when it was never launched.
    fn migration_job(
        &self,
        set: MigrationSet,
    ) -> impl Future<Output = Result<Option<JobState>, String>> + Send;
    /// Launches the Job applying `set` (idempotent).
    fn launch_migrations(
        &self,
        set: MigrationSet,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Points the application at `target` (the rehearsal Secret when `rehearsal`).
    fn switch_secret(
        &self,
        target: &Dsn,
        rehearsal: bool,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Restarts the listed workloads (idempotent per `generation`).
    fn restart_workloads(
        &self,
        generation: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Restarted workloads whose rollout is stuck, each with why (empty when all is well).
    fn rollout_problems(&self) -> impl Future<Output = Result<Vec<String>, String>> + Send;
}

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

/// Why observing or acting failed in a way worth retrying (the plan turns action failures into
/// aborts itself through [`Outcome::Failed`]).
#[derive(Debug, Error)]
pub enum EngineError {
    /// A database could not be reached.
    #[error("failed to reach the {side} database: {source}")]
    Connect {
        /// `blue` or `green`.
        side: &'static str,
        /// Why.
        #[source]
        source: crate::postgres::ConnectError,
    },
    /// An observation query failed.
    #[error("failed to observe {what}: {message}")]
    Observe {
        /// What was being read.
        what: &'static str,
        /// Why.
        message: String,
    },
}

impl EngineError {
    /// A short label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            EngineError::Connect { .. } => "DatabaseUnreachable",
            EngineError::Observe { .. } => "ObservationFailed",
        }
    }
}

/// Runs the actions of one cutover.
#[derive(Debug)]
pub struct Engine<P> {
    /// The cutover id (names of replication objects, the freeze record).
    pub id: String,
    /// What the cutover should do.
    pub spec: DatabaseCutoverSpec,
    /// Where the databases are.
    pub dbs: Databases,
    /// Kubernetes or local.
    pub platform: P,
    names: Names,
}

impl<P: Platform> Engine<P> {
    /// An engine for the cutover `id`.
    pub fn new(
        id: impl Into<String>,
        spec: DatabaseCutoverSpec,
        dbs: Databases,
        platform: P,
    ) -> Self {
        let id = id.into();
        Self {
            names: Names::for_cutover(&id),
            id,
            spec,
            dbs,
            platform,
        }
    }

    /// The names of this cutover's replication objects.
    pub fn names(&self) -> &Names {
        &self.names
    }

    async fn blue(&self) -> Result<Client, EngineError> {
        connect(&self.dbs.blue, &self.dbs.connect)
            .await
            .map_err(|source| EngineError::Connect {
                side: "blue",
                source,
            })
    }

    async fn green(&self) -> Result<Client, EngineError> {
        connect(&self.dbs.green, &self.dbs.connect)
            .await
            .map_err(|source| EngineError::Connect {
                side: "green",
                source,
            })
    }

    /// Cheap reads that the next decision needs.
    pub async fn observe(
        &self,
        status: &DatabaseCutoverStatus,
        deleting: bool,
    ) -> Result<Observations, EngineError> {
        let mut obs = Observations {
            deleting,
            ..Observations::default()
        };
        if deleting || status.phase.is_terminal() {
            return Ok(obs);
        }
        let observe = |what| {
            move |e: replication::ReplicationError| EngineError::Observe {
                what,
                message: e.to_string(),
            }
        };
        match status.phase {
            Phase::Migrating => {
                obs.migration_job = self.observe_job(MigrationSet::Initial).await?;
            }
            Phase::Switching
                if self.has_post_switch_migrations()
                    && status
                        .milestones
                        .contains(&Milestone::ForwardReplicationDropped)
                    && !status.milestones.contains(&Milestone::PostSwitchMigrated) =>
            {
                obs.migration_job = self.observe_job(MigrationSet::PostSwitch).await?;
            }
            Phase::Replicating => {
                let green = self.green().await?;
                let exists = green
                    .query_opt(
                        "SELECT 1 FROM pg_subscription WHERE subname = $1",
                        &[&self.names.subscription],
                    )
                    .await
                    .map_err(|e| EngineError::Observe {
                        what: "the subscription",
                        message: e.to_string(),
                    })?
                    .is_some();
                if exists {
                    let progress = replication::progress(&green, &self.names)
                        .await
                        .map_err(observe("copy progress"))?;
                    let blue = self.blue().await?;
                    let lag = replication::lag(&blue, &self.names)
                        .await
                        .map_err(observe("replication lag"))?;
                    let broken = replication::health(
                        &green,
                        &blue,
                        &self.names.subscription,
                        &self.names.slot,
                    )
                    .await
                    .map_err(observe("replication health"))?;
                    obs.replication = Some(ReplicationObservation {
                        tables_ready: u32::try_from(progress.tables_ready).unwrap_or(0),
                        tables_total: u32::try_from(progress.tables_total).unwrap_or(0),
                        lag_bytes: lag.bytes.and_then(|b| u64::try_from(b).ok()).unwrap_or(0),
                        broken,
                    });
                }
            }
            Phase::FinalSync => {
                if let Some(lsn) = status.freeze_lsn.as_deref().and_then(parse_lsn) {
                    // Writes are frozen: wait here a moment rather than come back later; the
                    // subscriber's received position passes the sync point within a keepalive.
                    let blue = self.blue().await?;
                    let green = self.green().await?;
                    let deadline = Instant::now() + Duration::from_secs(1);
                    obs.applied_past_freeze =
                        replication::wait_applied_by(&blue, &green, &self.names, lsn, deadline)
                            .await
                            .is_ok();
                }
            }
            Phase::Hypercare | Phase::RollingBack => {
                let green = self.green().await?;
                let lag = reverse::reverse_lag(&green, &self.names)
                    .await
                    .map_err(observe("reverse lag"))?;
                obs.reverse_lag_bytes = lag.bytes.and_then(|b| u64::try_from(b).ok());
                obs.reverse_caught_up = lag.bytes.is_some_and(|b| b <= 0);
                if status.phase == Phase::Hypercare {
                    if status
                        .milestones
                        .contains(&Milestone::ReverseReplicationStarted)
                    {
                        // Blue unreachable is itself a broken way back.
                        obs.reverse_broken = match self.blue().await {
                            Ok(blue) => replication::health(
                                &blue,
                                &green,
                                &self.names.reverse_subscription,
                                &self.names.reverse_slot,
                            )
                            .await
                            .map_err(observe("reverse replication"))?,
                            Err(e) => Some(e.to_string()),
                        };
                    }
                    if status.milestones.contains(&Milestone::WorkloadsRestarted) {
                        obs.rollout_problems =
                            self.platform.rollout_problems().await.map_err(|message| {
                                EngineError::Observe {
                                    what: "the workloads' rollout",
                                    message,
                                }
                            })?;
                    }
                }
            }
            _ => {}
        }
        Ok(obs)
    }

    /// Performs one action. Failures come back as [`Outcome::Failed`] with a message for people
    /// (never a connection string).
    pub async fn perform(&self, action: &Action, status: &DatabaseCutoverStatus) -> Outcome {
        match self.try_perform(action, status).await {
            Ok(outcome) => outcome,
            Err(message) => Outcome::Failed(message),
        }
    }

    async fn try_perform(
        &self,
        action: &Action,
        status: &DatabaseCutoverStatus,
    ) -> Result<Outcome, String> {
        let text = |e: &dyn std::fmt::Display| e.to_string();
        Ok(match action {
            Action::Idle | Action::Wait(_) | Action::Advance(_) | Action::Abort(_) => Outcome::Done,
            Action::RunPreflight => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                let green = self.green().await.map_err(|e| text(&e))?;
                let opts = PreflightOptions {
                    tables: TableSelection::from_spec(&self.spec.replication.tables),
                    reverse: self.spec.replication.reverse_for_rollback,
                    application_roles: self.spec.application_roles.clone(),
                    migrations_first: self.spec.migrations.is_some(),
                    ..PreflightOptions::default()
                };
                Outcome::Preflight(preflight(&blue, &green, &opts).await)
            }
            Action::LaunchMigrations(set) => {
                self.platform.launch_migrations(*set).await?;
                Outcome::Done
            }
            Action::StartReplication => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                let green = self.green().await.map_err(|e| text(&e))?;
                let selection = TableSelection::from_spec(&self.spec.replication.tables);
                if self.spec.migrations.is_some() {
                    preflight::schema_ready(&blue, &green, &selection).await?;
                }
                replication::ensure_publication(&blue, &self.names, &selection)
                    .await
                    .map_err(|e| text(&e))?;
                replication::ensure_subscription(
                    &blue,
                    &green,
                    &self.names,
                    &self.dbs.blue_from_green,
                )
                .await
                .map_err(|e| text(&e))?;
                Outcome::Done
            }
            Action::Freeze => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                let cfg = FreezeConfig {
                    cutover_id: self.id.clone(),
                    method: self.spec.freeze.method,
                    roles: self.spec.application_roles.clone(),
                    drain_timeout: parse_duration(&self.spec.freeze.drain_timeout)
                        .map_err(|e| text(&e))?,
                };
                freeze::freeze(&blue, &cfg).await.map_err(|e| text(&e))?;
                // A position every write before the freeze ends strictly before, which green
                // confirms as soon as it has received it.
                let lsn = replication::sync_point(&blue).await.map_err(|e| text(&e))?;
                Outcome::Frozen {
                    lsn: lsn.to_string(),
                }
            }
            Action::CopySequences => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                let green = self.green().await.map_err(|e| text(&e))?;
                copy_sequences(&blue, &green).await.map_err(|e| text(&e))?;
                Outcome::Done
            }
            Action::Verify => {
                let opts = VerifyOptions {
                    tables: self
                        .spec
                        .replication
                        .tables
                        .iter()
                        .filter_map(|t| TableName::parse(t).ok())
                        .collect(),
                    parallelism: usize::try_from(self.spec.verification.parallelism.max(1))
                        .unwrap_or(1),
                    connect: self.dbs.connect.clone(),
                    // What the migrations added to green is not a difference.
                    target_may_add: self.spec.migrations.is_some(),
                    ..VerifyOptions::default()
                };
                let report = verify::verify(&self.dbs.blue, &self.dbs.green, &opts)
                    .await
                    .map_err(|e| text(&e))?;
                Outcome::Verified(VerificationStatus::from(&report))
            }
            Action::PassPointOfNoReturn => Outcome::Done,
            Action::Do(m) => {
                self.milestone(*m, status).await?;
                Outcome::Done
            }
            Action::Checkpoint(_) => Outcome::Checked(self.checkpoint(status).await?),
            Action::EndRehearsal | Action::FinishAbort => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                let green = self.green().await.ok();
                cleanup::abort(&blue, green.as_ref(), &self.names, &self.id)
                    .await
                    .map_err(|e| text(&e))?;
                Outcome::Done
            }
            Action::Complete => {
                let blue = self.blue().await.ok();
                let green = self.green().await.map_err(|e| text(&e))?;
                cleanup::cleanup(blue.as_ref(), Some(&green), &self.names)
                    .await
                    .map_err(|e| text(&e))?;
                Outcome::Done
            }
            Action::Finalize => {
                if status.phase.is_past_point_of_no_return() {
                    // The application may be on green: leave green writable and the Secret as it
                    // stands; remove only the replication objects.
                    let blue = self.blue().await.ok();
                    let green = self.green().await.ok();
                    cleanup::cleanup(blue.as_ref(), green.as_ref(), &self.names)
                        .await
                        .map_err(|e| text(&e))?;
                } else {
                    let blue = self.blue().await.map_err(|e| text(&e))?;
                    let green = self.green().await.ok();
                    cleanup::abort(&blue, green.as_ref(), &self.names, &self.id)
                        .await
                        .map_err(|e| text(&e))?;
                }
                Outcome::Done
            }
        })
    }

    async fn milestone(&self, m: Milestone, status: &DatabaseCutoverStatus) -> Result<(), String> {
        let text = |e: &dyn std::fmt::Display| e.to_string();
        let rehearsal = self.spec.mode == crate::api::Mode::Rehearsal;
        match m {
            Milestone::ForwardReplicationDropped => {
                let blue = self.blue().await.ok();
                let green = self.green().await.map_err(|e| text(&e))?;
                let mut report = cleanup::CleanupReport::default();
                cleanup::drop_subscription(
                    Some(&green),
                    blue.as_ref(),
                    &self.names.subscription,
                    &self.names.slot,
                    &mut report,
                    ("green", "blue"),
                )
                .await
                .map_err(|e| text(&e))?;
            }
            Milestone::ReverseReplicationStarted => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                let green = self.green().await.map_err(|e| text(&e))?;
                let tables = replication::publication_tables(&blue, &self.names.publication)
                    .await
                    .map_err(|e| text(&e))?;
                reverse::start_reverse(
                    &blue,
                    &green,
                    &self.names,
                    &tables,
                    &self.dbs.green_from_blue,
                )
                .await
                .map_err(|e| text(&e))?;
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
            Milestone::SequencesCopied => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                let green = self.green().await.map_err(|e| text(&e))?;
                copy_sequences(&blue, &green).await.map_err(|e| text(&e))?;
            }
            Milestone::SequencesCopiedBack => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                let green = self.green().await.map_err(|e| text(&e))?;
                copy_sequences(&green, &blue).await.map_err(|e| text(&e))?;
            }
            Milestone::TargetFrozen => {
                let green = self.green().await.map_err(|e| text(&e))?;
                let cfg = FreezeConfig {
                    cutover_id: format!("{}-rollback", self.id),
                    method: self.spec.freeze.method,
                    roles: self.spec.application_roles.clone(),
                    drain_timeout: parse_duration(&self.spec.freeze.drain_timeout)
                        .map_err(|e| text(&e))?,
                };
                freeze::freeze(&green, &cfg).await.map_err(|e| text(&e))?;
            }
            Milestone::ReverseCaughtUp => {
                let green = self.green().await.map_err(|e| text(&e))?;
                let lsn = replication::current_lsn(&green)
                    .await
                    .map_err(|e| text(&e))?;
                replication::wait_applied_slot(
                    &green,
                    &self.names.reverse_slot,
                    lsn,
                    Instant::now() + Duration::from_secs(60),
                )
                .await
                .map_err(|e| text(&e))?;
            }
            Milestone::SourceUnfrozen => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                freeze::unfreeze(&blue, &self.id)
                    .await
                    .map_err(|e| text(&e))?;
            }
            Milestone::ReplicationCleanedUp => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                let green = self.green().await.ok();
                cleanup::cleanup(Some(&blue), green.as_ref(), &self.names)
                    .await
                    .map_err(|e| text(&e))?;
            }
            Milestone::PostSwitchMigrated => {
                match self
                    .platform
                    .migration_job(MigrationSet::PostSwitch)
                    .await?
                {
                    Some(JobState::Succeeded) => {}
                    Some(JobState::Failed(why)) => {
                        return Err(format!("post-switch migrations failed: {why}"));
                    }
                    Some(JobState::Running) | None => {
                        return Err("post-switch migrations have not finished".into());
                    }
                }
            }
            Milestone::TargetLoginAllowed => {
                let blue = self.blue().await.map_err(|e| text(&e))?;
                let green = self.green().await.map_err(|e| text(&e))?;
                allow_application(&blue, &green, &self.spec.application_roles).await?;
            }
        }
        Ok(())
    }
}

impl<P: Platform> Engine<P> {
    async fn observe_job(&self, set: MigrationSet) -> Result<Option<JobState>, EngineError> {
        self.platform
            .migration_job(set)
            .await
            .map_err(|message| EngineError::Observe {
                what: match set {
                    MigrationSet::Initial => "the migration Job",
                    MigrationSet::PostSwitch => "the post-switch migration Job",
                },
                message,
            })
    }

    fn has_post_switch_migrations(&self) -> bool {
        self.spec
            .migrations
            .as_ref()
            .is_some_and(|m| m.post_switch_config_map_ref.is_some())
    }

    /// A hypercare checkpoint: the replicated tables' row counts on green, compared with blue
    /// while reverse replication keeps blue current (see `postgres::checkpoint`).
    async fn checkpoint(
        &self,
        status: &DatabaseCutoverStatus,
    ) -> Result<crate::api::CheckpointStatus, String> {
        let text = |e: &dyn std::fmt::Display| e.to_string();
        let green = self.green().await.map_err(|e| text(&e))?;
        let reverse_started = status
            .milestones
            .contains(&Milestone::ReverseReplicationStarted);
        let blue = if reverse_started {
            Some(self.blue().await.map_err(|e| text(&e))?)
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
            .await
            .map_err(|e| text(&e))?
            .is_none()
            .then_some(blue),
            None => None,
        };
        let reverse = blue.is_some();
        let tables = if reverse_started {
            replication::publication_tables(&green, &self.names.reverse_publication).await
        } else {
            replication::resolve_tables(
                &green,
                &TableSelection::from_spec(&self.spec.replication.tables),
            )
            .await
        }
        .map_err(|e| text(&e))?;
        let link = blue.as_ref().map(|source| ReverseLink {
            source,
            subscription: &self.names.reverse_subscription,
            slot: &self.names.reverse_slot,
            catch_up: Duration::from_secs(30),
        });
        let report = checkpoint::run(&green, link.as_ref(), &tables)
            .await
            .map_err(|e| text(&e))?;
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

/// Lets the application roles log in on green: `LOGIN` for roles that are `NOLOGIN` there,
/// `CONNECT` on green's database for roles without it. What it cannot fix — a role missing on
/// green, a role held read-only there, or a role made `NOLOGIN` by the freeze of blue on the same
/// server (letting it log in would reopen blue) — stops the switch before the Secret moves.
/// Idempotent: a second run finds nothing to grant.
async fn allow_application(blue: &Client, green: &Client, roles: &[String]) -> Result<(), String> {
    let read = async || {
        preflight::application_access(green, roles)
            .await
            .map_err(|e| {
                format!(
                    "failed to read the application roles on green: {}",
                    crate::postgres::replication::db_message(&e)
                )
            })
    };
    let access = read().await?;
    let mut blocking = access.blocking();
    for role in &access.no_login {
        if freeze::login_revoked_by_freeze(blue, role)
            .await
            .map_err(|e| e.to_string())?
        {
            blocking.push(format!(
                "role {role} is kept from logging in by the freeze of blue, which shares green's \
                 server (use freeze.method ReadOnly when both databases are on one server)"
            ));
        }
    }
    if !blocking.is_empty() {
        return Err(format!(
            "the application could not work on green: {}",
            blocking.join("; ")
        ));
    }
    let grant = |sql: String| async move {
        green.batch_execute(&sql).await.map_err(|e| {
            format!(
                "failed to let the application roles log in on green: {}",
                crate::postgres::replication::db_message(&e)
            )
        })
    };
    for role in &access.no_login {
        grant(format!("ALTER ROLE {} LOGIN", quote_ident(role))).await?;
    }
    if !access.no_connect.is_empty() {
        let database: String = green
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(|e| crate::postgres::replication::db_message(&e))?
            .get(0);
        for role in &access.no_connect {
            grant(format!(
                "GRANT CONNECT ON DATABASE {} TO {}",
                quote_ident(&database),
                quote_ident(role)
            ))
            .await?;
        }
    }
    let after = read().await?;
    if !after.to_grant().is_empty() || !after.blocking().is_empty() {
        return Err(format!(
            "the application roles still cannot work on green: {}",
            [after.blocking(), after.to_grant()].concat().join("; ")
        ));
    }
    Ok(())
}

fn parse_lsn(text: &str) -> Option<PgLsn> {
    text.parse().ok()
}

/// Drives a cutover from `status` to a terminal phase: observe → decide → record intent →
/// act → record, one action at a time. `report` sees every status written. Observation errors
/// are retried with exponential backoff, `max_retries` times in a row at most.
pub async fn drive<P: Platform>(
    engine: &Engine<P>,
    mut status: DatabaseCutoverStatus,
    max_retries: u32,
    mut report: impl FnMut(&DatabaseCutoverStatus, &Action),
) -> Result<DatabaseCutoverStatus, EngineError> {
    let mut failures = 0;
    while !status.phase.is_terminal() {
        let obs = match engine.observe(&status, false).await {
            Ok(obs) => {
                failures = 0;
                obs
            }
            Err(e) if failures < max_retries => {
                failures += 1;
                tracing::warn!(error = %e, attempt = failures, "observation failed; retrying");
                tokio::time::sleep(crate::plan::retry_delay(failures)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let action = crate::plan::next_action(&engine.spec, &status, &obs, jiff::Timestamp::now());
        if let Action::Wait(pause) = action {
            let refreshed = crate::plan::record(
                &engine.spec,
                &status,
                &action,
                Outcome::Done,
                &obs,
                jiff::Timestamp::now(),
            );
            if refreshed != status {
                status = refreshed;
                report(&status, &action);
            }
            tokio::time::sleep(pause).await;
            continue;
        }
        if let Some(with_intent) = crate::plan::record_intent(&status, &action) {
            status = with_intent;
            report(&status, &action);
        }
        let outcome = engine.perform(&action, &status).await;
        let failed = matches!(outcome, Outcome::Failed(_));
        let phase_before = status.phase;
        status = crate::plan::record(
            &engine.spec,
            &status,
            &action,
            outcome,
            &obs,
            jiff::Timestamp::now(),
        );
        report(&status, &action);
        if failed && status.phase == phase_before {
            // Retried where a failure does not end the cutover; not at once.
            tokio::time::sleep(crate::plan::POLL).await;
        }
    }
    Ok(status)
}

/// The platform of local mode: the "application Secret" is a file holding the connection
/// string, there are no workloads to restart and no Jobs to run.
#[derive(Debug, Default)]
pub struct LocalPlatform {
    /// Where the application's connection string is written at the switch.
    pub secret_file: Option<std::path::PathBuf>,
    /// Where the rehearsal's connection string is written.
    pub rehearsal_secret_file: Option<std::path::PathBuf>,
}

const NO_JOBS: &str = "local mode runs no migration Jobs: apply the migrations with \
                       `cutover migrate` and drop spec.migrations from the plan";

impl Platform for LocalPlatform {
    async fn migration_job(&self, _set: MigrationSet) -> Result<Option<JobState>, String> {
        Err(NO_JOBS.into())
    }

    async fn launch_migrations(&self, _set: MigrationSet) -> Result<(), String> {
        Err(NO_JOBS.into())
    }

    async fn rollout_problems(&self) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }

    async fn switch_secret(&self, target: &Dsn, rehearsal: bool) -> Result<(), String> {
        let file = if rehearsal {
            &self.rehearsal_secret_file
        } else {
            &self.secret_file
        };
        let Some(path) = file else {
            return Ok(());
        };
        // Like the Kubernetes switch: the application's own connection string (if the file has
        // one) keeps its credentials and parameters, only the server changes.
        let value = match self.secret_file.as_deref().map(std::fs::read_to_string) {
            Some(Ok(current)) => {
                crate::postgres::retarget(&Dsn::new(current), target).map_err(|e| e.to_string())?
            }
            _ => target.clone(),
        };
        write_private(path, value.expose())
            .map_err(|e| format!("failed to write {}: {e}", path.display()))
    }

    async fn restart_workloads(&self, _generation: &str) -> Result<(), String> {
        tracing::info!("local mode: no workloads to restart");
        Ok(())
    }
}

/// Writes a file readable by its owner only, replacing it atomically.
fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}
