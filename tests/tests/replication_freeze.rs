//! Freeze and unfreeze with both methods: writes stop (and the proof says so), transactions in
//! flight are drained within the budget or ended after it, and unfreeze restores exactly the
//! settings that were there, also when repeated.

mod common;

use std::time::{Duration, Instant};

use common::*;
use cutover_operator::api::FreezeMethod;
use cutover_operator::postgres::freeze::{self, FreezeConfig, FreezeError};
use cutover_operator::postgres::replication::TableName;
use cutover_operator::postgres::{Dsn, cleanup};
use cutover_tests::workload;
use tokio_postgres::error::SqlState;

const SETTINGS: &str = "SELECT coalesce(d.datname, '-') || '/' || coalesce(r.rolname, '-') || ': ' || array_to_string(s.setconfig, ',')
    FROM pg_db_role_setting s LEFT JOIN pg_database d ON d.oid = s.setdatabase
    LEFT JOIN pg_roles r ON r.oid = s.setrole ORDER BY 1";
const ROLES: &str = "SELECT string_agg(rolname || ':' || rolcanlogin, ',' ORDER BY rolname) FROM pg_roles WHERE rolname IN ('orders_app', 'reporting', 'batch')";
const ACL: &str = "SELECT datacl::text FROM pg_database WHERE datname = 'app'";

