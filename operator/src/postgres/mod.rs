//! Everything that talks SQL: connections (TLS honoured), identifier quoting, and the steps of
//! the cutover on each database.

pub mod connect;
pub mod ident;
pub mod migrate;

pub use connect::{ConnectError, ConnectOptions, Dsn, connect};
pub use ident::{quote_ident, quote_qualified};
