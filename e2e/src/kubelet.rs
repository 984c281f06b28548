//! A stand-in for the kubelet and the Job controller, which the test bed does not run: it
//! watches the Jobs of one namespace and runs each new Job's single container as a local
//! process, then writes the Job's status through the status subresource the way the Job
//! controller does — `startTime`, `active`, retries up to `backoffLimit`, the
//! `activeDeadlineSeconds` limit, and the terminal conditions a v1.34 API server insists on
//! (`SuccessCriteriaMet` + `Complete` with `completionTime`; `FailureTarget` + `Failed`).
//!
//! Only images it can map to a local binary run — by default this project's own image, mapped
//! to the workspace's `cutover` binary, whose entrypoint it is. What it cannot do faithfully
//! (another image, a second container, a volume other than a ConfigMap or a Secret, `envFrom`,
//! `fieldRef`) marks the Job Failed with reason `UnsupportedByStandIn` and a message saying
//! what, rather than pretending.
//!
//! ConfigMap and Secret volumes are written as files into a folder per Job, and every mount
//! path is rewritten to that folder wherever it appears in the command, the arguments and the
//! environment values, as a whole path: `/migrations` and `--dir=/migrations/x` are rewritten,
//! `/migrations-old` and `/data/migrations` are not. The process sees only the container's
//! environment plus `PATH` and `HOME` (the Job's folder). The pod's security context,
//! resources and image pull policy are not applied: the process runs as the test's user.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobSpec, JobStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, Secret, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::operator::cutover_binary;

/// The image the operator's migration Jobs run when the cutover names none: the operator's
/// default `--image` (`ghcr.io/dbops/cutover:<version>`; this crate shares the workspace's
/// version).
pub const CUTOVER_IMAGE: &str = concat!("ghcr.io/dbops/cutover:", env!("CARGO_PKG_VERSION"));
/// The Failed reason when the stand-in cannot run what the pod template asks for.
pub const UNSUPPORTED: &str = "UnsupportedByStandIn";
/// The Failed reason when a referenced Secret, ConfigMap or key is missing; a real kubelet
/// would keep the pod waiting in `CreateContainerConfigError` until the deadline.
pub const CONFIG_ERROR: &str = "CreateContainerConfigError";

