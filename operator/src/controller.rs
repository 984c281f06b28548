//! The kube-runtime controller: observe → plan → act → patch status.
//!
//! Each reconcile is a short pipeline. The finalizer helper routes live objects to [`apply`] and
//! deleted ones to [`cleanup`]; the status is computed as plain data, compared with what the
//! object already has, and written with server-side apply under one field manager only when it
//! changed, so the operator never triggers itself. Phase changes are announced with an Event.
//! Only the replica holding the leader Lease reconciles.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use kube_lease_manager::{LeaseCreateMode, LeaseManagerBuilder};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::api::conditions::Reason;
use crate::api::{DatabaseCutover, DatabaseCutoverStatus, FINALIZER, Phase, ValidSpec};
use crate::engine::{Databases, Engine, Sink};
use crate::metrics::{self, Health, Metrics};
use crate::plan;
use crate::platform::{KubePlatform, read_dsn, read_secret_key};
use crate::postgres::ConnectOptions;

/// The field manager the operator writes status with.
pub const FIELD_MANAGER: &str = "cutover-operator";

/// What can go wrong in one reconcile.
#[derive(Debug, Error)]
pub enum Error {
    /// The API server refused or could not be reached.
    #[error("failed to talk to the Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("failed to manage the finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    /// The object is cluster-scoped, which the CRD does not allow.
    #[error("failed to reconcile: the DatabaseCutover has no namespace")]
    NoNamespace,
    /// A connection Secret could not be read.
    #[error(transparent)]
    Secret(#[from] crate::platform::SecretError),
    /// The spec does not pass the admission rules (stored before a stricter schema, or
    /// admission bypassed): nothing is done until it changes.
    #[error(transparent)]
    InvalidSpec(#[from] crate::api::InvalidSpec),
    /// The status was written by someone else since it was read (the write was fenced).
    #[error("failed to write the status: the object changed since it was read")]
    Conflict,
    /// Another replica holds the leader Lease.
    #[error("failed to act: another replica holds the leader Lease")]
    NotLeader,
    /// The cleanup of a deleted cutover failed; it is retried.
    #[error("failed to clean up: {0}")]
    Cleanup(#[source] crate::engine::ActionError),
}

impl Error {
    /// A short label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApi",
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.category()
                }
                _ => "Finalizer",
            },
            Error::NoNamespace => "InvalidObject",
            Error::Secret(_) => "SecretUnreadable",
            Error::Conflict => "Conflict",
            Error::NotLeader => "NotLeader",
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::Cleanup(e) => e.category().as_str(),
        }
    }
}

/// Shared state of the reconcilers.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Metrics registry.
    pub metrics: Metrics,
    /// The image migration Jobs run when the spec names none (the operator's own).
    pub default_image: String,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<DatabaseCutover>, u32>>,
    /// Whether this replica holds the leader Lease (always, without leader election).
    leading: Arc<AtomicBool>,
    /// The leader Lease this replica must hold to act (none without leader election).
    lease: Option<LeaseIdentity>,
}

/// A Lease and the identity that holds it when this replica leads.
#[derive(Clone, Debug)]
pub struct LeaseIdentity {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity in it.
    pub identity: String,
}

impl Context {
    /// A context for one operator process.
    pub fn new(
        client: Client,
        metrics: Metrics,
        instance: Option<String>,
        default_image: String,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            default_image,
            failures: Mutex::default(),
            leading: Arc::new(AtomicBool::new(true)),
            lease: None,
        }
    }

    /// Acts only while holding `lease`.
    pub fn with_lease(mut self, lease: LeaseIdentity) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Whether this replica may act now.
    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// The flag [`Self::is_leading`] reads, for work that runs beside the reconciles (online
    /// verification stops when it turns false).
    pub fn leading_flag(&self) -> Arc<AtomicBool> {
        self.leading.clone()
    }

    fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::SeqCst);
    }
}

