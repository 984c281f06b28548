//! Local mode survives being killed: `cutover run -f PLAN` is SIGKILLed once it has entered a
//! phase, and running the same plan again resumes from its state file — no step started over,
//! nothing of ours left on either server, and every write the application acknowledged (a bank
//! workload that follows the application's connection file, as a pod follows its Secret) on
//! green, where it ended. `--abort` undoes a run killed in Replicating: blue writable again,
//! no replication object left. Killed while the parallel initial copy streams rows, the run starts
//! the copy over from a new snapshot.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cutover_operator::api::{
    Approval, DatabaseCutover, DatabaseCutoverStatus, FreezeMethod, Mode, Phase, SecretKeyRef,
};
use cutover_tests::workload::{self, Load, LoadConfig};
use cutover_tests::{BlueGreen, PgCluster};

const ROLE: &str = "orders_app";
const PASSWORD: &str = "app-pw";

fn app_dsn(c: &PgCluster) -> String {
    c.dsn(ROLE, PASSWORD, BlueGreen::DATABASE)
}

struct Bed {
    bg: BlueGreen,
    dir: tempfile::TempDir,
    plan: PathBuf,
    load: Load,
}

impl Bed {
    fn secrets(&self) -> PathBuf {
        self.dir.path().join("secrets")
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cutover"));
        cmd.args(["run", "-f"])
            .arg(&self.plan)
            .arg("--secrets-dir")
            .arg(self.secrets())
            .arg("--state-file")
            .arg(self.state_file());
        cmd
    }

    fn saved(&self) -> DatabaseCutoverStatus {
        let text = std::fs::read_to_string(self.state_file()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        serde_json::from_value(v["status"].clone()).unwrap()
    }
}

/// Two clusters with the bank schema, the application role, a plan file and its Secrets, and
/// the load writing through the application's connection file.
async fn bed(freeze_in_an_hour: bool) -> Bed {
    let bg = BlueGreen::start().unwrap();
    for c in [&bg.blue, &bg.green] {
        c.create_role(ROLE, PASSWORD, "LOGIN").unwrap();
        c.execute(BlueGreen::DATABASE, workload::SCHEMA).unwrap();
        c.execute(BlueGreen::DATABASE, &workload::grants(ROLE))
            .unwrap();
    }
    bg.blue
        .execute(BlueGreen::DATABASE, &workload::seed(50, 1000))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let text = include_str!("../../cutover-plans/production-with-rollback.yaml");
    let mut plan: DatabaseCutover = serde_saphyr::from_str(text).unwrap();
    plan.metadata.name = Some("resume".into());
    let spec = &mut plan.spec;
    spec.mode = Mode::Production;
    spec.application_roles = vec![ROLE.into()];
    spec.freeze.method = FreezeMethod::ReadOnly;
    spec.freeze.drain_timeout = "2s".into();
    spec.replication.max_lag_before_freeze = "1MiB".into();
    spec.point_of_no_return.approval = Approval::Automatic;
    spec.schedule.hypercare = "4s".into();
    spec.schedule.checkpoints = vec![];
    spec.switch.restart = vec![];
    if freeze_in_an_hour {
        spec.schedule.freeze_at = Some(
            (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1))
                .to_string()
                .into(),
        );
    }
    let put = |r: &SecretKeyRef, value: &str| {
        let d = dir.path().join("secrets").join(&r.name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(&r.key), value).unwrap();
    };
    put(&spec.source.connection_secret_ref, &bg.blue_dsn());
    put(&spec.target.connection_secret_ref, &bg.green_dsn());
    put(&spec.switch.secret_ref, &app_dsn(&bg.blue));
    let app_file = dir
        .path()
        .join("secrets")
        .join(&spec.switch.secret_ref.name)
        .join(&spec.switch.secret_ref.key);
    let plan_file = dir.path().join("plan.yaml");
    std::fs::write(&plan_file, serde_saphyr::to_string(&plan).unwrap()).unwrap();