/// Output lines kept per run.
const TAIL_LINES: usize = 200;
/// Output lines quoted in a failed Job's condition message: the process's last word (for
/// `cutover`, the error it exits with).
const MESSAGE_LINES: usize = 1;
/// At most this many characters of output in the condition message.
const MESSAGE_CHARS: usize = 1500;
/// The Job controller's default `backoffLimit`.
const DEFAULT_BACKOFF_LIMIT: i32 = 6;
/// Delay before the first retry, doubling after each (the Job controller starts at 10 s; the
/// tests need no such pause).
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The running stand-in. Dropping it stops the watch and SIGKILLs the processes it started.
pub struct Kubelet {
    task: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shared {
    /// Processes running now.
    pids: Mutex<HashSet<u32>>,
    /// Per Job name: what each run printed (its last lines) and what the stand-in did.
    logs: Mutex<BTreeMap<String, String>>,
}

impl Shared {
    fn note(&self, job: &str, text: &str) {
        let mut logs = lock(&self.logs);
        let log = logs.entry(job.to_owned()).or_default();
        log.push_str(text);
        if !text.ends_with('\n') {
            log.push('\n');
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Context {
    client: Client,
    namespace: String,
    images: BTreeMap<String, PathBuf>,
    shared: Arc<Shared>,
}

impl Kubelet {
    /// Runs the Jobs of `namespace` whose image is [`CUTOVER_IMAGE`] with the workspace's
    /// `cutover` binary (see [`cutover_binary`]).
    pub fn start(client: Client, namespace: &str) -> Self {
        Self::with_images(
            client,
            namespace,
            BTreeMap::from([(CUTOVER_IMAGE.to_owned(), cutover_binary())]),
        )
    }

    /// Runs the Jobs of `namespace`, each image mapped to the local binary that is its
    /// entrypoint. Jobs with any other image fail.
    pub fn with_images(client: Client, namespace: &str, images: BTreeMap<String, PathBuf>) -> Self {
        let shared = Arc::new(Shared::default());
        let ctx = Arc::new(Context {
            client,
            namespace: namespace.to_owned(),
            images,
            shared: Arc::clone(&shared),
        });
        Self {
            task: tokio::spawn(watch(ctx)),
            shared,
        }
    }

    /// The processes running now.
    pub fn pids(&self) -> Vec<u32> {
        lock(&self.shared.pids).iter().copied().collect()
    }

    /// What the runs of Job `job` printed (the last lines of each) and what the stand-in did
    /// with it; empty when it never saw the Job.
    pub fn output(&self, job: &str) -> String {
        lock(&self.shared.logs)
            .get(job)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for pid in lock(&self.shared.pids).drain() {
            kill(pid);
        }
        self.task.abort();
        if std::thread::panicking() {
            let mut report = String::new();
            for (job, log) in lock(&self.shared.logs).iter() {
                report.push_str(&format!("\n--- Job {job} (kubelet stand-in)\n{log}"));
            }
            eprint!("{report}");
        }
    }
}

#[allow(unsafe_code)]
fn kill(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Follows the namespace's Jobs and starts a run for each unfinished one seen for the first
/// time; a deleted Job's run is stopped (its process killed).
async fn watch(ctx: Arc<Context>) {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let events = watcher(api, watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    // Dropped with this future: aborting the watch aborts every run.
    let mut runs = JoinSet::new();
    let mut started: HashMap<String, AbortHandle> = HashMap::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(job) | watcher::Event::InitApply(job)) => {
                let Some(uid) = job.uid() else { continue };
                if started.contains_key(&uid) || finished(&job) || suspended(&job) {
                    continue;
                }
                started.insert(uid, runs.spawn(run_job(Arc::clone(&ctx), job)));
            }
            Ok(watcher::Event::Delete(job)) => {
                if let Some(run) = job.uid().and_then(|uid| started.get(&uid)) {
                    run.abort();
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("kubelet stand-in: watching Jobs in {}: {e}", ctx.namespace),
        }
        while runs.try_join_next().is_some() {}
    }
}

fn condition_true(job: &Job, types: &[&str]) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| types.contains(&c.type_.as_str()) && c.status == "True")
        })
}

fn finished(job: &Job) -> bool {
    condition_true(job, &["Complete", "Failed"])
}

fn suspended(job: &Job) -> bool {
    job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false)
}

/// Why a Job was not run.
struct Refusal {
    reason: &'static str,
    message: String,
}

fn unsupported(message: impl Into<String>) -> Refusal {
    Refusal {
        reason: UNSUPPORTED,
        message: message.into(),
    }
}

fn config_error(message: impl Into<String>) -> Refusal {
    Refusal {
        reason: CONFIG_ERROR,
        message: message.into(),
    }
}

/// The container resolved to a local process.
struct Prepared {
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    home: PathBuf,
}

/// How one run ended.
enum Ran {
    Succeeded,
    Failed { tail: Vec<String> },
    DeadlineExceeded { tail: Vec<String> },
}

/// How the Job ends, in the Job controller's words.
enum Finish {
    Complete,
    Failed { reason: String, message: String },
}

