//! An abort after any step leaves no slot, publication or subscription on either server, and
//! blue writable — also when the publisher is unreachable at the time of the abort.

mod common;

use std::time::{Duration, Instant};

use common::*;
use cutover_operator::api::FreezeMethod;
use cutover_operator::postgres::freeze::{self, FreezeConfig};
use cutover_operator::postgres::replication::{self, TableSelection};
use cutover_operator::postgres::{Dsn, cleanup, reverse, sync};
use cutover_tests::workload;

/// The steps of the cutover on the databases, in order.
const STEPS: [&str; 6] = [
    "publication",
    "subscription",
    "initial copy done",
    "freeze",
    "final sync",
    "reverse replication",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_each_step_leaves_nothing_and_blue_writable() {
    let bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(500, 10)).unwrap();
    let (blue, green) = engine_clients(&bg).await;
    for (k, step) in STEPS.iter().enumerate() {
        let id = format!("abort-after-{k}");
        let names = names(&id);
        // Each round copies afresh.
        bg.green.execute(APP, "TRUNCATE accounts, ledger").unwrap();
        let tables = replication::ensure_publication(&blue, &names, &TableSelection::All)
            .await
            .unwrap();
        if k >= 1 {
            replication::ensure_subscription(&blue, &green, &names, &blue_dsn(&bg))
                .await
                .unwrap();
        }
        if k >= 2 {
            replication::wait_ready(&green, &names, Instant::now() + Duration::from_secs(30))
                .await
                .unwrap();
        }
        if k >= 3 {
            let cfg = FreezeConfig {
                tables: Vec::new(),
                cutover_id: id.clone(),
                method: if k % 2 == 0 {
                    FreezeMethod::RevokeLogin
                } else {
                    FreezeMethod::ReadOnly
                },
                roles: vec![APP_ROLE.into()],
                drain_timeout: Duration::from_secs(1),
            };
            freeze::freeze(&blue, &cfg).await.unwrap();
        }
        if k >= 4 {
            sync::final_sync(
                &blue,
                &green,
                &names,
                Instant::now() + Duration::from_secs(20),
            )
            .await
            .unwrap();
        }
        if k >= 5 {
            reverse::start_reverse(&blue, &green, &names, &tables, &Dsn::new(bg.green_dsn()))
                .await
                .unwrap();
        }
        assert!(
            !leftovers(&bg.blue).is_empty(),
            "step {step} left something to clean up"
        );
        let report = cleanup::abort(&blue, Some(&green), &names, &id)
            .await
            .unwrap();
        assert!(report.skipped.is_empty(), "{report:?}");
        eprintln!("abort after {step}: dropped {:?}", report.dropped);
        assert_clean_and_writable(&bg).await;
        // Aborting again finds nothing to do.
        let again = cleanup::abort(&blue, Some(&green), &names, &id)
            .await
            .unwrap();
        assert!(again.dropped.is_empty(), "{again:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_while_blue_is_down_detaches_the_slot_and_finishes_when_blue_is_back() {
    let mut bg = blue_green();
    with_schema(&bg, workload::SCHEMA, &workload::grants(APP_ROLE));
    bg.blue.execute(APP, &workload::seed(50, 10)).unwrap();
    let id = "abort-blue-down";
    let names = names(id);
    {
        let (blue, green) = engine_clients(&bg).await;
        replication::ensure_publication(&blue, &names, &TableSelection::All)
            .await
            .unwrap();
        replication::ensure_subscription(&blue, &green, &names, &blue_dsn(&bg))
            .await
            .unwrap();
        replication::wait_ready(&green, &names, Instant::now() + Duration::from_secs(30))
            .await
            .unwrap();
    }
    bg.blue.stop().unwrap();
    let (_, green) = {
        let green = bg.green.connect(APP).await.unwrap();
        ((), green)
    };
    let report = cleanup::cleanup(None, Some(&green), &names).await.unwrap();
    assert!(
        report
            .dropped
            .contains(&format!("subscription {} on green", names.subscription)),
        "{report:?}"
    );
    assert!(
        report.skipped.iter().any(|s| s.contains(&names.slot)),
        "{report:?}"
    );
    assert_eq!(leftovers(&bg.green), Vec::<String>::new());

    bg.blue.restart().unwrap();
    let (blue, green) = engine_clients(&bg).await;
    let report = cleanup::cleanup(Some(&blue), Some(&green), &names)
        .await
        .unwrap();
    assert!(
        report
            .dropped
            .contains(&format!("slot {} on blue", names.slot)),
        "{report:?}"
    );
    assert_clean_and_writable(&bg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_the_initial_copy_drops_the_copy_workers_slots() {
    let bg = blue_green();
    with_schema(
        &bg,
        "CREATE TABLE wide (id int PRIMARY KEY, pad text NOT NULL);",
        "",
    );
    bg.blue
        .execute(
            APP,
            "INSERT INTO wide SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 400000) g",
        )
        .unwrap();
    let (blue, green) = engine_clients(&bg).await;
    let id = "abort-mid-copy";
    let names = names(id);
    replication::ensure_publication(&blue, &names, &TableSelection::All)
        .await
        .unwrap();
    replication::ensure_subscription(&blue, &green, &names, &blue_dsn(&bg))
        .await
        .unwrap();
    wait_for(
        "a copy worker's slot exists",
        Duration::from_secs(20),
        || async { leftovers(&bg.blue).iter().any(|l| l.contains("_sync_")) },
    )
    .await;
    // While the copy runs, progress reports the bytes copied so far.
    let mut progress = replication::progress(&green, &names).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress.bytes_copied.unwrap_or(0) == 0 {
        assert!(
            !progress.is_ready(),
            "the copy finished unobserved: {progress:?}"
        );
        assert!(Instant::now() < deadline, "no copy progress: {progress:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        progress = replication::progress(&green, &names).await.unwrap();
    }
    assert_eq!(
        (progress.tables_ready, progress.tables_total),
        (0, 1),
        "{progress:?}"
    );
    let report = cleanup::abort(&blue, Some(&green), &names, id)
        .await
        .unwrap();
    eprintln!("{report:?}");
    assert!(
        report.dropped.iter().any(|d| d.contains("_sync_")),
        "{report:?}"
    );
    assert_clean_and_writable(&bg).await;
}
