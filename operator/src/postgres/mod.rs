//! Everything that talks SQL: connections (TLS honoured), identifier quoting, and the steps of
//! the cutover on each database.

pub mod ident;
