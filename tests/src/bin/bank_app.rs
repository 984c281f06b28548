//! The bank workload as an application, for the e2e bed's real node: the container of the test
//! Deployment (`cutover.local/bank-app:e2e`, built by `make node-test`). It reads its connection
//! string from `DATABASE_URL` once, at start — the application Secret, as a pod gets it — and
//! writes until it is stopped: money moved between accounts with a `(client, seq)` ledger row
//! in each transaction ([`cutover_tests::workload`]).
//!
//! Every acknowledged write (its `COMMIT` returned) is appended at once to
//! `$BANK_ACKS_DIR/$HOSTNAME` as a line `client seq`, on a volume that outlives the pod, so a
//! test can check each one is on the side the application ended on. Client ids come from the
//! pod's name, so the pods before and after a restart write the ledger side by side.
//!
//! Environment: `DATABASE_URL` (required), `BANK_ACKS_DIR` (required), `BANK_CLIENTS` (2),
//! `BANK_TPS` (50), `BANK_ACCOUNTS` (50). Exits on SIGTERM / SIGINT.

use std::hash::{DefaultHasher, Hash, Hasher};

use cutover_tests::workload::{Load, LoadConfig};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        eprintln!("bank-app: {name} is not set");
        std::process::exit(2)
    })
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("bank-app: {name}={v} is not a number");
                std::process::exit(2)
            })
        })
        .unwrap_or(default)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dsn = var("DATABASE_URL");
    let dir = std::path::PathBuf::from(var("BANK_ACKS_DIR"));
    let pod = std::env::var("HOSTNAME").unwrap_or_else(|_| "bank-app".into());
    let cfg = LoadConfig {
        dsn,
        clients: number("BANK_CLIENTS", 2),
        tps: number("BANK_TPS", 50.0),
        accounts: number("BANK_ACCOUNTS", 50),
    };
    // Ids 1 000 000 and up, 64 per pod: clear of the ids of the tests' own loads.
    let mut hasher = DefaultHasher::new();
    pod.hash(&mut hasher);
    let first_client = 1_000_000 + i32::try_from(hasher.finish() % 10_000_000).unwrap_or(0) * 64;
    let acks = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(&pod))
        .unwrap_or_else(|e| {
            eprintln!("bank-app: cannot open {}: {e}", dir.join(&pod).display());
            std::process::exit(1)
        });
    eprintln!(
        "bank-app {pod}: {} clients from id {first_client}, {} tps, server {}",
        cfg.clients,
        cfg.tps,
        server_of(&cfg.dsn)
    );
    let load = Load::start_recording(cfg, first_client, acks);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let report = load.stop().await;
    eprintln!(
        "bank-app {pod}: stopped after {} acknowledged writes; errors {:?}",
        report.acknowledged.len(),
        report.errors
    );
}

/// `host:port/db` of a connection URL, without its credentials.
fn server_of(dsn: &str) -> &str {
    dsn.rsplit_once('@').map_or("?", |(_, server)| server)
}
