//! The command-line tools the tests run where a user would: `helm` (built from its Go module at
//! a pinned version by `hack/go-tool.sh`, cached per user like the control plane) and
//! `promtool` (Debian's `prometheus` package, installed by `hack/install-deps.sh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate sits in the workspace")
        .to_path_buf()
}

/// The chart's folder.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/cutover-operator")
}

/// Path of a cached Go tool (`crane`, `helm`), built on first use by `hack/go-tool.sh`, whose
/// progress shows on stderr. Resolved once per process.
pub fn go_tool(name: &'static str) -> Result<PathBuf, String> {
    static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static CRANE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let cell = match name {
        "helm" => &HELM,
        "crane" => &CRANE,
        other => return Err(format!("no Go tool named {other}")),
    };
    cell.get_or_init(|| {
        let path = go_tool_script(name)?;
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "hack/go-tool.sh {name} printed {}, which is no file",
                path.display()
            ))
        }
    })
    .clone()
}

/// The folder holding the Prometheus Operator's ServiceMonitor and PrometheusRule CRDs, from
/// its Go module at the version `hack/go-tool.sh` pins (downloaded once, cached per user).
pub fn prometheus_operator_crds() -> Result<PathBuf, String> {
    static CRDS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CRDS.get_or_init(|| {
        let dir = go_tool_script("prometheus-operator-crds")?;
        if dir
            .join("monitoring.coreos.com_servicemonitors.yaml")
            .is_file()
        {
            Ok(dir)
        } else {
            Err(format!("{} holds no ServiceMonitor CRD", dir.display()))
        }
    })
    .clone()
}

/// Runs `hack/go-tool.sh NAME`; the path it printed last.
fn go_tool_script(name: &str) -> Result<PathBuf, String> {
    {
        let script = repo_root().join("hack/go-tool.sh");
        let output = Command::new("bash")
            .arg(&script)
            .arg(name)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} {name} failed ({}); its output is above",
                script.display(),
                output.status
            ));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| format!("{} {name} printed no path", script.display()))
    }
}

/// A `helm` command with its own cache, config and data folders (per process, so tests leave
/// nothing in the user's helm setup), aimed at `kubeconfig` when one is given.
pub fn helm(kubeconfig: Option<&Path>) -> Command {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    let home = HOME.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("cutover-e2e-helm-")
            .tempdir()
            .expect("creating helm's home folder")
    });
    let bin = go_tool("helm").unwrap_or_else(|e| panic!("helm is needed: {e}"));
    let mut cmd = Command::new(bin);
    for (var, sub) in [
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ] {
        cmd.env(var, home.path().join(sub));
    }
    if let Some(kubeconfig) = kubeconfig {
        cmd.env("KUBECONFIG", kubeconfig);
    }
    cmd
}

/// `promtool` from `PATH` (Debian's `prometheus` package).
pub fn promtool() -> Command {
    Command::new("promtool")
}

/// Runs a command, returning its stdout; a failure is an error carrying the command line, the
/// exit status and both outputs.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let output: Output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
