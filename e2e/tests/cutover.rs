//! A whole cutover driven by the operator process on a real API server against two real
//! PostgreSQL clusters, with the bank workload writing to blue throughout: applied with the
//! kube API, watched to Completed; the application Secret then points at green with the
//! application's own credentials, the Deployment's pod template was annotated, every phase left
//! an Event, every acknowledged write is on green and nothing of ours is left on either server.
//! Around it: manual approval, every kind of abort, rollback, a rehearsal, migrations before and
//! after the switch, hypercare's problems, deletion.
//!
//! The tests whose migration Jobs must run (every test named `…migration…`) need pods: they run
//! on the real node (`make node-test` runs them inside `e2e/real-node.sh`, where green also
//! listens on the pod bridge) and return at once elsewhere, saying so.

use std::collections::BTreeMap;
use std::time::Duration;

use cutover_e2e::ControlPlane;
use cutover_e2e::fixtures::{
    assert_no_leftovers, bank_databases_on, leftovers, namespace_with_crds, one, repo,
};
use cutover_e2e::node::{Node, PAUSE_IMAGE};
use cutover_e2e::operator::{OperatorProcess, cutover_binary, eventually};
use cutover_operator::api::{
    Approval, ConfigMapRef, DatabaseCutover, DatabaseCutoverStatus, Milestone, Mode, Phase,
    SecretKeyRef, WorkloadKind, WorkloadRef,
};
use cutover_operator::plan::format_duration;
use cutover_operator::postgres::replication::Names;
use cutover_tests::workload::{self, Load, LoadConfig};
use cutover_tests::{BlueGreen, PgCluster};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

const APP_ROLE: &str = "orders_app";
const APP_PASSWORD: &str = "app-password";

async fn secret(plane: &ControlPlane, ns: &str, name: &str, key: &str, value: &str) {
    let api: Api<Secret> = Api::namespaced(plane.client(), ns);
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([(key.into(), value.into())])),
        ..Secret::default()
    };
    api.create(&PostParams::default(), &s)
        .await
        .expect("create Secret");
}

/// A timestamp of the status, which must be set.
fn timestamp(field: &Option<String>) -> jiff::Timestamp {
    field.as_deref().expect("timestamp set").parse().unwrap()
}

fn secret_ref(name: &str, key: &str) -> SecretKeyRef {
    SecretKeyRef {
        name: name.into(),
        key: key.into(),
    }
}

async fn secret_value(plane: &ControlPlane, ns: &str, name: &str, key: &str) -> String {
    let api: Api<Secret> = Api::namespaced(plane.client(), ns);
    let s = api.get(name).await.unwrap();
    String::from_utf8(s.data.unwrap()[key].0.clone()).unwrap()
}

/// Two databases with the bank schema, a namespace with the connection Secrets, the
/// application Secret and a Deployment, the bank load writing to blue, and the operator.
struct Scenario {
    bg: BlueGreen,
    plane: ControlPlane,
    ns: String,
    operator: OperatorProcess,
    load: Option<Load>,
    blue_app: String,
    green_app: String,
    /// The real node this runs on, if it does (`make node-test`).
    node: Option<Node>,
}

impl Scenario {
    /// [`Scenario::start_of`] on the real node, or `None` (saying so) when not on one.
    async fn on_node(prefix: &str, majors: (Option<u32>, Option<u32>)) -> Option<Self> {
        Node::from_env()?;
        Some(Self::start_of(prefix, majors).await)
    }

    async fn start(prefix: &str) -> Self {
        Self::start_of(prefix, (None, None)).await
    }