/// Runs one Job: prepares its container, runs it up to `backoffLimit + 1` times within
/// `activeDeadlineSeconds`, and records every step in the Job's status.
async fn run_job(ctx: Arc<Context>, job: Job) {
    let name = job.name_any();
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let spec = job.spec.clone().unwrap_or_default();
    let before = job.status.clone().unwrap_or_default();
    // The API server refuses to move a running Job's startTime.
    let start = before
        .start_time
        .clone()
        .unwrap_or_else(|| Time(Timestamp::now()));
    let deadline = spec.active_deadline_seconds.map(|limit| {
        let ran = Timestamp::now().duration_since(start.0).as_secs().max(0);
        let left = u64::try_from(limit.saturating_sub(ran)).unwrap_or(0);
        Instant::now() + Duration::from_secs(left)
    });
    let mut failed = before.failed.unwrap_or(0);
    let record = |status: JobStatus| {
        let api = api.clone();
        let name = name.clone();
        let shared = Arc::clone(&ctx.shared);
        async move {
            let patch = serde_json::json!({ "status": status });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => true,
                Err(e) => {
                    let text = format!("the API server refused the status of Job {name}: {e}");
                    eprintln!("kubelet stand-in: {text}");
                    shared.note(&name, &text);
                    false
                }
            }
        }
    };

    let dir = match tempfile::Builder::new()
        .prefix("cutover-e2e-job-")
        .tempdir()
    {
        Ok(dir) => dir,
        Err(e) => {
            ctx.shared
                .note(&name, &format!("failed to make the Job's folder: {e}"));
            return;
        }
    };
    if !record(running(&start, failed)).await {
        return;
    }
    let prepared = match prepare(&ctx, &spec, dir.path()).await {
        Ok(p) => p,
        Err(refusal) => {
            ctx.shared.note(
                &name,
                &format!("not run: {}: {}", refusal.reason, refusal.message),
            );
            let finish = Finish::Failed {
                reason: refusal.reason.to_owned(),
                message: refusal.message,
            };
            record(terminal(&start, failed, &finish)).await;
            return;
        }
    };

    let backoff_limit = spec.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT);
    let mut delay = FIRST_RETRY_DELAY;
    let finish = loop {
        let tail = match run_container(&ctx.shared, &name, &prepared, deadline, failed + 1).await {
            Ran::Succeeded => break Finish::Complete,
            Ran::DeadlineExceeded { tail } => {
                failed += 1;
                break deadline_exceeded(&tail);
            }
            Ran::Failed { tail } => {
                failed += 1;
                tail
            }
        };
        if failed > backoff_limit {
            break Finish::Failed {
                reason: "BackoffLimitExceeded".into(),
                message: with_output("Job has reached the specified backoff limit", &tail),
            };
        }
        if !record(between_runs(&start, failed)).await {
            return;
        }
        // The pause before the next pod, within the deadline.
        let pause = tokio::time::sleep(delay);
        let in_time = match deadline {
            Some(d) => tokio::time::timeout_at(d, pause).await.is_ok(),
            None => {
                pause.await;
                true
            }
        };
        if !in_time {
            break deadline_exceeded(&tail);
        }
        delay *= 2;
        if !record(running(&start, failed)).await {
            return;
        }
    };
    let text = match &finish {
        Finish::Complete => "Complete".to_owned(),
        Finish::Failed { reason, .. } => format!("Failed: {reason}"),
    };
    ctx.shared.note(&name, &format!("--- Job {text}"));
    record(terminal(&start, failed, &finish)).await;
}

fn deadline_exceeded(tail: &[String]) -> Finish {
    Finish::Failed {
        reason: "DeadlineExceeded".into(),
        message: with_output("Job was active longer than specified deadline", tail),
    }
}

/// The controller's message, then the run's last lines (the real Job controller does not quote
/// them; the operator's abort message then names the failure without a trip to the pod log).
fn with_output(message: &str, tail: &[String]) -> String {
    let lines: Vec<&str> = tail
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return message.to_owned();
    }
    let quoted = lines[lines.len().saturating_sub(MESSAGE_LINES)..].join("\n");
    let skip = quoted.chars().count().saturating_sub(MESSAGE_CHARS);
    let quoted: String = quoted.chars().skip(skip).collect();
    format!("{message}; the container's last output:\n{quoted}")
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn running(start: &Time, failed: i32) -> JobStatus {
    JobStatus {
        start_time: Some(start.clone()),
        active: Some(1),
        ready: Some(1),
        terminating: Some(0),
        succeeded: Some(0),
        failed: Some(failed),
        ..JobStatus::default()
    }
}

fn between_runs(start: &Time, failed: i32) -> JobStatus {
    JobStatus {
        active: Some(0),
        ready: Some(0),
        ..running(start, failed)
    }
}

/// The terminal status. The API server (v1.34, JobManagedBy on) requires `Complete` to come
/// with `SuccessCriteriaMet` and a `completionTime` not before `startTime`, `Failed` with
/// `FailureTarget` and no `completionTime`, and neither with active or terminating pods.
fn terminal(start: &Time, failed: i32, finish: &Finish) -> JobStatus {
    let at = now();
    let condition = |type_: &str, reason: &str, message: &str| JobCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(at.clone()),
        last_transition_time: Some(at.clone()),
    };
    let base = JobStatus {
        active: Some(0),
        ready: Some(0),
        ..running(start, failed)
    };
    match finish {
        Finish::Complete => {
            let (reason, message) = (
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            );
            JobStatus {
                succeeded: Some(1),
                completion_time: Some(at.clone()),
                conditions: Some(vec![
                    condition("SuccessCriteriaMet", reason, message),
                    condition("Complete", reason, message),
                ]),
                ..base
            }
        }
        Finish::Failed { reason, message } => JobStatus {
            conditions: Some(vec![
                condition("FailureTarget", reason, message),
                condition("Failed", reason, message),
            ]),
            ..base
        },
    }
}

