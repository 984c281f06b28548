//! Online verification: every row compared while the application still writes to the source,
//! so that the write freeze only has to look at what changed since (docs/verification.md,
//! "Online verification").
//!
//! A **change witness** — a logical slot with `test_decoding` on the source — records the key
//! and the transaction id of every change committed after it was created. The verifier works in
//! rounds. In each round:
//!
//! 1. the source's connections join one repeatable-read snapshot `S`, and the round reads, in
//!    that snapshot, the source's WAL insert position `L` (past every commit `S` sees);
//! 2. the source's side is hashed in `S`: whole key ranges (leaving out the *dirty* keys, those
//!    with a change not yet proven) and the dirty keys one by one;
//! 3. the round waits until the target has applied the source's changes up to `L`, then hashes
//!    the same on the target in one snapshot `G`;
//! 4. the witness is read up to the source's current position (past everything `G` holds).
//!    A key whose latest change is by a transaction `S` does not see has changed since the
//!    source was hashed: it is dirty, and it is left out of the range again on both sides,
//!    still in `S` and `G`, before the range's hashes are compared.
//!
//! A range whose hashes agree over the keys that did not change after `S` is **proven**: for
//! each such key, the target in `G` equals the source in `S`, and neither can change later
//! without the witnesses seeing it (the source's changes make the key dirty again; the
//! target's own writes are seen by a second witness on the target, which leaves out what
//! replication applied). A dirty key is proven the same way, one by one, once its latest
//! change is visible in `S`. A difference that no change after `S` explains is a divergence:
//! the cutover stops before the freeze, naming the table and the key.
//!
//! Inside the freeze the source no longer changes: the last round compares every dirty key and
//! whatever range is not proven yet, and any difference is a mismatch. Tables the witness
//! cannot follow by key (no primary key, a replica identity other than the primary key) are
//! hashed whole inside the freeze, as before.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use super::sql::{KeyList, Param, Params, Range};
use super::{
    ChunkHash, Difference, FANOUT, Key, Plan, Side, VerifyError, VerifyOptions, catalog_error,
    key_texts, ranges_between, select,
};
use crate::postgres::catalog;
use crate::postgres::connect::{Dsn, connect};
use crate::postgres::ident::TableName;
use crate::postgres::shared::{STATE_SCHEMA, db_message, flush_wal};
use crate::postgres::slots::drop_slots_named;
use crate::postgres::witness::{self, Op};

/// Where online verification runs and what it compares.
#[derive(Clone, Debug)]
pub struct OnlineConfig {
    /// The source.
    pub source: Dsn,
    /// The target.
    pub target: Dsn,
    /// What to compare (tables, parallelism, chunk size, connections).
    pub options: VerifyOptions,
    /// The change witness slot on the source.
    pub source_slot: String,
    /// The witness of writes other than replication's, on the target.
    pub target_slot: String,
    /// The forward subscription on the target.
    pub subscription: String,
    /// Its slot on the source.
    pub forward_slot: String,
    /// Dirty keys compared per table and round, at most.
    pub keys_per_round: usize,
}

/// Why online verification stopped.
#[derive(Debug, Error)]
pub enum OnlineError {
    /// Comparing failed (a side unreachable, a query refused).
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A witness or the replication position could not be read.
    #[error("failed to {action}: {message}")]
    Witness {
        /// What was being done.
        action: &'static str,
        /// The server's message.
        message: String,
        /// The driver's (or the slot helper's) error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A witness slot is gone or lost WAL: what it saw can no longer be trusted complete.
    #[error("the change witness slot {0} is gone or lost its WAL")]
    WitnessLost(String),
    /// The target did not apply the source's changes within the wait.
    #[error("the target did not apply the source's changes up to {0} within {1:?}")]
    Behind(PgLsn, Duration),
}

impl OnlineError {
    fn witness(action: &'static str) -> impl FnOnce(witness::WitnessError) -> Self {
        move |e| OnlineError::Witness {
            action,
            message: db_message(&e.source),
            source: Some(Box::new(e)),
        }
    }

    fn db(action: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Self {
        move |e| OnlineError::Witness {
            action,
            message: db_message(&e),
            source: Some(Box::new(e)),
        }
    }

    /// The SQLSTATE behind the error, if a server refused something.
    pub fn code(&self) -> Option<String> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
                return pg.code().map(|c| c.code().to_owned());
            }
            cause = e.source();
        }
        None
    }
}

/// What the online verification has done so far, for the status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OnlineProgress {
    /// Tables compared online.
    pub tables_online: usize,
    /// Tables hashed whole inside the freeze, with why.
    pub tables_in_freeze: Vec<(TableName, String)>,
    /// Their rows, estimated from the source's statistics.
    pub rows_in_freeze: i64,
    /// Key ranges of the online tables.
    pub ranges_total: usize,
    /// Of which proven.
    pub ranges_proven: usize,
    /// Rows in the proven ranges (when they were proven).
    pub rows_proven: i64,
    /// Keys changed since they were last proven equal.
    pub dirty_keys: usize,
    /// Rounds done.
    pub rounds: u64,
    /// Row changes the witness has seen on the source.
    pub changes_seen: u64,
    /// Every range has been proven (and none was undone by a TRUNCATE since).
    pub pass_complete: bool,
    /// How long the first complete pass took.
    pub pass_seconds: Option<f64>,
    /// A difference no later change explains, or a write on the target outside replication.
    pub divergence: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RangeState {
    Pending,
    /// Hashes differ over keys that did not change: narrow down (rows on the larger side).
    Suspect(i64),
    Proven,
}

