//! Table tests for every phase × observation, and a simulation over random observation
//! sequences that checks the invariants of the sequence.

use std::time::Duration;

use super::next::*;
use crate::api::OnlineVerificationStatus;
use crate::api::{
    Approval, CheckOutcome, CheckResult, CheckpointStatus, DatabaseCutover, DatabaseCutoverSpec,
    DatabaseCutoverStatus, Milestone, Mode, Phase, StepOutcome, StepRecord, TableVerification,
    ValidSpec, VerificationStatus,
};

fn plan(file: &str) -> DatabaseCutoverSpec {
    let text = match file {
        "rollback" => include_str!("../../../cutover-plans/production-with-rollback.yaml"),
        "manual" => include_str!("../../../cutover-plans/production-manual-approval.yaml"),
        "rehearsal" => include_str!("../../../cutover-plans/staging-rehearsal.yaml"),
        other => panic!("no plan {other}"),
    };
    serde_saphyr::from_str::<DatabaseCutover>(text)
        .unwrap()
        .spec
}

/// The plan works from validated specs; the tests change a spec, then hand it over as the
/// controller does, validated (every spec here is valid).
fn valid(spec: &DatabaseCutoverSpec) -> ValidSpec {
    ValidSpec::new(spec.clone()).expect("the test's spec is valid")
}

fn next_action(
    spec: &DatabaseCutoverSpec,
    status: &DatabaseCutoverStatus,
    obs: &Observations,
    now: jiff::Timestamp,
) -> Action {
    super::next::next_action(&valid(spec), status, obs, now)
}

fn record(
    spec: &DatabaseCutoverSpec,
    status: &DatabaseCutoverStatus,
    action: &Action,
    outcome: Outcome,
    obs: &Observations,
    now: jiff::Timestamp,
) -> DatabaseCutoverStatus {
    super::next::record(&valid(spec), status, action, outcome, obs, now)
}