/// Resolves the pod template's one container to a local process: the binary its image maps
/// to, its environment, and its ConfigMap and Secret volumes as files under `dir`.
async fn prepare(ctx: &Context, spec: &JobSpec, dir: &Path) -> Result<Prepared, Refusal> {
    let pod = spec
        .template
        .spec
        .as_ref()
        .ok_or_else(|| unsupported("the Job's pod template has no spec"))?;
    if pod.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(unsupported("init containers are not run by the stand-in"));
    }
    let [container] = pod.containers.as_slice() else {
        return Err(unsupported(format!(
            "the pod has {} containers; the stand-in runs exactly one",
            pod.containers.len()
        )));
    };
    let image = container.image.as_deref().unwrap_or_default();
    let binary = ctx.images.get(image).ok_or_else(|| {
        let known: Vec<&str> = ctx.images.keys().map(String::as_str).collect();
        unsupported(format!(
            "image {image:?} is not mapped to a local binary (mapped: {})",
            known.join(", ")
        ))
    })?;

    let mut volumes = BTreeMap::new();
    for volume in pod.volumes.iter().flatten() {
        let local = dir.join("volumes").join(&volume.name);
        materialise(ctx, volume, &local).await?;
        volumes.insert(volume.name.as_str(), local);
    }
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let base = volumes.get(m.name.as_str()).ok_or_else(|| {
            unsupported(format!(
                "volumeMount {:?} names no volume of the pod",
                m.name
            ))
        })?;
        let local = match m.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => base.join(sub),
            _ => base.clone(),
        };
        let path = m.mount_path.trim_end_matches('/');
        if path.is_empty() {
            return Err(unsupported("a volume mounted at / cannot be rewritten"));
        }
        mounts.push((path.to_owned(), local));
    }
    // Longest first, so that a mount inside another one wins.
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));

    let env = environment(ctx, container, &mounts).await?;
    let (program, mut args) = match container.command.as_deref() {
        None | Some([]) => (binary.clone(), Vec::new()),
        Some([first, rest @ ..]) => {
            if Path::new(first).file_name() != binary.file_name() {
                return Err(unsupported(format!(
                    "command {first:?} is not in image {image:?}: the stand-in runs only its \
                     entrypoint {}",
                    binary.display()
                )));
            }
            (binary.clone(), rest.to_vec())
        }
    };
    args.extend(container.args.iter().flatten().cloned());
    let args = args
        .iter()
        .map(|a| rewrite_paths(&expand(a, &env), &mounts))
        .collect();
    Ok(Prepared {
        program,
        args,
        env,
        home: dir.to_path_buf(),
    })
}

/// The container's `env`, in order (a `value` may refer to earlier variables as `$(NAME)`).
async fn environment(
    ctx: &Context,
    container: &Container,
    mounts: &[(String, PathBuf)],
) -> Result<BTreeMap<String, String>, Refusal> {
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(unsupported("envFrom is not supported by the stand-in"));
    }
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => expand(var.value.as_deref().unwrap_or_default(), &env),
            Some(source) => {
                let (kind, found, optional) = if let Some(r) = &source.secret_key_ref {
                    let found = secret(ctx, &r.name)
                        .await?
                        .and_then(|data| data.get(&r.key).cloned());
                    (
                        format!("key {:?} of Secret {}", r.key, r.name),
                        found,
                        r.optional,
                    )
                } else if let Some(r) = &source.config_map_key_ref {
                    let found = config_map(ctx, &r.name)
                        .await?
                        .and_then(|data| data.get(&r.key).cloned());
                    (
                        format!("key {:?} of ConfigMap {}", r.key, r.name),
                        found,
                        r.optional,
                    )
                } else {
                    return Err(unsupported(format!(
                        "env {}: only value, secretKeyRef and configMapKeyRef are supported",
                        var.name
                    )));
                };
                match found {
                    Some(bytes) => String::from_utf8(bytes).map_err(|_| {
                        config_error(format!("env {}: {kind} is not UTF-8 text", var.name))
                    })?,
                    None if optional == Some(true) => continue,
                    None => {
                        return Err(config_error(format!(
                            "env {}: {kind} does not exist",
                            var.name
                        )));
                    }
                }
            }
        };
        env.insert(var.name.clone(), rewrite_paths(&value, mounts));
    }
    Ok(env)
}

