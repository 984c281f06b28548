//! The parallel initial copy (`replication.initialCopy: Parallel`): the forward slot is created
//! with an exported snapshot ([`super::walsender`]), N workers copy every replicated table
//! blue → green inside that snapshot with `COPY … TO STDOUT` streamed into `COPY … FROM STDIN`
//! (binary when both sides have the same built-in types), large tables split into key ranges;
//! green's secondary indexes and constraints, dropped before the copy, are built again
//! afterwards in parallel, exactly as they were; then the subscription streams from the slot's
//! consistent point without copying.
//!
//! Why it is exact: the exported snapshot sees precisely the transactions that committed before
//! the slot's consistent point, and the slot decodes precisely those that commit after it
//! (PostgreSQL's own table synchronisation relies on the same pairing). A subscription created
//! on the slot with `copy_data = false` starts at its `confirmed_flush_lsn`, which is that
//! point.
//!
//! Each chunk (a table, a leaf partition, or a range of its pages) is one transaction on green.
//! A worker whose connection fails before the commit copies the chunk again — nothing of the
//! failed attempt is on green — reading it in the same snapshot, which a new session imports
//! again while the exporting session lives. A connection lost *while committing* leaves it
//! unknown whether the rows are there; then, and when the exporting session is lost (the process
//! restarts), the copy cannot go on exactly: the caller drops the slot, empties the tables and
//! starts over. No chunk is counted done before its commit was acknowledged.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::SinkExt;
use thiserror::Error;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use super::connect::{ConnectError, ConnectOptions, Dsn, connect};
use super::ident::{TableName, quote_ident, quote_literal};
use super::shared::{db_message, writable_session};
use super::walsender::{WalsenderConnection, WalsenderError, create_slot_exporting};
use crate::api::DeferredIndex;

/// Bytes of rows handed to green's COPY at once.
const BATCH: usize = 64 * 1024;

/// How many times a chunk is tried before the copy gives up.
const CHUNK_ATTEMPTS: u32 = 5;

/// What the copy needs.
#[derive(Clone, Debug)]
pub struct CopyConfig {
    /// The source, as the operator reaches it (a replication session is opened to it too).
    pub blue: Dsn,
    /// The target.
    pub green: Dsn,
    /// How to connect.
    pub connect: ConnectOptions,
    /// The replicated tables (as the publication has them).
    pub tables: Vec<TableName>,
    /// The forward slot to create.
    pub slot: String,
    /// Workers copying at once (and indexes built at once).
    pub parallelism: usize,
    /// Tables (leaf partitions) larger than this on the source are split into ranges of pages
    /// of about this size (PostgreSQL 14 and newer on the source).
    pub split_bytes: i64,
    /// Green's secondary indexes and constraints, dropped before the copy, built afterwards.
    pub deferred: Vec<DeferredIndex>,
    /// How long the slot creation may wait for transactions running on the source.
    pub slot_wait: Duration,
}

/// Why the copy failed.
#[derive(Debug, Error)]
pub enum CopyError {
    /// A connection could not be made.
    #[error("failed to reach the {side} database: {source}")]
    Connect {
        /// `source` or `target`.
        side: &'static str,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// The source's session (the replication session, or a copy worker's) failed.
    #[error("the source: {0}")]
    Walsender(#[from] WalsenderError),
    /// A statement failed.
    #[error("failed to {action}: {}", db_message(source))]
    Sql {
        /// What was being done.
        action: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The copy was told to stop.
    #[error("the copy was stopped")]
    Stopped,
    /// Something the copy cannot do.
    #[error("{0}")]
    Refused(String),
    /// The connection to the target was lost while a chunk of this table committed: whether
    /// its rows are there is unknown, so the copy starts over.
    #[error(
        "the connection to the target was lost while committing rows of {0}; the copy starts over"
    )]
    CommitUnknown(String),
}

impl CopyError {
    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Stopped | Self::CommitUnknown(_) => true,
            Self::Walsender(e) => e.is_transient(),
            Self::Sql { source, .. } => {
                source.is_closed()
                    || source
                        .code()
                        .is_none_or(|c| crate::engine::sqlstate_transient(c.code()))
            }
            Self::Refused(_) => false,
        }
    }

    /// The SQLSTATE, when a server gave one.
    pub fn code(&self) -> Option<String> {
        match self {
            Self::Sql { source, .. } => source.code().map(|c| c.code().to_owned()),
            Self::Walsender(e) => e.code().map(ToOwned::to_owned),
            _ => None,
        }
    }
}

fn sql(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CopyError {
    let action = action.into();
    move |source| CopyError::Sql { action, source }
}

/// Where the copy is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CopyStage {
    /// Creating the slot (waiting for running transactions to end).
    #[default]
    CreatingSlot,
    /// Copying rows.
    Copying,
    /// Building the deferred indexes and constraints.
    Indexing,
    /// Everything copied and built.
    Done,
}

impl CopyStage {
    /// The word the status uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreatingSlot => "CreatingSlot",
            Self::Copying => "Copying",
            Self::Indexing => "Indexing",
            Self::Done => "Done",
        }
    }
}

