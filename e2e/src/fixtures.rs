//! What the e2e tests and the demo set up alike: the repository's paths, a namespace on the
//! shared control plane with the CRD installed, and a blue/green pair carrying the bank schema.

use std::path::PathBuf;

use cutover_tests::workload;
use cutover_tests::{BlueGreen, PgCluster, PgClusterBuilder};

use crate::ControlPlane;

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
    (blue, green): (Option<u32>, Option<u32>),
) -> BlueGreen {
    let of = |major: Option<u32>| {
        let builder = quick_feedback(PgCluster::builder());
        match major {
            Some(m) => builder.major(m),
            None => builder,
        }
    };
    let bg = BlueGreen::start_with(of(blue), of(green)).expect("start PostgreSQL");
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