/// A Secret's data; `None` when it does not exist.
async fn secret(ctx: &Context, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, Refusal> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(|e| config_error(format!("failed to read Secret {name}: {e}")))?;
    Ok(secret.map(|s| {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, ByteString(v))| (k, v))
            .collect()
    }))
}

/// A ConfigMap's data and binaryData; `None` when it does not exist.
async fn config_map(
    ctx: &Context,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, Refusal> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let cm = api
        .get_opt(name)
        .await
        .map_err(|e| config_error(format!("failed to read ConfigMap {name}: {e}")))?;
    Ok(cm.map(|cm| {
        let mut data: BTreeMap<String, Vec<u8>> = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        data.extend(
            cm.binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, ByteString(v))| (k, v)),
        );
        data
    }))
}

/// Writes a ConfigMap or Secret volume's keys as files under `local`, as the kubelet projects
/// them (every key, or only `items` at their paths; `defaultMode` or 0644).
async fn materialise(ctx: &Context, volume: &Volume, local: &Path) -> Result<(), Refusal> {
    let (what, data, items, default_mode, optional) = if let Some(cm) = &volume.config_map {
        (
            format!("ConfigMap {}", cm.name),
            config_map(ctx, &cm.name).await?,
            cm.items.as_deref(),
            cm.default_mode,
            cm.optional,
        )
    } else if let Some(s) = &volume.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        (
            format!("Secret {name}"),
            secret(ctx, &name).await?,
            s.items.as_deref(),
            s.default_mode,
            s.optional,
        )
    } else {
        return Err(unsupported(format!(
            "volume {:?} is of a type the stand-in cannot provide (only configMap and secret)",
            volume.name
        )));
    };
    let optional = optional == Some(true);
    let data = match data {
        Some(data) => data,
        None if optional => BTreeMap::new(),
        None => {
            return Err(config_error(format!(
                "volume {:?}: {what} does not exist",
                volume.name
            )));
        }
    };
    let files: Vec<(&str, &str, Option<i32>)> = match items {
        Some(items) => items
            .iter()
            .map(|KeyToPath { key, path, mode }| (key.as_str(), path.as_str(), *mode))
            .collect(),
        None => data
            .keys()
            .map(|k| (k.as_str(), k.as_str(), None))
            .collect(),
    };
    let io = |e: std::io::Error| {
        config_error(format!(
            "volume {:?}: failed to write {what} as files: {e}",
            volume.name
        ))
    };
    std::fs::create_dir_all(local).map_err(io)?;
    for (key, path, mode) in files {
        let Some(bytes) = data.get(key) else {
            if optional {
                continue;
            }
            return Err(config_error(format!(
                "volume {:?}: {what} has no key {key:?}",
                volume.name
            )));
        };
        let file = local.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&file, bytes).map_err(io)?;
        let mode = mode.or(default_mode).unwrap_or(0o644);
        let mode = u32::try_from(mode).unwrap_or(0o644);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    Ok(())
}

/// Kubernetes' `$(NAME)` expansion in commands, arguments and env values: a defined variable is
/// replaced, an undefined reference stays as written, `$$` is a literal `$`.
fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(')
            && let Some(end) = tail.find(')')
        {
            let name = &tail[..end];
            match env.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn is_path_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '/' | '.' | '-' | '_')
}

/// Replaces each mount path (longest first) by its local folder where it appears as a whole
/// path: not preceded by a path character, and followed by `/`, a non-path character or the
/// end.
fn rewrite_paths(text: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    'scan: while let Some(c) = text[i..].chars().next() {
        let at_start = text[..i]
            .chars()
            .next_back()
            .is_none_or(|p| !is_path_char(p));
        if at_start {
            for (mount, local) in mounts {
                if let Some(after) = text[i..].strip_prefix(mount.as_str())
                    && after
                        .chars()
                        .next()
                        .is_none_or(|n| n == '/' || !is_path_char(n))
                {
                    out.push_str(&local.to_string_lossy());
                    i += mount.len();
                    continue 'scan;
                }
            }
        }
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Removes a pid from the running set when the run ends, however it ends.
struct Registered<'a> {
    shared: &'a Shared,
    pid: Option<u32>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            lock(&self.shared.pids).remove(&pid);
        }
    }
}