/// One table's copy so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableCopy {
    /// `schema.table`.
    pub table: String,
    /// Its size on the source (heap and TOAST), the basis of the estimate.
    pub bytes_total: i64,
    /// Bytes streamed so far (COPY's own format: about the size of the rows).
    pub bytes: i64,
    /// Rows committed on green.
    pub rows: i64,
    /// Key ranges it was split into (1 when copied whole).
    pub chunks: u32,
    /// Ranges committed on green.
    pub chunks_done: u32,
    /// Ranges tried again after a failure.
    pub retries: u32,
}

/// The copy so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CopyProgress {
    /// Where it is.
    pub stage: CopyStage,
    /// Each table.
    pub tables: Vec<TableCopy>,
    /// The slot's consistent point, once created.
    pub consistent_point: Option<String>,
    /// Indexes and constraints built again, of how many.
    pub indexes_built: u32,
    /// Deferred indexes and constraints in all.
    pub indexes_total: u32,
    /// Seconds since the rows began to flow.
    pub copying_for: Option<f64>,
    /// Seconds each finished stage took: creating the slot, copying the rows, building the
    /// indexes.
    pub stage_seconds: Vec<(CopyStage, f64)>,
}

impl CopyProgress {
    /// Bytes streamed in all.
    pub fn bytes(&self) -> i64 {
        self.tables.iter().map(|t| t.bytes).sum()
    }

    /// The source's size of every table in all.
    pub fn bytes_total(&self) -> i64 {
        self.tables.iter().map(|t| t.bytes_total).sum()
    }

    /// Rows committed in all.
    pub fn rows(&self) -> i64 {
        self.tables.iter().map(|t| t.rows).sum()
    }

    /// Tables whose every range is on green.
    pub fn tables_done(&self) -> usize {
        self.tables
            .iter()
            .filter(|t| t.chunks > 0 && t.chunks_done == t.chunks)
            .count()
    }

    /// Seconds left, from the rate so far against the source's size (COPY's stream is about
    /// the size of the heap; the estimate is for people, never for a decision).
    pub fn eta_seconds(&self) -> Option<f64> {
        let elapsed = self.copying_for?;
        let done = self.bytes();
        if self.stage != CopyStage::Copying || done <= 0 || elapsed <= 0.0 {
            return None;
        }
        let rate = done as f64 / elapsed;
        let left = (self.bytes_total() - done).max(0) as f64;
        Some(left / rate)
    }
}

/// A live copy's progress, shared between its workers and whoever looks.
#[derive(Debug, Default)]
pub struct Tracker {
    stage: Mutex<CopyStage>,
    consistent_point: Mutex<Option<String>>,
    started: Mutex<Option<Instant>>,
    tables: Mutex<Vec<TableInfo>>,
    indexes_built: AtomicU32,
    indexes_total: AtomicU32,
    stop: AtomicBool,
    stage_seconds: Mutex<Vec<(CopyStage, f64)>>,
    stage_began: Mutex<Option<Instant>>,
}

#[derive(Debug)]
struct TableInfo {
    name: String,
    bytes_total: i64,
    chunks: u32,
    bytes: Arc<AtomicI64>,
    rows: Arc<AtomicI64>,
    chunks_done: Arc<AtomicU32>,
    retries: Arc<AtomicU32>,
}

impl Tracker {
    /// What the copy has done so far.
    pub fn progress(&self) -> CopyProgress {
        let tables = self
            .tables
            .lock()
            .expect("tables poisoned")
            .iter()
            .map(|t| TableCopy {
                table: t.name.clone(),
                bytes_total: t.bytes_total,
                bytes: t.bytes.load(Ordering::Relaxed),
                rows: t.rows.load(Ordering::Relaxed),
                chunks: t.chunks,
                chunks_done: t.chunks_done.load(Ordering::Relaxed),
                retries: t.retries.load(Ordering::Relaxed),
            })
            .collect();
        CopyProgress {
            stage: *self.stage.lock().expect("stage poisoned"),
            tables,
            consistent_point: self
                .consistent_point
                .lock()
                .expect("point poisoned")
                .clone(),
            indexes_built: self.indexes_built.load(Ordering::Relaxed),
            indexes_total: self.indexes_total.load(Ordering::Relaxed),
            copying_for: self
                .started
                .lock()
                .expect("started poisoned")
                .map(|s| s.elapsed().as_secs_f64()),
            stage_seconds: self.stage_seconds.lock().expect("stages poisoned").clone(),
        }
    }

    /// Asks the copy to stop at the next chunk boundary or message.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> Result<(), CopyError> {
        if self.stop.load(Ordering::SeqCst) {
            Err(CopyError::Stopped)
        } else {
            Ok(())
        }
    }

    fn set_stage(&self, stage: CopyStage) {
        let mut current = self.stage.lock().expect("stage poisoned");
        let now = Instant::now();
        let began = self
            .stage_began
            .lock()
            .expect("stage poisoned")
            .replace(now);
        if let Some(began) = began {
            self.stage_seconds
                .lock()
                .expect("stages poisoned")
                .push((*current, (now - began).as_secs_f64()));
        }
        *current = stage;
    }
}

