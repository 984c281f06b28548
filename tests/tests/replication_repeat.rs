//! Crash safety: every step run again after it already ran (the operator was killed and
//! restarted) is harmless, including after half-done states a crash can leave: a slot without
//! its subscription, a publication with a stale table list, a recorded freeze not yet applied.

mod common;

use std::time::{Duration, Instant};

use common::*;
use cutover_operator::api::FreezeMethod;
use cutover_operator::postgres::freeze::{self, FreezeConfig};
use cutover_operator::postgres::replication::{self, TableName, TableSelection};
use cutover_operator::postgres::{Dsn, cleanup, reverse, sync};
use cutover_tests::workload;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_can_run_twice() {
    let bg = blue_green();
    with_schema(
        &bg,
        &format!(
            "{} CREATE TABLE extra (id int PRIMARY KEY);",
            workload::SCHEMA
        ),
        &workload::grants(APP_ROLE),
    );
    bg.blue
        .execute(
            APP,
            &format!(
                "{} INSERT INTO ledger (client, seq, amount) SELECT 0, g, 1 FROM generate_series(1, 30) g;
                 INSERT INTO extra VALUES (1), (2);",
                workload::seed(30, 100)
            ),
        )
        .unwrap();
    let (blue, green) = engine_clients(&bg).await;
    let id = "repeat";
    let names = names(id);

    // A crash left a publication with only one table: ensure_publication completes it.
    bg.blue
        .execute(
            APP,
            &format!(
                "CREATE PUBLICATION {} FOR TABLE accounts",
                names.publication
            ),
        )
        .unwrap();
    let t1 = replication::ensure_publication(&blue, &names, &TableSelection::All)
        .await
        .unwrap();
    let t2 = replication::ensure_publication(&blue, &names, &TableSelection::All)
        .await
        .unwrap();
    assert_eq!(t1, t2);
    let mut published = replication::publication_tables(&blue, &names.publication)
        .await
        .unwrap();
    published.sort();
    assert_eq!(published, t1);
    assert_eq!(t1.len(), 3);

    // A crash between creating the slot and committing the subscription left the slot alone.
    bg.blue
        .execute(
            APP,
            &format!(
                "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
                names.slot
            ),
        )
        .unwrap();
    assert!(
        replication::ensure_subscription(&blue, &green, &names, &blue_dsn(&bg))
            .await
            .unwrap()
    );
    assert!(
        !replication::ensure_subscription(&blue, &green, &names, &blue_dsn(&bg))
            .await
            .unwrap()
    );
    // A subscription someone disabled is enabled again.
    bg.green
        .execute(
            APP,
            &format!("ALTER SUBSCRIPTION {} DISABLE", names.subscription),
        )
        .unwrap();
    replication::ensure_subscription(&blue, &green, &names, &blue_dsn(&bg))
        .await
        .unwrap();
    replication::wait_ready(&green, &names, Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    replication::wait_ready(&green, &names, Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(count(&bg.green, "SELECT count(*) FROM ledger"), 30);

    // Freeze twice, the second time after a crash that left the settings recorded but the
    // sessions not yet ended.
    let cfg = FreezeConfig {
        tables: Vec::new(),
        cutover_id: id.into(),
        method: FreezeMethod::ReadOnly,
        roles: vec![APP_ROLE.into()],
        drain_timeout: Duration::from_secs(1),
    };
    freeze::freeze(&blue, &cfg).await.unwrap();
    freeze::freeze(&blue, &cfg).await.unwrap();
    freeze::assert_frozen(&blue, id).await.unwrap();

    let a = sync::final_sync(
        &blue,
        &green,
        &names,
        Instant::now() + Duration::from_secs(20),
    )
    .await
    .unwrap();
    let b = sync::final_sync(
        &blue,
        &green,
        &names,
        Instant::now() + Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert!(b.freeze_lsn >= a.freeze_lsn);
    assert_eq!(a.sequences, b.sequences);
    let seq = "SELECT last_value || ':' || is_called FROM ledger_id_seq";
    assert_eq!(one(&bg.blue, seq), one(&bg.green, seq));

    let tables = vec![
        TableName::new("public", "accounts"),
        TableName::new("public", "extra"),
        TableName::new("public", "ledger"),
    ];
    for _ in 0..2 {
        reverse::start_reverse(&blue, &green, &names, &tables, &Dsn::new(bg.green_dsn()))
            .await
            .unwrap();
    }
    // Unfreeze twice (the first one "crashed" after restoring), then clean up twice.
    for _ in 0..2 {
        freeze::unfreeze(&blue, id).await.unwrap();
    }
    for _ in 0..2 {
        cleanup::cleanup(Some(&blue), Some(&green), &names)
            .await
            .unwrap();
    }
    assert_clean_and_writable(&bg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cutovers_on_the_same_servers_do_not_collide() {
    let bg = blue_green();
    with_schema(
        &bg,
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);",
        "",
    );
    bg.blue
        .execute(APP, "INSERT INTO a VALUES (1); INSERT INTO b VALUES (2);")
        .unwrap();
    let (blue, green) = engine_clients(&bg).await;
    let one_names = names("shop/a-b");
    let two_names = names("shop/a_b");
    assert_ne!(one_names.slot, two_names.slot);
    for (n, t) in [(&one_names, "a"), (&two_names, "b")] {
        replication::ensure_publication(
            &blue,
            n,
            &TableSelection::List(vec![TableName::new("public", t)]),
        )
        .await
        .unwrap();
        replication::ensure_subscription(&blue, &green, n, &blue_dsn(&bg))
            .await
            .unwrap();
    }
    for n in [&one_names, &two_names] {
        let p = replication::wait_ready(&green, n, Instant::now() + Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(p.tables_total, 1);
    }
    // Cleaning one up leaves the other alone.
    cleanup::cleanup(Some(&blue), Some(&green), &one_names)
        .await
        .unwrap();
    let left = leftovers(&bg.blue);
    assert!(
        left.contains(&format!("slot {}", two_names.slot)),
        "{left:?}"
    );
    assert!(
        !left.contains(&format!("slot {}", one_names.slot)),
        "{left:?}"
    );
    cleanup::cleanup(Some(&blue), Some(&green), &two_names)
        .await
        .unwrap();
    assert_eq!(leftovers(&bg.blue), Vec::<String>::new());
    assert_eq!(leftovers(&bg.green), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscription_does_not_echo_the_connection_string() {
    let bg = blue_green();
    with_schema(&bg, "CREATE TABLE a (id int PRIMARY KEY);", "");
    let (blue, green) = engine_clients(&bg).await;
    let names = names("leak-check");
    replication::ensure_publication(&blue, &names, &TableSelection::All)
        .await
        .unwrap();
    // A role whose name and password hold quotes, spaces and a backslash: the connection
    // string literal in CREATE SUBSCRIPTION must still mean exactly them.
    let password = r"it's a \ test";
    bg.blue
        .create_role("rep user", password, "LOGIN SUPERUSER")
        .unwrap();
    let kv = |pw: &str| {
        Dsn::new(format!(
            "host=127.0.0.1 port={} user='rep user' password='{}' dbname=app sslmode=disable",
            bg.blue.port(),
            pw.replace('\\', r"\\").replace('\'', r"\'")
        ))
    };
    let wrong = kv(r"n0t-'the\pass");
    let err = replication::ensure_subscription(&blue, &green, &names, &wrong)
        .await
        .unwrap_err();
    let shown = format!("{err} / {err:?}");
    eprintln!("{shown}");
    assert!(shown.contains("password authentication failed"), "{shown}");
    assert!(shown.contains(&wrong.redacted()), "{shown}");
    for needle in ["n0t-", "the\\pass", password, bg.blue.password()] {
        assert!(!shown.contains(needle), "{needle} leaked: {shown}");
    }
    // With the right password the same literal works.
    replication::ensure_subscription(&blue, &green, &names, &kv(password))
        .await
        .unwrap();
    replication::wait_ready(&green, &names, Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    cleanup::cleanup(Some(&blue), Some(&green), &names)
        .await
        .unwrap();
    assert_eq!(leftovers(&bg.green), Vec::<String>::new());
}
