//! Condition types and their reasons, and the one function that sets a condition.
//!
//! Condition types are fixed (`Ready`, `Progressing`, `Degraded`); reasons are a closed enum so
//! dashboards and alerts can match on them. `lastTransitionTime` moves only when the status of a
//! condition flips, never when only its message changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition types the operator maintains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// The cutover reached its goal (Completed, or RolledBack/Aborted cleanly) — or not yet.
    Ready,
    /// The operator is moving the cutover forward.
    Progressing,
    /// Something needs a person: broken replication, a failed check, an unhealthy rollout.
    Degraded,
}

impl ConditionType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Progressing => "Progressing",
            ConditionType::Degraded => "Degraded",
        }
    }
}

/// Why a condition has its status. CamelCase on the wire, as Kubernetes expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The cutover has not started.
    Pending,
    /// A step is running.
    StepRunning,
    /// Waiting for a person to approve the point of no return.
    AwaitingApproval,
    /// The cutover completed.
    Completed,
    /// The cutover aborted before the point of no return.
    Aborted,
    /// The application was moved back to the source.
    RolledBack,
    /// Nothing is wrong.
    Healthy,
    /// Replication is broken or lagging beyond bounds.
    ReplicationBroken,
    /// A check failed (preflight or verification).
    CheckFailed,
    /// A restarted workload does not finish rolling out.
    RolloutStuck,
    /// A hypercare checkpoint found the target and the source differ.
    CheckpointMismatch,
    /// Something wrote to the source after the switch that reverse replication did not bring.
    SourceWrittenAfterSwitch,
    /// The operator cannot reach a database or the API server; it retries.
    TransientError,
    /// The spec cannot be acted on; it waits for a change.
    InvalidSpec,
}

impl Reason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Pending => "Pending",
            Reason::StepRunning => "StepRunning",
            Reason::AwaitingApproval => "AwaitingApproval",
            Reason::Completed => "Completed",
            Reason::Aborted => "Aborted",
            Reason::RolledBack => "RolledBack",
            Reason::Healthy => "Healthy",
            Reason::ReplicationBroken => "ReplicationBroken",
            Reason::CheckFailed => "CheckFailed",
            Reason::RolloutStuck => "RolloutStuck",
            Reason::CheckpointMismatch => "CheckpointMismatch",
            Reason::SourceWrittenAfterSwitch => "SourceWrittenAfterSwitch",
            Reason::TransientError => "TransientError",
            Reason::InvalidSpec => "InvalidSpec",
        }
    }
}

/// Sets a condition in `conditions`, keeping `lastTransitionTime` when the status is unchanged.
/// Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: ConditionType,
    status: bool,
    reason: Reason,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: jiff::Timestamp,
) -> bool {
    let status = if status { "True" } else { "False" }.to_owned();
    let message = message.into();
    let reason = reason.as_str().to_owned();
    match conditions.iter_mut().find(|c| c.type_ == kind.as_str()) {
        Some(existing) => {
            let before = existing.clone();
            if existing.status != status {
                existing.last_transition_time = Time(now);
                existing.status = status;
            }
            existing.reason = reason;
            existing.message = message;
            existing.observed_generation = observed_generation;
            *existing != before
        }
        None => {
            conditions.push(Condition {
                type_: kind.as_str().to_owned(),
                status,
                reason,
                message,
                observed_generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// Finds a condition by type.
pub fn condition(conditions: &[Condition], kind: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == kind.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    fn at(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = Vec::new();
        let progressing = ConditionType::Progressing;
        assert!(set_condition(
            &mut conds,
            progressing,
            true,
            Reason::StepRunning,
            "a",
            Some(1),
            at(0)
        ));
        let first = conds[0].last_transition_time.clone();

        // Same status, new message: changed, but the transition time stays.
        assert!(set_condition(
            &mut conds,
            progressing,
            true,
            Reason::StepRunning,
            "b",
            Some(1),
            at(10)
        ));
        assert_eq!(conds[0].last_transition_time, first);
        assert_eq!(conds[0].message, "b");

        // Nothing new: unchanged.
        assert!(!set_condition(
            &mut conds,
            progressing,
            true,
            Reason::StepRunning,
            "b",
            Some(1),
            at(20)
        ));

        // Status flips: the transition time moves.
        assert!(set_condition(
            &mut conds,
            progressing,
            false,
            Reason::Completed,
            "done",
            Some(1),
            at(30)
        ));
        assert_ne!(conds[0].last_transition_time, first);
        assert_eq!(conds.len(), 1);
        assert_eq!(condition(&conds, progressing).unwrap().reason, "Completed");
    }
}
