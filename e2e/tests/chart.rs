//! The Helm chart, checked with the real tools a user would run: `helm lint`, `helm template`
//! with every optional part on and the real API server accepting what it renders (server-side
//! dry run), `helm install` / `helm uninstall` against that API server, the alerting rules
//! through `promtool check rules` and a `promtool test rules` unit test that fires each alert,
//! and the Grafana dashboard's JSON.
//!
//! The bed has no node, so the install is not waited on (`--wait` needs running pods; the real
//! node's test waits). The Prometheus Operator's kinds (ServiceMonitor, PrometheusRule) are
//! checked against that project's own CRDs, installed from its Go module
//! (`hack/go-tool.sh prometheus-operator-crds`).

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use cutover_e2e::ControlPlane;
use cutover_e2e::tools::{chart_dir, helm, prometheus_operator_crds, promtool, repo_root, run};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::Api;
use serde_json::Value;

const RELEASE: &str = "cutover-operator";
/// Every optional part of the chart switched on.
const ALL_ON: [&str; 6] = [
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "grafanaDashboard.enabled=true",
];

/// `helm template` of the chart into `namespace`, parsed into one value per object.
fn render(namespace: &str, extra: &[&str]) -> Vec<Value> {
    let chart = chart_dir();
    let mut cmd = helm(None);
    cmd.args(["template", RELEASE])
        .arg(&chart)
        .args(["--namespace", namespace, "--include-crds"])
        .args(extra);
    let text = run(&mut cmd).unwrap_or_else(|e| panic!("{e}"));
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("helm template printed YAML that does not parse: {e}\n{text}"))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kind_of(doc: &Value) -> (&str, &str) {
    (
        doc["apiVersion"].as_str().unwrap_or_default(),
        doc["kind"].as_str().unwrap_or_default(),
    )
}

fn the_one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| kind_of(d).1 == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "one {kind} in the rendered chart, found {}",
        found.len()
    );
    found[0]
}

