//! Kubernetes test bed for the cutover e2e suite.
//!
//! [`ControlPlane::start`] runs a real `etcd` and `kube-apiserver` (the envtest approach):
//! the binaries are built from the upstream Go modules by `e2e/build-control-plane.sh` (cached
//! per user, keyed by version) or taken from `KUBEBUILDER_ASSETS`. Certificates are generated on
//! the fly; the admin client authenticates with a client certificate in `system:masters`.
//!
//! With `USE_EXISTING_CLUSTER=true` nothing is started and the current kubeconfig is used
//! instead (kind, k3d, a staging cluster).
//!
//! There is no kube-controller-manager, scheduler or kubelet: objects are stored and validated
//! (CRD schemas, admission, RBAC) but nothing reconciles them — no pods run, no namespace is
//! finalised, no garbage collection, no default service accounts. What needs pods (the
//! operator's migration Jobs, the chart's operator pod, the application's init containers) runs
//! on a real node: `e2e/real-node.sh` starts one ([`node::Node`]) and `make node-test` runs
//! those tests inside it.
//!
//! A [`kube::Client`] is tied to the tokio runtime that created it, and `#[tokio::test]` makes
//! one runtime per test, so [`ControlPlane::client`] builds a fresh client on every call; the
//! processes themselves do not depend on any runtime.

pub mod fixtures;
pub mod node;
pub mod operator;
pub mod tools;

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, mpsc};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// Set to `true` (or `1`) to run against the cluster of the current kubeconfig.
pub const USE_EXISTING_CLUSTER: &str = "USE_EXISTING_CLUSTER";
/// Folder holding prebuilt `kube-apiserver`, `etcd` (and optionally `kubectl`), as in envtest.
pub const KUBEBUILDER_ASSETS: &str = "KUBEBUILDER_ASSETS";
/// Label put on every namespace made by [`ControlPlane::namespace`], so leftovers on an
/// existing cluster can be removed with `kubectl delete ns -l cutover-e2e=true`.
pub const NAMESPACE_LABEL: &str = "cutover-e2e";

/// How long etcd + kube-apiserver may take to report `/readyz` = ok.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an applied CRD may take to become `Established`.
const CRD_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at starting a local control plane when a picked port was taken meanwhile.
const START_ATTEMPTS: usize = 3;
const FIELD_MANAGER: &str = "cutover-e2e";
/// Lines of a process log shown when startup fails.
const LOG_TAIL_LINES: usize = 40;

