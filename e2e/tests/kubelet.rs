//! The kubelet stand-in on the real API server, with a shell as the image's entrypoint: a Job
//! that fails once and is retried, reading its env from a Secret and a value with `$(NAME)`
//! references and its files from a ConfigMap volume at a rewritten mount path; a Job killed at
//! its `activeDeadlineSeconds`; Jobs it cannot run refused with a reason; its processes killed
//! when it is dropped. Every status it writes is accepted by the API server's Job validation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use cutover_e2e::ControlPlane;
use cutover_e2e::kubelet::{CONFIG_ERROR, Kubelet, UNSUPPORTED};
use cutover_e2e::operator::eventually;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::{Value, json};

const SHELL_IMAGE: &str = "registry.example/shell:1";

async fn setup(prefix: &str) -> (ControlPlane, String, Kubelet) {
    let plane = ControlPlane::shared().await.expect("control plane");
    let ns = plane.namespace(prefix).await.expect("namespace");
    let kubelet = Kubelet::with_images(
        plane.client(),
        &ns,
        BTreeMap::from([(SHELL_IMAGE.to_owned(), PathBuf::from("/bin/sh"))]),
    );
    (plane, ns, kubelet)
}

/// A Job of one container; `spec` is merged over a restartPolicy Never pod template.
async fn create_job(plane: &ControlPlane, ns: &str, name: &str, container: Value, extra: Value) {
    let mut spec = json!({
        "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        if k == "volumes" {
            spec["template"]["spec"]["volumes"] = v;
        } else {
            spec[k] = v;
        }
    }
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    Api::<Job>::namespaced(plane.client(), ns)
        .create(&PostParams::default(), &job)
        .await
        .expect("create the Job");
}

/// Waits until the Job has a terminal condition; returns it with its reason and message.
async fn finished(plane: &ControlPlane, ns: &str, name: &str) -> (Job, String, String, String) {
    let jobs: Api<Job> = Api::namespaced(plane.client(), ns);
    eventually(
        &format!("Job {name} finishes"),
        Duration::from_secs(60),
        || async {
            let job = jobs.get(name).await.ok()?;
            let c = job
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")?
                .clone();
            Some((
                job,
                c.type_,
                c.reason.unwrap_or_default(),
                c.message.unwrap_or_default(),
            ))
        },
    )
    .await
}

/// Whether `pid` is a live process (a zombie awaiting its parent's wait counts as dead).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.trim_start().chars().next()
        })
        .is_some_and(|state| state != 'Z')
}

fn conditions(job: &Job) -> Vec<String> {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .filter(|c| c.status == "True")
                .map(|c| c.type_.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn runs_a_job_with_env_and_volumes_retrying_a_failed_run() {
    let (plane, ns, kubelet) = setup("kubelet-run").await;
    Api::<ConfigMap>::namespaced(plane.client(), &ns)
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("settings".into()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([("greeting".into(), "hello".into())])),
                ..ConfigMap::default()
            },
        )
        .await
        .unwrap();
    Api::<Secret>::namespaced(plane.client(), &ns)
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("creds".into()),
                    ..ObjectMeta::default()
                },
                string_data: Some(BTreeMap::from([("token".into(), "opaque-value".into())])),
                ..Secret::default()
            },
        )
        .await
        .unwrap();

    // The first run fails (HOME is the Job's folder, kept across runs); the second prints the
    // ConfigMap file named through the mount path, the Secret's value, and the expanded
    // `$(FILE)`, which the shell would otherwise take for a command substitution.
    let script = r#"test -f "$HOME/tried" || { touch "$HOME/tried"; echo first run fails; exit 3; }
printf '%s %s %s %s\n' "$(cat /etc/settings/greeting)" "$TOKEN" "$(FILE)" "${ABSENT-unset}""#;
    create_job(
        &plane,
        &ns,
        "retried",
        json!({
            "name": "c",
            "image": SHELL_IMAGE,
            "command": ["sh"],
            "args": ["-c", script],
            "env": [
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "FILE", "value": "/etc/settings/greeting"},
                {"name": "ABSENT", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "nope", "optional": true}}},
            ],
            "volumeMounts": [{"name": "settings", "mountPath": "/etc/settings", "readOnly": true}],
        }),
        json!({
            "backoffLimit": 2,
            "volumes": [{"name": "settings", "configMap": {"name": "settings"}}],
        }),
    )
    .await;

    let (job, kind, reason, _) = finished(&plane, &ns, "retried").await;
    let output = kubelet.output("retried");
    assert_eq!(
        (kind.as_str(), reason.as_str()),
        ("Complete", "CompletionsReached"),
        "{output}"
    );
    assert_eq!(conditions(&job), ["SuccessCriteriaMet", "Complete"]);
    let status = job.status.unwrap();
    assert_eq!((status.succeeded, status.failed), (Some(1), Some(1)));
    assert!(status.start_time.is_some() && status.completion_time.is_some());
    assert!(output.contains("first run fails"), "{output}");
    let last = output
        .lines()
        .find(|l| l.starts_with("hello "))
        .unwrap_or_else(|| panic!("no greeting in {output}"));
    let fields: Vec<&str> = last.split(' ').collect();
    assert_eq!(fields[..2], ["hello", "opaque-value"], "{last}");
    assert!(
        fields[2].ends_with("/volumes/settings/greeting") && !fields[2].starts_with("/etc"),
        "the mount path is rewritten: {last}"
    );
    assert_eq!(fields[3], "unset", "an optional missing key sets nothing");
}

