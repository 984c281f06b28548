//! The whole sequence driven by `plan::next_action` and the engines against two real PostgreSQL
//! clusters, with the bank workload writing to blue throughout: a production cutover ends
//! Completed with every acknowledged write on green and nothing of ours left; a rehearsal ends
//! Completed with blue writable and the application's connection string untouched; a row that
//! differs on green stops the cutover before the point of no return, naming the table. Hypercare
//! checkpoints compare row counts through reverse replication and report a broken way back; a
//! green the application could not log in to stops the switch before the Secret moves.

mod common;

use std::time::Duration;

use common::*;
use cutover_operator::api::conditions::ConditionType;
use cutover_operator::api::{CheckpointStatus, ProblemKind};
use cutover_operator::api::{
    DatabaseCutoverSpec, DatabaseCutoverStatus, Milestone, Mode, Phase, ValidSpec,
};
use cutover_operator::engine::{Engine, NoSink, Watch, drive};
use cutover_operator::plan::{self, Action, Outcome};
use cutover_operator::platform::LocalPlatform;
use cutover_tests::BlueGreen;
use cutover_tests::workload::{self, Load, LoadConfig};

fn spec(mode: Mode) -> DatabaseCutoverSpec {
    let mut spec = production_spec();
    spec.mode = mode;
    spec.freeze.method = cutover_operator::api::FreezeMethod::Strict;
    spec
}

fn engine(
    bg: &BlueGreen,
    spec: DatabaseCutoverSpec,
    dir: &std::path::Path,
) -> Engine<LocalPlatform> {
    let dbs = cutover_tests::databases(bg);
    let platform = LocalPlatform {
        secret_file: Some(dir.join("DATABASE_URL")),
        rehearsal_secret_file: Some(dir.join("DATABASE_URL.rehearsal")),
    };
    Engine::new("shop/orders", ValidSpec::new(spec).unwrap(), dbs, platform)
}

fn setup() -> BlueGreen {
    setup_of(DEFAULT_MAJORS)
}

fn setup_of(majors: Majors) -> BlueGreen {
    let bg = blue_green_of(majors);
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(50, 1000)).unwrap();
    bg
}

fn start_load(bg: &BlueGreen) -> Load {
    Load::start(LoadConfig {
        dsn: app_dsn(&bg.blue),
        clients: 4,
        tps: 200.0,
        accounts: 50,
    })
}

fn last_checkpoint(s: &DatabaseCutoverStatus) -> CheckpointStatus {
    s.hypercare
        .as_ref()
        .and_then(|h| h.last_checkpoint.clone())
        .expect("a checkpoint ran")
}

fn problems(s: &DatabaseCutoverStatus) -> Vec<ProblemKind> {
    s.hypercare
        .iter()
        .flat_map(|h| h.problems.iter().map(|p| p.reason))
        .collect()
}

/// Hypercare's problems other than the writes on blue the witness saw (which, once seen, stay).
fn other_problems(s: &DatabaseCutoverStatus) -> Vec<ProblemKind> {
    problems(s)
        .into_iter()
        .filter(|p| *p != ProblemKind::SourceWrittenAfterSwitch)
        .collect()
}

fn degraded(s: &DatabaseCutoverStatus) -> (bool, String) {
    let d = plan::desired_status(s, Some(1), jiff::Timestamp::now(), None);
    let c = d
        .conditions
        .iter()
        .find(|c| c.type_ == ConditionType::Degraded.as_str())
        .unwrap()
        .clone();
    (c.status == "True", c.reason)
}

/// After completion: nothing of ours on green, and no replication object on blue (blue keeps
/// its freeze settings and their record: it stays frozen after a completed cutover).
fn assert_no_replication_left(bg: &BlueGreen) {
    assert_eq!(leftovers(&bg.green), Vec::<String>::new(), "left on green");
    let on_blue: Vec<String> = leftovers(&bg.blue)
        .into_iter()
        .filter(|l| !l.starts_with("setting") && !l.starts_with("schema"))
        .collect();
    assert_eq!(
        on_blue,
        Vec::<String>::new(),
        "replication objects left on blue"
    );
}

