//! The real node `e2e/real-node.sh` starts (`make node-test`): what a test needs to know about
//! it, and how a PostgreSQL cluster on the host is made reachable from its pods.
//!
//! Pods on the node sit on a bridge of their own and reach the host only at the bridge's own
//! address (the gateway); the PostgreSQL clusters of the tests listen on loopback. A cluster a
//! pod must reach (green, for the operator's migration Jobs) also listens on the gateway and
//! lets the pod subnet in, and its connection strings name the gateway.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use cutover_tests::{PgCluster, PgClusterBuilder};
use serde_json::{Value, json};

use crate::tools::{chart_dir, helm, run};

/// The image the node has imported for the operator (`make node-test` builds it from the debug
/// binary, `make e2e-node` from the release binary) — also the operator's default `--image` for
/// its migration Jobs.
pub const IMAGE: &str = concat!("ghcr.io/dbops/cutover:", env!("CARGO_PKG_VERSION"));

/// A container that only waits (`e2e/node/pause.c`), imported by `e2e/real-node.sh`: the
/// application container of the test Deployments.
pub const PAUSE_IMAGE: &str = "cutover.local/pause:e2e";

/// The bank workload as an application (`tests/src/bin/bank_app.rs`), imported by
/// `make node-test` / `make demo` as root.
pub const BANK_IMAGE: &str = "cutover.local/bank-app:e2e";

/// The chart's release name on the node.
pub const RELEASE: &str = "cutover-operator";

/// The node a test runs on, from the environment `e2e/real-node.sh` gives its command.
#[derive(Debug, Clone)]
pub struct Node {
    /// The API server's port on loopback.
    pub api_port: String,
    /// The pod bridge's own address: pods reach the host there.
    pub gateway: String,
    /// The kubectl built with the control plane.
    pub kubectl: PathBuf,
    /// The bed's folder, removed when the node stops (what the tests put there goes with it).
    pub dir: PathBuf,
}

impl Node {
    /// The node, when the test runs inside `e2e/real-node.sh` with `CUTOVER_E2E_REAL_NODE=1`;
    /// `None` (and a line saying so) otherwise.
    pub fn from_env() -> Option<Node> {
        let node = Self::detect();
        if node.is_none() {
            eprintln!(
                "not on a real node: `make node-test` runs this (CUTOVER_E2E_REAL_NODE=1 inside \
                 e2e/real-node.sh)"
            );
        }
        node
    }

    /// [`Node::from_env`] without a word.
    pub fn detect() -> Option<Node> {
        if std::env::var("CUTOVER_E2E_REAL_NODE").as_deref() != Ok("1") {
            return None;
        }
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by e2e/real-node.sh"))
        };
        let api = var("CUTOVER_NODE_API");
        Some(Node {
            api_port: api.rsplit(':').next().unwrap().to_owned(),
            gateway: var("CUTOVER_NODE_GATEWAY"),
            kubectl: PathBuf::from(var("CUTOVER_NODE_KUBECTL")),
            dir: PathBuf::from(var("CUTOVER_NODE_DIR")),
        })
    }

    /// kubectl with the node's kubeconfig (from `KUBECONFIG`).
    pub fn kubectl<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(&self.kubectl);
        cmd.args(args);
        cmd
    }

    /// A new folder `name` under the bed's, writable by the pods (a hostPath volume for the
    /// application's record of acknowledged writes); it goes when the node stops.
    pub fn shared_folder(&self, name: &str) -> PathBuf {
        let dir = self.dir.join("shared").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        dir
    }

    /// The pod subnet (`10.88.0.0/24`).
    pub fn pod_subnet(&self) -> String {
        format!("{}.0/24", self.gateway.rsplit_once('.').unwrap().0)
    }

    /// `builder` also listening on the gateway.
    pub fn listening_to_pods(&self, builder: PgClusterBuilder) -> PgClusterBuilder {
        builder.setting("listen_addresses", format!("127.0.0.1,{}", self.gateway))
    }

    /// Lets the pod subnet in to `cluster` (password, replication included), which must have
    /// been started [listening to pods](Node::listening_to_pods).
    pub fn allow_pods(&self, cluster: &PgCluster) {
        // PostgreSQL starts even when one of its addresses is taken: say so here rather than
        // let a pod reach whatever else listens there.
        let log = cluster.server_log();
        assert!(
            !log.contains(&format!("could not bind IPv4 address \"{}\"", self.gateway)),
            "PostgreSQL on port {} could not listen on {}: {log}",
            cluster.port(),
            self.gateway
        );
        let subnet = self.pod_subnet();
        let hba = cluster.data_dir().join("pg_hba.conf");
        let mut rules = std::fs::OpenOptions::new().append(true).open(&hba).unwrap();
        writeln!(
            rules,
            "host all all {subnet} scram-sha-256\nhost replication all {subnet} scram-sha-256"
        )
        .unwrap();
        cluster
            .execute("postgres", "SELECT pg_reload_conf()")
            .unwrap();
    }

    /// `dsn` with the server named by the gateway instead of loopback.
    pub fn via(&self, dsn: &str) -> String {
        dsn.replacen("@127.0.0.1:", &format!("@{}:", self.gateway), 1)
    }

    /// The logs of every pod of Job `job` in `ns` (`kubectl logs job/… --all-pods`), for a
    /// test's output; what kubectl said when it could not.
    pub fn job_logs(&self, ns: &str, job: &str) -> String {
        let out = self
            .kubectl([
                "logs",
                "-n",
                ns,
                &format!("job/{job}"),
                "--all-pods",
                "--prefix",
            ])
            .output();
        match out {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("kubectl logs: {e}"),
        }
    }
}

