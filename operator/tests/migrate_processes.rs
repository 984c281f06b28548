//! `cutover migrate` and `cutover wait` as processes, the way Jobs and init containers run them:
//! eight runners at once, a lock holder killed with SIGKILL, exit codes and messages.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cutover_tests::PgCluster;

const DB: &str = "app";

fn cluster() -> PgCluster {
    let pg = PgCluster::start().unwrap();
    pg.create_database(DB).unwrap();
    pg
}

fn dsn(pg: &PgCluster) -> String {
    format!("{}?sslmode=disable", pg.superuser_dsn(DB))
}

fn cutover(pg: &PgCluster, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cutover"));
    cmd.args(args)
        .env("DATABASE_URL", dsn(pg))
        .env("CUTOVER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn migrate(pg: &PgCluster, dir: &Path) -> Command {
    cutover(
        pg,
        &[
            "migrate",
            "--dir",
            dir.to_str().unwrap(),
            "--database-url-env",
            "DATABASE_URL",
            "--lock-retry-delay",
            "100ms",
        ],
    )
}

/// Waits for a child with a deadline, killing it when the deadline passes.
fn finish(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "process did not finish within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn value(pg: &PgCluster, sql: &str) -> Option<String> {
    pg.query(DB, sql)
        .unwrap()
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn eight_runners_at_once_apply_each_migration_exactly_once() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, sql: &str| std::fs::write(dir.path().join(name), sql).unwrap();
    write(
        "V1__tables.sql",
        "CREATE TABLE applied (version text);\n\
         CREATE TABLE items (id bigint PRIMARY KEY, kind int);\n\
         INSERT INTO items SELECT g, g % 7 FROM generate_series(1, 5000) g;\n\
         INSERT INTO applied VALUES ('1');\n",
    );
    write(
        "V2__slow.sql",
        "SELECT pg_sleep(0.3);\nINSERT INTO applied VALUES ('2');\n",
    );
    write(
        "V3__items_kind_idx.sql",
        "-- cutover:no-transaction\nCREATE INDEX CONCURRENTLY items_kind_idx ON items (kind);\n\
         INSERT INTO applied VALUES ('3');\n",
    );
    write("V4__last.sql", "INSERT INTO applied VALUES ('4');\n");

    let children: Vec<Child> = (0..8)
        .map(|_| migrate(&pg, dir.path()).spawn().unwrap())
        .collect();
    let mut ran = 0;
    for child in children {
        let out = finish(child, Duration::from_secs(90));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "a runner failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let n: usize = stdout
            .split("ran ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no summary in {stdout:?}"));
        ran += n;
        assert!(stdout.contains("current version: 4"), "{stdout}");
    }
    assert_eq!(ran, 4, "files run over all processes");
    assert_eq!(
        value(
            &pg,
            "SELECT string_agg(version, ',' ORDER BY version) FROM applied"
        )
        .as_deref(),
        Some("1,2,3,4")
    );
    assert_eq!(
        value(
            &pg,
            "SELECT string_agg(version || ':' || success, ',' ORDER BY id) FROM cutover_schema_history"
        )
        .as_deref(),
        Some("1:true,2:true,3:true,4:true")
    );
    assert_eq!(
        value(
            &pg,
            "SELECT i.indisvalid::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = 'items_kind_idx'"
        )
        .as_deref(),
        Some("true")
    );
}

