//! Lossless under load: bank transfers run on blue while green copies and catches up, blue is
//! frozen, the final sync runs; afterwards green equals blue, nothing acknowledged is missing,
//! money is conserved, and sequences on green are not behind.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use cutover_operator::api::FreezeMethod;
use cutover_operator::postgres::freeze::{self, FreezeConfig};
use cutover_operator::postgres::replication::{self, TableName, TableSelection};
use cutover_operator::postgres::{cleanup, sync};
use cutover_tests::workload::{self, Load, LoadConfig};

const ACCOUNTS: i64 = 200;
const BALANCE: i64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossless_under_load_through_freeze_and_final_sync() {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue
        .execute(APP, &workload::seed(ACCOUNTS, BALANCE))
        .unwrap();
    let (blue, green) = engine_clients(&bg).await;
    let id = "shop/orders-lossless";
    let names = names(id);

    let load = Load::start(LoadConfig {
        dsn: app_dsn(&bg.blue),
        clients: 4,
        tps: 400.0,
        accounts: ACCOUNTS,
    });
    // Some history before replication starts, so the initial copy has rows to copy while
    // transfers keep changing them.
    wait_for(
        "the load has committed 200 transfers",
        Duration::from_secs(20),
        || async { load.commits() >= 200 },
    )
    .await;

    let tables = replication::ensure_publication(&blue, &names, &TableSelection::All)
        .await
        .unwrap();
    assert_eq!(
        tables,
        vec![
            TableName::new("public", "accounts"),
            TableName::new("public", "ledger")
        ]
    );
    replication::ensure_subscription(&blue, &green, &names, &blue_dsn(&bg))
        .await
        .unwrap();
    let progress =
        replication::wait_ready(&green, &names, Instant::now() + Duration::from_secs(40))
            .await
            .unwrap();
    assert_eq!((progress.tables_ready, progress.tables_total), (2, 2));

    // Catch up under load: lag in bytes and seconds are reported.
    let mut lag = replication::lag(&blue, &names).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lag.bytes.is_none_or(|b| b > 1 << 20) {
        assert!(Instant::now() < deadline, "lag stayed at {lag:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        lag = replication::lag(&blue, &names).await.unwrap();
    }
    assert!(lag.seconds.is_some(), "{lag:?}");
    let before_freeze = load.commits();
    wait_for(
        "more transfers after catching up",
        Duration::from_secs(10),
        || async { load.commits() >= before_freeze + 100 },
    )
    .await;

    // Freeze under load.
    let cfg = FreezeConfig {
        tables: Vec::new(),
        cutover_id: id.into(),
        method: FreezeMethod::ReadOnly,
        roles: vec![APP_ROLE.into()],
        drain_timeout: Duration::from_secs(2),
    };
    let frozen = freeze::freeze(&blue, &cfg).await.unwrap();
    let frozen_instant = Instant::now();
    eprintln!("freeze: {frozen:?}");
    let proof = freeze::assert_frozen(&blue, id).await.unwrap();
    assert_eq!(proof.method, "ReadOnly");
    let refusal = freeze::probe_write(
        &cutover_operator::postgres::Dsn::new(app_dsn(&bg.blue)),
        &TableName::new("public", "accounts"),
    )
    .await
    .unwrap();
    assert!(refusal.contains("read-only transaction"), "{refusal}");

    let fs = sync::final_sync(
        &blue,
        &green,
        &names,
        Instant::now() + Duration::from_secs(20),
    )
    .await
    .unwrap();
    eprintln!("final sync: {fs:?}");
    assert!(fs.applied_lsn >= fs.freeze_lsn);
    assert!(fs.sequences >= 1);

    // The clients keep trying during the freeze and are refused with a clear error.
    wait_for(
        "the clients hit the freeze",
        Duration::from_secs(10),
        || async {
            load.snapshot()
                .errors
                .keys()
                .any(|e| e.contains("cannot execute") && e.contains("read-only transaction"))
        },
    )
    .await;
    let report = load.stop().await;
    assert!(
        report.commits.iter().all(|c| *c < frozen_instant),
        "a write was acknowledged after the freeze"
    );
    eprintln!(
        "{} acknowledged transfers; errors seen: {:?}",
        report.acknowledged.len(),
        report.errors
    );
    for e in report.errors.keys() {
        assert!(
            e.contains("read-only transaction")
                || e.contains("terminating connection")
                || e == "connection closed",
            "unexpected error from the workload: {e}"
        );
    }

    // Green equals blue exactly.
    for table in ["accounts", "ledger"] {
        let q = format!(
            "SELECT count(*) || ':' || md5(string_agg(t::text, '|' ORDER BY t.id)) FROM {table} t"
        );
        assert_eq!(one(&bg.blue, &q), one(&bg.green, &q), "{table} differs");
    }
    let total = ACCOUNTS * BALANCE;
    assert_eq!(count(&bg.green, "SELECT sum(balance) FROM accounts"), total);
    assert_eq!(count(&bg.blue, "SELECT sum(balance) FROM accounts"), total);
    // Every acknowledged transfer is on green.
    let on_green: HashSet<(i32, i64)> = bg
        .green
        .query(APP, "SELECT client, seq FROM ledger")
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r[0].as_deref().unwrap().parse().unwrap(),
                r[1].as_deref().unwrap().parse().unwrap(),
            )
        })
        .collect();
    let missing: Vec<_> = report
        .acknowledged
        .iter()
        .filter(|a| !on_green.contains(a))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but missing on green: {missing:?}"
    );
    assert!(report.acknowledged.len() >= 300);
    // Sequences on green are not behind blue's, and the next id on green is free.
    let seq = "SELECT last_value || ':' || is_called FROM ledger_id_seq";
    assert_eq!(one(&bg.blue, seq), one(&bg.green, seq));
    let max_id = count(&bg.green, "SELECT max(id) FROM ledger");
    assert!(count(&bg.green, "SELECT nextval('ledger_id_seq')") > max_id);

    // Abort from here: blue writable again, nothing left.
    cleanup::abort(&blue, Some(&green), &names, id)
        .await
        .unwrap();
    assert_clean_and_writable(&bg).await;
}
