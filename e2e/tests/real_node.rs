//! On a real node (`make e2e-node` runs this inside `e2e/real-node.sh`): the operator image
//! imported into containerd, the chart installed by `helm install --wait`, the operator running
//! as a pod with the chart's ServiceAccount and RBAC, and a whole cutover through it while a
//! Deployment whose init container runs `cutover wait` is restarted by the switch onto green.
//!
//! The operator pod uses the node's network (`hostNetwork`, the chart's value): this bed runs no
//! kube-proxy, so the `kubernetes` Service's address leads nowhere; the pod reaches the API
//! server and PostgreSQL on loopback (`KUBERNETES_SERVICE_HOST=127.0.0.1` through the chart's
//! `extraEnv`). The workload pods do the same for PostgreSQL.
//!
//! Without `CUTOVER_E2E_REAL_NODE=1` (what `make test` runs) each test returns at once and says so.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use cutover_e2e::ControlPlane;
use cutover_e2e::operator::eventually;
use cutover_e2e::tools::{chart_dir, helm, run};
use cutover_tests::workload::{self, Load, LoadConfig};
use cutover_tests::{BlueGreen, PgCluster, PgClusterBuilder};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};

const APP_ROLE: &str = "billing_app";
const APP_PASSWORD: &str = "app-password";
const RELEASE: &str = "cutover-operator";
const IMAGE: &str = concat!("ghcr.io/dbops/cutover:", env!("CARGO_PKG_VERSION"));
const PAUSE_IMAGE: &str = "cutover.local/pause:e2e";

/// The node `e2e/real-node.sh` started, from the environment it gives its command.
struct Node {
    api_port: String,
    gateway: String,
    kubectl: PathBuf,
}

fn node() -> Option<Node> {
    if std::env::var("CUTOVER_E2E_REAL_NODE").as_deref() != Ok("1") {
        eprintln!(
            "not on a real node: run `make e2e-node` (CUTOVER_E2E_REAL_NODE=1 inside e2e/real-node.sh)"
        );
        return None;
    }
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by e2e/real-node.sh"))
    };
    let api = var("CUTOVER_NODE_API");
    Some(Node {
        api_port: api.rsplit(':').next().unwrap().to_owned(),
        gateway: var("CUTOVER_NODE_GATEWAY"),
        kubectl: PathBuf::from(var("CUTOVER_NODE_KUBECTL")),
    })
}

impl Node {
    fn kubectl<const N: usize>(&self, args: [&str; N]) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.args(args);
        cmd
    }

    /// `kubectl apply -f -` of one object.
    fn apply(&self, ns: &str, object: &Value) {
        let mut child = self
            .kubectl(["apply", "-n", ns, "-f", "-"])
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

    /// Whether the chart's ServiceAccount may do `verb resource` in `ns` (`kubectl auth can-i`).
    fn operator_can(&self, system_ns: &str, verb: &str, resource: &str, ns: &str) -> bool {
        let who = format!("system:serviceaccount:{system_ns}:{RELEASE}");
        let out = self
            .kubectl(["auth", "can-i", verb, resource, "-n", ns, "--as", &who])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    }
}

/// Blue and green with the bank schema and the application role, like the other e2e tests'
/// pair, except that green also listens on the pod bridge's address and lets the pod subnet
/// in: the operator's migration Job runs in a pod on the bridge (not on the node's network)
/// and reaches green there.
fn bank_databases(gateway: &str) -> BlueGreen {
    let quick = |b: PgClusterBuilder| {
        b.setting("wal_receiver_status_interval", "1s")
            .setting("wal_retrieve_retry_interval", "200ms")
    };
    let bg = BlueGreen::start_with(
        quick(PgCluster::builder()),
        quick(PgCluster::builder()).setting("listen_addresses", format!("127.0.0.1,{gateway}")),
    )
    .expect("start PostgreSQL");
    let subnet = format!("{}.0/24", gateway.rsplit_once('.').unwrap().0);
    let hba = bg.green.data_dir().join("pg_hba.conf");
    let mut rules = std::fs::OpenOptions::new().append(true).open(&hba).unwrap();
    writeln!(
        rules,
        "host all all {subnet} scram-sha-256\nhost replication all {subnet} scram-sha-256"
    )
    .unwrap();
    bg.green
        .execute("postgres", "SELECT pg_reload_conf()")
        .unwrap();
    for c in [&bg.blue, &bg.green] {
        c.create_role(APP_ROLE, APP_PASSWORD, "LOGIN").unwrap();
        c.execute(BlueGreen::DATABASE, workload::SCHEMA).unwrap();
        c.execute(BlueGreen::DATABASE, &workload::grants(APP_ROLE))
            .unwrap();
    }
    bg.blue
        .execute(BlueGreen::DATABASE, &workload::seed(50, 1000))
        .unwrap();
    bg
}

