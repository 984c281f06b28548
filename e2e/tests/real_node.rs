//! On a real node (`make node-test` runs this inside `e2e/real-node.sh`): the operator image
//! imported into containerd, the chart installed by `helm install --wait`, the operator running
//! as pods with the chart's ServiceAccount and RBAC, and a real application: a Deployment of the
//! bank workload (`cutover.local/bank-app:e2e`, `tests/src/bin/bank_app.rs`) that reads the
//! application Secret, whose init container runs `cutover wait` for the migration version.
//! Every write the application acknowledged is recorded by its pods on a host folder and must
//! be on the side it ended on.
//!
//! Scenarios: a completed cutover whose leader pod is killed mid-way (two replicas, the other
//! takes over), a failing migration, a rollback during hypercare, a rehearsal, a deletion
//! mid-replication.
//!
//! Everything is on the pod network: no kube-proxy runs, so the operator pods are given the API
//! server's address on the pod bridge (`KUBERNETES_SERVICE_HOST`/`_PORT` through the chart's
//! `extraEnv`), where `e2e/real-node.sh` has it listen; PostgreSQL listens there too.
//!
//! Without `CUTOVER_E2E_REAL_NODE=1` (what `cargo test` runs) each test returns at once and
//! says so.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cutover_e2e::ControlPlane;
use cutover_e2e::fixtures::{assert_no_leftovers, bank_databases_on, leftovers, one};
use cutover_e2e::node::{IMAGE, Node, RELEASE, Release, acknowledged, application, migrate_job};
use cutover_e2e::operator::{cutover_binary, eventually};
use cutover_e2e::tools::{repo_root, run};
use cutover_tests::BlueGreen;
use cutover_tests::PgCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};

const APP_ROLE: &str = "billing_app";
const APP_PASSWORD: &str = "app-password";
const LEASE: &str = "cutover-operator-leader";
const NAME: &str = "billing-to-green";

/// A node with the operator installed, blue and green, and the application running on blue.
struct Bed {
    node: Node,
    client: kube::Client,
    bg: BlueGreen,
    ns: String,
    release: Option<Release>,
    blue_app: String,
    green_app: String,
    /// The host folder the application's pods record their acknowledged writes in.
    acks: PathBuf,
    /// The Deployment's generation once it first rolled out.
    generation: i64,
}