/// One unit of work: a table (a leaf partition of a partitioned one), or a range of its pages.
#[derive(Clone, Debug)]
struct Chunk {
    table: usize,
    /// The relation read on the source: the table itself, or one of its leaf partitions.
    source: String,
    /// `WHERE` condition selecting a range of pages (`None`: all of it).
    range: Option<String>,
    bytes_estimate: i64,
}

/// How one table is read and written.
#[derive(Clone, Debug)]
struct TablePlan {
    name: TableName,
    /// Columns copied (generated ones are computed by green), quoted and joined.
    columns: String,
    /// Both sides have the same built-in types: binary format.
    binary: bool,
}

/// Runs the copy: slot with an exported snapshot, rows, then indexes. Returns the slot's
/// consistent point, from which the subscription streams.
pub async fn run(cfg: &CopyConfig, tracker: &Tracker) -> Result<PgLsn, CopyError> {
    tracker.set_stage(CopyStage::CreatingSlot);
    let observer = connect(&cfg.blue, &cfg.connect)
        .await
        .map_err(|source| CopyError::Connect {
            side: "source",
            source,
        })?;
    let session = WalsenderConnection::connect(&cfg.blue, &cfg.connect).await?;
    tracker.stopped()?;
    let exported = create_slot_exporting(session, &cfg.slot, cfg.slot_wait, &observer).await?;
    let point = exported.consistent_point;
    *tracker.consistent_point.lock().expect("point poisoned") = Some(point.to_string());
    tracing::info!(slot = %cfg.slot, consistent_point = %point, "created the forward slot with an exported snapshot");
    let copied = copy_rows(cfg, tracker, &exported.snapshot).await;
    // The snapshot is needed no longer (every worker has committed its reads).
    exported.session.close().await;
    copied?;
    tracker.set_stage(CopyStage::Indexing);
    rebuild(
        &cfg.green,
        &cfg.connect,
        &cfg.deferred,
        cfg.parallelism,
        tracker,
    )
    .await?;
    tracker.set_stage(CopyStage::Done);
    Ok(point)
}