/// A connection string aimed at the bridge address instead of loopback.
fn via(gateway: &str, dsn: &str) -> String {
    dsn.replacen("@127.0.0.1:", &format!("@{gateway}:"), 1)
}

fn secret(name: &str, key: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
           "stringData": {key: value}})
}

/// A pod spec's security settings, as the restricted Pod Security profile wants them.
fn restricted() -> Value {
    json!({"runAsNonRoot": true, "allowPrivilegeEscalation": false,
           "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
           "seccompProfile": {"type": "RuntimeDefault"}})
}

/// A Job running `cutover migrate` from the image against the database of `secret`, on the
/// node's network (PostgreSQL listens on loopback).
fn migrate_job(name: &str, secret: &str) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "hostNetwork": true,
            "containers": [{
                "name": "migrate", "image": IMAGE, "imagePullPolicy": "Never",
                "args": ["migrate", "--dir", "/migrations", "--lock-key", "7"],
                "env": [{"name": "DATABASE_URL",
                         "valueFrom": {"secretKeyRef": {"name": secret, "key": "uri"}}}],
                "volumeMounts": [{"name": "migrations", "mountPath": "/migrations", "readOnly": true}],
                "securityContext": restricted(),
            }],
            "volumes": [{"name": "migrations", "configMap": {"name": "billing-migrations"}}],
        }}}
    })
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