async fn reconcile(obj: Arc<DatabaseCutover>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = obj.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<DatabaseCutover> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            finalizer::Event::Apply(obj) => apply(&obj, &api, &ctx).await,
            finalizer::Event::Cleanup(obj) => cleanup(&obj, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .with_label_values(&[] as &[&str])
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Most steps one reconcile takes before handing back to the controller.
const MAX_STEPS_PER_RECONCILE: usize = 64;
/// Waits shorter than this are slept inside the reconcile (the write freeze is running; a
/// round trip through the work queue would only lengthen it).
const INLINE_WAIT: Duration = Duration::from_millis(250);

async fn apply(
    obj: &DatabaseCutover,
    api: &Api<DatabaseCutover>,
    ctx: &Context,
) -> Result<Action, Error> {
    let name = obj.name_any();
    let mut sink = StatusWriter {
        api: api.clone(),
        ctx,
        obj: obj.clone(),
    };
    let mut engine: Option<(Option<i64>, Engine<KubePlatform>)> = None;
    // Steps follow one another within the reconcile while each is immediate; the status is
    // written after every one of them, so a crash between two loses nothing.
    for _ in 0..MAX_STEPS_PER_RECONCILE {
        // Only the leader acts, and it checks between steps: a replica that lost the Lease
        // while a step ran stops here (its writes are fenced by resourceVersion anyway).
        if !ctx.is_leading() {
            return Ok(Action::await_change());
        }
        // The watch cache may be behind what the API server holds (this replica was paused
        // while another one led; a person just changed the spec): every step is planned from
        // the object as it is now, so a replica that wakes up never acts on a stale status.
        sink.obj = api.get_status(&name).await.map_err(Error::Kube)?;
        let current = sink.obj.status.clone().unwrap_or_default();
        if current.phase.is_terminal() {
            sink.write(&current, &plan::Action::Idle).await?;
            return Ok(Action::requeue(plan::IDLE));
        }
        let engine = match cached_engine(&sink.obj, ctx, &mut engine).await {
            Ok(engine) => engine,
            Err(Error::InvalidSpec(invalid)) => {
                // A permanent problem: say so and wait for the spec to change, no retries.
                let err = Error::InvalidSpec(invalid);
                sink.trouble(&current, &err, Reason::InvalidSpec).await?;
                return Ok(Action::await_change());
            }
            Err(err) => {
                // Nothing to act with (a Secret unreadable): say so on the object and back off.
                sink.trouble(&current, &err, Reason::TransientError).await?;
                return Err(err);
            }
        };
        let step = match engine.step(&current, false, &mut sink).await {
            Ok(step) => step,
            Err(Error::Conflict) => {
                // Someone else wrote the object since it was read (another replica, a person
                // editing the spec): read it again and plan from what is there now.
                debug!(%name, "status write conflicted; planning again from the stored object");
                continue;
            }
            Err(Error::NotLeader) => return Ok(Action::await_change()),
            Err(err) => return Err(err),
        };
        if step.status.phase.is_terminal() || step.pause > INLINE_WAIT {
            return Ok(Action::requeue(step.pause));
        }
        tokio::time::sleep(step.pause).await;
    }
    Ok(Action::requeue(Duration::ZERO))
}

/// The engine for `obj`, reused while its spec (generation) is unchanged.
async fn cached_engine<'a>(
    obj: &DatabaseCutover,
    ctx: &Context,
    cache: &'a mut Option<(Option<i64>, Engine<KubePlatform>)>,
) -> Result<&'a Engine<KubePlatform>, Error> {
    if cache
        .as_ref()
        .is_none_or(|(generation, _)| *generation != obj.metadata.generation)
    {
        *cache = Some((obj.metadata.generation, engine_for(obj, ctx).await?));
    }
    Ok(&cache.as_ref().expect("set just above").1)
}

