//! The PostgreSQL test bed itself: clusters start with the right settings, take passwords over
//! TCP, run in parallel, and leave nothing behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use cutover_tests::pg::{self, SUPERUSER};
use cutover_tests::{BlueGreen, PgCluster};

/// Processes whose command line mentions `needle` (the postmaster's and its children's
/// `-D <dir>`, or the data directory in their titles).
fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            found.push(pid);
        }
    }
    found
}

/// Whether `pid` runs (zombies do not count: in containers whose init does not reap, killed
/// orphans stay zombies).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn starts_with_logical_wal_and_takes_the_password_over_tcp() {
    let pg = PgCluster::start().unwrap();
    eprintln!("cluster started in {:?}", pg.start_duration());

    let client = pg.connect("postgres").await.unwrap();
    let row = client.query_one("SHOW wal_level", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "logical");
    for (name, value) in [
        ("max_replication_slots", "20"),
        ("max_wal_senders", "20"),
        ("max_worker_processes", "32"),
        ("max_logical_replication_workers", "8"),
        ("max_connections", "200"),
        ("password_encryption", "scram-sha-256"),
        ("server_encoding", "UTF8"),
    ] {
        let row = client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), value, "{name}");
    }
    // The TCP connection really is TCP, to the advertised port.
    let row = client
        .query_one(
            "SELECT host(inet_server_addr()), inet_server_port(), current_user::text",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), pg.host());
    assert_eq!(row.get::<_, i32>(1), i32::from(pg.port()));
    assert_eq!(row.get::<_, String>(2), SUPERUSER);
    assert!(
        pg.superuser_dsn("postgres")
            .starts_with(&format!("postgres://postgres:{}@127.0.0.1:", pg.password()))
    );

    // A wrong password is refused: TCP does check it.
    let refused = pg.connect_as(SUPERUSER, "wrong", "postgres").await;
    let Err(err) = refused else {
        panic!("a wrong password must be refused");
    };
    let message = format!("{err:#}");
    assert!(
        message.contains("password authentication failed"),
        "{message}"
    );

    // The Unix socket lives in the cluster's directory.
    assert!(
        pg.socket_dir()
            .join(format!(".s.PGSQL.{}", pg.port()))
            .exists()
    );
}

#[test]
fn blue_and_green_start_in_parallel_on_distinct_ports() {
    let started = Instant::now();
    let bg = BlueGreen::start().unwrap();
    eprintln!(
        "blue and green with database app started in {:?} (blue {:?}, green {:?})",
        started.elapsed(),
        bg.blue.start_duration(),
        bg.green.start_duration()
    );
    assert_ne!(bg.blue.port(), bg.green.port());
    assert_ne!(bg.blue.socket_dir(), bg.green.socket_dir());
    assert_ne!(bg.blue.password(), bg.green.password());
    assert!(bg.blue_dsn().ends_with(&format!(":{}/app", bg.blue.port())));
    assert!(
        bg.green_dsn()
            .ends_with(&format!(":{}/app", bg.green.port()))
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for (dsn, pg) in [(bg.blue_dsn(), &bg.blue), (bg.green_dsn(), &bg.green)] {
            let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let row = client
                .query_one("SELECT current_database()::text, inet_server_port()", &[])
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), "app");
            assert_eq!(row.get::<_, i32>(1), i32::from(pg.port()));
        }
    });
}

#[test]
fn many_clusters_in_parallel_get_distinct_ports() {
    let clusters: Vec<PgCluster> = thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(PgCluster::start)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let mut ports: Vec<u16> = clusters.iter().map(PgCluster::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), clusters.len());
    for pg in &clusters {
        assert_eq!(pg.show("wal_level").unwrap(), "logical");
    }
}

#[test]
fn builder_settings_override_the_defaults() {
    let pg = PgCluster::builder()
        .setting("wal_level", "replica")
        .setting("TimeZone", "America/New_York")
        .setting("application_name", "it's quoted")
        .start()
        .unwrap();
    assert_eq!(pg.show("wal_level").unwrap(), "replica");
    assert_eq!(pg.show("TimeZone").unwrap(), "America/New_York");
    assert_eq!(pg.show("application_name").unwrap(), "it's quoted");
    // Untouched defaults stay.
    assert_eq!(pg.show("max_replication_slots").unwrap(), "20");

    assert!(
        PgCluster::builder()
            .setting("port", "5432")
            .start()
            .is_err()
    );
    assert!(
        PgCluster::builder()
            .setting("bad\nname", "x")
            .start()
            .is_err()
    );
}

#[test]
fn default_time_zone_is_utc() {
    let pg = PgCluster::start().unwrap();
    assert_eq!(pg.show("TimeZone").unwrap(), "UTC");
}

