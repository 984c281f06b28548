//! Local mode: an example plan from cutover-plans/ run with `cutover run -f` on two real
//! PostgreSQL clusters, Secrets as files. The staging rehearsal completes, writes only the
//! rehearsal Secret, leaves blue writable, and prints the timing report.

use std::path::{Path, PathBuf};
use std::process::Command;

use cutover_tests::BlueGreen;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn put(dir: &Path, secret: &str, key: &str, value: &str) {
    std::fs::create_dir_all(dir.join(secret)).unwrap();
    std::fs::write(dir.join(secret).join(key), value).unwrap();
}

#[test]
fn the_staging_rehearsal_plan_runs_in_local_mode() {
    let bg = BlueGreen::start().expect("PostgreSQL");
    for c in [&bg.blue, &bg.green] {
        c.create_role("orders_app", "app-pw", "LOGIN").unwrap();
        c.execute(
            BlueGreen::DATABASE,
            "CREATE TABLE orders (id bigserial PRIMARY KEY, item text NOT NULL, qty int NOT NULL);
             GRANT SELECT, INSERT, UPDATE ON orders TO orders_app;
             GRANT USAGE ON SEQUENCE orders_id_seq TO orders_app;",
        )
        .unwrap();
    }
    bg.blue
        .execute(
            BlueGreen::DATABASE,
            "INSERT INTO orders (item, qty) SELECT 'item ' || g, g FROM generate_series(1, 500) g",
        )
        .unwrap();

    let secrets = tempfile::tempdir().unwrap();
    let app_blue = bg.blue.dsn("orders_app", "app-pw", BlueGreen::DATABASE);
    put(secrets.path(), "orders-blue-admin", "uri", &bg.blue_dsn());
    put(secrets.path(), "orders-green-admin", "uri", &bg.green_dsn());
    put(secrets.path(), "orders-db", "DATABASE_URL", &app_blue);

    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["run", "-f"])
        .arg(repo().join("cutover-plans/staging-rehearsal.yaml"))
        .arg("--secrets-dir")
        .arg(secrets.path())
        .arg("--state-file")
        .arg(secrets.path().join("state.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "local mode failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        "Preflight",
        "Replicating",
        "Freezing",
        "Verifying",
        "write freeze:",
        "result: Completed",
        "← slowest",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    // Output to a pipe carries no colour codes.
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "escape codes in piped output:\n{stderr}"
    );
    // No password in what it printed.
    for secret in [bg.blue.password(), bg.green.password(), "app-pw"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a password was printed"
        );
    }

    // Rehearsal: the application's Secret is untouched, the rehearsal one names green.
    let read = |s: &str, k: &str| std::fs::read_to_string(secrets.path().join(s).join(k)).unwrap();
    assert_eq!(read("orders-db", "DATABASE_URL"), app_blue);
    assert_eq!(
        read("orders-db-rehearsal", "DATABASE_URL"),
        bg.green.dsn("orders_app", "app-pw", BlueGreen::DATABASE)
    );
    // Blue is writable for the application again, and green holds the rows.
    let rows = bg
        .blue
        .psql(
            BlueGreen::DATABASE,
            "SET ROLE orders_app; INSERT INTO orders (item, qty) VALUES ('after', 1) RETURNING id",
        )
        .unwrap();
    assert!(!rows.trim().is_empty());
    let on_green = bg
        .green
        .query(BlueGreen::DATABASE, "SELECT count(*) FROM orders")
        .unwrap();
    assert_eq!(on_green[0][0].as_deref(), Some("500"));
}

#[test]
fn an_invalid_plan_is_refused_with_the_problems_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("cutover-plans/staging-rehearsal.yaml"))
        .unwrap()
        .replace("drainTimeout: 10s", "drainTimeout: banana");
    let plan = dir.path().join("plan.yaml");
    std::fs::write(&plan, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["run", "-f"])
        .arg(&plan)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.freeze.drainTimeout: \"banana\" must be a duration"),
        "{stderr}"
    );
}

