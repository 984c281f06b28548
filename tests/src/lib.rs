//! Test support: throw-away PostgreSQL clusters ([`pg`]), for this package's integration tests
//! and for other crates' tests.

pub mod pg;

pub use pg::{BlueGreen, PgCluster, PgClusterBuilder};
pub mod workload;

use std::time::{Duration, Instant};

use cutover_operator::engine::Databases;
use cutover_operator::postgres::{ConnectOptions, Dsn};

/// A benchmark's cluster builder for `side` (`"blue"` or `"green"`): the machine's default
/// PostgreSQL, or the major version in `CUTOVER_BENCH_BLUE_MAJOR` / `CUTOVER_BENCH_GREEN_MAJOR`
/// (`CUTOVER_BENCH_GREEN_MAJOR=18` measures a 15 → 18 upgrade). Panics on a value that is not a
/// number, naming the variable.
pub fn bench_builder(side: &str) -> PgClusterBuilder {
    let var = format!("CUTOVER_BENCH_{}_MAJOR", side.to_ascii_uppercase());
    match std::env::var(&var) {
        Ok(v) => PgCluster::builder().major(
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{var}={v}: not a major version number")),
        ),
        Err(_) => PgCluster::builder(),
    }
}

/// `blue PostgreSQL 15, green PostgreSQL 18`, for a benchmark's header.
pub fn versions_of(bg: &BlueGreen) -> String {
    format!(
        "blue PostgreSQL {}, green PostgreSQL {}",
        bg.blue.major(),
        bg.green.major()
    )
}

/// The engine's connections for a blue/green pair on this host: each side reaches the other at
/// the address the operator uses.
pub fn databases(bg: &BlueGreen) -> Databases {
    Databases {
        blue: Dsn::new(bg.blue_dsn()),
        green: Dsn::new(bg.green_dsn()),
        blue_from_green: Dsn::new(bg.blue_dsn()),
        green_from_blue: Dsn::new(bg.green_dsn()),
        connect: ConnectOptions::default(),
    }
}

/// Polls `cond` every 5 ms until it holds, or fails naming `what` after `timeout`.
pub async fn wait_until<F: FnMut() -> bool>(
    what: &str,
    timeout: Duration,
    mut cond: F,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            anyhow::bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
