//! The parallel initial copy beside the step loop: one background task per cutover in this
//! process runs `postgres::copy` and then creates the subscription on the slot it made; the
//! steps read its progress. Its state lives in memory: the exported snapshot dies with the
//! process, so a process that restarts (or a replica that takes over) finds no run, and the
//! next StartReplication empties what was copied and starts over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::postgres::connect::connect;
use crate::postgres::copy::{self, CopyConfig, CopyError, CopyProgress, Tracker};
use crate::postgres::replication::{self, SubscriptionOptions};
use crate::postgres::{ConnectOptions, Dsn};

/// A run no step has looked at for this long stops (its process no longer leads the cutover).
const UNWATCHED: Duration = Duration::from_secs(120);
/// A run starts copying only once a step has looked at it (after its start was recorded);
/// one not looked at within this long ends without touching anything.
const ARM_WITHIN: Duration = Duration::from_secs(60);
/// How long [`stop`] lets a run end by itself before cancelling it.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The subscription to create on the slot once the copy is done.
#[derive(Clone, Debug)]
pub struct Subscribe {
    /// The subscription's name on green.
    pub name: String,
    /// Blue's publication.
    pub publication: String,
    /// Blue as green reaches it.
    pub publisher: Dsn,
}

/// What the steps see of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CopyView {
    /// What the copy has done.
    pub progress: CopyProgress,
    /// Why it failed, and whether trying again may help; `None` while it runs or once done.
    pub failure: Option<(String, bool)>,
    /// The copy is done and the subscription streams from its slot.
    pub finished: bool,
}

struct Run {
    tracker: Arc<Tracker>,
    armed: AtomicBool,
    touched: Mutex<Instant>,
    failure: Mutex<Option<(String, bool)>>,
    finished: AtomicBool,
    task: Mutex<Option<JoinHandle<()>>>,
}

static RUNS: LazyLock<Mutex<HashMap<String, Arc<Run>>>> = LazyLock::new(Mutex::default);

fn get(id: &str) -> Option<Arc<Run>> {
    RUNS.lock().expect("copy runs poisoned").get(id).cloned()
}

/// Starts the copy of cutover `id` in this process, unless one runs already.
pub fn start(
    id: &str,
    cfg: CopyConfig,
    subscribe: Subscribe,
    fence: Option<Arc<AtomicBool>>,
) -> bool {
    let mut runs = RUNS.lock().expect("copy runs poisoned");
    if runs.contains_key(id) {
        return false;
    }
    let run = Arc::new(Run {
        tracker: Arc::new(Tracker::default()),
        armed: AtomicBool::new(false),
        touched: Mutex::new(Instant::now()),
        failure: Mutex::new(None),
        finished: AtomicBool::new(false),
        task: Mutex::new(None),
    });
    let handle = tokio::spawn(execute(id.to_owned(), run.clone(), cfg, subscribe, fence));
    *run.task.lock().expect("task poisoned") = Some(handle);
    runs.insert(id.to_owned(), run);
    true
}

/// What the run of cutover `id` has done, if one exists in this process. Looking keeps it
/// alive (and lets a new run begin copying).
pub fn view(id: &str) -> Option<CopyView> {
    let run = get(id)?;
    *run.touched.lock().expect("touched poisoned") = Instant::now();
    run.armed.store(true, Ordering::SeqCst);
    Some(CopyView {
        progress: run.tracker.progress(),
        failure: run.failure.lock().expect("failure poisoned").clone(),
        finished: run.finished.load(Ordering::SeqCst),
    })
}

/// Stops the run of cutover `id` (if any) and forgets it, so that its slot can be dropped and
/// its rows removed.
pub async fn stop(id: &str) {
    let run = RUNS.lock().expect("copy runs poisoned").remove(id);
    let Some(run) = run else { return };
    run.tracker.stop();
    let handle = run.task.lock().expect("task poisoned").take();
    if let Some(mut handle) = handle
        && tokio::time::timeout(STOP_WAIT, &mut handle).await.is_err()
    {
        handle.abort();
        let _ = handle.await;
    }
}

async fn execute(
    id: String,
    run: Arc<Run>,
    cfg: CopyConfig,
    subscribe: Subscribe,
    fence: Option<Arc<AtomicBool>>,
) {
    let began = Instant::now();
    while !run.armed.load(Ordering::SeqCst) {
        if began.elapsed() > ARM_WITHIN || fenced(fence.as_ref()) {
            *run.failure.lock().expect("failure poisoned") = Some((
                "the copy was started but no step looked at it; it starts again".into(),
                true,
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let watcher = {
        let run = run.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if fenced(fence.as_ref())
                    || run.touched.lock().expect("touched poisoned").elapsed() > UNWATCHED
                {
                    run.tracker.stop();
                    return;
                }
            }
        }
    };
    let work = async {
        let point = copy::run(&cfg, &run.tracker).await?;
        subscribe_on_slot(
            &cfg.blue,
            &cfg.green,
            &cfg.connect,
            &cfg.slot,
            point,
            &subscribe,
        )
        .await
    };
    let result = tokio::select! {
        r = work => r,
        () = watcher => Err(CopyError::Stopped),
    };
    match result {
        Ok(()) => {
            run.finished.store(true, Ordering::SeqCst);
            tracing::info!(cutover = %id, "the parallel copy is done; the subscription streams from its slot");
        }
        Err(e) => {
            tracing::warn!(cutover = %id, error = %e, transient = e.is_transient(), "the parallel copy failed");
            *run.failure.lock().expect("failure poisoned") =
                Some((e.to_string(), e.is_transient()));
        }
    }
}

fn fenced(fence: Option<&Arc<AtomicBool>>) -> bool {
    fence.is_some_and(|f| !f.load(Ordering::SeqCst))
}

/// Creates the subscription on the slot the copy made, after checking that the slot still
/// starts exactly at the snapshot's position (nobody consumed it).
async fn subscribe_on_slot(
    blue: &Dsn,
    green: &Dsn,
    opts: &ConnectOptions,
    slot: &str,
    point: tokio_postgres::types::PgLsn,
    s: &Subscribe,
) -> Result<(), CopyError> {
    let connect_to = |side: &'static str| move |source| CopyError::Connect { side, source };
    let b = connect(blue, opts).await.map_err(connect_to("source"))?;
    let g = connect(green, opts).await.map_err(connect_to("target"))?;
    let confirmed: Option<tokio_postgres::types::PgLsn> = b
        .query_opt(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|source| CopyError::Sql {
            action: "read the forward slot".into(),
            source,
        })?
        .and_then(|r| r.get(0));
    if confirmed != Some(point) {
        return Err(CopyError::Refused(format!(
            "replication slot {slot} no longer starts at the copy's snapshot ({point}; it \
             confirms {}): the copy starts over",
            confirmed.map_or_else(|| "nothing".into(), |c| c.to_string())
        )));
    }
    replication::ensure_subscription_named(
        &b,
        &g,
        &s.name,
        &s.publication,
        slot,
        &s.publisher,
        SubscriptionOptions {
            copy_data: false,
            create_slot: false,
        },
    )
    .await
    .map_err(|e| match e {
        replication::ReplicationError::Sql { action, source } => CopyError::Sql { action, source },
        other => CopyError::Refused(other.to_string()),
    })?;
    Ok(())
}