impl Bed {
    async fn start(prefix: &str, replicas: u32) -> Option<Bed> {
        let node = Node::from_env()?;
        let on = node.clone();
        let bg = tokio::task::spawn_blocking(move || {
            bank_databases_on(APP_ROLE, APP_PASSWORD, 50, (None, None), Some(&on))
        })
        .await
        .unwrap();
        let plane = ControlPlane::shared().await.unwrap();
        assert!(
            plane.is_existing_cluster(),
            "USE_EXISTING_CLUSTER=true points at the node"
        );
        let client = plane.client();

        // --- the operator, installed by helm and waited on -------------------------------
        let system = plane.namespace("cutover-system").await.unwrap();
        let release = Release::install(&node, &system, replicas);
        let pods = operator_pods(&client, &system).await;
        assert_eq!(pods.len(), replicas as usize, "operator pods");
        for pod in &pods {
            let spec = pod.spec.as_ref().unwrap();
            assert_eq!(spec.service_account_name.as_deref(), Some(RELEASE));
            assert_eq!(spec.containers[0].image.as_deref(), Some(IMAGE));
            assert_ne!(spec.host_network, Some(true), "on the pod network");
        }
        let names: Vec<String> = pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        let leader = eventually(
            "an operator pod to hold the Lease",
            Duration::from_secs(60),
            || leader_of(&client, &system),
        )
        .await;
        assert!(names.contains(&leader), "{leader} is not one of {names:?}");

        // --- the application: its migration applied by Jobs, a Deployment waiting on it ------
        let ns = plane.namespace(prefix).await.unwrap();
        let blue_app = node.via(&bg.blue.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE));
        let green_app = node.via(&bg.green.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE));
        let bed = Bed {
            acks: node.shared_folder(&format!("acks-{ns}")),
            node,
            client,
            ns,
            release: Some(release),
            blue_app,
            green_app,
            generation: 0,
            bg,
        };
        bed.apply(&secret(
            "billing-blue-admin",
            "uri",
            &bed.node.via(&bed.bg.blue_dsn()),
        ));
        bed.apply(&secret(
            "billing-green-admin",
            "uri",
            &bed.node.via(&bed.bg.green_dsn()),
        ));
        bed.apply(&secret("billing-db", "DATABASE_URL", &bed.blue_app));
        bed.apply(&json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "billing-migrations"},
            "data": {"V1__settings.sql":
                "CREATE TABLE settings (key text PRIMARY KEY, value text NOT NULL);"}
        }));
        bed.apply(&migrate_job("migrate-blue", "billing-blue-admin"));
        bed.apply(&migrate_job("migrate-green", "billing-green-admin"));
        let jobs: Api<Job> = Api::namespaced(bed.client.clone(), &bed.ns);
        for name in ["migrate-blue", "migrate-green"] {
            eventually(
                &format!("Job {name} Complete"),
                Duration::from_secs(90),
                || async { job_complete(&jobs.get(name).await.ok()?).then_some(()) },
            )
            .await;
        }
        for c in [&bed.bg.blue, &bed.bg.green] {
            c.execute(
                BlueGreen::DATABASE,
                &format!("GRANT SELECT ON cutover_schema_history, settings TO {APP_ROLE}"),
            )
            .unwrap();
        }

        bed.apply(&application(&bed.acks));
        let (generation, pod) = bed.rolled_out(1).await;
        let mut bed = bed;
        bed.generation = generation;
        bed.assert_writes_to(&pod, &bed.bg.blue).await;
        let first = pod.metadata.name.clone().unwrap();
        bed.wait_acks_from(&first, 20).await;
        Some(bed)
    }

    /// `kubectl apply -f -` of one object into the bed's namespace.
    fn apply(&self, object: &Value) {
        let mut child = self
            .node
            .kubectl(["apply", "-n", &self.ns, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(object.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl apply refused {object}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn system(&self) -> &str {
        &self.release.as_ref().unwrap().system
    }

    /// Whether the chart's ServiceAccount may do `verb resource` in the bed's namespace.
    fn operator_can(&self, verb: &str, resource: &str) -> bool {
        let who = format!("system:serviceaccount:{}:{RELEASE}", self.system());
        let out = self
            .node
            .kubectl([
                "auth", "can-i", verb, resource, "-n", &self.ns, "--as", &who,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    }

    /// The rollback-ready example plan pointed at this bed and made quick; no migrations of
    /// its own.
    fn plan(&self, example: &str) -> Value {
        let text =
            std::fs::read_to_string(repo_root().join("cutover-plans").join(example)).unwrap();
        let mut plan: Value = serde_saphyr::from_str(&text).unwrap();
        plan["metadata"] = json!({"name": NAME, "namespace": self.ns});
        let spec = &mut plan["spec"];
        spec["source"] =
            json!({"connectionSecretRef": {"name": "billing-blue-admin", "key": "uri"}});
        spec["target"] =
            json!({"connectionSecretRef": {"name": "billing-green-admin", "key": "uri"}});
        spec["switch"]["secretRef"] = json!({"name": "billing-db", "key": "DATABASE_URL"});
        if spec["switch"].get("rehearsalSecretRef").is_some() {
            spec["switch"]["rehearsalSecretRef"] =
                json!({"name": "billing-db-rehearsal", "key": "DATABASE_URL"});
        }
        spec["switch"]["restart"] = json!([{"kind": "Deployment", "name": "billing-api"}]);
        spec["applicationRoles"] = json!([APP_ROLE]);
        spec["freeze"]["drainTimeout"] = json!("2s");
        spec["replication"]["maxLagBeforeFreeze"] = json!("1MiB");
        spec["schedule"]["hypercare"] = json!("2s");
        spec["schedule"]["checkpoints"] = json!([]);
        // The migration table is the application's own bookkeeping, the same on both sides.
        spec["replication"]["tables"] = json!(["public.accounts", "public.ledger"]);
        plan
    }

    fn cutovers(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.ns,
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("cutover.dbops.dev", "v1alpha1", "DatabaseCutover"),
                "databasecutovers",
            ),
        )
    }

    async fn status(&self) -> Option<Value> {
        let c = self.cutovers().get(NAME).await.ok()?;
        c.data.get("status").cloned()
    }

    /// Waits for `phase`; any other phase that ends a cutover fails the test.
    async fn wait_phase(&self, phase: &str, timeout: Duration) -> Value {
        eventually(&format!("the cutover {phase}"), timeout, || async {
            let status = self.status().await?;
            let now = status["phase"].as_str()?.to_owned();
            assert!(
                now == phase || !matches!(now.as_str(), "Aborted" | "RolledBack" | "Completed"),
                "the cutover ended {now}: {status:#}"
            );
            (now == phase).then_some(status)
        })
        .await
    }

    /// Waits until the cutover replicates and green holds its subscription.
    async fn wait_replicating(&self, timeout: Duration) {
        self.wait_phase("Replicating", timeout).await;
        eventually(
            "the subscription on green",
            Duration::from_secs(60),
            || async { (!leftovers(&self.bg.green).is_empty()).then_some(()) },
        )
        .await;
    }

    async fn secret_value(&self, name: &str, key: &str) -> String {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let data = secrets.get(name).await.unwrap().data.unwrap();
        String::from_utf8(data[key].0.clone()).unwrap()
    }

    async fn app_secret(&self) -> String {
        self.secret_value("billing-db", "DATABASE_URL").await
    }

    /// Waits until the Deployment has rolled out generation `at_least` or later, with one
    /// ready pod; that generation and the pod, whose init container's `cutover wait`
    /// succeeded.
    async fn rolled_out(&self, at_least: i64) -> (i64, Pod) {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.ns);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let (generation, pod) = eventually(
            &format!("billing-api generation {at_least} rolled out"),
            Duration::from_secs(120),
            || async {
                let d = deployments.get("billing-api").await.ok()?;
                let generation = d.metadata.generation?;
                let status = d.status?;
                let done = generation >= at_least
                    && status.observed_generation? >= generation
                    && status.updated_replicas == Some(1)
                    && status.ready_replicas == Some(1)
                    && status.replicas == Some(1);
                if !done {
                    return None;
                }
                let mut live: Vec<Pod> = pods
                    .list(&ListParams::default().labels("app=billing-api"))
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                (live.len() == 1).then(|| (generation, live.remove(0)))
            },
        )
        .await;
        let status = pod.status.as_ref().unwrap();
        let wait = &status.init_container_statuses.as_ref().unwrap()[0];
        let exit = wait
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code);
        assert_eq!(exit, Some(0), "cutover wait succeeded: {wait:?}");
        let said = self.logs(&pod, "wait-for-schema");
        eprintln!(
            "pod {} (generation {generation}): `cutover wait` said {}",
            pod.metadata.name.as_deref().unwrap(),
            said.trim()
        );
        (generation, pod)
    }

    fn logs(&self, pod: &Pod, container: &str) -> String {
        run(&mut self.node.kubectl([
            "logs",
            "-n",
            &self.ns,
            pod.metadata.name.as_deref().unwrap(),
            "-c",
            container,
        ]))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The application in `pod` said it writes to `side` (the server in its first line).
    async fn assert_writes_to(&self, pod: &Pod, side: &PgCluster) {
        let server = format!("{}:{}/", self.node.gateway, side.port());
        let said = eventually(
            "the application's first line",
            Duration::from_secs(30),
            || async { Some(self.logs(pod, "api")).filter(|l| !l.is_empty()) },
        )
        .await;
        assert!(
            said.lines().next().unwrap_or_default().contains(&server),
            "the application writes to {server}: {said}"
        );
    }

    /// Every write the application's pods acknowledged so far, by pod.
    fn acknowledged(&self) -> Vec<(String, Vec<(i32, i64)>)> {
        acknowledged(&self.acks)
    }

    /// Waits until pod `pod` has acknowledged more than `n` writes.
    async fn wait_acks_from(&self, pod: &str, n: usize) {
        eventually(
            &format!("{n} writes acknowledged by {pod}"),
            Duration::from_secs(60),
            || async {
                self.acknowledged()
                    .into_iter()
                    .any(|(p, acks)| p == pod && acks.len() > n)
                    .then_some(())
            },
        )
        .await;
    }

    /// Every write any of the application's pods acknowledged is on `side`, once, and money
    /// was neither made nor lost.
    fn assert_ledger(&self, side: &PgCluster) {
        let mut total = 0;
        for (pod, acks) in self.acknowledged() {
            for (client, seq) in &acks {
                let n = one(
                    side,
                    &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"),
                );
                assert_eq!(n, 1, "({client}, {seq}) acknowledged by {pod}");
            }
            eprintln!("{pod}: {} acknowledged writes, all there", acks.len());
            total += acks.len();
        }
        assert!(total > 20, "the application barely wrote");
        assert_eq!(one(side, "SELECT sum(balance) FROM accounts"), 50 * 1000);
    }

    fn assert_nothing_left(&self) {
        assert_no_leftovers(&self.bg);
    }

    /// `kubectl cutover VERB NAME` through the node's kubectl, the plugin found on PATH.
    fn kubectl_cutover(&self, verb: &str) -> String {
        let bin = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(cutover_binary(), bin.path().join("kubectl-cutover")).unwrap();
        let path = format!(
            "{}:{}",
            bin.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run(self
            .node
            .kubectl(["cutover", verb, NAME, "-n", &self.ns])
            .env("PATH", path))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The application never moved: its Secret names blue, the Deployment was not restarted,
    /// its pod keeps writing; then, stopped, every write it acknowledged is on blue.
    async fn assert_still_on_blue(&self) {
        assert_eq!(self.app_secret().await, self.blue_app);
        let (generation, pod) = self.rolled_out(self.generation).await;
        assert_eq!(
            generation, self.generation,
            "the Deployment was not restarted"
        );
        let writes = self.acknowledged()[0].1.len();
        self.wait_acks_from(pod.metadata.name.as_deref().unwrap(), writes + 20)
            .await;
        self.stop_application().await;
        self.assert_ledger(&self.bg.blue);
    }

    /// Deletes the cutover and waits until it is gone (its finalizer ran).
    async fn delete_cutover(&self) {
        self.cutovers()
            .delete(NAME, &DeleteParams::default())
            .await
            .unwrap();
        let api = self.cutovers();
        eventually("the cutover gone", Duration::from_secs(60), || async {
            matches!(api.get_opt(NAME).await, Ok(None)).then_some(())
        })
        .await;
    }

    /// The application stops writing (scaled to zero, its pods gone), so what it acknowledged
    /// is final.
    async fn stop_application(&self) {
        let out = run(&mut self.node.kubectl([
            "scale",
            "-n",
            &self.ns,
            "deployment/billing-api",
            "--replicas=0",
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{}", out.trim());
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        eventually(
            "the application's pods gone",
            Duration::from_secs(60),
            || async {
                let list = pods
                    .list(&ListParams::default().labels("app=billing-api"))
                    .await
                    .ok()?;
                list.items.is_empty().then_some(())
            },
        )
        .await;
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // The operator goes first, while the namespace's objects are still there.
        drop(self.release.take());
        let _ = std::fs::remove_dir_all(&self.acks);
    }
}

async fn operator_pods(client: &kube::Client, system: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), system);
    pods.list(&ListParams::default().labels("app.kubernetes.io/name=cutover-operator"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// The holder of the release's Lease, if its lease is current.
async fn leader_of(client: &kube::Client, system: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), system);
    leases.get_opt(LEASE).await.ok()??.spec?.holder_identity
}

/// `plan` waits an hour before its freeze (the test releases it, or deletes the cutover).
fn hold_the_freeze(plan: &mut Value) {
    let at = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
    plan["spec"]["schedule"]["freezeAt"] = json!(at);
}

fn secret(name: &str, key: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
           "stringData": {key: value}})
}

fn job_complete(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
        })
}

/// The process of `pod`'s container named `cutover`, found through the cgroup the kubelet
/// made for the pod.
fn operator_process(pod: &Pod) -> Option<i32> {
    let uid = pod.metadata.uid.as_deref()?;
    let marker = format!("pod{uid}");
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        (comm.trim() == "cutover" && cgroup.contains(&marker)).then_some(pid)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operator_pods_installed_by_helm_drive_a_cutover_and_the_leader_killed_midway_hands_over()
 {
    let Some(bed) = Bed::start("handover", 2).await else {
        return;
    };

    // Least privilege: what the cutover needs, and not more.
    for (verb, resource) in [
        ("patch", "databasecutovers.cutover.dbops.dev"),
        ("create", "jobs.batch"),
        ("patch", "secrets"),
        ("patch", "deployments.apps"),
    ] {
        assert!(bed.operator_can(verb, resource), "may {verb} {resource}");
    }
    for (verb, resource) in [
        ("delete", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("delete", "deployments.apps"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
    ] {
        assert!(
            !bed.operator_can(verb, resource),
            "may not {verb} {resource}"
        );
    }

    let mut plan = bed.plan("production-with-rollback.yaml");
    // The same migration, applied to green by the operator's own Job before replication.
    plan["spec"]["migrations"] = json!({"configMapRef": {"name": "billing-migrations"},
                                        "lockKey": 4242, "lockTimeout": "5s"});
    // Hold the freeze until the test has killed the leader.
    hold_the_freeze(&mut plan);
    bed.apply(&plan);

    // The operator's migration Job runs in a pod with the image the chart runs, and completes.
    let jobs: Api<Job> = Api::namespaced(bed.client.clone(), &bed.ns);
    let job = eventually(
        "the operator's migration Job Complete",
        Duration::from_secs(120),
        || async {
            let list = jobs
                .list(&ListParams::default().labels("cutover.dbops.dev/migration-set=initial"))
                .await
                .ok()?;
            list.items.into_iter().find(job_complete)
        },
    )
    .await;
    eprintln!(
        "{}",
        bed.node
            .job_logs(&bed.ns, job.metadata.name.as_deref().unwrap())
    );

    // Replicating, the subscription streaming: the leader's process is SIGKILLed and its pod
    // deleted; the other replica takes the Lease and carries on.
    bed.wait_replicating(Duration::from_secs(180)).await;
    let system = bed.system().to_owned();
    let killed = leader_of(&bed.client, &system).await.expect("a leader");
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), &system);
    let victim = pods.get(&killed).await.unwrap();
    let pid = operator_process(&victim).expect("the leader's process on this node");
    run(std::process::Command::new("kill").args(["-KILL", &pid.to_string()]))
        .unwrap_or_else(|e| panic!("{e}"));
    pods.delete(&killed, &DeleteParams::default())
        .await
        .unwrap();
    eprintln!("SIGKILLed the leader {killed} (pid {pid}) and deleted its pod");
    let successor = eventually(
        "another operator pod to take the Lease",
        Duration::from_secs(90),
        || async {
            let holder = leader_of(&bed.client, &system).await?;
            (holder != killed).then_some(holder)
        },
    )
    .await;
    eprintln!("{successor} leads now");

    // Released: the freeze may start now.
    bed.cutovers()
        .patch(
            NAME,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"schedule": {"freezeAt": null}}})),
        )
        .await
        .unwrap();
    let status = bed.wait_phase("Completed", Duration::from_secs(300)).await;
    eprintln!(
        "completed under {successor}; write freeze {}s",
        status["writeFreezeSeconds"]
    );
    // Each one-shot step happened once: nothing lost, nothing repeated across the handover.
    let milestones: Vec<String> = serde_json::from_value(status["milestones"].clone()).unwrap();
    let unique: BTreeSet<&String> = milestones.iter().collect();
    assert_eq!(unique.len(), milestones.len(), "{milestones:?}");
    for m in [
        "SecretSwitched",
        "WorkloadsRestarted",
        "ReverseReplicationStarted",
    ] {
        assert!(milestones.iter().any(|x| x == m), "{m}: {milestones:?}");
    }

    // The switch: the Secret names green; the Deployment rolled out a new pod whose init
    // container waited on green and whose application writes there.
    assert_eq!(bed.app_secret().await, bed.green_app);
    let (_, pod) = bed.rolled_out(bed.generation + 1).await;
    bed.assert_writes_to(&pod, &bed.bg.green).await;
    bed.wait_acks_from(pod.metadata.name.as_deref().unwrap(), 20)
        .await;
    bed.stop_application().await;
    bed.assert_ledger(&bed.bg.green);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_during_hypercare_moves_the_application_back_to_blue_with_its_green_writes() {
    let Some(bed) = Bed::start("rollback", 1).await else {
        return;
    };
    let mut plan = bed.plan("production-with-rollback.yaml");
    plan["spec"]["schedule"]["hypercare"] = json!("1h");
    bed.apply(&plan);
    bed.wait_phase("Hypercare", Duration::from_secs(240)).await;

    // On green: the restarted pod writes there.
    assert_eq!(bed.app_secret().await, bed.green_app);
    let (generation, on_green) = bed.rolled_out(bed.generation + 1).await;
    bed.assert_writes_to(&on_green, &bed.bg.green).await;
    bed.wait_acks_from(on_green.metadata.name.as_deref().unwrap(), 20)
        .await;

    let said = bed.kubectl_cutover("rollback");
    assert!(said.contains("rollback requested"), "{said}");
    let status = bed.wait_phase("RolledBack", Duration::from_secs(180)).await;
    let milestones: Vec<String> = serde_json::from_value(status["milestones"].clone()).unwrap();
    for m in ["SecretSwitchedBack", "WorkloadsRestartedBack"] {
        assert!(milestones.iter().any(|x| x == m), "{m}: {milestones:?}");
    }

    // Back on blue: the Secret names blue, a new pod waited on blue and writes there, and
    // every write acknowledged on green came back with the rest.
    assert_eq!(bed.app_secret().await, bed.blue_app);
    let (_, on_blue) = bed.rolled_out(generation + 1).await;
    bed.assert_writes_to(&on_blue, &bed.bg.blue).await;
    bed.wait_acks_from(on_blue.metadata.name.as_deref().unwrap(), 20)
        .await;
    bed.stop_application().await;
    bed.assert_ledger(&bed.bg.blue);
    bed.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rehearsal_on_the_node_leaves_the_application_running_on_blue() {
    let Some(bed) = Bed::start("rehearsal", 1).await else {
        return;
    };
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), &bed.ns);
    let before: Vec<String> = pods
        .list(&ListParams::default().labels("app=billing-api"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    // Without its Secret the rehearsal stops at preflight, naming it: the operator's RBAC lets
    // it patch Secrets, not create them.
    bed.apply(&bed.plan("staging-rehearsal.yaml"));
    let refused = bed.wait_phase("Aborted", Duration::from_secs(120)).await;
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("rehearsal-secret") && message.contains("billing-db-rehearsal"),
        "{message}"
    );
    // Nothing was done but the abort's own (idempotent) undo steps.
    let done: Vec<String> =
        serde_json::from_value(refused["milestones"].clone()).unwrap_or_default();
    assert!(
        done.iter()
            .all(|m| m == "SourceUnfrozen" || m == "ReplicationCleanedUp"),
        "{done:?}"
    );
    bed.assert_nothing_left();
    bed.delete_cutover().await;

    bed.apply(&json!({"apiVersion": "v1", "kind": "Secret",
                      "metadata": {"name": "billing-db-rehearsal"}}));
    bed.apply(&bed.plan("staging-rehearsal.yaml"));
    let status = bed.wait_phase("Completed", Duration::from_secs(240)).await;
    let message = status["message"].as_str().unwrap_or_default();
    assert!(message.contains("rehearsal complete"), "{message}");
    eprintln!("rehearsal: write freeze {}s", status["writeFreezeSeconds"]);

    // The application never moved: same Secret, same pod, still writing on blue; the
    // rehearsal Secret got green's address.
    assert_eq!(
        bed.secret_value("billing-db-rehearsal", "DATABASE_URL")
            .await,
        bed.green_app
    );
    let (_, pod) = bed.rolled_out(bed.generation).await;
    assert_eq!(before, vec![pod.metadata.name.clone().unwrap()]);
    bed.assert_still_on_blue().await;
    bed.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_migration_on_the_node_aborts_and_the_application_stays_on_blue() {
    let Some(bed) = Bed::start("migrate-fail", 1).await else {
        return;
    };
    // The application's V1 (already on green) and a V2 that fails half way.
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "release-2-migrations"},
        "data": {
            "V1__settings.sql": "CREATE TABLE settings (key text PRIMARY KEY, value text NOT NULL);",
            "V2__broken.sql": "ALTER TABLE settings ADD COLUMN owner text;\nUPDATE no_such_table SET x = 1;",
        }
    }));
    let mut plan = bed.plan("production-with-rollback.yaml");
    plan["spec"]["migrations"] = json!({"configMapRef": {"name": "release-2-migrations"},
                                        "lockKey": 4242, "lockTimeout": "5s"});
    bed.apply(&plan);

    // The operator's Job fails four times (the real Job controller's back-off between them),
    // and the cutover aborts naming the file and the error, before replicating.
    let aborted = bed.wait_phase("Aborted", Duration::from_secs(240)).await;
    let message = aborted["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("BackoffLimitExceeded")
            && message.contains("V2__broken.sql")
            && message.contains("no_such_table"),
        "{message}"
    );
    assert!(
        !message.contains(APP_PASSWORD),
        "the message carries a credential"
    );
    let steps: Vec<String> = aborted["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect();
    assert!(!steps.iter().any(|s| s == "Replicating"), "{steps:?}");
    let jobs: Api<Job> = Api::namespaced(bed.client.clone(), &bed.ns);
    let job = jobs
        .list(&ListParams::default().labels("cutover.dbops.dev/migration-set=initial"))
        .await
        .unwrap()
        .items
        .remove(0);
    assert_eq!(job.status.as_ref().and_then(|s| s.failed), Some(4));
    // V2 rolled back whole on green: no column `owner`.
    assert_eq!(
        one(
            &bed.bg.green,
            "SELECT count(*) FROM information_schema.columns
             WHERE table_name = 'settings' AND column_name = 'owner'"
        ),
        0
    );
    bed.assert_nothing_left();

    // The application never moved and keeps writing on blue in the same pod.
    bed.assert_still_on_blue().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_cutover_mid_replication_on_the_node_leaves_nothing_behind() {
    let Some(bed) = Bed::start("delete", 1).await else {
        return;
    };
    let mut plan = bed.plan("production-with-rollback.yaml");
    hold_the_freeze(&mut plan);
    bed.apply(&plan);
    bed.wait_replicating(Duration::from_secs(120)).await;

    bed.delete_cutover().await;
    bed.assert_nothing_left();

    // The application carries on on blue, in the same pod.
    bed.assert_still_on_blue().await;
}
