//! Online verification beside the step loop: one background task per cutover in this process
//! runs comparison rounds during Replicating (`postgres::verify::online`), the steps read its
//! progress, the Freeze action pauses it and the Verify action takes it to compare what changed
//! inside the freeze. Its state lives in memory: a process that restarts (or a replica that
//! takes over) has none, and starts a new pass — or, past the freeze, verifies in full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::postgres::verify::online::{OnlineConfig, OnlineError, OnlineProgress, OnlineVerifier};

/// A task no step has looked at for this long stops (its process no longer leads the cutover).
const UNWATCHED: Duration = Duration::from_secs(120);
/// A pass is (re)started only while a step looked at the run this recently.
const START_WATCHED: Duration = Duration::from_secs(15);
/// Pause between rounds when nothing is left to compare.
const IDLE_ROUND: Duration = Duration::from_millis(500);

/// What the steps see of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OnlineView {
    /// What the verifier has done (`None` until its pass has started).
    pub progress: Option<OnlineProgress>,
    /// New passes started after the evidence was lost.
    pub restarts: u32,
    /// The last error, retried.
    pub last_error: Option<String>,
    /// Rounds are paused (the freeze began).
    pub paused: bool,
    /// When the current pass started.
    pub started_at: Option<jiff::Timestamp>,
    /// Why it cannot run at all (a server refused what it needs): the freeze verifies in full.
    pub unavailable: Option<String>,
}

struct Run {
    view: Mutex<OnlineView>,
    verifier: tokio::sync::Mutex<Option<OnlineVerifier>>,
    touched: Mutex<Instant>,
    paused: AtomicBool,
    stop: AtomicBool,
    task: Mutex<Option<JoinHandle<()>>>,
}

static RUNS: LazyLock<Mutex<HashMap<String, Arc<Run>>>> = LazyLock::new(Mutex::default);

fn get(id: &str) -> Option<Arc<Run>> {
    RUNS.lock().expect("online runs poisoned").get(id).cloned()
}

/// Starts the online verification of cutover `id` in this process, unless it runs already.
pub fn start(id: &str, cfg: OnlineConfig, fence: Option<Arc<AtomicBool>>) {
    let mut runs = RUNS.lock().expect("online runs poisoned");
    if runs.contains_key(id) {
        return;
    }
    let run = Arc::new(Run {
        view: Mutex::new(OnlineView::default()),
        verifier: tokio::sync::Mutex::new(None),
        touched: Mutex::new(Instant::now()),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        task: Mutex::new(None),
    });
    let handle = tokio::spawn(run_rounds(id.to_owned(), run.clone(), cfg, fence));
    *run.task.lock().expect("task poisoned") = Some(handle);
    runs.insert(id.to_owned(), run);
}

/// What the run of cutover `id` has done, if one runs in this process. Looking keeps it alive.
pub fn view(id: &str) -> Option<OnlineView> {
    let run = get(id)?;
    *run.touched.lock().expect("touched poisoned") = Instant::now();
    let view = run.view.lock().expect("view poisoned").clone();
    Some(view)
}

/// Stops starting rounds (the freeze begins); waits for the round under way to end.
pub async fn pause(id: &str) {
    if let Some(run) = get(id) {
        run.paused.store(true, Ordering::SeqCst);
        let _round_over = run.verifier.lock().await;
        run.view.lock().expect("view poisoned").paused = true;
    }
}

/// Takes the verifier of cutover `id` for the comparison inside the freeze (pausing its
/// rounds), with its progress; `None` when there is none in this process.
pub async fn take(id: &str) -> Option<OnlineVerifier> {
    let run = get(id)?;
    run.paused.store(true, Ordering::SeqCst);
    run.verifier.lock().await.take()
}

/// Gives a verifier back after a comparison inside the freeze failed for a reason worth
/// retrying (its evidence intact).
pub async fn give_back(id: &str, verifier: OnlineVerifier) {
    if let Some(run) = get(id) {
        *run.verifier.lock().await = Some(verifier);
    }
}

/// How long [`stop`] lets a round finish before cancelling it (a round may be waiting for green
/// to catch up, which a failing apply never does).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Stops the run of cutover `id` and closes its connections, so that its slots can be dropped.
pub async fn stop(id: &str) {
    let run = RUNS.lock().expect("online runs poisoned").remove(id);
    let Some(run) = run else { return };
    run.stop.store(true, Ordering::SeqCst);
    let handle = run.task.lock().expect("task poisoned").take();
    if let Some(mut handle) = handle
        && tokio::time::timeout(STOP_WAIT, &mut handle).await.is_err()
    {
        handle.abort();
        let _ = handle.await;
    }
    run.verifier.lock().await.take();
}