/// The operator's [`Sink`]: the status with its conditions, written by server-side apply with
/// the resourceVersion it was computed from (a conflict means someone else wrote first), only
/// when it changed; an Event for each phase change and hypercare problem; the metrics.
struct StatusWriter<'a> {
    api: Api<DatabaseCutover>,
    ctx: &'a Context,
    /// The object as last read or written.
    obj: DatabaseCutover,
}

impl StatusWriter<'_> {
    /// Marks the cutover Degraded with `err` and publishes a Warning Event.
    async fn trouble(
        &mut self,
        current: &DatabaseCutoverStatus,
        err: &Error,
        reason: Reason,
    ) -> Result<(), Error> {
        let text = err.to_string();
        let desired = plan::desired_status(
            current,
            self.obj.metadata.generation,
            jiff::Timestamp::now(),
            Some((reason, &text)),
        );
        self.store(desired).await?;
        publish(
            self.ctx,
            &self.obj,
            Event {
                type_: EventType::Warning,
                reason: err.category().into(),
                note: Some(truncate(&text, 1000)),
                action: "Reconcile".into(),
                secondary: None,
            },
        )
        .await;
        Ok(())
    }

    async fn store(
        &mut self,
        desired: DatabaseCutoverStatus,
    ) -> Result<DatabaseCutoverStatus, Error> {
        let name = self.obj.name_any();
        let namespace = self.obj.namespace().unwrap_or_default();
        let before = self.obj.status.clone();
        if before.as_ref() != Some(&desired) {
            self.obj = patch_status(&self.api, &self.obj, &desired).await?;
            self.ctx
                .metrics
                .record_status(&namespace, &name, before.as_ref(), &desired);
            debug!(%namespace, %name, phase = %desired.phase, "status written");
        }
        let first_write = before.is_none();
        let previous = before.unwrap_or_default();
        if let (None, Some(retry)) = (&previous.retry, &desired.retry) {
            warn!(%namespace, %name, reason = %retry.reason, message = %retry.message, "retrying a step");
            publish(
                self.ctx,
                &self.obj,
                Event {
                    type_: EventType::Warning,
                    reason: retry.reason.clone(),
                    note: Some(truncate(&format!("retrying: {}", retry.message), 1000)),
                    action: "Retry".into(),
                    secondary: None,
                },
            )
            .await;
        }
        if first_write || previous.phase != desired.phase {
            announce_phase(self.ctx, &self.obj, &desired).await;
            info!(%namespace, %name, phase = %desired.phase, "phase changed");
        }
        announce_problems(self.ctx, &self.obj, &previous, &desired).await;
        self.ctx.metrics.set_phase(&namespace, &name, desired.phase);
        Ok(desired)
    }
}

impl Sink for StatusWriter<'_> {
    type Error = Error;

    /// Right before acting: this replica still holds the Lease (a replica paused past its Lease
    /// learns it here, before it acts, not later from the lease task), and the object is still
    /// the one the action was planned from.
    async fn before_action(&mut self, action: &plan::Action) -> Result<(), Error> {
        if let Some(lease) = &self.ctx.lease {
            let leases: Api<Lease> = Api::namespaced(self.ctx.client.clone(), &lease.namespace);
            let held = leases.get(&lease.name).await.map_err(Error::Kube)?;
            let holder = held.spec.and_then(|s| s.holder_identity);
            if holder.as_deref() != Some(lease.identity.as_str()) {
                warn!(?action, holder = ?holder, "not acting: another replica holds the Lease");
                self.ctx.set_leading(false);
                return Err(Error::NotLeader);
            }
        }
        let stored = self
            .api
            .get_status(&self.obj.name_any())
            .await
            .map_err(Error::Kube)?;
        if stored.metadata.resource_version != self.obj.metadata.resource_version {
            return Err(Error::Conflict);
        }
        Ok(())
    }

    async fn write(
        &mut self,
        status: &DatabaseCutoverStatus,
        _action: &plan::Action,
    ) -> Result<DatabaseCutoverStatus, Error> {
        let desired = plan::desired_status(
            status,
            self.obj.metadata.generation,
            jiff::Timestamp::now(),
            None,
        );
        self.store(desired).await
    }
}

