//! Large objects, which logical replication does not carry, against real PostgreSQL: never
//! dropped unseen — preflight fails unless the plan says `Carry` or `Ignore` — and with `Carry`
//! copied inside the freeze, with their oids and owners, and compared by verification.

mod common;

use common::*;
use cutover_operator::api::{
    CheckOutcome, DatabaseCutoverSpec, DatabaseCutoverStatus, LargeObjects, Milestone, Phase,
};
use cutover_operator::postgres::large_objects;
use cutover_tests::BlueGreen;
use cutover_tests::workload;

/// The bank schema plus `documents`, whose rows refer to large objects by oid; three of them
/// on blue (one of 300 kB, spanning many `pg_largeobject` pages), owned by the application.
fn with_documents() -> BlueGreen {
    let bg = blue_green();
    with_schema(
        &bg,
        &format!(
            "{} CREATE TABLE documents (id int PRIMARY KEY, body oid NOT NULL);",
            workload::SCHEMA
        ),
        &workload::grants(APP_ROLE),
    );
    bg.blue.execute(APP, &workload::seed(20, 1000)).unwrap();
    bg.blue
        .execute(
            APP,
            "INSERT INTO documents VALUES
               (1, lo_from_bytea(0, 'first')),
               (2, lo_from_bytea(0, convert_to(repeat('x', 300000), 'UTF8'))),
               (3, lo_from_bytea(0, '\\x00ff00'::bytea))",
        )
        .unwrap();
    // `ALTER LARGE OBJECT` takes a literal oid.
    for id in 1..=3 {
        let oid = one(
            &bg.blue,
            &format!("SELECT body FROM documents WHERE id = {id}"),
        )
        .unwrap();
        bg.blue
            .execute(
                APP,
                &format!("ALTER LARGE OBJECT {oid} OWNER TO {APP_ROLE}"),
            )
            .unwrap();
    }
    bg
}

async fn run(bg: &BlueGreen, spec: DatabaseCutoverSpec) -> DatabaseCutoverStatus {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("DATABASE_URL"), app_dsn(&bg.blue)).unwrap();
    let engine = local_engine("shop/lobs", bg, spec, dir.path());
    step_until(&engine, DatabaseCutoverStatus::default(), |s| {
        s.phase.is_terminal()
    })
    .await
}

fn contents(c: &cutover_tests::PgCluster) -> Vec<Vec<Option<String>>> {
    c.query(
        APP,
        "SELECT m.oid::text, md5(lo_get(m.oid)), pg_get_userbyid(m.lomowner)::text
           FROM pg_largeobject_metadata m ORDER BY m.oid",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_fail_preflight_unless_the_plan_says_what_to_do() {
    let bg = with_documents();
    let status = run(&bg, production_spec()).await;
    assert_eq!(status.phase, Phase::Aborted);
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("large-objects")
            && message.contains("3 large objects on blue")
            && message.contains("replication.largeObjects"),
        "{message}"
    );
    assert_clean_and_writable(&bg).await;

    // `Ignore`: said out loud, and green gets none.
    let bg = with_documents();
    let mut spec = production_spec();
    spec.replication.large_objects = Some(LargeObjects::Ignore);
    let status = run(&bg, spec).await;
    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    let check = status
        .preflight
        .iter()
        .find(|c| c.name == "large-objects")
        .unwrap();
    assert_eq!(check.outcome, CheckOutcome::Warn, "{check:?}");
    assert!(check.message.contains("left behind"), "{check:?}");
    assert!(contents(&bg.green).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carried_large_objects_are_copied_in_the_freeze_and_verified() {
    let bg = with_documents();
    let mut spec = production_spec();
    spec.replication.large_objects = Some(LargeObjects::Carry);
    let status = run(&bg, spec).await;
    assert_eq!(status.phase, Phase::Completed, "{:?}", status.message);
    assert!(status.milestones.contains(&Milestone::LargeObjectsCopied));
    // The same oids, contents and owners; the rows that refer to them are on green.
    let on_blue = contents(&bg.blue);
    assert_eq!(on_blue.len(), 3);
    assert_eq!(contents(&bg.green), on_blue);
    assert_eq!(count(&bg.green, "SELECT count(*) FROM documents"), 3);
    assert_eq!(
        one(&bg.green, "SELECT lo_get(body) FROM documents WHERE id = 1").as_deref(),
        Some("\\x6669727374")
    );

    // The comparison the verification runs names a changed, a missing and an extra object.
    let (blue, green) = engine_clients(&bg).await;
    assert_eq!(
        large_objects::compare(&blue, &green).await.unwrap(),
        Vec::<String>::new()
    );
    let first = one(&bg.green, "SELECT body FROM documents WHERE id = 1").unwrap();
    let third = one(&bg.green, "SELECT body FROM documents WHERE id = 3").unwrap();
    bg.green
        .execute(
            APP,
            &format!(
                "SELECT lo_put({first}, 0, 'F'); SELECT lo_unlink({third});
                 SELECT lo_from_bytea(0, 'extra');"
            ),
        )
        .unwrap();
    let differences = large_objects::compare(&blue, &green).await.unwrap();
    assert_eq!(differences.len(), 3, "{differences:?}");
    assert!(differences.contains(&format!("large object {first} differs")));
    assert!(differences.contains(&format!("large object {third} is missing on the target")));
    assert!(
        differences
            .iter()
            .any(|d| d.ends_with("exists only on the target"))
    );
}