fn snapshot(
    bg: &cutover_tests::BlueGreen,
) -> (Vec<Option<String>>, Option<String>, Option<String>) {
    let settings = bg
        .blue
        .query(APP, SETTINGS)
        .unwrap()
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    (settings, one(&bg.blue, ROLES), one(&bg.blue, ACL))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_freeze_drains_proves_and_restores_exactly() {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue
        .execute(
            APP,
            &format!(
                "{} CREATE ROLE reporting LOGIN PASSWORD 'r';
                 GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO reporting;
                 ALTER ROLE reporting IN DATABASE app SET default_transaction_read_only = off;
                 ALTER ROLE reporting SET work_mem = '8MB';",
                workload::seed(10, 100)
            ),
        )
        .unwrap();
    let before = snapshot(&bg);
    let (blue, _green) = engine_clients(&bg).await;
    let id = "freeze-read-only";
    let cfg = FreezeConfig {
        tables: Vec::new(),
        cutover_id: id.into(),
        method: FreezeMethod::ReadOnly,
        roles: vec![APP_ROLE.into(), "reporting".into()],
        drain_timeout: Duration::from_millis(1500),
    };

    // An idle session, a transaction that finishes within the budget, one that never does.
    let idle = bg
        .blue
        .connect_as(APP_ROLE, APP_PASSWORD, APP)
        .await
        .unwrap();
    let mut finishing = bg
        .blue
        .connect_as(APP_ROLE, APP_PASSWORD, APP)
        .await
        .unwrap();
    let stuck = bg.blue.connect_as("reporting", "r", APP).await.unwrap();
    stuck
        .batch_execute("BEGIN; UPDATE accounts SET balance = balance WHERE id = 2")
        .await
        .unwrap();
    let (began_tx, began_rx) = tokio::sync::oneshot::channel();
    let finisher = tokio::spawn(async move {
        let tx = finishing.transaction().await.unwrap();
        tx.execute(
            "UPDATE accounts SET balance = balance + 1 WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
        began_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        tx.commit().await
    });
    began_rx.await.unwrap();

    let out = freeze::freeze(&blue, &cfg).await.unwrap();
    eprintln!("{out:?}");
    assert_eq!(
        (out.ended_idle, out.drained, out.forced),
        (1, 1, 1),
        "{out:?}"
    );
    assert!(out.drain >= Duration::from_millis(1500), "{out:?}");
    // The transaction that finished within the budget committed.
    finisher.await.unwrap().unwrap();
    assert_eq!(
        count(&bg.blue, "SELECT balance FROM accounts WHERE id = 1"),
        101
    );
    assert!(idle.is_closed() || idle.simple_query("SELECT 1").await.is_err());
    assert!(stuck.simple_query("SELECT 1").await.is_err());

    // A repeated freeze (the operator crashed and runs the step again) changes nothing.
    freeze::freeze(&blue, &cfg).await.unwrap();
    let proof = freeze::assert_frozen(&blue, id).await.unwrap();
    assert_eq!(proof.method, "ReadOnly");

    // New sessions can read but not write, with a clear error.
    let app = bg
        .blue
        .connect_as(APP_ROLE, APP_PASSWORD, APP)
        .await
        .unwrap();
    app.query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap();
    let err = app
        .execute("UPDATE accounts SET balance = 0", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("read-only transaction")
    );
    let err = app
        .query_one("SELECT nextval('ledger_id_seq')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));
    let refusal = freeze::probe_write(
        &Dsn::new(app_dsn(&bg.blue)),
        &TableName::new("public", "accounts"),
    )
    .await
    .unwrap();
    assert!(refusal.contains("read-only"), "{refusal}");
    let proof = freeze::assert_frozen(&blue, id).await.unwrap();
    assert!(proof.sessions_since_freeze >= 1);

    // Someone undoes the role setting by hand: the proof notices.
    bg.blue
        // (From another database: every new session of the frozen one is read-only, a
        // superuser's too.)
        .execute(
            "postgres",
            "ALTER ROLE reporting IN DATABASE app SET default_transaction_read_only = off",
        )
        .unwrap();
    let err = freeze::assert_frozen(&blue, id).await.unwrap_err();
    assert!(matches!(err, FreezeError::NotProven(_)), "{err}");
    assert!(err.to_string().contains("reporting"), "{err}");
    bg.blue
        .execute(
            "postgres",
            "ALTER ROLE reporting IN DATABASE app SET default_transaction_read_only = on",
        )
        .unwrap();

    // Unfreeze restores exactly what was there, ends the read-only sessions, and is repeatable.
    let un = freeze::unfreeze(&blue, id).await.unwrap();
    assert_eq!(un.restored, 3);
    assert!(un.ended_sessions >= 1);
    assert_eq!(snapshot(&bg), before);
    assert_eq!(freeze::unfreeze(&blue, id).await.unwrap().restored, 0);
    assert!(!freeze::is_frozen(&blue, id).await.unwrap());
    let app = bg
        .blue
        .connect_as(APP_ROLE, APP_PASSWORD, APP)
        .await
        .unwrap();
    app.execute("UPDATE accounts SET balance = balance WHERE id = 3", &[])
        .await
        .unwrap();
    let err = freeze::probe_write(
        &Dsn::new(app_dsn(&bg.blue)),
        &TableName::new("public", "accounts"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FreezeError::Writable(_)), "{err}");
    assert!(!err.to_string().contains(APP_PASSWORD));

    cleanup::cleanup(Some(&blue), None, &names(id))
        .await
        .unwrap();
    assert_eq!(leftovers(&bg.blue), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_login_freeze_refuses_logins_and_restores_grants() {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue
        .execute(
            APP,
            "REVOKE CONNECT ON DATABASE app FROM PUBLIC;
             GRANT CONNECT ON DATABASE app TO orders_app;
             CREATE ROLE batch NOLOGIN;",
        )
        .unwrap();
    let before = snapshot(&bg);
    let (blue, _green) = engine_clients(&bg).await;
    let id = "freeze-revoke-login";
    let cfg = FreezeConfig {
        tables: Vec::new(),
        cutover_id: id.into(),
        method: FreezeMethod::RevokeLogin,
        roles: vec![APP_ROLE.into(), "batch".into()],
        drain_timeout: Duration::from_secs(1),
    };
    let session = bg
        .blue
        .connect_as(APP_ROLE, APP_PASSWORD, APP)
        .await
        .unwrap();
    let started = Instant::now();
    let out = freeze::freeze(&blue, &cfg).await.unwrap();
    assert_eq!((out.ended_idle, out.forced), (1, 0), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "idle sessions end at once"
    );
    assert!(session.simple_query("SELECT 1").await.is_err());

    let err = bg
        .blue
        .connect_as(APP_ROLE, APP_PASSWORD, APP)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("not permitted to log in"),
        "{err:#}"
    );
    let refusal = freeze::probe_write(
        &Dsn::new(app_dsn(&bg.blue)),
        &TableName::new("public", "accounts"),
    )
    .await
    .unwrap();
    assert!(refusal.contains("not permitted to log in"), "{refusal}");
    assert_eq!(
        freeze::assert_frozen(&blue, id).await.unwrap().method,
        "RevokeLogin"
    );
    assert!(!one(&bg.blue, ACL).unwrap().contains("orders_app=c"));

    // Repeat both steps (crash recovery); the roles come back exactly as they were: orders_app
    // with LOGIN and its CONNECT grant, batch still NOLOGIN.
    freeze::freeze(&blue, &cfg).await.unwrap();
    freeze::unfreeze(&blue, id).await.unwrap();
    freeze::unfreeze(&blue, id).await.unwrap();
    assert_eq!(snapshot(&bg), before);
    let app = bg
        .blue
        .connect_as(APP_ROLE, APP_PASSWORD, APP)
        .await
        .unwrap();
    app.execute("UPDATE accounts SET balance = balance", &[])
        .await
        .unwrap();
    cleanup::cleanup(Some(&blue), None, &names(id))
        .await
        .unwrap();
    assert_eq!(leftovers(&bg.blue), Vec::<String>::new());
}

/// A write attempt of `sql` on a fresh session of `dsn`, after `SET
/// default_transaction_read_only = off` in its own transaction (so it applies to the write's):
/// the refusal's SQLSTATE, or `None` when the write went through.
async fn try_write(dsn: &str, sql: &str) -> Option<String> {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .expect("a session may turn read-only off");
    match client.batch_execute(sql).await {
        Ok(()) => None,
        Err(e) => Some(
            e.code()
                .map_or_else(|| e.to_string(), |c| c.code().to_owned()),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_freeze_stops_every_writer_and_restores_exactly() {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue
        .execute(
            APP,
            &format!(
                "{} CREATE ROLE batch LOGIN PASSWORD 'b';
                 GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON accounts, ledger TO batch;
                 GRANT USAGE ON SEQUENCE ledger_id_seq TO batch;
                 CREATE TABLE events (id int, at date NOT NULL, PRIMARY KEY (id, at))
                   PARTITION BY RANGE (at);
                 CREATE TABLE events_2026 PARTITION OF events
                   FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');",
                workload::seed(10, 100)
            ),
        )
        .unwrap();
    let before = snapshot(&bg);
    let (blue, _green) = engine_clients(&bg).await;
    let id = "freeze-strict";
    let cfg = FreezeConfig {
        cutover_id: id.into(),
        method: FreezeMethod::Strict,
        roles: vec![APP_ROLE.into()],
        drain_timeout: Duration::from_millis(1500),
        tables: vec![
            TableName::new("public", "accounts"),
            TableName::new("public", "ledger"),
            TableName::new("public", "events"),
        ],
    };
    // Sessions of every kind open before the freeze: the application, a role nobody listed,
    // the superuser.
    let app = bg.blue.dsn(APP_ROLE, APP_PASSWORD, APP);
    let batch = bg.blue.dsn("batch", "b", APP);
    let admin = bg.blue_dsn();
    let mut old = Vec::new();
    for dsn in [&app, &batch, &admin] {
        let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client.batch_execute("SELECT 1").await.unwrap();
        old.push(client);
    }

    let outcome = freeze::freeze(&blue, &cfg).await.unwrap();
    assert_eq!(outcome.ended_idle, 3, "{outcome:?}");
    for client in &old {
        assert!(
            client.batch_execute("SELECT 1").await.is_err(),
            "a session from before the freeze is still there"
        );
    }

    // Whoever writes now is refused, whatever the role and however the session is set up.
    let read_only = Some("25006".to_owned());
    let off = "";
    for (who, dsn, sql) in [
        (
            "the application, read-only turned off for the session",
            &app,
            format!("{off} INSERT INTO ledger (client, seq, amount) VALUES (1, 1, 1)"),
        ),
        (
            "the application, BEGIN READ WRITE",
            &app,
            "RESET default_transaction_read_only; BEGIN READ WRITE; UPDATE accounts SET balance = 0; COMMIT".to_owned(),
        ),
        (
            "a role not listed",
            &batch,
            format!("{off} DELETE FROM accounts"),
        ),
        ("a role not listed, TRUNCATE", &batch, format!("{off} TRUNCATE ledger")),
        (
            "the superuser",
            &admin,
            format!("{off} UPDATE accounts SET balance = balance + 1"),
        ),
        (
            "the superuser, into a partition",
            &admin,
            format!("{off} INSERT INTO events_2026 VALUES (1, '2026-06-01')"),
        ),
        (
            "the superuser, through the partitioned table",
            &admin,
            format!("{off} INSERT INTO events VALUES (2, '2026-06-01')"),
        ),
    ] {
        assert_eq!(try_write(dsn, &sql).await, read_only, "{who} could write");
    }
    assert_eq!(count(&bg.blue, "SELECT count(*) FROM ledger"), 0);
    assert_eq!(count(&bg.blue, "SELECT count(*) FROM events"), 0);
    assert_eq!(
        count(&bg.blue, "SELECT sum(balance) FROM accounts"),
        10 * 100
    );
    let proof = freeze::assert_frozen(&blue, id).await.unwrap();
    assert_eq!(proof.method, "Strict");

    // What PostgreSQL cannot forbid a superuser: replica mode skips triggers (that is how
    // logical replication's apply writes). The change witness is what sees such a write.
    assert_eq!(
        try_write(
            &admin,
            &format!("{off} SET session_replication_role = replica; UPDATE accounts SET balance = balance WHERE id = 1"),
        )
        .await,
        None
    );

    // A disabled trigger is not a freeze.
    bg.blue
        .execute(
            APP,
            "BEGIN READ WRITE; ALTER TABLE accounts DISABLE TRIGGER cutover_freeze; COMMIT",
        )
        .unwrap();
    let err = freeze::assert_frozen(&blue, id).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(r#""public"."accounts": the freeze trigger is disabled"#),
        "{err}"
    );
    bg.blue
        .execute(
            APP,
            "BEGIN READ WRITE; ALTER TABLE accounts ENABLE TRIGGER cutover_freeze; COMMIT",
        )
        .unwrap();

    // Freezing again changes nothing; unfreezing restores exactly what was there.
    freeze::freeze(&blue, &cfg).await.unwrap();
    freeze::unfreeze(&blue, id).await.unwrap();
    assert_eq!(snapshot(&bg), before);
    assert_eq!(
        count(
            &bg.blue,
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'cutover_freeze'"
        ),
        0
    );
    assert_eq!(
        count(
            &bg.blue,
            "SELECT count(*) FROM pg_proc WHERE proname = 'refuse_write'"
        ),
        0
    );
    for (dsn, sql) in [
        (
            &app,
            "INSERT INTO ledger (client, seq, amount) VALUES (1, 1, 1)",
        ),
        (&batch, "UPDATE accounts SET balance = balance"),
        (&admin, "INSERT INTO events VALUES (3, '2026-06-01')"),
    ] {
        assert_eq!(try_write(dsn, sql).await, None, "{dsn} cannot write again");
    }
}
