//! The sequence as pure data: which phase may follow which.
//!
//! `plan` decides, the IO layers act. Nothing here touches a database, the API server or the
//! clock; time comes in as an argument. The transition table below is the contract every
//! decision is checked against: the controller refuses to record a phase change the table does
//! not allow.

mod next;
#[cfg(test)]
mod next_tests;
pub mod report;

pub use next::{
    APPLY_FAILING_FOR, APPLY_FAILING_IN_FREEZE, APPLY_QUIET, Action, ApplyObservation,
    CHECKPOINT_CATCH_UP, CleanupScope, CopyObservation, FAST_POLL, FROZEN_RETRY_MAX,
    FROZEN_RETRY_MIN, Failure, IDLE, JobState, MigrationSet, Needs, ONLINE_UNAVAILABLE,
    Observations, Outcome, POLL, REVERSE_CATCH_UP, ReplicationObservation, SYNC_WAIT,
    WitnessObservation, checkpoint_offsets, cleanup_scope, next_action, observation_needs, record,
    record_intent,
};
pub use report::{TimingReport, format_duration, timing_report};

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::api::conditions::{ConditionType, Reason, set_condition};
use crate::api::{DatabaseCutoverStatus, Phase, ProblemKind};

/// The phases that may follow `from`.
///
/// Forward along the sequence; to `Aborting` from any step before the point of no return; to
/// `RollingBack` only from hypercare. Terminal phases have no successors.
pub fn successors(from: Phase) -> &'static [Phase] {
    use Phase::*;
    match from {
        Pending => &[Preflight, Aborting],
        Preflight => &[Migrating, Replicating, Aborting],
        Migrating => &[Replicating, Aborting],
        Replicating => &[Freezing, Aborting],
        Freezing => &[FinalSync, Aborting],
        FinalSync => &[Verifying, Aborting],
        Verifying => &[AwaitingApproval, Aborting],
        AwaitingApproval => &[Switching, Aborting],
        // Past the point of no return a failed switch goes back to the source at once; a
        // rehearsal ends right after its (rehearsal) switch.
        Switching => &[Hypercare, RollingBack, Completed],
        Hypercare => &[Completed, RollingBack],
        Aborting => &[Aborted],
        RollingBack => &[RolledBack],
        Completed | Aborted | RolledBack => &[],
    }
}

/// Whether the sequence allows going from `from` to `to` (staying put is always allowed).
pub fn can_transition(from: Phase, to: Phase) -> bool {
    from == to || successors(from).contains(&to)
}

/// What the conditions say in a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// `Ready`: the cutover reached a resting state.
    pub ready: bool,
    /// `Progressing`: the operator is moving it forward.
    pub progressing: bool,
    /// `Degraded`: a person should look.
    pub degraded: bool,
    /// The reason on all three conditions.
    pub reason: Reason,
    /// One sentence for people (Event note and condition message).
    pub message: &'static str,
}

/// The conditions of a phase.
pub fn summary(phase: Phase) -> Summary {
    use Phase::*;
    let (ready, progressing, degraded, reason, message) = match phase {
        Pending => (
            false,
            true,
            false,
            Reason::Pending,
            "accepted; the cutover starts with preflight checks",
        ),
        Preflight => (
            false,
            true,
            false,
            Reason::StepRunning,
            "checking both databases",
        ),
        Migrating => (
            false,
            true,
            false,
            Reason::StepRunning,
            "applying schema migrations to the target",
        ),
        Replicating => (
            false,
            true,
            false,
            Reason::StepRunning,
            "copying and streaming changes to the target",
        ),
        Freezing => (
            false,
            true,
            false,
            Reason::StepRunning,
            "stopping writes on the source",
        ),
        FinalSync => (
            false,
            true,
            false,
            Reason::StepRunning,
            "waiting for the target to apply the last writes",
        ),
        Verifying => (
            false,
            true,
            false,
            Reason::StepRunning,
            "comparing source and target",
        ),
        AwaitingApproval => (
            false,
            true,
            false,
            Reason::AwaitingApproval,
            "verified; waiting to pass the point of no return",
        ),
        Switching => (
            false,
            true,
            false,
            Reason::StepRunning,
            "pointing the application at the target",
        ),
        Hypercare => (
            false,
            true,
            false,
            Reason::StepRunning,
            "the application runs on the target; the source is kept ready for rollback",
        ),
        Completed => (
            true,
            false,
            false,
            Reason::Completed,
            "the application runs on the target; replication objects removed",
        ),
        Aborting => (
            false,
            true,
            true,
            Reason::Aborted,
            "aborting: unfreezing the source and removing replication objects",
        ),
        Aborted => (
            true,
            false,
            true,
            Reason::Aborted,
            "aborted before the point of no return; the source is writable and authoritative",
        ),
        RollingBack => (
            false,
            true,
            true,
            Reason::RolledBack,
            "moving the application back to the source",
        ),
        RolledBack => (
            true,
            false,
            true,
            Reason::RolledBack,
            "the application is back on the source",
        ),
    };
    Summary {
        ready,
        progressing,
        degraded,
        reason,
        message,
    }
}

