//! What the e2e tests and the demo set up alike: the repository's paths, a namespace on the
//! shared control plane with the CRD installed, and a blue/green pair carrying the bank schema.

use std::path::PathBuf;

use cutover_tests::workload;
use cutover_tests::{BlueGreen, PgCluster, PgClusterBuilder};

use crate::ControlPlane;
use crate::node::Node;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ lives in the repository")
        .to_path_buf()
}

/// The shared control plane with `crds/` installed, and a fresh namespace on it.
pub async fn namespace_with_crds(prefix: &str) -> (ControlPlane, String) {
    let plane = ControlPlane::shared().await.expect("control plane");
    plane
        .install_crds(repo().join("crds"))
        .await
        .expect("install crds/");
    let ns = plane.namespace(prefix).await.expect("namespace");
    eprintln!(
        "running against the real API server at {}",
        plane.server_url()
    );
    (plane, ns)
}

/// Green checks in with blue often, so the final sync's waits are short.
fn quick_feedback(builder: PgClusterBuilder) -> PgClusterBuilder {
    builder
        .setting("wal_receiver_status_interval", "1s")
        .setting("wal_retrieve_retry_interval", "200ms")
}

/// Blue and green with the bank schema and the application role on both, and `accounts`
/// accounts of 1000 on blue only.
pub fn bank_databases(app_role: &str, app_password: &str, accounts: i64) -> BlueGreen {
    bank_databases_of(app_role, app_password, accounts, (None, None))
}

/// [`bank_databases`] with the given major versions of blue and green (`None`: the machine's
/// default PostgreSQL).
pub fn bank_databases_of(
    app_role: &str,
    app_password: &str,
    accounts: i64,
    majors: (Option<u32>, Option<u32>),
) -> BlueGreen {
    bank_databases_on(app_role, app_password, accounts, majors, None)
}

/// [`bank_databases_of`], with both servers also reachable from the pods of `node` (the
/// operator's migration Jobs connect to green; an operator running as a pod to both).
pub fn bank_databases_on(
    app_role: &str,
    app_password: &str,
    accounts: i64,
    (blue, green): (Option<u32>, Option<u32>),
    node: Option<&Node>,
) -> BlueGreen {
    let of = |major: Option<u32>| {
        let builder = quick_feedback(PgCluster::builder());
        match major {
            Some(m) => builder.major(m),
            None => builder,
        }
    };
    let reachable = |builder: PgClusterBuilder| match node {
        Some(node) => node.listening_to_pods(builder),
        None => builder,
    };
    let bg =
        BlueGreen::start_with(reachable(of(blue)), reachable(of(green))).expect("start PostgreSQL");
    if let Some(node) = node {
        node.allow_pods(&bg.blue);
        node.allow_pods(&bg.green);
    }
    for c in [&bg.blue, &bg.green] {
        c.create_role(app_role, app_password, "LOGIN").unwrap();
        c.execute(BlueGreen::DATABASE, workload::SCHEMA).unwrap();
        c.execute(BlueGreen::DATABASE, &workload::grants(app_role))
            .unwrap();
    }
    bg.blue
        .execute(BlueGreen::DATABASE, &workload::seed(accounts, 1000))
        .unwrap();
    bg
}

/// The one value `sql` returns, as a number.
pub fn one(c: &PgCluster, sql: &str) -> i64 {
    c.query(BlueGreen::DATABASE, sql).unwrap()[0][0]
        .clone()
        .unwrap()
        .parse()
        .unwrap()
}

/// The publications, subscriptions and replication slots on `c` (a cutover that ended leaves
/// none).
pub fn leftovers(c: &PgCluster) -> Vec<String> {
    c.query(
        BlueGreen::DATABASE,
        "SELECT 'publication ' || pubname FROM pg_publication
         UNION ALL SELECT 'subscription ' || subname FROM pg_subscription
         UNION ALL SELECT 'slot ' || slot_name FROM pg_replication_slots",
    )
    .unwrap()
    .into_iter()
    .filter_map(|r| r[0].clone())
    .collect()
}

/// Neither server keeps a publication, subscription or slot.
pub fn assert_no_leftovers(bg: &BlueGreen) {
    assert_eq!(leftovers(&bg.blue), Vec::<String>::new(), "left on blue");
    assert_eq!(leftovers(&bg.green), Vec::<String>::new(), "left on green");
}