#[test]
fn chart_passes_helm_lint_strict() {
    let chart = chart_dir();
    for values in [&[][..], &ALL_ON[..]] {
        let out = run(helm(None)
            .args(["lint", "--strict", "--namespace", "cutover"])
            .arg(&chart)
            .args(values))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

#[tokio::test]
async fn the_api_server_accepts_the_rendered_chart_and_helm_installs_it() {
    let plane = ControlPlane::shared().await.unwrap();
    let ns = plane.namespace("chart").await.unwrap();

    // The rendering with every part on, through a server-side dry run: schemas, field
    // validation (strict for server-side apply), admission. The ServiceMonitor and the
    // PrometheusRule against the Prometheus Operator's own CRDs.
    let crds = prometheus_operator_crds().unwrap_or_else(|e| panic!("{e}"));
    let installed = plane.install_crds(&crds).await.unwrap();
    assert!(
        installed.iter().any(|c| c.starts_with("servicemonitors."))
            && installed.iter().any(|c| c.starts_with("prometheusrules.")),
        "{installed:?}"
    );
    let docs = render(&ns, &ALL_ON);
    let served: Vec<&Value> = docs.iter().collect();
    let kinds: BTreeSet<&str> = served.iter().map(|d| kind_of(d).1).collect();
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "ConfigMap",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(
            kinds.contains(kind),
            "the chart renders a {kind}: {kinds:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("chart.json");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": served});
    std::fs::write(&manifest, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    let out = run(plane
        .kubectl([
            "apply",
            "--server-side",
            "--dry-run=server",
            "--force-conflicts",
        ])
        .args(["--field-manager", "cutover-e2e-chart", "-f"])
        .arg(&manifest))
    .unwrap_or_else(|e| panic!("the API server refused the rendered chart: {e}"));
    assert_eq!(
        out.lines().count(),
        served.len(),
        "kubectl reports each object once:\n{out}"
    );

    // A real install (no --wait: no node runs the pods here), then the objects as installed.
    let kubeconfig = plane.kubeconfig_path().map(Path::to_path_buf);
    let out = run(helm(kubeconfig.as_deref())
        .args(["install", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", &ns, "--set", "grafanaDashboard.enabled=true"])
        .args(["--set", "image.repository=registry.example/cutover"]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("STATUS: deployed"), "{out}");

    let client = plane.client();
    let deployment: Deployment = Api::namespaced(client.clone(), &ns)
        .get(RELEASE)
        .await
        .unwrap();
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let sa_name = pod.service_account_name.clone().unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get(&sa_name)
        .await
        .unwrap_or_else(|e| panic!("the Deployment's ServiceAccount {sa_name} exists: {e}"));
    let binding: ClusterRoleBinding = Api::all(client.clone()).get(RELEASE).await.unwrap();
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (sa_name.as_str(), Some(ns.as_str())),
        "the ClusterRoleBinding names the release's ServiceAccount"
    );
    let container = &pod.containers[0];
    let image = container.image.clone().unwrap();
    assert_eq!(image, "registry.example/cutover:0.1.0");
    let env = container.env.clone().unwrap_or_default();
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        value("CUTOVER_IMAGE").as_deref(),
        Some(image.as_str()),
        "migration Jobs run the image the release runs"
    );
    assert_eq!(
        value("CUTOVER_LEASE_NAME").as_deref(),
        Some("cutover-operator-leader")
    );

    let out = run(helm(kubeconfig.as_deref()).args(["uninstall", RELEASE, "--namespace", &ns]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("uninstalled"), "{out}");
    let gone = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get_opt(RELEASE)
        .await
        .unwrap();
    assert!(gone.is_none(), "helm uninstall removed the Deployment");
    let gone = Api::<ClusterRoleBinding>::all(client)
        .get_opt(RELEASE)
        .await
        .unwrap();
    assert!(
        gone.is_none(),
        "helm uninstall removed the ClusterRoleBinding"
    );
}

#[test]
fn the_alerting_rules_pass_promtool_and_each_alert_fires_in_its_unit_test() {
    let docs = render("cutover", &ALL_ON);
    let rule = the_one(&docs, "PrometheusRule");
    let dir = tempfile::tempdir().unwrap();
    // A Prometheus rules file is the PrometheusRule's spec (`groups:`); JSON is YAML.
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_json::to_vec_pretty(&rule["spec"]).unwrap(),
    )
    .unwrap();
    let tests = repo_root().join("e2e/monitoring/alerts.test.yaml");
    std::fs::copy(&tests, dir.path().join("alerts.test.yaml")).unwrap();

    let out = run(promtool()
        .current_dir(dir.path())
        .args(["check", "rules", "rules.yaml"]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run(promtool()
        .current_dir(dir.path())
        .args(["test", "rules", "alerts.test.yaml"]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert the chart ships is fired by a test.
    let test_text = std::fs::read_to_string(&tests).unwrap();
    let alerts: Vec<&str> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts.len() >= 4, "{alerts:?}");
    for alert in alerts {
        assert!(
            test_text.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - exp_labels"
            )),
            "{alert} has a unit test in which it fires"
        );
    }
}

/// The metric names docs/metrics.md documents (its table's first column).
fn documented_metrics() -> HashSet<String> {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let names: HashSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    assert!(
        names.len() >= 8,
        "docs/metrics.md lists the metrics: {names:?}"
    );
    names
}

#[test]
fn the_grafana_dashboard_is_valid_and_shows_lag_phase_freeze_and_verification() {
    assert!(
        render("cutover", &[])
            .iter()
            .all(|d| kind_of(d).1 != "ConfigMap"),
        "the dashboard is off by default"
    );
    let docs = render("cutover", &ALL_ON);
    let cm = the_one(&docs, "ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let text = cm["data"]["cutover.json"]
        .as_str()
        .expect("the ConfigMap holds cutover.json");
    let shipped = std::fs::read_to_string(chart_dir().join("dashboards/cutover.json")).unwrap();
    assert_eq!(
        text.trim_end(),
        shipped.trim_end(),
        "the ConfigMap carries the file as is"
    );

    let dash: Value = serde_json::from_str(text).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "cutover-operator");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);
    let variables: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "name"]);

    let panels = dash["panels"].as_array().unwrap();
    let mut ids = HashSet::new();
    let mut cells = HashSet::new();
    let mut exprs = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "{title}: unique id"
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(
            w > 0 && h > 0 && x + w <= 24,
            "{title}: inside the 24-column grid"
        );
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{title} overlaps another panel at {cx},{cy}"
                );
            }
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: has a query");
        for t in targets {
            exprs.push((title, t["expr"].as_str().unwrap().to_owned()));
        }
    }
    let titles: Vec<String> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect();
    for needed in ["replication lag", "phase", "write freeze", "verification"] {
        assert!(
            titles.iter().any(|t| t.contains(needed)),
            "a panel shows {needed}: {titles:?}"
        );
    }

    // Each query names only metrics the operator exports, and parses as PromQL: promtool
    // checks them as recording rules, with the dashboard's variables filled in.
    let documented = documented_metrics();
    for (title, expr) in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("cutover_") {
                let base = ["_sum", "_count", "_bucket"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .filter(|b| documented.contains(*b))
                    .unwrap_or(word);
                assert!(
                    documented.contains(base),
                    "{title}: {word} is no documented metric"
                );
            }
        }
    }
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$namespace", ".*")
                .replace("$name", ".*");
            serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr})
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yaml");
    let groups = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, serde_json::to_vec_pretty(&groups).unwrap()).unwrap();
    let out = run(promtool().args(["check", "rules"]).arg(&file)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("SUCCESS"), "{out}");
}