struct TableState {
    plan: usize,
    ranges: Vec<(Range, RangeState)>,
    /// Dirty keys and the transaction id (64-bit) of their latest change.
    dirty: HashMap<Vec<String>, u64>,
    /// Rows counted in each proven range.
    proven_rows: HashMap<usize, i64>,
}

/// A transaction snapshot as `pg_current_snapshot()` prints it (`xmin:xmax:xip,…`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    xmin: u64,
    xmax: u64,
    xip: HashSet<u64>,
}

impl Snapshot {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = parts
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        Some(Self { xmin, xmax, xip })
    }

    /// Whether a committed transaction is visible in this snapshot.
    pub(crate) fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }

    /// A 32-bit transaction id (as logical decoding reports it) in full, next to this snapshot.
    pub(crate) fn widen(&self, xid: u32) -> u64 {
        let mut full = (self.xmax & !0xffff_ffff) | u64::from(xid);
        if full > self.xmax + (1 << 31) && full >= 1 << 32 {
            full -= 1 << 32;
        }
        full
    }
}

/// One side's connections for the round, in one snapshot.
struct Side_ {
    conns: Vec<Client>,
    control: Client,
}

/// The online verifier of one cutover. Kept in memory: a restarted process starts a new pass.
pub struct OnlineVerifier {
    cfg: OnlineConfig,
    plans: Vec<Plan>,
    tables: Vec<TableState>,
    /// `schema.table` of the source (partitions under their root) → index in `tables`.
    by_name: HashMap<(String, String), Option<usize>>,
    source: Side_,
    target: Side_,
    progress: OnlineProgress,
    started: Instant,
    /// Differences found by the last rounds inside the freeze.
    found: BTreeMap<usize, Vec<Difference>>,
}

const WAIT_APPLIED: Duration = Duration::from_secs(120);

impl OnlineVerifier {
    /// Creates the witnesses (dropping stale ones with the same prefixes first: `cfg`'s slot
    /// names are prefixes, each pass adds its own suffix), reads both catalogs
    /// and splits every table followed online into key ranges. Nothing is compared yet.
    pub async fn start(cfg: OnlineConfig) -> Result<Self, OnlineError> {
        let (source, target) =
            tokio::try_join!(open_side(&cfg, Side::Source), open_side(&cfg, Side::Target))?;
        let (source_control, target_control) = (&source.control, &target.control);
        // The witnesses exist before anything is hashed. Each pass has its own pair (the
        // prefixes and a suffix): a process that lost the lead and still runs an old pass
        // finds its slots gone rather than reading this pass's.
        let mut cfg = cfg;
        let suffix = pass_suffix();
        for (client, prefix, action) in [
            (
                source_control,
                &mut cfg.source_slot,
                "create the change witness on the source",
            ),
            (
                target_control,
                &mut cfg.target_slot,
                "create the change witness on the target",
            ),
        ] {
            drop_slots_named(client, prefix, Duration::from_secs(2))
                .await
                .map_err(|e| OnlineError::Witness {
                    action,
                    message: e.to_string(),
                    source: Some(Box::new(e)),
                })?;
            prefix.push_str(&suffix);
            witness::ensure(client, prefix)
                .await
                .map_err(OnlineError::witness(action))?;
        }
        let opts = &cfg.options;
        let (source_catalog, target_catalog) = tokio::try_join!(
            async {
                catalog::read(source_control)
                    .await
                    .map_err(catalog_error(Side::Source))
            },
            async {
                catalog::read(target_control)
                    .await
                    .map_err(catalog_error(Side::Target))
            }
        )?;
        let selection = select(&source_catalog, &target_catalog, opts)?;
        let identities = replica_identities(source_control).await?;
        let mut progress = OnlineProgress::default();
        let mut tables = Vec::new();
        let mut by_table: HashMap<TableName, usize> = HashMap::new();
        for (i, plan) in selection.plans.iter().enumerate() {
            let why = match (&plan.key, identities.get(&plan.name)) {
                (None, _) => Some("no primary key"),
                (Some(_), Some(false)) => Some("replica identity is not the primary key"),
                (Some(_), None) => Some("replica identity unknown"),
                (Some(_), Some(true)) => None,
            };
            if let Some(why) = why {
                progress
                    .tables_in_freeze
                    .push((plan.name.clone(), why.to_owned()));
                progress.rows_in_freeze += plan.estimated_rows.max(0.0) as i64;
                continue;
            }
            by_table.insert(plan.name.clone(), tables.len());
            tables.push(TableState {
                plan: i,
                ranges: Vec::new(),
                dirty: HashMap::new(),
                proven_rows: HashMap::new(),
            });
        }
        let mut by_name = HashMap::new();
        for (schema, name, root_schema, root_name) in relations(source_control).await? {
            let root = TableName::new(&root_schema, &root_name);
            by_name.insert((schema, name), by_table.get(&root).copied());
        }
        let mut verifier = Self {
            plans: selection.plans,
            tables,
            by_name,
            source,
            target,
            progress,
            started: Instant::now(),
            found: BTreeMap::new(),
            cfg,
        };
        verifier.split_all().await?;
        verifier.progress.tables_online = verifier.tables.len();
        verifier.refresh();
        Ok(verifier)
    }

    /// What has been done so far.
    pub fn progress(&self) -> &OnlineProgress {
        &self.progress
    }

    /// The tables hashed whole inside the freeze.
    pub fn tables_in_freeze(&self) -> Vec<TableName> {
        self.progress
            .tables_in_freeze
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }

    async fn split_all(&mut self) -> Result<(), OnlineError> {
        let verifier = self.hasher();
        let jobs: Vec<usize> = self.tables.iter().map(|t| t.plan).collect();
        let conns = &self.source.conns;
        let bounds = run_on(conns, jobs, |c, plan| {
            let verifier = &verifier;
            async move { verifier.bounds(&conns[c], plan).await }
        })
        .await?;
        for (table, points) in self.tables.iter_mut().zip(bounds) {
            table.ranges = ranges_between(None, &points, None)
                .into_iter()
                .map(|r| (r, RangeState::Pending))
                .collect();
        }
        Ok(())
    }

    fn hasher(&self) -> super::Verifier<'_> {
        super::Verifier {
            plans: &self.plans,
            options: &self.cfg.options,
        }
    }

    fn refresh(&mut self) {
        let p = &mut self.progress;
        p.ranges_total = self.tables.iter().map(|t| t.ranges.len()).sum();
        p.ranges_proven = self
            .tables
            .iter()
            .map(|t| {
                t.ranges
                    .iter()
                    .filter(|(_, s)| *s == RangeState::Proven)
                    .count()
            })
            .sum();
        p.rows_proven = self
            .tables
            .iter()
            .map(|t| t.proven_rows.values().sum::<i64>())
            .sum();
        p.dirty_keys = self.tables.iter().map(|t| t.dirty.len()).sum();
        p.pass_complete = p.ranges_proven == p.ranges_total;
        if p.pass_complete && p.pass_seconds.is_none() {
            p.pass_seconds = Some(self.started.elapsed().as_secs_f64());
        }
    }

    /// Whether a round would have anything to compare.
    pub fn has_work(&self) -> bool {
        self.tables
            .iter()
            .any(|t| !t.dirty.is_empty() || t.ranges.iter().any(|(_, s)| *s != RangeState::Proven))
    }

    /// One round (see the module's documentation). Inside the freeze (`frozen`), every dirty
    /// key is compared and a difference is a mismatch, recorded for [`Self::report`]; before
    /// it, an unexplained difference is a divergence, in the progress.
    pub async fn round(&mut self, frozen: bool) -> Result<(), OnlineError> {
        // Big suspect ranges are split first (any snapshot will do for boundaries).
        self.split_suspects().await?;
        let batch = self.cfg.options.parallelism.max(1) * 4;
        let mut work: Vec<(usize, usize)> = Vec::new();
        for (t, table) in self.tables.iter().enumerate() {
            for (r, (_, state)) in table.ranges.iter().enumerate() {
                if *state != RangeState::Proven {
                    work.push((t, r));
                }
            }
        }
        // Suspects first, then in table order interleaved by position.
        work.sort_by_key(|&(t, r)| {
            let suspect = matches!(self.tables[t].ranges[r].1, RangeState::Suspect(_));
            (!suspect, r, t)
        });
        work.truncate(batch);
        let keys_per_round = if frozen {
            usize::MAX
        } else {
            self.cfg.keys_per_round.max(1)
        };
        let excluded: Vec<KeyList> = self
            .tables
            .iter()
            .map(|t| KeyList::new(self.key_width(t.plan), t.dirty.keys()))
            .collect();
        let key_batches: Vec<(usize, Vec<Vec<String>>)> = self
            .tables
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.dirty.is_empty())
            .map(|(i, t)| (i, t.dirty.keys().take(keys_per_round).cloned().collect()))
            .collect();

        // The source, in one snapshot.
        let (snapshot, position) = begin(&self.source.conns, true).await?;
        let source = self
            .hash_side(Side::Source, &work, &excluded, &key_batches)
            .await;
        let source = match source {
            Ok(s) => s,
            Err(e) => {
                rollback(&self.source.conns).await;
                return Err(e);
            }
        };
        // The target, once it holds everything the source's snapshot sees.
        let applied = self.wait_applied(position).await;
        if let Err(e) = applied {
            rollback(&self.source.conns).await;
            return Err(e);
        }
        if let Err(e) = begin(&self.target.conns, false).await {
            rollback(&self.source.conns).await;
            return Err(e);
        }
        let target = self
            .hash_side(Side::Target, &work, &excluded, &key_batches)
            .await;
        let target = match target {
            Ok(t) => t,
            Err(e) => {
                rollback(&self.source.conns).await;
                rollback(&self.target.conns).await;
                return Err(e);
            }
        };
        // Everything the source committed up to now, which covers what the target holds.
        let outcome = self.read_witnesses(&snapshot).await;
        if let Err(e) = outcome {
            rollback(&self.source.conns).await;
            rollback(&self.target.conns).await;
            return Err(e);
        }
        let result = self
            .judge(
                &snapshot,
                &work,
                &excluded,
                source,
                target,
                &key_batches,
                frozen,
            )
            .await;
        rollback(&self.source.conns).await;
        rollback(&self.target.conns).await;
        result?;
        self.progress.rounds += 1;
        self.refresh();
        Ok(())
    }

    /// Whether range `r` of table `t` is listed row by row this round (a small suspect one).
    fn listed(&self, t: usize, r: usize) -> bool {
        let leaf_rows = i64::try_from(self.cfg.options.leaf_rows.max(1)).unwrap_or(i64::MAX);
        matches!(self.tables[t].ranges[r].1, RangeState::Suspect(rows) if rows <= leaf_rows)
    }

    fn key_width(&self, plan: usize) -> usize {
        self.plans[plan].key.as_ref().map_or(0, Vec::len)
    }

    async fn split_suspects(&mut self) -> Result<(), OnlineError> {
        let leaf_rows = i64::try_from(self.cfg.options.leaf_rows.max(1)).unwrap_or(i64::MAX);
        for t in 0..self.tables.len() {
            let mut r = 0;
            while r < self.tables[t].ranges.len() {
                let (range, state) = self.tables[t].ranges[r].clone();
                let RangeState::Suspect(rows) = state else {
                    r += 1;
                    continue;
                };
                if rows <= leaf_rows {
                    r += 1;
                    continue;
                }
                let plan = &self.plans[self.tables[t].plan];
                let (sql, params) = plan.sql.split_points(&range);
                let step = (rows + FANOUT - 1) / FANOUT;
                let points: Vec<Vec<String>> =
                    super::query_with(&self.source.control, &sql, &params, Some(step))
                        .await
                        .map_err(|source| VerifyError::Hash {
                            side: Side::Source,
                            table: plan.name.clone(),
                            source,
                        })?
                        .iter()
                        .map(key_texts)
                        .collect();
                let subs = ranges_between(range.lower.clone(), &points, range.upper.clone());
                if subs.len() <= 1 {
                    // Cannot split further: list it.
                    self.tables[t].ranges[r].1 = RangeState::Suspect(leaf_rows);
                    r += 1;
                    continue;
                }
                let n = subs.len();
                self.tables[t].proven_rows.remove(&r);
                // Sub-ranges are hashed first; those that differ become suspects in turn.
                self.tables[t]
                    .ranges
                    .splice(r..=r, subs.into_iter().map(|s| (s, RangeState::Pending)));
                // Proven rows are keyed by position: shift those after the split.
                let shifted: HashMap<usize, i64> = self.tables[t]
                    .proven_rows
                    .drain()
                    .map(|(i, rows)| if i > r { (i + n - 1, rows) } else { (i, rows) })
                    .collect();
                self.tables[t].proven_rows = shifted;
                r += n;
            }
        }
        Ok(())
    }

    async fn hash_side(
        &self,
        side: Side,
        work: &[(usize, usize)],
        excluded: &[KeyList],
        key_batches: &[(usize, Vec<Vec<String>>)],
    ) -> Result<SideResult, OnlineError> {
        let mut jobs = Vec::new();
        for &(t, r) in work {
            let range = &self.tables[t].ranges[r].0;
            let plan = &self.plans[self.tables[t].plan];
            let (sql, params) = if self.listed(t, r) {
                plan.sql.rows_excluding(range, &excluded[t])
            } else {
                plan.sql.chunk_hash_excluding(range, &excluded[t])
            };
            jobs.push((t, sql, params));
        }
        for (t, keys) in key_batches {
            let plan = &self.plans[self.tables[*t].plan];
            for chunk in keys.chunks(20_000) {
                let (sql, params) = plan
                    .sql
                    .rows_for_keys(&KeyList::new(self.key_width(self.tables[*t].plan), chunk));
                jobs.push((*t, sql, params));
            }
        }
        let rows = self.run_queries(side, jobs).await?;
        let mut out = SideResult::default();
        let mut rows = rows.into_iter();
        for &(t, r) in work {
            let width = self.key_width(self.tables[t].plan);
            let result = rows.next().unwrap_or_default();
            if self.listed(t, r) {
                out.ranges.push(RangeResult::Rows(
                    result.iter().map(|row| split_row(row, width)).collect(),
                ));
            } else {
                out.ranges.push(RangeResult::Hash(chunk(&result[0])));
            }
        }
        for (t, keys) in key_batches {
            let width = self.key_width(self.tables[*t].plan);
            let mut hashes = HashMap::new();
            for _ in keys.chunks(20_000) {
                for row in rows.next().unwrap_or_default() {
                    let key: Vec<String> = (0..width).map(|i| row.get::<_, String>(i)).collect();
                    hashes.insert(key, row.get::<_, Option<i64>>(width));
                }
            }
            out.keys.push(hashes);
        }
        Ok(out)
    }

    /// Runs `(table, statement, parameters)` on `side`'s connections (in their transaction).
    async fn run_queries(
        &self,
        side: Side,
        jobs: Vec<(usize, String, Params)>,
    ) -> Result<Vec<Vec<tokio_postgres::Row>>, OnlineError> {
        let conns = match side {
            Side::Source => &self.source.conns,
            Side::Target => &self.target.conns,
        };
        let plans = &self.plans;
        let tables = &self.tables;
        run_on(conns, jobs, |c, (t, sql, params)| async move {
            query(&conns[c], &sql, &params).await.map_err(|source| {
                OnlineError::from(VerifyError::Hash {
                    side,
                    table: plans[tables[t].plan].name.clone(),
                    source,
                })
            })
        })
        .await
    }

    async fn wait_applied(&self, lsn: PgLsn) -> Result<(), OnlineError> {
        let deadline = Instant::now() + WAIT_APPLIED;
        let mut nudged = false;
        loop {
            let received: Option<PgLsn> = self
                .target
                .control
                .query_opt(
                    "SELECT received_lsn FROM pg_stat_subscription
                      WHERE subname = $1 AND relid IS NULL AND received_lsn IS NOT NULL",
                    &[&self.cfg.subscription],
                )
                .await
                .map_err(OnlineError::db("read the subscription's position"))?
                .map(|r| r.get(0));
            let confirmed: Option<PgLsn> = self
                .source
                .control
                .query_opt(
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.cfg.forward_slot],
                )
                .await
                .map_err(OnlineError::db("read the replication slot's position"))?
                .and_then(|r| r.get(0));
            if received.is_some_and(|r| r >= lsn) || confirmed.is_some_and(|c| c >= lsn) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(OnlineError::Behind(lsn, WAIT_APPLIED));
            }
            if !nudged {
                // An idle source sends nothing past `lsn`: one small logical message (no table
                // is written) moves the walsender and the subscriber past it.
                nudged = true;
                // A committed message (no table written) is flushed and sent at once.
                let _ = flush_wal(&self.source.control).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads both witnesses up to now. Source changes make keys dirty (a TRUNCATE undoes its
    /// table's proven ranges); any row change on the target is a divergence.
    async fn read_witnesses(&mut self, snapshot: &Snapshot) -> Result<(), OnlineError> {
        for (client, slot) in [
            (&self.source.control, &self.cfg.source_slot),
            (&self.target.control, &self.cfg.target_slot),
        ] {
            if !witness::intact(client, slot)
                .await
                .map_err(OnlineError::witness("look up the change witness"))?
            {
                return Err(OnlineError::WitnessLost(slot.clone()));
            }
        }
        // Everything up to now, flushed (decoding waits for a record that straddles the
        // flushed position; see `flush_wal`).
        let upto: PgLsn = flush_wal(&self.source.control)
            .await
            .map_err(OnlineError::db("flush the source's WAL"))?;
        let changes = witness::peek(&self.source.control, &self.cfg.source_slot, upto, false)
            .await
            .map_err(OnlineError::witness(
                "read the change witness on the source",
            ))?;
        for (xid, data) in &changes {
            self.apply_change(snapshot.widen(*xid), data);
        }
        self.progress.changes_seen += changes.len() as u64;
        witness::advance(&self.source.control, &self.cfg.source_slot, upto)
            .await
            .map_err(OnlineError::witness(
                "advance the change witness on the source",
            ))?;

        let target_upto: PgLsn = flush_wal(&self.target.control)
            .await
            .map_err(OnlineError::db("flush the target's WAL"))?;
        let local = witness::peek(
            &self.target.control,
            &self.cfg.target_slot,
            target_upto,
            true,
        )
        .await
        .map_err(OnlineError::witness(
            "read the change witness on the target",
        ))?;
        let own = format!("table {STATE_SCHEMA}.");
        let foreign: Vec<&String> = local
            .iter()
            .map(|(_, d)| d)
            .filter(|d| !d.starts_with(&own))
            .collect();
        if !foreign.is_empty() && self.progress.divergence.is_none() {
            let keys = witness::primary_keys(&self.target.control)
                .await
                .map_err(OnlineError::witness("read the target's primary keys"))?;
            let samples: Vec<String> = foreign
                .iter()
                .take(3)
                .map(|d| {
                    let change = d.strip_prefix("table ").unwrap_or(d);
                    witness::describe(change, &keys)
                })
                .collect();
            self.progress.divergence = Some(format!(
                "the target was written outside replication ({} row change{}, e.g. {}): it \
                 must change only through replication until the switch",
                foreign.len(),
                if foreign.len() == 1 { "" } else { "s" },
                samples.join("; ")
            ));
        }
        witness::advance(&self.target.control, &self.cfg.target_slot, target_upto)
            .await
            .map_err(OnlineError::witness(
                "advance the change witness on the target",
            ))?;
        Ok(())
    }

    fn apply_change(&mut self, xid: u64, data: &str) {
        let Some(change) = witness::parse_change(data) else {
            return;
        };
        for relation in &change.tables {
            let Some(&Some(t)) = self.by_name.get(relation) else {
                continue;
            };
            if change.op == Op::Truncate {
                let table = &mut self.tables[t];
                for (_, state) in &mut table.ranges {
                    *state = RangeState::Pending;
                }
                table.proven_rows.clear();
                continue;
            }
            let key_columns = self.plans[self.tables[t].plan]
                .key
                .clone()
                .unwrap_or_default();
            for tuple in &change.tuples {
                let key: Option<Vec<String>> = key_columns
                    .iter()
                    .map(|k| {
                        tuple
                            .iter()
                            .find(|(name, _)| name == k)
                            .map(|(_, v)| v.clone())
                    })
                    .collect();
                match key {
                    Some(key) => {
                        self.tables[t].dirty.insert(key, xid);
                    }
                    None => {
                        // A change that does not show the key: this table can only be hashed
                        // whole inside the freeze.
                        self.give_up_on(t, "changes do not show the primary key");
                        return;
                    }
                }
            }
        }
    }

    fn give_up_on(&mut self, t: usize, why: &str) {
        let plan = &self.plans[self.tables[t].plan];
        self.progress
            .tables_in_freeze
            .push((plan.name.clone(), why.to_owned()));
        self.progress.rows_in_freeze += plan.estimated_rows.max(0.0) as i64;
        self.tables.remove(t);
        for index in self.by_name.values_mut() {
            *index = match *index {
                Some(i) if i == t => None,
                Some(i) if i > t => Some(i - 1),
                other => other,
            };
        }
        self.progress.tables_online = self.tables.len();
    }

    #[allow(clippy::too_many_arguments)]
    async fn judge(
        &mut self,
        snapshot: &Snapshot,
        work: &[(usize, usize)],
        excluded: &[KeyList],
        source: SideResult,
        target: SideResult,
        key_batches: &[(usize, Vec<Vec<String>>)],
        frozen: bool,
    ) -> Result<(), OnlineError> {
        // A table given up on while the witness was read shifted the indexes: start over.
        if self.tables.len() != excluded.len() {
            return Ok(());
        }
        // Keys whose latest change the source's snapshot does not see, beyond those left out.
        let late: Vec<Vec<Vec<String>>> = self
            .tables
            .iter()
            .map(|table| {
                table
                    .dirty
                    .iter()
                    .filter(|(_, xid)| !snapshot.sees(**xid))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .collect();
        let mut recheck = Vec::new();
        for (i, &(t, r)) in work.iter().enumerate() {
            match (&source.ranges[i], &target.ranges[i]) {
                (RangeResult::Hash(s), RangeResult::Hash(g)) => {
                    if s == g {
                        self.prove(t, r, s.rows);
                    } else {
                        recheck.push((i, t, r, s.rows.max(g.rows)));
                    }
                }
                (RangeResult::Rows(s), RangeResult::Rows(g)) => {
                    let late: HashSet<&Vec<String>> = late[t].iter().collect();
                    let differences: Vec<Difference> = compare_rows(s, g, &late)
                        .into_iter()
                        .map(|d| self.named(t, d))
                        .collect();
                    if differences.is_empty() {
                        self.prove(t, r, s.len() as i64);
                    } else {
                        if frozen {
                            // Named: the range counts as compared.
                            self.prove(t, r, s.len() as i64);
                        }
                        self.diverged(t, differences, frozen);
                    }
                }
                _ => {}
            }
        }
        // Ranges that differ: hashed again without the keys changed after the snapshot, still
        // in both snapshots.
        if !recheck.is_empty() {
            let jobs: Vec<(usize, String, Params)> = recheck
                .iter()
                .map(|&(_, t, r, _)| {
                    let width = self.key_width(self.tables[t].plan);
                    let all =
                        KeyList::new(width, self.tables[t].dirty.keys().chain(late[t].iter()));
                    let (sql, params) = self.plans[self.tables[t].plan]
                        .sql
                        .chunk_hash_excluding(&self.tables[t].ranges[r].0, &all);
                    (t, sql, params)
                })
                .collect();
            let (s, g) = tokio::try_join!(
                self.run_queries(Side::Source, jobs.clone()),
                self.run_queries(Side::Target, jobs)
            )?;
            for ((_, t, r, rows), (s, g)) in recheck.into_iter().zip(s.into_iter().zip(g)) {
                let (s, g) = (chunk(&s[0]), chunk(&g[0]));
                if s == g {
                    self.prove(t, r, s.rows);
                } else {
                    // Narrowed down in the next rounds: split while large, then listed.
                    self.tables[t].ranges[r].1 = RangeState::Suspect(rows.max(s.rows).max(g.rows));
                }
            }
        }
        // Keys compared one by one.
        for (j, (t, keys)) in key_batches.iter().enumerate() {
            let (s, g) = (&source.keys[j], &target.keys[j]);
            let mut differences = Vec::new();
            for key in keys {
                let (bh, gh) = (s.get(key).copied().flatten(), g.get(key).copied().flatten());
                let Some(&latest) = self.tables[*t].dirty.get(key) else {
                    continue;
                };
                let settled = snapshot.sees(latest);
                if bh == gh {
                    if settled {
                        self.tables[*t].dirty.remove(key);
                    }
                } else if settled || frozen {
                    differences.push(match (bh, gh) {
                        (Some(_), None) => Difference::MissingOnTarget {
                            key: self.key(*t, key),
                        },
                        (None, Some(_)) => Difference::ExtraOnTarget {
                            key: self.key(*t, key),
                        },
                        _ => Difference::Changed {
                            key: self.key(*t, key),
                        },
                    });
                }
            }
            if !differences.is_empty() {
                if frozen {
                    for key in differences.iter().filter_map(difference_key) {
                        self.tables[*t].dirty.remove(&key);
                    }
                }
                self.diverged(*t, differences, frozen);
            }
        }
        Ok(())
    }

    /// `d` with its key's column names.
    fn named(&self, t: usize, d: Difference) -> Difference {
        match d {
            Difference::MissingOnTarget { key } => Difference::MissingOnTarget {
                key: self.key(t, &key.values),
            },
            Difference::ExtraOnTarget { key } => Difference::ExtraOnTarget {
                key: self.key(t, &key.values),
            },
            Difference::Changed { key } => Difference::Changed {
                key: self.key(t, &key.values),
            },
            other => other,
        }
    }

    fn key(&self, t: usize, values: &[String]) -> Key {
        Key {
            columns: self.plans[self.tables[t].plan]
                .key
                .clone()
                .unwrap_or_default(),
            values: values.to_vec(),
        }
    }

    fn prove(&mut self, t: usize, r: usize, rows: i64) {
        self.tables[t].ranges[r].1 = RangeState::Proven;
        self.tables[t].proven_rows.insert(r, rows);
    }

    fn diverged(&mut self, t: usize, differences: Vec<Difference>, frozen: bool) {
        if frozen {
            // Inside the freeze a difference is a mismatch of the final verification.
            let plan = self.tables[t].plan;
            let list = self.found.entry(plan).or_default();
            for d in differences {
                if list.len() < self.cfg.options.max_differences && !list.contains(&d) {
                    list.push(d);
                }
            }
            return;
        }
        if self.progress.divergence.is_none() {
            let name = &self.plans[self.tables[t].plan].name;
            let listed: Vec<String> = differences.iter().take(5).map(|d| d.to_string()).collect();
            self.progress.divergence = Some(format!(
                "{name} differs on the target where no later change on the source explains it: {}",
                listed.join("; ")
            ));
        }
    }

    /// The verification inside the freeze: rounds until every range is proven and every dirty
    /// key compared (the source no longer changes), then the report of the online tables.
    /// The tables followed only inside the freeze are not in it (see [`Self::tables_in_freeze`]).
    pub async fn finish(&mut self) -> Result<Vec<super::TableReport>, OnlineError> {
        // The freeze ended every session that predates it on the source, these included.
        for side in [Side::Source, Side::Target] {
            let conns = match side {
                Side::Source => &self.source,
                Side::Target => &self.target,
            };
            if conns.control.is_closed() || conns.conns.iter().any(Client::is_closed) {
                let fresh = open_side(&self.cfg, side).await?;
                match side {
                    Side::Source => self.source = fresh,
                    Side::Target => self.target = fresh,
                }
            }
        }
        // Each round proves or lists a batch of ranges and compares every dirty key; with the
        // source frozen nothing new becomes dirty.
        while self.has_work() {
            self.round(true).await?;
        }
        let mut reports = Vec::new();
        for table in &self.tables {
            let plan = &self.plans[table.plan];
            let rows: i64 = table.proven_rows.values().sum();
            let differences = self.found.get(&table.plan).cloned().unwrap_or_default();
            reports.push(super::TableReport {
                table: plan.name.clone(),
                method: super::Method::Online,
                source_rows: rows,
                target_rows: rows,
                chunks: table.ranges.len(),
                chunks_differing: differences.len(),
                matched: differences.is_empty(),
                differences_truncated: differences.len() >= self.cfg.options.max_differences,
                differences,
            });
        }
        Ok(reports)
    }

    /// Drops this pass's witness slots (best effort: a slot that cannot be dropped now is
    /// dropped by the cutover's cleanup, which drops every slot with the prefix).
    pub async fn drop_slots(self) {
        let cfg = self.cfg.clone();
        for (side, slot) in [
            (Side::Source, &cfg.source_slot),
            (Side::Target, &cfg.target_slot),
        ] {
            let control = match side {
                Side::Source => &self.source.control,
                Side::Target => &self.target.control,
            };
            let fresh;
            let client = if control.is_closed() {
                match open_side(&cfg, side).await {
                    Ok(s) => {
                        fresh = s;
                        &fresh.control
                    }
                    Err(_) => continue,
                }
            } else {
                control
            };
            let _ = crate::postgres::slots::drop_slot(client, slot, Duration::from_secs(2)).await;
        }
    }

    /// Opens fresh connections to both sides (after a connection broke). What was proven
    /// stays proven: the witnesses kept every change since.
    pub async fn reconnect(&mut self) -> Result<(), OnlineError> {
        let (source, target) = tokio::try_join!(
            open_side(&self.cfg, Side::Source),
            open_side(&self.cfg, Side::Target)
        )?;
        self.source = source;
        self.target = target;
        Ok(())
    }
}

fn difference_key(d: &Difference) -> Option<Vec<String>> {
    match d {
        Difference::MissingOnTarget { key }
        | Difference::ExtraOnTarget { key }
        | Difference::Changed { key } => Some(key.values.clone()),
        _ => None,
    }
}

#[derive(Default)]
struct SideResult {
    ranges: Vec<RangeResult>,
    keys: Vec<HashMap<Vec<String>, Option<i64>>>,
}

enum RangeResult {
    Hash(ChunkHash),
    Rows(Vec<(Vec<String>, i64)>),
}

fn chunk(row: &tokio_postgres::Row) -> ChunkHash {
    ChunkHash {
        rows: row.get(0),
        sum: row.get(1),
    }
}

fn split_row(row: &tokio_postgres::Row, width: usize) -> (Vec<String>, i64) {
    let key = (0..width)
        .map(|i| row.get::<_, Option<String>>(i).unwrap_or_default())
        .collect();
    (key, row.get(width))
}

/// The differences between two listings of a range, leaving out keys changed after the
/// snapshot.
fn compare_rows(
    source: &[(Vec<String>, i64)],
    target: &[(Vec<String>, i64)],
    late: &HashSet<&Vec<String>>,
) -> Vec<Difference> {
    let key = |values: &Vec<String>| Key {
        columns: Vec::new(),
        values: values.clone(),
    };
    let theirs: HashMap<&Vec<String>, i64> = target.iter().map(|(k, h)| (k, *h)).collect();
    let mine: HashSet<&Vec<String>> = source.iter().map(|(k, _)| k).collect();
    let mut out = Vec::new();
    for (k, h) in source {
        if late.contains(k) {
            continue;
        }
        match theirs.get(k) {
            None => out.push(Difference::MissingOnTarget { key: key(k) }),
            Some(other) if other != h => out.push(Difference::Changed { key: key(k) }),
            Some(_) => {}
        }
    }
    for (k, _) in target {
        if !mine.contains(k) && !late.contains(k) {
            out.push(Difference::ExtraOnTarget { key: key(k) });
        }
    }
    out
}

/// Four hex digits that tell one pass's witness slots from another's.
fn pass_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{:04x}",
        (nanos ^ std::process::id().rotate_left(16)) & 0xffff
    )
}

/// A side's control connection and its `parallelism` hashing connections, canonical sessions.
async fn open_side(cfg: &OnlineConfig, side: Side) -> Result<Side_, OnlineError> {
    let dsn = match side {
        Side::Source => &cfg.source,
        Side::Target => &cfg.target,
    };
    let open = || async {
        let client = connect(dsn, &cfg.options.connect)
            .await
            .map_err(|source| VerifyError::Connect { side, source })?;
        super::session::canonicalize(&client, side).await?;
        Ok::<_, VerifyError>(client)
    };
    let control = open().await?;
    let conns = try_join_all((0..cfg.options.parallelism.max(1)).map(|_| open())).await?;
    Ok(Side_ { conns, control })
}

/// Starts a read-only repeatable-read transaction on every connection, in one snapshot. On the
/// source (`read_position`), also returns that snapshot and the WAL insert position read in it.
async fn begin(conns: &[Client], read_position: bool) -> Result<(Snapshot, PgLsn), OnlineError> {
    let first = &conns[0];
    let session = |e| OnlineError::db("start the comparing transaction")(e);
    first
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(session)?;
    let sql = if read_position {
        "SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn(), pg_export_snapshot()"
    } else {
        "SELECT pg_current_snapshot()::text, '0/0'::pg_lsn, pg_export_snapshot()"
    };
    let row = first.query_one(sql, &[]).await.map_err(session)?;
    let snapshot = Snapshot::parse(&row.get::<_, String>(0)).ok_or(OnlineError::Witness {
        action: "read the snapshot",
        message: "unreadable pg_current_snapshot()".into(),
        source: None,
    })?;
    let position: PgLsn = row.get(1);
    let id: String = row.get(2);
    if !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(OnlineError::Witness {
            action: "share the snapshot",
            message: "unexpected snapshot id".into(),
            source: None,
        });
    }
    try_join_all(conns[1..].iter().map(|c| {
        let id = id.clone();
        async move {
            c.batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{id}'"
            ))
            .await
        }
    }))
    .await
    .map_err(session)?;
    Ok((snapshot, position))
}