async fn run(engine: &Engine<LocalPlatform>) -> (DatabaseCutoverStatus, Vec<Phase>) {
    let mut phases = Vec::new();
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        drive(
            engine,
            DatabaseCutoverStatus::default(),
            &mut Watch(|s: &DatabaseCutoverStatus, _: &Action| {
                if phases.last() != Some(&s.phase) {
                    phases.push(s.phase);
                }
            }),
        ),
    )
    .await
    .expect("the cutover finishes within two minutes")
    .expect("the databases stay reachable");
    (status, phases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_cutover_under_load_completes_losing_nothing() {
    production_cutover(setup()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_major_upgrade_from_15_to_18_under_load_completes_losing_nothing() {
    let bg = setup_of(UPGRADE);
    assert_eq!((bg.blue.major(), bg.green.major()), (15, 18));
    let status = production_cutover(bg).await;
    let versions = status
        .server_versions
        .expect("preflight recorded the versions");
    assert_eq!((versions.blue_major, versions.green_major), (15, 18));
    assert!(versions.major_upgrade, "{versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_between_two_postgresql_18_servers_completes_losing_nothing() {
    let bg = setup_of(BOTH_18);
    assert_eq!((bg.blue.major(), bg.green.major()), (18, 18));
    let status = production_cutover(bg).await;
    assert!(!status.server_versions.unwrap().major_upgrade);
}

/// Blue on 18 and green on 15 is a downgrade: refused at preflight, before anything is created,
/// saying so, and blue carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_is_refused_at_preflight_and_changes_nothing() {
    let bg = setup_of(Majors {
        blue: Some(18),
        green: Some(15),
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = engine(&bg, spec(Mode::Production), dir.path());
    let (status, phases) = run(&engine).await;
    assert_eq!(status.phase, Phase::Aborted, "{:?}", status.message);
    assert_eq!(phases, [Phase::Preflight, Phase::Aborting, Phase::Aborted]);
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("server-versions") && message.contains("a downgrade (18 → 15)"),
        "{message}"
    );
    let versions = status.server_versions.unwrap();
    assert!(!versions.major_upgrade && versions.green_major < versions.blue_major);
    assert_no_replication_left(&bg);
    assert_clean_and_writable(&bg).await;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("DATABASE_URL")).unwrap(),
        app_dsn(&bg.blue)
    );
}

/// The same production cutover with the operator's parallel initial copy: the ledger already
/// holds 200 000 rows, split into key ranges copied by three workers inside the slot's exported
/// snapshot while the load writes; green's keys and unique constraint are set aside and built again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_initial_copy_under_load_completes_losing_nothing() {
    let bg = setup();
    bg.blue
        .execute(
            APP,
            "INSERT INTO ledger (client, seq, amount)
             SELECT 1000 + g / 1000, g, 0 FROM generate_series(1, 200000) g",
        )
        .unwrap();
    let constraints_before = constraint_definitions(&bg.green);
    let status = production_cutover_with(&bg, |spec| {
        spec.replication.initial_copy = cutover_operator::api::InitialCopy::Parallel;
        spec.replication.copy_parallelism = 3;
        spec.replication.copy_split_size = "2MiB".into();
    })
    .await;
    let r = status.replication.as_ref().unwrap();
    let copy = r.initial_copy.as_ref().expect("the parallel copy reported");
    assert_eq!(copy.stage, "Done", "{copy:?}");
    assert_eq!((copy.tables_done, copy.tables_total), (2, 2), "{copy:?}");
    assert!(copy.rows_copied >= 200_050, "{copy:?}");
    assert!(copy.consistent_point.is_some(), "{copy:?}");
    let ledger = copy
        .tables
        .iter()
        .find(|t| t.table == "public.ledger")
        .unwrap();
    assert!(ledger.chunks > 1, "the ledger was split: {ledger:?}");
    assert_eq!(ledger.chunks_done, ledger.chunks);
    assert_eq!(
        r.deferred_indexes
            .iter()
            .map(|d| (d.name.as_str(), d.kind.as_str()))
            .collect::<Vec<_>>(),
        [
            ("accounts_pkey", "Constraint"),
            ("ledger_client_seq_key", "Constraint"),
            ("ledger_pkey", "Constraint")
        ]
    );
    assert!(status.milestones.contains(&Milestone::IndexesDeferred));
    // Green's schema is as it was: what was set aside is back, defined alike.
    assert_eq!(constraint_definitions(&bg.green), constraints_before);
}

/// Every index and constraint of the public schema with its definition.
fn constraint_definitions(c: &cutover_tests::PgCluster) -> Vec<Vec<Option<String>>> {
    c.query(
        APP,
        "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid), indisvalid::text
           FROM pg_index WHERE indrelid::regclass::text IN ('accounts', 'ledger')
         UNION ALL
         SELECT conname, pg_get_constraintdef(oid), convalidated::text
           FROM pg_constraint WHERE conrelid::regclass::text IN ('accounts', 'ledger')
         ORDER BY 1, 2",
    )
    .unwrap()
}

/// A production cutover under the bank load, checked end to end; returns the final status.
async fn production_cutover(bg: BlueGreen) -> DatabaseCutoverStatus {
    production_cutover_with(&bg, |_| {}).await
}

/// [`production_cutover`] with the plan changed by `tweak`.
async fn production_cutover_with(
    bg: &BlueGreen,
    tweak: impl FnOnce(&mut DatabaseCutoverSpec),
) -> DatabaseCutoverStatus {
    let dir = tempfile::tempdir().unwrap();
    let load = start_load(bg);
    wait_for("the load commits", Duration::from_secs(30), || async {
        load.commits() > 20
    })
    .await;

    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let mut spec = spec(Mode::Production);
    spec.schedule.checkpoints = vec!["1s".into()];
    spec.schedule.hypercare = "2s".into();
    tweak(&mut spec);
    let engine = engine(bg, spec, dir.path());
    let (status, phases) = run(&engine).await;
    let report = load.stop().await;

    eprintln!(
        "{}",
        cutover_operator::plan::timing_report(&status, jiff::Timestamp::now()).render()
    );
    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    assert_eq!(
        phases,
        [
            Phase::Preflight,
            Phase::Replicating,
            Phase::Freezing,
            Phase::FinalSync,
            Phase::Verifying,
            Phase::AwaitingApproval,
            Phase::Switching,
            Phase::Hypercare,
            Phase::Completed
        ]
    );
    let verification = status.verification.as_ref().unwrap();
    assert!(verification.matched, "{verification:?}");
    // Every row was compared while the load wrote; the freeze compared only what changed.
    assert_eq!(
        verification.method.as_deref(),
        Some("Online"),
        "{verification:?}"
    );
    assert!(verification.keys_in_freeze.is_some(), "{verification:?}");
    let online = status.online_verification.as_ref().unwrap();
    assert_eq!(online.ranges_proven, online.ranges_total, "{online:?}");
    assert!(
        online.changes_seen > 0,
        "the witness saw the load: {online:?}"
    );
    assert!(online.pass_seconds.is_some(), "{online:?}");
    assert!(status.point_of_no_return_at.is_some());
    let freeze = status
        .write_freeze_seconds
        .expect("the write freeze was measured");
    assert!(freeze > 0.0 && freeze < 60.0, "{freeze}");
    for m in [
        Milestone::SequencesCopied,
        Milestone::ForwardReplicationDropped,
        Milestone::ReverseReplicationStarted,
        Milestone::SecretSwitched,
    ] {
        assert!(
            status.milestones.contains(&m),
            "{m:?} missing: {:?}",
            status.milestones
        );
    }

    // The hypercare checkpoint counted both tables on green and found blue (kept current by
    // reverse replication) holding the same numbers.
    let checkpoint = last_checkpoint(&status);
    assert_eq!(status.checkpoints_done, 1);
    assert!(checkpoint.compared_with_source, "{checkpoint:?}");
    assert!(checkpoint.matched, "{checkpoint:?}");
    assert_eq!(checkpoint.tables, 2, "accounts and ledger: {checkpoint:?}");
    assert_eq!(
        checkpoint.target_rows,
        count(
            &bg.green,
            "SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM ledger)"
        ),
    );
    assert!(status.hypercare_until.is_some());

    // The application's connection string now names green, with its own credentials.
    let secret = std::fs::read_to_string(dir.path().join("DATABASE_URL")).unwrap();
    assert_eq!(secret, app_dsn(&bg.green));

    // Every acknowledged write is on green; money was neither made nor lost.
    assert!(
        report.acknowledged.len() > 20,
        "the load barely ran: {report:?}"
    );
    let on_green = count(&bg.green, "SELECT count(*) FROM ledger");
    assert!(on_green >= report.acknowledged.len() as i64);
    for (client, seq) in &report.acknowledged {
        let n = count(
            &bg.green,
            &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}"),
        );
        assert_eq!(
            n, 1,
            "acknowledged write ({client}, {seq}) missing on green"
        );
    }
    assert_eq!(
        count(&bg.green, "SELECT sum(balance) FROM accounts"),
        50 * 1000
    );
    assert_eq!(
        count(&bg.green, "SELECT last_value FROM ledger_id_seq"),
        count(&bg.blue, "SELECT last_value FROM ledger_id_seq"),
        "sequences copied"
    );

    // Nothing of ours is left on either server after completion.
    assert_no_replication_left(bg);
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehearsal_undoes_the_freeze_and_leaves_the_application_alone() {
    let bg = setup();
    let dir = tempfile::tempdir().unwrap();
    let load = start_load(&bg);
    wait_for("the load commits", Duration::from_secs(30), || async {
        load.commits() > 20
    })
    .await;

    let mut spec = spec(Mode::Rehearsal);
    spec.rollback = None;
    spec.replication.reverse_for_rollback = false;
    spec.switch.rehearsal_secret_ref = Some(cutover_operator::api::SecretKeyRef {
        name: "orders-db-rehearsal".into(),
        key: "DATABASE_URL".into(),
    });
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = engine(&bg, spec, dir.path());
    let (status, phases) = run(&engine).await;

    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    assert!(!phases.contains(&Phase::Hypercare), "{phases:?}");
    assert!(status.write_freeze_seconds.is_some());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("DATABASE_URL")).unwrap(),
        app_dsn(&bg.blue),
        "the application Secret was touched"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("DATABASE_URL.rehearsal")).unwrap(),
        app_dsn(&bg.green)
    );
    // Blue takes writes again after the rehearsal.
    let before = load.commits();
    wait_for(
        "the load commits on blue again",
        Duration::from_secs(30),
        || async { load.commits() > before + 10 },
    )
    .await;
    load.stop().await;
    assert_clean_and_writable(&bg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_changed_on_green_aborts_before_the_point_of_no_return() {
    let bg = setup();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&bg, spec(Mode::Production), dir.path());
    // Once the copy is done, green gets a row blue does not have (on a key blue never uses, so
    // the apply goes on): verification must find it.
    let copied = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        s.milestones.contains(&Milestone::TargetAnalyzed)
    })
    .await;
    bg.green
        .execute(APP, "INSERT INTO accounts VALUES (9999, 1)")
        .unwrap();
    let status = step_until(&engine, copied, |s| s.phase.is_terminal()).await;

    assert_eq!(status.phase, Phase::Aborted);
    let message = status.message.clone().unwrap_or_default();
    assert!(message.contains("accounts"), "{message}");
    assert!(
        message.contains("9999"),
        "the differing key is named: {message}"
    );
    // Found by the online comparison: blue was never frozen.
    assert!(message.contains("online verification"), "{message}");
    assert!(status.frozen_at.is_none(), "{status:?}");
    assert!(status.point_of_no_return_at.is_none());
    assert!(!dir.path().join("DATABASE_URL").exists());
    assert_clean_and_writable(&bg).await;
}