#[test]
fn a_misspelt_field_is_refused_naming_it_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("cutover-plans/staging-rehearsal.yaml"))
        .unwrap()
        .replace("  mode: Rehearsal", "  mdoe: Rehearsal");
    assert!(text.contains("mdoe"), "the example changed: {text}");
    let plan = dir.path().join("plan.yaml");
    std::fs::write(&plan, text).unwrap();
    // No Secrets and no databases: it must stop at reading the plan.
    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["run", "-f"])
        .arg(&plan)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.mdoe: unknown field, did you mean mode?"),
        "{stderr}"
    );
}

/// A source that refuses (a wrong password, a database that does not exist, a malformed
/// connection string, `verify-full` against a server without TLS) ends the run within seconds with the server's own words; nothing was
/// created, so there is nothing to undo.
#[test]
fn a_misconfigured_source_ends_the_run_promptly_with_the_server_message() {
    let bg = BlueGreen::start().expect("PostgreSQL");
    for c in [&bg.blue, &bg.green] {
        c.create_role("orders_app", "app-pw", "LOGIN").unwrap();
        c.execute(
            BlueGreen::DATABASE,
            "CREATE TABLE orders (id bigserial PRIMARY KEY, item text NOT NULL, qty int NOT NULL);",
        )
        .unwrap();
    }
    for (blue_uri, expected) in [
        (
            bg.blue
                .dsn("postgres", "not-the-password", BlueGreen::DATABASE),
            "password authentication failed",
        ),
        (
            bg.blue.superuser_dsn("no_such_db"),
            "database \"no_such_db\" does not exist",
        ),
        (
            "postgres://postgres@[::1".to_owned(),
            "failed to parse the connection string",
        ),
        // `verify-full` against a server without TLS (and no CA given): refused, not hung.
        (
            format!(
                "{}?sslmode=verify-full",
                bg.blue.superuser_dsn(BlueGreen::DATABASE)
            ),
            "TLS",
        ),
    ] {
        let secrets = tempfile::tempdir().unwrap();
        put(secrets.path(), "orders-blue-admin", "uri", &blue_uri);
        put(secrets.path(), "orders-green-admin", "uri", &bg.green_dsn());
        put(
            secrets.path(),
            "orders-db",
            "DATABASE_URL",
            &bg.blue.dsn("orders_app", "app-pw", BlueGreen::DATABASE),
        );
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(["run", "-f"])
            .arg(repo().join("cutover-plans/staging-rehearsal.yaml"))
            .arg("--secrets-dir")
            .arg(secrets.path())
            .arg("--state-file")
            .arg(secrets.path().join("state.json"))
            .output()
            .unwrap();
        let took = started.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stdout}\n{stderr}");
        assert!(
            took < std::time::Duration::from_secs(30),
            "{blue_uri}: took {took:?}\n{stdout}"
        );
        assert!(
            stdout.contains(expected) || stderr.contains(expected),
            "{expected:?} missing:\n{stdout}\n{stderr}"
        );
        assert!(
            !stdout.contains("not-the-password") && !stderr.contains("not-the-password"),
            "a password was printed"
        );
    }
}

/// `cutover verify` and `cutover migrate` refuse a misspelt flag, suggesting the one meant, and
/// a migration file whose name is almost right is refused naming it rather than skipped.
#[test]
fn misspelt_verify_and_migrate_inputs_are_refused_naming_them() {
    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["verify", "--tabel", "public.orders"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--tabel") && stderr.contains("--table"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("V1__create.sql"), "SELECT 1;").unwrap();
    std::fs::write(dir.path().join("V2__add_column.SQL"), "SELECT 2;").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["migrate", "--dir"])
        .arg(dir.path())
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("V2__add_column.SQL") && stderr.contains("ends in .sql"),
        "{stderr}"
    );
}
