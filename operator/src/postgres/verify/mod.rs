//! Verification checksums (DESIGN §5): are the target's tables, sequences and table definitions
//! the same as the source's?
//!
//! Hashing happens inside PostgreSQL. Each table with a primary key is split into key ranges
//! (boundaries sampled once, on the source); every range is hashed on both sides at the same time,
//! `parallelism` connections per side, as `count(*)` and the exact sum of a 64-bit hash of each
//! row's text (the columns listed explicitly, rendered under a canonical session). Only the ranges
//! whose hashes differ are split further, down to ranges small enough to list every key with its
//! row hash, which names the rows missing on the target, extra on the target, or changed. A table
//! without a primary key gets one hash over all its rows and cannot name rows. See
//! docs/verification.md for the reasoning and the limits.

pub mod online;
mod report;
mod session;
pub mod spot;
mod sql;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::try_join_all;
use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use self::sql::{Range, TableSql};
use crate::postgres::catalog::{self, Catalog, Table};
use crate::postgres::connect::{ConnectError, ConnectOptions, Dsn};

pub use self::report::{
    Difference, Key, Method, SchemaMismatch, SequenceReport, SequenceValue, TableReport,
    VerifyReport,
};
pub use self::session::CANONICAL_SETTINGS;
pub use crate::postgres::ident::TableName;
pub use crate::postgres::shared::{EXCLUDED_SCHEMAS, EXCLUDED_TABLES};

/// Which database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The database being left (blue).
    Source,
    /// The database being moved to (green).
    Target,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Source => "source",
            Self::Target => "target",
        })
    }
}

/// A catalog that could not be read, on `side`.
pub(crate) fn catalog_error(side: Side) -> impl FnOnce(catalog::CatalogError) -> VerifyError {
    move |e| VerifyError::Catalog { side, source: e.0 }
}

/// Why a verification could not run (a mismatch is not an error: it is in the report).
#[derive(Debug, Error)]
pub enum VerifyError {
    /// A side is unreachable or refused the login.
    #[error("failed to connect to the {side} database")]
    Connect {
        /// Which side.
        side: Side,
        /// Why (names the server by its redacted form only).
        #[source]
        source: ConnectError,
    },
    /// The canonical session could not be set up.
    #[error("failed to set up the verifying session on the {side} database")]
    Session {
        /// Which side.
        side: Side,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The catalog could not be read.
    #[error("failed to read the tables and sequences of the {side} database")]
    Catalog {
        /// Which side.
        side: Side,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A table named in the options does not exist on the source.
    #[error("failed to find table {0} on the source database")]
    UnknownTable(TableName),
    /// Hashing or listing rows failed.
    #[error("failed to hash {table} on the {side} database")]
    Hash {
        /// Which side.
        side: Side,
        /// The table.
        table: TableName,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Reading a sequence failed.
    #[error("failed to read sequence {sequence} on the {side} database")]
    Sequence {
        /// Which side.
        side: Side,
        /// The sequence.
        sequence: TableName,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl VerifyError {
    /// A short label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "Unreachable",
            Self::UnknownTable(_) => "UnknownTable",
            Self::Session { .. } | Self::Catalog { .. } => "Catalog",
            Self::Hash { .. } | Self::Sequence { .. } => "Query",
        }
    }
}

/// Progress of one table, reported after each hashed range.
#[derive(Clone, Debug)]
pub struct Progress {
    /// The table.
    pub table: TableName,
    /// Ranges of this table hashed so far.
    pub chunks_done: usize,
    /// Ranges of this table in all.
    pub chunks_total: usize,
}

/// Receives [`Progress`]; called from the verifying tasks, so keep it quick.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// What to compare and how.
#[derive(Clone)]
pub struct VerifyOptions {
    /// Compare only these schemas (empty: every schema but PostgreSQL's own and
    /// [`EXCLUDED_SCHEMAS`]). Ignored when `tables` is not empty.
    pub schemas: Vec<String>,
    /// Compare only these tables (and the sequences they own).
    pub tables: Vec<TableName>,
    /// Connections per side.
    pub parallelism: usize,
    /// Rows per key range, roughly.
    pub chunk_rows: u64,
    /// Differences listed per table at most.
    pub max_differences: usize,
    /// Differing ranges with at most this many rows (on the larger side) are listed row by row;
    /// larger ones are split first.
    pub leaf_rows: u64,
    /// How to connect (TLS CA, application name, timeout).
    pub connect: ConnectOptions,
    /// Called as ranges are hashed.
    pub progress: Option<ProgressFn>,
    /// Hash the rows of only these tables (`None`: of every compared table); the definitions
    /// and sequences of every compared table are compared still. Online verification hashes
    /// the other tables' rows itself.
    pub hash_only: Option<Vec<TableName>>,
    /// The target may have more than the source: tables, columns and sequences only the target
    /// has are not mismatches (the cutover's migrations added them to green; rows are hashed
    /// over the source's columns anyway). Everything the source has must still be there, equal.
    pub target_may_add: bool,
}

impl fmt::Debug for VerifyOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyOptions")
            .field("schemas", &self.schemas)
            .field("tables", &self.tables)
            .field("parallelism", &self.parallelism)
            .field("chunk_rows", &self.chunk_rows)
            .field("max_differences", &self.max_differences)
            .field("leaf_rows", &self.leaf_rows)
            .field("connect", &self.connect)
            .field("target_may_add", &self.target_may_add)
            .finish_non_exhaustive()
    }
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            schemas: Vec::new(),
            tables: Vec::new(),
            parallelism: 4,
            chunk_rows: 50_000,
            max_differences: 20,
            leaf_rows: 5_000,
            connect: ConnectOptions {
                application_name: "cutover-verify".into(),
                ..ConnectOptions::default()
            },
            progress: None,
            hash_only: None,
            target_may_add: false,
        }
    }
}

