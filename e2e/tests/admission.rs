//! The CRD on a real API server: every example plan is accepted, bad specs are rejected at
//! admission with a message a person understands, and `kubectl explain` shows the field docs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cutover_e2e::ControlPlane;
use cutover_e2e::fixtures::{namespace_with_crds as setup, repo};
use cutover_operator::api::DatabaseCutover;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn plans() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("cutover-plans")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let value: Value = serde_saphyr::from_str(&text).unwrap();
            out.push((path, value));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 3);
    out
}

/// Creates the object (server-side dry run unless `persist`) and returns the API server's error
/// message, or `None` when it was accepted.
async fn create(plane: &ControlPlane, ns: &str, mut obj: Value, persist: bool) -> Option<String> {
    obj["metadata"]["namespace"] = json!(ns);
    let obj: DatabaseCutover =
        serde_json::from_value(obj).expect("the test object has the right shape");
    let api: Api<DatabaseCutover> = Api::namespaced(plane.client(), ns);
    let params = PostParams {
        dry_run: !persist,
        ..PostParams::default()
    };
    match api.create(&params, &obj).await {
        Ok(_) => None,
        Err(kube::Error::Api(status)) => Some(status.message),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

/// Like [`create`], but sends raw JSON, so specs the Rust types cannot express (wrong enum
/// values, wrong types) reach the API server too.
async fn create_raw(plane: &ControlPlane, ns: &str, mut obj: Value) -> Option<String> {
    obj["metadata"]["namespace"] = json!(ns);
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        plane.client(),
        ns,
        &kube::api::ApiResource::erase::<DatabaseCutover>(&()),
    );
    let obj: kube::api::DynamicObject = serde_json::from_value(obj).unwrap();
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match api.create(&params, &obj).await {
        Ok(_) => None,
        Err(kube::Error::Api(status)) => Some(status.message),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

fn base() -> Value {
    plans()
        .into_iter()
        .find(|(p, _)| p.ends_with("production-with-rollback.yaml"))
        .unwrap()
        .1
}

#[tokio::test]
async fn every_example_plan_is_accepted() {
    let (plane, ns) = setup("plans").await;
    for (path, plan) in plans() {
        let rejected = create(&plane, &ns, plan, false).await;
        assert_eq!(rejected, None, "{} was rejected", path.display());
    }
}

#[tokio::test]
async fn invalid_specs_are_rejected_with_readable_messages() {
    let (plane, ns) = setup("invalid").await;
    assert_eq!(
        create_raw(&plane, &ns, base()).await,
        None,
        "the base plan must be valid"
    );

    type Edit = fn(&mut Value);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "same secret for source and target",
            |v| v["spec"]["target"] = v["spec"]["source"].clone(),
            "source and target must be different databases, but both name the same Secret key",
        ),
        (
            "drain timeout is not a duration",
            |v| v["spec"]["freeze"]["drainTimeout"] = json!("banana"),
            "spec.freeze.drainTimeout: Invalid value: \"string\": must be a duration such as 30s, 5m, 1h30m or 500ms",
        ),
        (
            "secret reference without a key",
            |v| {
                v["spec"]["source"]["connectionSecretRef"]
                    .as_object_mut()
                    .unwrap()
                    .remove("key");
            },
            "spec.source.connectionSecretRef.key: Required value",
        ),
        (
            "secret reference with an empty key",
            |v| v["spec"]["switch"]["secretRef"]["key"] = json!(""),
            "a Secret reference needs a key",
        ),
        (
            "negative parallelism",
            |v| v["spec"]["verification"]["parallelism"] = json!(-2),
            "spec.verification.parallelism: Invalid value: -2: spec.verification.parallelism in body should be greater than or equal to 1",
        ),
        (
            "unknown freeze method",
            |v| v["spec"]["freeze"]["method"] = json!("Snapshot"),
            "spec.freeze.method: Unsupported value: \"Snapshot\": supported values: \"Strict\", \"ReadOnly\", \"RevokeLogin\"",
        ),
        (
            "rollback readiness without reverse replication",
            |v| v["spec"]["replication"]["reverseForRollback"] = json!(false),
            "rollback.readiness needs replication.reverseForRollback: true",
        ),
        (
            "rollback requested without readiness",
            |v| v["spec"]["rollback"] = json!({"readiness": false, "requested": true}),
            "rollback.requested needs rollback.readiness: true",
        ),
        (
            "lag threshold is not a size",
            |v| v["spec"]["replication"]["maxLagBeforeFreeze"] = json!("a lot"),
            "must be a size such as 16MiB, 512kB or 1048576 (bytes)",
        ),
        (
            "freezeAt is not a timestamp",
            |v| v["spec"]["schedule"]["freezeAt"] = json!("tomorrow at two"),
            "must be an RFC 3339 timestamp such as 2026-12-01T02:00:00Z",
        ),
        (
            "RevokeLogin without application roles",
            |v| {
                v["spec"]["freeze"]["method"] = json!("RevokeLogin");
                v["spec"]["applicationRoles"] = json!([]);
            },
            "freeze.method RevokeLogin needs at least one entry in applicationRoles",
        ),
        (
            "table without a schema",
            |v| v["spec"]["replication"]["tables"] = json!(["orders"]),
            "each table must be written as schema.table",
        ),
        (
            "checkpoint is not a duration",
            |v| v["spec"]["schedule"]["checkpoints"] = json!(["15m", "soon"]),
            "each checkpoint must be a duration such as 15m or 1h",
        ),
        (
            "unknown mode",
            |v| v["spec"]["mode"] = json!("DryRun"),
            "spec.mode: Unsupported value: \"DryRun\": supported values: \"Production\", \"Rehearsal\"",
        ),
        (
            "no switch section",
            |v| {
                v["spec"].as_object_mut().unwrap().remove("switch");
            },
            "spec.switch: Required value",
        ),
        (
            "restart of an unknown workload kind",
            |v| v["spec"]["switch"]["restart"] = json!([{"kind": "DaemonSet", "name": "x"}]),
            "supported values: \"Deployment\", \"StatefulSet\"",
        ),
    ];
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for (what, edit, expected) in cases {
        let mut spec = base();
        edit(&mut spec);
        match create_raw(&plane, &ns, spec).await {
            None => failures.push(format!("{what}: accepted")),
            Some(message) if !message.contains(expected) => {
                failures.push(format!("{what}: message {message:?} lacks {expected:?}"))
            }
            Some(message) => eprintln!("rejected ({what}): {message}"),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test]
async fn source_and_target_are_immutable_after_the_point_of_no_return() {
    let (plane, ns) = setup("immutable").await;
    let mut plan = base();
    plan["metadata"]["name"] = json!("immutable");
    assert_eq!(create(&plane, &ns, plan, true).await, None);
    let api: Api<DatabaseCutover> = Api::namespaced(plane.client(), &ns);
    let params = PatchParams::default();
    let new_source =
        json!({"spec": {"source": {"connectionSecretRef": {"name": "elsewhere", "key": "uri"}}}});

    // Before the point of no return the source may still change.
    api.patch("immutable", &params, &Patch::Merge(&new_source))
        .await
        .expect("changing the source before the point of no return is allowed");

    api.patch_status(
        "immutable",
        &params,
        &Patch::Merge(
            json!({"status": {"phase": "Switching", "pointOfNoReturnAt": "2026-12-01T02:05:00Z"}}),
        ),
    )
    .await
    .expect("status patch");

    let back = json!({"spec": {"source": {"connectionSecretRef": {"name": "billing-blue-admin", "key": "uri"}}}});
    let err = api
        .patch("immutable", &params, &Patch::Merge(&back))
        .await
        .expect_err("changing the source after the point of no return must be refused");
    let kube::Error::Api(status) = err else {
        panic!("unexpected error {err}")
    };
    assert!(
        status
            .message
            .contains("spec.source and spec.target cannot change after the point of no return"),
        "{}",
        status.message
    );

    // Other fields, such as the rollback request, stay changeable.
    api.patch(
        "immutable",
        &params,
        &Patch::Merge(json!({"spec": {"rollback": {"readiness": true, "requested": true}}})),
    )
    .await
    .expect("requesting a rollback after the point of no return is allowed");
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let (plane, _ns) = setup("explain").await;
    // The API server publishes a new CRD's OpenAPI a moment after it is Established.
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let output = plane
            .kubectl(["explain", "databasecutover.spec"])
            .output()
            .expect("run kubectl");
        // kubectl wraps long descriptions; compare with whitespace folded.
        let text = String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if output.status.success() && text.contains("applicationRoles") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl explain never showed the spec: {text} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for doc in [
        "The database the application uses today (blue)",
        "PostgreSQL roles the application connects as",
        "The gate before the switch",
    ] {
        assert!(out.contains(doc), "kubectl explain lacks {doc:?}:\n{out}");
    }
}

/// `kubectl apply --validate=strict` of a plan with misspelt fields is refused by the API
/// server, naming each field; nothing is created.
#[tokio::test]
async fn kubectl_apply_validate_strict_refuses_misspelt_fields() {
    let (plane, ns) = setup("strict").await;
    let text = std::fs::read_to_string(repo().join("cutover-plans/production-with-rollback.yaml"))
        .unwrap()
        .replacen("spec:\n", "spec:\n  mdoe: Rehearsal\n", 1)
        .replacen("approval:", "aproval:", 1)
        .replacen("namespace: billing", &format!("namespace: {ns}"), 1);
    assert!(
        text.contains("mdoe:") && text.contains("aproval:"),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plan.yaml");
    std::fs::write(&file, text).unwrap();
    // The API server publishes a new CRD's schema a moment after it is Established.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stderr = loop {
        let out = plane
            .kubectl(["apply", "--validate=strict", "-n", &ns, "-f"])
            .arg(&file)
            .output()
            .expect("run kubectl");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "a misspelt plan was applied: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        if stderr.contains("unknown field") || Instant::now() > deadline {
            break stderr;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        stderr.contains("unknown field \"spec.mdoe\"")
            && stderr.contains("unknown field \"spec.pointOfNoReturn.aproval\""),
        "{stderr}"
    );
    let api: Api<DatabaseCutover> = Api::namespaced(plane.client(), &ns);
    assert!(
        api.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}