/// A container's security settings, as the restricted Pod Security profile wants them.
pub fn restricted() -> Value {
    json!({"runAsNonRoot": true, "allowPrivilegeEscalation": false,
           "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
           "seccompProfile": {"type": "RuntimeDefault"}})
}

/// A Job running `cutover migrate` from the image against the database of `secret`.
pub fn migrate_job(name: &str, secret: &str) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "migrate", "image": IMAGE, "imagePullPolicy": "Never",
                "args": ["migrate", "--dir", "/migrations", "--lock-key", "7"],
                "env": [{"name": "DATABASE_URL",
                         "valueFrom": {"secretKeyRef": {"name": secret, "key": "uri"}}}],
                "volumeMounts": [{"name": "migrations", "mountPath": "/migrations", "readOnly": true}],
                "securityContext": restricted(),
            }],
            "volumes": [{"name": "migrations", "configMap": {"name": "billing-migrations"}}],
        }}}
    })
}

/// The application: the bank workload reading the application Secret, after an init container
/// that waits for migration version 1 on the database the Secret names.
pub fn application(acks: &std::path::Path) -> Value {
    let database = json!({"name": "DATABASE_URL", "valueFrom":
        {"secretKeyRef": {"name": "billing-db", "key": "DATABASE_URL"}}});
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "billing-api"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "billing-api"}},
            "template": {
                "metadata": {"labels": {"app": "billing-api"}},
                "spec": {
                    "terminationGracePeriodSeconds": 10,
                    "initContainers": [{
                        "name": "wait-for-schema", "image": IMAGE, "imagePullPolicy": "Never",
                        "args": ["wait", "--until-version", "1", "--timeout", "2m"],
                        "env": [database],
                        "securityContext": restricted(),
                    }],
                    "containers": [{
                        "name": "api", "image": BANK_IMAGE, "imagePullPolicy": "Never",
                        "env": [database, {"name": "BANK_ACKS_DIR", "value": "/acks"},
                                {"name": "BANK_TPS", "value": "40"}],
                        "volumeMounts": [{"name": "acks", "mountPath": "/acks"}],
                        "securityContext": restricted(),
                    }],
                    "volumes": [{"name": "acks", "hostPath":
                        {"path": acks.display().to_string(), "type": "Directory"}}],
                }
            }
        }
    })
}

/// What the application's pods recorded in `dir` (their hostPath volume): every write each
/// acknowledged, by pod, in the order acknowledged.
pub fn acknowledged(dir: &std::path::Path) -> Vec<(String, Vec<(i32, i64)>)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let acks = text
            .lines()
            .filter_map(|l| {
                let (c, s) = l.split_once(' ')?;
                Some((c.parse().ok()?, s.parse().ok()?))
            })
            .collect();
        all.push((entry.file_name().to_string_lossy().into_owned(), acks));
    }
    all.sort();
    all
}

/// The chart installed by helm in a namespace of its own; uninstalled (and waited on) when
/// dropped, also when the test fails.
pub struct Release {
    /// The namespace it is installed in.
    pub system: String,
}

impl Release {
    /// `helm install --wait` of the chart into `system` with the image the node imported and
    /// `replicas` operator pods on the pod network, told where the API server is.
    pub fn install(node: &Node, system: &str, replicas: u32) -> Release {
        let started = std::time::Instant::now();
        let out = run(helm(None)
            .args(["install", RELEASE])
            .arg(chart_dir())
            .args(["--namespace", system, "--wait", "--timeout", "180s"])
            .args(["--set", &format!("replicaCount={replicas}")])
            .args(["--set", "image.pullPolicy=Never"])
            .args(["--set", "extraEnv[0].name=KUBERNETES_SERVICE_HOST"])
            .args(["--set", &format!("extraEnv[0].value={}", node.gateway)])
            .args(["--set", "extraEnv[1].name=KUBERNETES_SERVICE_PORT"])
            .args([
                "--set-string",
                &format!("extraEnv[1].value={}", node.api_port),
            ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.contains("STATUS: deployed"), "{out}");
        eprintln!(
            "helm install --wait ({replicas} replicas): {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Release {
            system: system.to_owned(),
        }
    }

    /// `helm uninstall --wait`.
    pub fn uninstall(&self) -> Result<String, String> {
        run(helm(None).args([
            "uninstall",
            RELEASE,
            "--namespace",
            &self.system,
            "--wait",
            "--timeout",
            "120s",
        ]))
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Err(e) = self.uninstall() {
            eprintln!("helm uninstall: {e}");
        }
    }
}