/// The status the object should have: the current one with `observedGeneration` and the
/// conditions brought in line with the phase. Condition transition times move only on a flip.
/// `trouble` (a reason and a message) marks the cutover `Degraded` whatever its phase: a
/// database or Secret that cannot be read, an action that keeps failing.
pub fn desired_status(
    current: &DatabaseCutoverStatus,
    generation: Option<i64>,
    now: jiff::Timestamp,
    trouble: Option<(Reason, &str)>,
) -> DatabaseCutoverStatus {
    let mut status = current.clone();
    status.observed_generation = generation;
    // A step being retried after transient failures is Degraded until it succeeds.
    let retrying = current
        .retry
        .as_ref()
        .map(|r| format!("retrying after {} failures: {}", r.attempts, r.message));
    let trouble = trouble.or(retrying
        .as_deref()
        .map(|message| (Reason::TransientError, message)));
    let s = summary(status.phase);
    // Hypercare problems stay until they go away; an error of this pass outranks them.
    let problems = hypercare_problems(&status);
    let (degraded, degraded_reason, degraded_message) = match (trouble, &problems) {
        (Some((reason, message)), _) => (true, reason, message),
        (None, Some((reason, message))) => (true, *reason, message.as_str()),
        (None, None) if s.degraded => (true, s.reason, s.message),
        (None, None) => (false, Reason::Healthy, s.message),
    };
    for (kind, value, reason, message) in [
        (ConditionType::Ready, s.ready, s.reason, s.message),
        (
            ConditionType::Progressing,
            s.progressing,
            s.reason,
            s.message,
        ),
        (
            ConditionType::Degraded,
            degraded,
            degraded_reason,
            degraded_message,
        ),
    ] {
        set_condition(
            &mut status.conditions,
            kind,
            value,
            reason,
            message,
            generation,
            now,
        );
    }
    status
}

/// The Degraded reason and message for the problems hypercare found, if any.
fn hypercare_problems(status: &DatabaseCutoverStatus) -> Option<(Reason, String)> {
    if status.phase != Phase::Hypercare {
        return None;
    }
    let problems = &status.hypercare.as_ref()?.problems;
    let first = problems.first()?;
    let reason = match first.reason {
        ProblemKind::ReplicationBroken => Reason::ReplicationBroken,
        ProblemKind::RolloutStuck => Reason::RolloutStuck,
        ProblemKind::CheckpointMismatch => Reason::CheckpointMismatch,
        ProblemKind::SourceWrittenAfterSwitch => Reason::SourceWrittenAfterSwitch,
    };
    let text: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
    Some((reason, text.join("; ")))
}

/// How long to wait before retrying after `attempt` consecutive failures: exponential from one
/// second, capped at five minutes, with no jitter so the schedule is predictable.
pub fn retry_delay(attempt: u32) -> Duration {
    let max = Duration::from_secs(300);
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(max)
        .with_factor(2.0)
        .without_max_times()
        .build()
        // Past 2^9 s the cap holds anyway; bounding the walk keeps huge counts cheap.
        .nth(attempt.saturating_sub(1).min(16) as usize)
        .unwrap_or(max)
}

/// How long to pause after a step that left `status`, having taken `action`: the wait the
/// plan asked for, a backoff while a transient failure repeats (short while writes are
/// frozen), or nothing when the next step can follow at once.
pub fn pause_after(status: &DatabaseCutoverStatus, action: &next::Action) -> Duration {
    if let Some(retry) = &status.retry {
        let attempt = u32::try_from(retry.attempts.max(1)).unwrap_or(1);
        return if status.phase.source_may_be_frozen() {
            frozen_retry_delay(attempt)
        } else {
            retry_delay(attempt)
        };
    }
    match action {
        next::Action::Wait(d) => *d,
        next::Action::Idle => IDLE,
        _ if status.phase.is_terminal() => IDLE,
        _ => Duration::ZERO,
    }
}