async fn rollback(conns: &[Client]) {
    for c in conns {
        let _ = c.batch_execute("ROLLBACK").await;
    }
}

async fn query(
    client: &Client,
    sql: &str,
    params: &[Param],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        params.iter().map(Param::as_sql).collect();
    client.query(sql, &refs).await
}

/// Runs `jobs` on `conns`, each connection taking the next job; results in job order.
async fn run_on<J, T, E, F, Fut>(conns: &[Client], jobs: Vec<J>, f: F) -> Result<Vec<T>, E>
where
    F: Fn(usize, J) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let queue = Mutex::new(jobs.into_iter().enumerate().collect::<VecDeque<_>>());
    let results = Mutex::new(Vec::new());
    let f = &f;
    try_join_all((0..conns.len()).map(|c| {
        let queue = &queue;
        let results = &results;
        async move {
            loop {
                let next = queue.lock().expect("queue poisoned").pop_front();
                let Some((i, job)) = next else { break };
                let out = f(c, job).await?;
                results.lock().expect("results poisoned").push((i, out));
            }
            Ok::<_, E>(())
        }
    }))
    .await?;
    let mut results = results.into_inner().expect("results poisoned");
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, out)| out).collect())
}

/// Whether each table's changes show its primary key: replica identity `default` (the primary
/// key) or `full`, for the table and each of its partitions.
async fn replica_identities(db: &Client) -> Result<HashMap<TableName, bool>, OnlineError> {
    let rows = db
        .query(
            "SELECT rn.nspname::text, r.relname::text,
                    bool_and(c.relreplident IN ('d', 'f'))
               FROM pg_class c
               JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid)
               JOIN pg_namespace rn ON rn.oid = r.relnamespace
              WHERE c.relkind IN ('r', 'p')
              GROUP BY 1, 2",
            &[],
        )
        .await
        .map_err(OnlineError::db("read the tables' replica identities"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get(2),
            )
        })
        .collect())
}