/// Drops the online verification's witness on blue once the cutover is in Verifying (frozen,
/// final sync done, nothing compared yet) and lets it finish.
async fn lose_the_witness_in_the_freeze(
    spec: DatabaseCutoverSpec,
) -> (BlueGreen, DatabaseCutoverStatus) {
    let bg = setup();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = engine(&bg, spec, dir.path());
    let load = start_load(&bg);
    let status = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        s.phase == Phase::Verifying
    })
    .await;
    let slot = &engine.names().online_source_slot;
    bg.blue
        .execute(
            APP,
            &format!(
                "SET default_transaction_read_only = off;
                 SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE slot_name LIKE '{slot}%'"
            ),
        )
        .unwrap();
    let status = step_until(&engine, status, |s| s.phase.is_terminal()).await;
    load.stop().await;
    (bg, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_witness_falls_back_to_verifying_every_row_in_the_freeze_or_aborts() {
    let (bg, status) = lose_the_witness_in_the_freeze(spec(Mode::Production)).await;
    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    let v = status.verification.as_ref().unwrap();
    assert!(v.matched, "{v:?}");
    assert_eq!(v.method.as_deref(), Some("InFreeze"), "{v:?}");
    let reason = v.fallback_reason.clone().unwrap_or_default();
    assert!(reason.contains("gone or lost its WAL"), "{reason}");
    assert_no_replication_left(&bg);

    let mut strict = spec(Mode::Production);
    strict.verification.on_witness_loss = cutover_operator::api::WitnessLoss::Abort;
    let (bg, status) = lose_the_witness_in_the_freeze(strict).await;
    assert_eq!(status.phase, Phase::Aborted);
    let message = status.message.clone().unwrap_or_default();
    assert!(message.contains("onWitnessLoss is Abort"), "{message}");
    assert!(status.point_of_no_return_at.is_none());
    assert_clean_and_writable(&bg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypercare_compares_counts_and_reports_a_broken_way_back() {
    let bg = setup();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let mut spec = spec(Mode::Production);
    spec.schedule.hypercare = "1h".into();
    spec.schedule.checkpoints = vec!["0s".into(), "1s".into(), "2s".into(), "3s".into()];
    let engine = engine(&bg, spec, dir.path());

    let status = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        s.checkpoints_done >= 1
    })
    .await;
    assert_eq!(status.phase, Phase::Hypercare);
    let first = last_checkpoint(&status);
    assert!(first.compared_with_source && first.matched, "{first:?}");
    // accounts (50 rows) gets its three spots; the empty ledger none.
    assert_eq!(first.spots, 3, "{first:?}");
    assert!(problems(&status).is_empty());
    assert!(!degraded(&status).0);

    // The application writes on green; reverse replication carries it to blue. Behind its
    // back, a row disappears from blue: the next checkpoint must see blue differ. (Blue's
    // freeze refuses writes; a superuser gets past it only as replication's apply does, in
    // replica mode.)
    bg.green
        .execute(APP, "INSERT INTO accounts VALUES (5000, 0)")
        .unwrap();
    bg.blue
        .execute(
            APP,
            "BEGIN READ WRITE; SET LOCAL session_replication_role = replica; DELETE FROM accounts WHERE id = 7; COMMIT",
        )
        .unwrap();
    let status = step_until(&engine, status, |s| s.checkpoints_done >= 2).await;
    let second = last_checkpoint(&status);
    assert!(!second.matched, "{second:?}");
    assert_eq!(
        second.mismatches[0], "public.accounts: 51 rows on green, 50 on blue",
        "{second:?}"
    );
    // The change witness saw the write on blue too: reverse replication did not bring it.
    assert_eq!(
        problems(&status),
        [
            ProblemKind::SourceWrittenAfterSwitch,
            ProblemKind::CheckpointMismatch
        ]
    );
    assert_eq!(degraded(&status), (true, "SourceWrittenAfterSwitch".into()));

    // The row is back, but the last account's balance differs on blue: the counts agree, the
    // spot checks (each runs from a random key to at most 100 rows on, so every one of them
    // covers the last key of this table) see the changed value.
    let balance = count(&bg.green, "SELECT balance FROM accounts WHERE id = 7");
    bg.blue
        .execute(
            APP,
            &format!(
                "BEGIN READ WRITE; SET LOCAL session_replication_role = replica; INSERT INTO accounts VALUES (7, {balance});
                 UPDATE accounts SET balance = balance + 1 WHERE id = 5000; COMMIT"
            ),
        )
        .unwrap();
    let status = step_until(&engine, status, |s| s.checkpoints_done >= 3).await;
    let third = last_checkpoint(&status);
    assert!(!third.matched, "{third:?}");
    assert_eq!(third.spots, 3, "{third:?}");
    assert_eq!(third.mismatches.len(), 3, "every spot differs: {third:?}");
    for m in &third.mismatches {
        assert!(
            m.starts_with("public.accounts from id=") && m.ends_with("the rows differ on blue"),
            "{m}"
        );
    }
    assert_eq!(other_problems(&status), [ProblemKind::CheckpointMismatch]);

    // Reverse replication stops: observed at once as a broken way back.
    let reverse = names("shop/orders").reverse_subscription;
    bg.blue
        .execute(
            APP,
            &format!("BEGIN READ WRITE; ALTER SUBSCRIPTION {reverse} DISABLE; COMMIT"),
        )
        .unwrap();
    let obs = engine.observe(&status, false).await.unwrap();
    let why = obs.reverse_broken.clone().expect("seen as broken");
    assert!(why.contains("disabled"), "{why}");
    let waiting = plan::record(
        &engine.spec,
        &status,
        &Action::Wait(plan::POLL),
        Outcome::Done,
        &obs,
        jiff::Timestamp::now(),
    );
    assert_eq!(
        other_problems(&waiting),
        [
            ProblemKind::ReplicationBroken,
            ProblemKind::CheckpointMismatch
        ]
    );
    assert_eq!(degraded(&waiting), (true, "ReplicationBroken".into()));
    // With the way back broken, a checkpoint counts green only instead of waiting for blue.
    let status = step_until(&engine, waiting, |s| s.checkpoints_done >= 4).await;
    let fourth = last_checkpoint(&status);
    assert!(!fourth.compared_with_source && fourth.matched, "{fourth:?}");
    assert_eq!(fourth.spots, 0, "{fourth:?}");
    assert_eq!(other_problems(&status), [ProblemKind::ReplicationBroken]);

    // Repaired: the problem goes away with the next observation.
    bg.blue
        .execute(
            APP,
            &format!("BEGIN READ WRITE; ALTER SUBSCRIPTION {reverse} ENABLE; COMMIT"),
        )
        .unwrap();
    let obs = engine.observe(&status, false).await.unwrap();
    assert_eq!(obs.reverse_broken, None);
    let healed = plan::record(
        &engine.spec,
        &status,
        &Action::Wait(plan::POLL),
        Outcome::Done,
        &obs,
        jiff::Timestamp::now(),
    );
    assert!(other_problems(&healed).is_empty());
    // The writes made on blue behind the cutover's back stay reported: green does not have
    // them.
    assert_eq!(degraded(&healed), (true, "SourceWrittenAfterSwitch".into()));

    // The end of hypercare removes every replication object.
    assert_eq!(
        engine.perform(&Action::Complete, &healed).await,
        Outcome::Done
    );
    assert_no_replication_left(&bg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_switch_stops_before_the_secret_moves_when_green_would_refuse_the_application() {
    let bg = setup();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = engine(&bg, spec(Mode::Production), dir.path());
    // Preflight saw the role fine on green; before the switch someone holds it read-only there
    // (a setting the switch does not own, so it must not change it).
    let status = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        s.phase == Phase::Verifying
    })
    .await;
    bg.green
        .execute(
            APP,
            &format!(
                "ALTER ROLE {APP_ROLE} IN DATABASE {APP} SET default_transaction_read_only = on"
            ),
        )
        .unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        drive(&engine, status, &mut NoSink),
    )
    .await
    .unwrap()
    .unwrap();

    assert_eq!(status.phase, Phase::RolledBack, "{:?}", status.message);
    let message = status.message.clone().unwrap_or_default();
    assert!(
        status.steps.iter().any(|s| s
            .message
            .as_deref()
            .is_some_and(|m| m.contains("is held read-only here"))),
        "the reason is recorded: {message} / {:?}",
        status.steps
    );
    assert!(!status.milestones.contains(&Milestone::SecretSwitched));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("DATABASE_URL")).unwrap(),
        app_dsn(&bg.blue),
        "the application still points at blue"
    );
    bg.green
        .execute(
            APP,
            &format!("ALTER ROLE {APP_ROLE} IN DATABASE {APP} RESET default_transaction_read_only"),
        )
        .unwrap();
    assert_clean_and_writable(&bg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_roles_kept_out_of_green_are_let_in_at_the_switch() {
    let bg = setup();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    // The platform team keeps the application off green until the switch.
    bg.green
        .execute(APP, &format!("ALTER ROLE {APP_ROLE} NOLOGIN"))
        .unwrap();
    let engine = engine(&bg, spec(Mode::Production), dir.path());
    let (status, _) = run(&engine).await;
    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    let check = status
        .preflight
        .iter()
        .find(|c| c.name == "application-roles-green")
        .unwrap();
    assert_eq!(
        check.outcome,
        cutover_operator::api::CheckOutcome::Warn,
        "{check:?}"
    );
    assert!(
        check.message.contains("cannot log in yet (NOLOGIN)"),
        "{check:?}"
    );
    // After the switch the application logs in on green and writes there.
    let app = bg
        .green
        .connect_as(APP_ROLE, APP_PASSWORD, APP)
        .await
        .expect("the application role logs in on green");
    app.execute("UPDATE accounts SET balance = balance WHERE id = 1", &[])
        .await
        .expect("and writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_forward_replication_aborts_leaving_blue_writable() {
    let bg = setup();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(Mode::Production);
    // Wait in Replicating: the freeze is an hour away.
    spec.schedule.freeze_at = Some(
        (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1))
            .to_string()
            .into(),
    );
    let engine = engine(&bg, spec, dir.path());
    let status = step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        s.replication
            .as_ref()
            .is_some_and(|r| r.tables_total > 0 && r.tables_ready == r.tables_total)
    })
    .await;
    assert_eq!(status.phase, Phase::Replicating);

    // Someone (or `disable_on_error`) disables the subscription on green.
    let subscription = names("shop/orders").subscription;
    bg.green
        .execute(APP, &format!("ALTER SUBSCRIPTION {subscription} DISABLE"))
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), drive(&engine, status, &mut NoSink))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.phase, Phase::Aborted);
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("replication is broken") && message.contains("is disabled"),
        "{message}"
    );
    assert_clean_and_writable(&bg).await;
}