/// Retry delays while writes are frozen: from [`FROZEN_RETRY_MIN`], doubling, capped at
/// [`FROZEN_RETRY_MAX`].
pub fn frozen_retry_delay(attempt: u32) -> Duration {
    // Exact doubling in whole milliseconds (backon's factor is a float: 200 ms × 2 comes out
    // as 400.000006 ms).
    let doubled = FROZEN_RETRY_MIN.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    doubled.min(FROZEN_RETRY_MAX)
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_phase_reaches_a_terminal_phase() {
        for start in Phase::ALL {
            let mut seen = BTreeSet::new();
            let mut frontier = vec![start];
            while let Some(p) = frontier.pop() {
                if seen.insert(p) {
                    frontier.extend(successors(p));
                }
            }
            assert!(
                seen.iter().any(|p| p.is_terminal()),
                "{start} cannot finish"
            );
        }
    }

    #[test]
    fn abort_is_possible_exactly_before_the_point_of_no_return() {
        for p in Phase::ALL {
            let can_abort = can_transition(p, Phase::Aborting) && p != Phase::Aborting;
            let before =
                !p.is_past_point_of_no_return() && !p.is_terminal() && p != Phase::Aborting;
            assert_eq!(can_abort, before, "{p}");
        }
    }

    #[test]
    fn the_point_of_no_return_is_crossed_only_after_approval() {
        for from in Phase::ALL {
            for &to in successors(from) {
                if to.is_past_point_of_no_return() && !from.is_past_point_of_no_return() {
                    assert_eq!((from, to), (Phase::AwaitingApproval, Phase::Switching));
                }
            }
        }
    }

    #[test]
    fn rollback_only_after_the_switch_began() {
        for from in Phase::ALL {
            if successors(from).contains(&Phase::RollingBack) {
                assert!(
                    matches!(from, Phase::Switching | Phase::Hypercare),
                    "{from}"
                );
            }
        }
    }

    #[test]
    fn desired_status_records_generation_and_conditions_once() {
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let first = desired_status(&DatabaseCutoverStatus::default(), Some(3), now, None);
        assert_eq!(first.phase, Phase::Pending);
        assert_eq!(first.observed_generation, Some(3));
        let types: Vec<_> = first
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(
            types,
            [
                ("Ready", "False"),
                ("Progressing", "True"),
                ("Degraded", "False")
            ]
        );

        // Reconciling again later changes nothing, so the operator does not wake itself up.
        let later = now + jiff::SignedDuration::from_secs(60);
        assert_eq!(desired_status(&first, Some(3), later, None), first);

        // Trouble marks Degraded with its reason, and recovering clears it.
        let trouble = Some((Reason::TransientError, "blue unreachable"));
        let troubled = desired_status(&first, Some(3), later, trouble);
        let degraded = troubled
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "TransientError")
        );
        assert_eq!(degraded.message, "blue unreachable");
        let healed = desired_status(&troubled, Some(3), later, None);
        let degraded = healed
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .unwrap();
        assert_eq!(degraded.status, "False");
    }

    #[test]
    fn conditions_match_the_phase() {
        for p in Phase::ALL {
            let s = summary(p);
            assert_eq!(s.ready, p.is_terminal(), "{p}");
            assert_eq!(s.progressing, !p.is_terminal(), "{p}");
            assert!(!s.message.is_empty());
        }
        assert!(summary(Phase::Aborted).degraded);
        assert!(!summary(Phase::Completed).degraded);
    }

    #[test]
    fn retries_back_off_exponentially_and_cap() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(2), Duration::from_secs(2));
        assert_eq!(retry_delay(4), Duration::from_secs(8));
        assert_eq!(retry_delay(30), Duration::from_secs(300));
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn frozen_retries_start_short_and_cap() {
        assert_eq!(frozen_retry_delay(1), Duration::from_millis(200));
        assert_eq!(frozen_retry_delay(2), Duration::from_millis(400));
        assert_eq!(frozen_retry_delay(6), Duration::from_secs(5));
        assert_eq!(frozen_retry_delay(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn terminal_phases_have_no_successors() {
        for p in Phase::ALL.into_iter().filter(|p| p.is_terminal()) {
            assert!(successors(p).is_empty());
            assert!(can_transition(p, p));
        }
    }
}