/// Every table and partition `(schema, name)` with the table it belongs to (its root).
async fn relations(db: &Client) -> Result<Vec<(String, String, String, String)>, OnlineError> {
    let rows = db
        .query(
            "SELECT n.nspname::text, c.relname::text, rn.nspname::text, r.relname::text
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid)
               JOIN pg_namespace rn ON rn.oid = r.relnamespace
              WHERE c.relkind IN ('r', 'p')",
            &[],
        )
        .await
        .map_err(OnlineError::db("read the tables and partitions"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_say_what_they_see() {
        let s = Snapshot::parse("100:105:101,103").unwrap();
        assert!(s.sees(99));
        assert!(s.sees(100));
        assert!(!s.sees(101));
        assert!(s.sees(102));
        assert!(!s.sees(103));
        assert!(!s.sees(105));
        assert!(!s.sees(200));
        assert_eq!(Snapshot::parse("5:5:").unwrap().xip.len(), 0);
    }

    #[test]
    fn short_transaction_ids_widen_next_to_the_snapshot() {
        let s = Snapshot::parse(&format!("{}:{}:", (3u64 << 32) + 10, (3u64 << 32) + 20)).unwrap();
        assert_eq!(s.widen(15), (3 << 32) + 15);
        // Just before the epoch turned.
        assert_eq!(s.widen(u32::MAX - 5), (2 << 32) + u64::from(u32::MAX - 5));
        let early = Snapshot::parse("3:10:").unwrap();
        assert_eq!(early.widen(7), 7);
    }

    #[test]
    fn listings_ignore_keys_changed_later() {
        let k = |v: &str| vec![v.to_owned()];
        let source = vec![(k("1"), 10), (k("2"), 20), (k("3"), 30)];
        let target = vec![(k("1"), 10), (k("2"), 21), (k("4"), 40)];
        let late_key = k("2");
        let late: HashSet<&Vec<String>> = [&late_key].into_iter().collect();
        let found = compare_rows(&source, &target, &late);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(matches!(&found[0], Difference::MissingOnTarget { key } if key.values == k("3")));
        assert!(matches!(&found[1], Difference::ExtraOnTarget { key } if key.values == k("4")));
    }
}
