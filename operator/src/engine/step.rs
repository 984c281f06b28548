//! One step of a cutover — observe → decide → record intent → act → record — written once and
//! run by the operator, local mode and the tests alike. Where the status goes differs (the API
//! server with a resourceVersion precondition, a state file, nowhere), so it goes through a
//! [`Sink`]; what to do and how long to pause afterwards is the plan's decision.

use std::future::Future;
use std::time::Duration;

use tracing::warn;

use super::{Engine, failure};
use crate::api::DatabaseCutoverStatus;
use crate::plan::{self, Action, Observations, Outcome};
use crate::platform::Platform;

/// Where the status of each step is recorded.
pub trait Sink {
    /// Why recording failed (the step is then not taken as done).
    type Error: Send;

    /// Records `status`, computed from the last status this sink returned, after (or, for an
    /// intent, before) `action`. Returns the status as stored, which the next step starts
    /// from. A sink may skip writing a status equal to the one it holds.
    fn write(
        &mut self,
        status: &DatabaseCutoverStatus,
        action: &Action,
    ) -> impl Future<Output = Result<DatabaseCutoverStatus, Self::Error>> + Send;

    /// Called right before an action with effects on the databases or the cluster is
    /// performed: a sink that shares the cutover with other processes (the operator's replicas)
    /// checks here that this process may still act and that the status it planned from is
    /// still the stored one. An error means the action is not performed.
    fn before_action(
        &mut self,
        _action: &Action,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        std::future::ready(Ok(()))
    }
}

/// A sink that keeps nothing: for tests that look at each step's status themselves.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSink;

impl Sink for NoSink {
    type Error = std::convert::Infallible;

    async fn write(
        &mut self,
        status: &DatabaseCutoverStatus,
        _action: &Action,
    ) -> Result<DatabaseCutoverStatus, Self::Error> {
        Ok(status.clone())
    }
}

/// A sink that shows each status to a function and keeps nothing (benchmarks and tests that
/// watch the sequence go by).
#[derive(Clone, Copy, Debug)]
pub struct Watch<F>(pub F);

impl<F: FnMut(&DatabaseCutoverStatus, &Action) + Send> Sink for Watch<F> {
    type Error = std::convert::Infallible;

    async fn write(
        &mut self,
        status: &DatabaseCutoverStatus,
        action: &Action,
    ) -> Result<DatabaseCutoverStatus, Self::Error> {
        (self.0)(status, action);
        Ok(status.clone())
    }
}

/// What one step did.
#[derive(Clone, Debug)]
pub struct Step {
    /// The status after it, as the sink stored it.
    pub status: DatabaseCutoverStatus,
    /// The action the plan chose (`Idle` when the observation itself failed).
    pub action: Action,
    /// How long to pause before the next step.
    pub pause: Duration,
}

impl<P: Platform> Engine<P> {
    /// Takes one step from `status`. Failures of the observation or of the action are recorded
    /// in the status (retried when transient, within the step's budget); only the sink's own
    /// failure is an error, and then nothing after the last successful write counts as done.
    pub async fn step<S: Sink + Send>(
        &self,
        status: &DatabaseCutoverStatus,
        deleting: bool,
        sink: &mut S,
    ) -> Result<Step, S::Error> {
        let now = jiff::Timestamp::now;
        let obs = match self.observe(status, deleting).await {
            Ok(obs) => obs,
            Err(e) => {
                warn!(cutover = %self.id, phase = %status.phase, error = %e, transient = e.is_transient(), "observation failed");
                let action = Action::Idle;
                let recorded = plan::record(
                    &self.spec,
                    status,
                    &action,
                    Outcome::Failed(failure(&e)),
                    &Observations {
                        deleting,
                        ..Observations::default()
                    },
                    now(),
                );
                let status = sink.write(&recorded, &action).await?;
                let pause = plan::pause_after(&status, &action);
                return Ok(Step {
                    status,
                    action,
                    pause,
                });
            }
        };
        let action = plan::next_action(&self.spec, status, &obs, now());
        let mut current = status.clone();
        if let Some(with_intent) = plan::record_intent(&current, &action) {
            // Intent first: after a crash the step is finished or verified, never repeated.
            current = sink.write(&with_intent, &action).await?;
        }
        let outcome = match action {
            Action::Wait(_) | Action::Idle => Outcome::Done,
            // Status-only actions: their record is fenced like every write.
            Action::Advance(_) | Action::Abort(_) | Action::PassPointOfNoReturn => {
                self.perform(&action, &current).await
            }
            _ => {
                sink.before_action(&action).await?;
                self.perform(&action, &current).await
            }
        };
        if let Outcome::Failed(f) = &outcome {
            warn!(cutover = %self.id, ?action, error = %f.message, transient = f.transient, "action failed");
        }
        let recorded = plan::record(&self.spec, &current, &action, outcome, &obs, now());
        let status = sink.write(&recorded, &action).await?;
        let pause = plan::pause_after(&status, &action);
        Ok(Step {
            status,
            action,
            pause,
        })
    }
}

/// Drives a cutover from `status` to a terminal phase, one [`Engine::step`] at a time, pausing
/// as the plan says between steps. Returns the final status, or the sink's first error.
pub async fn drive<P: Platform, S: Sink + Send>(
    engine: &Engine<P>,
    mut status: DatabaseCutoverStatus,
    sink: &mut S,
) -> Result<DatabaseCutoverStatus, S::Error> {
    while !status.phase.is_terminal() {
        let step = engine.step(&status, false, sink).await?;
        status = step.status;
        if !status.phase.is_terminal() && !step.pause.is_zero() {
            tokio::time::sleep(step.pause).await;
        }
    }
    Ok(status)
}
