//! Reverse replication: after the final sync, with blue frozen, green is published back to
//! blue; rows the application writes on green appear on blue, and on rollback the sequences go
//! back too.

mod common;

use std::time::{Duration, Instant};

use common::*;
use cutover_operator::api::FreezeMethod;
use cutover_operator::postgres::freeze::{self, FreezeConfig};
use cutover_operator::postgres::replication::{self, TableSelection};
use cutover_operator::postgres::{Dsn, cleanup, reverse, sync};
use cutover_tests::workload;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_on_green_after_the_switch_reach_frozen_blue() {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue
        .execute(
            APP,
            &format!(
                "{} INSERT INTO ledger (client, seq, amount) SELECT 0, g, 1 FROM generate_series(1, 50) g;",
                workload::seed(20, 100)
            ),
        )
        .unwrap();
    let (blue, green) = engine_clients(&bg).await;
    let id = "reverse";
    let names = names(id);
    let tables = replication::ensure_publication(&blue, &names, &TableSelection::All)
        .await
        .unwrap();
    replication::ensure_subscription(&blue, &green, &names, &blue_dsn(&bg))
        .await
        .unwrap();
    replication::wait_ready(&green, &names, Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    let cfg = FreezeConfig {
        tables: Vec::new(),
        cutover_id: id.into(),
        method: FreezeMethod::ReadOnly,
        roles: vec![APP_ROLE.into()],
        drain_timeout: Duration::from_secs(1),
    };
    freeze::freeze(&blue, &cfg).await.unwrap();
    sync::final_sync(
        &blue,
        &green,
        &names,
        Instant::now() + Duration::from_secs(20),
    )
    .await
    .unwrap();

    // Switch: reverse replication starts while both are identical.
    let green_dsn = Dsn::new(bg.green_dsn());
    reverse::start_reverse(&blue, &green, &names, &tables, &green_dsn)
        .await
        .unwrap();
    // Repeating it is harmless.
    reverse::start_reverse(&blue, &green, &names, &tables, &green_dsn)
        .await
        .unwrap();
    let left = leftovers(&bg.green);
    assert!(
        !left.contains(&format!("subscription {}", names.subscription)),
        "the forward subscription is gone once writes move to green: {left:?}"
    );

    // The application writes on green.
    let app = bg
        .green
        .connect_as(APP_ROLE, APP_PASSWORD, APP)
        .await
        .unwrap();
    app.batch_execute(
        "INSERT INTO ledger (client, seq, amount) SELECT 1, g, 7 FROM generate_series(1, 100) g;
         UPDATE accounts SET balance = balance - 5 WHERE id = 1;
         UPDATE accounts SET balance = balance + 5 WHERE id = 2;
         DELETE FROM ledger WHERE client = 0 AND seq <= 10;",
    )
    .await
    .unwrap();
    let target = replication::current_lsn(&green).await.unwrap();
    replication::wait_applied_slot(
        &green,
        &names.reverse_slot,
        target,
        Instant::now() + Duration::from_secs(20),
    )
    .await
    .unwrap();
    for table in ["accounts", "ledger"] {
        let q = format!(
            "SELECT count(*) || ':' || md5(string_agg(t::text, '|' ORDER BY t.id)) FROM {table} t"
        );
        assert_eq!(one(&bg.blue, &q), one(&bg.green, &q), "{table} differs");
    }
    let lag = reverse::reverse_lag(&green, &names).await.unwrap();
    assert!(lag.bytes.is_some(), "{lag:?}");
    // Blue is still frozen for the application while it follows green.
    freeze::assert_frozen(&blue, id).await.unwrap();

    // Rollback: more writes on green, then green is frozen, blue catches up and gets the
    // sequences (blue's are behind: green handed out the ids).
    app.batch_execute(
        "INSERT INTO ledger (client, seq, amount) SELECT 2, g, 3 FROM generate_series(1, 20) g",
    )
    .await
    .unwrap();
    let seq = "SELECT last_value || ':' || is_called FROM ledger_id_seq";
    assert_ne!(one(&bg.blue, seq), one(&bg.green, seq));
    freeze::freeze(&green, &cfg).await.unwrap();
    assert!(
        app.simple_query("SELECT 1").await.is_err(),
        "green session ended"
    );
    let back = reverse::final_sync_back(
        &green,
        &blue,
        &names,
        Instant::now() + Duration::from_secs(20),
    )
    .await
    .unwrap();
    eprintln!("rollback sync: {back:?}");
    assert_eq!(back.sequences, 1);
    for table in ["accounts", "ledger"] {
        let q = format!(
            "SELECT count(*) || ':' || md5(string_agg(t::text, '|' ORDER BY t.id)) FROM {table} t"
        );
        assert_eq!(
            one(&bg.blue, &q),
            one(&bg.green, &q),
            "{table} differs after rollback"
        );
    }
    assert_eq!(one(&bg.blue, seq), one(&bg.green, seq));
    // Blue is unfrozen for the application (the operator's abort does it); green keeps its
    // freeze until cleanup, here undone to check nothing is left.
    freeze::unfreeze(&green, id).await.unwrap();

    cleanup::abort(&blue, Some(&green), &names, id)
        .await
        .unwrap();
    assert_clean_and_writable(&bg).await;
}
