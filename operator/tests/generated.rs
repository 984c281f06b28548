//! Generated files stay generated: `crds/` and the chart's copy equal what `cutover crd`
//! prints, and every example plan parses into the Rust types.

use std::path::{Path, PathBuf};

use cutover_operator::api::{DatabaseCutover, crd_yaml};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()))
}

#[test]
fn crds_folder_matches_the_rust_types() {
    let generated = crd_yaml();
    for file in [
        "crds/databasecutover.yaml",
        "charts/cutover-operator/crds/databasecutover.yaml",
    ] {
        let on_disk = read(&repo().join(file));
        assert!(
            on_disk == generated,
            "{file} is out of date with operator/src/api: run `make crds` and commit the result"
        );
    }
}

#[test]
fn every_field_has_a_description() {
    let crd: serde_json::Value =
        serde_json::to_value(<DatabaseCutover as kube::CustomResourceExt>::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut missing = Vec::new();
    walk(&schema["properties"]["spec"], "spec", &mut missing);
    walk(&schema["properties"]["status"], "status", &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description (add a /// doc): {missing:#?}"
    );
}

fn walk(node: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
    if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
        for (name, child) in props {
            let child_path = format!("{path}.{name}");
            // Conditions are the upstream metav1.Condition type, documented upstream.
            if path.ends_with(".conditions[]") {
                continue;
            }
            if child
                .get("description")
                .and_then(|d| d.as_str())
                .is_none_or(str::is_empty)
            {
                missing.push(child_path.clone());
            }
            walk(child, &child_path, missing);
        }
    }
    if let Some(items) = node.get("items") {
        walk(items, &format!("{path}[]"), missing);
    }
}

#[test]
fn example_plans_parse() {
    let dir = repo().join("cutover-plans");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = read(&path);
            let plan: DatabaseCutover = serde_saphyr::from_str(&text)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
            assert!(
                plan.metadata.name.is_some(),
                "{} has no name",
                path.display()
            );
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "expected at least three example plans, found {seen}"
    );
}
