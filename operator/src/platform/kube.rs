//! The Kubernetes side of a cutover: connection strings read from Secrets, the migration Job,
//! the application Secret switched (only its one key), and workloads restarted through a
//! pod-template annotation, as `kubectl rollout restart` does.
//!
//! Secret values never leave this module except as a [`Dsn`], which does not print them; errors
//! name the Secret and the key, never the value.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use thiserror::Error;

use super::{Platform, PlatformError};
use crate::api::{CheckOutcome, CheckResult, DatabaseCutover, Mode, SecretKeyRef, WorkloadKind};
use crate::cluster::migration_job::{
    JobBuildError, JobOutcome, JobSettings, MigrationJobParams, MigrationSetKind,
    build_migration_job, config_map_digest, job_outcome,
};
use crate::plan::{JobState, MigrationSet};
use crate::postgres::{Dsn, retarget};

/// The annotation put on pod templates to restart workloads.
pub const RESTARTED_AT: &str = "cutover.dbops.dev/restartedAt";
/// Field manager of the operator's writes to Secrets and workloads.
const MANAGER: &str = "cutover-operator";

/// A Secret could not be read.
#[derive(Debug, Error)]
pub enum SecretError {
    /// The API server refused or could not be reached.
    #[error("failed to read Secret {name}: {source}")]
    Kube {
        /// The Secret's name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The key is not in the Secret.
    #[error("failed to find key {key:?} in Secret {name}")]
    MissingKey {
        /// The Secret's name.
        name: String,
        /// The key.
        key: String,
    },
    /// The value is not UTF-8.
    #[error("failed to read key {key:?} of Secret {name}: the value is not UTF-8 text")]
    NotText {
        /// The Secret's name.
        name: String,
        /// The key.
        key: String,
    },
}

/// Reads one key of a Secret as text.
pub async fn read_secret_key(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<String, SecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api.get(&r.name).await.map_err(|source| SecretError::Kube {
        name: r.name.clone(),
        source,
    })?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or_else(|| SecretError::MissingKey {
            name: r.name.clone(),
            key: r.key.clone(),
        })?;
    String::from_utf8(bytes).map_err(|_| SecretError::NotText {
        name: r.name.clone(),
        key: r.key.clone(),
    })
}

/// Reads a connection string from a Secret.
pub async fn read_dsn(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<Dsn, SecretError> {
    read_secret_key(client, namespace, r).await.map(Dsn::new)
}

/// The platform of a cutover running in Kubernetes.
#[derive(Clone)]
pub struct KubePlatform {
    client: Client,
    cutover: DatabaseCutover,
    default_image: String,
}

impl std::fmt::Debug for KubePlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePlatform")
            .field("cutover", &self.cutover.name_any())
            .finish_non_exhaustive()
    }
}

impl KubePlatform {
    /// A platform acting for `cutover` (as read from the API server), running Jobs with
    /// `default_image` unless the spec names one.
    pub fn new(client: Client, cutover: DatabaseCutover, default_image: impl Into<String>) -> Self {
        Self {
            client,
            cutover,
            default_image: default_image.into(),
        }
    }

    fn namespace(&self) -> String {
        self.cutover.namespace().unwrap_or_default()
    }

    /// The Job that applies `set`, named after the content of its ConfigMap.
    async fn job_for(&self, set: MigrationSet) -> Result<Job, PlatformError> {
        let migrations = self
            .cutover
            .spec
            .migrations
            .as_ref()
            .ok_or(JobBuildError::NoMigrations)?;
        let (kind, config_map) = match set {
            MigrationSet::Initial => (MigrationSetKind::Initial, &migrations.config_map_ref),
            MigrationSet::PostSwitch => (
                MigrationSetKind::PostSwitch,
                migrations
                    .post_switch_config_map_ref
                    .as_ref()
                    .ok_or(JobBuildError::NoPostSwitchSet)?,
            ),
        };
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace());
        let cm = cms
            .get(&config_map.name)
            .await
            .map_err(PlatformError::kube(format!(
                "read ConfigMap {}",
                config_map.name
            )))?;
        let digest = config_map_digest(&cm.data.unwrap_or_default());
        Ok(build_migration_job(&MigrationJobParams {
            cutover: &self.cutover,
            set: kind,
            content_digest: &digest,
            default_image: &self.default_image,
            settings: JobSettings::default(),
        })?)
    }
}

