//! Prometheus metrics and the `/metrics`, `/healthz` and `/readyz` endpoint.
//!
//! One registry per process, passed around in the controller context (no global state), so
//! tests can run several operators in one process without their metrics mixing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::api::units::parse_timestamp;
use crate::api::{DatabaseCutoverStatus, Phase, ProblemKind};

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by outcome (`ok` or an error category).
    pub reconciles: IntCounterVec,
    /// Reconcile duration in seconds.
    pub reconcile_duration: HistogramVec,
    /// 1 for the phase each cutover is in, 0 for the others.
    pub phase: IntGaugeVec,
    /// Whether this replica holds the leader lease.
    pub leader: IntGaugeVec,
    /// Seconds each finished step took, by phase.
    pub step_duration: HistogramVec,
    /// Replication lag in bytes, by direction (`forward`: source to target, `reverse`).
    pub lag_bytes: IntGaugeVec,
    /// Seconds writes on the source were (or have been) frozen.
    pub write_freeze: prometheus::GaugeVec,
    /// Rows compared by the last verification.
    pub verified_rows: IntGaugeVec,
    /// Changes committed on the source after the freeze by anyone but the cutover.
    pub source_writes: IntGaugeVec,
    /// Tables that differed in the last verification.
    pub mismatched_tables: IntGaugeVec,
    /// Online verification, by `what`: `ranges_total`, `ranges_proven`, `rows_proven`,
    /// `dirty_keys`, `rounds`, `restarts`.
    pub online_verification: IntGaugeVec,
    /// The parallel initial copy's progress by what is counted.
    pub initial_copy: IntGaugeVec,
    /// Problems hypercare sees now, by kind.
    pub hypercare_problems: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("cutover".into()), None)
            .expect("a static prefix is a valid registry");
        let reconciles = IntCounterVec::new(
            Opts::new(
                "reconciles_total",
                "Reconciles by outcome: ok or the error category",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "Time spent in one reconcile")
                .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &[],
        )
        .expect("valid metric");
        let phase = IntGaugeVec::new(
            Opts::new("phase", "1 for the phase a cutover is in, 0 for the others"),
            &["namespace", "name", "phase"],
        )
        .expect("valid metric");
        let leader = IntGaugeVec::new(
            Opts::new("leader", "1 when this replica holds the leader lease"),
            &[],
        )
        .expect("valid metric");
        let step_duration = HistogramVec::new(
            HistogramOpts::new("step_duration_seconds", "Seconds each finished step took").buckets(
                vec![
                    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0, 86_400.0,
                ],
            ),
            &["phase"],
        )
        .expect("valid metric");
        let per_cutover = ["namespace", "name"];
        let lag_bytes = IntGaugeVec::new(
            Opts::new(
                "replication_lag_bytes",
                "Replication lag in bytes by direction",
            ),
            &["namespace", "name", "direction"],
        )
        .expect("valid metric");
        let write_freeze = prometheus::GaugeVec::new(
            Opts::new(
                "write_freeze_seconds",
                "Seconds writes on the source were frozen",
            ),
            &per_cutover,
        )
        .expect("valid metric");
        let source_writes = IntGaugeVec::new(
            Opts::new(
                "source_writes_after_freeze",
                "Changes the change witness saw committed on the source after the freeze",
            ),
            &per_cutover,
        )
        .expect("valid metric");
        let initial_copy = IntGaugeVec::new(
            Opts::new(
                "initial_copy",
                "The parallel initial copy: bytes_copied, bytes_total (the tables' size on the \
                 source), rows_copied, tables_done, tables_total, indexes_built, indexes_total, \
                 restarts",
            ),
            &["namespace", "name", "what"],
        )
        .expect("valid metric");
        let online_verification = IntGaugeVec::new(
            Opts::new(
                "online_verification",
                "Online verification's progress: key ranges (total, proven), rows proven, keys changed since proven (dirty_keys), rounds, restarts",
            ),
            &["namespace", "name", "what"],
        )
        .expect("valid metric");
        let verified_rows = IntGaugeVec::new(
            Opts::new(
                "verification_rows",
                "Rows compared by the last verification",
            ),
            &per_cutover,
        )
        .expect("valid metric");
        let mismatched_tables = IntGaugeVec::new(
            Opts::new(
                "verification_mismatched_tables",
                "Tables that differed in the last verification",
            ),
            &per_cutover,
        )
        .expect("valid metric");
        let hypercare_problems = IntGaugeVec::new(
            Opts::new(
                "hypercare_problems",
                "Problems hypercare sees now, by kind (ReplicationBroken, RolloutStuck, CheckpointMismatch)",
            ),
            &["namespace", "name", "reason"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_duration.clone()),
            Box::new(phase.clone()),
            Box::new(leader.clone()),
            Box::new(step_duration.clone()),
            Box::new(lag_bytes.clone()),
            Box::new(write_freeze.clone()),
            Box::new(verified_rows.clone()),
            Box::new(source_writes.clone()),
            Box::new(mismatched_tables.clone()),
            Box::new(hypercare_problems.clone()),
            Box::new(online_verification.clone()),
            Box::new(initial_copy.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        Self {
            registry,
            reconciles,
            reconcile_duration,
            phase,
            leader,
            step_duration,
            lag_bytes,
            write_freeze,
            verified_rows,
            source_writes,
            mismatched_tables,
            hypercare_problems,
            online_verification,
            initial_copy,
        }
    }

    /// Brings the per-cutover metrics in line with a status just written; `before` is the
    /// status it replaced (a step that finished in between is observed once).
    pub fn record_status(
        &self,
        namespace: &str,
        name: &str,
        before: Option<&DatabaseCutoverStatus>,
        status: &DatabaseCutoverStatus,
    ) {
        self.set_phase(namespace, name, status.phase);
        let finished_before = before.map_or(0, |b| {
            b.steps.iter().filter(|s| s.finished_at.is_some()).count()
        });
        for step in status
            .steps
            .iter()
            .filter(|s| s.finished_at.is_some())
            .skip(finished_before)
        {
            if let (Ok(start), Some(Ok(end))) = (
                parse_timestamp(&step.started_at),
                step.finished_at.as_deref().map(parse_timestamp),
            ) && !step.name.is_terminal()
            {
                let seconds = end.duration_since(start).as_secs_f64().max(0.0);
                self.step_duration
                    .with_label_values(&[step.name.as_str()])
                    .observe(seconds);
            }
        }
        if let Some(r) = &status.replication {
            if let Some(b) = r.lag_bytes {
                self.lag_bytes
                    .with_label_values(&[namespace, name, "forward"])
                    .set(b);
            }
            if let Some(b) = r.reverse_lag_bytes {
                self.lag_bytes
                    .with_label_values(&[namespace, name, "reverse"])
                    .set(b);
            }
        }
        if let Some(f) = status.write_freeze_seconds {
            self.write_freeze
                .with_label_values(&[namespace, name])
                .set(f);
        }
        if let Some(w) = &status.source_writes {
            self.source_writes
                .with_label_values(&[namespace, name])
                .set(w.count);
        }
        if let Some(c) = status
            .replication
            .as_ref()
            .and_then(|r| r.initial_copy.as_ref())
        {
            for (what, value) in copy_values(c) {
                self.initial_copy
                    .with_label_values(&[namespace, name, what])
                    .set(value);
            }
        }
        if let Some(o) = &status.online_verification {
            for (what, value) in online_values(o) {
                self.online_verification
                    .with_label_values(&[namespace, name, what])
                    .set(value);
            }
        }
        if let Some(v) = &status.verification {
            self.verified_rows
                .with_label_values(&[namespace, name])
                .set(v.rows_compared);
            let differing = v.tables.iter().filter(|t| !t.matched).count();
            self.mismatched_tables
                .with_label_values(&[namespace, name])
                .set(i64::try_from(differing).unwrap_or(i64::MAX));
        }
        if let Some(h) = &status.hypercare {
            for kind in ProblemKind::ALL {
                let count = h.problems.iter().filter(|p| p.reason == kind).count();
                self.hypercare_problems
                    .with_label_values(&[namespace, name, kind.as_str()])
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
    }

    /// Records the phase of one cutover: its phase 1, every other phase 0.
    pub fn set_phase(&self, namespace: &str, name: &str, current: Phase) {
        for p in Phase::ALL {
            self.phase
                .with_label_values(&[namespace, name, p.as_str()])
                .set(i64::from(p == current));
        }
    }

    /// Forgets a deleted cutover.
    pub fn forget(&self, namespace: &str, name: &str) {
        for p in Phase::ALL {
            let _ = self
                .phase
                .remove_label_values(&[namespace, name, p.as_str()]);
        }
        for direction in ["forward", "reverse"] {
            let _ = self
                .lag_bytes
                .remove_label_values(&[namespace, name, direction]);
        }
        for gauge in [
            &self.verified_rows,
            &self.mismatched_tables,
            &self.source_writes,
        ] {
            let _ = gauge.remove_label_values(&[namespace, name]);
        }
        let _ = self.write_freeze.remove_label_values(&[namespace, name]);
        for (what, _) in online_values(&crate::api::OnlineVerificationStatus::default()) {
            let _ = self
                .online_verification
                .remove_label_values(&[namespace, name, what]);
        }
        for (what, _) in copy_values(&crate::api::InitialCopyStatus::default()) {
            let _ = self
                .initial_copy
                .remove_label_values(&[namespace, name, what]);
        }
        for kind in ProblemKind::ALL {
            let _ = self
                .hypercare_problems
                .remove_label_values(&[namespace, name, kind.as_str()]);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// What the probe endpoints report.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// Marks the process ready (it reached the API server and started its watch or its
    /// leader-election standby).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
}

/// Binds the endpoint and returns its address with the serving future; the future ends when
/// `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    let server = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    };
    Ok((local, server))
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.health.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// The online verification gauges, by label.
fn copy_values(c: &crate::api::InitialCopyStatus) -> [(&'static str, i64); 8] {
    [
        ("bytes_copied", c.bytes_copied),
        ("bytes_total", c.bytes_total),
        ("rows_copied", c.rows_copied),
        ("tables_done", i64::from(c.tables_done)),
        ("tables_total", i64::from(c.tables_total)),
        ("indexes_built", i64::from(c.indexes_built)),
        ("indexes_total", i64::from(c.indexes_total)),
        ("restarts", i64::from(c.restarts)),
    ]
}

fn online_values(o: &crate::api::OnlineVerificationStatus) -> [(&'static str, i64); 6] {
    [
        ("ranges_total", o.ranges_total),
        ("ranges_proven", o.ranges_proven),
        ("rows_proven", o.rows_proven),
        ("dirty_keys", o.dirty_keys),
        ("rounds", o.rounds),
        ("restarts", o.restarts),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_gauge_has_exactly_one_phase_set() {
        let m = Metrics::new();
        m.set_phase("shop", "orders", Phase::Replicating);
        m.set_phase("shop", "orders", Phase::Freezing);
        let text = m.render();
        assert!(
            text.contains(r#"cutover_phase{name="orders",namespace="shop",phase="Freezing"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cutover_phase{name="orders",namespace="shop",phase="Replicating"} 0"#)
        );
        m.forget("shop", "orders");
        assert!(!m.render().contains(r#"name="orders""#));
    }

    #[test]
    fn finished_steps_lag_freeze_and_verification_are_recorded_once() {
        use crate::api::{ReplicationStatus, StepOutcome, StepRecord, VerificationStatus};
        let t = |s: i64| {
            jiff::Timestamp::from_second(1_800_000_000 + s)
                .unwrap()
                .to_string()
        };
        let m = Metrics::new();
        let before = DatabaseCutoverStatus {
            phase: Phase::Freezing,
            steps: vec![StepRecord {
                name: Phase::Freezing,
                started_at: t(0),
                finished_at: None,
                outcome: StepOutcome::Running,
                message: None,
            }],
            ..DatabaseCutoverStatus::default()
        };
        let mut after = before.clone();
        after.phase = Phase::FinalSync;
        after.steps[0].finished_at = Some(t(2));
        after.steps[0].outcome = StepOutcome::Succeeded;
        after.replication = Some(ReplicationStatus {
            lag_bytes: Some(4096),
            initial_copy: Some(crate::api::InitialCopyStatus {
                stage: "Done".into(),
                bytes_copied: 1000,
                bytes_total: 1200,
                rows_copied: 10,
                ..crate::api::InitialCopyStatus::default()
            }),
            ..ReplicationStatus::default()
        });
        after.write_freeze_seconds = Some(1.25);
        after.verification = Some(VerificationStatus {
            matched: true,
            rows_compared: 42,
            ..VerificationStatus::default()
        });
        m.record_status("shop", "orders", Some(&before), &after);
        m.record_status("shop", "orders", Some(&after), &after);
        let text = m.render();
        assert!(
            text.contains(r#"cutover_step_duration_seconds_count{phase="Freezing"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cutover_step_duration_seconds_sum{phase="Freezing"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"cutover_replication_lag_bytes{direction="forward",name="orders",namespace="shop"} 4096"#), "{text}");
        assert!(
            text.contains(
                r#"cutover_initial_copy{name="orders",namespace="shop",what="bytes_copied"} 1000"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"cutover_initial_copy{name="orders",namespace="shop",what="rows_copied"} 10"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"cutover_write_freeze_seconds{name="orders",namespace="shop"} 1.25"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cutover_verification_rows{name="orders",namespace="shop"} 42"#),
            "{text}"
        );
        m.forget("shop", "orders");
        let left = m.render();
        assert!(!left.contains(r#"name="orders""#), "{left}");
    }

    #[tokio::test]
    async fn endpoints_answer_over_http() {
        let m = Metrics::new();
        m.reconciles.with_label_values(&["ok"]).inc();
        let health = Arc::new(Health::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), m, health.clone(), async {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
        let server = tokio::spawn(server);

        assert_eq!(get_status(addr, "/healthz").await, 200);
        assert_eq!(get_status(addr, "/readyz").await, 503);
        health.set_ready(true);
        assert_eq!(get_status(addr, "/readyz").await, 200);
        let body = get_body(addr, "/metrics").await;
        assert!(
            body.contains(r#"cutover_reconciles_total{outcome="ok"} 1"#),
            "{body}"
        );

        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    async fn raw_get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    async fn get_status(addr: SocketAddr, path: &str) -> u16 {
        let response = raw_get(addr, path).await;
        response.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    async fn get_body(addr: SocketAddr, path: &str) -> String {
        let response = raw_get(addr, path).await;
        response.split_once("\r\n\r\n").unwrap().1.to_owned()
    }
}