/// A differing range is split into about this many sub-ranges.
const FANOUT: i64 = 16;
/// Above this many estimated rows, range boundaries come from a block sample, not a full walk
/// of the key.
const SAMPLE_ABOVE_ROWS: f64 = 500_000.0;
/// Sampled keys per range boundary.
const SAMPLE_PER_CHUNK: f64 = 32.0;

/// Compares source and target. Mismatches are in the report (`matched == false`); errors mean
/// the comparison could not be made.
pub async fn verify(
    source: &Dsn,
    target: &Dsn,
    options: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let parallelism = options.parallelism.max(1);
    let pairs = open_pairs(source, target, options, parallelism).await?;
    let consistent_snapshot = pairs.consistent;
    let pairs = pairs.pairs;

    let (source_catalog, target_catalog) = tokio::try_join!(
        async {
            catalog::read(&pairs[0].source)
                .await
                .map_err(catalog_error(Side::Source))
        },
        async {
            catalog::read(&pairs[0].target)
                .await
                .map_err(catalog_error(Side::Target))
        }
    )?;
    let selection = select(&source_catalog, &target_catalog, options)?;

    let plans: Vec<Plan> = match &options.hash_only {
        Some(only) => selection
            .plans
            .into_iter()
            .filter(|p| only.contains(&p.name))
            .collect(),
        None => selection.plans,
    };
    let verifier = Verifier {
        plans: &plans,
        options,
    };
    let sequences = compare_sequences(&pairs[0], &selection.sequences).await?;

    // Range boundaries, on the source.
    let bounds = run_jobs(
        &pairs,
        verifier
            .plans
            .iter()
            .enumerate()
            .filter(|(_, p)| p.key.is_some())
            .map(|(i, _)| Job::Bounds(i))
            .collect(),
        &verifier,
    )
    .await?;
    let mut ranges: Vec<Vec<Range>> = verifier
        .plans
        .iter()
        .map(|_| vec![Range::default()])
        .collect();
    for out in bounds {
        if let Output::Bounds(i, points) = out {
            ranges[i] = ranges_between(None, &points, None);
        }
    }
    let totals: Vec<usize> = ranges.iter().map(Vec::len).collect();
    let done: Vec<AtomicUsize> = ranges.iter().map(|_| AtomicUsize::new(0)).collect();

    // Every range, hashed on both sides at once.
    let jobs: Vec<Job> = interleave(&ranges)
        .into_iter()
        .map(|(t, r)| Job::Hash(t, ranges[t][r].clone()))
        .collect();
    let progress = |t: usize| {
        let n = done[t].fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(report) = &options.progress {
            report(&Progress {
                table: verifier.plans[t].name.clone(),
                chunks_done: n,
                chunks_total: totals[t],
            });
        }
    };
    let hashed = run_jobs_with(&pairs, jobs, &verifier, &progress).await?;

    // Tally, and narrow the differing ranges down.
    let mut reports: Vec<TableReport> = verifier
        .plans
        .iter()
        .zip(&totals)
        .map(|(p, &chunks)| TableReport {
            table: p.name.clone(),
            method: if p.key.is_some() {
                Method::Chunked
            } else {
                Method::FullHash
            },
            source_rows: 0,
            target_rows: 0,
            chunks,
            chunks_differing: 0,
            matched: true,
            differences: Vec::new(),
            differences_truncated: false,
        })
        .collect();
    // Only the first `max_differences` differing ranges of a table are narrowed down (each
    // yields at least one difference); the others are listed as ranges. Which ranges those are
    // depends only on key order, never on timing.
    let mut drills = Vec::new();
    let mut found: Vec<Vec<Found>> = reports.iter().map(|_| Vec::new()).collect();
    for out in hashed {
        let Output::Hashed(t, range, s, g) = out else {
            continue;
        };
        let report = &mut reports[t];
        report.source_rows += s.rows;
        report.target_rows += g.rows;
        if s == g {
            continue;
        }
        report.matched = false;
        report.chunks_differing += 1;
        match &verifier.plans[t].key {
            None => found[t].push(Found::Ready(Difference::Content {
                source_rows: s.rows,
                target_rows: g.rows,
            })),
            Some(_) if found[t].len() < options.max_differences => {
                found[t].push(Found::Drill(drills.len()));
                drills.push(Job::Drill(t, range, s, g));
            }
            Some(_) => found[t].push(Found::Ready(verifier.as_range(t, &range, &s, &g))),
        }
    }
    let mut drilled: Vec<Option<Vec<Difference>>> = run_jobs(&pairs, drills, &verifier)
        .await?
        .into_iter()
        .map(|out| match out {
            Output::Drilled(differences) => Some(differences),
            _ => None,
        })
        .collect();
    for (report, found) in reports.iter_mut().zip(found) {
        let all = found.into_iter().flat_map(|f| match f {
            Found::Ready(d) => vec![d],
            Found::Drill(i) => drilled[i].take().unwrap_or_default(),
        });
        for d in all {
            if report.differences.len() < options.max_differences {
                report.differences.push(d);
            } else {
                report.differences_truncated = true;
            }
        }
    }

    let matched = reports.iter().all(|t| t.matched)
        && sequences.iter().all(|s| s.matched)
        && selection.schema_mismatches.is_empty();
    Ok(VerifyReport {
        matched,
        source_rows: reports.iter().map(|t| t.source_rows).sum(),
        target_rows: reports.iter().map(|t| t.target_rows).sum(),
        tables: reports,
        sequences,
        schema_mismatches: selection.schema_mismatches,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        consistent_snapshot,
    })
}

