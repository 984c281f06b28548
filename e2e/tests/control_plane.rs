//! Smoke tests of the test bed itself: a real kube-apiserver + etcd (or the existing cluster with
//! `USE_EXISTING_CLUSTER=true`), reached through the kube client and through kubectl.

use std::path::Path;
use std::process::Output;

use cutover_e2e::ControlPlane;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams};

fn stdout_of(what: &str, output: Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kubectl prints UTF-8")
}

#[tokio::test]
async fn lists_namespaces_through_kube_client_and_kubectl() {
    let plane = ControlPlane::shared().await.expect("control plane");
    let client = plane.client();
    let version = client.apiserver_version().await.expect("GET /version");
    let mine = plane.namespace("smoke").await.expect("create a namespace");

    let through_client: Vec<String> = Api::<Namespace>::all(client)
        .list(&ListParams::default())
        .await
        .expect("list namespaces")
        .items
        .into_iter()
        .filter_map(|ns| ns.metadata.name)
        .collect();

    let listed = stdout_of(
        "kubectl get ns",
        plane
            .kubectl(["get", "ns", "-o", "name"])
            .output()
            .expect("run kubectl"),
    );
    let through_kubectl: Vec<&str> = listed
        .lines()
        .filter_map(|line| line.strip_prefix("namespace/"))
        .collect();
    // Other tests add namespaces to the shared control plane concurrently, so compare the
    // ones that are certainly there rather than the whole lists.
    for name in [mine.as_str(), "default", "kube-system"] {
        assert!(
            through_client.iter().any(|n| n == name),
            "{through_client:?}"
        );
        assert!(through_kubectl.contains(&name), "{listed}");
    }

    let kubectl_version = stdout_of(
        "kubectl version",
        plane
            .kubectl(["version", "--client", "-o", "yaml"])
            .output()
            .expect("run kubectl"),
    );
    let kubectl_version = kubectl_version
        .lines()
        .find_map(|line| line.trim().strip_prefix("gitVersion: "))
        .unwrap_or("unknown")
        .to_owned();

    println!(
        "ran against the real API server {} at {} ({}): {} namespaces via kube client and \
         kubectl {kubectl_version}",
        version.git_version,
        plane.server_url(),
        if plane.is_existing_cluster() {
            "existing cluster"
        } else {
            "started by this test binary"
        },
        through_client.len(),
    );
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.e2e-harness.cutover.dev
spec:
  group: e2e-harness.cutover.dev
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size:
                  type: integer
                  minimum: 1
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.e2e-harness.cutover.dev
spec:
  group: e2e-harness.cutover.dev
  scope: Cluster
  names:
    plural: gadgets
    kind: Gadget
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
"#;

#[tokio::test]
async fn installs_crds_that_validate_objects() {
    let plane = ControlPlane::shared().await.expect("control plane");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("widgets.yaml"), WIDGET_CRD).unwrap();
    std::fs::write(dir.path().join("README.md"), "not a manifest").unwrap();

    let names = plane.install_crds(dir.path()).await.expect("install CRDs");
    assert_eq!(
        names,
        [
            "widgets.e2e-harness.cutover.dev",
            "gadgets.e2e-harness.cutover.dev"
        ]
    );
    // Applying again is a no-op, not an error.
    plane.install_crds(dir.path()).await.expect("re-apply CRDs");

    let ns = plane.namespace("crds").await.unwrap();
    let widget = |size: i64| {
        format!(
            "apiVersion: e2e-harness.cutover.dev/v1\nkind: Widget\nmetadata:\n  name: w{size}\n  \
             namespace: {ns}\nspec:\n  size: {size}\n"
        )
    };
    let apply = |manifest: String| {
        let path = dir.path().join("widget.yaml.in");
        std::fs::write(&path, manifest).unwrap();
        plane
            .kubectl(["apply", "-f"])
            .arg(&path)
            .output()
            .expect("run kubectl")
    };
    stdout_of("kubectl apply (valid widget)", apply(widget(3)));
    let rejected = apply(widget(0));
    assert!(
        !rejected.status.success(),
        "the CRD schema must reject size 0"
    );
    assert!(
        String::from_utf8_lossy(&rejected.stderr).contains("spec.size"),
        "{}",
        String::from_utf8_lossy(&rejected.stderr)
    );
    let listed = stdout_of(
        "kubectl get widgets",
        plane
            .kubectl(["get", "widgets", "-n", &ns, "-o", "name"])
            .output()
            .expect("run kubectl"),
    );
    assert_eq!(listed.trim(), "widget.e2e-harness.cutover.dev/w3");

    if plane.is_existing_cluster() {
        let crds: Api<CustomResourceDefinition> = Api::all(plane.client());
        for name in names {
            crds.delete(&name, &DeleteParams::default()).await.unwrap();
        }
    }
}

/// The operator's own CRDs (`crds/` at the repository root) must be accepted by a real API
/// server. Trivially passes while the folder holds no manifests.
#[tokio::test]
async fn installs_the_repository_crds() {
    let plane = ControlPlane::shared().await.expect("control plane");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let names = plane.install_crds(&dir).await.expect("install crds/");
    println!("installed {} CRDs from crds/: {names:?}", names.len());
}

#[tokio::test]
async fn own_control_plane_is_torn_down_on_drop() {
    if cutover_e2e::use_existing_cluster() {
        return;
    }
    let plane = ControlPlane::start().await.expect("control plane");
    let pids = plane.pids();
    let work_dir = plane.work_dir().unwrap().to_owned();
    assert_eq!(pids.len(), 2);
    assert!(work_dir.join("kubeconfig").is_file());
    plane
        .client()
        .apiserver_version()
        .await
        .expect("GET /version");

    drop(plane);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived its ControlPlane"
        );
    }
    assert!(!work_dir.exists(), "{} was not removed", work_dir.display());
}
