//! Hypercare checkpoints: the replicated tables' row counts on the target, compared with the
//! source while reverse replication keeps the source current.
//!
//! The application keeps writing to the target, so two counts taken at different moments may
//! differ for no other reason. Each comparison therefore brackets the source's count between
//! two counts of the target: count the target, mark a position on it ([`sync_point`]), wait
//! until the source has applied everything up to that mark, count the source, count the target
//! again. When both target counts agree, the table's count did not move while the source caught
//! up, and the source must show the same number. A table compares equal as soon as one attempt
//! agrees; it is reported as differing only when at least two attempts in which the target was
//! still agree that the source differs; otherwise (the count kept moving) it is reported as
//! unsettled, which is not a problem by itself.
//!
//! Without reverse replication the source stopped at the freeze and no longer says anything
//! about the target: the checkpoint then counts the target only, which proves every replicated
//! table is still there and readable.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::replication::{ReplicationError, TableRef, sync_point, wait_applied_named};

/// How many bracketed attempts one table gets.
const ATTEMPTS: usize = 4;
/// How many stable attempts with a differing source make a mismatch.
const STABLE_DIFFERENCES: usize = 2;

/// The source side of a comparison: the source itself and how reverse replication reaches it.
pub struct ReverseLink<'a> {
    /// The source (reverse replication's subscriber).
    pub source: &'a Client,
    /// The reverse subscription's name (on the source).
    pub subscription: &'a str,
    /// Its slot's name (on the target).
    pub slot: &'a str,
    /// How long the source may take to apply up to a mark.
    pub catch_up: Duration,
}

/// How one table compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CountState {
    /// Same count on both sides.
    Matched,
    /// The target held still and the source showed a different count, more than once.
    Differs,
    /// The target's count kept moving: no comparison was possible this time.
    Unsettled,
    /// Counted on the target only (no reverse replication).
    TargetOnly,
}

/// One table's counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableCount {
    /// The table.
    pub table: TableRef,
    /// Rows on the target (the latest count).
    pub target_rows: i64,
    /// Rows on the source at the latest comparison, when compared.
    pub source_rows: Option<i64>,
    /// The verdict.
    pub state: CountState,
}

/// Counts `tables` on `target` and, with `reverse`, compares them with the source.
pub async fn count_rows(
    target: &Client,
    reverse: Option<&ReverseLink<'_>>,
    tables: &[TableRef],
) -> Result<Vec<TableCount>, ReplicationError> {
    let mut out = Vec::with_capacity(tables.len());
    for table in tables {
        let Some(link) = reverse else {
            out.push(TableCount {
                table: table.clone(),
                target_rows: count(target, table).await?,
                source_rows: None,
                state: CountState::TargetOnly,
            });
            continue;
        };
        out.push(compare_table(target, link, table).await?);
    }
    Ok(out)
}

async fn compare_table(
    target: &Client,
    link: &ReverseLink<'_>,
    table: &TableRef,
) -> Result<TableCount, ReplicationError> {
    let mut stable_differences = 0;
    let mut last = (0, 0);
    for _ in 0..ATTEMPTS {
        let before = count(target, table).await?;
        let mark = sync_point(target).await?;
        wait_applied_named(
            target,
            link.source,
            link.subscription,
            link.slot,
            mark,
            Instant::now() + link.catch_up,
        )
        .await?;
        let source = count(link.source, table).await?;
        let after = count(target, table).await?;
        last = (after, source);
        if before == after {
            if source == after {
                return Ok(TableCount {
                    table: table.clone(),
                    target_rows: after,
                    source_rows: Some(source),
                    state: CountState::Matched,
                });
            }
            stable_differences += 1;
            if stable_differences >= STABLE_DIFFERENCES {
                break;
            }
        }
    }
    Ok(TableCount {
        table: table.clone(),
        target_rows: last.0,
        source_rows: Some(last.1),
        state: if stable_differences >= STABLE_DIFFERENCES {
            CountState::Differs
        } else {
            CountState::Unsettled
        },
    })
}

async fn count(client: &Client, table: &TableRef) -> Result<i64, ReplicationError> {
    client
        .query_one(&format!("SELECT count(*) FROM {}", table.quoted()), &[])
        .await
        .map(|row| row.get(0))
        .map_err(|source| ReplicationError::Sql {
            action: format!("count the rows of {table}"),
            source,
        })
}
