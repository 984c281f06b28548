//! The operator as a real process in e2e tests: started from the workspace's `cutover` binary
//! against a control plane, its log kept in a file, its metrics scraped over HTTP, and on a
//! failing test the CR, the Events and the log dumped.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ControlPlane;

/// Polls `check` until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `cutover` binary of this workspace: `CUTOVER_BIN` when set, else `target/<profile>/cutover`
/// found from this executable (a test binary in `target/<profile>/deps`, or a binary beside it).
pub fn cutover_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CUTOVER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the running binary knows its path");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("cutover"))
        .collect();
    candidates
        .iter()
        .find(|bin| bin.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no cutover binary at {candidates:?}: build it first (`cargo build -p cutover-operator`, which `make test` does)"
            )
        })
}

/// One running operator.
#[derive(Debug)]
pub struct OperatorProcess {
    child: Child,
    log: PathBuf,
    metrics_port: u16,
    _dir: tempfile::TempDir,
}

impl OperatorProcess {
    /// Starts `cutover run` watching `namespace`, with its leader Lease in that namespace, as
    /// replica `instance`. `extra` flags are appended.
    pub fn start(
        plane: &ControlPlane,
        namespace: &str,
        instance: &str,
        extra: &[&str],
    ) -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join(format!("operator-{instance}.log"));
        let metrics_port = free_port()?;
        let mut cmd = Command::new(cutover_binary());
        cmd.args([
            "run",
            "--namespace",
            namespace,
            "--lease-namespace",
            namespace,
        ])
        .args(["--instance", instance])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .args(extra)
        .env("CUTOVER_LOG", "info,cutover_operator=debug")
        .stdin(Stdio::null())
        .stdout(File::create(&log)?)
        .stderr(File::options().append(true).open(&log)?);
        if let Some(kubeconfig) = plane.kubeconfig_path() {
            cmd.env("KUBECONFIG", kubeconfig);
        }
        let child = cmd.spawn()?;
        Ok(Self {
            child,
            log,
            metrics_port,
            _dir: dir,
        })
    }

    /// The operator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /metrics`; empty while the endpoint is not up yet.
    pub async fn metrics(&self) -> String {
        let port = self.metrics_port;
        tokio::task::spawn_blocking(move || http_get(port, "/metrics").unwrap_or_default())
            .await
            .unwrap_or_default()
    }

    /// SIGKILL: the process dies without any cleanup, as in a node failure.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process stops where it is (a replica frozen by its node, a long GC pause)
    /// and holds on to whatever it was doing.
    pub fn pause(&self) {
        signal(self.child.id() as libc::pid_t, libc::SIGSTOP);
    }

    /// SIGCONT after [`pause`](Self::pause): the process carries on from where it stopped.
    pub fn resume(&self) {
        signal(self.child.id() as libc::pid_t, libc::SIGCONT);
    }

    /// SIGTERM, then waits up to 30 s for the exit code.
    pub fn terminate(&mut self) -> Result<Option<i32>, String> {
        let pid = self.child.id() as libc::pid_t;
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err(format!(
                    "no exit within 30 s of SIGTERM; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A guard that, if the test panics, prints the namespace's DatabaseCutovers, Events and
    /// this operator's log.
    pub fn dump_on_panic(&self, plane: &ControlPlane, namespace: &str) -> DumpOnPanic {
        DumpOnPanic {
            plane: plane.clone(),
            namespace: namespace.to_owned(),
            log: self.log.clone(),
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// See [`OperatorProcess::dump_on_panic`].
#[derive(Debug)]
pub struct DumpOnPanic {
    plane: ControlPlane,
    namespace: String,
    log: PathBuf,
}

impl Drop for DumpOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut report = String::new();
        for args in [
            vec![
                "get",
                "databasecutovers",
                "-o",
                "yaml",
                "-n",
                &self.namespace,
            ],
            vec![
                "get",
                "events",
                "-n",
                &self.namespace,
                "--sort-by=.metadata.creationTimestamp",
            ],
        ] {
            if let Ok(out) = self.plane.kubectl(&args).output() {
                report.push_str(&format!(
                    "\n--- kubectl {}\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        report.push_str(&format!("\n--- operator log {}\n{log}", self.log.display()));
        eprintln!("{report}");
    }
}

fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we spawned and still own; no memory is shared.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, sig);
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}
