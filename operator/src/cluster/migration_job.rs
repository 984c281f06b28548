//! The migration Job, built as plain data: the operator's image running `cutover migrate` against
//! the target database, and a reader of a Job's outcome. Nothing here talks to the API server;
//! the controller creates the Job (its name is deterministic, so creating it twice is a 409,
//! not a second run) and feeds what it observes to [`job_outcome`].

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, KeyToPath,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Resource as _;
use kube::api::ObjectMeta;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::api::DatabaseCutover;

/// Environment variable the Job passes the connection string in (from the Secret).
pub const DATABASE_URL_ENV: &str = "CUTOVER_DATABASE_URL";
/// Where the migrations ConfigMap is mounted.
pub const MIGRATIONS_DIR: &str = "/migrations";
/// Where the CA bundle is mounted, when the target has one.
pub const CA_DIR: &str = "/etc/cutover/ca";
/// Label naming the cutover a Job belongs to.
pub const CUTOVER_LABEL: &str = "cutover.dbops.dev/cutover";
/// Label naming the migration set.
pub const SET_LABEL: &str = "cutover.dbops.dev/migration-set";
/// Annotation holding the digest of the ConfigMap content the Job applies.
pub const DIGEST_ANNOTATION: &str = "cutover.dbops.dev/migrations-digest";

/// Which ConfigMap of the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationSetKind {
    /// `spec.migrations.configMapRef`: before replication starts.
    Initial,
    /// `spec.migrations.postSwitchConfigMapRef`: during the switch.
    PostSwitch,
}

impl MigrationSetKind {
    fn slug(self) -> &'static str {
        match self {
            MigrationSetKind::Initial => "initial",
            MigrationSetKind::PostSwitch => "post-switch",
        }
    }
}

/// Knobs of the Job that the spec does not carry.
#[derive(Clone, Debug)]
pub struct JobSettings {
    /// Pod retries after a failure (each retry finds the history and resumes).
    pub backoff_limit: i32,
    /// Seconds a finished Job stays for inspection.
    pub ttl_seconds_after_finished: i32,
    /// Seconds the Job may run in all, waiting for the lock included.
    pub active_deadline_seconds: i64,
    /// The non-root user the container runs as.
    pub run_as_user: i64,
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            backoff_limit: 3,
            ttl_seconds_after_finished: 86_400,
            active_deadline_seconds: 1_800,
            run_as_user: 65_532,
        }
    }
}

/// What the builder needs.
#[derive(Clone, Debug)]
pub struct MigrationJobParams<'a> {
    /// The owner; must have been read from the API server (name, namespace, uid).
    pub cutover: &'a DatabaseCutover,
    /// Which set.
    pub set: MigrationSetKind,
    /// [`config_map_digest`] of the ConfigMap's data: a changed ConfigMap is a new Job.
    pub content_digest: &'a str,
    /// The operator's own image, used when the spec names none.
    pub default_image: &'a str,
    /// The rest.
    pub settings: JobSettings,
}

/// Why no Job could be built (a spec problem: wait for the spec to change).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum JobBuildError {
    /// The spec has no migrations.
    #[error("failed to build the migration Job: spec.migrations is not set")]
    NoMigrations,
    /// The spec has no post-switch ConfigMap.
    #[error("failed to build the migration Job: spec.migrations.postSwitchConfigMapRef is not set")]
    NoPostSwitchSet,
    /// The cutover lacks name, namespace or uid.
    #[error(
        "failed to build the migration Job: the DatabaseCutover has no {0} (was it read from the API server?)"
    )]
    Unpersisted(&'static str),
    /// `lockTimeout` does not parse (admission should have stopped it).
    #[error("failed to build the migration Job: spec.migrations.lockTimeout: {0}")]
    LockTimeout(String),
}

/// The outcome of a Job, from its conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Not finished.
    Running,
    /// Finished; every migration is applied.
    Succeeded,
    /// Gave up (retries or deadline exhausted).
    Failed {
        /// The condition's reason and message (`BackoffLimitExceeded: …`).
        reason: String,
    },
}