/// SQLSTATEs that say online verification cannot run on these servers: logical decoding off
/// (`wal_level`), no free replication slot, no privilege to create one, an object missing.
fn refused_for_good(code: &str) -> bool {
    matches!(code, "55000" | "53400" | "42501" | "42704" | "0A000")
}

async fn run_rounds(id: String, run: Arc<Run>, cfg: OnlineConfig, fence: Option<Arc<AtomicBool>>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if run.stop.load(Ordering::SeqCst)
            || run.touched.lock().expect("touched poisoned").elapsed() > UNWATCHED
            || fence.as_ref().is_some_and(|f| !f.load(Ordering::SeqCst))
        {
            break;
        }
        if run.paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut guard = run.verifier.lock().await;
        if run.paused.load(Ordering::SeqCst) {
            continue;
        }
        let outcome = match guard.as_mut() {
            None if run.touched.lock().expect("touched poisoned").elapsed() > START_WATCHED => {
                // Nobody asked for this pass lately (this process was paused, or lost the
                // lead): create no slot.
                break;
            }
            None => {
                let first = run.view.lock().expect("view poisoned").progress.is_none()
                    && run.view.lock().expect("view poisoned").last_error.is_none();
                match OnlineVerifier::start(cfg.clone()).await {
                    Ok(verifier) => {
                        let mut view = run.view.lock().expect("view poisoned");
                        if !first {
                            view.restarts += 1;
                        }
                        view.progress = Some(verifier.progress().clone());
                        view.started_at = Some(jiff::Timestamp::now());
                        *guard = Some(verifier);
                        Ok(true)
                    }
                    Err(e) => Err(e),
                }
            }
            Some(verifier) if verifier.progress().divergence.is_some() => Ok(false),
            Some(verifier) => {
                let result = verifier.round(false).await;
                run.view.lock().expect("view poisoned").progress =
                    Some(verifier.progress().clone());
                match result {
                    Ok(()) => Ok(verifier.has_work()),
                    Err(OnlineError::WitnessLost(slot)) => {
                        // Nothing this pass proved can be trusted complete. The run ends; the
                        // leader's next step starts a new pass (a process that lost the lead
                        // creates nothing).
                        tracing::warn!(cutover = %id, %slot, "online verification lost its change witness; a new pass starts at the next step");
                        // The pass's other slot may still exist (a replica resumed after a
                        // takeover finishes creating it after the new leader's cleanup): drop
                        // what is left of this pass.
                        let lost = guard.take();
                        drop(guard);
                        if let Some(verifier) = lost {
                            verifier.drop_slots().await;
                        }
                        break;
                    }
                    Err(e) => {
                        // The evidence is intact: reconnect and go on where it was.
                        if let Err(again) = verifier.reconnect().await {
                            tracing::debug!(cutover = %id, error = %again, "online verification could not reconnect yet");
                        }
                        Err(e)
                    }
                }
            }
        };
        drop(guard);
        match outcome {
            Ok(busy) => {
                run.view.lock().expect("view poisoned").last_error = None;
                backoff = Duration::from_millis(500);
                if !busy {
                    tokio::time::sleep(IDLE_ROUND).await;
                }
            }
            Err(e)
                if run.view.lock().expect("view poisoned").progress.is_none()
                    && e.code().is_some_and(|c| refused_for_good(&c)) =>
            {
                // wal_level, slot limits, privileges: nothing a retry mends.
                tracing::warn!(cutover = %id, error = %e, "online verification cannot run; the freeze will verify every row");
                run.view.lock().expect("view poisoned").unavailable = Some(e.to_string());
                run.paused.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::warn!(cutover = %id, error = %e, "online verification round failed; retrying");
                run.view.lock().expect("view poisoned").last_error = Some(e.to_string());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    // This pass's slots go with it (a new pass, here or in the new leader, has its own); a
    // cutover that ended had them dropped by its cleanup already.
    if let Some(verifier) = run.verifier.lock().await.take()
        && !run.stop.load(Ordering::SeqCst)
    {
        verifier.drop_slots().await;
    }
    // Gone from the registry (unless a newer run replaced it): the next step starts afresh.
    let mut runs = RUNS.lock().expect("online runs poisoned");
    if runs.get(&id).is_some_and(|r| Arc::ptr_eq(r, &run)) {
        runs.remove(&id);
    }
}