impl KubePlatform {
    /// The termination message of the Job's most recent failed container — `cutover migrate`'s
    /// last error line, which names the file and the SQL error (the container asks for
    /// `FallbackToLogsOnError`). The Job's own condition only says the backoff limit was
    /// reached. `None` when there is none or the pods cannot be read.
    async fn last_words(&self, job: &str) -> Option<String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace());
        let list = pods
            .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
            .await
            .ok()?;
        let said: Vec<(Option<k8s_openapi::jiff::Timestamp>, String)> = list
            .items
            .iter()
            .flat_map(|pod| {
                pod.status
                    .iter()
                    .flat_map(|s| s.container_statuses.iter().flatten())
                    .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
                    .filter(|t| t.exit_code != 0)
                    .filter_map(|t| {
                        let message = t.message.as_deref()?.trim();
                        let last = message.lines().last()?.trim().to_owned();
                        (!last.is_empty()).then(|| (t.finished_at.as_ref().map(|f| f.0), last))
                    })
            })
            .collect();
        said.into_iter()
            .max_by_key(|(finished, _)| *finished)
            .map(|(_, m)| m.chars().take(500).collect())
    }
}

impl Platform for KubePlatform {
    async fn migration_job(&self, set: MigrationSet) -> Result<Option<JobState>, PlatformError> {
        let wanted = self.job_for(set).await?;
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace());
        let name = wanted.name_any();
        let job = jobs
            .get_opt(&name)
            .await
            .map_err(PlatformError::kube(format!("read Job {name}")))?;
        let Some(job) = job else {
            return Ok(None);
        };
        Ok(Some(match job_outcome(&job) {
            JobOutcome::Running => JobState::Running,
            JobOutcome::Succeeded => JobState::Succeeded,
            JobOutcome::Failed { reason } => match self.last_words(&name).await {
                Some(said) => JobState::Failed(format!("{reason}; the last attempt said: {said}")),
                None => JobState::Failed(reason),
            },
        }))
    }

    async fn launch_migrations(&self, set: MigrationSet) -> Result<(), PlatformError> {
        let job = self.job_for(set).await?;
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace());
        match jobs.create(&PostParams::default(), &job).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(PlatformError::kube(format!(
                "create Job {}",
                job.name_any()
            ))(e)),
        }
    }

    async fn switch_secret(&self, target: &Dsn, rehearsal: bool) -> Result<(), PlatformError> {
        let switch = &self.cutover.spec.switch;
        let r = if rehearsal {
            match &switch.rehearsal_secret_ref {
                Some(r) => r,
                None => return Ok(()),
            }
        } else {
            &switch.secret_ref
        };
        // The application keeps its own credentials and parameters; only the server changes.
        let current = read_dsn(&self.client, &self.namespace(), &switch.secret_ref).await?;
        let value = retarget(&current, target).map_err(PlatformError::Retarget)?;
        // Server-side apply of the one key: the other keys of the Secret stay as they are. The
        // Secret exists (preflight checked): the operator may patch Secrets, never create them.
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(r.name.clone()),
                namespace: Some(self.namespace()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                r.key.clone(),
                ByteString(value.expose().as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace());
        api.patch(
            &r.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(PlatformError::kube(format!(
            "write key {:?} of Secret {}",
            r.key, r.name
        )))?;
        Ok(())
    }

    async fn restart_workloads(&self, generation: &str) -> Result<(), PlatformError> {
        let patch = serde_json::json!({
            "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: generation}}}}
        });
        let params = PatchParams::default();
        for w in &self.cutover.spec.switch.restart {
            let result = match w.kind {
                WorkloadKind::Deployment => {
                    Api::<Deployment>::namespaced(self.client.clone(), &self.namespace())
                        .patch(&w.name, &params, &Patch::Merge(&patch))
                        .await
                        .map(|_| ())
                }
                WorkloadKind::StatefulSet => {
                    Api::<StatefulSet>::namespaced(self.client.clone(), &self.namespace())
                        .patch(&w.name, &params, &Patch::Merge(&patch))
                        .await
                        .map(|_| ())
                }
            };
            result.map_err(PlatformError::kube(format!(
                "restart {:?} {}",
                w.kind, w.name
            )))?;
        }
        Ok(())
    }

    async fn preflight(&self) -> Vec<CheckResult> {
        let check = |name: &str, result: Result<String, String>| CheckResult {
            name: name.into(),
            outcome: if result.is_ok() {
                CheckOutcome::Pass
            } else {
                CheckOutcome::Fail
            },
            message: result.unwrap_or_else(|e| e),
        };
        let namespace = self.namespace();
        let switch = &self.cutover.spec.switch;
        let mut checks = Vec::new();

        // The application Secret: the switch keeps its credentials, so it must hold a URL.
        let r = &switch.secret_ref;
        let app = match read_dsn(&self.client, &namespace, r).await {
            Ok(dsn) => retarget(&dsn, &dsn)
                .map(|_| format!("Secret {} key {} holds a connection string", r.name, r.key))
                .map_err(|e| format!("Secret {} key {}: {e}", r.name, r.key)),
            Err(e) => Err(e.to_string()),
        };
        checks.push(check("application-secret", app));

        // The rehearsal Secret must exist: the operator patches Secrets and may not create them
        // (creating Secrets would let it mint ServiceAccount tokens).
        if self.cutover.spec.mode == Mode::Rehearsal
            && let Some(r) = &switch.rehearsal_secret_ref
        {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
            let found = match api.get_opt(&r.name).await {
                Ok(Some(_)) => Ok(format!(
                    "Secret {} exists; the rehearsal writes its key {}",
                    r.name, r.key
                )),
                Ok(None) => Err(format!(
                    "Secret {} does not exist: create it (an empty Secret is enough, e.g. \
                     `kubectl create secret generic {} -n {namespace}`); the rehearsal writes \
                     green's address to its key {}, and the operator may not create Secrets",
                    r.name, r.name, r.key
                )),
                Err(e) => Err(format!("read Secret {}: {e}", r.name)),
            };
            checks.push(check("rehearsal-secret", found));
        }

        // The workloads restarted at the switch exist (a rehearsal restarts none).
        if self.cutover.spec.mode != Mode::Rehearsal {
            for w in &switch.restart {
                let found = match w.kind {
                    WorkloadKind::Deployment => {
                        Api::<Deployment>::namespaced(self.client.clone(), &namespace)
                            .get_opt(&w.name)
                            .await
                            .map(|d| d.is_some())
                    }
                    WorkloadKind::StatefulSet => {
                        Api::<StatefulSet>::namespaced(self.client.clone(), &namespace)
                            .get_opt(&w.name)
                            .await
                            .map(|d| d.is_some())
                    }
                };
                let result = match found {
                    Ok(true) => Ok(format!("{:?} {} exists", w.kind, w.name)),
                    Ok(false) => Err(format!(
                        "{:?} {} does not exist in namespace {namespace}: the switch restarts it",
                        w.kind, w.name
                    )),
                    Err(e) => Err(format!("read {:?} {}: {e}", w.kind, w.name)),
                };
                checks.push(check("restart-workload", result));
            }
        }
        checks
    }

    async fn rollout_problems(&self) -> Result<Vec<String>, PlatformError> {
        let mut problems = Vec::new();
        for w in &self.cutover.spec.switch.restart {
            match w.kind {
                WorkloadKind::Deployment => {
                    let api = Api::<Deployment>::namespaced(self.client.clone(), &self.namespace());
                    let found = api
                        .get_opt(&w.name)
                        .await
                        .map_err(PlatformError::kube(format!("read Deployment {}", w.name)))?;
                    match found {
                        None => problems.push(format!("Deployment {} no longer exists", w.name)),
                        Some(d) => problems.extend(deployment_stuck(&d)),
                    }
                }
                WorkloadKind::StatefulSet => {
                    let api =
                        Api::<StatefulSet>::namespaced(self.client.clone(), &self.namespace());
                    let found = api
                        .get_opt(&w.name)
                        .await
                        .map_err(PlatformError::kube(format!("read StatefulSet {}", w.name)))?;
                    if found.is_none() {
                        problems.push(format!("StatefulSet {} no longer exists", w.name));
                    }
                }
            }
        }
        Ok(problems)
    }
}

/// Why a Deployment's rollout is stuck, by the Deployment controller's own verdict: its
/// `Progressing` condition turned False with `ProgressDeadlineExceeded` (after
/// `spec.progressDeadlineSeconds`, 10 minutes by default). A rollout still under way is not a
/// problem.
fn deployment_stuck(d: &Deployment) -> Option<String> {
    let stuck = d.status.as_ref()?.conditions.as_ref()?.iter().find(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    })?;
    Some(format!(
        "Deployment {} does not finish rolling out: {}",
        d.name_any(),
        stuck
            .message
            .as_deref()
            .unwrap_or("progress deadline exceeded")
    ))
}