    let load = Load::start_following(
        LoadConfig {
            dsn: String::new(),
            clients: 3,
            tps: 150.0,
            accounts: 50,
        },
        app_file,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while load.commits() < 20 {
        assert!(Instant::now() < deadline, "the load does not commit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Bed {
        bg,
        dir,
        plan: plan_file,
        load,
    }
}

/// Starts `cutover run` and SIGKILLs it once it prints that it entered `phase` and `ready`
/// holds. Returns what it printed.
fn kill_in(bed: &Bed, phase: Phase) -> String {
    kill_when(bed, phase, || true)
}

fn kill_when(bed: &Bed, phase: Phase, ready: impl Fn() -> bool) -> String {
    let mut child = bed
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let marker = format!("] {:<16}", phase.as_str());
    let mut printed = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.contains(&marker) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !ready() {
                assert!(Instant::now() < deadline, "not ready to kill in {phase}");
                std::thread::sleep(Duration::from_millis(20));
            }
            child.kill().unwrap();
            child.wait().unwrap();
            return printed;
        }
    }
    let status = child.wait().unwrap();
    panic!("the run ended ({status}) without entering {phase}:\n{printed}");
}

fn slots_and_subscriptions(c: &PgCluster) -> Vec<String> {
    c.query(
        BlueGreen::DATABASE,
        "SELECT 'slot ' || slot_name FROM pg_replication_slots
         UNION ALL SELECT 'subscription ' || subname FROM pg_subscription
         UNION ALL SELECT 'publication ' || pubname FROM pg_publication",
    )
    .unwrap()
    .into_iter()
    .filter_map(|r| r[0].clone())
    .collect()
}