#[test]
fn a_lock_holder_killed_mid_migration_is_rolled_back_and_the_next_runner_completes() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, sql: &str| std::fs::write(dir.path().join(name), sql).unwrap();
    write(
        "V1__gate.sql",
        "CREATE TABLE gate (open boolean NOT NULL);\nINSERT INTO gate VALUES (false);\n",
    );
    let out = finish(
        migrate(&pg, dir.path()).spawn().unwrap(),
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    // V2 does some work, then waits at the gate (without waiting on a lock).
    write(
        "V2__gated.sql",
        "CREATE TABLE half_done (id bigint);\n\
         DO $$ BEGIN WHILE NOT (SELECT open FROM gate) LOOP PERFORM pg_sleep(0.05); END LOOP; END $$;\n\
         CREATE TABLE done (id bigint);\n",
    );

    let holder = migrate(&pg, dir.path()).spawn().unwrap();
    let holder_backend = || {
        value(
            &pg,
            "SELECT pid::text FROM pg_stat_activity WHERE application_name = 'cutover-migrate' \
             AND state = 'active' AND query LIKE '%half_done%'",
        )
    };
    let mut backend = None;
    wait_until(
        "the first runner is inside V2",
        Duration::from_secs(30),
        || {
            backend = holder_backend();
            backend.is_some()
        },
    );
    let backend = backend.unwrap();
    let next = migrate(&pg, dir.path()).spawn().unwrap();
    wait_until(
        "the second runner waits for the lock",
        Duration::from_secs(30),
        || {
            value(
            &pg,
            "SELECT count(*)::text FROM pg_stat_activity WHERE application_name = 'cutover-migrate'",
        )
        .as_deref()
            == Some("2")
        },
    );

    let mut holder = holder;
    holder.kill().unwrap(); // SIGKILL
    holder.wait().unwrap();

    // The server notices the dead client (client_connection_check_interval) and ends the
    // backend although its statement would never finish: the transaction is rolled back and
    // the session lock released.
    wait_until(
        "the killed runner's backend is gone",
        Duration::from_secs(15),
        || {
            value(
                &pg,
                &format!("SELECT count(*)::text FROM pg_stat_activity WHERE pid = {backend}"),
            )
            .as_deref()
                == Some("0")
        },
    );
    assert_eq!(value(&pg, "SELECT to_regclass('done')::text"), None);
    assert_eq!(
        value(
            &pg,
            "SELECT count(*)::text FROM cutover_schema_history WHERE version = '2'"
        )
        .as_deref(),
        Some("0"),
        "the killed attempt left no history row"
    );

    pg.execute(DB, "UPDATE gate SET open = true").unwrap();
    let out = finish(next, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        value(&pg, "SELECT to_regclass('half_done')::text").as_deref(),
        Some("half_done")
    );
    assert_eq!(
        value(
            &pg,
            "SELECT string_agg(version || ':' || success, ',' ORDER BY id) FROM cutover_schema_history"
        )
        .as_deref(),
        Some("1:true,2:true")
    );
}

#[test]
fn wait_exits_non_zero_with_a_clear_message_on_timeout_and_dry_run_lists_files() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("V1__a.sql"),
        "CREATE TABLE a (id bigint);\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("V2__b.sql"),
        "-- cutover:no-transaction\nCREATE INDEX CONCURRENTLY a_id ON a (id);\n",
    )
    .unwrap();

    let mut dry = migrate(&pg, dir.path());
    dry.arg("--dry-run");
    let out = finish(dry.spawn().unwrap(), Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("would run V1__a.sql (version 1, a)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("would run V2__b.sql (version 2, b, outside a transaction)"),
        "{stdout}"
    );

    let mut wait = cutover(
        &pg,
        &[
            "wait",
            "--database-url-env",
            "DATABASE_URL",
            "--until-version",
            "2",
            "--timeout",
            "1s",
        ],
    );
    let out = finish(wait.spawn().unwrap(), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("timed out after 1s waiting for migration version 2 to be applied"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(pg.password()),
        "the password leaked: {stderr}"
    );

    let out = finish(
        migrate(&pg, dir.path()).spawn().unwrap(),
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    let mut wait = cutover(&pg, &["wait", "--until-version", "2", "--timeout", "10s"]);
    let out = finish(wait.spawn().unwrap(), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn lint_reports_file_line_and_advice_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("V1__orders.sql"),
        "CREATE TABLE orders (id bigint PRIMARY KEY, note text);\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("V2__index.sql"),
        "ALTER TABLE orders ADD COLUMN customer bigint NOT NULL;\n\
         CREATE INDEX orders_customer_idx ON orders (customer);\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["lint", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("V2__index.sql:1:"), "{stdout}");
    assert!(stdout.contains("adding-required-field"), "{stdout}");
    assert!(
        stdout.contains("V2__index.sql:2:1: require-concurrent-index-creation"),
        "{stdout}"
    );
    assert!(stdout.contains("help: "), "{stdout}");

    std::fs::write(
        dir.path().join("V2__index.sql"),
        "-- cutover:no-transaction\n\
         CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_note_idx ON orders (note);\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["lint", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("2 file(s) checked, no findings"),
        "{stdout}"
    );
}
