//! Hypercare checkpoints: the replicated tables' row counts on the target and spot checks of a
//! few small key ranges per table, compared with the source while reverse replication keeps the
//! source current.
//!
//! The application keeps writing to the target, so two looks taken at different moments may
//! differ for no other reason. Each comparison therefore brackets the source's look between two
//! looks at the target: look at the target, mark a position on it ([`sync_point`]), wait until
//! the source has applied everything up to that mark, look at the source, look at the target
//! again. When both looks at the target agree, what was looked at did not change while the
//! source caught up, and the source must show the same. A comparison matches as soon as one
//! attempt agrees; it is reported as differing only when at least two attempts in which the
//! target held still agree that the source differs; otherwise (the target kept changing) it is
//! reported as unsettled, which is not a problem by itself.
//!
//! A look is a table's `count(*)`, or a spot: about a hundred rows from a random key on, their
//! count and the sum of their row hashes exactly as verification computes them (so a changed
//! value, not only a missing row, is seen).
//!
//! Without reverse replication the source stopped at the freeze and no longer says anything
//! about the target: the checkpoint then counts the target only, which proves every replicated
//! table is still there and readable.

use std::error::Error as _;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio_postgres::Client;

use super::replication::{ReplicationError, sync_point, wait_applied_named};
use super::verify::spot::{Spot, SpotTables};
use super::verify::{Side, TableName, VerifyError};

/// How many bracketed attempts one comparison gets.
const ATTEMPTS: usize = 4;
/// How many stable attempts with a differing source make a mismatch.
const STABLE_DIFFERENCES: usize = 2;
/// Spots per table, and rows per spot.
const SPOTS_PER_TABLE: i64 = 3;
const SPOT_ROWS: i64 = 100;

/// Why a checkpoint could not run.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// Counting, marking or waiting failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// Reading the catalogs or hashing a spot failed.
    #[error("{}", with_cause(.0))]
    Verify(#[from] VerifyError),
}

/// A verification error with the database's own message after it.
fn with_cause(e: &VerifyError) -> String {
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

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

/// How one comparison came out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CountState {
    /// The same on both sides.
    Matched,
    /// The target held still and the source showed something else, more than once.
    Differs,
    /// The target kept changing: no comparison was possible this time.
    Unsettled,
    /// Looked at on the target only (no reverse replication).
    TargetOnly,
}

/// One table's counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableCount {
    /// The table.
    pub table: TableName,
    /// Rows on the target (the latest count).
    pub target_rows: i64,
    /// Rows on the source at the latest comparison, when compared.
    pub source_rows: Option<i64>,
    /// The verdict.
    pub state: CountState,
}

/// One spot check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpotResult {
    /// `schema.table from key=value`.
    pub spot: String,
    /// Rows in the spot on the target.
    pub rows: i64,
    /// The verdict.
    pub state: CountState,
}

/// What a checkpoint found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointReport {
    /// One entry per table.
    pub counts: Vec<TableCount>,
    /// One entry per spot (only while compared with the source).
    pub spots: Vec<SpotResult>,
}

/// Counts `tables` on `target` and, with `reverse`, compares the counts and a few spots of each
/// table with the source.
pub async fn run(
    target: &Client,
    reverse: Option<&ReverseLink<'_>>,
    tables: &[TableName],
) -> Result<CheckpointReport, CheckpointError> {
    let mut report = CheckpointReport::default();
    let Some(link) = reverse else {
        for table in tables {
            report.counts.push(TableCount {
                table: table.clone(),
                target_rows: count(target, table).await?,
                source_rows: None,
                state: CountState::TargetOnly,
            });
        }
        return Ok(report);
    };
    for table in tables {
        let verdict = bracketed(target, link, &Look::Count(table)).await?;
        let (on_target, on_source, state) = verdict.parts();
        report.counts.push(TableCount {
            table: table.clone(),
            target_rows: on_target.rows,
            source_rows: Some(on_source.rows),
            state,
        });
    }
    let names: Vec<TableName> = tables
        .iter()
        .map(|t| TableName::new(&t.schema, &t.name))
        .collect();
    let spot_tables = SpotTables::read(link.source, target, &names).await?;
    let spots = spot_tables
        .pick(target, Side::Target, SPOTS_PER_TABLE, SPOT_ROWS)
        .await?;
    for spot in &spots {
        let verdict = bracketed(target, link, &Look::Spot(&spot_tables, spot)).await?;
        let (on_target, _, state) = verdict.parts();
        report.spots.push(SpotResult {
            spot: spot.description.clone(),
            rows: on_target.rows,
            state,
        });
    }
    Ok(report)
}

/// What is looked at on both sides.
enum Look<'a> {
    /// A table's row count.
    Count(&'a TableName),
    /// A spot's row count and hash sum.
    Spot(&'a SpotTables, &'a Spot),
}

/// One look: rows, and for a spot the sum of their hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    rows: i64,
    sum: Option<String>,
}

impl Look<'_> {
    async fn at(&self, client: &Client, side: Side) -> Result<Seen, CheckpointError> {
        Ok(match self {
            Look::Count(table) => Seen {
                rows: count(client, table).await?,
                sum: None,
            },
            Look::Spot(tables, spot) => {
                let h = tables.hash(client, side, spot).await?;
                Seen {
                    rows: h.rows,
                    sum: Some(h.sum),
                }
            }
        })
    }
}

/// A comparison's outcome with the latest looks (target, source).
enum Verdict<T> {
    Matched(T, T),
    Differs(T, T),
    Unsettled(T, T),
}

impl<T> Verdict<T> {
    fn parts(self) -> (T, T, CountState) {
        match self {
            Verdict::Matched(t, s) => (t, s, CountState::Matched),
            Verdict::Differs(t, s) => (t, s, CountState::Differs),
            Verdict::Unsettled(t, s) => (t, s, CountState::Unsettled),
        }
    }
}

/// Looks at the target, marks it, waits for the source to apply past the mark, looks at the
/// source, looks at the target again — up to [`ATTEMPTS`] times (see the module docs).
async fn bracketed(
    target: &Client,
    link: &ReverseLink<'_>,
    look: &Look<'_>,
) -> Result<Verdict<Seen>, CheckpointError> {
    let mut stable_differences = 0;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let before = look.at(target, Side::Target).await?;
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
        let source = look.at(link.source, Side::Source).await?;
        let after = look.at(target, Side::Target).await?;
        let held_still = before == after;
        if held_still && source == after {
            return Ok(Verdict::Matched(after, source));
        }
        if held_still {
            stable_differences += 1;
            if stable_differences >= STABLE_DIFFERENCES {
                return Ok(Verdict::Differs(after, source));
            }
        }
        last = Some((after, source));
    }
    let (after, source) = last.expect("at least one attempt ran");
    Ok(Verdict::Unsettled(after, source))
}

async fn count(client: &Client, table: &TableName) -> Result<i64, ReplicationError> {
    client
        .query_one(&format!("SELECT count(*) FROM {}", table.quoted()), &[])
        .await
        .map(|row| row.get(0))
        .map_err(|source| ReplicationError::Sql {
            action: format!("count the rows of {table}"),
            source,
        })
}