async fn copy_rows(cfg: &CopyConfig, tracker: &Tracker, snapshot: &str) -> Result<(), CopyError> {
    let planner = planning_session(cfg, snapshot).await?;
    let green = green_session(cfg).await?;
    let (plans, chunks) = plan(&planner, &green, cfg).await?;
    drop(green);
    {
        let mut tables = tracker.tables.lock().expect("tables poisoned");
        *tables = plans
            .iter()
            .enumerate()
            .map(|(i, p)| TableInfo {
                name: p.name.to_string(),
                bytes_total: chunks
                    .iter()
                    .filter(|c| c.table == i)
                    .map(|c| c.bytes_estimate)
                    .sum(),
                chunks: u32::try_from(chunks.iter().filter(|c| c.table == i).count())
                    .unwrap_or(u32::MAX),
                bytes: Arc::default(),
                rows: Arc::default(),
                chunks_done: Arc::default(),
                retries: Arc::default(),
            })
            .collect();
    }
    tracker.set_stage(CopyStage::Copying);
    *tracker.started.lock().expect("started poisoned") = Some(Instant::now());
    let queue = Arc::new(Mutex::new(VecDeque::from(chunks)));
    let plans = Arc::new(plans);
    let counters: Vec<Counters> = tracker
        .tables
        .lock()
        .expect("tables poisoned")
        .iter()
        .map(|t| {
            (
                t.bytes.clone(),
                t.rows.clone(),
                t.chunks_done.clone(),
                t.retries.clone(),
            )
        })
        .collect();
    // Each table's indexes (and the indexes of its keys) are built as soon as its last chunk is
    // on green, while other tables are still copied.
    let per_table: Vec<Vec<(usize, bool)>> = plans
        .iter()
        .map(|p| {
            let [first, _, _] = waves(&cfg.deferred);
            first
                .iter()
                .filter(|b| TableName::parse(&b.of.table).is_ok_and(|t| t == p.name))
                .filter_map(|b| {
                    let i = cfg.deferred.iter().position(|d| std::ptr::eq(d, b.of))?;
                    Some((i, b.index_only))
                })
                .collect()
        })
        .collect();
    let remaining = queue.lock().expect("queue poisoned").len();
    let shared = Shared {
        queue,
        plans,
        counters: Arc::new(counters),
        per_table,
        builds: Mutex::new(VecDeque::new()),
        remaining: std::sync::atomic::AtomicUsize::new(remaining),
    };
    let workers = cfg.parallelism.max(1);
    drop(planner);
    let results =
        futures::future::join_all((0..workers).map(|_| worker(cfg, tracker, snapshot, &shared)))
            .await;
    // The first failure that is not a stop caused by another's failure.
    let mut failure = None;
    for r in results {
        if let Err(e) = r
            && (failure.is_none() || matches!(failure, Some(CopyError::Stopped)))
        {
            failure = Some(e);
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A worker's session on blue reading in the exported snapshot.
async fn snapshot_session(
    cfg: &CopyConfig,
    snapshot: &str,
) -> Result<WalsenderConnection, CopyError> {
    let mut session = WalsenderConnection::connect_plain(&cfg.blue, &cfg.connect).await?;
    session
        .simple_query(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await?;
    Ok(session)
}

/// A session on blue in the exported snapshot for reading the tables' columns and sizes.
async fn planning_session(cfg: &CopyConfig, snapshot: &str) -> Result<Client, CopyError> {
    let client = connect(&cfg.blue, &cfg.connect)
        .await
        .map_err(|source| CopyError::Connect {
            side: "source",
            source,
        })?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(sql("read in the exported snapshot"))?;
    Ok(client)
}

/// A session on green that may write even while green's database is read-only.
async fn writable_target(green: &Dsn, opts: &ConnectOptions) -> Result<Client, CopyError> {
    let client = connect(green, opts)
        .await
        .map_err(|source| CopyError::Connect {
            side: "target",
            source,
        })?;
    writable_session(&client)
        .await
        .map_err(sql("make the session writable"))?;
    Ok(client)
}

/// A session on green writing as the apply does: triggers and foreign-key checks off
/// (`session_replication_role = replica`) where the role may set it.
async fn green_session(cfg: &CopyConfig) -> Result<Client, CopyError> {
    let client = writable_target(&cfg.green, &cfg.connect).await?;
    if client
        .batch_execute("SET session_replication_role = replica")
        .await
        .is_err()
    {
        let triggers = user_triggers(&client, &cfg.tables).await?;
        if !triggers.is_empty() {
            return Err(CopyError::Refused(format!(
                "the target's tables have triggers ({}) that a copy by this role would fire: \
                 grant it SET on session_replication_role (or superuser), or use \
                 replication.initialCopy: Native",
                triggers.join(", ")
            )));
        }
    }
    Ok(client)
}

/// Enabled user triggers on `tables` of this database, as `table: trigger`.
async fn user_triggers(client: &Client, tables: &[TableName]) -> Result<Vec<String>, CopyError> {
    let mut out = Vec::new();
    for t in tables {
        let rows = client
            .query(
                "SELECT tgname::text FROM pg_trigger
                  WHERE tgrelid = to_regclass(format('%I.%I', $1::text, $2::text))
                    AND NOT tgisinternal AND tgenabled <> 'D'",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(sql("list the target's triggers"))?;
        out.extend(
            rows.iter()
                .map(|r| format!("{t}: {}", r.get::<_, String>(0))),
        );
    }
    Ok(out)
}

/// Columns, formats and page ranges of every table, read in the snapshot. Chunks come largest
/// first, so the long ones start early.
async fn plan(
    blue: &Client,
    green: &Client,
    cfg: &CopyConfig,
) -> Result<(Vec<TablePlan>, Vec<Chunk>), CopyError> {
    // TID range scans (PostgreSQL 14+) read only the pages of a range.
    let tid_ranges = blue
        .query_one(
            "SELECT current_setting('server_version_num')::int >= 140000",
            &[],
        )
        .await
        .map_err(sql("read the source's version"))?
        .get::<_, bool>(0);
    let mut plans = Vec::new();
    let mut chunks = Vec::new();
    for (i, t) in cfg.tables.iter().enumerate() {
        let columns_query = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                                    a.atttypid < 16384
                               FROM pg_attribute a
                              WHERE a.attrelid = to_regclass(format('%I.%I', $1::text, $2::text))
                                AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                              ORDER BY a.attnum";
        let blue_cols = blue
            .query(columns_query, &[&t.schema, &t.name])
            .await
            .map_err(sql(format!("read the columns of {t}")))?;
        let green_cols = green
            .query(columns_query, &[&t.schema, &t.name])
            .await
            .map_err(sql(format!("read the columns of {t} on the target")))?;
        let green_types: std::collections::HashMap<String, String> = green_cols
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        let mut binary = true;
        let mut names = Vec::new();
        for r in &blue_cols {
            let name: String = r.get(0);
            let ty: String = r.get(1);
            let builtin: bool = r.get(2);
            if green_types.get(&name) != Some(&ty) || !builtin {
                binary = false;
            }
            names.push(quote_ident(&name));
        }
        plans.push(TablePlan {
            name: t.clone(),
            columns: names.join(", "),
            binary,
        });
        // The table itself, or each leaf of a partitioned one, with its size and pages.
        let leaves = blue
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname), pg_table_size(c.oid),
                        pg_relation_size(c.oid) / current_setting('block_size')::int8
                   FROM pg_partition_tree(to_regclass(format('%I.%I', $1::text, $2::text))) p
                   JOIN pg_class c ON c.oid = p.relid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE p.isleaf AND c.relkind = 'r'
                 UNION ALL
                 SELECT format('%I.%I', n.nspname, c.relname), pg_table_size(c.oid),
                        pg_relation_size(c.oid) / current_setting('block_size')::int8
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = to_regclass(format('%I.%I', $1::text, $2::text))
                    AND c.relkind = 'r' AND NOT c.relispartition",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(sql(format!("read the size of {t}")))?;
        let mut seen = std::collections::HashSet::new();
        for leaf in &leaves {
            let source: String = leaf.get(0);
            if !seen.insert(source.clone()) {
                continue;
            }
            let size: i64 = leaf.get(1);
            let pages: i64 = leaf.get(2);
            let ranges = if tid_ranges {
                page_ranges(size, pages, cfg.split_bytes)
            } else {
                vec![None]
            };
            let each = size / i64::try_from(ranges.len().max(1)).unwrap_or(1);
            chunks.extend(ranges.into_iter().map(|range| Chunk {
                table: i,
                source: source.clone(),
                range,
                bytes_estimate: each,
            }));
        }
    }
    chunks.sort_by_key(|c| std::cmp::Reverse(c.bytes_estimate));
    Ok((plans, chunks))
}

/// Ranges of pages of a relation of `size` bytes in `pages` pages, each about `split` bytes:
/// `ctid` conditions a TID range scan reads without touching the other pages. The last range is
/// open, so no row is left out whatever the page count was when it was read.
fn page_ranges(size: i64, pages: i64, split: i64) -> Vec<Option<String>> {
    let wanted = if split > 0 {
        (size + split - 1) / split
    } else {
        1
    };
    let parts = wanted.min(pages).min(1024);
    if parts < 2 {
        return vec![None];
    }
    let step = pages / parts;
    let cuts: Vec<i64> = (1..parts).map(|k| k * step).collect();
    let mut ranges = Vec::new();
    for (k, cut) in cuts.iter().enumerate() {
        ranges.push(Some(match k {
            0 => format!("ctid < '({cut},0)'::tid"),
            _ => format!(
                "ctid >= '({},0)'::tid AND ctid < '({cut},0)'::tid",
                cuts[k - 1]
            ),
        }));
    }
    ranges.push(Some(format!("ctid >= '({},0)'::tid", cuts[cuts.len() - 1])));
    ranges
}

type Counters = (
    Arc<AtomicI64>,
    Arc<AtomicI64>,
    Arc<AtomicU32>,
    Arc<AtomicU32>,
);

/// What the workers share.
struct Shared {
    /// Chunks not yet taken, largest first.
    queue: Arc<Mutex<VecDeque<Chunk>>>,
    plans: Arc<Vec<TablePlan>>,
    counters: Arc<Vec<Counters>>,
    /// Per table (as `plans`), its first-wave builds: an index of `CopyConfig::deferred`, and
    /// whether only the index of a key is built.
    per_table: Vec<Vec<(usize, bool)>>,
    /// Builds of tables whose rows are all on green, not yet taken.
    builds: Mutex<VecDeque<(usize, bool)>>,
    /// Chunks not yet on green.
    remaining: std::sync::atomic::AtomicUsize,
}

async fn worker(
    cfg: &CopyConfig,
    tracker: &Tracker,
    snapshot: &str,
    shared: &Shared,
) -> Result<(), CopyError> {
    let mut blue: Option<WalsenderConnection> = None;
    let mut green: Option<Client> = None;
    loop {
        let next = shared.queue.lock().expect("queue poisoned").pop_front();
        let Some(chunk) = next else {
            // No chunk left to take: build what tables complete on green need, until every
            // chunk is there and nothing is left to build.
            let build = shared.builds.lock().expect("builds poisoned").pop_front();
            if let Some((i, index_only)) = build {
                tracker.stopped()?;
                if green.as_ref().is_none_or(Client::is_closed) {
                    green = Some(green_session(cfg).await?);
                }
                let g = green.as_ref().expect("set");
                let b = Build {
                    of: &cfg.deferred[i],
                    index_only,
                };
                if let Err(e) = build_one(g, &b).await {
                    tracker.stop();
                    return Err(e);
                }
                continue;
            }
            if shared.remaining.load(Ordering::SeqCst) == 0 {
                return Ok(());
            }
            tracker.stopped()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let plan = &shared.plans[chunk.table];
        let (bytes, rows, done, retries) = &shared.counters[chunk.table];
        let mut attempt = 0;
        loop {
            tracker.stopped()?;
            let result = async {
                if blue.is_none() {
                    blue = Some(snapshot_session(cfg, snapshot).await?);
                }
                if green.as_ref().is_none_or(Client::is_closed) {
                    green = Some(green_session(cfg).await?);
                }
                let (b, g) = (blue.as_mut().expect("set"), green.as_ref().expect("set"));
                copy_chunk(b, g, plan, &chunk, bytes, tracker).await
            }
            .await;
            match result {
                Ok(n) => {
                    rows.fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
                    let now_done = done.fetch_add(1, Ordering::SeqCst) + 1;
                    let chunks =
                        tracker.tables.lock().expect("tables poisoned")[chunk.table].chunks;
                    if now_done == chunks {
                        shared
                            .builds
                            .lock()
                            .expect("builds poisoned")
                            .extend(shared.per_table[chunk.table].iter().copied());
                    }
                    shared.remaining.fetch_sub(1, Ordering::SeqCst);
                    break;
                }
                Err(e)
                    if e.is_transient()
                        && attempt + 1 < CHUNK_ATTEMPTS
                        && !matches!(e, CopyError::Stopped | CopyError::CommitUnknown(_)) =>
                {
                    attempt += 1;
                    retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(table = %plan.name, error = %e, attempt, "copying a range failed; trying it again");
                    // Either side may be the one that failed: both start afresh.
                    blue = None;
                    green = None;
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                }
                Err(e) => {
                    // The others stop at their next message: the copy as a whole starts over.
                    tracker.stop();
                    return Err(e);
                }
            }
        }
    }
}

/// Streams one chunk blue → green and commits it; returns the rows. A failure before the
/// commit leaves nothing on green (its transaction is rolled back), so the chunk may simply be
/// copied again; a connection lost while committing leaves it unknown whether the rows are
/// there ([`CopyError::CommitUnknown`]), and the copy starts over.
async fn copy_chunk(
    blue: &mut WalsenderConnection,
    green: &Client,
    plan: &TablePlan,
    chunk: &Chunk,
    bytes: &AtomicI64,
    tracker: &Tracker,
) -> Result<u64, CopyError> {
    let table = plan.name.quoted();
    let format = if plan.binary { "binary" } else { "text" };
    let out = match &chunk.range {
        None => format!(
            "COPY {} ({}) TO STDOUT (FORMAT {format})",
            chunk.source, plan.columns
        ),
        Some(range) => format!(
            "COPY (SELECT {} FROM ONLY {} WHERE {range}) TO STDOUT (FORMAT {format})",
            plan.columns, chunk.source
        ),
    };
    let into = format!(
        "COPY {table} ({}) FROM STDIN (FORMAT {format})",
        plan.columns
    );
    let streamed = AtomicI64::new(0);
    let result = async {
        let sink = green
            .copy_in::<_, bytes::Bytes>(into.as_str())
            .await
            .map_err(sql(format!("write {} to the target", plan.name)))?;
        futures::pin_mut!(sink);
        blue.copy_out_start(&out).await?;
        while let Some(rows) = blue.copy_out_next(BATCH).await? {
            tracker.stopped()?;
            let n = i64::try_from(rows.len()).unwrap_or(0);
            streamed.fetch_add(n, Ordering::Relaxed);
            bytes.fetch_add(n, Ordering::Relaxed);
            sink.feed(rows)
                .await
                .map_err(sql(format!("write {} to the target", plan.name)))?;
        }
        sink.as_mut().finish().await.map_err(|e| {
            if e.is_closed() || green.is_closed() {
                CopyError::CommitUnknown(plan.name.to_string())
            } else {
                sql(format!("commit {} on the target", plan.name))(e)
            }
        })
    }
    .await;
    if result.is_err() {
        // What this attempt streamed is not on green: the progress says so.
        bytes.fetch_sub(streamed.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    result
}

/// Green's indexes and constraints on `tables` that the copy may drop and build again
/// afterwards: plain indexes, primary keys, unique and exclusion constraints, and foreign keys
/// of the tables — not replica identity indexes chosen with `REPLICA IDENTITY USING INDEX`,
/// invalid indexes (built again they would become valid), anything a foreign key of another
/// table relies on, nor anything on partitioned tables. Foreign keys come first (dropping them
/// frees the unique indexes they reference). The subscription is created only once everything
/// is back, so the apply always finds the keys it needs.
pub async fn deferrable(
    green: &Client,
    tables: &[TableName],
) -> Result<Vec<DeferredIndex>, CopyError> {
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let rows = green
        .query(
            "WITH t AS (
               SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS name
                 FROM unnest($1::text[]) q(name)
                 JOIN pg_class c ON c.oid = to_regclass(q.name)
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind = 'r' AND NOT c.relispartition
             ),
             outside AS (
               SELECT f.conindid FROM pg_constraint f
                WHERE f.contype = 'f' AND f.conrelid NOT IN (SELECT oid FROM t)
             )
             SELECT t.name, con.conname::text, 'ForeignKey',
                    pg_get_constraintdef(con.oid), NULL::text, NULL::text, 0
               FROM pg_constraint con JOIN t ON t.oid = con.conrelid
              WHERE con.contype = 'f' AND con.conparentid = 0
             UNION ALL
             SELECT t.name, con.conname::text, 'Constraint',
                    pg_get_constraintdef(con.oid),
                    CASE WHEN con.contype IN ('p', 'u') THEN ic.relname::text END,
                    CASE WHEN con.contype IN ('p', 'u') THEN pg_get_indexdef(i.indexrelid) END, 1
               FROM pg_constraint con JOIN t ON t.oid = con.conrelid
               JOIN pg_index i ON i.indexrelid = con.conindid
               JOIN pg_class ic ON ic.oid = i.indexrelid
              WHERE con.contype IN ('p', 'u', 'x') AND NOT i.indisreplident AND i.indisvalid
                AND con.conindid NOT IN (SELECT conindid FROM outside)
             UNION ALL
             SELECT t.name, ic.relname::text, 'Index', pg_get_indexdef(i.indexrelid),
                    NULL, NULL, 1
               FROM pg_index i JOIN t ON t.oid = i.indrelid
               JOIN pg_class ic ON ic.oid = i.indexrelid
              WHERE NOT i.indisreplident AND i.indisvalid
                AND NOT EXISTS (SELECT FROM pg_constraint con WHERE con.conindid = i.indexrelid
                                   AND con.contype IN ('p', 'u', 'x'))
                AND i.indexrelid NOT IN (SELECT conindid FROM outside)
              ORDER BY 7, 1, 2",
            &[&names],
        )
        .await
        .map_err(sql("list the target's indexes and constraints"))?;
    Ok(rows
        .iter()
        .map(|r| DeferredIndex {
            table: r.get(0),
            name: r.get(1),
            kind: r.get(2),
            definition: r.get(3),
            index: r.get(4),
            index_definition: r.get(5),
        })
        .collect())
}

fn qualified_table(d: &DeferredIndex) -> String {
    TableName::parse(&d.table)
        .map(|t| t.quoted())
        .unwrap_or_else(|_| d.table.clone())
}

/// `schema.name` of an index of `d`'s table.
fn index_qualified(d: &DeferredIndex, name: &str) -> String {
    match TableName::parse(&d.table) {
        Ok(t) => format!("{}.{}", quote_ident(&t.schema), quote_ident(name)),
        Err(_) => quote_ident(name),
    }
}

/// Drops the deferred indexes and constraints on green (those already gone are skipped).
pub async fn drop_deferred(green: &Client, deferred: &[DeferredIndex]) -> Result<(), CopyError> {
    writable_session(green)
        .await
        .map_err(sql("make the session writable"))?;
    for d in deferred {
        let stmt = match d.kind.as_str() {
            "Index" => format!("DROP INDEX IF EXISTS {}", index_qualified(d, &d.name)),
            _ => format!(
                "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}",
                qualified_table(d),
                quote_ident(&d.name)
            ),
        };
        green.batch_execute(&stmt).await.map_err(sql(format!(
            "drop {} on the target before the copy",
            d.name
        )))?;
    }
    Ok(())
}

/// One statement of building the deferred objects again.
#[derive(Clone, Debug)]
struct Build<'a> {
    of: &'a DeferredIndex,
    /// The index backing a primary key or unique constraint (built first, in parallel).
    index_only: bool,
}

/// Whether what `b` builds exists on green now.
async fn built(green: &Client, b: &Build<'_>) -> Result<bool, CopyError> {
    let d = b.of;
    let row = match (d.kind.as_str(), b.index_only) {
        ("Index", _) => {
            green
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL",
                    &[&index_qualified(d, &d.name)],
                )
                .await
        }
        (_, true) => {
            green
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL",
                    &[&index_qualified(d, d.index.as_deref().unwrap_or(&d.name))],
                )
                .await
        }
        _ => {
            green
                .query_one(
                    "SELECT EXISTS (SELECT FROM pg_constraint
                                     WHERE conrelid = to_regclass($1) AND conname = $2)",
                    &[&qualified_table(d), &d.name],
                )
                .await
        }
    }
    .map_err(sql("look for an index on the target"))?;
    Ok(row.get(0))
}

/// The statement of `b`, building it as it was.
fn build_statement(b: &Build<'_>) -> String {
    let d = b.of;
    match (d.kind.as_str(), &d.index, &d.index_definition) {
        ("Index", _, _) => d.definition.clone(),
        ("Constraint", Some(_), Some(def)) if b.index_only => def.clone(),
        ("Constraint", Some(index), Some(_)) => {
            // PRIMARY KEY (…) / UNIQUE [NULLS NOT DISTINCT] (…) [DEFERRABLE [INITIALLY DEFERRED]]:
            // the index built above carries columns and options; the constraint takes it over.
            let kind = if d.definition.starts_with("PRIMARY KEY") {
                "PRIMARY KEY"
            } else {
                "UNIQUE"
            };
            let timing = if d.definition.contains("INITIALLY DEFERRED") {
                " DEFERRABLE INITIALLY DEFERRED"
            } else if d.definition.contains("DEFERRABLE") {
                " DEFERRABLE"
            } else {
                ""
            };
            format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {kind} USING INDEX {}{timing}",
                qualified_table(d),
                quote_ident(&d.name),
                quote_ident(index)
            )
        }
        _ => format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {}",
            qualified_table(d),
            quote_ident(&d.name),
            d.definition
        ),
    }
}