    /// [`Scenario::start`] with blue and green of the given major versions.
    async fn start_of(prefix: &str, majors: (Option<u32>, Option<u32>)) -> Self {
        // On the real node green is also reached from the pods (the migration Jobs), at the
        // bridge's address: the Secrets name it there.
        let node = Node::detect();
        let on_node = node.clone();
        let bg = tokio::task::spawn_blocking(move || {
            bank_databases_on(APP_ROLE, APP_PASSWORD, 50, majors, on_node.as_ref())
        })
        .await
        .unwrap();
        let (plane, ns) = namespace_with_crds(prefix).await;
        let green = |dsn: String| match &node {
            Some(node) => node.via(&dsn),
            None => dsn,
        };

        let blue_app = bg.blue.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE);
        let green_app = green(bg.green.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE));
        secret(&plane, &ns, "billing-blue-admin", "uri", &bg.blue_dsn()).await;
        secret(
            &plane,
            &ns,
            "billing-green-admin",
            "uri",
            &green(bg.green_dsn()),
        )
        .await;
        secret(&plane, &ns, "billing-db", "DATABASE_URL", &blue_app).await;
        let deployments: Api<Deployment> = Api::namespaced(plane.client(), &ns);
        // Without a node nothing pulls the image; on the node it is one that is there.
        let container = match &node {
            Some(_) => json!({"name": "api", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}),
            None => json!({"name": "api", "image": "registry.example/billing-api:1"}),
        };
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "billing-api"},
            "spec": {
                "selector": {"matchLabels": {"app": "billing-api"}},
                "template": {
                    "metadata": {"labels": {"app": "billing-api"}},
                    "spec": {"containers": [container]}
                }
            }
        }))
        .unwrap();
        deployments
            .create(&PostParams::default(), &deployment)
            .await
            .unwrap();

        let load = Load::start(LoadConfig {
            dsn: blue_app.clone(),
            clients: 4,
            tps: 200.0,
            accounts: 50,
        });
        eventually("the load commits", Duration::from_secs(30), || async {
            (load.commits() > 20).then_some(())
        })
        .await;
        let operator =
            OperatorProcess::start(&plane, &ns, "driver", &[]).expect("start the operator");
        Self {
            bg,
            plane,
            ns,
            operator,
            load: Some(load),
            blue_app,
            green_app,
            node,
        }
    }

    /// What the pods of Job `name` printed (on the real node).
    fn job_logs(&self, name: &str) -> String {
        self.node
            .as_ref()
            .map(|node| node.job_logs(&self.ns, name))
            .unwrap_or_default()
    }

    /// The rollback-ready example plan, made quick.
    fn plan(&self) -> DatabaseCutover {
        self.plan_from("production-with-rollback.yaml")
    }

    /// An example plan of `cutover-plans/`, pointed at this bed (its Secrets, the application
    /// role, the Deployment) and made quick.
    fn plan_from(&self, example: &str) -> DatabaseCutover {
        let text = std::fs::read_to_string(repo().join("cutover-plans").join(example)).unwrap();
        let mut plan: DatabaseCutover = serde_saphyr::from_str(&text).unwrap();
        plan.metadata.name = Some(NAME.into());
        plan.metadata.namespace = Some(self.ns.clone());
        let spec = &mut plan.spec;
        for (side, secret) in [
            (&mut spec.source, "billing-blue-admin"),
            (&mut spec.target, "billing-green-admin"),
        ] {
            side.connection_secret_ref = secret_ref(secret, "uri");
            side.ca_secret_ref = None;
        }
        spec.switch.secret_ref = secret_ref("billing-db", "DATABASE_URL");
        if spec.switch.rehearsal_secret_ref.is_some() {
            spec.switch.rehearsal_secret_ref = Some(secret_ref(REHEARSAL_SECRET, "DATABASE_URL"));
        }
        spec.application_roles = vec![APP_ROLE.into()];
        spec.freeze.drain_timeout = "2s".into();
        spec.replication.max_lag_before_freeze = "1MiB".into();
        spec.schedule.hypercare = "2s".into();
        spec.schedule.checkpoints = vec![];
        spec.switch.restart = vec![WorkloadRef {
            kind: WorkloadKind::Deployment,
            name: "billing-api".into(),
        }];
        plan
    }

    /// The plan with `spec.migrations` from ConfigMap [`MIGRATIONS`]. Only the bank's tables
    /// are replicated and verified: the migrations add to green what blue does not have.
    fn plan_with_migrations(&self) -> DatabaseCutover {
        let mut plan = self.plan();
        plan.spec.replication.tables = vec!["public.accounts".into(), "public.ledger".into()];
        plan.spec.migrations = Some(
            serde_json::from_value(json!({
                "configMapRef": {"name": MIGRATIONS},
                "lockKey": 4242,
                "lockTimeout": "5s",
            }))
            .unwrap(),
        );
        plan
    }

    /// [`Scenario::plan_with_migrations`] plus post-switch migrations from ConfigMap
    /// [`POST_SWITCH_MIGRATIONS`].
    fn plan_with_post_switch_migrations(&self) -> DatabaseCutover {
        let mut plan = self.plan_with_migrations();
        plan.spec
            .migrations
            .as_mut()
            .expect("the plan has migrations")
            .post_switch_config_map_ref = Some(ConfigMapRef {
            name: POST_SWITCH_MIGRATIONS.into(),
        });
        plan
    }

    /// The ConfigMap of migration files, one key per file.
    async fn migrations(&self, files: &[(&str, &str)]) {
        self.config_map(MIGRATIONS, files).await;
    }

    /// The ConfigMap of post-switch migration files.
    async fn post_switch_migrations(&self, files: &[(&str, &str)]) {
        self.config_map(POST_SWITCH_MIGRATIONS, files).await;
    }

    async fn config_map(&self, name: &str, files: &[(&str, &str)]) {
        let api: Api<ConfigMap> = Api::namespaced(self.plane.client(), &self.ns);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                files
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ConfigMap::default()
        };
        api.create(&PostParams::default(), &cm)
            .await
            .unwrap_or_else(|e| panic!("create ConfigMap {name}: {e}"));
    }

    /// The cutover's one migration Job of `set` (`initial` or `post-switch`).
    async fn migration_job(&self, set: &str) -> Job {
        let jobs: Api<Job> = Api::namespaced(self.plane.client(), &self.ns);
        let selector =
            format!("cutover.dbops.dev/cutover={NAME},cutover.dbops.dev/migration-set={set}");
        let mut list = jobs
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items;
        assert_eq!(list.len(), 1, "one {set} migration Job");
        list.remove(0)
    }

    fn api(&self) -> Api<DatabaseCutover> {
        Api::namespaced(self.plane.client(), &self.ns)
    }

    async fn apply(&self, plan: &DatabaseCutover) {
        self.api()
            .create(&PostParams::default(), plan)
            .await
            .expect("create the cutover");
    }

    async fn wait_phase(&self, phase: Phase, timeout: Duration) -> DatabaseCutoverStatus {
        let api = self.api();
        eventually(&format!("phase {phase}"), timeout, || async {
            let status = api.get(NAME).await.ok()?.status?;
            (status.phase == phase).then_some(status)
        })
        .await
    }

    /// Waits for `phase`, failing at once if the cutover aborts or rolls back instead.
    async fn wait_phase_unbroken(&self, phase: Phase, timeout: Duration) -> DatabaseCutoverStatus {
        let api = self.api();
        eventually(&format!("phase {phase}"), timeout, || async {
            let status = api.get(NAME).await.ok()?.status?;
            assert!(
                !matches!(
                    status.phase,
                    Phase::Aborting | Phase::Aborted | Phase::RollingBack | Phase::RolledBack
                ),
                "{}: {:?}",
                status.phase,
                status.message
            );
            (status.phase == phase).then_some(status)
        })
        .await
    }

    /// Waits until the condition `type_` has `status` (and `reason`, when given).
    async fn wait_condition(
        &self,
        type_: &str,
        status: &str,
        reason: Option<&str>,
        timeout: Duration,
    ) -> Condition {
        let api = self.api();
        let what = format!("condition {type_}={status} ({reason:?})");
        eventually(&what, timeout, || async {
            api.get(NAME)
                .await
                .ok()?
                .status?
                .conditions
                .into_iter()
                .find(|c| {
                    c.type_ == type_ && c.status == status && reason.is_none_or(|r| c.reason == r)
                })
        })
        .await
    }

    /// How many times the cutover's Events with `reason` (and `type_`) were emitted: the
    /// recorder folds repeats of the same Event into a series.
    async fn event_count(&self, type_: &str, reason: &str) -> i32 {
        let events: Api<Event> = Api::namespaced(self.plane.client(), &self.ns);
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.type_.as_deref() == Some(type_)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(NAME)
            })
            .map(|e| e.series.map_or(1, |s| s.count))
            .sum()
    }

    /// Waits until the cutover's Events with `reason` were emitted at least `times` times.
    async fn wait_event(&self, type_: &str, reason: &str, times: i32, timeout: Duration) {
        let what = format!("{type_} Event {reason} ×{times}");
        eventually(&what, timeout, || async {
            (self.event_count(type_, reason).await >= times).then_some(())
        })
        .await;
    }

    /// Waits until the operator's `/metrics` has `line`.
    async fn wait_metric(&self, line: &str, timeout: Duration) {
        eventually(&format!("metric {line}"), timeout, || async {
            self.operator.metrics().await.contains(line).then_some(())
        })
        .await;
    }

    /// The restart annotation on the Deployment's pod template, if the switch put one there.
    async fn restart_annotation(&self) -> Option<String> {
        let deployments: Api<Deployment> = Api::namespaced(self.plane.client(), &self.ns);
        deployments
            .get("billing-api")
            .await
            .unwrap()
            .spec?
            .template
            .metadata?
            .annotations?
            .remove("cutover.dbops.dev/restartedAt")
    }

    /// Writes the Deployment's `Progressing` condition through the status subresource. No
    /// Deployment controller runs on this bed: the test stands in for it, writing what it
    /// writes when a rollout passes `progressDeadlineSeconds` (False,
    /// `ProgressDeadlineExceeded`) or finishes (True, `NewReplicaSetAvailable`).
    async fn deployment_progressing(&self, status: &str, reason: &str, message: &str) {
        let deployments: Api<Deployment> = Api::namespaced(self.plane.client(), &self.ns);
        let now = jiff::Timestamp::now().to_string();
        let patch = json!({"status": {"conditions": [{
            "type": "Progressing",
            "status": status,
            "reason": reason,
            "message": message,
            "lastUpdateTime": now,
            "lastTransitionTime": now,
        }]}});
        deployments
            .patch_status(
                "billing-api",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .expect("write the Deployment's status");
    }

    /// `kubectl cutover VERB NAME`, with the plugin found on PATH as kubectl finds plugins.
    fn kubectl_cutover(&self, verb: &str) -> String {
        let bin = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(cutover_binary(), bin.path().join("kubectl-cutover")).unwrap();
        let path = format!(
            "{}:{}",
            bin.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // kubectl takes no flags before a plugin's name: the kubeconfig goes by environment.
        let kubectl = self
            .plane
            .kubectl(Vec::<&str>::new())
            .get_program()
            .to_owned();
        let mut cmd = std::process::Command::new(kubectl);
        cmd.args(["cutover", verb, NAME, "-n", &self.ns])
            .env("PATH", path);
        if let Some(kubeconfig) = self.plane.kubeconfig_path() {
            cmd.env("KUBECONFIG", kubeconfig);
        }
        let out = cmd.output().expect("run kubectl cutover");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubectl cutover {verb} failed: {text}"
        );
        text
    }

    async fn stop_load(&mut self) -> workload::LoadReport {
        self.load.take().expect("the load runs").stop().await
    }

    /// What the application Secret names now.
    async fn app_secret(&self) -> String {
        secret_value(&self.plane, &self.ns, "billing-db", "DATABASE_URL").await
    }

    /// Every acknowledged write is on `side`, and money was neither made nor lost.
    fn assert_ledger(&self, side: &PgCluster, report: &workload::LoadReport) {
        assert!(report.acknowledged.len() > 20, "the load barely ran");
        for (client, seq) in &report.acknowledged {
            let n = one(
                side,
                &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"),
            );
            assert_eq!(n, 1, "acknowledged write ({client}, {seq}) missing");
        }
        assert_eq!(one(side, "SELECT sum(balance) FROM accounts"), 50 * 1000);
    }

    fn assert_nothing_left(&self) {
        assert_no_leftovers(&self.bg);
    }

    async fn assert_blue_writable(&self) {
        let app = self
            .bg
            .blue
            .connect_as(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE)
            .await
            .unwrap();
        app.execute("UPDATE accounts SET balance = balance WHERE id = 1", &[])
            .await
            .expect("the application can write on blue");
    }
}

