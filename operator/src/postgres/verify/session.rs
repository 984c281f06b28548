//! The canonical session both sides hash under, and one consistent snapshot per side.
//!
//! Row text depends on session settings (time zone, date and interval style, float digits, bytea
//! format, monetary locale). Fixing them on both sides makes equal data render — and hash — the
//! same whatever the servers' defaults. Every connection of a side then joins one exported
//! snapshot, so parallel chunks see the database at one instant even if it is still written.

use tokio_postgres::Client;

use super::{Side, VerifyError};
use crate::postgres::connect::{ConnectOptions, Dsn, connect};

/// The settings every verifying session runs under. `search_path` is only `pg_catalog`, so
/// `format_type` qualifies every user type and no user function can shadow a built-in one.
pub const CANONICAL_SETTINGS: &[(&str, &str)] = &[
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
    ("lc_numeric", "C"),
    ("xmloption", "content"),
    // Send functions carrying text (`character`, enum labels) convert it to this encoding.
    ("client_encoding", "UTF8"),
    ("search_path", "pg_catalog"),
    ("statement_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
];

/// Puts an open session into the canonical settings (outside any transaction), so rows hash
/// as [`open`]'s sessions hash them.
pub(crate) async fn canonicalize(client: &Client, side: Side) -> Result<(), VerifyError> {
    let mut sql = String::new();
    for (name, value) in CANONICAL_SETTINGS {
        // Names and values are the constants above, not input.
        sql.push_str(&format!("SET {name} = '{value}';\n"));
    }
    client
        .batch_execute(&sql)
        .await
        .map_err(|source| VerifyError::Session { side, source })
}

/// Opens one connection of `side`, canonicalises its session and starts a read-only
/// repeatable-read transaction. With `snapshot`, joins that exported snapshot; the returned
/// string is the snapshot this connection exported (first connection only) when `export` is set.
pub(crate) async fn open(
    side: Side,
    dsn: &Dsn,
    options: &ConnectOptions,
    snapshot: Option<&str>,
    export: bool,
) -> Result<(Client, Option<String>), VerifyError> {
    let client = connect(dsn, options)
        .await
        .map_err(|source| VerifyError::Connect { side, source })?;
    let session = |source| VerifyError::Session { side, source };
    canonicalize(&client, side).await?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(session)?;
    if let Some(id) = snapshot {
        // SET TRANSACTION SNAPSHOT takes no parameters; the id came from pg_export_snapshot()
        // and is checked to be hex digits and dashes before it is spliced in.
        if id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            client
                .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{id}'"))
                .await
                .map_err(session)?;
        }
        return Ok((client, None));
    }
    if !export {
        return Ok((client, None));
    }
    match client.query_one("SELECT pg_export_snapshot()", &[]).await {
        Ok(row) => Ok((client, Some(row.get(0)))),
        Err(_) => {
            // A standby cannot export snapshots: fall back to one snapshot per connection.
            client
                .batch_execute("ROLLBACK; BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .await
                .map_err(session)?;
            Ok((client, None))
        }
    }
}