/// One connection to each side, used together.
struct Pair {
    source: Client,
    target: Client,
}

struct Pairs {
    pairs: Vec<Pair>,
    consistent: bool,
}

async fn open_pairs(
    source: &Dsn,
    target: &Dsn,
    options: &VerifyOptions,
    parallelism: usize,
) -> Result<Pairs, VerifyError> {
    let opts = &options.connect;
    let ((first_source, source_snapshot), (first_target, target_snapshot)) = tokio::try_join!(
        session::open(Side::Source, source, opts, None, true),
        session::open(Side::Target, target, opts, None, true)
    )?;
    let consistent = source_snapshot.is_some() && target_snapshot.is_some();
    let rest = try_join_all((1..parallelism).map(|_| async {
        let ((s, _), (t, _)) = tokio::try_join!(
            session::open(
                Side::Source,
                source,
                opts,
                source_snapshot.as_deref(),
                false
            ),
            session::open(
                Side::Target,
                target,
                opts,
                target_snapshot.as_deref(),
                false
            )
        )?;
        Ok::<_, VerifyError>(Pair {
            source: s,
            target: t,
        })
    }))
    .await?;
    let mut pairs = vec![Pair {
        source: first_source,
        target: first_target,
    }];
    pairs.extend(rest);
    Ok(Pairs { pairs, consistent })
}

/// A compared table: its name, the statements, and its key columns' names (none: no key).
pub(crate) struct Plan {
    name: TableName,
    sql: TableSql,
    key: Option<Vec<String>>,
    estimated_rows: f64,
}

