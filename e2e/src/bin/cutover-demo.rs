//! `make demo`: a whole live cutover on one machine. Two PostgreSQL clusters (blue and green), a
//! bank workload writing to blue, a real kube-apiserver + etcd, the operator, and the
//! `production-with-rollback` example applied with kubectl and watched phase by phase to
//! Completed. Ends with a summary: the write-freeze window, rows verified, writes acknowledged
//! and writes lost (counted on green, not assumed).
//!
//! `--keep` leaves everything running until Ctrl-C and prints how to reach it. `--upgrade`
//! runs green on PostgreSQL 18 (blue stays on the machine's 15): the major upgrade a cutover is
//! usually for (`make demo DEMO_ARGS=--upgrade`).
//!
//! `--node` (what `make demo` runs as root, inside `e2e/real-node.sh`): on a real node instead of
//! an API server alone. The operator is installed with `helm install --wait` and runs as a pod;
//! the application is a Deployment of the bank workload (`cutover.local/bank-app:e2e`) whose
//! init container runs `cutover wait`; its pods are listed as they change, so the restart at the
//! switch shows live; the writes counted are those the application's pods acknowledged.

use std::time::{Duration, Instant};

use std::process::Command;

use cutover_e2e::ControlPlane;
use cutover_e2e::fixtures::{bank_databases_on, repo};
use cutover_e2e::node::{self, Node, Release};
use cutover_e2e::operator::OperatorProcess;
use cutover_tests::workload::{Load, LoadConfig};
use cutover_tests::{BlueGreen, PgCluster};

const NAMESPACE: &str = "billing";
const PLAN: &str = "cutover-plans/production-with-rollback.yaml";
const NAME: &str = "billing-to-new-cluster";
const APP_ROLE: &str = "billing_app";
const APP_PASSWORD: &str = "demo-app-password";
/// The operator's namespace on the real node.
const SYSTEM: &str = "cutover-system";

fn say(text: &str) {
    println!("\n==> {text}");
}

/// Where kubectl runs: the local control plane, or the real node (its own kubectl).
struct Cluster {
    plane: ControlPlane,
    node: Option<Node>,
}

impl Cluster {
    fn kubectl(&self, args: &[&str]) -> Command {
        match &self.node {
            Some(node) => node.kubectl(args),
            None => self.plane.kubectl(args),
        }
    }
}

fn kubectl(plane: &Cluster, args: &[&str]) -> String {
    let out = plane.kubectl(args).output().expect("run kubectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubectl {} failed:\n{text}",
        args.join(" ")
    );
    text
}

fn show(plane: &Cluster, args: &[&str]) {
    println!("$ kubectl {}", args.join(" "));
    print!("{}", kubectl(plane, args));
}