async fn announce_phase(ctx: &Context, obj: &DatabaseCutover, status: &DatabaseCutoverStatus) {
    let summary = plan::summary(status.phase);
    let note = match (&status.message, status.phase) {
        (Some(m), Phase::Aborting | Phase::Aborted | Phase::RollingBack | Phase::RolledBack) => {
            m.clone()
        }
        _ => summary.message.to_owned(),
    };
    publish(
        ctx,
        obj,
        Event {
            type_: if summary.degraded {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: status.phase.as_str().into(),
            note: Some(truncate(&note, 1000)),
            action: "PhaseChange".into(),
            secondary: None,
        },
    )
    .await;
}

/// A Warning Event for each hypercare problem that appeared, a Normal one when the last went away.
async fn announce_problems(
    ctx: &Context,
    obj: &DatabaseCutover,
    before: &DatabaseCutoverStatus,
    after: &DatabaseCutoverStatus,
) {
    let problems = |s: &DatabaseCutoverStatus| {
        s.hypercare
            .as_ref()
            .map(|h| h.problems.clone())
            .unwrap_or_default()
    };
    let (old, new) = (problems(before), problems(after));
    for p in new.iter().filter(|p| !old.contains(p)) {
        warn!(name = %obj.name_any(), reason = ?p.reason, message = %p.message, "hypercare problem");
        publish(
            ctx,
            obj,
            Event {
                type_: EventType::Warning,
                reason: p.reason.as_str().into(),
                note: Some(truncate(&p.message, 1000)),
                action: "Hypercare".into(),
                secondary: None,
            },
        )
        .await;
    }
    if !old.is_empty() && new.is_empty() && after.phase == Phase::Hypercare {
        publish(
            ctx,
            obj,
            Event {
                type_: EventType::Normal,
                reason: "Recovered".into(),
                note: Some("hypercare sees no problem any more".into()),
                action: "Hypercare".into(),
                secondary: None,
            },
        )
        .await;
    }
}

async fn engine_for(obj: &DatabaseCutover, ctx: &Context) -> Result<Engine<KubePlatform>, Error> {
    let namespace = obj.namespace().ok_or(Error::NoNamespace)?;
    // Parsed once, here: the plan works from typed values only.
    let spec = ValidSpec::new(obj.spec.clone())?;
    let blue = read_dsn(
        &ctx.client,
        &namespace,
        &obj.spec.source.connection_secret_ref,
    )
    .await?;
    let green = read_dsn(
        &ctx.client,
        &namespace,
        &obj.spec.target.connection_secret_ref,
    )
    .await?;
    let ca = match &obj.spec.source.ca_secret_ref {
        Some(r) => Some(
            read_secret_key(&ctx.client, &namespace, r)
                .await?
                .into_bytes(),
        ),
        None => None,
    };
    let dbs = Databases {
        blue_from_green: blue.clone(),
        green_from_blue: green.clone(),
        blue,
        green,
        connect: ConnectOptions {
            ca_pem: ca,
            application_name: "cutover-operator".into(),
            ..ConnectOptions::default()
        },
    };
    let platform = KubePlatform::new(ctx.client.clone(), obj.clone(), ctx.default_image.clone());
    Ok(Engine::new(
        format!("{namespace}/{}", obj.name_any()),
        spec,
        dbs,
        platform,
    )
    .with_fence(ctx.leading_flag()))
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

async fn cleanup(obj: &DatabaseCutover, ctx: &Context) -> Result<Action, Error> {
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let status = obj.status.clone().unwrap_or_default();
    // What to undo is the plan's decision (`plan::cleanup_scope`); with nothing to undo the
    // databases need not even be reachable.
    if plan::cleanup_scope(&status) != plan::CleanupScope::Nothing {
        let engine = engine_for(obj, ctx).await?;
        engine
            .try_perform(&plan::Action::Finalize, &status)
            .await
            .map_err(Error::Cleanup)?;
    }
    publish(
        ctx,
        obj,
        Event {
            type_: EventType::Normal,
            reason: "Deleted".into(),
            note: Some(
                "DatabaseCutover deleted; its replication objects are removed from both databases"
                    .into(),
            ),
            action: "Cleanup".into(),
            secondary: None,
        },
    )
    .await;
    ctx.metrics.forget(&namespace, &name);
    info!(%namespace, %name, "cleaned up");
    Ok(Action::await_change())
}

/// Writes the status with server-side apply, fenced: `metadata.resourceVersion` in the applied
/// object is a precondition, so the API server answers 409 if anyone wrote the object since
/// `obj` was read — another replica that took over, or a person changing the spec — and this
/// status, computed from what is now stale, is not written. The operator owns every status
/// field under one field manager.
async fn patch_status(
    api: &Api<DatabaseCutover>,
    obj: &DatabaseCutover,
    status: &DatabaseCutoverStatus,
) -> Result<DatabaseCutover, Error> {
    let patch = serde_json::json!({
        "apiVersion": "cutover.dbops.dev/v1alpha1",
        "kind": "DatabaseCutover",
        "metadata": {"name": obj.name_any(), "resourceVersion": obj.metadata.resource_version},
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|e| match e {
        kube::Error::Api(s) if s.code == 409 => Error::Conflict,
        e => Error::Kube(e),
    })
}

/// Events are best effort: a failed Event never fails a reconcile.
async fn publish(ctx: &Context, obj: &DatabaseCutover, event: Event) {
    let reference: ObjectReference = obj.object_ref(&());
    if let Err(err) = ctx.recorder.publish(&event, &reference).await {
        warn!(error = %err, reason = %event.reason, "failed to publish event");
    }
}

fn error_policy(obj: Arc<DatabaseCutover>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(obj.as_ref());
    let attempt = {
        let mut failures = ctx
            .failures
            .lock()
            .expect("no panics while holding the lock");
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    ctx.metrics
        .reconciles
        .with_label_values(&[err.category()])
        .inc();
    let delay = plan::retry_delay(attempt);
    warn!(name = %obj.name_any(), error = %err, category = err.category(), attempt, ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Settings of `cutover run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub metrics_addr: SocketAddr,
    /// Watch one namespace only; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Take part in leader election through this Lease (`None`: reconcile unconditionally).
    pub leader_election: Option<LeaderElection>,
    /// This replica's name (the pod name), used in Events and the Lease.
    pub instance: String,
    /// The image migration Jobs run when the spec names none.
    pub default_image: String,
}

/// Where the leader Lease lives.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// Lease validity in seconds.
    pub duration_seconds: u64,
}

/// Runs the operator until SIGTERM / Ctrl-C.
pub async fn run(client: Client, opts: RunOptions) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let shutdown = shutdown_signal();

    let (addr, server) = metrics::serve(opts.metrics_addr, metrics.clone(), health.clone(), {
        let shutdown = shutdown.clone();
        async move { shutdown.wait().await }
    })
    .await?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    let server = tokio::spawn(server);

    // Fail fast when the API server is unreachable or the CRD is missing.
    let probe: Api<DatabaseCutover> = Api::all(client.clone());
    probe
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(|e| {
            anyhow::anyhow!("failed to list DatabaseCutovers (is the CRD installed?): {e}")
        })?;

    let mut ctx = Context::new(
        client.clone(),
        metrics.clone(),
        Some(opts.instance.clone()),
        opts.default_image.clone(),
    );
    if let Some(le) = &opts.leader_election {
        ctx = ctx.with_lease(LeaseIdentity {
            namespace: le.namespace.clone(),
            name: le.lease_name.clone(),
            identity: opts.instance.clone(),
        });
    }
    let ctx = Arc::new(ctx);
    match &opts.leader_election {
        None => {
            health.set_ready(true);
            metrics.leader.with_label_values(&[] as &[&str]).set(1);
            run_controller(&client, &opts, ctx, shutdown.clone()).await;
        }
        Some(le) => {
            let manager = LeaseManagerBuilder::new(client.clone(), &le.lease_name)
                .with_namespace(&le.namespace)
                .with_identity(&opts.instance)
                .with_duration(le.duration_seconds)
                .with_grace(le.duration_seconds.div_ceil(3).max(1))
                .with_create_mode(LeaseCreateMode::AutoCreate)
                .build()
                .await?;
            let (mut leader, lease_task) = manager.watch().await;
            health.set_ready(true);
            // Between steps the controller checks `ctx.is_leading()`: false from the moment the
            // lease task sees the Lease lost, before the controller has shut down.
            ctx.set_leading(false);
            loop {
                if *leader.borrow_and_update() {
                    info!(lease = %le.lease_name, "leading: reconciling");
                    metrics.leader.with_label_values(&[] as &[&str]).set(1);
                    ctx.set_leading(true);
                    let lost = {
                        let mut leader = leader.clone();
                        let ctx = ctx.clone();
                        async move {
                            while *leader.borrow_and_update() {
                                if leader.changed().await.is_err() {
                                    break;
                                }
                            }
                            ctx.set_leading(false);
                        }
                    };
                    let stop = ShutdownSignal::any(shutdown.clone(), lost);
                    run_controller(&client, &opts, ctx.clone(), stop).await;
                    ctx.set_leading(false);
                    metrics.leader.with_label_values(&[] as &[&str]).set(0);
                    info!("stopped reconciling");
                } else {
                    info!(lease = %le.lease_name, "standing by for the leader lease");
                }
                if shutdown.is_triggered() {
                    break;
                }
                tokio::select! {
                    changed = leader.changed() => if changed.is_err() { break },
                    () = shutdown.wait() => break,
                }
            }
            // Dropping the receiver makes the lease task release the lease.
            drop(leader);
            match lease_task.await {
                Ok(Ok(_)) => info!("released the leader lease"),
                Ok(Err(e)) => warn!(error = %e, "failed to release the leader lease"),
                Err(e) => warn!(error = %e, "lease task panicked"),
            }
        }
    }
    health.set_ready(false);
    shutdown.trigger();
    server.await??;
    Ok(())
}

async fn run_controller(
    client: &Client,
    opts: &RunOptions,
    ctx: Arc<Context>,
    stop: ShutdownSignal,
) {
    let api: Api<DatabaseCutover> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    Controller::new(api, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(async move { stop.wait().await })
        .run(reconcile_and_count, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                debug!(error = %err, "controller stream item");
            }
        })
        .await;
}

async fn reconcile_and_count(
    obj: Arc<DatabaseCutover>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(obj.as_ref());
    let action = reconcile(obj, ctx.clone()).await?;
    ctx.failures
        .lock()
        .expect("no panics while holding the lock")
        .remove(&key);
    ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
    Ok(action)
}

/// A cloneable shutdown trigger: SIGTERM, Ctrl-C, or a programmatic trigger.
#[derive(Clone, Debug)]
pub struct ShutdownSignal {
    rx: tokio::sync::watch::Receiver<bool>,
    tx: Arc<tokio::sync::watch::Sender<bool>>,
}

impl ShutdownSignal {
    fn new() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        Self {
            rx,
            tx: Arc::new(tx),
        }
    }

    /// Resolves once the signal is triggered.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|fired| *fired).await;
    }

    /// Whether it has fired.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Fires it.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// A signal that fires when `a` fires or `other` completes.
    fn any(
        a: ShutdownSignal,
        other: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Self {
        let combined = ShutdownSignal::new();
        let fire = combined.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = a.wait() => {},
                () = other => {},
            }
            fire.trigger();
        });
        combined
    }
}

fn shutdown_signal() -> ShutdownSignal {
    let signal = ShutdownSignal::new();
    let fire = signal.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler works on unix");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        info!("shutdown requested");
        fire.trigger();
    });
    signal
}