/// The one live pod matching `selector`.
async fn app_pods_named(client: &kube::Client, ns: &str, selector: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut live: Vec<Pod> = pods
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    assert_eq!(live.len(), 1, "one pod {selector}");
    live.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_the_operator_as_a_pod_and_it_drives_a_cutover_with_a_real_workload() {
    let Some(node) = node() else { return };
    let gateway = node.gateway.clone();
    let bg = tokio::task::spawn_blocking(move || bank_databases(&gateway))
        .await
        .unwrap();
    let plane = ControlPlane::shared().await.unwrap();
    assert!(
        plane.is_existing_cluster(),
        "USE_EXISTING_CLUSTER=true points at the node"
    );
    let client = plane.client();

    // --- the operator, installed by helm and waited on -----------------------------------
    let system = plane.namespace("cutover-system").await.unwrap();
    let started = std::time::Instant::now();
    let out = run(helm(None)
        .args(["install", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", &system, "--wait", "--timeout", "180s"])
        .args(["--set", "replicaCount=1", "--set", "hostNetwork=true"])
        .args(["--set", "image.pullPolicy=Never"])
        .args(["--set", &format!("metrics.address={}", node.gateway)])
        .args(["--set", "extraEnv[0].name=KUBERNETES_SERVICE_HOST"])
        .args(["--set", "extraEnv[0].value=127.0.0.1"])
        .args(["--set", "extraEnv[1].name=KUBERNETES_SERVICE_PORT"])
        .args([
            "--set-string",
            &format!("extraEnv[1].value={}", node.api_port),
        ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("STATUS: deployed"), "{out}");
    eprintln!(
        "helm install --wait: {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), &system);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=cutover-operator"))
        .await
        .unwrap()
        .items;
    assert_eq!(list.len(), 1, "one operator pod");
    let pod = &list[0];
    let pod_name = pod.metadata.name.clone().unwrap();
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some(RELEASE));
    assert_eq!(spec.containers[0].image.as_deref(), Some(IMAGE));
    // It leads: the release's Lease names this pod.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &system);
    eventually(
        "the operator pod to hold the Lease",
        Duration::from_secs(60),
        || async {
            let lease = leases.get_opt("cutover-operator-leader").await.ok()??;
            (lease.spec?.holder_identity? == pod_name).then_some(())
        },
    )
    .await;

    // Least privilege: what the cutover needs, and not more.
    let ns = plane.namespace("billing").await.unwrap();
    for (verb, resource) in [
        ("patch", "databasecutovers.cutover.dbops.dev"),
        ("create", "jobs.batch"),
        ("patch", "secrets"),
        ("patch", "deployments.apps"),
    ] {
        assert!(
            node.operator_can(&system, verb, resource, &ns),
            "may {verb} {resource}"
        );
    }
    for (verb, resource) in [
        ("delete", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("delete", "deployments.apps"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
    ] {
        assert!(
            !node.operator_can(&system, verb, resource, &ns),
            "may not {verb} {resource}"
        );
    }

    // --- the application: its migration applied to blue by a Job, a Deployment waiting on it --
    // Green is named by the bridge address: the operator's own migration Job reaches it there.
    let blue_app = bg.blue.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE);
    let green_admin = via(&node.gateway, &bg.green_dsn());
    node.apply(&ns, &secret("billing-blue-admin", "uri", &bg.blue_dsn()));
    node.apply(&ns, &secret("billing-green-admin", "uri", &green_admin));
    node.apply(&ns, &secret("billing-db", "DATABASE_URL", &blue_app));
    node.apply(
        &ns,
        &json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "billing-migrations"},
            "data": {"V1__settings.sql":
                "CREATE TABLE settings (key text PRIMARY KEY, value text NOT NULL);"}
        }),
    );
    node.apply(&ns, &migrate_job("migrate-blue", "billing-blue-admin"));
    node.apply(&ns, &migrate_job("migrate-green", "billing-green-admin"));
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    for name in ["migrate-blue", "migrate-green"] {
        eventually(
            &format!("Job {name} Complete"),
            Duration::from_secs(90),
            || async { job_complete(&jobs.get(name).await.ok()?).then_some(()) },
        )
        .await;
    }
    for c in [&bg.blue, &bg.green] {
        c.execute(
            BlueGreen::DATABASE,
            &format!("GRANT SELECT ON cutover_schema_history, settings TO {APP_ROLE}"),
        )
        .unwrap();
    }

    node.apply(
        &ns,
        &json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "billing-api"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "billing-api"}},
                "template": {
                    "metadata": {"labels": {"app": "billing-api"}},
                    "spec": {
                        "hostNetwork": true,
                        "initContainers": [{
                            "name": "wait-for-schema", "image": IMAGE, "imagePullPolicy": "Never",
                            "args": ["wait", "--until-version", "1", "--timeout", "2m"],
                            "env": [{"name": "DATABASE_URL", "valueFrom":
                                {"secretKeyRef": {"name": "billing-db", "key": "DATABASE_URL"}}}],
                            "securityContext": restricted(),
                        }],
                        "containers": [{
                            "name": "api", "image": PAUSE_IMAGE, "imagePullPolicy": "Never",
                            "securityContext": restricted(),
                        }],
                    }
                }
            }
        }),
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let available = |generation_at_least: i64| {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("billing-api").await.ok()?;
            let status = d.status?;
            (status.observed_generation? >= generation_at_least
                && status.updated_replicas == Some(1)
                && status.ready_replicas == Some(1)
                && status.replicas == Some(1))
            .then_some(d.metadata.generation?)
        }
    };
    let generation = eventually("billing-api available", Duration::from_secs(90), || {
        available(1)
    })
    .await;

    // --- the cutover, under load --------------------------------------------------------
    let load = Load::start(LoadConfig {
        dsn: blue_app.clone(),
        clients: 2,
        tps: 100.0,
        accounts: 50,
    });
    eventually("the load commits", Duration::from_secs(30), || async {
        (load.commits() > 20).then_some(())
    })
    .await;

    let mut plan: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(
            cutover_e2e::tools::repo_root().join("cutover-plans/production-with-rollback.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    plan["metadata"] = json!({"name": "billing-to-green", "namespace": ns});
    let spec = &mut plan["spec"];
    spec["applicationRoles"] = json!([APP_ROLE]);
    spec["freeze"]["drainTimeout"] = json!("2s");
    spec["replication"]["maxLagBeforeFreeze"] = json!("1MiB");
    spec["schedule"]["hypercare"] = json!("2s");
    spec["schedule"]["checkpoints"] = json!([]);
    // The same migrations, applied to green by the operator's own Job before replication.
    spec["migrations"] = json!({"configMapRef": {"name": "billing-migrations"},
                                "lockKey": 4242, "lockTimeout": "5s"});
    node.apply(&ns, &plan);

    // The operator's migration Job runs in a pod on the bridge (its own network namespace),
    // with the image the chart runs, and completes.
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
    let job_name = job.metadata.name.clone().unwrap();
    let job_pod = app_pods_named(&client, &ns, &format!("job-name={job_name}")).await;
    let job_spec = job_pod.spec.as_ref().unwrap();
    assert_ne!(
        job_spec.host_network,
        Some(true),
        "the migration pod has a network of its own"
    );
    assert_eq!(job_spec.containers[0].image.as_deref(), Some(IMAGE));
    let pod_ip = job_pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default();
    let prefix = format!("{}.", node.gateway.rsplit_once('.').unwrap().0);
    assert!(
        pod_ip.starts_with(&prefix) && pod_ip != node.gateway,
        "pod IP {pod_ip} on the bridge"
    );
    eprintln!("the operator's migration Job {job_name} ran in pod {pod_ip}");

    let cutovers = Api::<kube::core::DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &kube::discovery::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("cutover.dbops.dev", "v1alpha1", "DatabaseCutover"),
            "databasecutovers",
        ),
    );
    let status = eventually(
        "the cutover Completed",
        Duration::from_secs(300),
        || async {
            let c = cutovers.get("billing-to-green").await.ok()?;
            let status = c.data.get("status")?.clone();
            let phase = status["phase"].as_str()?.to_owned();
            assert!(
                !matches!(phase.as_str(), "Aborted" | "RolledBack"),
                "the cutover ended {phase}: {status:#}"
            );
            (phase == "Completed").then_some(status)
        },
    )
    .await;
    let report = load.stop().await;
    eprintln!(
        "completed; write freeze {}s, {} writes acknowledged",
        status["writeFreezeSeconds"],
        report.acknowledged.len()
    );

    // The switch: the application Secret names green, the Deployment was restarted, and the
    // new pod's init container ran `cutover wait` against green before the pod started.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let data = secrets.get("billing-db").await.unwrap().data.unwrap();
    let app_url = String::from_utf8(data["DATABASE_URL"].0.clone()).unwrap();
    let green_server = format!("@{}:{}/", node.gateway, bg.green.port());
    assert!(
        app_url.contains(&green_server) && app_url.starts_with(&format!("postgres://{APP_ROLE}:")),
        "the application Secret names green with the application's role: {app_url}"
    );
    eventually(
        "billing-api rolled out again",
        Duration::from_secs(90),
        || available(generation + 1),
    )
    .await;
    let app_pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let running: Vec<Pod> = app_pods
        .list(&ListParams::default().labels("app=billing-api"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    assert_eq!(running.len(), 1, "one billing-api pod after the rollout");
    let pod = &running[0];
    let wait = &pod
        .status
        .as_ref()
        .unwrap()
        .init_container_statuses
        .as_ref()
        .unwrap()[0];
    let exit = wait
        .state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .map(|t| t.exit_code);
    assert_eq!(exit, Some(0), "cutover wait succeeded: {wait:?}");
    let logs = run(&mut node.kubectl([
        "logs",
        "-n",
        &ns,
        pod.metadata.name.as_deref().unwrap(),
        "-c",
        "wait-for-schema",
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("the restarted pod's `cutover wait`: {}", logs.trim());

    // Every write the application saw acknowledged is on green.
    assert!(report.acknowledged.len() > 20, "the load barely ran");
    for (client_id, seq) in &report.acknowledged {
        let rows = bg
            .green
            .query(
                BlueGreen::DATABASE,
                &format!("SELECT count(*) FROM ledger WHERE client = {client_id} AND seq = {seq}"),
            )
            .unwrap();
        assert_eq!(
            rows[0][0].as_deref(),
            Some("1"),
            "acknowledged ({client_id}, {seq}) on green"
        );
    }

    let out = run(helm(None).args(["uninstall", RELEASE, "--namespace", &system, "--wait"]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("uninstalled"), "{out}");
}
