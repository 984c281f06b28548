//! `make demo`: the whole product on one machine. Starts a real kube-apiserver + etcd and two
//! PostgreSQL clusters (blue and green), installs the CRD, runs the operator, applies an example
//! plan with kubectl and shows what the operator does with it, step by step, then cleans up.
//!
//! `--keep` leaves everything running until Ctrl-C and prints how to reach it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cutover_e2e::ControlPlane;
use cutover_e2e::operator::OperatorProcess;
use cutover_tests::pg::BlueGreen;

const NAMESPACE: &str = "shop-staging";
const PLAN: &str = "cutover-plans/staging-rehearsal.yaml";
const NAME: &str = "orders-rehearsal";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

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

#[tokio::main]
async fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    let started = Instant::now();

    say("starting two PostgreSQL clusters (blue = source, green = target)");
    let dbs = tokio::task::spawn_blocking(BlueGreen::start)
        .await
        .unwrap()
        .expect("start PostgreSQL");
    println!(
        "blue  on 127.0.0.1:{}  (PostgreSQL {}, wal_level={})",
        dbs.blue.port(),
        dbs.blue.show("server_version").unwrap(),
        dbs.blue.show("wal_level").unwrap()
    );
    println!(
        "green on 127.0.0.1:{}  (PostgreSQL {}, wal_level={})",
        dbs.green.port(),
        dbs.green.show("server_version").unwrap(),
        dbs.green.show("wal_level").unwrap()
    );

    say("starting a local control plane (real kube-apiserver + etcd)");
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
    show(
        &plane,
        &["get", "crd", "databasecutovers.cutover.dbops.dev"],
    );

    say("creating the namespace and the connection Secrets (their values are never printed)");
    kubectl(&plane, &["create", "namespace", NAMESPACE]);
    for (name, key, value) in [
        ("orders-blue-admin", "uri", dbs.blue_dsn()),
        ("orders-green-admin", "uri", dbs.green_dsn()),
        ("orders-db", "DATABASE_URL", dbs.blue_dsn()),
    ] {
        let literal = format!("--from-literal={key}={value}");
        kubectl(
            &plane,
            &[
                "-n", NAMESPACE, "create", "secret", "generic", name, &literal,
            ],
        );
    }
    show(&plane, &["-n", NAMESPACE, "get", "secrets"]);

    say("running the operator (`cutover run`)");
    let mut operator =
        OperatorProcess::start(&plane, NAMESPACE, "demo", &[]).expect("start the operator");

    say(&format!("applying {PLAN} with kubectl"));
    let plan = repo().join(PLAN);
    show(&plane, &["apply", "-f", plan.to_str().unwrap()]);

    say("waiting for the operator to pick it up");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let phase = kubectl(
            &plane,
            &[
                "-n",
                NAMESPACE,
                "get",
                "dbcut",
                NAME,
                "-o",
                "jsonpath={.status.phase}",
            ],
        );
        if !phase.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the operator never reported a phase:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    show(&plane, &["-n", NAMESPACE, "get", "dbcut"]);
    show(
        &plane,
        &[
            "-n",
            NAMESPACE,
            "get",
            "dbcut",
            NAME,
            "-o",
            "jsonpath={range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{\"\\n\"}{end}",
        ],
    );
    show(
        &plane,
        &[
            "-n",
            NAMESPACE,
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={NAME}"),
        ],
    );

    say("the operator's metrics");
    for line in operator.metrics().await.lines() {
        if line.starts_with("cutover_phase") && line.ends_with(" 1")
            || line.starts_with("cutover_leader")
        {
            println!("{line}");
        }
    }

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
        println!("(the superuser password is in the orders-*-admin Secrets)");
        let _ = tokio::signal::ctrl_c().await;
    }

    say("deleting the cutover: the operator's finalizer cleans up, then lets it go");
    show(
        &plane,
        &[
            "-n",
            NAMESPACE,
            "delete",
            "dbcut",
            NAME,
            "--wait=true",
            "--timeout=60s",
        ],
    );
    let code = operator.terminate().expect("operator stops");
    println!("operator exited with {code:?} after SIGTERM");
    say(&format!(
        "done in {:.1}s; clusters and control plane are removed",
        started.elapsed().as_secs_f64()
    ));
}