struct Selection {
    plans: Vec<Plan>,
    sequences: Vec<(TableName, bool, bool)>,
    schema_mismatches: Vec<SchemaMismatch>,
}

/// Picks the tables and sequences to compare, compares their definitions, and plans the hashing
/// of each table over the columns both sides have.
fn select(
    source: &Catalog,
    target: &Catalog,
    options: &VerifyOptions,
) -> Result<Selection, VerifyError> {
    let mut mismatches = Vec::new();
    let explicit = !options.tables.is_empty();
    let wanted = |name: &TableName| {
        if explicit {
            options.tables.contains(name)
        } else {
            (options.schemas.is_empty() || options.schemas.contains(&name.schema))
                && !EXCLUDED_TABLES.contains(&name.name.as_str())
        }
    };
    for name in &options.tables {
        if !source.tables.contains_key(name) {
            return Err(VerifyError::UnknownTable(name.clone()));
        }
    }
    let mut plans = Vec::new();
    for (name, table) in source.tables.iter().filter(|(n, _)| wanted(n)) {
        let Some(other) = target.tables.get(name) else {
            mismatches.push(SchemaMismatch {
                object: name.clone(),
                detail: "table missing on target".into(),
            });
            continue;
        };
        mismatches.extend(
            catalog::compare_table(table, other, options.target_may_add)
                .into_iter()
                .map(|detail| SchemaMismatch {
                    object: name.clone(),
                    detail,
                }),
        );
        plans.push(plan(name, table, other, source.encoding != target.encoding));
    }
    if !explicit && !options.target_may_add {
        for name in target.tables.keys().filter(|n| wanted(n)) {
            if !source.tables.contains_key(name) {
                mismatches.push(SchemaMismatch {
                    object: name.clone(),
                    detail: "table extra on target".into(),
                });
            }
        }
    }
    let seq_wanted = |name: &TableName, owner: &Option<TableName>| {
        if explicit {
            owner.as_ref().is_some_and(|o| options.tables.contains(o))
        } else {
            options.schemas.is_empty() || options.schemas.contains(&name.schema)
        }
    };
    let mut sequences: Vec<(TableName, bool, bool)> = Vec::new();
    for (name, owner) in &source.sequences {
        if seq_wanted(name, owner) {
            sequences.push((name.clone(), true, target.sequences.contains_key(name)));
        }
    }
    for (name, owner) in &target.sequences {
        if seq_wanted(name, owner)
            && !source.sequences.contains_key(name)
            && !options.target_may_add
        {
            sequences.push((name.clone(), false, true));
        }
    }
    Ok(Selection {
        plans,
        sequences,
        schema_mismatches: mismatches,
    })
}

/// Hash the source's columns that the target has too (a missing column is already a schema
/// mismatch); chunk by the source's primary key when the target has all its columns. With
/// `transcode` (the two databases' encodings differ), text is hashed as its UTF-8 bytes.
pub(crate) fn plan(name: &TableName, source: &Table, target: &Table, transcode: bool) -> Plan {
    let on_target = |c: &str| target.columns.iter().any(|t| t.name == c);
    // A column's type only picks how it is hashed when both sides agree on the type;
    // otherwise it is compared as text (and the type difference is a schema mismatch).
    let columns: Vec<(&str, &str)> = source
        .columns
        .iter()
        .filter_map(|c| {
            let other = target.columns.iter().find(|t| t.name == c.name)?;
            let ty = if other.type_base != c.type_base {
                ""
            } else if c.is_enum && other.is_enum {
                sql::ENUM
            } else {
                c.type_base.as_str()
            };
            Some((c.name.as_str(), ty))
        })
        .collect();
    let key = source.key();
    let usable = !key.is_empty() && key.iter().all(|c| on_target(&c.name));
    // Bounds are cast to the key's type with its modifier: `character` alone means
    // `character(1)`, and a cast to it would cut every bound to one character.
    let key_spec: Vec<(&str, &str)> = if usable {
        key.iter()
            .map(|c| (c.name.as_str(), c.type_full.as_str()))
            .collect()
    } else {
        Vec::new()
    };
    Plan {
        name: name.clone(),
        sql: TableSql::new(name, &columns, &key_spec, transcode),
        key: usable.then(|| key.iter().map(|c| c.name.clone()).collect()),
        estimated_rows: source.estimated_rows,
    }
}