#[tokio::test]
async fn roles_databases_and_scripts() {
    let pg = PgCluster::start().unwrap();
    pg.create_role("app_owner", "s3cret'pw", "LOGIN REPLICATION")
        .unwrap();
    pg.create_database("shop").unwrap();
    pg.execute(
        "shop",
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         INSERT INTO items VALUES (1, 'one'), (2, 'two');
         GRANT ALL ON items TO app_owner;",
    )
    .unwrap();

    let client = pg
        .connect_as("app_owner", "s3cret'pw", "shop")
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT count(*), (SELECT rolreplication FROM pg_roles WHERE rolname = current_user) FROM items",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    assert!(row.get::<_, bool>(1));

    assert_eq!(
        pg.query(
            "shop",
            "SELECT id, name FROM items ORDER BY id; SELECT NULL"
        )
        .unwrap(),
        vec![
            vec![Some("1".to_owned()), Some("one".to_owned())],
            vec![Some("2".to_owned()), Some("two".to_owned())],
            vec![None],
        ]
    );
    assert_eq!(
        pg.psql("shop", "\\set n 2\nSELECT name FROM items WHERE id = :n;\n")
            .unwrap(),
        "two"
    );
    let err = pg
        .psql("shop", "SELECT 1/0;\nSELECT 'not reached';")
        .unwrap_err();
    assert!(format!("{err:#}").contains("division by zero"), "{err:#}");
    let err = pg.execute("shop", "SELECT * FROM missing").unwrap_err();
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
}

#[tokio::test]
async fn restart_keeps_port_data_and_password() {
    let mut pg = PgCluster::start().unwrap();
    let port = pg.port();
    let old_pid = pg.pid().unwrap();
    pg.execute(
        "postgres",
        "CREATE TABLE kept (v int); INSERT INTO kept VALUES (7);",
    )
    .unwrap();
    // ALTER SYSTEM refuses to run in the implicit transaction of a multi-statement batch.
    pg.execute("postgres", "ALTER SYSTEM SET max_replication_slots = 25")
        .unwrap();
    pg.restart().unwrap();
    assert_eq!(pg.port(), port);
    assert_ne!(pg.pid().unwrap(), old_pid);
    assert_eq!(pg.show("max_replication_slots").unwrap(), "25");
    let client = pg.connect("postgres").await.unwrap();
    let row = client.query_one("SELECT v FROM kept", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);

    pg.stop().unwrap();
    assert!(!pg.is_running());
    assert!(pg.connect("postgres").await.is_err());
    pg.restart().unwrap();
    assert!(pg.is_running());
}

#[test]
fn startup_failure_reports_the_server_log() {
    let err = PgCluster::builder()
        .setting("shared_buffers", "plenty")
        .start()
        .unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("postgres exited during startup"),
        "{message}"
    );
    assert!(message.contains("shared_buffers"), "{message}");
    assert!(message.contains("postgres.log"), "{message}");
}

#[test]
fn dropping_in_a_panicking_thread_leaves_nothing_behind() {
    let (tx, rx) = mpsc::channel::<(u32, PathBuf, PathBuf)>();
    let outcome = thread::spawn(move || {
        let pg = PgCluster::start().unwrap();
        tx.send((
            pg.pid().unwrap(),
            pg.socket_dir().to_owned(),
            pg.data_dir().to_owned(),
        ))
        .unwrap();
        panic!("test failure while a cluster runs");
    })
    .join();
    assert!(outcome.is_err(), "the thread panicked");
    let (pid, dir, data_dir) = rx.recv().unwrap();
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(!process_alive(pid), "postmaster {pid} still exists");
    // Backends and auxiliary processes went with the postmaster.
    wait_until(
        "no process mentions the data directory",
        Duration::from_secs(10),
        || processes_mentioning(&data_dir).is_empty(),
    );
}

const HELPER_ENV: &str = "CUTOVER_TESTBED_HELPER";

/// Not a test: the child process of `server_dies_with_the_test_process`.
#[test]
#[ignore = "helper process for server_dies_with_the_test_process"]
fn helper_start_cluster_and_hang() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    // Started from a short-lived thread on purpose: the server must survive that thread.
    let pg = thread::spawn(|| PgCluster::start().unwrap())
        .join()
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    assert!(process_alive(pg.pid().unwrap()));
    println!("READY {} {}", pg.pid().unwrap(), pg.socket_dir().display());
    thread::sleep(Duration::from_secs(120));
}

#[test]
fn server_dies_with_the_test_process() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_start_cluster_and_hang",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest prints "test <name> ... " without a newline before the test's output.
            if let Some((_, rest)) = line.split_once("READY ") {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(60));
    // Kill the "test process" abruptly: no unwinding, no Drop.
    child.kill().unwrap();
    child.wait().unwrap();
    let ready = ready.expect("the helper process started a cluster");
    let (pid, dir) = ready.split_once(' ').unwrap();
    let dir = PathBuf::from(dir);

    wait_until(
        "the orphaned postmaster exits",
        Duration::from_secs(20),
        || !process_alive(pid.parse().unwrap()),
    );
    wait_until(
        "the orphaned server's processes exit",
        Duration::from_secs(20),
        || processes_mentioning(&dir.join("data")).is_empty(),
    );
    // Only the directory is left behind, and the sweep deletes it.
    assert!(dir.exists());
    // (Another test process's first start may sweep it first.)
    pg::sweep_stale_dirs();
    assert!(!dir.exists(), "{} was swept", dir.display());
}

#[test]
fn startup_time() {
    // The first start may build the shared template (initdb); later ones copy it.
    let first = Instant::now();
    drop(PgCluster::start().unwrap());
    eprintln!(
        "first cluster start (maybe with initdb): {:?}",
        first.elapsed()
    );
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let pg = PgCluster::start().unwrap();
        times.push(started.elapsed());
        drop(pg);
    }
    eprintln!("cluster start times: {times:?}");
    let best = times.iter().min().unwrap();
    // Generous: the machine may be busy with the other tests.
    assert!(*best < Duration::from_secs(10), "{times:?}");
}
