//! The migration Job the operator builds is accepted by the real API server (server-side dry
//! run): its schema, the security context, the owner reference to a stored DatabaseCutover.

use std::path::PathBuf;

use cutover_e2e::ControlPlane;
use cutover_operator::api::DatabaseCutover;
use cutover_operator::cluster::migration_job::{
    JobSettings, MigrationJobParams, MigrationSetKind, build_migration_job,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[tokio::test]
async fn the_migration_job_is_accepted_by_the_api_server() {
    let plane = ControlPlane::shared().await.expect("control plane");
    plane
        .install_crds(repo().join("crds"))
        .await
        .expect("install crds/");
    let ns = plane.namespace("migration-job").await.expect("namespace");

    let text =
        std::fs::read_to_string(repo().join("cutover-plans/production-manual-approval.yaml"))
            .unwrap();
    let mut cutover: DatabaseCutover = serde_saphyr::from_str(&text).unwrap();
    assert!(cutover.spec.migrations.is_some(), "the plan has migrations");
    cutover.metadata.namespace = Some(ns.clone());
    let cutovers: Api<DatabaseCutover> = Api::namespaced(plane.client(), &ns);
    // Stored for real: the owner reference needs its uid.
    let stored = cutovers
        .create(&PostParams::default(), &cutover)
        .await
        .expect("the example plan is stored");

    let job = build_migration_job(&MigrationJobParams {
        cutover: &stored,
        set: MigrationSetKind::Initial,
        content_digest: "0123abcd",
        default_image: "ghcr.io/dbops/cutover:e2e",
        settings: JobSettings::default(),
    })
    .expect("the Job builds");
    let jobs: Api<Job> = Api::namespaced(plane.client(), &ns);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let accepted = jobs
        .create(&dry_run, &job)
        .await
        .unwrap_or_else(|e| panic!("the API server rejected the migration Job: {e}"));
    // Defaulting happened server-side and nothing we set was dropped.
    assert_eq!(accepted.metadata.name, job.metadata.name);
    assert_eq!(
        accepted.metadata.owner_references,
        job.metadata.owner_references
    );
    let spec = accepted.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(3));
    let pod = spec.template.spec.unwrap();
    let sc = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));

    // Its pod passes the "restricted" Pod Security Standard: enforced on pods, so create the
    // pod template as a Pod (dry run) in a namespace that enforces it.
    let namespaces: Api<Namespace> = Api::all(plane.client());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }}})),
        )
        .await
        .expect("label the namespace");
    let template = job.spec.as_ref().unwrap().template.clone();
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("migrate-pod-check".into()),
            namespace: Some(ns.clone()),
            labels: template.metadata.and_then(|m| m.labels),
            ..ObjectMeta::default()
        },
        spec: template.spec,
        status: None,
    };
    let pods: Api<Pod> = Api::namespaced(plane.client(), &ns);
    pods.create(&dry_run, &pod)
        .await
        .unwrap_or_else(|e| panic!("the pod violates the restricted Pod Security Standard: {e}"));
    // And the check is live: a root pod is refused in that namespace.
    let mut root = pod.clone();
    let spec = root.spec.as_mut().unwrap();
    spec.security_context = None;
    spec.containers[0].security_context = None;
    let refused = pods.create(&dry_run, &root).await;
    assert!(refused.is_err(), "PodSecurity admission is not enforcing");

    assert!(
        jobs.get_opt(job.metadata.name.as_deref().unwrap())
            .await
            .unwrap()
            .is_none(),
        "a dry run stores nothing"
    );
}