async fn compare_sequences(
    pair: &Pair,
    sequences: &[(TableName, bool, bool)],
) -> Result<Vec<SequenceReport>, VerifyError> {
    async fn read(
        client: &Client,
        side: Side,
        name: &TableName,
        exists: bool,
    ) -> Result<Option<SequenceValue>, VerifyError> {
        if !exists {
            return Ok(None);
        }
        let sql = format!(
            "SELECT last_value, is_called FROM {}",
            crate::postgres::ident::quote_qualified(&name.schema, &name.name)
        );
        let row = client
            .query_one(&sql, &[])
            .await
            .map_err(|source| VerifyError::Sequence {
                side,
                sequence: name.clone(),
                source,
            })?;
        Ok(Some(SequenceValue {
            last_value: row.get(0),
            is_called: row.get(1),
        }))
    }
    let mut out = Vec::new();
    for (name, on_source, on_target) in sequences {
        let (s, t) = tokio::try_join!(
            read(&pair.source, Side::Source, name, *on_source),
            read(&pair.target, Side::Target, name, *on_target)
        )?;
        out.push(SequenceReport {
            sequence: name.clone(),
            matched: s.is_some() && s == t,
            source: s,
            target: t,
        });
    }
    Ok(out)
}

/// A range's `count(*)` and hash sum on one side.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChunkHash {
    rows: i64,
    sum: String,
}

enum Job {
    /// Range boundaries of a table.
    Bounds(usize),
    /// Hash a range on both sides.
    Hash(usize, Range),
    /// Narrow a differing range down.
    Drill(usize, Range, ChunkHash, ChunkHash),
}

enum Output {
    Bounds(usize, Vec<Vec<String>>),
    Hashed(usize, Range, ChunkHash, ChunkHash),
    Drilled(Vec<Difference>),
}

struct Verifier<'a> {
    plans: &'a [Plan],
    options: &'a VerifyOptions,
}

/// A differing range of a table: already described, or being narrowed down by a drill job.
enum Found {
    Ready(Difference),
    Drill(usize),
}

/// Runs jobs on the pairs: each pair takes the next job from a shared queue until none is
/// left. Results come back in job order.
async fn run_jobs(
    pairs: &[Pair],
    jobs: Vec<Job>,
    verifier: &Verifier<'_>,
) -> Result<Vec<Output>, VerifyError> {
    run_jobs_with(pairs, jobs, verifier, &|_| {}).await
}

async fn run_jobs_with(
    pairs: &[Pair],
    jobs: Vec<Job>,
    verifier: &Verifier<'_>,
    hashed: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Output>, VerifyError> {
    let queue = Mutex::new(jobs.into_iter().enumerate().collect::<VecDeque<_>>());
    let results = Mutex::new(Vec::new());
    try_join_all(pairs.iter().map(|pair| async {
        loop {
            let next = queue.lock().expect("job queue poisoned").pop_front();
            let Some((i, job)) = next else { break };
            let out = verifier.run(pair, job).await?;
            if let Output::Hashed(t, ..) = &out {
                hashed(*t);
            }
            results.lock().expect("results poisoned").push((i, out));
        }
        Ok::<_, VerifyError>(())
    }))
    .await?;
    let mut results = results.into_inner().expect("results poisoned");
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, out)| out).collect())
}