fn count(c: &PgCluster, sql: &str) -> i64 {
    c.query(BlueGreen::DATABASE, sql).unwrap()[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

async fn killed_and_resumed(phase: Phase) {
    let bed = bed(false).await;
    let first = kill_in(&bed, phase);
    killed_and_resumed_with(bed, phase, first).await;
}

/// Runs the plan again after a run killed in `phase` (it printed `first`) and checks it
/// completes as if nothing happened.
async fn killed_and_resumed_with(bed: Bed, phase: Phase, first: String) -> DatabaseCutoverStatus {
    let killed_in = bed.saved().phase;
    let out = bed.command().output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the resumed run failed (killed in {phase}):\n{first}\n---\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("resuming cutover resume in phase {killed_in}")),
        "{stdout}"
    );
    assert!(stdout.contains("result: Completed"), "{stdout}");

    // No step was started over: each phase has one step record.
    let status = bed.saved();
    assert_eq!(status.phase, Phase::Completed);
    let mut phases: Vec<Phase> = status.steps.iter().map(|s| s.name).collect();
    let all = phases.len();
    phases.dedup();
    assert_eq!(phases.len(), all, "a step was repeated: {:?}", status.steps);
    assert!(
        status.write_freeze_seconds.is_some_and(|s| s > 0.0),
        "{status:?}"
    );

    let Bed { bg, load, .. } = bed;
    let report = load.stop().await;
    assert!(report.acknowledged.len() > 20, "{report:?}");
    for (client, seq) in &report.acknowledged {
        assert_eq!(
            count(
                &bg.green,
                &format!("SELECT count(*) FROM ledger WHERE client = {client} AND seq = {seq}")
            ),
            1,
            "acknowledged write ({client}, {seq}) missing on green (killed in {killed_in})"
        );
    }
    assert_eq!(
        count(&bg.green, "SELECT sum(balance) FROM accounts"),
        50 * 1000
    );
    assert_eq!(slots_and_subscriptions(&bg.green), Vec::<String>::new());
    assert_eq!(slots_and_subscriptions(&bg.blue), Vec::<String>::new());
    if let Some(c) = status
        .replication
        .as_ref()
        .and_then(|r| r.initial_copy.as_ref())
    {
        assert_eq!(c.stage, "Done", "{c:?}");
        eprintln!(
            "initial copy: {} restarts, {} rows",
            c.restarts, c.rows_copied
        );
    }
    eprintln!(
        "killed in {killed_in} (asked: {phase}), resumed, completed; {} acknowledged writes on green",
        report.acknowledged.len()
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_in_replicating_resumes() {
    killed_and_resumed(Phase::Replicating).await;
}

/// Killed while the parallel initial copy streams rows (its exported snapshot dies with the
/// process): the resumed run drops the slot, empties green's tables and copies again from a new
/// snapshot, counted as a restart; every acknowledged write ends on green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_the_parallel_copy_starts_it_over() {
    let bed = bed(false).await;
    bed.bg
        .blue
        .execute(
            BlueGreen::DATABASE,
            "INSERT INTO ledger (client, seq, amount)
             SELECT 1000 + g / 1000, g, 0 FROM generate_series(1, 600000) g",
        )
        .unwrap();
    let copying = || {
        bed.bg
            .blue
            .query(
                BlueGreen::DATABASE,
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'cutover-copy' AND backend_type = 'client backend'
                    AND state = 'active' AND query LIKE 'COPY%'",
            )
            .is_ok_and(|r| r[0][0].as_deref() != Some("0"))
    };
    kill_when(&bed, Phase::Replicating, copying);
    let copy = bed.saved().replication.and_then(|r| r.initial_copy);
    assert!(
        copy.as_ref().is_none_or(|c| c.stage != "Done"),
        "killed after the copy: {copy:?}"
    );
    let status = killed_and_resumed_with(bed, Phase::Replicating, String::new()).await;
    let copy = status.replication.and_then(|r| r.initial_copy).unwrap();
    assert_eq!(copy.restarts, 1, "the copy started over once: {copy:?}");
    assert!(copy.rows_copied >= 600_050, "{copy:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_in_freezing_resumes() {
    killed_and_resumed(Phase::Freezing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_in_final_sync_resumes() {
    killed_and_resumed(Phase::FinalSync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_in_verifying_resumes() {
    killed_and_resumed(Phase::Verifying).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_in_switching_resumes() {
    killed_and_resumed(Phase::Switching).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_in_hypercare_resumes() {
    killed_and_resumed(Phase::Hypercare).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_undoes_a_killed_run() {
    let bed = bed(true).await;
    // Killed once the subscription exists, so there is something to undo.
    kill_when(&bed, Phase::Replicating, || {
        !slots_and_subscriptions(&bed.bg.green).is_empty()
    });
    let out = bed.command().arg("--abort").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Aborted"), "{stdout}");
    assert_eq!(bed.saved().phase, Phase::Aborted);
    assert_eq!(slots_and_subscriptions(&bed.bg.green), Vec::<String>::new());
    assert_eq!(slots_and_subscriptions(&bed.bg.blue), Vec::<String>::new());
    // The application still writes to blue.
    let before = bed.load.commits();
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed.load.commits() < before + 10 {
        assert!(Instant::now() < deadline, "blue no longer takes writes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Running the plan again starts a new attempt; the aborted one is kept aside.
    let Bed { load, .. } = bed;
    load.stop().await;
}

/// An abort that cannot reach green ends the run within seconds, saying what is left on green
/// (the subscription, whose connection string holds blue's password, and the copied rows) and
/// how to finish; `cutover cleanup` removes it once green is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_with_green_away_ends_naming_what_is_left_and_cleanup_removes_it() {
    let mut bed = bed(true).await;
    kill_when(&bed, Phase::Replicating, || {
        std::fs::read_to_string(bed.state_file())
            .is_ok_and(|t| t.contains("CopyStarted") && t.contains("TargetAnalyzed"))
    });
    bed.bg.green.stop().unwrap();
    let started = Instant::now();
    let out = bed.command().arg("--abort").output().unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    for needle in [
        "the abort could not finish",
        "left to undo",
        "subscription",
        "on green",
        "rows this attempt copied",
        "cutover cleanup -f",
    ] {
        assert!(
            stderr.contains(needle),
            "{needle:?} missing:\n{stdout}\n{stderr}"
        );
    }
    assert!(took < Duration::from_secs(90), "took {took:?}");
    for secret in [bed.bg.blue.password(), bed.bg.green.password(), PASSWORD] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret));
    }
    assert_eq!(bed.saved().phase, Phase::Aborting);
    // Blue is undone already: writable, nothing of the cutover on it.
    assert_eq!(slots_and_subscriptions(&bed.bg.blue), Vec::<String>::new());
    let before = bed.load.commits();
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed.load.commits() < before + 10 {
        assert!(Instant::now() < deadline, "blue no longer takes writes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    bed.bg.green.restart().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["cleanup", "-f"])
        .arg(&bed.plan)
        .arg("--secrets-dir")
        .arg(bed.secrets())
        .arg("--state-file")
        .arg(bed.state_file())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("removed subscription"), "{stdout}");
    assert!(stdout.contains("removed the rows copied"), "{stdout}");
    assert_eq!(slots_and_subscriptions(&bed.bg.green), Vec::<String>::new());
    assert_eq!(count(&bed.bg.green, "SELECT count(*) FROM ledger"), 0);
    let Bed { load, .. } = bed;
    load.stop().await;
}