/// One run of the container, killed at the deadline.
async fn run_container(
    shared: &Shared,
    job: &str,
    p: &Prepared,
    deadline: Option<Instant>,
    attempt: i32,
) -> Ran {
    let mut cmd = tokio::process::Command::new(&p.program);
    cmd.args(&p.args)
        .env_clear()
        .envs(&p.env)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &p.home)
        .current_dir(&p.home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    crate::die_with_this_process(cmd.as_std_mut());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let line = format!("failed to start {}: {e}", p.program.display());
            shared.note(job, &format!("--- run {attempt}: {line}"));
            return Ran::Failed { tail: vec![line] };
        }
    };
    let _registered = Registered {
        shared,
        pid: child.id().inspect(|pid| {
            lock(&shared.pids).insert(*pid);
        }),
    };
    let lines = Mutex::new(VecDeque::new());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let run = async {
        let (status, (), ()) = tokio::join!(
            child.wait(),
            collect(stdout, &lines),
            collect(stderr, &lines)
        );
        status
    };
    let status: Option<std::io::Result<ExitStatus>> = match deadline {
        Some(d) => tokio::time::timeout_at(d, run).await.ok(),
        None => Some(run.await),
    };
    if status.is_none() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    let tail: Vec<String> = lock(&lines).iter().cloned().collect();
    let how = match &status {
        None => "killed at the Job's activeDeadlineSeconds".to_owned(),
        Some(Ok(s)) => s.to_string(),
        Some(Err(e)) => format!("lost: {e}"),
    };
    shared.note(
        job,
        &format!("--- run {attempt}: {how}\n{}", tail.join("\n")),
    );
    match status {
        None => Ran::DeadlineExceeded { tail },
        Some(Ok(s)) if s.success() => Ran::Succeeded,
        Some(_) => Ran::Failed { tail },
    }
}

/// Keeps the last [`TAIL_LINES`] lines of a pipe.
async fn collect(pipe: Option<impl AsyncRead + Unpin>, lines: &Mutex<VecDeque<String>>) {
    let Some(pipe) = pipe else { return };
    let mut reader = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        let mut lines = lock(lines);
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_like_kubernetes() {
        let env = BTreeMap::from([("A".to_owned(), "x".to_owned())]);
        assert_eq!(expand("$(A)/$(B)", &env), "x/$(B)");
        assert_eq!(expand("$$(A) $5 $(A", &env), "$(A) $5 $(A");
        assert_eq!(expand("", &env), "");
    }

    #[test]
    fn rewrites_whole_mount_paths_only() {
        let mounts = vec![
            ("/etc/cutover/ca".to_owned(), PathBuf::from("/tmp/j/ca")),
            ("/migrations".to_owned(), PathBuf::from("/tmp/j/m")),
        ];
        assert_eq!(rewrite_paths("/migrations", &mounts), "/tmp/j/m");
        assert_eq!(
            rewrite_paths("--dir=/migrations/V1.sql", &mounts),
            "--dir=/tmp/j/m/V1.sql"
        );
        assert_eq!(
            rewrite_paths("sslrootcert=/etc/cutover/ca/ca.crt&x", &mounts),
            "sslrootcert=/tmp/j/ca/ca.crt&x"
        );
        assert_eq!(
            rewrite_paths("/migrations-old /data/migrations", &mounts),
            "/migrations-old /data/migrations"
        );
    }

    #[test]
    fn quotes_the_last_lines_of_output() {
        let tail: Vec<String> = (1..=10).map(|i| format!("line {i}")).collect();
        let m = with_output("Job has reached the specified backoff limit", &tail);
        assert!(m.starts_with("Job has reached the specified backoff limit; "));
        assert!(m.ends_with(":\nline 10"), "{m}");
        let long = vec!["x".repeat(5000), String::new()];
        assert_eq!(
            with_output("m", &long).chars().count(),
            1500 + "m; the container's last output:\n".len()
        );
        assert_eq!(with_output("m", &[]), "m");
    }
}
