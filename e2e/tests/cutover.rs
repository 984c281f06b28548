//! A whole cutover driven by the operator process on a real API server against two real
//! PostgreSQL clusters, with the bank workload writing to blue throughout: applied with the
//! kube API, watched to Completed; the application Secret then points at green with the
//! application's own credentials, the Deployment's pod template was annotated, every phase left
//! an Event, every acknowledged write is on green and nothing of ours is left on either server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use cutover_e2e::ControlPlane;
use cutover_e2e::operator::{OperatorProcess, eventually};
use cutover_operator::api::{DatabaseCutover, Phase, WorkloadKind, WorkloadRef};
use cutover_tests::workload::{self, Load, LoadConfig};
use cutover_tests::{BlueGreen, PgCluster};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use serde_json::json;

const APP_ROLE: &str = "orders_app";
const APP_PASSWORD: &str = "app-password";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn databases() -> BlueGreen {
    let bg = BlueGreen::start_with(
        PgCluster::builder()
            .setting("wal_receiver_status_interval", "1s")
            .setting("wal_retrieve_retry_interval", "200ms"),
        PgCluster::builder()
            .setting("wal_receiver_status_interval", "1s")
            .setting("wal_retrieve_retry_interval", "200ms"),
    )
    .expect("start PostgreSQL");
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

fn one(c: &PgCluster, sql: &str) -> i64 {
    c.query(BlueGreen::DATABASE, sql).unwrap()[0][0]
        .clone()
        .unwrap()
        .parse()
        .unwrap()
}

fn leftovers(c: &PgCluster) -> Vec<String> {
    c.query(
        BlueGreen::DATABASE,
        "SELECT 'publication ' || pubname FROM pg_publication
         UNION ALL SELECT 'subscription ' || subname FROM pg_subscription
         UNION ALL SELECT 'slot ' || slot_name FROM pg_replication_slots",
    )
    .unwrap()
    .into_iter()
    .filter_map(|r| r[0].clone())
    .collect()
}

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

async fn secret_value(plane: &ControlPlane, ns: &str, name: &str, key: &str) -> String {
    let api: Api<Secret> = Api::namespaced(plane.client(), ns);
    let s = api.get(name).await.unwrap();
    String::from_utf8(s.data.unwrap()[key].0.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_drives_a_cutover_to_completed_under_load() {
    let bg = tokio::task::spawn_blocking(databases).await.unwrap();
    let plane = ControlPlane::shared().await.expect("control plane");
    plane
        .install_crds(repo().join("crds"))
        .await
        .expect("install crds/");
    let ns = plane.namespace("cutover").await.expect("namespace");
    eprintln!(
        "running against the real API server at {}",
        plane.server_url()
    );

    let blue_app = bg.blue.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE);
    let green_app = bg.green.dsn(APP_ROLE, APP_PASSWORD, BlueGreen::DATABASE);
    secret(&plane, &ns, "billing-blue-admin", "uri", &bg.blue_dsn()).await;
    secret(&plane, &ns, "billing-green-admin", "uri", &bg.green_dsn()).await;
    secret(&plane, &ns, "billing-db", "DATABASE_URL", &blue_app).await;
    let deployments: Api<Deployment> = Api::namespaced(plane.client(), &ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "billing-api"},
        "spec": {
            "selector": {"matchLabels": {"app": "billing-api"}},
            "template": {
                "metadata": {"labels": {"app": "billing-api"}},
                "spec": {"containers": [{"name": "api", "image": "registry.example/billing-api:1"}]}
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

    let operator = OperatorProcess::start(&plane, &ns, "driver", &[]).expect("start the operator");
    let _dump = operator.dump_on_panic(&plane, &ns);

    let text = std::fs::read_to_string(repo().join("cutover-plans/production-with-rollback.yaml"))
        .unwrap();
    let mut plan: DatabaseCutover = serde_saphyr::from_str(&text).unwrap();
    plan.metadata.namespace = Some(ns.clone());
    plan.spec.application_roles = vec![APP_ROLE.into()];
    plan.spec.freeze.drain_timeout = "2s".into();
    plan.spec.replication.max_lag_before_freeze = "1MiB".into();
    plan.spec.schedule.hypercare = "2s".into();
    plan.spec.schedule.checkpoints = vec![];
    plan.spec.switch.restart = vec![WorkloadRef {
        kind: WorkloadKind::Deployment,
        name: "billing-api".into(),
    }];
    let api: Api<DatabaseCutover> = Api::namespaced(plane.client(), &ns);
    api.create(&PostParams::default(), &plan)
        .await
        .expect("create the cutover");

    let done = eventually(
        "the cutover completes",
        Duration::from_secs(180),
        || async {
            let obj = api.get("billing-to-new-cluster").await.ok()?;
            let status = obj.status?;
            assert_ne!(
                status.phase,
                Phase::Aborted,
                "aborted: {:?}",
                status.message
            );
            (status.phase == Phase::Completed).then_some(status)
        },
    )
    .await;
    let report = load.stop().await;

    assert!(done.verification.as_ref().is_some_and(|v| v.matched));
    assert!(done.point_of_no_return_at.is_some());
    let freeze = done
        .write_freeze_seconds
        .expect("the write freeze was measured");
    eprintln!(
        "write freeze: {freeze:.3}s; {} writes acknowledged",
        report.acknowledged.len()
    );
    for step in &done.steps {
        eprintln!(
            "step {:?}: {} .. {:?}",
            step.name, step.started_at, step.finished_at
        );
    }

    // Only the application Secret's key changed: it names green, with the application's own
    // credentials.
    assert_eq!(
        secret_value(&plane, &ns, "billing-db", "DATABASE_URL").await,
        green_app
    );
    let annotated = deployments.get("billing-api").await.unwrap();
    let annotations = annotated
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap_or_default();
    assert!(
        annotations.contains_key("cutover.dbops.dev/restartedAt"),
        "{annotations:?}"
    );

    // An Event for every phase.
    let events: Api<Event> = Api::namespaced(plane.client(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    // (Pending lasts no longer than the first reconcile, which already starts preflight.)
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

    // The ledger: every acknowledged write is on green, money neither made nor lost.
    for (client, seq) in &report.acknowledged {
        let n = one(
            &bg.green,
            &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"),
        );
        assert_eq!(
            n, 1,
            "acknowledged write ({client}, {seq}) missing on green"
        );
    }
    assert_eq!(
        one(&bg.green, "SELECT sum(balance) FROM accounts"),
        50 * 1000
    );
    assert_eq!(leftovers(&bg.blue), Vec::<String>::new(), "left on blue");
    assert_eq!(leftovers(&bg.green), Vec::<String>::new(), "left on green");

    let metrics = operator.metrics().await;
    let line = format!(
        r#"cutover_phase{{name="billing-to-new-cluster",namespace="{ns}",phase="Completed"}} 1"#
    );
    assert!(metrics.contains(&line), "{metrics}");
}