/// `kubectl apply -f -` of one object into the demo's namespace.
fn apply(plane: &Cluster, object: &serde_json::Value) {
    use std::io::Write;
    let mut child = plane
        .kubectl(&["apply", "-n", NAMESPACE, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(object.to_string().as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "kubectl apply {object}");
}

/// `kubectl rollout status` of the application's Deployment.
fn rollout_status(plane: &Cluster) {
    kubectl(
        plane,
        &[
            "-n",
            NAMESPACE,
            "rollout",
            "status",
            "deployment/billing-api",
            "--timeout=120s",
        ],
    );
}

fn count(c: &PgCluster, sql: &str) -> i64 {
    c.query(BlueGreen::DATABASE, sql).unwrap()[0][0]
        .clone()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    let upgrade = std::env::args().any(|a| a == "--upgrade");
    let node = if std::env::args().any(|a| a == "--node") {
        Some(Node::from_env().expect("--node runs inside e2e/real-node.sh (make demo as root)"))
    } else {
        None
    };
    let started = Instant::now();

    say("starting two PostgreSQL clusters: blue (the source) and green (the target, schema only)");
    let majors = if upgrade {
        (Some(15), Some(18))
    } else {
        (None, None)
    };
    let on = node.clone();
    let dbs = tokio::task::spawn_blocking(move || {
        bank_databases_on(APP_ROLE, APP_PASSWORD, 1000, majors, on.as_ref())
    })
    .await
    .unwrap();
    // On the node the pods reach PostgreSQL at the pod bridge's address.
    let reach = |dsn: String| match &node {
        Some(node) => node.via(&dsn),
        None => dsn,
    };
    for (label, c) in [("blue ", &dbs.blue), ("green", &dbs.green)] {
        println!(
            "{label} port {}  PostgreSQL {}  wal_level={}  accounts={}",
            c.port(),
            c.show("server_version").unwrap(),
            c.show("wal_level").unwrap(),
            count(c, "SELECT count(*) FROM accounts")
        );
    }
    let blue_app = reach(dbs.blue.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE));
    let green_app = reach(dbs.green.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE));

    // Without a node the workload runs here; on the node it is the application's pods.
    let load = match node {
        Some(_) => None,
        None => {
            say("the application: 4 clients moving money between 1000 accounts on blue, ~200 tps");
            Some(Load::start(LoadConfig {
                dsn: blue_app.clone(),
                clients: 4,
                tps: 200.0,
                accounts: 1000,
            }))
        }
    };

    let plane = match &node {
        Some(_) => {
            say(
                "the real node (e2e/real-node.sh): kubelet, containerd, controller-manager, scheduler",
            );
            ControlPlane::shared().await.expect("the node's API server")
        }
        None => {
            say("starting a local control plane (a real kube-apiserver + etcd)");
            ControlPlane::start()
                .await
                .expect("start the control plane")
        }
    };
    let version = plane.client().apiserver_version().await.expect("version");
    println!(
        "kube-apiserver {} at {}",
        version.git_version,
        plane.server_url()
    );
    let cluster = Cluster {
        plane: plane.clone(),
        node: node.clone(),
    };
    let plane = &cluster;
    // Where the application's pods record the writes they saw acknowledged (on the node).
    let acks = node
        .as_ref()
        .map(|node| node.shared_folder("demo-acks"))
        .unwrap_or_default();

    let mut operator = None;
    let mut release = None;
    match &node {
        Some(node) => {
            say(
                "installing the operator with helm (the chart's CRD, ServiceAccount, RBAC, Deployment)",
            );
            kubectl(plane, &["create", "namespace", SYSTEM]);
            release = Some(Release::install(node, SYSTEM, 1));
            show(plane, &["-n", SYSTEM, "get", "pods", "-o", "wide"]);
        }
        None => {
            cluster
                .plane
                .install_crds(repo().join("crds"))
                .await
                .expect("install the CRD");
        }
    }

    say(
        "the namespace, the connection Secrets and the application's Secret (values never printed)",
    );
    kubectl(plane, &["create", "namespace", NAMESPACE]);
    for (name, key, value) in [
        ("billing-blue-admin", "uri", reach(dbs.blue_dsn())),
        ("billing-green-admin", "uri", reach(dbs.green_dsn())),
        ("billing-db", "DATABASE_URL", blue_app.clone()),
    ] {
        let literal = format!("--from-literal={key}={value}");
        kubectl(
            plane,
            &[
                "-n", NAMESPACE, "create", "secret", "generic", name, &literal,
            ],
        );
    }
    match &node {
        Some(_) => {
            say("the application's migration, applied to blue and green by Jobs running the image");
            let migrations = "--from-literal=V1__settings.sql=CREATE TABLE settings (key text PRIMARY KEY, value text NOT NULL);";
            kubectl(
                plane,
                &[
                    "-n",
                    NAMESPACE,
                    "create",
                    "configmap",
                    "billing-migrations",
                    migrations,
                ],
            );
            for (job, secret) in [
                ("migrate-blue", "billing-blue-admin"),
                ("migrate-green", "billing-green-admin"),
            ] {
                apply(plane, &node::migrate_job(job, secret));
            }
            kubectl(
                plane,
                &[
                    "-n",
                    NAMESPACE,
                    "wait",
                    "--for=condition=Complete",
                    "job/migrate-blue",
                    "job/migrate-green",
                    "--timeout=120s",
                ],
            );
            for c in [&dbs.blue, &dbs.green] {
                c.execute(
                    BlueGreen::DATABASE,
                    &format!("GRANT SELECT ON cutover_schema_history, settings TO {APP_ROLE}"),
                )
                .unwrap();
            }
            say(
                "the application: a Deployment of the bank workload on blue, its init container running `cutover wait`",
            );
            apply(plane, &node::application(&acks));
            rollout_status(plane);
        }
        None => {
            kubectl(
                plane,
                &[
                    "-n",
                    NAMESPACE,
                    "create",
                    "deployment",
                    "billing-api",
                    "--image=registry.example/billing-api:1",
                ],
            );
        }
    }
    show(plane, &["-n", NAMESPACE, "get", "secrets,deployments,pods"]);

    if node.is_none() {
        say("running the operator (`cutover run`)");
        operator = Some(
            OperatorProcess::start(&cluster.plane, NAMESPACE, "demo", &[])
                .expect("start the operator"),
        );
    }

    say(&format!(
        "applying {PLAN} (roles and timings adapted to the demo) with kubectl"
    ));
    let plan = std::fs::read_to_string(repo().join(PLAN))
        .unwrap()
        .replace(
            "applicationRoles: [billing_app]",
            &format!("applicationRoles: [{APP_ROLE}]"),
        )
        .replace("hypercare: 24h", "hypercare: 5s")
        .replace("checkpoints: [15m, 1h]", "checkpoints: []");
    // On the node both sides also hold the application's migration history, the same on each.
    let plan = match node {
        Some(_) => plan.replace(
            "    maxLagBeforeFreeze: 8MiB\n",
            "    maxLagBeforeFreeze: 8MiB\n    tables: [public.accounts, public.ledger]\n",
        ),
        None => plan,
    };
    let plan_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(plan_file.path(), plan).unwrap();
    show(plane, &["apply", "-f", plan_file.path().to_str().unwrap()]);

    say(match node {
        Some(_) => "watching the cutover (kubectl get dbcut) and the application's pods",
        None => "watching the cutover (kubectl get dbcut)",
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = String::new();
    let mut last_pods = String::new();
    let phase = loop {
        let line = kubectl(
            plane,
            &[
                "-n",
                NAMESPACE,
                "get",
                "dbcut",
                NAME,
                "--no-headers",
                "-o",
                "custom-columns=PHASE:.status.phase,STEP:.status.currentStep,LAG:.status.replication.lag",
            ],
        );
        let line = line.trim().to_owned();
        if line != last {
            println!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
            last = line.clone();
        }
        if node.is_some() {
            let pods = kubectl(
                plane,
                &[
                    "-n",
                    NAMESPACE,
                    "get",
                    "pods",
                    "-l",
                    "app=billing-api",
                    "--no-headers",
                ],
            );
            let pods: Vec<String> = pods
                .lines()
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .collect();
            let pods = pods.join(" | ");
            if pods != last_pods {
                println!("[{:>6.1}s]   pods: {pods}", started.elapsed().as_secs_f64());
                last_pods = pods;
            }
        }
        let phase = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        if matches!(phase.as_str(), "Completed" | "Aborted" | "RolledBack") {
            break phase;
        }
        assert!(
            Instant::now() < deadline,
            "the cutover did not finish:\n{}",
            operator
                .as_ref()
                .map(OperatorProcess::log)
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let acknowledged: Vec<(i32, i64)> = match load {
        Some(load) => load.stop().await.acknowledged,
        None => {
            // The restarted pod writes on green for a moment, then the application stops.
            rollout_status(plane);
            tokio::time::sleep(Duration::from_secs(2)).await;
            kubectl(
                plane,
                &[
                    "-n",
                    NAMESPACE,
                    "scale",
                    "deployment/billing-api",
                    "--replicas=0",
                ],
            );
            kubectl(
                plane,
                &[
                    "-n",
                    NAMESPACE,
                    "wait",
                    "--for=delete",
                    "pod",
                    "-l",
                    "app=billing-api",
                    "--timeout=60s",
                ],
            );
            let by_pod = node::acknowledged(&acks);
            for (pod, writes) in &by_pod {
                println!("pod {pod}: {} writes acknowledged", writes.len());
            }
            by_pod.into_iter().flat_map(|(_, w)| w).collect()
        }
    };

    say("what the operator recorded");
    show(
        plane,
        &[
            "-n",
            NAMESPACE,
            "get",
            "events",
            "--sort-by=.metadata.creationTimestamp",
            "--field-selector",
            &format!("involvedObject.name={NAME}"),
        ],
    );
    println!("$ kubectl cutover report {NAME}");
    let mut report = Command::new(cutover_e2e::operator::cutover_binary());
    report.args(["report", NAME, "-n", NAMESPACE]);
    if let Some(kubeconfig) = cluster.plane.kubeconfig_path() {
        report.env("KUBECONFIG", kubeconfig);
    }
    let out = report.output().expect("run cutover report");
    print!("{}", String::from_utf8_lossy(&out.stdout));

    say("summary");
    let lost = acknowledged
        .iter()
        .filter(|(client, seq)| {
            count(
                &dbs.green,
                &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"),
            ) != 1
        })
        .count();
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(cluster.plane.client(), NAMESPACE);
    let app_secret = secrets
        .get("billing-db")
        .await
        .expect("read the application Secret");
    let switched = app_secret
        .data
        .and_then(|d| {
            d.get("DATABASE_URL")
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        })
        .unwrap_or_default();
    // One read of the status for the summary: switch time, write freeze, rows verified.
    let recorded = kubectl(
        plane,
        &[
            "-n",
            NAMESPACE,
            "get",
            "dbcut",
            NAME,
            "-o",
            "jsonpath={.status.switchedAt} {.status.writeFreezeSeconds} {.status.verification.rowsCompared} {.status.serverVersions.blue} {.status.serverVersions.green}",
        ],
    );
    let mut fields = recorded.split_whitespace();
    let (points_at_green, freeze, rows, blue_version, green_version) = (
        fields.next().unwrap_or("-"),
        fields.next().unwrap_or("-"),
        fields.next().unwrap_or("-"),
        fields.next().unwrap_or("-"),
        fields.next().unwrap_or("-"),
    );
    println!("result:              {phase}");
    println!("PostgreSQL:          blue {blue_version} → green {green_version}");
    println!("write freeze:        {freeze} s");
    println!("rows verified:       {rows}");
    println!("writes acknowledged: {}", acknowledged.len());
    println!("writes lost:         {lost}");
    println!(
        "balances on green:   {} (blue started with {})",
        count(&dbs.green, "SELECT sum(balance) FROM accounts"),
        1000 * 1000
    );
    println!(
        "application Secret:  switched at {}; names green with the application's own role: {}",
        points_at_green,
        switched == green_app
    );

    if keep {
        say("everything keeps running; Ctrl-C stops and removes it");
        match cluster.plane.kubeconfig_path() {
            Some(kubeconfig) => println!("export KUBECONFIG={}", kubeconfig.display()),
            None => println!(
                "KUBECONFIG={}",
                std::env::var("KUBECONFIG").unwrap_or_default()
            ),
        }
        println!(
            "blue:  psql -h 127.0.0.1 -p {} -U postgres app",
            dbs.blue.port()
        );
        println!(
            "green: psql -h 127.0.0.1 -p {} -U postgres app",
            dbs.green.port()
        );
        println!("(the superuser passwords are in the billing-*-admin Secrets)");
        let _ = tokio::signal::ctrl_c().await;
    }

    if let Some(mut operator) = operator {
        let code = operator.terminate().expect("operator stops");
        println!("\noperator exited with {code:?} after SIGTERM");
    }
    if let Some(release) = release {
        drop(release);
        println!("\nhelm uninstall: the operator removed");
    }
    say(&format!(
        "done in {:.1}s; clusters and control plane are removed",
        started.elapsed().as_secs_f64()
    ));
    assert!(
        phase == "Completed" && lost == 0,
        "the demo cutover did not complete cleanly"
    );
}
