//! The final sync, after the freeze: read blue's WAL position, wait until green has applied
//! past it, and copy every sequence's state (logical replication does not carry sequences).
//!
//! Sequence copy works in either direction (green → blue on rollback). It copies every
//! sequence outside the system schemas — owned by a `serial` column, an identity column's, or
//! free-standing — with its `is_called` flag, so the next `nextval` on the target returns what it
//! would have returned on the source. Values are bound: `setval($1::regclass, $2, $3)`.

use std::time::{Duration, Instant};

use thiserror::Error;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use super::ident::quote_qualified;
use super::replication::{Names, ReplicationError, sync_point, wait_applied_by};
use super::shared::{EXCLUDED_SCHEMAS, db_message, writable_session};

/// Why the final sync failed.
#[derive(Debug, Error)]
pub enum SyncError {
    /// A statement failed.
    #[error("failed to {action}: {}", db_message(source))]
    Sql {
        /// What was being done.
        action: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Waiting for the target failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// Sequences of the source are missing on the target.
    #[error("failed to copy sequences: missing on the target: {0}")]
    MissingSequences(String),
}

fn sql(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SyncError {
    let action = action.into();
    move |source| SyncError::Sql { action, source }
}

/// The state of one sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceState {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// `last_value`.
    pub last_value: i64,
    /// `is_called`: whether `last_value` was handed out already.
    pub is_called: bool,
}

/// Reads every sequence outside the system schemas, in one round trip per 200 sequences.
pub async fn read_sequences(client: &Client) -> Result<Vec<SequenceState>, SyncError> {
    let names = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'S' AND n.nspname <> ALL($1::text[])
                AND n.nspname NOT LIKE 'pg\\_%'
              ORDER BY 1, 2",
            &[&EXCLUDED_SCHEMAS],
        )
        .await
        .map_err(sql("list the sequences"))?;
    let names: Vec<(String, String)> = names.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut out = Vec::with_capacity(names.len());
    for chunk in names.chunks(200) {
        // Reading a sequence relation is the only way to get is_called; the names are quoted
        // identifiers, not values.
        let query = chunk
            .iter()
            .enumerate()
            .map(|(i, (s, n))| {
                format!(
                    "SELECT {i} AS i, last_value, is_called FROM {}",
                    quote_qualified(s, n)
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let rows = client
            .query(&query, &[])
            .await
            .map_err(sql("read the sequences' values"))?;
        for row in rows {
            let i: i32 = row.get(0);
            let (schema, name) = chunk[usize::try_from(i).unwrap_or_default()].clone();
            out.push(SequenceState {
                schema,
                name,
                last_value: row.get(1),
                is_called: row.get(2),
            });
        }
    }
    Ok(out)
}

/// Sets every sequence of `from` on `to` to the same state, in one statement. Every sequence of
/// `from` must exist on `to`. Returns the states copied.
pub async fn copy_sequences(from: &Client, to: &Client) -> Result<Vec<SequenceState>, SyncError> {
    let states = read_sequences(from).await?;
    if states.is_empty() {
        return Ok(states);
    }
    writable_session(to)
        .await
        .map_err(sql("make the session writable"))?;
    let names: Vec<String> = states
        .iter()
        .map(|s| quote_qualified(&s.schema, &s.name))
        .collect();
    let missing = to
        .query(
            "SELECT n FROM unnest($1::text[]) n WHERE to_regclass(n) IS NULL",
            &[&names],
        )
        .await
        .map_err(sql("look up the sequences on the target"))?;
    if !missing.is_empty() {
        return Err(SyncError::MissingSequences(
            missing
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    let values: Vec<i64> = states.iter().map(|s| s.last_value).collect();
    let called: Vec<bool> = states.iter().map(|s| s.is_called).collect();
    to.execute(
        "SELECT setval(n::regclass, v, c) FROM unnest($1::text[], $2::int8[], $3::bool[]) AS t(n, v, c)",
        &[&names, &values, &called],
    )
    .await
    .map_err(sql("set the sequences on the target"))?;
    Ok(states)
}

/// What the final sync did.
#[derive(Clone, Debug, PartialEq)]
pub struct FinalSync {
    /// Blue's WAL position read after the freeze.
    pub freeze_lsn: PgLsn,
    /// The position green confirmed (≥ `freeze_lsn`).
    pub applied_lsn: PgLsn,
    /// Sequences copied.
    pub sequences: usize,
    /// Time spent waiting for green to apply.
    pub wait: Duration,
    /// Time spent copying sequences.
    pub sequence_copy: Duration,
}

/// Runs the final sync after blue is frozen: blue's position now ([`sync_point`]), wait until
/// green has applied past it (until `deadline`, [`wait_applied_by`]), then copy every sequence
/// blue → green. Repeatable: a second run
/// reads a later position that green reaches at once and sets the same sequence values.
pub async fn final_sync(
    blue: &Client,
    green: &Client,
    names: &Names,
    deadline: Instant,
) -> Result<FinalSync, SyncError> {
    let freeze_lsn = sync_point(blue).await?;
    let started = Instant::now();
    let applied_lsn = wait_applied_by(blue, green, names, freeze_lsn, deadline).await?;
    let wait = started.elapsed();
    let started = Instant::now();
    let seqs = copy_sequences(blue, green).await?;
    Ok(FinalSync {
        freeze_lsn,
        applied_lsn,
        sequences: seqs.len(),
        wait,
        sequence_copy: started.elapsed(),
    })
}
