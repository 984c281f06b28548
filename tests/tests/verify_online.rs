//! Online verification against real PostgreSQL while bank transfers write to blue: every row is
//! proven while the load runs; what changed since is compared inside the freeze and matches; a
//! difference no later change explains is named before any freeze; a write to green outside
//! replication is seen; a TRUNCATE on blue undoes its table's proof; a lost witness says so.

mod common;

use std::time::{Duration, Instant};

use common::*;
use cutover_operator::api::FreezeMethod;
use cutover_operator::postgres::freeze::{self, FreezeConfig};
use cutover_operator::postgres::replication::{self, TableSelection};
use cutover_operator::postgres::verify::VerifyOptions;
use cutover_operator::postgres::verify::online::{OnlineConfig, OnlineError, OnlineVerifier};
use cutover_operator::postgres::{Dsn, sync};
use cutover_tests::BlueGreen;
use cutover_tests::workload::{self, Load, LoadConfig};

const ACCOUNTS: i64 = 300;

/// Blue and green with the bank schema (plus a keyless `audit` table and a `scratch` table),
/// replication running and caught up, and the load writing to blue.
async fn replicating(id: &str) -> (BlueGreen, Load, OnlineConfig) {
    let bg = blue_green();
    let schema = format!(
        "{}\nCREATE TABLE audit (note text);\nCREATE TABLE scratch (id int PRIMARY KEY, v text);",
        workload::SCHEMA
    );
    with_schema(&bg, &schema, &workload::grants(APP_ROLE));
    bg.blue
        .execute(
            APP,
            &format!(
                "{} INSERT INTO audit SELECT 'n' || g FROM generate_series(1, 50) g;
                 INSERT INTO scratch SELECT g, 'v' || g FROM generate_series(1, 500) g;",
                workload::seed(ACCOUNTS, 1000)
            ),
        )
        .unwrap();
    let load = Load::start(LoadConfig {
        dsn: app_dsn(&bg.blue),
        clients: 2,
        tps: 150.0,
        accounts: ACCOUNTS,
    });
    wait_for(
        "the load has committed",
        Duration::from_secs(20),
        || async { load.commits() >= 300 },
    )
    .await;
    let (blue, green) = engine_clients(&bg).await;
    let names = names(id);
    replication::ensure_publication(&blue, &names, &TableSelection::All)
        .await
        .unwrap();
    replication::ensure_subscription(&blue, &green, &names, &blue_dsn(&bg))
        .await
        .unwrap();
    replication::wait_ready(&green, &names, Instant::now() + Duration::from_secs(40))
        .await
        .unwrap();
    let cfg = OnlineConfig {
        source: blue_dsn(&bg),
        target: Dsn::new(bg.green_dsn()),
        options: VerifyOptions {
            parallelism: 2,
            // Small ranges: many of them, and the load dirties some while they are hashed.
            chunk_rows: 40,
            leaf_rows: 20,
            ..VerifyOptions::default()
        },
        source_slot: names.online_source_slot.clone(),
        target_slot: names.online_target_slot.clone(),
        subscription: names.subscription.clone(),
        forward_slot: names.slot.clone(),
        keys_per_round: 1000,
    };
    (bg, load, cfg)
}

