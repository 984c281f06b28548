//! Everything that talks SQL: connections (TLS honoured), identifier quoting, and the steps of
//! the cutover on each database.

pub mod catalog;
pub mod connect;
pub mod ident;
pub mod migrate;
pub mod verify;

pub use connect::{ConnectError, ConnectOptions, Dsn, connect, retarget};
pub use ident::{quote_ident, quote_literal, quote_qualified};

// The replication engine (issue 3): preflight, replication, freeze, final sync, reverse
// replication and cleanup. See docs/replication.md.
pub mod checkpoint;
pub mod cleanup;
pub mod copy;
pub mod freeze;
pub mod large_objects;
pub mod preflight;
pub mod replication;
pub mod reverse;
pub mod roles;
pub mod shared;
pub mod slots;
pub mod sync;
pub mod walsender;
pub mod witness;
