//! The operator binary against a real API server: it adds its finalizer, records
//! `observedGeneration` and its conditions, emits an Event per phase change, serves metrics,
//! removes its finalizer when the object is deleted, and with two replicas only the holder of
//! the leader Lease reconciles.

use std::time::Duration;

use cutover_e2e::fixtures::{namespace_with_crds as setup, repo};
use cutover_e2e::operator::{OperatorProcess, eventually};
use cutover_operator::api::{DatabaseCutover, FINALIZER};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

fn example(ns: &str, name: &str) -> DatabaseCutover {
    let text =
        std::fs::read_to_string(repo().join("cutover-plans/staging-rehearsal.yaml")).unwrap();
    let mut plan: DatabaseCutover = serde_saphyr::from_str(&text).unwrap();
    plan.metadata.namespace = Some(ns.into());
    plan.metadata.name = Some(name.into());
    plan
}

#[tokio::test]
async fn operator_adopts_reports_and_releases_a_cutover() {
    let (plane, ns) = setup("operator").await;
    let mut operator =
        OperatorProcess::start(&plane, &ns, "solo", &[]).expect("start the operator");
    let api: Api<DatabaseCutover> = Api::namespaced(plane.client(), &ns);
    let created = api
        .create(&PostParams::default(), &example(&ns, "orders"))
        .await
        .expect("create");
    let generation = created.metadata.generation;
    let _dump = operator.dump_on_panic(&plane, &ns);

    let seen = eventually(
        "finalizer, observedGeneration and Progressing",
        Duration::from_secs(60),
        || async {
            let obj = api.get("orders").await.ok()?;
            let status = obj.status.as_ref()?;
            let has_finalizer = obj
                .metadata
                .finalizers
                .as_ref()?
                .iter()
                .any(|f| f == FINALIZER);
            let progressing = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Progressing" && c.status == "True" && c.reason == "Pending");
            (has_finalizer && progressing && status.observed_generation == generation)
                .then_some(obj)
        },
    )
    .await;
    assert_eq!(seen.status.unwrap().phase.as_str(), "Pending");

    let events: Api<Event> = Api::namespaced(plane.client(), &ns);
    let event = eventually("a phase-change Event", Duration::from_secs(30), || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("orders")
                    && e.reason.as_deref() == Some("Pending")
            })
    })
    .await;
    assert_eq!(event.action.as_deref(), Some("PhaseChange"));
    assert_eq!(
        event.reporting_controller.as_deref(),
        Some("cutover-operator")
    );

    let metrics = operator.metrics().await;
    let line = format!(r#"cutover_phase{{name="orders",namespace="{ns}",phase="Pending"}} 1"#);
    assert!(metrics.contains(&line), "metrics lack {line}:\n{metrics}");
    assert!(metrics.contains("cutover_leader 1"), "{metrics}");

    // A spec change bumps the generation; the operator records the new one.
    let patched = api
        .patch(
            "orders",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"verification": {"parallelism": 2}}})),
        )
        .await
        .unwrap();
    let new_generation = patched.metadata.generation;
    assert_ne!(new_generation, generation);
    eventually(
        "observedGeneration follows the spec",
        Duration::from_secs(30),
        || async {
            let obj = api.get("orders").await.ok()?;
            (obj.status?.observed_generation == new_generation).then_some(())
        },
    )
    .await;

    api.delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(
        "the finalizer is removed and the object gone",
        Duration::from_secs(30),
        || async {
            match api.get_opt("orders").await {
                Ok(None) => Some(()),
                _ => None,
            }
        },
    )
    .await;

    let code = operator.terminate().expect("the operator exits on SIGTERM");
    assert_eq!(code, Some(0), "graceful shutdown exits 0");
}

#[tokio::test]
async fn only_the_lease_holder_reconciles_and_a_standby_takes_over() {
    let (plane, ns) = setup("leader").await;
    let lease = ["--lease-seconds", "4"];
    let mut first = OperatorProcess::start(&plane, &ns, "first", &lease).expect("start first");
    let _dump_first = first.dump_on_panic(&plane, &ns);
    eventually(
        "the first replica leads",
        Duration::from_secs(30),
        || async {
            first
                .metrics()
                .await
                .contains("cutover_leader 1")
                .then_some(())
        },
    )
    .await;
    let mut second = OperatorProcess::start(&plane, &ns, "second", &lease).expect("start second");
    let _dump_second = second.dump_on_panic(&plane, &ns);
    eventually(
        "the second replica stands by",
        Duration::from_secs(30),
        || async {
            let m = second.metrics().await;
            (m.contains("cutover_leader 0") || !m.contains("cutover_leader 1")).then_some(())
        },
    )
    .await;

    // The standby does not reconcile: a new object is handled by the leader only.
    let api: Api<DatabaseCutover> = Api::namespaced(plane.client(), &ns);
    api.create(&PostParams::default(), &example(&ns, "one"))
        .await
        .unwrap();
    eventually("the leader reconciles", Duration::from_secs(30), || async {
        first
            .metrics()
            .await
            .contains(r#"name="one""#)
            .then_some(())
    })
    .await;
    assert!(
        !second.metrics().await.contains(r#"name="one""#),
        "the standby reconciled"
    );

    // The leader dies without releasing the lease; the standby takes over once it expires.
    first.kill();
    api.create(&PostParams::default(), &example(&ns, "two"))
        .await
        .unwrap();
    eventually(
        "the standby takes over and reconciles",
        Duration::from_secs(60),
        || async {
            let obj = api.get("two").await.ok()?;
            obj.status?.observed_generation.map(|_| ())
        },
    )
    .await;
    assert!(second.metrics().await.contains("cutover_leader 1"));
    let code = second.terminate().expect("the standby exits on SIGTERM");
    assert_eq!(code, Some(0));
}
