//! Test support: throw-away PostgreSQL clusters ([`pg`]), for this package's integration tests
//! and for other crates' tests.

pub mod pg;

pub use pg::{BlueGreen, PgCluster, PgClusterBuilder};
pub mod workload;