/// Builds `b` unless it exists.
///
/// The definitions come from the status, where the operator recorded what green had: one that
/// is not an index or constraint definition is refused, and the statement runs by the extended
/// protocol, which takes exactly one statement.
async fn build_one(green: &Client, b: &Build<'_>) -> Result<(), CopyError> {
    if !built(green, b).await? {
        let stmt = build_statement(b);
        if !recorded_as_written(b) {
            return Err(CopyError::Refused(format!(
                "status.replication.deferredIndexes holds a definition of {} the operator did \
                 not record ({:?}); it is not run",
                b.of.name, b.of.definition
            )));
        }
        green
            .execute(stmt.as_str(), &[])
            .await
            .map_err(sql(format!("build {} on the target", b.of.name)))?;
    }
    Ok(())
}

/// Whether `b`'s definition has the shape `pg_get_indexdef` / `pg_get_constraintdef` give
/// its kind.
fn recorded_as_written(b: &Build<'_>) -> bool {
    let d = b.of;
    let index =
        |def: &str| def.starts_with("CREATE INDEX ") || def.starts_with("CREATE UNIQUE INDEX ");
    match (d.kind.as_str(), &d.index_definition) {
        ("Index", _) => index(&d.definition),
        ("Constraint", Some(def)) if b.index_only => def.starts_with("CREATE UNIQUE INDEX "),
        ("Constraint", _) => ["PRIMARY KEY", "UNIQUE", "EXCLUDE"]
            .iter()
            .any(|p| d.definition.starts_with(p)),
        ("ForeignKey", _) => d.definition.starts_with("FOREIGN KEY"),
        _ => false,
    }
}