fn t(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

/// A status in `phase` whose step started at `t(started)`.
fn in_phase(phase: Phase, started: i64) -> DatabaseCutoverStatus {
    DatabaseCutoverStatus {
        phase,
        steps: vec![StepRecord {
            name: phase,
            started_at: t(started).to_string(),
            finished_at: None,
            outcome: StepOutcome::Running,
            message: None,
        }],
        ..DatabaseCutoverStatus::default()
    }
}

fn with(
    mut s: DatabaseCutoverStatus,
    f: impl FnOnce(&mut DatabaseCutoverStatus),
) -> DatabaseCutoverStatus {
    f(&mut s);
    s
}

fn caught_up() -> Observations {
    Observations {
        replication: Some(ReplicationObservation {
            tables_ready: 3,
            tables_total: 3,
            lag_bytes: 1024,
            broken: None,
        }),
        online: Some(OnlineVerificationStatus {
            state: "Current".into(),
            started_at: Some("2026-01-01T00:00:00Z".into()),
            ranges_total: 8,
            ranges_proven: 8,
            dirty_keys: 12,
            ..OnlineVerificationStatus::default()
        }),
        ..Observations::default()
    }
}

fn check(name: &str, outcome: CheckOutcome) -> CheckResult {
    CheckResult {
        name: name.into(),
        outcome,
        message: format!("{name} said so"),
    }
}

fn abort_reason(action: Action) -> String {
    match action {
        Action::Abort(why) => why,
        other => panic!("expected an abort, got {other:?}"),
    }
}

#[test]
fn pending_starts_with_preflight() {
    let a = next_action(
        &plan("rollback"),
        &DatabaseCutoverStatus::default(),
        &Observations::default(),
        t(0),
    );
    assert_eq!(a, Action::Advance(Phase::Preflight));
}

#[test]
fn preflight_runs_then_gates() {
    let spec = plan("rollback");
    let none = Observations::default();
    let s = in_phase(Phase::Preflight, 0);
    assert_eq!(next_action(&spec, &s, &none, t(1)), Action::RunPreflight);

    let failed = with(s.clone(), |s| {
        s.preflight = vec![
            check("wal_level", CheckOutcome::Fail),
            check("versions", CheckOutcome::Pass),
        ]
    });
    let why = abort_reason(next_action(&spec, &failed, &none, t(1)));
    assert!(why.contains("wal_level: wal_level said so"), "{why}");
    assert!(!why.contains("versions"), "{why}");

    let warned = with(s.clone(), |s| {
        s.preflight = vec![check("long transactions", CheckOutcome::Warn)]
    });
    assert_eq!(
        next_action(&spec, &warned, &none, t(1)),
        Action::Advance(Phase::Replicating)
    );
    assert_eq!(
        next_action(&plan("manual"), &warned, &none, t(1)),
        Action::Advance(Phase::Migrating),
        "a plan with migrations migrates first"
    );
}

/// Observations holding only the migration Job's state.
fn job(state: Option<JobState>) -> Observations {
    Observations {
        migration_job: state,
        ..Observations::default()
    }
}

#[test]
fn migrations_follow_the_job() {
    let spec = plan("manual");
    let s = in_phase(Phase::Migrating, 0);
    assert_eq!(
        next_action(&spec, &s, &job(None), t(1)),
        Action::LaunchMigrations(MigrationSet::Initial)
    );
    assert_eq!(
        next_action(&spec, &s, &job(Some(JobState::Running)), t(1)),
        Action::Wait(POLL)
    );
    assert_eq!(
        next_action(&spec, &s, &job(Some(JobState::Succeeded)), t(1)),
        Action::Advance(Phase::Replicating)
    );
    let why = abort_reason(next_action(
        &spec,
        &s,
        &job(Some(JobState::Failed("BackoffLimitExceeded".into()))),
        t(1),
    ));
    assert!(why.contains("BackoffLimitExceeded"));
}

/// With the parallel copy, green's indexes are recorded first, then the copy starts, the plan
/// waits while it runs, starts it again once it has ended without a subscription, and goes on as
/// with the native copy once the subscription exists; its progress lands in the status.
#[test]
fn a_parallel_copy_records_green_indexes_first_and_waits_for_the_copy() {
    let mut spec = plan("rollback");
    spec.replication.initial_copy = crate::api::InitialCopy::Parallel;
    let fresh = in_phase(Phase::Replicating, 0);
    let none = Observations::default();
    assert_eq!(
        next_action(&spec, &fresh, &none, t(1)),
        Action::DeferIndexes
    );
    let index = crate::api::DeferredIndex {
        table: "public.t".into(),
        name: "t_v_idx".into(),
        kind: "Index".into(),
        definition: "CREATE INDEX t_v_idx ON public.t USING btree (v)".into(),
        ..crate::api::DeferredIndex::default()
    };
    let deferred = record(
        &spec,
        &fresh,
        &Action::DeferIndexes,
        Outcome::Deferred(vec![index.clone()]),
        &none,
        t(1),
    );
    assert!(deferred.milestones.contains(&Milestone::IndexesDeferred));
    assert_eq!(
        deferred.replication.as_ref().unwrap().deferred_indexes,
        [index]
    );
    assert_eq!(
        next_action(&spec, &deferred, &none, t(2)),
        Action::StartReplication
    );
    let started = record(
        &spec,
        &deferred,
        &Action::StartReplication,
        Outcome::Done,
        &none,
        t(2),
    );
    let copying = Observations {
        copy: Some(CopyObservation {
            status: crate::api::InitialCopyStatus {
                stage: "Copying".into(),
                bytes_copied: 10,
                ..Default::default()
            },
            running: true,
        }),
        ..Observations::default()
    };
    assert_eq!(
        next_action(&spec, &started, &copying, t(3)),
        Action::Wait(POLL)
    );
    let seen = record(
        &spec,
        &started,
        &Action::Wait(POLL),
        Outcome::Done,
        &copying,
        t(3),
    );
    let r = seen.replication.as_ref().unwrap();
    assert_eq!(r.initial_copy.as_ref().unwrap().stage, "Copying");
    assert_eq!(r.bytes_copied, Some(10));
    // Ended without a subscription (failed, or its process gone): started again, counted.
    assert_eq!(
        next_action(&spec, &seen, &none, t(4)),
        Action::StartReplication
    );
    let again = record(
        &spec,
        &seen,
        &Action::StartReplication,
        Outcome::Done,
        &none,
        t(4),
    );
    assert_eq!(again.replication.unwrap().initial_copy.unwrap().restarts, 1);
}

#[test]
fn replication_waits_for_copy_lag_and_schedule() {
    let mut spec = plan("rollback");
    spec.replication.initial_copy = crate::api::InitialCopy::Native;
    let fresh = in_phase(Phase::Replicating, 0);
    assert_eq!(
        next_action(&spec, &fresh, &Observations::default(), t(1)),
        Action::StartReplication
    );

    let mut copying = caught_up();
    copying.replication.as_mut().unwrap().tables_ready = 1;
    assert_eq!(
        next_action(&spec, &fresh, &copying, t(1)),
        Action::Wait(POLL)
    );
    // The copy done, green gets its planner statistics first, once.
    assert_eq!(
        next_action(&spec, &fresh, &caught_up(), t(1)),
        Action::Do(Milestone::TargetAnalyzed)
    );
    let s = with(fresh, |s| s.milestones.push(Milestone::TargetAnalyzed));

    let mut lagging = caught_up();
    lagging.replication.as_mut().unwrap().lag_bytes = 9 << 20; // the plan allows 8MiB
    assert_eq!(next_action(&spec, &s, &lagging, t(1)), Action::Wait(POLL));

    let mut broken = caught_up();
    broken.replication.as_mut().unwrap().broken = Some("slot lost".into());
    assert!(abort_reason(next_action(&spec, &s, &broken, t(1))).contains("slot lost"));

    // Online verification: started once caught up; the freeze waits for every range proven
    // and few changed keys; a divergence aborts before the freeze.
    let not_started = Observations {
        online: None,
        ..caught_up()
    };
    assert_eq!(
        next_action(&spec, &s, &not_started, t(1)),
        Action::StartOnlineVerification
    );
    let mut comparing = caught_up();
    comparing.online.as_mut().unwrap().ranges_proven = 5;
    assert_eq!(next_action(&spec, &s, &comparing, t(1)), Action::Wait(POLL));
    let mut busy = caught_up();
    busy.online.as_mut().unwrap().dirty_keys = spec.verification.max_dirty_keys + 1;
    assert_eq!(next_action(&spec, &s, &busy, t(1)), Action::Wait(POLL));
    let mut diverged = caught_up();
    diverged.online.as_mut().unwrap().divergence = Some("public.t differs: id=7".into());
    let why = abort_reason(next_action(&spec, &s, &diverged, t(1)));
    assert!(
        why.contains("online verification") && why.contains("id=7"),
        "{why}"
    );
    let mut unavailable = caught_up();
    unavailable.online = Some(OnlineVerificationStatus {
        state: crate::plan::ONLINE_UNAVAILABLE.into(),
        ..OnlineVerificationStatus::default()
    });
    assert_eq!(
        next_action(&spec, &s, &unavailable, t(1)),
        Action::Advance(Phase::Freezing)
    );

    assert_eq!(
        next_action(&spec, &s, &caught_up(), t(1)),
        Action::Advance(Phase::Freezing)
    );

    spec.schedule.freeze_at = Some(t(600).to_string().into());
    assert!(matches!(
        next_action(&spec, &s, &caught_up(), t(1)),
        Action::Wait(_)
    ));
    assert_eq!(
        next_action(&spec, &s, &caught_up(), t(600)),
        Action::Advance(Phase::Freezing)
    );
}

#[test]
fn freeze_then_final_sync_then_sequences() {
    let spec = plan("rollback");
    let none = Observations::default();
    let s = in_phase(Phase::Freezing, 0);
    assert_eq!(next_action(&spec, &s, &none, t(1)), Action::Freeze);
    let frozen = with(s, |s| s.frozen_at = Some(t(2).to_string()));
    assert_eq!(
        next_action(&spec, &frozen, &none, t(3)),
        Action::Advance(Phase::FinalSync)
    );

    let s = with(in_phase(Phase::FinalSync, 3), |s| {
        s.frozen_at = Some(t(2).to_string())
    });
    assert_eq!(next_action(&spec, &s, &none, t(4)), Action::Wait(FAST_POLL));
    let applied = Observations {
        applied_past_freeze: true,
        ..Observations::default()
    };
    assert_eq!(
        next_action(&spec, &s, &applied, t(4)),
        Action::Do(Milestone::SequencesCopied)
    );
    let copied = with(s, |s| s.milestones.push(Milestone::SequencesCopied));
    assert_eq!(
        next_action(&spec, &copied, &applied, t(4)),
        Action::Advance(Phase::Verifying)
    );
}

#[test]
fn verification_gates_and_names_the_difference() {
    let spec = plan("rollback");
    let none = Observations::default();
    let s = with(in_phase(Phase::Verifying, 0), |s| {
        s.frozen_at = Some(t(0).to_string())
    });
    assert_eq!(next_action(&spec, &s, &none, t(1)), Action::Verify);
    let mismatch = with(s.clone(), |s| {
        s.verification = Some(VerificationStatus {
            matched: false,
            rows_compared: 10,
            tables: vec![TableVerification {
                table: "public.accounts".into(),
                source_rows: 5,
                target_rows: 5,
                matched: false,
                differences: vec!["changed on target: id=42".into()],
            }],
            other_mismatches: vec![],
            ..VerificationStatus::default()
        })
    });
    let why = abort_reason(next_action(&spec, &mismatch, &none, t(1)));
    assert!(
        why.contains("public.accounts") && why.contains("id=42"),
        "{why}"
    );
    let matched = with(s, |s| {
        s.verification = Some(VerificationStatus {
            matched: true,
            ..VerificationStatus::default()
        })
    });
    assert_eq!(
        next_action(&spec, &matched, &none, t(1)),
        Action::Advance(Phase::AwaitingApproval)
    );
}

#[test]
fn approval_gate_automatic_manual_and_deadline() {
    let none = Observations::default();
    let s = with(in_phase(Phase::AwaitingApproval, 0), |s| {
        s.frozen_at = Some(t(0).to_string())
    });
    assert_eq!(
        next_action(&plan("rollback"), &s, &none, t(1)),
        Action::PassPointOfNoReturn
    );

    let mut manual = plan("manual"); // deadline 20m, maxWriteDowntime 10m
    manual.schedule.max_write_downtime = "1h".into();
    assert!(matches!(
        next_action(&manual, &s, &none, t(60)),
        Action::Wait(_)
    ));
    let why = abort_reason(next_action(&manual, &s, &none, t(20 * 60 + 1)));
    assert!(why.contains("no approval"), "{why}");
    manual.point_of_no_return.approved = true;
    assert_eq!(
        next_action(&manual, &s, &none, t(60)),
        Action::PassPointOfNoReturn
    );
}

#[test]
fn switch_order_production_with_rollback_readiness() {
    let spec = plan("rollback");
    let none = Observations::default();
    let mut s = in_phase(Phase::Switching, 0);
    let mut order = Vec::new();
    loop {
        match next_action(&spec, &s, &none, t(1)) {
            Action::Do(m) => {
                order.push(m);
                s = record(&spec, &s, &Action::Do(m), Outcome::Done, &none, t(1));
            }
            Action::Advance(Phase::Hypercare) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        order,
        [
            Milestone::ForwardReplicationDropped,
            Milestone::ReverseReplicationStarted,
            Milestone::TargetLoginAllowed,
            Milestone::SecretSwitched,
            Milestone::WorkloadsRestarted,
        ]
    );
    assert!(s.switched_at.is_some());
}

#[test]
fn post_switch_migrations_run_as_a_job_before_the_application_moves() {
    let mut spec = plan("manual");
    spec.migrations.as_mut().unwrap().post_switch_config_map_ref = Some(crate::api::ConfigMapRef {
        name: "orders-final-migrations".into(),
    });
    let s = with(in_phase(Phase::Switching, 0), |s| {
        s.milestones.push(Milestone::ForwardReplicationDropped);
    });
    assert_eq!(
        next_action(&spec, &s, &job(None), t(1)),
        Action::LaunchMigrations(MigrationSet::PostSwitch)
    );
    assert_eq!(
        next_action(&spec, &s, &job(Some(JobState::Running)), t(1)),
        Action::Wait(FAST_POLL)
    );
    // Success and failure both go to the milestone, whose action confirms the Job's outcome.
    for state in [
        JobState::Succeeded,
        JobState::Failed("BackoffLimitExceeded".into()),
    ] {
        assert_eq!(
            next_action(&spec, &s, &job(Some(state)), t(1)),
            Action::Do(Milestone::PostSwitchMigrated)
        );
    }
    // A failed Job fails the switch before the Secret moved: back to the source.
    let failed = record(
        &spec,
        &s,
        &Action::Do(Milestone::PostSwitchMigrated),
        Outcome::Failed(Failure::permanent(
            "post-switch migrations failed: BackoffLimitExceeded",
        )),
        &Observations::default(),
        t(2),
    );
    assert_eq!(failed.phase, Phase::RollingBack);
    assert!(failed.message.unwrap().contains("BackoffLimitExceeded"));
    // Done: the login check comes next, then the Secret.
    let migrated = record(
        &spec,
        &s,
        &Action::Do(Milestone::PostSwitchMigrated),
        Outcome::Done,
        &Observations::default(),
        t(2),
    );
    assert_eq!(
        next_action(&spec, &migrated, &Observations::default(), t(3)),
        Action::Do(Milestone::TargetLoginAllowed)
    );
}

#[test]
fn hypercare_problems_degrade_until_they_go_away() {
    use crate::api::conditions::ConditionType;
    let spec = plan("rollback");
    let s = with(in_phase(Phase::Hypercare, 0), |s| {
        s.switched_at = Some(t(0).to_string());
    });
    let degraded = |s: &DatabaseCutoverStatus| {
        let d = super::desired_status(s, Some(1), t(10), None);
        let c = d
            .conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Degraded.as_str())
            .unwrap()
            .clone();
        (c.status == "True", c.reason, c.message)
    };
    assert!(!degraded(&s).0);

    let broken = Observations {
        reverse_broken: Some("subscription cutover_rev is disabled".into()),
        rollout_problems: vec!["Deployment orders-api does not finish rolling out".into()],
        ..Observations::default()
    };
    let waiting = record(
        &spec,
        &s,
        &Action::Wait(POLL),
        Outcome::Done,
        &broken,
        t(10),
    );
    let problems = &waiting.hypercare.as_ref().unwrap().problems;
    assert_eq!(problems.len(), 2);
    let (is, reason, message) = degraded(&waiting);
    assert!(is);
    assert_eq!(reason, "ReplicationBroken");
    assert!(message.contains("cutover_rev is disabled"), "{message}");
    assert!(message.contains("orders-api"), "{message}");

    // A checkpoint that found a difference stays a problem until a later one matches.
    let mismatch = CheckpointStatus {
        tables: 2,
        compared_with_source: true,
        matched: false,
        mismatches: vec!["public.orders: 10 rows on green, 9 on blue".into()],
        ..CheckpointStatus::default()
    };
    let none = Observations::default();
    let checked = record(
        &spec,
        &waiting,
        &Action::Checkpoint(0),
        Outcome::Checked(mismatch),
        &none,
        t(15 * 60),
    );
    let h = checked.hypercare.as_ref().unwrap();
    assert_eq!(h.last_checkpoint.as_ref().unwrap().number, 1);
    assert_eq!(h.problems.len(), 1, "the repaired ones are gone: {h:?}");
    let (is, reason, message) = degraded(&checked);
    assert!(is);
    assert_eq!(reason, "CheckpointMismatch");
    assert!(message.contains("public.orders: 10 rows on green, 9 on blue"));

    let matched = CheckpointStatus {
        tables: 2,
        compared_with_source: true,
        matched: true,
        ..CheckpointStatus::default()
    };
    let fine = record(
        &spec,
        &checked,
        &Action::Checkpoint(1),
        Outcome::Checked(matched),
        &none,
        t(3600),
    );
    assert!(fine.hypercare.as_ref().unwrap().problems.is_empty());
    assert!(!degraded(&fine).0);
}

#[test]
fn entering_hypercare_records_when_it_ends() {
    let spec = plan("rollback"); // hypercare 24h
    let s = with(in_phase(Phase::Switching, 0), |s| {
        s.switched_at = Some(t(100).to_string());
    });
    let none = Observations::default();
    let h = record(
        &spec,
        &s,
        &Action::Advance(Phase::Hypercare),
        Outcome::Done,
        &none,
        t(101),
    );
    assert_eq!(h.hypercare_until, Some(t(100 + 86_400).to_string()));
}

#[test]
fn rehearsal_never_touches_the_application() {
    let spec = plan("rehearsal");
    assert_eq!(spec.mode, Mode::Rehearsal);
    let none = Observations::default();
    let mut s = in_phase(Phase::Switching, 0);
    let mut order = Vec::new();
    loop {
        match next_action(&spec, &s, &none, t(1)) {
            Action::Do(m) => {
                order.push(m);
                s = record(&spec, &s, &Action::Do(m), Outcome::Done, &none, t(1));
            }
            Action::EndRehearsal => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    // The plan names a rehearsal Secret, so only that is written; no restarts, no login.
    assert_eq!(
        order,
        [
            Milestone::ForwardReplicationDropped,
            Milestone::SecretSwitched
        ]
    );
    let done = record(&spec, &s, &Action::EndRehearsal, Outcome::Done, &none, t(2));
    assert_eq!(done.phase, Phase::Completed);
    assert!(done.milestones.contains(&Milestone::SourceUnfrozen));
}

#[test]
fn hypercare_checkpoints_rollback_and_completion() {
    let mut spec = plan("rollback"); // checkpoints 15m, 1h; hypercare 24h
    let none = Observations::default();
    let s = with(in_phase(Phase::Hypercare, 0), |s| {
        s.switched_at = Some(t(0).to_string())
    });
    assert!(matches!(
        next_action(&spec, &s, &none, t(60)),
        Action::Wait(_)
    ));
    assert_eq!(
        next_action(&spec, &s, &none, t(15 * 60)),
        Action::Checkpoint(0)
    );
    let one = record(
        &spec,
        &s,
        &Action::Checkpoint(0),
        Outcome::Done,
        &none,
        t(15 * 60),
    );
    assert!(matches!(
        next_action(&spec, &one, &none, t(16 * 60)),
        Action::Wait(_)
    ));
    assert_eq!(
        next_action(&spec, &one, &none, t(3600)),
        Action::Checkpoint(1)
    );
    let two = record(
        &spec,
        &one,
        &Action::Checkpoint(1),
        Outcome::Done,
        &none,
        t(3600),
    );
    assert_eq!(next_action(&spec, &two, &none, t(86_400)), Action::Complete);

    // Abort is no longer possible; rollback is.
    spec.abort = true;
    assert!(matches!(
        next_action(&spec, &two, &none, t(3700)),
        Action::Wait(_)
    ));
    spec.rollback.as_mut().unwrap().requested = true;
    assert_eq!(
        next_action(&spec, &two, &none, t(3700)),
        Action::Advance(Phase::RollingBack)
    );
}

#[test]
fn rollback_reverses_what_the_switch_did() {
    let spec = plan("rollback");
    let mut s = with(in_phase(Phase::RollingBack, 0), |s| {
        s.milestones = vec![
            Milestone::ForwardReplicationDropped,
            Milestone::ReverseReplicationStarted,
            Milestone::TargetLoginAllowed,
            Milestone::SecretSwitched,
            Milestone::WorkloadsRestarted,
        ]
    });
    let mut obs = Observations::default();
    let mut order = Vec::new();
    for _ in 0..20 {
        match next_action(&spec, &s, &obs, t(1)) {
            Action::Do(m) => {
                order.push(m);
                s = record(&spec, &s, &Action::Do(m), Outcome::Done, &obs, t(1));
            }
            Action::Wait(_) => obs.reverse_caught_up = true,
            Action::Advance(Phase::RolledBack) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        order,
        [
            Milestone::TargetFrozen,
            Milestone::ReverseCaughtUp,
            Milestone::SequencesCopiedBack,
            Milestone::SecretSwitchedBack,
            Milestone::WorkloadsRestartedBack,
            Milestone::SourceUnfrozen,
            Milestone::ReplicationCleanedUp,
        ]
    );
    let rolled = record(
        &spec,
        &s,
        &Action::Advance(Phase::RolledBack),
        Outcome::Done,
        &obs,
        t(2),
    );
    assert_eq!(
        rolled.message.as_deref(),
        Some("rolled back: the application is on the source again")
    );
}

#[test]
fn a_failed_switch_rolls_back_unless_writes_would_be_stranded() {
    let spec = plan("rollback");
    let none = Observations::default();
    let s = in_phase(Phase::Switching, 0);
    let failed = record(
        &spec,
        &s,
        &Action::Do(Milestone::TargetLoginAllowed),
        Outcome::Failed(Failure::permanent("boom")),
        &none,
        t(1),
    );
    assert_eq!(failed.phase, Phase::RollingBack);

    // The rollback ends saying why the switch failed, not whatever a retried step said last.
    let retrying = record(
        &spec,
        &failed,
        &Action::Do(Milestone::SourceUnfrozen),
        Outcome::Failed(Failure::permanent("blue unreachable")),
        &none,
        t(2),
    );
    let rolled = record(
        &spec,
        &retrying,
        &Action::Advance(Phase::RolledBack),
        Outcome::Done,
        &none,
        t(3),
    );
    assert_eq!(rolled.phase, Phase::RolledBack);
    assert_eq!(
        rolled.message.as_deref(),
        Some("rolled back, the application is on the source again; the switch failed: boom")
    );

    let stranded = with(s, |s| {
        s.milestones = vec![
            Milestone::ForwardReplicationDropped,
            Milestone::SecretSwitched,
        ]
    });
    let retried = record(
        &spec,
        &stranded,
        &Action::Do(Milestone::WorkloadsRestarted),
        Outcome::Failed(Failure::permanent("boom")),
        &none,
        t(1),
    );
    assert_eq!(
        retried.phase,
        Phase::Switching,
        "writes on the target have no way back: retry"
    );
}

#[test]
fn budgets_and_the_write_downtime_limit_abort() {
    let spec = plan("rollback"); // freeze budget 45s, maxWriteDowntime 5m
    let none = Observations::default();
    let s = in_phase(Phase::Freezing, 0);
    assert_eq!(next_action(&spec, &s, &none, t(30)), Action::Freeze);
    let why = abort_reason(next_action(&spec, &s, &none, t(46)));
    assert!(why.contains("schedule.budgets.freeze: 45s"), "{why}");

    let frozen = with(in_phase(Phase::AwaitingApproval, 0), |s| {
        s.frozen_at = Some(t(0).to_string())
    });
    let mut manual = plan("rollback");
    manual.point_of_no_return.approval = Approval::Manual;
    manual.point_of_no_return.deadline = "1h".into();
    let why = abort_reason(next_action(&manual, &frozen, &none, t(301)));
    assert!(why.contains("maxWriteDowntime"), "{why}");
}

#[test]
fn abort_request_deletion_and_intent_come_first() {
    let mut spec = plan("rollback");
    let none = Observations::default();
    let s = in_phase(Phase::Replicating, 0);
    spec.abort = true;
    assert!(abort_reason(next_action(&spec, &s, &none, t(1))).contains("abort requested"));

    let deleting = Observations {
        deleting: true,
        ..Observations::default()
    };
    for phase in Phase::ALL {
        assert_eq!(
            next_action(&spec, &in_phase(phase, 0), &deleting, t(1)),
            Action::Finalize,
            "{phase}"
        );
    }

    let pending_intent = with(in_phase(Phase::Switching, 0), |s| {
        s.intent = Some(Milestone::SecretSwitched)
    });
    assert_eq!(
        next_action(&spec, &pending_intent, &none, t(1)),
        Action::Do(Milestone::SecretSwitched)
    );
    let recorded = record(
        &spec,
        &pending_intent,
        &Action::Do(Milestone::SecretSwitched),
        Outcome::Done,
        &none,
        t(2),
    );
    assert_eq!(recorded.intent, None);
    assert_eq!(
        record_intent(
            &in_phase(Phase::Switching, 0),
            &Action::Do(Milestone::SecretSwitched)
        )
        .unwrap()
        .intent,
        Some(Milestone::SecretSwitched)
    );
    assert_eq!(
        record_intent(
            &in_phase(Phase::Switching, 0),
            &Action::Do(Milestone::TargetLoginAllowed)
        ),
        None
    );
}

#[test]
fn terminal_phases_do_nothing() {
    for phase in [Phase::Completed, Phase::Aborted, Phase::RolledBack] {
        assert_eq!(
            next_action(
                &plan("rollback"),
                &in_phase(phase, 0),
                &Observations::default(),
                t(1)
            ),
            Action::Idle
        );
    }
}

/// xorshift64*: enough randomness for a simulation, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Drives the plan with random observations, random action failures, random requests and a
/// clock that jumps, and checks the invariants after every step.
#[test]
fn invariants_hold_over_random_runs() {
    let mut endings = std::collections::BTreeMap::new();
    for seed in 1..=1000u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut spec = plan(["rollback", "manual", "rehearsal"][rng.below(3) as usize]);
        let mut status = DatabaseCutoverStatus::default();
        let mut now = t(0);
        let mut source_frozen = false;
        let mut pnr: Option<String> = None;
        let mut replication_started = false;
        // With the parallel copy, StartReplication starts a copy whose end creates the
        // subscription some steps later (or which fails, and is started again).
        spec.replication.initial_copy = if rng.chance(50) {
            crate::api::InitialCopy::Parallel
        } else {
            crate::api::InitialCopy::Native
        };
        let parallel = spec.replication.initial_copy == crate::api::InitialCopy::Parallel;
        let mut copy_started = false;
        let mut online_started = false;
        let mut jobs_launched: Vec<MigrationSet> = Vec::new();
        for _ in 0..300 {
            // Requests arrive at random.
            if rng.below(1000) < 3 {
                spec.abort = true;
            }
            if rng.chance(3) {
                spec.point_of_no_return.approved = true;
            }
            if rng.chance(2)
                && let Some(r) = spec.rollback.as_mut()
            {
                r.requested = r.readiness;
            }
            if copy_started && !replication_started && rng.chance(50) {
                replication_started = true;
            }
            let obs = Observations {
                copy: (copy_started && !replication_started).then(|| CopyObservation {
                    running: !rng.chance(5),
                    ..CopyObservation::default()
                }),
                deleting: false,
                migration_job: jobs_launched
                    .contains(&match status.phase {
                        Phase::Switching => MigrationSet::PostSwitch,
                        _ => MigrationSet::Initial,
                    })
                    .then(|| match rng.below(10) {
                        0 => JobState::Failed("BackoffLimitExceeded".into()),
                        1..=4 => JobState::Running,
                        _ => JobState::Succeeded,
                    }),
                replication: replication_started.then(|| ReplicationObservation {
                    tables_ready: rng.below(4) as u32,
                    tables_total: 3,
                    lag_bytes: rng.below(32 << 20),
                    broken: (rng.below(1000) < 5).then(|| "worker exited".into()),
                }),
                applied_past_freeze: rng.chance(60),
                reverse_lag_bytes: None,
                reverse_caught_up: rng.chance(50),
                reverse_broken: (rng.below(100) < 5).then(|| "subscription disabled".into()),
                rollout_problems: Vec::new(),
                source_writes: (rng.below(100) < 3).then(|| WitnessObservation {
                    writes: 1,
                    samples: vec!["public.t UPDATE id=1".into()],
                    up_to: None,
                    lost: false,
                }),
                online: online_started.then(|| OnlineVerificationStatus {
                    state: "Current".into(),
                    started_at: Some("2026-01-01T00:00:00Z".into()),
                    ranges_total: 4,
                    ranges_proven: if rng.chance(70) { 4 } else { 2 },
                    dirty_keys: rng.below(20_000) as i64,
                    divergence: (rng.below(1000) < 5).then(|| "public.t differs: id=1".into()),
                    ..OnlineVerificationStatus::default()
                }),
                // Now and then a failed apply attempt (a blip): it holds the freeze a while.
                apply: replication_started.then(|| ApplyObservation {
                    errors: u64::from(rng.below(100) < 2),
                    ..ApplyObservation::default()
                }),
            };
            let action = next_action(&spec, &status, &obs, now);
            let fails = rng.chance(3);
            let outcome = if fails
                && !matches!(
                    action,
                    Action::Idle | Action::Wait(_) | Action::Advance(_) | Action::Abort(_)
                ) {
                Outcome::Failed(Failure::permanent("injected failure"))
            } else {
                match &action {
                    Action::RunPreflight => Outcome::Preflight {
                        checks: vec![check(
                            "wal_level",
                            if rng.chance(10) {
                                CheckOutcome::Fail
                            } else {
                                CheckOutcome::Pass
                            },
                        )],
                        versions: None,
                    },
                    Action::Freeze => {
                        source_frozen = true;
                        Outcome::Frozen {
                            lsn: "0/1000".into(),
                        }
                    }
                    Action::Verify => Outcome::Verified(VerificationStatus {
                        matched: rng.chance(85),
                        ..VerificationStatus::default()
                    }),
                    Action::FinishAbort
                    | Action::EndRehearsal
                    | Action::Do(Milestone::SourceUnfrozen) => {
                        source_frozen = false;
                        Outcome::Done
                    }
                    Action::StartReplication if parallel => {
                        copy_started = true;
                        Outcome::Done
                    }
                    Action::StartReplication => {
                        replication_started = true;
                        Outcome::Done
                    }
                    Action::StartOnlineVerification => {
                        online_started = true;
                        Outcome::Done
                    }
                    Action::LaunchMigrations(set) => {
                        jobs_launched.push(*set);
                        Outcome::Done
                    }
                    _ => Outcome::Done,
                }
            };
            if let Some(with_intent) = record_intent(&status, &action) {
                status = with_intent;
            }
            let before = status.clone();
            status = record(&spec, &status, &action, outcome, &obs, now);

            let ctx = format!(
                "seed {seed}: {} -> {} via {action:?}",
                before.phase, status.phase
            );
            assert!(super::can_transition(before.phase, status.phase), "{ctx}");
            if status.phase == Phase::Switching && before.phase != Phase::Switching {
                assert!(
                    before.verification.as_ref().is_some_and(|v| v.matched),
                    "switching without a matched verification: {ctx}"
                );
            }
            if status.phase.is_past_point_of_no_return() && spec.mode == Mode::Production {
                assert!(
                    status.verification.as_ref().is_some_and(|v| v.matched),
                    "{ctx}"
                );
                assert!(status.point_of_no_return_at.is_some(), "{ctx}");
            }
            if let Some(first) = &pnr {
                assert_eq!(
                    status.point_of_no_return_at.as_ref(),
                    Some(first),
                    "point of no return moved: {ctx}"
                );
            }
            pnr.clone_from(&status.point_of_no_return_at);
            if status.phase == Phase::Aborted {
                assert!(!source_frozen, "aborted with the source frozen: {ctx}");
            }
            if action == Action::StartReplication && parallel {
                assert!(
                    before.milestones.contains(&Milestone::IndexesDeferred),
                    "a parallel copy started before green's indexes were recorded: {ctx}"
                );
            }
            for step in &status.steps {
                if let Some(finished) = &step.finished_at {
                    assert!(
                        jiff::Timestamp::from_str_strict(finished)
                            >= jiff::Timestamp::from_str_strict(&step.started_at),
                        "a step finished before it started: {ctx}"
                    );
                }
            }
            for pair in status.steps.windows(2) {
                assert!(
                    jiff::Timestamp::from_str_strict(&pair[0].started_at)
                        <= jiff::Timestamp::from_str_strict(&pair[1].started_at),
                    "step timestamps went backwards: {ctx}"
                );
            }
            if status.phase.is_terminal() {
                break;
            }
            // Mostly short steps; now and then a long stall (which budgets must catch); hours
            // at a time through hypercare.
            let millis = match (status.phase, rng.below(100)) {
                (Phase::Hypercare, _) => rng.below(4 * 3_600_000),
                (_, 0..=1) => rng.below(900_000),
                _ => rng.below(10_000),
            };
            now += jiff::SignedDuration::from_millis(millis as i64);
        }
        *endings.entry(status.phase).or_insert(0u32) += 1;
    }
    // The simulation must reach every way a cutover ends, or it proves little.
    for ending in [Phase::Completed, Phase::Aborted, Phase::RolledBack] {
        assert!(
            endings.get(&ending).copied().unwrap_or(0) > 10,
            "{ending} reached too rarely: {endings:?}"
        );
    }
}

trait StrictParse {
    fn from_str_strict(text: &str) -> jiff::Timestamp;
}

impl StrictParse for jiff::Timestamp {
    fn from_str_strict(text: &str) -> jiff::Timestamp {
        text.parse().expect("step timestamps are RFC 3339")
    }
}

#[test]
fn wait_durations_are_bounded() {
    let spec = plan("rollback");
    let s = with(in_phase(Phase::Hypercare, 0), |s| {
        s.switched_at = Some(t(0).to_string())
    });
    match next_action(&spec, &s, &Observations::default(), t(1)) {
        Action::Wait(d) => assert!(d <= Duration::from_secs(30), "{d:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_transient_failure_is_retried_within_the_step_budget_and_then_aborts_saying_why() {
    let spec = plan("rollback"); // finalSync budget 3m
    let none = Observations::default();
    let s = with(in_phase(Phase::FinalSync, 0), |s| {
        s.frozen_at = Some(t(0).to_string())
    });
    let blip = || Outcome::Failed(Failure::transient("failed to reach the green database"));
    let once = record(
        &spec,
        &s,
        &Action::Do(Milestone::SequencesCopied),
        blip(),
        &none,
        t(1),
    );
    assert_eq!(
        once.phase,
        Phase::FinalSync,
        "a transient failure does not abort"
    );
    let retry = once.retry.clone().expect("the retry is recorded");
    assert_eq!(retry.attempts, 1);
    assert_eq!(retry.since, t(1).to_string());
    assert!(!once.milestones.contains(&Milestone::SequencesCopied));
    let twice = record(
        &spec,
        &once,
        &Action::Do(Milestone::SequencesCopied),
        blip(),
        &none,
        t(2),
    );
    assert_eq!(twice.retry.as_ref().map(|r| r.attempts), Some(2));
    assert_eq!(
        twice.retry.as_ref().map(|r| r.since.clone()),
        Some(t(1).to_string())
    );

    // While it lasts the cutover is Degraded, and the pause is short: writes are frozen.
    let degraded = crate::plan::desired_status(&twice, Some(1), t(2), None);
    let d = degraded
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", "TransientError")
    );
    assert_eq!(
        crate::plan::pause_after(&twice, &Action::Do(Milestone::SequencesCopied)),
        Duration::from_millis(400)
    );

    // The next success clears it.
    let healed = record(
        &spec,
        &twice,
        &Action::Do(Milestone::SequencesCopied),
        Outcome::Done,
        &none,
        t(3),
    );
    assert_eq!(healed.retry, None);
    assert!(healed.milestones.contains(&Milestone::SequencesCopied));

    // A budget that runs out while the failure repeats says so.
    let why = abort_reason(next_action(&spec, &twice, &none, t(10_000)));
    assert!(why.contains("schedule.budgets.finalSync"), "{why}");
    assert!(why.contains("it kept failing (2 attempts"), "{why}");
    assert!(why.contains("failed to reach the green database"), "{why}");

    // A permanent failure aborts at once.
    let refused = record(
        &spec,
        &once,
        &Action::Do(Milestone::SequencesCopied),
        Outcome::Failed(Failure::permanent("password authentication failed")),
        &none,
        t(2),
    );
    assert_eq!(refused.phase, Phase::Aborting);
    assert_eq!(refused.retry, None);
}

#[test]
fn a_transient_failure_in_the_switch_is_retried_until_the_write_downtime_runs_out() {
    let spec = plan("rollback"); // maxWriteDowntime 5m
    let none = Observations::default();
    let s = with(in_phase(Phase::Switching, 0), |s| {
        s.frozen_at = Some(t(0).to_string())
    });
    let blip = || Outcome::Failed(Failure::transient("connection reset"));
    let action = Action::Do(Milestone::ReverseReplicationStarted);
    let retried = record(&spec, &s, &action, blip(), &none, t(10));
    assert_eq!(retried.phase, Phase::Switching);
    assert_eq!(retried.retry.as_ref().map(|r| r.attempts), Some(1));
    let late = record(&spec, &retried, &action, blip(), &none, t(301));
    assert_eq!(late.phase, Phase::RollingBack);
    let why = late.message.clone().unwrap_or_default();
    assert!(why.contains("connection reset"), "{why}");
    assert!(
        why.contains("still failing after 2 attempts, past schedule.maxWriteDowntime"),
        "{why}"
    );
}

#[test]
fn pauses_come_from_the_plan() {
    let s = in_phase(Phase::Replicating, 0);
    assert_eq!(crate::plan::pause_after(&s, &Action::Wait(POLL)), POLL);
    assert_eq!(
        crate::plan::pause_after(&s, &Action::StartReplication),
        Duration::ZERO
    );
    let retrying = with(s, |s| {
        s.retry = Some(crate::api::RetryStatus {
            attempts: 3,
            ..Default::default()
        })
    });
    // Not frozen: the ordinary backoff.
    assert_eq!(
        crate::plan::pause_after(&retrying, &Action::StartReplication),
        Duration::from_secs(4)
    );
    let done = in_phase(Phase::Completed, 0);
    assert_eq!(crate::plan::pause_after(&done, &Action::Idle), IDLE);
}

#[test]
fn observations_are_what_the_next_decision_reads() {
    let mut spec = plan("rollback");
    spec.migrations = Some(
        serde_json::from_value(serde_json::json!({
            "configMapRef": {"name": "m"},
            "postSwitchConfigMapRef": {"name": "post"},
        }))
        .unwrap(),
    );
    let needs = |s: &DatabaseCutoverStatus| super::next::observation_needs(&valid(&spec), s, false);
    assert_eq!(
        needs(&in_phase(Phase::Migrating, 0)).migration_job,
        Some(MigrationSet::Initial)
    );
    assert!(needs(&in_phase(Phase::Replicating, 0)).replication);
    assert_eq!(needs(&in_phase(Phase::Verifying, 0)), Needs::default());
    let frozen = with(in_phase(Phase::FinalSync, 0), |s| {
        s.freeze_lsn = Some("0/1".into())
    });
    assert!(needs(&frozen).applied_past_freeze);

    // The post-switch Job is looked at exactly when the switch order has it next.
    let switching = in_phase(Phase::Switching, 0);
    assert_eq!(needs(&switching).migration_job, None);
    let dropped = with(switching, |s| {
        s.milestones.push(Milestone::ForwardReplicationDropped)
    });
    assert_eq!(
        needs(&dropped).migration_job,
        Some(MigrationSet::PostSwitch)
    );
    let migrated = with(dropped, |s| {
        s.milestones.push(Milestone::PostSwitchMigrated)
    });
    assert_eq!(needs(&migrated).migration_job, None);

    let hypercare = with(in_phase(Phase::Hypercare, 0), |s| {
        s.milestones = vec![Milestone::ReverseReplicationStarted]
    });
    let n = needs(&hypercare);
    assert!(n.reverse_lag && n.reverse_health && !n.rollouts);
    assert_eq!(
        super::next::observation_needs(&valid(&spec), &hypercare, true),
        Needs::default(),
        "nothing is observed while deleting"
    );
}

#[test]
fn deleting_undoes_what_the_cutover_got_to() {
    use super::next::{CleanupScope, cleanup_scope};
    assert_eq!(
        cleanup_scope(&in_phase(Phase::Preflight, 0)),
        CleanupScope::Nothing
    );
    assert_eq!(
        cleanup_scope(&in_phase(Phase::Completed, 0)),
        CleanupScope::Nothing
    );
    for p in [
        Phase::Replicating,
        Phase::Freezing,
        Phase::Verifying,
        Phase::Aborting,
    ] {
        assert_eq!(cleanup_scope(&in_phase(p, 0)), CleanupScope::Abort, "{p}");
    }
    for p in [Phase::Switching, Phase::Hypercare, Phase::RollingBack] {
        assert_eq!(
            cleanup_scope(&in_phase(p, 0)),
            CleanupScope::ReplicationOnly,
            "{p}"
        );
    }
}

#[test]
fn an_unreadable_start_time_stops_the_step_instead_of_lifting_its_budget() {
    let spec = plan("rollback");
    let none = Observations::default();
    let mut s = in_phase(Phase::FinalSync, 0);
    s.steps[0].started_at = "yesterday".into();
    let why = abort_reason(next_action(&spec, &s, &none, t(1)));
    assert!(
        why.contains("status.steps[].startedAt \"yesterday\""),
        "{why}"
    );
}

#[test]
fn a_write_on_the_source_after_the_freeze_aborts_before_the_point_of_no_return() {
    let spec = plan("rollback");
    let frozen = |phase| {
        with(in_phase(phase, 0), |s| {
            s.frozen_at = Some(t(0).to_string());
            s.freeze_lsn = Some("0/100".into());
        })
    };
    let seen = Observations {
        source_writes: Some(WitnessObservation {
            writes: 2,
            samples: vec!["public.accounts UPDATE id=5".into()],
            up_to: Some("0/200".into()),
            lost: false,
        }),
        ..Observations::default()
    };
    let quiet = Observations {
        source_writes: Some(WitnessObservation::default()),
        ..Observations::default()
    };
    for phase in [Phase::Verifying, Phase::AwaitingApproval] {
        let why = abort_reason(next_action(&spec, &frozen(phase), &seen, t(1)));
        assert!(
            why.contains("writes on the source after the freeze: 2"),
            "{why}"
        );
        assert!(why.contains("public.accounts UPDATE id=5"), "{why}");
        assert!(!matches!(
            next_action(&spec, &frozen(phase), &quiet, t(1)),
            Action::Abort(_)
        ));
    }
    // A lost witness proves nothing: stop too.
    let lost = Observations {
        source_writes: Some(WitnessObservation {
            lost: true,
            ..WitnessObservation::default()
        }),
        ..Observations::default()
    };
    let why = abort_reason(next_action(
        &spec,
        &frozen(Phase::AwaitingApproval),
        &lost,
        t(1),
    ));
    assert!(why.contains("witness on the source was lost"), "{why}");

    // After the switch: a hypercare problem, counted in the status, and a rollback waits for a
    // person to acknowledge it.
    let hypercare = with(frozen(Phase::Hypercare), |s| {
        s.switched_at = Some(t(0).to_string())
    });
    let after = record(
        &spec,
        &hypercare,
        &Action::Wait(POLL),
        Outcome::Done,
        &seen,
        t(1),
    );
    assert_eq!(after.source_writes.as_ref().map(|w| w.count), Some(2));
    assert_eq!(
        after
            .source_writes
            .as_ref()
            .and_then(|w| w.checked_up_to.clone()),
        Some("0/200".into())
    );
    let problems: Vec<_> = after
        .hypercare
        .as_ref()
        .unwrap()
        .problems
        .iter()
        .map(|p| p.reason)
        .collect();
    assert_eq!(
        problems,
        [crate::api::ProblemKind::SourceWrittenAfterSwitch]
    );
    let again = record(
        &spec,
        &after,
        &Action::Wait(POLL),
        Outcome::Done,
        &seen,
        t(2),
    );
    assert_eq!(
        again.source_writes.as_ref().map(|w| w.count),
        Some(4),
        "counts add up"
    );
    let mut rollback = spec.clone();
    rollback.rollback.as_mut().unwrap().requested = true;
    assert_ne!(
        next_action(&rollback, &after, &quiet, t(3)),
        Action::Advance(Phase::RollingBack)
    );
    rollback
        .rollback
        .as_mut()
        .unwrap()
        .acknowledge_source_writes = true;
    assert_eq!(
        next_action(&rollback, &after, &quiet, t(3)),
        Action::Advance(Phase::RollingBack)
    );
}

#[test]
fn a_step_that_must_finish_is_retried_with_backoff_not_in_a_tight_loop() {
    let spec = plan("rollback");
    let none = Observations::default();
    let aborting = in_phase(Phase::Aborting, 0);
    let failed = record(
        &spec,
        &aborting,
        &Action::FinishAbort,
        Outcome::Failed(Failure::permanent("password authentication failed")),
        &none,
        t(1),
    );
    assert_eq!(failed.phase, Phase::Aborting);
    assert_eq!(failed.retry.as_ref().map(|r| r.attempts), Some(1));
    assert!(crate::plan::pause_after(&failed, &Action::FinishAbort) >= Duration::from_millis(200));
    let again = record(
        &spec,
        &failed,
        &Action::FinishAbort,
        Outcome::Failed(Failure::permanent("password authentication failed")),
        &none,
        t(2),
    );
    assert_eq!(again.retry.as_ref().map(|r| r.attempts), Some(2));
}

/// Observations of the apply on green with `errors` failures so far.
fn applying(errors: u64, cause: Option<&str>) -> Observations {
    Observations {
        apply: Some(ApplyObservation {
            errors,
            cause: cause.map(Into::into),
            ..ApplyObservation::default()
        }),
        ..caught_up()
    }
}

#[test]
fn apply_failures_hold_the_freeze_then_abort_naming_the_cause() {
    let spec = plan("rollback");
    let mut s = with(in_phase(Phase::Replicating, 0), |s| {
        s.milestones.push(Milestone::TargetAnalyzed)
    });
    let cause = "green's tables no longer match blue's: public.t: column note only on blue";
    // Failures every 5 s (PostgreSQL's retry interval): the freeze waits, then the cutover
    // aborts once they have gone on for APPLY_FAILING_FOR, naming the cause.
    let mut aborted = None;
    for i in 0..20u64 {
        let now = t(1 + 5 * i as i64);
        let obs = applying(i + 1, (i == 0).then_some(cause));
        let action = next_action(&spec, &s, &obs, now);
        if let Action::Abort(why) = &action {
            aborted = Some((i, why.clone()));
            break;
        }
        if i > 0 {
            assert_eq!(action, Action::Wait(POLL), "failing: no freeze ({i})");
        }
        // The status is refreshed from the observation (the first action would be the freeze).
        s = record(&spec, &s, &Action::Wait(POLL), Outcome::Done, &obs, now);
    }
    let (i, why) = aborted.expect("the cutover aborts");
    let failing_for = Duration::from_secs(5 * i);
    assert!(
        failing_for >= APPLY_FAILING_FOR && failing_for <= APPLY_FAILING_FOR + POLL * 2,
        "aborted after {failing_for:?}"
    );
    assert!(why.contains("column note only on blue"), "{why}");
    assert!(why.contains("failed attempts"), "{why}");
    let r = s.replication.as_ref().unwrap();
    assert_eq!(r.apply_failure.as_deref(), Some(cause));

    // A blip (green or blue restarting: a few failures, then none) holds the freeze only
    // until a quiet spell has passed, and never aborts.
    let mut s = with(in_phase(Phase::Replicating, 0), |s| {
        s.milestones.push(Milestone::TargetAnalyzed)
    });
    for (i, errors) in [2u64, 3, 3, 3, 3, 3, 3, 3, 3, 3].into_iter().enumerate() {
        let now = t(1 + 5 * i as i64);
        let obs = applying(errors, None);
        let action = next_action(&spec, &s, &obs, now);
        assert!(!matches!(action, Action::Abort(_)), "{i}: {action:?}");
        s = record(&spec, &s, &Action::Wait(POLL), Outcome::Done, &obs, now);
    }
    assert_eq!(
        s.replication.as_ref().unwrap().apply_failing_since,
        None,
        "the run ended"
    );
    assert_eq!(
        next_action(&spec, &s, &applying(3, None), t(60)),
        Action::Advance(Phase::Freezing)
    );
}

#[test]
fn a_final_sync_that_cannot_progress_aborts_within_seconds() {
    let spec = plan("rollback");
    let frozen = with(in_phase(Phase::FinalSync, 0), |s| {
        s.frozen_at = Some(t(0).to_string());
        s.freeze_lsn = Some("0/3000000".into());
    });
    // Not applied past the freeze and the apply failing: aborted after
    // APPLY_FAILING_IN_FREEZE, long before the step's budget.
    let mut s = frozen.clone();
    let mut at = None;
    for i in 0..40u64 {
        let now = t(1 + i as i64);
        let obs = Observations {
            apply: Some(ApplyObservation {
                errors: i / 2 + 1,
                cause: Some("a change would duplicate a key green already holds".into()),
                ..ApplyObservation::default()
            }),
            ..Observations::default()
        };
        let action = next_action(&spec, &s, &obs, now);
        if let Action::Abort(why) = action {
            assert!(why.contains("the final sync cannot finish"), "{why}");
            assert!(why.contains("duplicate a key"), "{why}");
            at = Some(i);
            break;
        }
        assert_eq!(action, Action::Wait(FAST_POLL));
        s = record(&spec, &s, &action, Outcome::Done, &obs, now);
    }
    let at = at.expect("aborted");
    assert!((10..=12).contains(&at), "aborted {at} s into the failures");

    // Replication gone (the subscription disabled, the slot lost): at once.
    let obs = Observations {
        apply: Some(ApplyObservation {
            broken: Some("subscription cutover_sub is disabled".into()),
            ..ApplyObservation::default()
        }),
        ..Observations::default()
    };
    let why = abort_reason(next_action(&spec, &frozen, &obs, t(2)));
    assert!(why.contains("is disabled"), "{why}");

    // PostgreSQL 18 counts the changes it skipped for rows green lacks: divergence, at once.
    let obs = Observations {
        apply: Some(ApplyObservation {
            missing_rows: Some("update_missing 2".into()),
            ..ApplyObservation::default()
        }),
        ..Observations::default()
    };
    let why = abort_reason(next_action(&spec, &frozen, &obs, t(2)));
    assert!(
        why.contains("diverged") && why.contains("update_missing 2"),
        "{why}"
    );
}
