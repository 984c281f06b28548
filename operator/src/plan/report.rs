//! The timing report of a cutover or a rehearsal, built from `status.steps`: how long each step
//! took, how long writes were frozen, and which step was the slowest.

use std::fmt::Write as _;
use std::time::Duration;

use crate::api::units::parse_timestamp;
use crate::api::{DatabaseCutoverStatus, Phase, StepOutcome};

/// One step's timing.
#[derive(Clone, Debug, PartialEq)]
pub struct StepTiming {
    /// The step.
    pub phase: Phase,
    /// How long it took (so far, for a running step).
    pub duration: Duration,
    /// How it ended.
    pub outcome: StepOutcome,
    /// Why, when it failed.
    pub message: Option<String>,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq)]
pub struct TimingReport {
    /// Where the cutover ended (or is).
    pub phase: Phase,
    /// Every step, in order.
    pub steps: Vec<StepTiming>,
    /// Seconds writes on the source were frozen.
    pub write_freeze: Option<Duration>,
    /// The slowest step.
    pub slowest: Option<Phase>,
    /// From the first step's start to the last step's end.
    pub total: Duration,
    /// Rows compared by verification.
    pub rows_verified: Option<i64>,
    /// How long the online verification's first pass took (before the freeze).
    pub online_verification: Option<Duration>,
    /// How long verification took inside the freeze, and how many changed keys it compared.
    pub in_freeze_verification: Option<(Duration, Option<i64>)>,
    /// Changes the change witness saw on the source after the freeze (`None`: not watched, or
    /// the witness was lost).
    pub source_writes: Option<i64>,
    /// Why it stopped, if it aborted or rolled back.
    pub message: Option<String>,
}

/// Builds the report from the status; `now` closes a step still running.
pub fn timing_report(status: &DatabaseCutoverStatus, now: jiff::Timestamp) -> TimingReport {
    let steps: Vec<StepTiming> = status
        .steps
        .iter()
        .filter(|s| !s.name.is_terminal())
        .map(|s| {
            let start = parse_timestamp(&s.started_at).ok();
            let end = s
                .finished_at
                .as_deref()
                .and_then(|t| parse_timestamp(t).ok())
                .unwrap_or(now);
            let duration = start
                .and_then(|st| Duration::try_from(end.duration_since(st)).ok())
                .unwrap_or_default();
            StepTiming {
                phase: s.name,
                duration,
                outcome: s.outcome,
                message: s.message.clone(),
            }
        })
        .collect();
    let slowest = steps.iter().max_by_key(|s| s.duration).map(|s| s.phase);
    let total = steps.iter().map(|s| s.duration).sum();
    TimingReport {
        phase: status.phase,
        slowest,
        total,
        write_freeze: status.write_freeze_seconds.map(Duration::from_secs_f64),
        rows_verified: status.verification.as_ref().map(|v| v.rows_compared),
        online_verification: status
            .online_verification
            .as_ref()
            .and_then(|o| o.pass_seconds)
            .and_then(|s| Duration::try_from_secs_f64(s).ok()),
        in_freeze_verification: status.verification.as_ref().and_then(|v| {
            v.in_freeze_seconds
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .map(|d| (d, v.keys_in_freeze))
        }),
        source_writes: status
            .source_writes
            .as_ref()
            .filter(|w| !w.witness_lost)
            .map(|w| w.count),
        message: status.message.clone(),
        steps,
    }
}

impl TimingReport {
    /// The report as a table for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<18} {:>10}  outcome", "step", "duration");
        for s in &self.steps {
            let mark = if Some(s.phase) == self.slowest {
                "  ← slowest"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{:<18} {:>10}  {:?}{mark}",
                s.phase.as_str(),
                format_duration(s.duration),
                s.outcome
            );
            if let Some(m) = &s.message {
                let _ = writeln!(out, "{:<18} {m}", "");
            }
        }
        let _ = writeln!(out, "{:<18} {:>10}", "total", format_duration(self.total));
        let _ = writeln!(
            out,
            "write freeze: {}",
            self.write_freeze
                .map_or_else(|| "none".into(), format_duration)
        );
        if let Some(rows) = self.rows_verified {
            let _ = writeln!(out, "rows verified: {rows}");
        }
        if let Some(d) = self.online_verification {
            let _ = writeln!(
                out,
                "verification online (before the freeze): {}",
                format_duration(d)
            );
        }
        if let Some((d, keys)) = self.in_freeze_verification {
            let keys = keys.map_or_else(String::new, |k| format!(" ({k} changed keys)"));
            let _ = writeln!(
                out,
                "verification inside the freeze: {}{keys}",
                format_duration(d)
            );
        }
        if let Some(n) = self.source_writes {
            let _ = writeln!(out, "writes on the source after the freeze: {n}");
        }
        let _ = writeln!(out, "result: {}", self.phase);
        if let Some(m) = &self.message {
            let _ = writeln!(out, "message: {m}");
        }
        out
    }
}

/// `1.234s`, `2m03s`, `1h02m`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.3}s")
    } else if secs < 3600.0 {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{}h{:02}m", d.as_secs() / 3600, (d.as_secs() % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StepRecord;

    fn step(phase: Phase, start: i64, end: Option<i64>, outcome: StepOutcome) -> StepRecord {
        let t = |s: i64| {
            jiff::Timestamp::from_second(1_800_000_000 + s)
                .unwrap()
                .to_string()
        };
        StepRecord {
            name: phase,
            started_at: t(start),
            finished_at: end.map(t),
            outcome,
            message: None,
        }
    }

    #[test]
    fn durations_slowest_step_and_freeze() {
        let status = DatabaseCutoverStatus {
            phase: Phase::Completed,
            steps: vec![
                step(Phase::Preflight, 0, Some(2), StepOutcome::Succeeded),
                step(Phase::Replicating, 2, Some(62), StepOutcome::Succeeded),
                step(Phase::Freezing, 62, Some(63), StepOutcome::Succeeded),
                step(Phase::Completed, 63, Some(63), StepOutcome::Succeeded),
            ],
            write_freeze_seconds: Some(1.5),
            ..DatabaseCutoverStatus::default()
        };
        let now = jiff::Timestamp::from_second(1_800_000_100).unwrap();
        let r = timing_report(&status, now);
        assert_eq!(r.steps.len(), 3, "the terminal phase is not a step");
        assert_eq!(r.slowest, Some(Phase::Replicating));
        assert_eq!(r.total, Duration::from_secs(63));
        assert_eq!(r.write_freeze, Some(Duration::from_millis(1500)));
        let text = r.render();
        assert!(
            text.contains("Replicating") && text.contains("1m00s") && text.contains("← slowest"),
            "{text}"
        );
        assert!(text.contains("write freeze: 1.500s"), "{text}");
    }

    #[test]
    fn a_running_step_is_timed_until_now() {
        let status = DatabaseCutoverStatus {
            phase: Phase::Verifying,
            steps: vec![step(Phase::Verifying, 0, None, StepOutcome::Running)],
            ..DatabaseCutoverStatus::default()
        };
        let now = jiff::Timestamp::from_second(1_800_000_030).unwrap();
        assert_eq!(
            timing_report(&status, now).steps[0].duration,
            Duration::from_secs(30)
        );
    }
}