const NAME: &str = "billing-to-new-cluster";
const REHEARSAL_SECRET: &str = "billing-db-rehearsal";
const MIGRATIONS: &str = "billing-migrations";
const POST_SWITCH_MIGRATIONS: &str = "billing-post-switch-migrations";
/// The `cutover.dbops.dev/migration-set` label of each migration Job.
const INITIAL: &str = "initial";
const POST_SWITCH: &str = "post-switch";
const V1: (&str, &str) = (
    "V1__create_billing_notes.sql",
    "CREATE TABLE billing_notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, account int NOT NULL, body text NOT NULL);",
);
const V2: (&str, &str) = (
    "V2__add_author_to_billing_notes.sql",
    "ALTER TABLE billing_notes ADD COLUMN author text;",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_drives_a_cutover_to_completed_under_load() {
    completed_under_load(&mut Scenario::start("happy").await).await;
}

/// The major upgrade the product is for: blue on PostgreSQL 15, green on 18.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_upgrades_postgresql_15_to_18_under_load() {
    let mut s = Scenario::start_of("upgrade", UPGRADE).await;
    assert_eq!((s.bg.blue.major(), s.bg.green.major()), (15, 18));
    let status = completed_under_load(&mut s).await;
    let said = s.kubectl_cutover("status");
    let versions = status.server_versions.expect("versions in the status");
    assert_eq!((versions.blue_major, versions.green_major), (15, 18));
    assert!(versions.major_upgrade);
    assert!(
        said.contains("versions: blue 15.") && said.contains("(a major upgrade)"),
        "{said}"
    );
}

const UPGRADE: (Option<u32>, Option<u32>) = (Some(15), Some(18));