/// Errors of the test bed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("locating or building the control-plane binaries failed: {0}")]
    Binaries(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("generating certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    #[error("the control plane did not start: {0}")]
    Startup(String),
    #[error("the shared control plane failed to start (earlier in this process): {0}")]
    Shared(String),
    #[error("reading the kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("inferring the kube config of the existing cluster: {0}")]
    InferConfig(#[from] kube::config::InferConfigError),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("waiting for a condition: {0}")]
    Wait(#[from] kube::runtime::wait::Error),
    #[error("{}: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Whether `USE_EXISTING_CLUSTER` asks for the current kubeconfig's cluster.
pub fn use_existing_cluster() -> bool {
    std::env::var(USE_EXISTING_CLUSTER)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
        .unwrap_or(false)
}

/// A Kubernetes API server for tests: either one this process started (etcd + kube-apiserver,
/// stopped and cleaned up when the last clone is dropped) or an existing cluster.
///
/// Cheap to clone; clones share the same processes.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: kube::Config,
    kubeconfig: Option<PathBuf>,
    kubectl: PathBuf,
    local: Option<LocalPlane>,
}

/// The processes and files of a control plane this process started. Field order matters:
/// the processes are killed (on drop) before the temp dir holding their data is removed.
#[derive(Debug)]
struct LocalPlane {
    apiserver: Process,
    etcd: Process,
    server: String,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl LocalPlane {
    /// Kills both processes and removes the temp dir; used at process exit for the shared
    /// instance, whose destructor never runs.
    fn shutdown(&self) {
        self.apiserver.kill();
        self.etcd.kill();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

impl ControlPlane {
    /// Starts a fresh control plane for the caller (or attaches to the existing cluster when
    /// `USE_EXISTING_CLUSTER=true`). The first call on a fresh machine builds the binaries,
    /// which takes several minutes.
    pub async fn start() -> Result<Self, Error> {
        let inner = if use_existing_cluster() {
            existing_cluster().await?
        } else {
            start_local().await?
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The process-wide control plane, started on first use and stopped when the test binary
    /// exits. Prefer this over [`ControlPlane::start`] and isolate tests with
    /// [`ControlPlane::namespace`]: every control plane costs an etcd and an API server.
    ///
    /// If starting it fails, every later call fails fast with the same message.
    pub async fn shared() -> Result<Self, Error> {
        static SHARED: tokio::sync::OnceCell<Result<ControlPlane, String>> =
            tokio::sync::OnceCell::const_new();
        let shared = SHARED
            .get_or_init(|| async {
                let plane = ControlPlane::start().await.map_err(|e| e.to_string())?;
                if plane.inner.local.is_some() {
                    at_exit(|| {
                        if let Some(Ok(plane)) = SHARED.get()
                            && let Some(local) = &plane.inner.local
                        {
                            local.shutdown();
                        }
                    });
                }
                Ok(plane)
            })
            .await;
        shared.clone().map_err(Error::Shared)
    }

    /// Whether this runs against an existing cluster (`USE_EXISTING_CLUSTER=true`).
    pub fn is_existing_cluster(&self) -> bool {
        self.inner.local.is_none()
    }

    /// The kubeconfig file for this control plane: the generated one, or for an existing
    /// cluster the first file of `KUBECONFIG` / `~/.kube/config` if there is one.
    pub fn kubeconfig_path(&self) -> Option<&Path> {
        self.inner.kubeconfig.as_deref()
    }

    /// The API server URL.
    pub fn server_url(&self) -> String {
        match &self.inner.local {
            Some(local) => local.server.clone(),
            None => self.inner.config.cluster_url.to_string(),
        }
    }

    /// The kube client configuration (admin credentials).
    pub fn config(&self) -> kube::Config {
        self.inner.config.clone()
    }

    /// A new client bound to the current tokio runtime. Must be called inside a runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("building a kube client from the config")
    }

    /// `kubectl <args>` aimed at this control plane (the kubectl built with it, or the one in
    /// `PATH` when there is none). For an existing cluster kubectl uses its default kubeconfig.
    pub fn kubectl<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.inner.kubectl);
        if let Some(local) = &self.inner.local {
            cmd.arg("--kubeconfig")
                .arg(&local.kubeconfig)
                .arg("--cache-dir")
                .arg(local.dir.path().join("kubectl-cache"));
        }
        cmd.args(args);
        cmd
    }

    /// Process ids of etcd and kube-apiserver (empty for an existing cluster).
    pub fn pids(&self) -> Vec<u32> {
        match &self.inner.local {
            Some(local) => vec![local.etcd.pid, local.apiserver.pid],
            None => Vec::new(),
        }
    }

    /// The folder holding the certificates, the etcd data and the process logs
    /// (`etcd.log`, `kube-apiserver.log`); `None` for an existing cluster.
    pub fn work_dir(&self) -> Option<&Path> {
        self.inner.local.as_ref().map(|local| local.dir.path())
    }

    /// Creates a fresh namespace named `<prefix>-<random>` (via `generateName`, so the API
    /// server guarantees uniqueness) and returns its name. The namespace carries the label
    /// [`NAMESPACE_LABEL`]`=true`.
    pub async fn namespace(&self, prefix: &str) -> Result<String, Error> {
        let api: Api<Namespace> = Api::all(self.client());
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", dns_label_prefix(prefix))),
                labels: Some(BTreeMap::from([(
                    NAMESPACE_LABEL.to_owned(),
                    "true".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = api.create(&PostParams::default(), &namespace).await?;
        Ok(created
            .metadata
            .name
            .expect("the API server names a namespace made with generateName"))
    }

    /// Applies every CustomResourceDefinition in the `*.yaml` / `*.yml` files of `dir`
    /// (multi-document files allowed) with server-side apply, then waits until each one is
    /// `Established`. Returns the CRD names, in file order.
    pub async fn install_crds(&self, dir: impl AsRef<Path>) -> Result<Vec<String>, Error> {
        let dir = dir.as_ref();
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let path = entry
                .map_err(io_err(format!("reading {}", dir.display())))?
                .path();
            if path.is_file()
                && matches!(
                    path.extension().and_then(OsStr::to_str),
                    Some("yaml" | "yml")
                )
            {
                files.push(path);
            }
        }
        files.sort();

        let api: Api<CustomResourceDefinition> = Api::all(self.client());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut names = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path)
                .map_err(io_err(format!("reading {}", path.display())))?;
            let crds: Vec<CustomResourceDefinition> =
                serde_saphyr::from_multiple(&text).map_err(|e| Error::Manifest {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            for crd in crds {
                let name = crd.metadata.name.clone().ok_or_else(|| Error::Manifest {
                    path: path.clone(),
                    message: "a CustomResourceDefinition without metadata.name".into(),
                })?;
                api.patch(&name, &params, &Patch::Apply(&crd)).await?;
                names.push(name);
            }
        }

        for name in &names {
            tokio::time::timeout(
                CRD_TIMEOUT,
                await_condition(api.clone(), name, conditions::is_crd_established()),
            )
            .await
            .map_err(|_| Error::Timeout(CRD_TIMEOUT, format!("CRD {name} to be Established")))??;
            self.await_served(&api, name).await?;
        }
        Ok(names)
    }

    /// Waits until the custom resources of CRD `name` can be listed: a CRD can be Established a
    /// moment before its endpoint serves (a 404 for that moment).
    async fn await_served(
        &self,
        crds: &Api<CustomResourceDefinition>,
        name: &str,
    ) -> Result<(), Error> {
        let crd = crds.get(name).await?;
        let group = crd.spec.group.clone();
        let plural = crd.spec.names.plural.clone();
        let kind = crd.spec.names.kind.clone();
        let Some(version) = crd.spec.versions.iter().find(|v| v.served) else {
            return Ok(());
        };
        let gvk = kube::api::GroupVersionKind::gvk(&group, &version.name, &kind);
        let resource = kube::discovery::ApiResource::from_gvk_with_plural(&gvk, &plural);
        let api: Api<kube::api::DynamicObject> = Api::all_with(self.client(), &resource);
        let deadline = std::time::Instant::now() + CRD_TIMEOUT;
        loop {
            match api.list(&kube::api::ListParams::default().limit(1)).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(status))
                    if status.code == 404 && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    return Err(Error::Timeout(
                        CRD_TIMEOUT,
                        format!("the resources of CRD {name} to be served"),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// `prefix` made fit for the front of a DNS label (lower-case alphanumerics and '-', short
/// enough to leave room for the generated suffix).
fn dns_label_prefix(prefix: &str) -> String {
    let cleaned: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut cleaned = cleaned.trim_matches('-').to_owned();
    cleaned.truncate(40);
    let cleaned = cleaned.trim_end_matches('-');
    if cleaned.is_empty() {
        "e2e".to_owned()
    } else {
        cleaned.to_owned()
    }
}

// ----------------------------------------------------------------------------------------------
// Existing cluster

async fn existing_cluster() -> Result<Inner, Error> {
    let config = kube::Config::infer().await?;
    let kubeconfig = std::env::var_os("KUBECONFIG")
        .and_then(|list| std::env::split_paths(&list).find(|p| p.is_file()))
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            let path = Path::new(&home).join(".kube").join("config");
            path.is_file().then_some(path)
        });
    let kubectl = std::env::var_os(KUBEBUILDER_ASSETS)
        .map(|dir| Path::new(&dir).join("kubectl"))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("kubectl"));
    Ok(Inner {
        config,
        kubeconfig,
        kubectl,
        local: None,
    })
}

// ----------------------------------------------------------------------------------------------
// Binaries

#[derive(Debug, Clone)]
struct Binaries {
    etcd: PathBuf,
    kube_apiserver: PathBuf,
    kubectl: PathBuf,
}

impl Binaries {
    fn in_dir(dir: &Path) -> Self {
        let kubectl = dir.join("kubectl");
        Self {
            etcd: dir.join("etcd"),
            kube_apiserver: dir.join("kube-apiserver"),
            kubectl: if kubectl.is_file() {
                kubectl
            } else {
                PathBuf::from("kubectl")
            },
        }
    }
}

/// Finds the binaries once per process: `KUBEBUILDER_ASSETS` if it holds them, otherwise
/// whatever `build-control-plane.sh` prints (it builds into the per-user cache on first use).
async fn binaries() -> Result<Binaries, Error> {
    static BINARIES: tokio::sync::OnceCell<Result<Binaries, String>> =
        tokio::sync::OnceCell::const_new();
    BINARIES
        .get_or_init(|| async {
            tokio::task::spawn_blocking(locate_binaries)
                .await
                .map_err(|e| format!("locating the binaries panicked: {e}"))?
        })
        .await
        .clone()
        .map_err(Error::Binaries)
}

fn locate_binaries() -> Result<Binaries, String> {
    if let Some(dir) = std::env::var_os(KUBEBUILDER_ASSETS) {
        let dir = PathBuf::from(dir);
        if dir.join("kube-apiserver").is_file() && dir.join("etcd").is_file() {
            return Ok(Binaries::in_dir(&dir));
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build-control-plane.sh");
    // Progress (and a build of several minutes on a fresh machine) shows on stderr.
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed ({}); its output is above",
            script.display(),
            output.status
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .ok_or_else(|| format!("{} printed no folder", script.display()))?;
    let binaries = Binaries::in_dir(Path::new(dir));
    for path in [&binaries.etcd, &binaries.kube_apiserver] {
        if !path.is_file() {
            return Err(format!(
                "{} printed {dir}, which lacks {}",
                script.display(),
                path.display()
            ));
        }
    }
    Ok(binaries)
}

// ----------------------------------------------------------------------------------------------
// Local control plane

async fn start_local() -> Result<Inner, Error> {
    let binaries = binaries().await?;
    let mut attempt = 1;
    loop {
        match start_local_once(&binaries).await {
            Err(Error::Startup(message))
                if attempt < START_ATTEMPTS && message.contains("address already in use") =>
            {
                eprintln!("cutover-e2e: a port was taken meanwhile; starting again ({message})");
                attempt += 1;
            }
            result => return result,
        }
    }
}

const WORK_DIR_PREFIX: &str = "cutover-e2e-";
const OWNER_FILE: &str = "owner.pid";

async fn start_local_once(binaries: &Binaries) -> Result<Inner, Error> {
    remove_stale_work_dirs();
    let dir = tempfile::Builder::new()
        .prefix(WORK_DIR_PREFIX)
        .tempdir()
        .map_err(io_err("creating the control plane's temp dir"))?;
    let path = |name: &str| dir.path().join(name);
    let write = |name: &str, contents: &str| {
        std::fs::write(path(name), contents).map_err(io_err(format!("writing {name}")))
    };
    write(OWNER_FILE, &std::process::id().to_string())?;

    let certs = Certs::generate()?;
    write("ca.crt", &certs.ca)?;
    write("apiserver.crt", &certs.server_cert)?;
    write("apiserver.key", &certs.server_key)?;
    write("admin.crt", &certs.admin_cert)?;
    write("admin.key", &certs.admin_key)?;
    write("service-account.key", &certs.service_account_key)?;
    write("service-account.pub", &certs.service_account_pub)?;

    let etcd_client = free_port()?;
    let etcd_peer = free_port()?;
    let api_port = free_port()?;
    let etcd_url = format!("http://127.0.0.1:{etcd_client}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer}");
    let server = format!("https://127.0.0.1:{api_port}");

    let mut etcd = Command::new(&binaries.etcd);
    etcd.arg("--name=default")
        .arg(format!("--data-dir={}", path("etcd").display()))
        .arg(format!("--listen-client-urls={etcd_url}"))
        .arg(format!("--advertise-client-urls={etcd_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=default={peer_url}"))
        // Throw-away data: skip fsync, which is what makes etcd slow on shared CI disks.
        .arg("--unsafe-no-fsync=true");
    let etcd = Process::spawn("etcd", etcd, &path("etcd.log"))?;

    let mut apiserver = Command::new(&binaries.kube_apiserver);
    apiserver
        .arg(format!("--etcd-servers={etcd_url}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--secure-port={api_port}"))
        .arg(format!("--cert-dir={}", dir.path().display()))
        .arg(format!("--client-ca-file={}", path("ca.crt").display()))
        .arg(format!(
            "--tls-cert-file={}",
            path("apiserver.crt").display()
        ))
        .arg(format!(
            "--tls-private-key-file={}",
            path("apiserver.key").display()
        ))
        .arg(format!(
            "--service-account-key-file={}",
            path("service-account.pub").display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            path("service-account.key").display()
        ))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg("--authorization-mode=RBAC")
        // No controller-manager mints service accounts here; let pods etc. be created anyway.
        .arg("--disable-admission-plugins=ServiceAccount")
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg("--allow-privileged=true")
        // A loopback advertise address is not a valid Endpoints address; nothing here needs
        // the `kubernetes` service's endpoints.
        .arg("--endpoint-reconciler-type=none");
    let apiserver = Process::spawn("kube-apiserver", apiserver, &path("kube-apiserver.log"))?;

    let kubeconfig = path("kubeconfig");
    write("kubeconfig", &kubeconfig_yaml(&server, dir.path()))?;
    let local = LocalPlane {
        apiserver,
        etcd,
        server,
        kubeconfig: kubeconfig.clone(),
        dir,
    };

    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    wait_ready(&local, &config).await?;

    Ok(Inner {
        config,
        kubeconfig: Some(kubeconfig),
        kubectl: binaries.kubectl.clone(),
        local: Some(local),
    })
}

/// Removes the work dirs of test binaries that died without cleaning up (SIGKILL, Ctrl-C:
/// their etcd and kube-apiserver died with them, but nothing removed the files).
fn remove_stale_work_dirs() {
    // Liveness is read from /proc; without it (not Linux) leave everything alone.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_ours = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(WORK_DIR_PREFIX));
        let owner = std::fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        if let (true, Some(owner)) = (is_ours, owner)
            && !Path::new("/proc").join(owner.to_string()).exists()
        {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Polls `/readyz` until it answers `ok`, either process exits, or [`START_TIMEOUT`] passes.
async fn wait_ready(local: &LocalPlane, config: &kube::Config) -> Result<(), Error> {
    let client = kube::Client::try_from(config.clone())?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        for process in [&local.etcd, &local.apiserver] {
            if let Some(status) = process.exited() {
                return Err(startup_failure(
                    local,
                    format!(
                        "{} exited ({status}) before the API server became ready",
                        process.name
                    ),
                ));
            }
        }
        let request = http::Request::get("/readyz")
            .body(Vec::new())
            .expect("a valid request");
        let answer = match tokio::time::timeout(
            Duration::from_secs(5),
            client.request_text(request),
        )
        .await
        {
            Ok(Ok(body)) if body.trim() == "ok" => return Ok(()),
            Ok(Ok(body)) => body,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the request timed out".to_owned(),
        };
        if Instant::now() >= deadline {
            return Err(startup_failure(
                local,
                format!(
                    "{} not ready after {START_TIMEOUT:?}; last /readyz answer: {answer}",
                    local.server
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Builds the startup error with the tail of the process logs, and prints it right away too
/// (the temp dir holding the logs is removed when the error unwinds).
fn startup_failure(local: &LocalPlane, what: String) -> Error {
    let mut message = what;
    let mut logs = vec![("kube-apiserver", "kube-apiserver.log")];
    if local.etcd.exited().is_some() {
        logs.push(("etcd", "etcd.log"));
    }
    for (name, file) in logs {
        let text = std::fs::read_to_string(local.dir.path().join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        message.push_str(&format!(
            "\n--- last {LOG_TAIL_LINES} lines of the {name} log ---\n{tail}"
        ));
    }
    eprintln!("cutover-e2e: the control plane did not start: {message}");
    Error::Startup(message)
}

fn kubeconfig_yaml(server: &str, dir: &Path) -> String {
    // JSON strings are valid YAML double-quoted scalars, which takes care of any quoting.
    let quoted = |name: &str| {
        serde_json::to_string(&dir.join(name).to_string_lossy()).expect("strings serialize")
    };
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: cutover-e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: cutover-e2e-admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: cutover-e2e
  context:
    cluster: cutover-e2e
    user: cutover-e2e-admin
    namespace: default
current-context: cutover-e2e
",
        ca = quoted("ca.crt"),
        cert = quoted("admin.crt"),
        key = quoted("admin.key"),
    )
}

/// PEM files of one control plane: a CA, the API server's serving certificate, the admin's
/// client certificate (group `system:masters`) and the service-account signing key pair.
struct Certs {
    ca: String,
    server_cert: String,
    server_key: String,
    admin_cert: String,
    admin_key: String,
    service_account_key: String,
    service_account_pub: String,
}

impl Certs {
    fn generate() -> Result<Self, rcgen::Error> {
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = distinguished_name("cutover-e2e-ca", None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let server_key = KeyPair::generate()?;
        let mut server_params = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "10.0.0.1".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        server_params.distinguished_name = distinguished_name("kube-apiserver", None);
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server_params.use_authority_key_identifier_extension = true;
        let server_cert = server_params.signed_by(&server_key, &ca)?;

        let admin_key = KeyPair::generate()?;
        let mut admin_params = CertificateParams::default();
        admin_params.distinguished_name =
            distinguished_name("cutover-e2e-admin", Some("system:masters"));
        admin_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        admin_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        admin_params.use_authority_key_identifier_extension = true;
        let admin_cert = admin_params.signed_by(&admin_key, &ca)?;

        let service_account = KeyPair::generate()?;
        Ok(Self {
            ca: ca.pem(),
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            admin_cert: admin_cert.pem(),
            admin_key: admin_key.serialize_pem(),
            service_account_key: service_account.serialize_pem(),
            service_account_pub: service_account.public_key_pem(),
        })
    }
}

fn distinguished_name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    if let Some(organization) = organization {
        name.push(DnType::OrganizationName, organization);
    }
    name
}

/// A free loopback port, never the same one twice in this process (several control planes
/// may be starting at once). Another process can still grab it before our server binds it;
/// [`start_local`] retries then.
fn free_port() -> Result<u16, Error> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Mutex::default);
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_err("binding a free loopback port"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("reading a bound port"))?
            .port();
        if lock(handed_out).insert(port) {
            return Ok(port);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ----------------------------------------------------------------------------------------------
// Processes

/// A child process in its own process group, with stdout + stderr going to a log file.
/// Dropping it kills the group (SIGKILL) and reaps the child.
#[derive(Debug)]
struct Process {
    name: &'static str,
    pid: u32,
    child: Mutex<Child>,
}

impl Process {
    fn spawn(name: &'static str, mut command: Command, log: &Path) -> Result<Self, Error> {
        let out = File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("opening {}", log.display())))?;
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        die_with_this_process(&mut command);
        let child =
            spawn_from_long_lived_thread(command).map_err(io_err(format!("starting {name}")))?;
        Ok(Self {
            name,
            pid: child.id(),
            child: Mutex::new(child),
        })
    }

    /// The exit status if the process has ended.
    fn exited(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    fn kill(&self) {
        let mut child = lock(&self.child);
        // Only signal a group we have not reaped yet: after `wait` the id may be reused.
        if let Ok(None) = child.try_wait() {
            kill_process_group(self.pid);
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `command` from one thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, not the process, and
/// libtest runs every test on its own short-lived thread; spawning the shared control plane
/// there would kill it as soon as the first test finished.
fn spawn_from_long_lived_thread(command: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::SyncSender<io::Result<Child>>);
    static SPAWNER: OnceLock<io::Result<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("cutover-e2e-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })?;
        Ok(requests)
    });
    let spawner = spawner
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), format!("starting the spawner thread: {e}")))?;
    let (reply, answer) = mpsc::sync_channel(1);
    spawner
        .send((command, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawner thread gave no answer"))?
}

/// Makes the kernel SIGKILL the child when this process dies, however it dies (a panic that
/// aborts, SIGKILL, Ctrl-C): no etcd or kube-apiserver outlives the test binary.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn die_with_this_process(command: &mut Command) {
    let parent = libc::pid_t::try_from(std::process::id()).expect("pids fit in pid_t");
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe system calls prctl(2) and getppid(2); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn die_with_this_process(_command: &mut Command) {}

#[allow(unsafe_code)]
fn kill_process_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// Runs `f` when the process exits normally (libtest returns from `main` or calls `exit`),
/// which is where the shared control plane's temp dir gets removed.
#[allow(unsafe_code)]
fn at_exit(f: fn()) {
    static HOOKS: Mutex<Vec<fn()>> = Mutex::new(Vec::new());
    extern "C" fn run_hooks() {
        for hook in lock(&HOOKS).drain(..) {
            hook();
        }
    }
    let mut hooks = lock(&HOOKS);
    if hooks.is_empty() {
        // SAFETY: `run_hooks` is a plain `extern "C" fn()` that stays valid for the whole
        // process; atexit(3) only records it.
        unsafe {
            libc::atexit(run_hooks);
        }
    }
    hooks.push(f);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_prefixes_are_dns_labels() {
        assert_eq!(dns_label_prefix("Plan_Apply"), "plan-apply");
        assert_eq!(dns_label_prefix("--x--"), "x");
        assert_eq!(dns_label_prefix("!!!"), "e2e");
        assert_eq!(dns_label_prefix(&"a".repeat(80)).len(), 40);
    }

    #[test]
    fn certificates_are_generated() {
        let certs = Certs::generate().unwrap();
        assert!(certs.ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(certs.admin_key.contains("PRIVATE KEY"));
        assert!(certs.service_account_pub.contains("PUBLIC KEY"));
    }

    #[test]
    fn kubeconfig_parses() {
        let yaml = kubeconfig_yaml("https://127.0.0.1:6443", Path::new("/tmp/a \"b\""));
        let config = Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(config.current_context.as_deref(), Some("cutover-e2e"));
        let user = config.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.client_key.as_deref(), Some("/tmp/a \"b\"/admin.key"));
    }
}