#[tokio::test]
async fn a_job_past_its_deadline_is_killed_and_fails() {
    let (plane, ns, kubelet) = setup("kubelet-deadline").await;
    create_job(
        &plane,
        &ns,
        "slow",
        json!({
            "name": "c",
            "image": SHELL_IMAGE,
            "args": ["-c", "echo started; exec sleep 600"],
        }),
        json!({"activeDeadlineSeconds": 2, "backoffLimit": 5}),
    )
    .await;
    let pid = eventually(
        "the Job's process runs",
        Duration::from_secs(30),
        || async { kubelet.pids().first().copied() },
    )
    .await;

    let (job, kind, reason, message) = finished(&plane, &ns, "slow").await;
    assert_eq!(
        (kind.as_str(), reason.as_str()),
        ("Failed", "DeadlineExceeded")
    );
    assert!(
        message.starts_with("Job was active longer than specified deadline")
            && message.ends_with("started"),
        "{message}"
    );
    assert_eq!(conditions(&job), ["FailureTarget", "Failed"]);
    let status = job.status.unwrap();
    assert_eq!(status.failed, Some(1), "a deadline is not retried");
    assert_eq!(status.completion_time, None);
    assert!(!alive(pid), "the process was killed");
    assert!(kubelet.pids().is_empty());
}

#[tokio::test]
async fn what_it_cannot_run_fails_with_a_reason() {
    let (plane, ns, _kubelet) = setup("kubelet-refuse").await;
    let shell = json!({"name": "c", "image": SHELL_IMAGE, "args": ["-c", "true"]});
    create_job(
        &plane,
        &ns,
        "unknown-image",
        json!({"name": "c", "image": "registry.example/other:1"}),
        json!({}),
    )
    .await;
    create_job(
        &plane,
        &ns,
        "host-path",
        shell.clone(),
        json!({"volumes": [{"name": "host", "hostPath": {"path": "/var/lib"}}]}),
    )
    .await;
    let mut wants_secret = shell.clone();
    wants_secret["env"] = json!([
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k"}}}
    ]);
    create_job(&plane, &ns, "missing-secret", wants_secret, json!({})).await;
    let mut other_command = shell;
    other_command["command"] = json!(["/usr/bin/python3"]);
    create_job(&plane, &ns, "other-command", other_command, json!({})).await;

    for (name, want_reason, mentions) in [
        ("unknown-image", UNSUPPORTED, "registry.example/other:1"),
        ("host-path", UNSUPPORTED, "\"host\""),
        ("missing-secret", CONFIG_ERROR, "Secret missing"),
        ("other-command", UNSUPPORTED, "/usr/bin/python3"),
    ] {
        let (job, kind, reason, message) = finished(&plane, &ns, name).await;
        assert_eq!(
            (kind.as_str(), reason.as_str()),
            ("Failed", want_reason),
            "{name}: {message}"
        );
        assert!(message.contains(mentions), "{name}: {message}");
        assert_eq!(conditions(&job), ["FailureTarget", "Failed"], "{name}");
    }
}

#[tokio::test]
async fn dropping_the_stand_in_kills_its_processes() {
    let (plane, ns, kubelet) = setup("kubelet-drop").await;
    create_job(
        &plane,
        &ns,
        "endless",
        json!({"name": "c", "image": SHELL_IMAGE, "args": ["-c", "exec sleep 600"]}),
        json!({}),
    )
    .await;
    let pid = eventually(
        "the Job's process runs",
        Duration::from_secs(30),
        || async { kubelet.pids().first().copied() },
    )
    .await;
    drop(kubelet);
    eventually("the process is gone", Duration::from_secs(10), || async {
        (!alive(pid)).then_some(())
    })
    .await;
}