async fn completed_under_load(s: &mut Scenario) -> DatabaseCutoverStatus {
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    // Beside the application, a writer the plan knows nothing about: the superuser, with
    // read-only turned off for every session. The default (Strict) freeze stops it too.
    let rogue = Load::start_from(
        LoadConfig {
            dsn: format!(
                "{}?options=-c%20default_transaction_read_only%3Doff",
                s.bg.blue_dsn()
            ),
            clients: 2,
            tps: 50.0,
            accounts: 50,
        },
        100,
    );
    let mut plan = s.plan();
    plan.spec.schedule.checkpoints = vec!["1s".into()];
    s.apply(&plan).await;

    let done = s
        .wait_phase_unbroken(Phase::Completed, Duration::from_secs(180))
        .await;
    let report = s.stop_load().await;
    let rogue = rogue.stop().await;
    assert!(rogue.acknowledged.len() > 10, "the superuser barely wrote");
    for (client, seq) in &rogue.acknowledged {
        assert_eq!(
            one(
                &s.bg.green,
                &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"),
            ),
            1,
            "the superuser's acknowledged write ({client}, {seq}) is not on green"
        );
    }
    assert_eq!(
        done.source_writes.as_ref().map(|w| w.count),
        Some(0),
        "the witness saw writes on the source after the freeze"
    );

    assert!(done.verification.as_ref().is_some_and(|v| v.matched));
    assert!(done.point_of_no_return_at.is_some());
    let freeze = done
        .write_freeze_seconds
        .expect("the write freeze was measured");
    eprintln!(
        "write freeze: {freeze:.3}s; {} writes acknowledged",
        report.acknowledged.len()
    );
    eprint!("{}", s.kubectl_cutover("report"));

    // Hypercare lasted `schedule.hypercare` from the switch, and its checkpoint compared the
    // bank's two tables on green with blue through reverse replication.
    assert_eq!(
        timestamp(&done.hypercare_until).duration_since(timestamp(&done.switched_at)),
        jiff::SignedDuration::from_secs(2)
    );
    let checkpoint = done
        .hypercare
        .as_ref()
        .and_then(|h| h.last_checkpoint.clone())
        .expect("a hypercare checkpoint ran");
    assert!(
        checkpoint.number == 1
            && checkpoint.matched
            && checkpoint.compared_with_source
            && checkpoint.tables == 2,
        "{checkpoint:?}"
    );
    assert!(checkpoint.target_rows > 50, "{checkpoint:?}");
    assert_eq!(done.checkpoints_done, 1);

    // Only the application Secret's key changed: it names green, with the application's own
    // credentials.
    assert_eq!(s.app_secret().await, s.green_app);
    assert!(
        s.restart_annotation().await.is_some(),
        "no restart annotation"
    );

    // An Event for every phase (Pending lasts no longer than the first reconcile).
    let events: Api<Event> = Api::namespaced(s.plane.client(), &s.ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for phase in [
        "Preflight",
        "Replicating",
        "Freezing",
        "FinalSync",
        "Verifying",
        "AwaitingApproval",
        "Switching",
        "Hypercare",
        "Completed",
    ] {
        assert!(
            reasons.iter().any(|r| r == phase),
            "no {phase} Event among {reasons:?}"
        );
    }

    s.assert_ledger(&s.bg.green, &report);
    s.assert_nothing_left();
    let metrics = s.operator.metrics().await;
    let line = format!(
        r#"cutover_phase{{name="{NAME}",namespace="{}",phase="Completed"}} 1"#,
        s.ns
    );
    assert!(metrics.contains(&line), "{metrics}");
    let freeze_gauge = format!(
        r#"cutover_write_freeze_seconds{{name="{NAME}",namespace="{}"}}"#,
        s.ns
    );
    assert!(metrics.contains(&freeze_gauge), "{metrics}");
    let forward_lag = format!(
        r#"cutover_replication_lag_bytes{{direction="forward",name="{NAME}",namespace="{}"}}"#,
        s.ns
    );
    assert!(metrics.contains(&forward_lag), "{metrics}");
    let rows = done.verification.as_ref().map_or(0, |v| v.rows_compared);
    assert!(rows > 50, "rows compared: {rows}");
    let rows_gauge = format!(
        r#"cutover_verification_rows{{name="{NAME}",namespace="{}"}} {rows}"#,
        s.ns
    );
    assert!(metrics.contains(&rows_gauge), "{metrics}");
    for phase in [
        "Replicating",
        "Freezing",
        "FinalSync",
        "Verifying",
        "Switching",
    ] {
        let count = format!(r#"cutover_step_duration_seconds_count{{phase="{phase}"}} 1"#);
        assert!(metrics.contains(&count), "{count} missing:\n{metrics}");
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_approval_waits_for_kubectl_cutover_approve() {
    let mut s = Scenario::start("approve").await;
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    let mut plan = s.plan();
    plan.spec.point_of_no_return.approval = Approval::Manual;
    plan.spec.point_of_no_return.deadline = "5m".into();
    s.apply(&plan).await;

    let waiting = s
        .wait_phase(Phase::AwaitingApproval, Duration::from_secs(120))
        .await;
    assert!(waiting.point_of_no_return_at.is_none());
    assert_eq!(
        s.app_secret().await,
        s.blue_app,
        "nothing switched before approval"
    );
    let said = s.kubectl_cutover("approve");
    assert!(said.contains("approved"), "{said}");
    s.wait_phase(Phase::Completed, Duration::from_secs(120))
        .await;
    let report = s.stop_load().await;
    s.assert_ledger(&s.bg.green, &report);
    assert_eq!(s.app_secret().await, s.green_app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_deadline_passed_aborts_and_unfreezes_blue() {
    let mut s = Scenario::start("deadline").await;
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    let mut plan = s.plan();
    plan.spec.point_of_no_return.approval = Approval::Manual;
    plan.spec.point_of_no_return.deadline = "2s".into();
    s.apply(&plan).await;

    let aborted = s.wait_phase(Phase::Aborted, Duration::from_secs(120)).await;
    let message = aborted.message.unwrap_or_default();
    assert!(message.contains("no approval"), "{message}");
    assert!(aborted.point_of_no_return_at.is_none());
    s.assert_blue_writable().await;
    let report = s.stop_load().await;
    s.assert_ledger(&s.bg.blue, &report);
    s.assert_nothing_left();
    assert_eq!(s.app_secret().await, s.blue_app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_changed_on_green_aborts_naming_table_and_key() {
    let mut s = Scenario::start("mismatch").await;
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    // Green starts empty (preflight checks it); once the copy is done it gets a row blue does
    // not have, well before the freeze is due.
    let mut plan = s.plan();
    plan.spec.schedule.freeze_at = Some(
        (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60))
            .to_string()
            .into(),
    );
    s.apply(&plan).await;
    let api = s.api();
    eventually("the copy is done", Duration::from_secs(120), || async {
        let status = api.get(NAME).await.ok()?.status?;
        status
            .milestones
            .contains(&Milestone::TargetAnalyzed)
            .then_some(())
    })
    .await;
    s.bg.green
        .execute(BlueGreen::DATABASE, "INSERT INTO accounts VALUES (9999, 1)")
        .unwrap();

    let aborted = s.wait_phase(Phase::Aborted, Duration::from_secs(120)).await;
    let message = aborted.message.unwrap_or_default();
    assert!(
        message.contains("accounts") && message.contains("9999"),
        "{message}"
    );
    s.assert_blue_writable().await;
    let report = s.stop_load().await;
    s.assert_ledger(&s.bg.blue, &report);
    s.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_over_its_budget_aborts() {
    let mut s = Scenario::start("budget").await;
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    let mut plan = s.plan();
    plan.spec.schedule.budgets.verification = "1ms".into();
    s.apply(&plan).await;

    let aborted = s.wait_phase(Phase::Aborted, Duration::from_secs(120)).await;
    let message = aborted.message.unwrap_or_default();
    assert!(
        message.contains("exceeded its budget (schedule.budgets.verification: 1ms)"),
        "{message}"
    );
    s.assert_blue_writable().await;
    let report = s.stop_load().await;
    s.assert_ledger(&s.bg.blue, &report);
    s.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_during_hypercare_brings_green_writes_back_to_blue() {
    rollback_during_hypercare(Scenario::start("rollback").await).await;
}

/// After a major upgrade, the way back replicates from the newer major to the older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_from_postgresql_18_during_hypercare_brings_green_writes_back_to_15() {
    let s = Scenario::start_of("rollback-upgrade", UPGRADE).await;
    assert_eq!((s.bg.blue.major(), s.bg.green.major()), (15, 18));
    rollback_during_hypercare(s).await;
}

async fn rollback_during_hypercare(mut s: Scenario) {
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    let mut plan = s.plan();
    plan.spec.schedule.hypercare = "1h".into();
    s.apply(&plan).await;

    s.wait_phase(Phase::Hypercare, Duration::from_secs(180))
        .await;
    let before_switch = s.stop_load().await;
    // The application now writes on green.
    let green_app =
        s.bg.green
            .connect_as(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE)
            .await
            .unwrap();
    for seq in 1..=20i64 {
        green_app
            .execute(
                "INSERT INTO ledger (client, seq, amount) VALUES (777, $1, 0)",
                &[&seq],
            )
            .await
            .expect("the application writes on green after the switch");
    }
    let said = s.kubectl_cutover("rollback");
    assert!(said.contains("rollback requested"), "{said}");
    let rolled = s
        .wait_phase(Phase::RolledBack, Duration::from_secs(120))
        .await;
    assert!(
        rolled.milestones.contains(&Milestone::SecretSwitchedBack),
        "{:?}",
        rolled.milestones
    );

    // The writes made on green are on blue; the Secret names blue again; blue takes writes.
    assert_eq!(
        one(&s.bg.blue, "SELECT count(*) FROM ledger WHERE client = 777"),
        20
    );
    s.assert_ledger(&s.bg.blue, &before_switch);
    assert_eq!(s.app_secret().await, s.blue_app);
    s.assert_blue_writable().await;
    s.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_mid_replication_leaves_nothing_behind() {
    let mut s = Scenario::start("delete").await;
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    let mut plan = s.plan();
    // Hold the cutover in Replicating: the freeze is scheduled an hour from now.
    plan.spec.schedule.freeze_at = Some(
        (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1))
            .to_string()
            .into(),
    );
    s.apply(&plan).await;
    s.wait_phase(Phase::Replicating, Duration::from_secs(60))
        .await;
    eventually(
        "the subscription exists",
        Duration::from_secs(60),
        || async { (!leftovers(&s.bg.green).is_empty()).then_some(()) },
    )
    .await;

    s.api()
        .delete(NAME, &DeleteParams::default())
        .await
        .unwrap();
    let api = s.api();
    eventually("the cutover is gone", Duration::from_secs(60), || async {
        matches!(api.get_opt(NAME).await, Ok(None)).then_some(())
    })
    .await;
    s.assert_nothing_left();
    s.assert_blue_writable().await;
    let report = s.stop_load().await;
    s.assert_ledger(&s.bg.blue, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_at_every_phase_still_completes_the_cutover_once() {
    let mut s = Scenario::start("sigkill").await;
    let no_election = ["--leader-elect", "false"];
    s.operator.kill();
    s.operator = OperatorProcess::start(&s.plane, &s.ns, "first", &no_election).unwrap();
    s.apply(&s.plan()).await;

    // Every time the phase changes, the operator is SIGKILLed and a new one started.
    let api = s.api();
    let mut killed_in = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let done = loop {
        let status = api.get(NAME).await.unwrap().status.unwrap_or_default();
        assert_ne!(
            status.phase,
            Phase::Aborted,
            "aborted: {:?}",
            status.message
        );
        if status.phase == Phase::Completed {
            break status;
        }
        if killed_in.last() != Some(&status.phase) {
            s.operator.kill();
            killed_in.push(status.phase);
            let instance = format!("after-{}", status.phase.as_str().to_lowercase());
            s.operator = OperatorProcess::start(&s.plane, &s.ns, &instance, &no_election).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no completion; killed in {killed_in:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    eprintln!("operator killed in {killed_in:?}");
    assert!(
        killed_in.len() >= 6,
        "too few phases seen to prove much: {killed_in:?}"
    );

    let report = s.stop_load().await;
    s.assert_ledger(&s.bg.green, &report);
    s.assert_nothing_left();
    assert_eq!(s.app_secret().await, s.green_app);
    // Each one-shot step happened once, in order; the point of no return was recorded once.
    let mut unique = done.milestones.clone();
    unique.dedup();
    assert_eq!(unique, done.milestones);
    assert!(done.point_of_no_return_at.is_some());
    assert_eq!(done.intent, None);
}

/// `(version, success)` of every attempt recorded in the migration history, in order.
fn history(c: &PgCluster) -> Vec<(String, String)> {
    c.query(
        BlueGreen::DATABASE,
        "SELECT version, success::text FROM cutover_schema_history ORDER BY id",
    )
    .unwrap()
    .into_iter()
    .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
    .collect()
}

fn has_table(c: &PgCluster, name: &str) -> bool {
    one(
        c,
        &format!(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = '{name}'"
        ),
    ) == 1
}

fn job_condition(job: &Job, type_: &str) -> Option<(String, String)> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_as_a_job_on_green_before_replication_and_the_cutover_completes() {
    let Some(s) = Scenario::on_node("migrate", (None, None)).await else {
        return;
    };
    migrations_then_cutover(s).await;
}

/// Migrations written for the new major run on a PostgreSQL 18 green before a 15 → 18 upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_on_a_postgresql_18_green_and_the_upgrade_completes() {
    let Some(s) = Scenario::on_node("migrate-upgrade", UPGRADE).await else {
        return;
    };
    assert_eq!((s.bg.blue.major(), s.bg.green.major()), (15, 18));
    migrations_then_cutover(s).await;
}

async fn migrations_then_cutover(mut s: Scenario) {
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    s.migrations(&[V1, V2]).await;
    s.apply(&s.plan_with_migrations()).await;

    let done = s
        .wait_phase_unbroken(Phase::Completed, Duration::from_secs(240))
        .await;
    let report = s.stop_load().await;

    // Migrating ran after the preflight and before replication, and succeeded.
    let steps: Vec<Phase> = done.steps.iter().map(|st| st.name).collect();
    let at = |p: Phase| steps.iter().position(|x| *x == p);
    let migrating = at(Phase::Migrating).expect("a Migrating step");
    assert!(at(Phase::Preflight) < Some(migrating), "{steps:?}");
    assert!(Some(migrating) < at(Phase::Replicating), "{steps:?}");

    // The Job's pod ran `cutover migrate` from the image, and the Job controller recorded it.
    let job = s.migration_job(INITIAL).await;
    let job_name = job.metadata.name.clone().unwrap();
    eprintln!("{}", s.job_logs(&job_name));
    let status = job.status.clone().unwrap();
    assert_eq!(status.succeeded, Some(1));
    assert_eq!(status.active.unwrap_or(0), 0, "no pod left active");
    assert!(status.start_time.is_some() && status.completion_time.is_some());
    assert!(job_condition(&job, "SuccessCriteriaMet").is_some());
    assert!(job_condition(&job, "Complete").is_some());
    assert!(job_condition(&job, "Failed").is_none());

    // Green has both migrations in its history and the schema they made; blue has neither.
    assert_eq!(
        history(&s.bg.green),
        vec![("1".into(), "true".into()), ("2".into(), "true".into())]
    );
    assert_eq!(
        one(
            &s.bg.green,
            "SELECT count(*) FROM information_schema.columns
             WHERE table_name = 'billing_notes' AND column_name IN ('account', 'body', 'author')"
        ),
        3
    );
    assert!(!has_table(&s.bg.blue, "billing_notes"));
    assert!(!has_table(&s.bg.blue, "cutover_schema_history"));

    assert_eq!(s.app_secret().await, s.green_app);
    s.assert_ledger(&s.bg.green, &report);
    s.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_migration_aborts_the_cutover_naming_the_file_and_blue_carries_on() {
    let Some(mut s) = Scenario::on_node("migrate-fail", (None, None)).await else {
        return;
    };
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    let broken = (
        "V2__broken.sql",
        "ALTER TABLE billing_notes ADD COLUMN author text;\nUPDATE no_such_table SET x = 1;",
    );
    s.migrations(&[V1, broken]).await;
    s.apply(&s.plan_with_migrations()).await;

    let aborted = s.wait_phase(Phase::Aborted, Duration::from_secs(180)).await;
    let message = aborted.message.unwrap_or_default();
    assert!(
        !message.contains(APP_PASSWORD) && !message.contains(&s.bg.green_dsn()),
        "the abort message carries a credential"
    );
    assert!(
        message.contains("migrations failed")
            && message.contains("BackoffLimitExceeded")
            && message.contains("V2__broken.sql")
            && message.contains("no_such_table"),
        "{message}"
    );
    let steps: Vec<Phase> = aborted.steps.iter().map(|st| st.name).collect();
    assert!(!steps.contains(&Phase::Replicating), "{steps:?}");

    // The Job failed after backoffLimit (3) retries, with the conditions the Job controller sets.
    let job = s.migration_job(INITIAL).await;
    eprintln!("{}", s.job_logs(job.metadata.name.as_deref().unwrap()));
    let status = job.status.clone().unwrap();
    assert_eq!(status.failed, Some(4));
    assert_eq!(status.active.unwrap_or(0), 0, "no pod left active");
    assert_eq!(status.completion_time, None);
    let (reason, _) = job_condition(&job, "Failed").expect("Failed=True");
    assert_eq!(reason, "BackoffLimitExceeded");
    assert!(job_condition(&job, "FailureTarget").is_some());
    assert!(job_condition(&job, "Complete").is_none());

    // V1 applied once; every attempt at V2 recorded as failed and rolled back whole.
    let attempts = history(&s.bg.green);
    assert_eq!(attempts[0], ("1".into(), "true".into()));
    assert_eq!(
        attempts[1..].to_vec(),
        vec![(String::from("2"), String::from("false")); 4],
        "{attempts:?}"
    );
    assert_eq!(
        one(
            &s.bg.green,
            "SELECT count(*) FROM information_schema.columns
             WHERE table_name = 'billing_notes' AND column_name = 'author'"
        ),
        0
    );

    s.assert_blue_writable().await;
    let report = s.stop_load().await;
    s.assert_ledger(&s.bg.blue, &report);
    s.assert_nothing_left();
    assert_eq!(s.app_secret().await, s.blue_app);
}

/// The `cutover_hypercare_problems` sample of this cutover for `reason`.
fn problems_metric(ns: &str, reason: &str, value: i64) -> String {
    format!(
        r#"cutover_hypercare_problems{{name="{NAME}",namespace="{ns}",reason="{reason}"}} {value}"#
    )
}

fn has_index(c: &PgCluster, name: &str) -> bool {
    one(
        c,
        &format!(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' AND indexname = '{name}'"
        ),
    ) == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rehearsal_runs_every_step_then_undoes_its_freeze_and_the_application_stays_on_blue() {
    let mut s = Scenario::start("rehearsal").await;
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    // The staging example on this bed, which lists the Deployment for restart: a rehearsal must
    // restart nothing.
    let plan = s.plan_from("staging-rehearsal.yaml");
    assert_eq!(plan.spec.mode, Mode::Rehearsal);
    assert!(!plan.spec.switch.restart.is_empty());
    // The rehearsal Secret exists, empty: the operator writes its key and never creates Secrets.
    let secrets: Api<Secret> = Api::namespaced(s.plane.client(), &s.ns);
    let empty = Secret {
        metadata: ObjectMeta {
            name: Some(REHEARSAL_SECRET.into()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &empty)
        .await
        .unwrap();
    s.apply(&plan).await;

    let done = s
        .wait_phase_unbroken(Phase::Completed, Duration::from_secs(180))
        .await;
    let ended = std::time::Instant::now();
    assert!(done.verification.as_ref().is_some_and(|v| v.matched));
    let message = done.message.clone().unwrap_or_default();
    assert!(message.contains("rehearsal complete"), "{message}");
    for m in [
        Milestone::ForwardReplicationDropped,
        Milestone::SecretSwitched,
        Milestone::SourceUnfrozen,
        Milestone::ReplicationCleanedUp,
    ] {
        assert!(done.milestones.contains(&m), "{m:?}: {:?}", done.milestones);
    }
    for m in [
        Milestone::ReverseReplicationStarted,
        Milestone::TargetLoginAllowed,
        Milestone::WorkloadsRestarted,
    ] {
        assert!(
            !done.milestones.contains(&m),
            "{m:?}: {:?}",
            done.milestones
        );
    }

    // The application never moved: its Secret still names blue and its pods were not
    // restarted; the rehearsal Secret got green's address with the application's credentials.
    assert_eq!(s.app_secret().await, s.blue_app);
    assert_eq!(
        secret_value(&s.plane, &s.ns, REHEARSAL_SECRET, "DATABASE_URL").await,
        s.green_app
    );
    assert_eq!(s.restart_annotation().await, None);

    // The report names every step and the measured write freeze.
    let freeze = done
        .write_freeze_seconds
        .expect("the write freeze was measured");
    assert!(freeze > 0.0, "{freeze}");
    let report = s.kubectl_cutover("report");
    eprint!("{report}");
    for step in [
        "Preflight",
        "Replicating",
        "Freezing",
        "FinalSync",
        "Verifying",
        "AwaitingApproval",
        "Switching",
    ] {
        assert!(
            report.lines().any(|l| l.starts_with(step)),
            "no {step} line in the report:\n{report}"
        );
    }
    let freeze_line = format!(
        "write freeze: {}",
        format_duration(Duration::from_secs_f64(freeze))
    );
    assert!(report.contains(&freeze_line), "{freeze_line}:\n{report}");
    assert!(report.contains("← slowest"), "{report}");
    assert!(report.contains("result: Completed"), "{report}");

    // Blue takes writes again: the application's own load commits there after the rehearsal.
    s.assert_blue_writable().await;
    let load = s.load.as_ref().expect("the load runs");
    eventually(
        "the load commits on blue again",
        Duration::from_secs(60),
        || async { (load.commits_since(ended) > 20).then_some(()) },
    )
    .await;
    let report = s.stop_load().await;
    s.assert_ledger(&s.bg.blue, &report);
    s.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_switch_migrations_run_as_their_own_job_after_the_point_of_no_return() {
    let Some(mut s) = Scenario::on_node("post-switch", (None, None)).await else {
        return;
    };
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    s.migrations(&[V1, V2]).await;
    s.post_switch_migrations(&[(
        "V3__index_ledger_by_client.sql",
        "CREATE INDEX ledger_by_client ON ledger (client, seq);",
    )])
    .await;
    s.apply(&s.plan_with_post_switch_migrations()).await;

    let done = s
        .wait_phase_unbroken(Phase::Completed, Duration::from_secs(300))
        .await;
    let report = s.stop_load().await;

    // The post-switch set ran after forward replication stopped and before the Secret moved.
    let at = |m: Milestone| {
        done.milestones
            .iter()
            .position(|x| *x == m)
            .unwrap_or_else(|| panic!("{m:?} missing from {:?}", done.milestones))
    };
    assert!(at(Milestone::ForwardReplicationDropped) < at(Milestone::PostSwitchMigrated));
    assert!(at(Milestone::PostSwitchMigrated) < at(Milestone::SecretSwitched));

    // One Job per set, both complete.
    let initial = s.migration_job(INITIAL).await;
    let post = s.migration_job(POST_SWITCH).await;
    assert_ne!(initial.metadata.name, post.metadata.name);
    eprintln!("{}", s.job_logs(post.metadata.name.as_deref().unwrap()));
    for job in [&initial, &post] {
        assert_eq!(job.status.as_ref().and_then(|s| s.succeeded), Some(1));
        assert!(job_condition(job, "Complete").is_some());
        assert!(job_condition(job, "Failed").is_none());
    }

    // Green has the index and all three versions; blue has neither.
    assert_eq!(
        history(&s.bg.green),
        vec![
            ("1".into(), "true".into()),
            ("2".into(), "true".into()),
            ("3".into(), "true".into())
        ]
    );
    assert!(has_index(&s.bg.green, "ledger_by_client"));
    assert!(!has_index(&s.bg.blue, "ledger_by_client"));

    assert_eq!(s.app_secret().await, s.green_app);
    s.assert_ledger(&s.bg.green, &report);
    s.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_post_switch_migration_rolls_back_before_the_secret_moves() {
    let Some(mut s) = Scenario::on_node("post-switch-fail", (None, None)).await else {
        return;
    };
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    s.migrations(&[V1]).await;
    s.post_switch_migrations(&[(
        "V2__broken_post_switch.sql",
        "CREATE INDEX ledger_by_client ON ledger (client, seq);\nUPDATE no_such_table SET x = 1;",
    )])
    .await;
    s.apply(&s.plan_with_post_switch_migrations()).await;

    let rolled = s
        .wait_phase(Phase::RolledBack, Duration::from_secs(300))
        .await;
    let message = rolled.message.clone().unwrap_or_default();
    assert!(
        !message.contains(APP_PASSWORD) && !message.contains(&s.bg.green_dsn()),
        "the message carries a credential"
    );
    assert!(
        message.contains("post-switch migrations failed")
            && message.contains("BackoffLimitExceeded")
            && message.contains("V2__broken_post_switch.sql")
            && message.contains("no_such_table"),
        "{message}"
    );
    assert!(rolled.point_of_no_return_at.is_some());
    for m in [
        Milestone::PostSwitchMigrated,
        Milestone::ReverseReplicationStarted,
        Milestone::TargetLoginAllowed,
        Milestone::SecretSwitched,
        Milestone::WorkloadsRestarted,
    ] {
        assert!(
            !rolled.milestones.contains(&m),
            "{m:?}: {:?}",
            rolled.milestones
        );
    }

    let job = s.migration_job(POST_SWITCH).await;
    eprintln!("{}", s.job_logs(job.metadata.name.as_deref().unwrap()));
    let (reason, _) = job_condition(&job, "Failed").expect("Failed=True");
    assert_eq!(reason, "BackoffLimitExceeded");

    // The failing file was rolled back whole on green, every attempt recorded as failed.
    assert!(!has_index(&s.bg.green, "ledger_by_client"));
    let attempts = history(&s.bg.green);
    assert_eq!(attempts[0], ("1".into(), "true".into()));
    assert_eq!(
        attempts[1..].to_vec(),
        vec![(String::from("2"), String::from("false")); 4],
        "{attempts:?}"
    );

    // The application never left blue, and blue takes its writes again.
    assert_eq!(s.app_secret().await, s.blue_app);
    assert_eq!(s.restart_annotation().await, None);
    s.assert_blue_writable().await;
    let report = s.stop_load().await;
    s.assert_ledger(&s.bg.blue, &report);
    s.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypercare_reports_a_stuck_rollout_and_a_broken_way_back_until_they_clear() {
    let mut s = Scenario::start("hypercare").await;
    let _dump = s.operator.dump_on_panic(&s.plane, &s.ns);
    let mut plan = s.plan();
    plan.spec.schedule.hypercare = "10m".into();
    plan.spec.schedule.checkpoints = vec!["1s".into()];
    s.apply(&plan).await;

    let entered = s
        .wait_phase_unbroken(Phase::Hypercare, Duration::from_secs(180))
        .await;
    let report = s.stop_load().await;
    assert_eq!(
        timestamp(&entered.hypercare_until).duration_since(timestamp(&entered.switched_at)),
        jiff::SignedDuration::from_mins(10)
    );
    let api = s.api();
    let checkpoint = eventually("the first checkpoint", Duration::from_secs(60), || async {
        api.get(NAME).await.ok()?.status?.hypercare?.last_checkpoint
    })
    .await;
    assert!(
        checkpoint.number == 1
            && checkpoint.matched
            && checkpoint.compared_with_source
            && checkpoint.tables == 2,
        "{checkpoint:?}"
    );
    s.wait_condition("Degraded", "False", None, Duration::from_secs(30))
        .await;
    // Hypercare looks again at least every 30 s.
    let notice = Duration::from_secs(90);

    // (a) The restarted Deployment's rollout passes its progress deadline.
    s.deployment_progressing(
        "False",
        "ProgressDeadlineExceeded",
        r#"ReplicaSet "billing-api-7d9c5" has timed out progressing."#,
    )
    .await;
    let degraded = s
        .wait_condition("Degraded", "True", Some("RolloutStuck"), notice)
        .await;
    assert!(
        degraded.message.contains("billing-api") && degraded.message.contains("timed out"),
        "{}",
        degraded.message
    );
    s.wait_event("Warning", "RolloutStuck", 1, Duration::from_secs(30))
        .await;
    s.wait_metric(
        &problems_metric(&s.ns, "RolloutStuck", 1),
        Duration::from_secs(30),
    )
    .await;

    s.deployment_progressing(
        "True",
        "NewReplicaSetAvailable",
        r#"ReplicaSet "billing-api-7d9c5" has successfully progressed."#,
    )
    .await;
    s.wait_condition("Degraded", "False", None, notice).await;
    s.wait_event("Normal", "Recovered", 1, Duration::from_secs(30))
        .await;
    s.wait_metric(
        &problems_metric(&s.ns, "RolloutStuck", 0),
        Duration::from_secs(30),
    )
    .await;

    // (b) Someone disables the reverse subscription on blue: a rollback would now lose green's
    // writes. `BEGIN READ WRITE`, as blue stays frozen (read-only with the other method).
    let reverse = Names::for_cutover(&format!("{}/{NAME}", s.ns)).reverse_subscription;
    let set_reverse = |verb: &str| {
        s.bg.blue
            .execute(
                BlueGreen::DATABASE,
                &format!("BEGIN READ WRITE; ALTER SUBSCRIPTION \"{reverse}\" {verb}; COMMIT;"),
            )
            .unwrap();
    };
    set_reverse("DISABLE");
    let degraded = s
        .wait_condition("Degraded", "True", Some("ReplicationBroken"), notice)
        .await;
    assert!(
        degraded.message.contains(&reverse) && degraded.message.contains("disabled"),
        "{}",
        degraded.message
    );
    s.wait_event("Warning", "ReplicationBroken", 1, Duration::from_secs(30))
        .await;
    s.wait_metric(
        &problems_metric(&s.ns, "ReplicationBroken", 1),
        Duration::from_secs(30),
    )
    .await;

    set_reverse("ENABLE");
    s.wait_condition("Degraded", "False", None, notice).await;
    s.wait_event("Normal", "Recovered", 2, Duration::from_secs(30))
        .await;
    s.wait_metric(
        &problems_metric(&s.ns, "ReplicationBroken", 0),
        Duration::from_secs(30),
    )
    .await;
    let still = api.get(NAME).await.unwrap().status.unwrap();
    assert_eq!(still.phase, Phase::Hypercare);
    assert!(still.hypercare.is_some_and(|h| h.problems.is_empty()));

    // Deleted during hypercare: the application stays on green, the way back is removed.
    api.delete(NAME, &DeleteParams::default()).await.unwrap();
    eventually("the cutover is gone", Duration::from_secs(60), || async {
        matches!(api.get_opt(NAME).await, Ok(None)).then_some(())
    })
    .await;
    s.assert_nothing_left();
    assert_eq!(s.app_secret().await, s.green_app);
    s.assert_ledger(&s.bg.green, &report);
}

/// A replica that wakes up after another took over acts on nothing stale. Two replicas with
/// short leases; the leader drives the cutover into Replicating (the freeze is scheduled a
/// little later) and is paused there (SIGSTOP) past its Lease. The standby takes over and
/// finishes the cutover. Then the old leader is resumed, its watch cache still showing
/// Replicating: it plans from the object as the API server holds it, any status it computed
/// from the old one is refused by the resourceVersion precondition, and it gives up the lead.
/// The status never goes backwards — every version the API server stored follows the sequence —
/// no step record or milestone appears twice, and nothing of the cutover is left behind (a
/// stale replica restarting replication would leave a subscription and a slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_resumed_after_a_takeover_acts_on_nothing_stale() {
    let mut s = Scenario::start("fence").await;
    s.operator.kill();
    let lease = ["--lease-seconds", "4"];
    let old = OperatorProcess::start(&s.plane, &s.ns, "old", &lease).unwrap();
    let _dump_old = old.dump_on_panic(&s.plane, &s.ns);
    eventually(
        "the first replica leads",
        Duration::from_secs(30),
        || async {
            old.metrics()
                .await
                .contains("cutover_leader 1")
                .then_some(())
        },
    )
    .await;
    let new = OperatorProcess::start(&s.plane, &s.ns, "new", &lease).unwrap();
    let _dump_new = new.dump_on_panic(&s.plane, &s.ns);

    // Every version of the object the API server stores, as a watcher sees it.
    let api = s.api();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<DatabaseCutoverStatus>::new()));
    let watcher = {
        let api = api.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            let stream = kube::runtime::watcher::watcher(
                api,
                kube::runtime::watcher::Config::default().fields(&format!("metadata.name={NAME}")),
            );
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Ok(kube::runtime::watcher::Event::Apply(obj)) = event
                    && let Some(status) = obj.status
                {
                    seen.lock().unwrap().push(status);
                }
            }
        })
    };

    let mut plan = s.plan();
    plan.spec.schedule.freeze_at = Some(
        (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(25))
            .to_string()
            .into(),
    );
    s.apply(&plan).await;
    eventually(
        "the copy is done, waiting for freezeAt",
        Duration::from_secs(60),
        || async {
            let status = api.get(NAME).await.ok()?.status?;
            let r = status.replication?;
            (status.phase == Phase::Replicating
                && r.tables_total > 0
                && r.tables_ready == r.tables_total)
                .then_some(())
        },
    )
    .await;
    let standby = new.metrics().await;
    assert!(
        !standby.contains("cutover_leader 1"),
        "the standby stands by: {standby}"
    );

    old.pause();
    eventually(
        "the standby takes the Lease",
        Duration::from_secs(60),
        || async {
            new.metrics()
                .await
                .contains("cutover_leader 1")
                .then_some(())
        },
    )
    .await;
    let done = s
        .wait_phase_unbroken(Phase::Completed, Duration::from_secs(180))
        .await;

    old.resume();
    eventually(
        "the resumed replica gives up the lead",
        Duration::from_secs(60),
        || async {
            old.metrics()
                .await
                .contains("cutover_leader 0")
                .then_some(())
        },
    )
    .await;
    // Whatever the resumed replica did, it has done it by the time it stopped leading.
    watcher.abort();
    let after = api.get(NAME).await.unwrap().status.unwrap();
    assert_eq!(after, done, "the status changed after completion");

    // No status went backwards: each stored phase follows the previous one in the sequence.
    let history = seen.lock().unwrap().clone();
    for pair in history.windows(2) {
        assert!(
            cutover_operator::plan::can_transition(pair[0].phase, pair[1].phase),
            "status went from {} to {}",
            pair[0].phase,
            pair[1].phase
        );
        assert!(
            pair[1].steps.len() >= pair[0].steps.len(),
            "step records were lost: {:?} then {:?}",
            pair[0].steps,
            pair[1].steps
        );
    }
    // No step was done twice.
    let phases: Vec<Phase> = done.steps.iter().map(|st| st.name).collect();
    let mut unique = phases.clone();
    unique.dedup();
    assert_eq!(unique, phases, "a step was recorded twice");
    let mut milestones = done.milestones.clone();
    milestones.sort_by_key(|m| format!("{m:?}"));
    milestones.dedup();
    assert_eq!(
        milestones.len(),
        done.milestones.len(),
        "{:?}",
        done.milestones
    );
    let report = s.stop_load().await;
    s.assert_ledger(&s.bg.green, &report);
    // A step the paused replica had begun may have started an online verification pass when it
    // resumed; its background task sees the lead gone and drops that pass's slots.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (blue, green) = (leftovers(&s.bg.blue), leftovers(&s.bg.green));
        if blue.is_empty() && green.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the resumed replica left behind, on blue: {blue:?}, on green: {green:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.assert_nothing_left();
    eprintln!(
        "fenced: {} status versions seen, phases {phases:?}",
        history.len()
    );
}
