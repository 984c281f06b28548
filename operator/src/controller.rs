//! The kube-runtime controller: observe → plan → act → patch status.
//!
//! Each reconcile is a short pipeline. The finalizer helper routes live objects to [`apply`] and
//! deleted ones to [`cleanup`]; the status is computed as plain data, compared with what the
//! object already has, and written with server-side apply under one field manager only when it
//! changed, so the operator never triggers itself. Phase changes are announced with an Event.
//! Only the replica holding the leader Lease reconciles.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
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

use crate::api::{DatabaseCutover, DatabaseCutoverStatus, FINALIZER};
use crate::metrics::{self, Health, Metrics};
use crate::plan;

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
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<DatabaseCutover>, u32>>,
}

impl Context {
    /// A context for one operator process.
    pub fn new(client: Client, metrics: Metrics, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::default(),
        }
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

async fn apply(
    obj: &DatabaseCutover,
    api: &Api<DatabaseCutover>,
    ctx: &Context,
) -> Result<Action, Error> {
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let current = obj.status.clone().unwrap_or_default();
    let previous_phase = obj.status.as_ref().map(|s| s.phase);
    let desired = plan::desired_status(&current, obj.metadata.generation, jiff::Timestamp::now());

    if obj.status.as_ref() != Some(&desired) {
        patch_status(api, &name, &desired).await?;
        debug!(%namespace, %name, phase = %desired.phase, "status written");
    }
    if previous_phase != Some(desired.phase) {
        let summary = plan::summary(desired.phase);
        publish(
            ctx,
            obj,
            Event {
                type_: EventType::Normal,
                reason: desired.phase.as_str().into(),
                note: Some(summary.message.into()),
                action: "PhaseChange".into(),
                secondary: None,
            },
        )
        .await;
        info!(%namespace, %name, phase = %desired.phase, "phase changed");
    }
    ctx.metrics.set_phase(&namespace, &name, desired.phase);
    Ok(Action::requeue(Duration::from_secs(300)))
}

async fn cleanup(obj: &DatabaseCutover, ctx: &Context) -> Result<Action, Error> {
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    publish(
        ctx,
        obj,
        Event {
            type_: EventType::Normal,
            reason: "Deleted".into(),
            note: Some("DatabaseCutover deleted; nothing of it is left on either database".into()),
            action: "Cleanup".into(),
            secondary: None,
        },
    )
    .await;
    ctx.metrics.forget(&namespace, &name);
    info!(%namespace, %name, "cleaned up");
    Ok(Action::await_change())
}

/// Writes the status with server-side apply. The operator owns every status field.
async fn patch_status(
    api: &Api<DatabaseCutover>,
    name: &str,
    status: &DatabaseCutoverStatus,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": "cutover.dbops.dev/v1alpha1",
        "kind": "DatabaseCutover",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
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

    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        Some(opts.instance.clone()),
    ));
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
            loop {
                if *leader.borrow_and_update() {
                    info!(lease = %le.lease_name, "leading: reconciling");
                    metrics.leader.with_label_values(&[] as &[&str]).set(1);
                    let lost = {
                        let mut leader = leader.clone();
                        async move {
                            while *leader.borrow_and_update() {
                                if leader.changed().await.is_err() {
                                    break;
                                }
                            }
                        }
                    };
                    let stop = ShutdownSignal::any(shutdown.clone(), lost);
                    run_controller(&client, &opts, ctx.clone(), stop).await;
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