/// Rounds until every range is proven (or a divergence is found), within `limit`.
async fn until_current(v: &mut OnlineVerifier, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !v.progress().pass_complete && v.progress().divergence.is_none() {
        assert!(
            Instant::now() < deadline,
            "online pass not complete: {:?}",
            v.progress()
        );
        v.round(false).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_is_proven_under_load_and_the_freeze_compares_only_what_changed() {
    let id = "shop/online-under-load";
    let (bg, load, cfg) = replicating(id).await;
    let mut v = OnlineVerifier::start(cfg).await.unwrap();
    let p = v.progress().clone();
    assert_eq!(p.tables_online, 3, "{p:?}");
    assert_eq!(p.tables_in_freeze.len(), 1, "{p:?}");
    assert!(p.tables_in_freeze[0].1.contains("no primary key"), "{p:?}");
    until_current(&mut v, Duration::from_secs(60)).await;
    let p = v.progress().clone();
    assert_eq!(p.divergence, None);
    assert!(p.ranges_total > 10, "{p:?}");
    assert!(p.changes_seen > 0, "the witness saw the load: {p:?}");
    // Rounds go on while the load writes: what it changes is compared by key.
    let rounds = p.rounds;
    let changed_before = p.changes_seen;
    wait_for("more writes", Duration::from_secs(10), || async {
        load.commits() >= 600
    })
    .await;
    for _ in 0..3 {
        v.round(false).await.unwrap();
    }
    assert!(v.progress().rounds >= rounds + 3);
    assert!(v.progress().changes_seen > changed_before);
    assert_eq!(v.progress().divergence, None);
    // A change on blue after the last round, before the freeze: compared inside it.
    bg.blue
        .execute(APP, "UPDATE scratch SET v = 'late' WHERE id = 250")
        .unwrap();

    // Freeze: what changed since the last round is compared inside the freeze, and matches.
    let (blue, green) = engine_clients(&bg).await;
    let names = names(id);
    freeze::freeze(
        &blue,
        &FreezeConfig {
            tables: Vec::new(),
            cutover_id: id.into(),
            method: FreezeMethod::ReadOnly,
            roles: vec![APP_ROLE.into()],
            drain_timeout: Duration::from_secs(2),
        },
    )
    .await
    .unwrap();
    sync::final_sync(
        &blue,
        &green,
        &names,
        Instant::now() + Duration::from_secs(20),
    )
    .await
    .unwrap();
    let report = load.stop().await;
    assert!(!report.acknowledged.is_empty());
    let dirty = v.progress().dirty_keys;
    let tables = v.finish().await.unwrap();
    assert!(
        v.progress().changes_seen > 0 && v.progress().rounds > rounds + 3,
        "{:?}",
        v.progress()
    );
    let scratch = tables
        .iter()
        .find(|t| t.table.name == "scratch")
        .expect("scratch compared online");
    assert!(scratch.matched, "{scratch:?}");
    assert_eq!(tables.len(), 3);
    for t in &tables {
        assert!(t.matched, "{t:?}");
    }
    assert!(v.progress().dirty_keys == 0, "{:?}", v.progress());
    eprintln!("dirty keys compared inside the freeze: {dirty}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_difference_no_change_explains_is_named_before_any_freeze() {
    let id = "shop/online-divergence";
    let (bg, load, cfg) = replicating(id).await;
    // A cell of a row the load never touches differs on green (written before the witnesses
    // exist, as a broken apply would leave it).
    bg.green
        .execute(APP, "UPDATE scratch SET v = 'tampered' WHERE id = 333")
        .unwrap();
    let mut v = OnlineVerifier::start(cfg).await.unwrap();
    until_current(&mut v, Duration::from_secs(60)).await;
    let divergence = v.progress().divergence.clone().expect("a divergence");
    assert!(divergence.contains("public.scratch"), "{divergence}");
    assert!(divergence.contains("id=333"), "{divergence}");
    assert!(divergence.contains("changed"), "{divergence}");
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_green_outside_replication_are_divergences() {
    let id = "shop/online-rogue";
    let (bg, load, cfg) = replicating(id).await;
    let mut v = OnlineVerifier::start(cfg).await.unwrap();
    until_current(&mut v, Duration::from_secs(60)).await;
    assert_eq!(v.progress().divergence, None);
    // A rogue insert and a delete on green, in ranges already proven.
    bg.green
        .execute(
            APP,
            "INSERT INTO scratch VALUES (100000, 'rogue'); DELETE FROM scratch WHERE id = 7;",
        )
        .unwrap();
    v.round(false).await.unwrap();
    let divergence = v.progress().divergence.clone().expect("a divergence");
    assert!(
        divergence.contains("written outside replication"),
        "{divergence}"
    );
    assert!(
        divergence.contains("public.scratch INSERT id=100000"),
        "{divergence}"
    );
    assert!(divergence.contains("2 row changes"), "{divergence}");
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_changed_on_green_in_a_key_the_load_keeps_updating_is_never_passed() {
    let id = "shop/online-hot";
    let (bg, load, cfg) = replicating(id).await;
    let mut v = OnlineVerifier::start(cfg).await.unwrap();
    until_current(&mut v, Duration::from_secs(60)).await;
    assert_eq!(v.progress().divergence, None);
    // Every account is updated by the transfers; one balance changes on green behind
    // replication's back.
    bg.green
        .execute(
            APP,
            "UPDATE accounts SET balance = balance + 1 WHERE id = 1",
        )
        .unwrap();
    v.round(false).await.unwrap();
    let divergence = v.progress().divergence.clone().expect("a divergence");
    assert!(
        divergence.contains("public.accounts UPDATE id=1"),
        "{divergence}"
    );
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_on_blue_undoes_its_tables_proof_and_it_is_proven_again() {
    let id = "shop/online-truncate";
    let (bg, load, cfg) = replicating(id).await;
    let mut v = OnlineVerifier::start(cfg).await.unwrap();
    until_current(&mut v, Duration::from_secs(60)).await;
    bg.blue
        .execute(
            APP,
            "TRUNCATE scratch; INSERT INTO scratch SELECT g, 'w' || g FROM generate_series(1, 90) g;",
        )
        .unwrap();
    // The first round after it sees the TRUNCATE: the table's ranges are pending again.
    v.round(false).await.unwrap();
    assert!(!v.progress().pass_complete, "{:?}", v.progress());
    until_current(&mut v, Duration::from_secs(60)).await;
    assert_eq!(v.progress().divergence, None);
    // And the comparison still catches a real difference in that table afterwards: a change on
    // green that carries no replication origin is a divergence.
    bg.green
        .execute(APP, "UPDATE scratch SET v = 'x' WHERE id = 5")
        .unwrap();
    v.round(false).await.unwrap();
    assert!(v.progress().divergence.is_some());
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_witness_is_reported_as_lost() {
    let id = "shop/online-lost";
    let (bg, load, cfg) = replicating(id).await;
    let slot = cfg.source_slot.clone();
    let mut v = OnlineVerifier::start(cfg).await.unwrap();
    v.round(false).await.unwrap();
    // The pass's slot is the prefix and a suffix of its own.
    bg.blue
        .execute(
            APP,
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE slot_name LIKE '{slot}%'"
            ),
        )
        .unwrap();
    match v.round(false).await {
        Err(OnlineError::WitnessLost(s)) => assert!(s.starts_with(&slot), "{s}"),
        other => panic!("expected the witness to be lost, got {other:?}"),
    }
    load.stop().await;
}