impl Verifier<'_> {
    async fn run(&self, pair: &Pair, job: Job) -> Result<Output, VerifyError> {
        match job {
            Job::Bounds(t) => Ok(Output::Bounds(t, self.bounds(&pair.source, t).await?)),
            Job::Hash(t, range) => {
                let (s, g) = tokio::try_join!(
                    self.hash(&pair.source, Side::Source, t, &range),
                    self.hash(&pair.target, Side::Target, t, &range)
                )?;
                Ok(Output::Hashed(t, range, s, g))
            }
            Job::Drill(t, range, s, g) => {
                Ok(Output::Drilled(self.drill(pair, t, range, s, g).await?))
            }
        }
    }

    fn hash_err(&self, side: Side, t: usize) -> impl Fn(tokio_postgres::Error) -> VerifyError {
        let table = self.plans[t].name.clone();
        move |source| VerifyError::Hash {
            side,
            table: table.clone(),
            source,
        }
    }

    /// Boundaries splitting table `t` into ranges of about `chunk_rows` rows: every n-th key of
    /// the whole key (small tables) or of a block sample (big ones).
    async fn bounds(&self, client: &Client, t: usize) -> Result<Vec<Vec<String>>, VerifyError> {
        let plan = &self.plans[t];
        let chunk_rows = self.options.chunk_rows.max(1) as f64;
        let err = self.hash_err(Side::Source, t);
        let rows = if plan.estimated_rows >= SAMPLE_ABOVE_ROWS {
            let chunks = (plan.estimated_rows / chunk_rows).ceil();
            let percent = (100.0 * chunks * SAMPLE_PER_CHUNK / plan.estimated_rows).min(100.0);
            let step = SAMPLE_PER_CHUNK as i64;
            client
                .query(&plan.sql.sampled_split_points(), &[&percent, &step])
                .await
                .map_err(err)?
        } else {
            let (sql, params) = plan.sql.split_points(&Range::default());
            let step = self.options.chunk_rows.max(1) as i64;
            query_with(client, &sql, &params, Some(step))
                .await
                .map_err(err)?
        };
        let mut points: Vec<Vec<String>> = rows.iter().map(key_texts).collect();
        points.dedup();
        Ok(points)
    }

    async fn hash(
        &self,
        client: &Client,
        side: Side,
        t: usize,
        range: &Range,
    ) -> Result<ChunkHash, VerifyError> {
        let (sql, params) = self.plans[t].sql.chunk_hash(range);
        let rows = query_with(client, &sql, &params, None)
            .await
            .map_err(self.hash_err(side, t))?;
        let row = &rows[0];
        Ok(ChunkHash {
            rows: row.get(0),
            sum: row.get(1),
        })
    }

    /// Narrows a differing range down: split it into sub-ranges, re-hash those on both sides,
    /// and keep going into the differing ones until a range is small enough to list its keys.
    async fn drill(
        &self,
        pair: &Pair,
        t: usize,
        range: Range,
        s: ChunkHash,
        g: ChunkHash,
    ) -> Result<Vec<Difference>, VerifyError> {
        let plan = &self.plans[t];
        let mut out = Vec::new();
        let mut stack = vec![(range, s, g)];
        while let Some((range, s, g)) = stack.pop() {
            if out.len() >= self.options.max_differences {
                // Enough listed: the rest only needs to be marked, not narrowed.
                out.push(self.as_range(t, &range, &s, &g));
                continue;
            }
            let larger = s.rows.max(g.rows);
            let leaf_rows = i64::try_from(self.options.leaf_rows.max(1)).unwrap_or(i64::MAX);
            let splits = if larger > leaf_rows {
                // Split where the side with more rows has its every n-th key.
                let client = if s.rows >= g.rows {
                    &pair.source
                } else {
                    &pair.target
                };
                let side = if s.rows >= g.rows {
                    Side::Source
                } else {
                    Side::Target
                };
                let (sql, params) = plan.sql.split_points(&range);
                let step = (larger + FANOUT - 1) / FANOUT;
                let rows = query_with(client, &sql, &params, Some(step))
                    .await
                    .map_err(self.hash_err(side, t))?;
                // Every point lies inside the range, so each sub-range holds at most `step`
                // of that side's rows: the larger side shrinks with every split.
                rows.iter().map(key_texts).collect()
            } else {
                Vec::new()
            };
            if splits.is_empty() {
                let found = self.leaf(pair, t, &range).await?;
                if found.is_empty() {
                    // The hashes differ but no key does: cannot happen unless the two sides
                    // order keys differently (collations); report the range rather than nothing.
                    out.push(self.as_range(t, &range, &s, &g));
                }
                out.extend(found);
                continue;
            }
            let subs = ranges_between(range.lower.clone(), &splits, range.upper.clone());
            let hashed = try_join_all(subs.into_iter().map(|sub| async {
                let (s, g) = tokio::try_join!(
                    self.hash(&pair.source, Side::Source, t, &sub),
                    self.hash(&pair.target, Side::Target, t, &sub)
                )?;
                Ok::<_, VerifyError>((sub, s, g))
            }))
            .await?;
            // Depth first, in key order: push the last differing sub-range first.
            for (sub, s, g) in hashed.into_iter().rev() {
                if s != g {
                    stack.push((sub, s, g));
                }
            }
        }
        Ok(out)
    }

    fn key(&self, t: usize, values: &[String]) -> Key {
        Key {
            columns: self.plans[t].key.clone().unwrap_or_default(),
            values: values.to_vec(),
        }
    }

    fn as_range(&self, t: usize, range: &Range, s: &ChunkHash, g: &ChunkHash) -> Difference {
        Difference::Range {
            from: range.lower.as_ref().map(|v| self.key(t, v)),
            to: range.upper.as_ref().map(|v| self.key(t, v)),
            source_rows: s.rows,
            target_rows: g.rows,
        }
    }

    /// Lists every key and row hash of a small range on both sides and names the differences.
    async fn leaf(
        &self,
        pair: &Pair,
        t: usize,
        range: &Range,
    ) -> Result<Vec<Difference>, VerifyError> {
        let plan = &self.plans[t];
        let key = |values: &Vec<String>| self.key(t, values);
        let (sql, params) = plan.sql.rows(range);
        let (s, g) = tokio::try_join!(
            async {
                query_with(&pair.source, &sql, &params, None)
                    .await
                    .map_err(self.hash_err(Side::Source, t))
            },
            async {
                query_with(&pair.target, &sql, &params, None)
                    .await
                    .map_err(self.hash_err(Side::Target, t))
            }
        )?;
        let width = plan.key.as_ref().map_or(0, Vec::len);
        let split = |row: &tokio_postgres::Row| -> (Vec<String>, i64) {
            let keys = (0..width)
                .map(|i| row.get::<_, Option<String>>(i).unwrap_or_default())
                .collect();
            (keys, row.get(width))
        };
        let target: HashMap<Vec<String>, i64> = g.iter().map(split).collect();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for row in &s {
            let (k, h) = split(row);
            match target.get(&k) {
                None => out.push(Difference::MissingOnTarget { key: key(&k) }),
                Some(other) if *other != h => out.push(Difference::Changed { key: key(&k) }),
                Some(_) => {}
            }
            seen.insert(k);
        }
        for row in &g {
            let (k, _) = split(row);
            if !seen.contains(&k) {
                out.push(Difference::ExtraOnTarget { key: key(&k) });
            }
        }
        Ok(out)
    }
}