/// The builds in waves: indexes (those of keys included) and exclusion constraints in
/// parallel; then primary keys and unique constraints taking their indexes over; then foreign
/// keys, which need the keys they reference.
fn waves(deferred: &[DeferredIndex]) -> [Vec<Build<'_>>; 3] {
    let mut first = Vec::new();
    let mut second = Vec::new();
    let mut third = Vec::new();
    for d in deferred {
        match (d.kind.as_str(), d.index_definition.is_some()) {
            ("ForeignKey", _) => third.push(Build {
                of: d,
                index_only: false,
            }),
            ("Constraint", true) => {
                first.push(Build {
                    of: d,
                    index_only: true,
                });
                second.push(Build {
                    of: d,
                    index_only: false,
                });
            }
            _ => first.push(Build {
                of: d,
                index_only: false,
            }),
        }
    }
    [first, second, third]
}

/// Builds every deferred index and constraint missing on green, `parallelism` at a time.
pub async fn rebuild(
    green: &Dsn,
    opts: &ConnectOptions,
    deferred: &[DeferredIndex],
    parallelism: usize,
    tracker: &Tracker,
) -> Result<(), CopyError> {
    tracker.indexes_total.store(
        u32::try_from(deferred.len()).unwrap_or(u32::MAX),
        Ordering::Relaxed,
    );
    for wave in waves(deferred) {
        let queue = Arc::new(Mutex::new(VecDeque::from(wave)));
        let builders = (0..parallelism.max(1)).map(|_| {
            let queue = queue.clone();
            async move {
                let client = writable_target(green, opts).await?;
                loop {
                    let Some(b) = queue.lock().expect("queue poisoned").pop_front() else {
                        return Ok::<(), CopyError>(());
                    };
                    tracker.stopped()?;
                    build_one(&client, &b).await?;
                    if !b.index_only {
                        tracker.indexes_built.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        futures::future::try_join_all(builders).await?;
    }
    Ok(())
}

/// Builds every deferred index and constraint missing on green, one at a time (an abort,
/// after the tables were emptied: cheap).
pub async fn restore(green: &Client, deferred: &[DeferredIndex]) -> Result<(), CopyError> {
    writable_session(green)
        .await
        .map_err(sql("make the session writable"))?;
    for wave in waves(deferred) {
        for b in wave {
            build_one(green, &b).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_follows_the_rate() {
        let p = CopyProgress {
            stage: CopyStage::Copying,
            tables: vec![TableCopy {
                table: "public.a".into(),
                bytes_total: 1000,
                bytes: 250,
                chunks: 1,
                ..TableCopy::default()
            }],
            copying_for: Some(10.0),
            ..CopyProgress::default()
        };
        assert_eq!(p.eta_seconds(), Some(30.0));
        assert_eq!(p.tables_done(), 0);
        let done = CopyProgress {
            stage: CopyStage::Done,
            ..p
        };
        assert_eq!(done.eta_seconds(), None);
    }

    #[test]
    fn constraints_are_built_with_their_names() {
        let d = DeferredIndex {
            table: "my schema.Orders".into(),
            name: "orders_ref_fkey".into(),
            kind: "ForeignKey".into(),
            definition: "FOREIGN KEY (ref) REFERENCES \"my schema\".items(id)".into(),
            ..DeferredIndex::default()
        };
        assert_eq!(
            build_statement(&Build {
                of: &d,
                index_only: false
            }),
            "ALTER TABLE \"my schema\".\"Orders\" ADD CONSTRAINT \"orders_ref_fkey\" FOREIGN KEY (ref) REFERENCES \"my schema\".items(id)"
        );
        assert_eq!(
            index_qualified(&d, &d.name),
            "\"my schema\".\"orders_ref_fkey\""
        );
        let key = DeferredIndex {
            table: "public.t".into(),
            name: "t_a_key".into(),
            kind: "Constraint".into(),
            definition: "UNIQUE (a) DEFERRABLE INITIALLY DEFERRED".into(),
            index: Some("t_a_key".into()),
            index_definition: Some(
                "CREATE UNIQUE INDEX t_a_key ON public.t USING btree (a)".into(),
            ),
        };
        let forged = DeferredIndex {
            definition: "CREATE INDEX x ON t (a); DROP TABLE t".into(),
            kind: "ForeignKey".into(),
            ..d.clone()
        };
        assert!(!recorded_as_written(&Build {
            of: &forged,
            index_only: false
        }));
        assert!(recorded_as_written(&Build {
            of: &d,
            index_only: false
        }));
        let [first, second, third] = waves(std::slice::from_ref(&key));
        assert_eq!((first.len(), second.len(), third.len()), (1, 1, 0));
        assert_eq!(
            build_statement(&first[0]),
            "CREATE UNIQUE INDEX t_a_key ON public.t USING btree (a)"
        );
        assert_eq!(
            build_statement(&second[0]),
            "ALTER TABLE \"public\".\"t\" ADD CONSTRAINT \"t_a_key\" UNIQUE USING INDEX \"t_a_key\" DEFERRABLE INITIALLY DEFERRED"
        );
    }
}
