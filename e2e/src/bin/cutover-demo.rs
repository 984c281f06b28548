//! `make demo`: a whole live cutover on one machine. Two PostgreSQL clusters (blue and green), a
//! bank workload writing to blue, a real kube-apiserver + etcd, the operator, and the
//! `production-with-rollback` example applied with kubectl and watched phase by phase to
//! Completed. Ends with a summary: the write-freeze window, rows verified, writes acknowledged
//! and writes lost (counted on green, not assumed).
//!
//! `--keep` leaves everything running until Ctrl-C and prints how to reach it. `--upgrade`
//! runs green on PostgreSQL 18 (blue stays on the machine's 15): the major upgrade a cutover is
//! usually for (`make demo DEMO_ARGS=--upgrade`).

use std::time::{Duration, Instant};

use cutover_e2e::ControlPlane;
use cutover_e2e::fixtures::{bank_databases_of, repo};
use cutover_e2e::operator::OperatorProcess;
use cutover_tests::workload::{Load, LoadConfig};
use cutover_tests::{BlueGreen, PgCluster};

const NAMESPACE: &str = "billing";
const PLAN: &str = "cutover-plans/production-with-rollback.yaml";
const NAME: &str = "billing-to-new-cluster";
const APP_ROLE: &str = "billing_app";
const APP_PASSWORD: &str = "demo-app-password";

fn say(text: &str) {
    println!("\n==> {text}");
}

fn kubectl(plane: &ControlPlane, args: &[&str]) -> String {
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

fn show(plane: &ControlPlane, args: &[&str]) {
    println!("$ kubectl {}", args.join(" "));
    print!("{}", kubectl(plane, args));
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
    let started = Instant::now();

    say("starting two PostgreSQL clusters: blue (the source) and green (the target, schema only)");
    let majors = if upgrade {
        (Some(15), Some(18))
    } else {
        (None, None)
    };
    let dbs = tokio::task::spawn_blocking(move || {
        bank_databases_of(APP_ROLE, APP_PASSWORD, 1000, majors)
    })
    .await
    .unwrap();
    for (label, c) in [("blue ", &dbs.blue), ("green", &dbs.green)] {
        println!(
            "{label} 127.0.0.1:{}  PostgreSQL {}  wal_level={}  accounts={}",
            c.port(),
            c.show("server_version").unwrap(),
            c.show("wal_level").unwrap(),
            count(c, "SELECT count(*) FROM accounts")
        );
    }

    say("the application: 4 clients moving money between 1000 accounts on blue, ~200 tps");
    let blue_app = dbs.blue.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE);
    let load = Load::start(LoadConfig {
        dsn: blue_app.clone(),
        clients: 4,
        tps: 200.0,
        accounts: 1000,
    });

    say("starting a local control plane (a real kube-apiserver + etcd)");
    let plane = ControlPlane::start()
        .await
        .expect("start the control plane");
    let version = plane.client().apiserver_version().await.expect("version");
    println!(
        "kube-apiserver {} at {}",
        version.git_version,
        plane.server_url()
    );
    plane
        .install_crds(repo().join("crds"))
        .await
        .expect("install the CRD");

    say(
        "the namespace, the connection Secrets and the application's Secret (values never printed)",
    );
    kubectl(&plane, &["create", "namespace", NAMESPACE]);
    for (name, key, value) in [
        ("billing-blue-admin", "uri", dbs.blue_dsn()),
        ("billing-green-admin", "uri", dbs.green_dsn()),
        ("billing-db", "DATABASE_URL", blue_app.clone()),
    ] {
        let literal = format!("--from-literal={key}={value}");
        kubectl(
            &plane,
            &[
                "-n", NAMESPACE, "create", "secret", "generic", name, &literal,
            ],
        );
    }
    kubectl(
        &plane,
        &[
            "-n",
            NAMESPACE,
            "create",
            "deployment",
            "billing-api",
            "--image=registry.example/billing-api:1",
        ],
    );
    show(&plane, &["-n", NAMESPACE, "get", "secrets,deployments"]);

    say("running the operator (`cutover run`)");
    let mut operator =
        OperatorProcess::start(&plane, NAMESPACE, "demo", &[]).expect("start the operator");

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
    let plan_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(plan_file.path(), plan).unwrap();
    show(&plane, &["apply", "-f", plan_file.path().to_str().unwrap()]);

    say("watching the cutover (kubectl get dbcut)");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = String::new();
    let phase = loop {
        let line = kubectl(
            &plane,
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
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let report = load.stop().await;

    say("what the operator recorded");
    show(
        &plane,
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
    let out = std::process::Command::new(cutover_e2e::operator::cutover_binary())
        .args(["report", NAME, "-n", NAMESPACE])
        .env(
            "KUBECONFIG",
            plane
                .kubeconfig_path()
                .expect("a local control plane has a kubeconfig"),
        )
        .output()
        .expect("run cutover report");
    print!("{}", String::from_utf8_lossy(&out.stdout));

    say("summary");
    let lost = report
        .acknowledged
        .iter()
        .filter(|(client, seq)| {
            count(
                &dbs.green,
                &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"),
            ) != 1
        })
        .count();
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(plane.client(), NAMESPACE);
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
        &plane,
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
    println!("writes acknowledged: {}", report.acknowledged.len());
    println!("writes lost:         {lost}");
    println!(
        "balances on green:   {} (blue started with {})",
        count(&dbs.green, "SELECT sum(balance) FROM accounts"),
        1000 * 1000
    );
    let green_app = dbs.green.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE);
    println!(
        "application Secret:  switched at {}; names green with the application's own role: {}",
        points_at_green,
        switched == green_app
    );

    if keep {
        say("everything keeps running; Ctrl-C stops and removes it");
        if let Some(kubeconfig) = plane.kubeconfig_path() {
            println!("export KUBECONFIG={}", kubeconfig.display());
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

    let code = operator.terminate().expect("operator stops");
    println!("\noperator exited with {code:?} after SIGTERM");
    say(&format!(
        "done in {:.1}s; clusters and control plane are removed",
        started.elapsed().as_secs_f64()
    ));
    assert!(
        phase == "Completed" && lost == 0,
        "the demo cutover did not complete cleanly"
    );
}