/// Runs a statement whose parameters are key values as text, plus optionally a trailing
/// `int8`.
async fn query_with(
    client: &Client,
    sql: &str,
    params: &[String],
    extra: Option<i64>,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let mut refs: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    if let Some(extra) = &extra {
        refs.push(extra);
    }
    client.query(sql, &refs).await
}

fn key_texts(row: &tokio_postgres::Row) -> Vec<String> {
    (0..row.len())
        .map(|i| row.get::<_, Option<String>>(i).unwrap_or_default())
        .collect()
}

/// The ranges `[lower, p1) [p1, p2) … [pn, upper)`.
fn ranges_between(
    lower: Option<Vec<String>>,
    points: &[Vec<String>],
    upper: Option<Vec<String>>,
) -> Vec<Range> {
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut from = lower;
    for p in points {
        if from.as_ref() == Some(p) {
            continue;
        }
        out.push(Range {
            lower: from.take(),
            upper: Some(p.clone()),
        });
        from = Some(p.clone());
    }
    out.push(Range { lower: from, upper });
    out
}

/// Job order `(table, range)` that alternates between tables, so a big table's ranges do not
/// leave the other connections idle at the end.
fn interleave(ranges: &[Vec<Range>]) -> Vec<(usize, usize)> {
    let longest = ranges.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::new();
    for r in 0..longest {
        for (t, list) in ranges.iter().enumerate() {
            if r < list.len() {
                out.push((t, r));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_everything_once() {
        let p = |v: &str| vec![v.to_owned()];
        let ranges = ranges_between(None, &[p("3"), p("7")], None);
        assert_eq!(
            ranges,
            vec![
                Range {
                    lower: None,
                    upper: Some(p("3"))
                },
                Range {
                    lower: Some(p("3")),
                    upper: Some(p("7"))
                },
                Range {
                    lower: Some(p("7")),
                    upper: None
                },
            ]
        );
        // A split point equal to the lower bound adds no empty range.
        let ranges = ranges_between(Some(p("3")), &[p("3"), p("5")], Some(p("9")));
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges_between(None, &[], None), vec![Range::default()]);
    }

    #[test]
    fn interleaves_tables() {
        let r = |n: usize| vec![Range::default(); n];
        assert_eq!(
            interleave(&[r(3), r(1), r(2)]),
            vec![(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]
        );
    }
}