/// Digest of a ConfigMap's data: SHA-256 over the sorted (key, value) pairs, lowercase hex.
pub fn config_map_digest(data: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (k, v) in data {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `<cutover>-migrate-<set>-<hash>`, at most 63 characters (Job names end up in a label). The
/// hash covers the cutover's name, the set and the content, so a truncated name stays unique.
pub fn migration_job_name(cutover: &str, set: MigrationSetKind, content_digest: &str) -> String {
    let mut h = Sha256::new();
    h.update(cutover.as_bytes());
    h.update([0]);
    h.update(set.slug().as_bytes());
    h.update([0]);
    h.update(content_digest.as_bytes());
    let hash: String = h
        .finalize()
        .iter()
        .take(5)
        .map(|b| format!("{b:02x}"))
        .collect();
    let suffix = format!("-migrate-{}-{hash}", set.slug());
    let room = 63 - suffix.len();
    let prefix: String = cutover.chars().take(room).collect();
    format!("{}{suffix}", prefix.trim_end_matches(['-', '.']))
}

/// Builds the Job.
pub fn build_migration_job(p: &MigrationJobParams<'_>) -> Result<Job, JobBuildError> {
    let spec = &p.cutover.spec;
    let migrations = spec
        .migrations
        .as_ref()
        .ok_or(JobBuildError::NoMigrations)?;
    let config_map = match p.set {
        MigrationSetKind::Initial => &migrations.config_map_ref,
        MigrationSetKind::PostSwitch => migrations
            .post_switch_config_map_ref
            .as_ref()
            .ok_or(JobBuildError::NoPostSwitchSet)?,
    };
    let meta = &p.cutover.metadata;
    let cutover_name = meta
        .name
        .as_deref()
        .ok_or(JobBuildError::Unpersisted("name"))?;
    let namespace = meta
        .namespace
        .as_deref()
        .ok_or(JobBuildError::Unpersisted("namespace"))?;
    let owner = p
        .cutover
        .controller_owner_ref(&())
        .filter(|o| !o.uid.is_empty())
        .ok_or(JobBuildError::Unpersisted("uid"))?;
    migrations
        .lock_timeout
        .parse()
        .map_err(|e| JobBuildError::LockTimeout(e.to_string()))?;

    let name = migration_job_name(cutover_name, p.set, p.content_digest);
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "cutover".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "migration".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "cutover-operator".to_owned(),
        ),
        (CUTOVER_LABEL.to_owned(), label_value(cutover_name)),
        (SET_LABEL.to_owned(), p.set.slug().to_owned()),
    ]);

    let target = &spec.target;
    let mut args = vec![
        "migrate".to_owned(),
        "--dir".to_owned(),
        MIGRATIONS_DIR.to_owned(),
        "--database-url-env".to_owned(),
        DATABASE_URL_ENV.to_owned(),
        "--lock-key".to_owned(),
        migrations.lock_key.to_string(),
        "--lock-timeout".to_owned(),
        migrations.lock_timeout.to_string(),
        "--log-format".to_owned(),
        "json".to_owned(),
    ];
    let mut volumes = vec![Volume {
        name: "migrations".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map.name.clone(),
            default_mode: Some(0o444),
            optional: Some(false),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "migrations".into(),
        mount_path: MIGRATIONS_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    if let Some(ca) = &target.ca_secret_ref {
        volumes.push(Volume {
            name: "ca".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ca.name.clone()),
                items: Some(vec![KeyToPath {
                    key: ca.key.clone(),
                    path: "ca.crt".into(),
                    mode: None,
                }]),
                default_mode: Some(0o444),
                optional: Some(false),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "ca".into(),
            mount_path: CA_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        args.extend(["--ca-file".to_owned(), format!("{CA_DIR}/ca.crt")]);
    }

    let container = Container {
        name: "migrate".into(),
        image: Some(
            migrations
                .image
                .clone()
                .unwrap_or_else(|| p.default_image.to_owned()),
        ),
        image_pull_policy: Some("IfNotPresent".into()),
        // The image's entrypoint is the cutover binary: arguments only, no shell.
        args: Some(args),
        env: Some(vec![EnvVar {
            name: DATABASE_URL_ENV.into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: target.connection_secret_ref.name.clone(),
                    key: target.connection_secret_ref.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        volume_mounts: Some(mounts),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("50m".into())),
                ("memory".to_owned(), Quantity("64Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("256Mi".into()),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };

    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([(
                DIGEST_ANNOTATION.to_owned(),
                p.content_digest.to_owned(),
            )])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(p.settings.backoff_limit),
            ttl_seconds_after_finished: Some(p.settings.ttl_seconds_after_finished),
            active_deadline_seconds: Some(p.settings.active_deadline_seconds),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    // It needs the database, not the Kubernetes API.
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(p.settings.run_as_user),
                        run_as_group: Some(p.settings.run_as_user),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// A label value: at most 63 characters, alphanumeric at both ends.
fn label_value(s: &str) -> String {
    let v: String = s.chars().take(63).collect();
    v.trim_end_matches(['-', '.', '_']).to_owned()
}

/// Reads a Job's outcome from its conditions: `Complete` (or `SuccessCriteriaMet`) is success,
/// `Failed` (or `FailureTarget`, set while the pods of a failing Job are terminated) failure,
/// anything else still running.
pub fn job_outcome(job: &Job) -> JobOutcome {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let holds = |types: &[&str]| {
        conditions
            .iter()
            .find(|c| types.contains(&c.type_.as_str()) && c.status == "True")
    };
    if let Some(c) = holds(&["Failed", "FailureTarget"]) {
        let reason = match (c.reason.as_deref(), c.message.as_deref()) {
            (Some(r), Some(m)) if !m.is_empty() => format!("{r}: {m}"),
            (Some(r), _) => r.to_owned(),
            (None, Some(m)) => m.to_owned(),
            (None, None) => "the Job failed".to_owned(),
        };
        return JobOutcome::Failed { reason };
    }
    if holds(&["Complete", "SuccessCriteriaMet"]).is_some() {
        return JobOutcome::Succeeded;
    }
    JobOutcome::Running
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};

    use super::*;

    fn cutover(yaml: &str) -> DatabaseCutover {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const CUTOVER: &str = r#"
apiVersion: cutover.dbops.dev/v1alpha1
kind: DatabaseCutover
metadata: {name: orders-to-pg16, namespace: shop, uid: 6f1c1e0a-1b2c-4d5e-8f90-123456789abc}
spec:
  source: {connectionSecretRef: {name: orders-blue-admin, key: uri}}
  target:
    connectionSecretRef: {name: orders-green-admin, key: uri}
    caSecretRef: {name: green-ca, key: ca.pem}
  applicationRoles: [orders_app]
  migrations:
    configMapRef: {name: orders-migrations}
    postSwitchConfigMapRef: {name: orders-post}
    lockKey: 42
    lockTimeout: 3s
  switch:
    secretRef: {name: orders-db, key: DATABASE_URL}
"#;

    fn params(c: &DatabaseCutover, set: MigrationSetKind) -> MigrationJobParams<'_> {
        MigrationJobParams {
            cutover: c,
            set,
            content_digest: "abc123",
            default_image: "ghcr.io/dbops/cutover:1.2.3",
            settings: JobSettings::default(),
        }
    }

    #[test]
    fn builds_a_locked_down_job_running_cutover_migrate() {
        let c = cutover(CUTOVER);
        let job = build_migration_job(&params(&c, MigrationSetKind::Initial)).unwrap();
        let meta = &job.metadata;
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        let name = meta.name.as_deref().unwrap();
        assert!(
            name.starts_with("orders-to-pg16-migrate-initial-"),
            "{name}"
        );
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "DatabaseCutover");
        assert_eq!(owner.name, "orders-to-pg16");
        assert_eq!(owner.uid, "6f1c1e0a-1b2c-4d5e-8f90-123456789abc");
        assert_eq!(owner.controller, Some(true));

        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(3));
        assert_eq!(spec.ttl_seconds_after_finished, Some(86_400));
        assert_eq!(spec.active_deadline_seconds, Some(1_800));
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(65_532));

        let ctr = &pod.containers[0];
        assert_eq!(ctr.image.as_deref(), Some("ghcr.io/dbops/cutover:1.2.3"));
        assert_eq!(ctr.command, None, "no shell, the image's entrypoint");
        let args = ctr.args.as_ref().unwrap().join(" ");
        assert_eq!(
            args,
            "migrate --dir /migrations --database-url-env CUTOVER_DATABASE_URL --lock-key 42 \
             --lock-timeout 3s --log-format json --ca-file /etc/cutover/ca/ca.crt"
        );
        let env = &ctr.env.as_ref().unwrap()[0];
        assert_eq!(env.name, DATABASE_URL_ENV);
        assert_eq!(env.value, None, "never the connection string itself");
        let secret = env
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("orders-green-admin", "uri")
        );

        let sc = ctr.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        let requests = ctr.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert!(requests.contains_key("cpu") && requests.contains_key("memory"));

        let mounts = ctr.volume_mounts.as_ref().unwrap();
        assert!(mounts.iter().all(|m| m.read_only == Some(true)));
        assert_eq!(mounts[0].mount_path, MIGRATIONS_DIR);
        let volumes = pod.volumes.as_ref().unwrap();
        assert_eq!(
            volumes[0].config_map.as_ref().unwrap().name,
            "orders-migrations"
        );
        assert_eq!(
            volumes[1].secret.as_ref().unwrap().secret_name.as_deref(),
            Some("green-ca")
        );
    }

    #[test]
    fn names_are_deterministic_bounded_and_distinct_per_set_and_content() {
        let c = cutover(CUTOVER);
        let a = build_migration_job(&params(&c, MigrationSetKind::Initial)).unwrap();
        let b = build_migration_job(&params(&c, MigrationSetKind::Initial)).unwrap();
        assert_eq!(a, b, "same input, same Job");
        let post = build_migration_job(&params(&c, MigrationSetKind::PostSwitch)).unwrap();
        assert_eq!(
            post.spec.unwrap().template.spec.unwrap().volumes.unwrap()[0]
                .config_map
                .as_ref()
                .unwrap()
                .name,
            "orders-post"
        );
        assert_ne!(a.metadata.name, post.metadata.name);
        let other = migration_job_name("orders-to-pg16", MigrationSetKind::Initial, "def456");
        assert_ne!(a.metadata.name.as_deref(), Some(other.as_str()));

        let long = "a".repeat(253);
        let n1 = migration_job_name(&long, MigrationSetKind::PostSwitch, "x");
        let n2 = migration_job_name(&format!("{long}b"), MigrationSetKind::PostSwitch, "x");
        assert!(n1.len() <= 63 && n2.len() <= 63, "{n1}");
        assert_ne!(n1, n2);

        let d1 = config_map_digest(&BTreeMap::from([("V1__a.sql".into(), "x".into())]));
        let d2 = config_map_digest(&BTreeMap::from([("V1__a.sql".into(), "y".into())]));
        assert_ne!(d1, d2);
    }

    #[test]
    fn refuses_specs_it_cannot_build_from() {
        let mut c = cutover(CUTOVER);
        c.metadata.uid = None;
        assert_eq!(
            build_migration_job(&params(&c, MigrationSetKind::Initial)),
            Err(JobBuildError::Unpersisted("uid"))
        );
        let mut c = cutover(CUTOVER);
        c.spec
            .migrations
            .as_mut()
            .unwrap()
            .post_switch_config_map_ref = None;
        assert_eq!(
            build_migration_job(&params(&c, MigrationSetKind::PostSwitch)),
            Err(JobBuildError::NoPostSwitchSet)
        );
        c.spec.migrations = None;
        assert_eq!(
            build_migration_job(&params(&c, MigrationSetKind::Initial)),
            Err(JobBuildError::NoMigrations)
        );
    }

    fn with_conditions(conditions: &[(&str, &str, Option<&str>)]) -> Job {
        Job {
            status: Some(JobStatus {
                conditions: Some(
                    conditions
                        .iter()
                        .map(|(t, s, r)| JobCondition {
                            type_: (*t).into(),
                            status: (*s).into(),
                            reason: r.map(Into::into),
                            message: r
                                .map(|_| "Job has reached the specified backoff limit".into()),
                            ..JobCondition::default()
                        })
                        .collect(),
                ),
                ..JobStatus::default()
            }),
            ..Job::default()
        }
    }

    #[test]
    fn reads_the_outcome_from_conditions() {
        assert_eq!(job_outcome(&Job::default()), JobOutcome::Running);
        assert_eq!(
            job_outcome(&with_conditions(&[("Suspended", "False", None)])),
            JobOutcome::Running
        );
        assert_eq!(
            job_outcome(&with_conditions(&[
                ("SuccessCriteriaMet", "True", None),
                ("Complete", "True", None)
            ])),
            JobOutcome::Succeeded
        );
        assert_eq!(
            job_outcome(&with_conditions(&[("Complete", "False", None)])),
            JobOutcome::Running
        );
        assert_eq!(
            job_outcome(&with_conditions(&[(
                "Failed",
                "True",
                Some("BackoffLimitExceeded")
            )])),
            JobOutcome::Failed {
                reason: "BackoffLimitExceeded: Job has reached the specified backoff limit".into()
            }
        );
        assert!(matches!(
            job_outcome(&with_conditions(&[(
                "FailureTarget",
                "True",
                Some("DeadlineExceeded")
            )])),
            JobOutcome::Failed { .. }
        ));
    }
}
