//! Names and helpers every SQL module shares. Nothing here depends on another module of
//! `postgres`, so any of them may use it without a cycle.

use std::fmt::Write as _;
use std::time::Duration;

use tokio_postgres::Client;

/// The schema the operator keeps its own state in on a frozen database (see
/// [`super::freeze`]).
pub const STATE_SCHEMA: &str = "cutover";
/// Schemas never replicated nor compared: PostgreSQL's own and the operator's bookkeeping
/// schema.
pub const EXCLUDED_SCHEMAS: &[&str] = &["pg_catalog", "information_schema", STATE_SCHEMA];
/// Tables never replicated nor compared in "all tables" mode: the migration history each side
/// keeps itself.
pub const EXCLUDED_TABLES: &[&str] = &["cutover_schema_history"];

/// How often catalog conditions are polled while waiting.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// The server's message (and detail) of a driver error, or the driver's own text.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                let _ = write!(s, " ({detail})");
            }
            s
        }
        None => e.to_string(),
    }
}

/// Flushes the server's WAL up to now and returns the flushed position: a tiny transactional
/// logical message (no table is written) whose commit is flushed with everything before it.
///
/// Logical decoding over SQL reads up to the flushed position, and a record that straddles it
/// is waited for until it is flushed. WAL that no commit flushes — what reads write when they
/// prune pages, a non-transactional message — can stay unflushed on an idle (frozen) server
/// until the background writer's next snapshot record, up to about 15 s: a decoding call
/// then waits that long. Calling this first keeps it to milliseconds. Makes the session
/// writable (see [`writable_session`]).
pub async fn flush_wal(
    client: &Client,
) -> Result<tokio_postgres::types::PgLsn, tokio_postgres::Error> {
    writable_session(client).await?;
    let flushed = client
        .batch_execute("BEGIN; SELECT pg_logical_emit_message(true, 'cutover', 'flush'); COMMIT")
        .await;
    if let Err(e) = flushed {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    Ok(client
        .query_one("SELECT pg_current_wal_flush_lsn()", &[])
        .await?
        .get(0))
}

/// Makes this session writable even when the database or role is frozen
/// (`default_transaction_read_only = on` applies to new sessions of every role, the operator's
/// own included), so the operator can always undo what it did.
pub async fn writable_session(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("SET SESSION default_transaction_read_only = off")
        .await
}
