//! Logical replication from blue to green: the publication on blue, the subscription on green,
//! initial-copy progress, lag, and waiting until green has applied a given WAL position.
//!
//! Every object is named from the cutover id by [`Names`], so two cutovers never collide and a
//! restarted operator finds its objects by name in the catalogs (`pg_publication`,
//! `pg_subscription`, `pg_replication_slots`) instead of remembering what it did. Every `ensure_*`
//! function checks the catalogs first and is harmless to repeat.

use std::time::{Duration, Instant};

use thiserror::Error;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use super::connect::Dsn;
pub use super::ident::TableName;
use super::ident::{quote_ident, quote_literal};
use super::shared::{EXCLUDED_SCHEMAS, EXCLUDED_TABLES, POLL, db_message, writable_session};
use super::slots::{SlotError, drop_slot};

/// The names of every replication object of one cutover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// Publication on blue.
    pub publication: String,
    /// Subscription on green.
    pub subscription: String,
    /// Replication slot on blue used by the subscription.
    pub slot: String,
    /// Publication on green for reverse replication.
    pub reverse_publication: String,
    /// Subscription on blue for reverse replication.
    pub reverse_subscription: String,
    /// Replication slot on green used by the reverse subscription.
    pub reverse_slot: String,
    /// Logical slot on blue through which the change witness reads what blue commits after
    /// the freeze.
    pub witness_slot: String,
    /// Name prefix of the logical slots on blue through which online verification learns
    /// which keys changed (one per pass: the prefix and four hex digits).
    pub online_source_slot: String,
    /// Name prefix of the logical slots on green through which online verification sees any
    /// write to green that replication did not make.
    pub online_target_slot: String,
}

impl Names {
    /// Derives the names from a cutover id (for example `namespace/name` or a UID).
    ///
    /// The id is lower-cased, everything but `[a-z0-9_]` becomes `_` (slot names allow nothing
    /// else), it is cut to fit PostgreSQL's 63-byte names, and a hash of the *original* id is
    /// appended, so ids that sanitise alike (`shop/a-b`, `shop/a_b`) still get different names.
    pub fn for_cutover(id: &str) -> Self {
        let mut clean: String = id
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        clean.truncate(36);
        let base = format!("cutover_{clean}_{:08x}", fnv1a32(id.as_bytes()));
        Self {
            publication: base.clone(),
            subscription: base.clone(),
            slot: base.clone(),
            witness_slot: format!("{base}_wit"),
            online_source_slot: format!("{base}_ovs"),
            online_target_slot: format!("{base}_ovt"),
            reverse_publication: format!("{base}_rev"),
            reverse_subscription: format!("{base}_rev"),
            reverse_slot: format!("{base}_rev"),
        }
    }
}

/// FNV-1a, 32 bits: stable across Rust versions and platforms, unlike `DefaultHasher`.
fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in bytes {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// Which tables are replicated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TableSelection {
    /// Every permanent table outside the system schemas: plain tables and partitioned roots
    /// (partitions are published through their root). Unlogged and temporary tables cannot be
    /// replicated and are left out (preflight reports them).
    #[default]
    All,
    /// Exactly these tables.
    List(Vec<TableName>),
}

impl TableSelection {
    /// From the spec's `replication.tables` (`schema.table` each; empty means all).
    pub fn from_spec(tables: &[String]) -> Self {
        if tables.is_empty() {
            Self::All
        } else {
            Self::List(
                tables
                    .iter()
                    .filter_map(|t| TableName::parse(t).ok())
                    .collect(),
            )
        }
    }
}

/// Why a replication step failed.
#[derive(Debug, Error)]
pub enum ReplicationError {
    /// A statement failed.
    #[error("failed to {action}: {}", db_message(source))]
    Sql {
        /// What was being done.
        action: String,
        /// The driver's error (never contains a connection string).
        #[source]
        source: tokio_postgres::Error,
    },
    /// A condition was not reached in time.
    #[error("failed to {what} within {waited:?}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it was awaited.
        waited: Duration,
        /// The last observation, for people.
        detail: Option<String>,
    },
    /// The subscription does not exist (nothing to wait for).
    #[error("failed to find subscription {0} on the target")]
    NoSubscription(String),
    /// A table of the selection does not exist on the source.
    #[error("failed to find the tables {0} on the source")]
    MissingTables(String),
    /// The subscription reported an error or was disabled.
    #[error("failed to replicate: {0}")]
    Broken(String),
    /// A leftover slot could not be dropped.
    #[error(transparent)]
    Slot(#[from] SlotError),
}

pub(crate) fn sql(
    action: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> ReplicationError {
    let action = action.into();
    move |source| ReplicationError::Sql { action, source }
}

/// The tables a selection means on this database, sorted. For [`TableSelection::List`], every
/// listed table must exist.
pub async fn resolve_tables(
    client: &Client,
    selection: &TableSelection,
) -> Result<Vec<TableName>, ReplicationError> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                AND c.relpersistence = 'p'
                AND n.nspname <> ALL($1::text[]) AND n.nspname NOT LIKE 'pg\\_%'
                AND NOT (c.relname = ANY($2::text[]))
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                   AND d.deptype = 'e')
              ORDER BY 1, 2",
            &[&EXCLUDED_SCHEMAS, &EXCLUDED_TABLES],
        )
        .await
        .map_err(sql("list the tables to replicate"))?;
    let all: Vec<TableName> = rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    match selection {
        TableSelection::All => Ok(all),
        TableSelection::List(list) => {
            let missing: Vec<String> = list
                .iter()
                .filter(|t| !all.contains(t))
                .map(ToString::to_string)
                .collect();
            if !missing.is_empty() {
                return Err(ReplicationError::MissingTables(missing.join(", ")));
            }
            let mut list = list.clone();
            list.sort();
            list.dedup();
            Ok(list)
        }
    }
}

/// The tables a publication publishes (`pg_publication_tables` lists partitions' roots as
/// themselves when `publish_via_partition_root` is on).
/// Those of `tables` that exist on `client` and hold at least one row (one cheap probe each).
pub async fn tables_with_rows(
    client: &Client,
    tables: &[TableName],
) -> Result<Vec<TableName>, ReplicationError> {
    let mut out = Vec::new();
    for t in tables {
        let exists: bool = client
            .query_one(
                "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(sql("look up a replicated table"))?
            .get(0);
        if !exists {
            continue;
        }
        let rows: bool = client
            .query_one(&format!("SELECT EXISTS (SELECT FROM {})", t.quoted()), &[])
            .await
            .map_err(sql(format!("look into {t}")))?
            .get(0);
        if rows {
            out.push(t.clone());
        }
    }
    Ok(out)
}

/// The tables subscription `name` replicates, from the subscriber's own catalog (when the
/// publisher cannot be asked).
pub async fn subscription_tables(
    subscriber: &Client,
    name: &str,
) -> Result<Vec<TableName>, ReplicationError> {
    let rows = subscriber
        .query(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_subscription s
               JOIN pg_subscription_rel sr ON sr.srsubid = s.oid
               JOIN pg_class c ON c.oid = sr.srrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE s.subname = $1
              ORDER BY 1, 2",
            &[&name],
        )
        .await
        .map_err(sql("read the subscription's tables"))?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Empties `tables` on green in one statement: what an attempt's initial copy and streaming
/// wrote, undone by its abort so that the next attempt starts from empty tables.
pub async fn truncate(client: &Client, tables: &[TableName]) -> Result<(), ReplicationError> {
    if tables.is_empty() {
        return Ok(());
    }
    writable_session(client)
        .await
        .map_err(sql("make the session writable"))?;
    client
        .batch_execute(&format!("TRUNCATE {}", quoted_list(tables)))
        .await
        .map_err(sql("empty the tables the copy filled on green"))
}

/// `"s"."t", "s"."u"`: the tables as one statement names them.
fn quoted_list(tables: &[TableName]) -> String {
    tables
        .iter()
        .map(TableName::quoted)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `ANALYZE` of `tables` (a partitioned table's partitions included), one statement: planner
/// statistics for rows that arrived by replication.
pub async fn analyze(client: &Client, tables: &[TableName]) -> Result<(), ReplicationError> {
    if tables.is_empty() {
        return Ok(());
    }
    client
        .batch_execute(&format!("ANALYZE {}", quoted_list(tables)))
        .await
        .map_err(sql("analyze the replicated tables on green"))
}

pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<TableName>, ReplicationError> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname
               FROM pg_publication p
               JOIN pg_publication_rel pr ON pr.prpubid = p.oid
               JOIN pg_class c ON c.oid = pr.prrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE p.pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(sql("read the publication's tables"))?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Creates the publication `name` for `tables` (partitioned tables via their root), or, when it
/// exists, makes its table list equal to `tables`. Returns whether anything changed.
pub async fn ensure_publication_named(
    client: &Client,
    name: &str,
    tables: &[TableName],
) -> Result<bool, ReplicationError> {
    writable_session(client)
        .await
        .map_err(sql("make the session writable"))?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(sql("look up the publication"))?
        .is_some();
    let list = quoted_list(tables);
    if !exists {
        let stmt = if tables.is_empty() {
            format!(
                "CREATE PUBLICATION {} WITH (publish_via_partition_root = true)",
                quote_ident(name)
            )
        } else {
            format!(
                "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish_via_partition_root = true)",
                quote_ident(name)
            )
        };
        match client.batch_execute(&stmt).await {
            Ok(()) => return Ok(true),
            // Another operator replica (or a retry racing a slow commit) got there first.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {}
            Err(e) => return Err(sql(format!("create publication {name}"))(e)),
        }
    }
    let mut current = publication_tables(client, name).await?;
    current.sort();
    let mut wanted = tables.to_vec();
    wanted.sort();
    if current == wanted {
        return Ok(false);
    }
    let stmt = if tables.is_empty() {
        // No `SET TABLE` with an empty list: drop what is there.
        format!(
            "ALTER PUBLICATION {} DROP TABLE {}",
            quote_ident(name),
            current
                .iter()
                .map(TableName::quoted)
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!("ALTER PUBLICATION {} SET TABLE {list}", quote_ident(name))
    };
    client
        .batch_execute(&stmt)
        .await
        .map_err(sql(format!("update the tables of publication {name}")))?;
    Ok(true)
}

/// Creates (or completes) the cutover's publication on blue for the selected tables. Returns
/// the tables published.
pub async fn ensure_publication(
    blue: &Client,
    names: &Names,
    selection: &TableSelection,
) -> Result<Vec<TableName>, ReplicationError> {
    let tables = resolve_tables(blue, selection).await?;
    ensure_publication_named(blue, &names.publication, &tables).await?;
    Ok(tables)
}

/// How a subscription is created.
#[derive(Clone, Copy, Debug)]
pub struct SubscriptionOptions {
    /// Copy the existing rows first (`copy_data`).
    pub copy_data: bool,
    /// Create the slot on the publisher (`create_slot`); when false, the slot exists already
    /// (made with an exported snapshot for the parallel copy) and streaming starts where it
    /// stands.
    pub create_slot: bool,
}

/// Creates the subscription `name` on `subscriber` to `publication` on the server at
/// `publisher_conninfo` (as the subscriber reaches it), with its slot `slot` created on the
/// publisher. When it exists, makes sure it is enabled. A slot of that name on the publisher
/// that no subscription uses (left by a crash between creating the slot and committing the
/// subscription) is dropped first. Returns whether the subscription was created.
pub async fn ensure_subscription_named(
    publisher: &Client,
    subscriber: &Client,
    name: &str,
    publication: &str,
    slot: &str,
    publisher_conninfo: &Dsn,
    options: SubscriptionOptions,
) -> Result<bool, ReplicationError> {
    writable_session(subscriber)
        .await
        .map_err(sql("make the session writable"))?;
    let existing = subscriber
        .query_opt(
            "SELECT s.subenabled FROM pg_subscription s
               JOIN pg_database d ON d.oid = s.subdbid
              WHERE s.subname = $1 AND d.datname = current_database()",
            &[&name],
        )
        .await
        .map_err(sql("look up the subscription"))?;
    if let Some(row) = existing {
        if !row.get::<_, bool>(0) {
            subscriber
                .batch_execute(&format!("ALTER SUBSCRIPTION {} ENABLE", quote_ident(name)))
                .await
                .map_err(sql(format!("enable subscription {name}")))?;
        }
        return Ok(false);
    }
    if options.create_slot {
        drop_slot(publisher, slot, Duration::from_secs(10)).await?;
    }
    let stmt = format!(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} \
         WITH (copy_data = {}, create_slot = {}, slot_name = {}, enabled = true)",
        quote_ident(name),
        quote_literal(publisher_conninfo.expose()),
        quote_ident(publication),
        options.copy_data,
        options.create_slot,
        quote_literal(slot),
    );
    // The statement holds the connection string: only the server's message is kept (it names
    // host and user at most, never the password); the statement text is never logged.
    subscriber.batch_execute(&stmt).await.map_err(sql(format!(
        "create subscription {name} to {}",
        publisher_conninfo.redacted()
    )))?;
    tracing::info!(
        subscription = name,
        publisher = %publisher_conninfo.redacted(),
        copy_data = options.copy_data,
        "created subscription"
    );
    Ok(true)
}

/// Creates (or re-enables) the cutover's subscription on green to blue's publication, copying
/// the existing rows. `blue_conninfo` is blue as *green* reaches it.
pub async fn ensure_subscription(
    blue: &Client,
    green: &Client,
    names: &Names,
    blue_conninfo: &Dsn,
) -> Result<bool, ReplicationError> {
    ensure_subscription_named(
        blue,
        green,
        &names.subscription,
        &names.publication,
        &names.slot,
        blue_conninfo,
        SubscriptionOptions {
            copy_data: true,
            create_slot: true,
        },
    )
    .await
}

/// Initial-copy progress of a subscription.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Tables in state `r` (ready: copied and streaming).
    pub tables_ready: i32,
    /// Tables the subscription replicates.
    pub tables_total: i32,
    /// Bytes processed by initial copies still running, where `pg_stat_progress_copy` reports
    /// them; `None` when no copy runs.
    pub bytes_copied: Option<i64>,
    /// Tables not ready yet, with their state (`i` init, `d` copying, `f` copied, `s` synced).
    pub pending: Vec<(String, String)>,
}

impl Progress {
    /// Every table copied and streaming.
    pub fn is_ready(&self) -> bool {
        self.tables_total > 0 && self.tables_ready == self.tables_total
    }
}

/// Initial-copy progress of subscription `name` on this (subscriber) database.
pub async fn progress_named(green: &Client, name: &str) -> Result<Progress, ReplicationError> {
    let sub = green
        .query_opt(
            "SELECT s.oid FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid
              WHERE s.subname = $1 AND d.datname = current_database()",
            &[&name],
        )
        .await
        .map_err(sql("look up the subscription"))?
        .ok_or_else(|| ReplicationError::NoSubscription(name.to_owned()))?;
    let oid: u32 = sub.get(0);
    let rows = green
        .query(
            "SELECT format('%s.%s', n.nspname, c.relname), sr.srsubstate::text
               FROM pg_subscription_rel sr
               JOIN pg_class c ON c.oid = sr.srrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE sr.srsubid = $1 ORDER BY 1",
            &[&oid],
        )
        .await
        .map_err(sql("read the subscription's table states"))?;
    let mut progress = Progress {
        tables_total: i32::try_from(rows.len()).unwrap_or(i32::MAX),
        ..Progress::default()
    };
    for row in &rows {
        let state: String = row.get(1);
        if state == "r" {
            progress.tables_ready += 1;
        } else {
            progress.pending.push((row.get(0), state));
        }
    }
    let copied = green
        .query_one(
            "SELECT sum(p.bytes_processed)::bigint FROM pg_stat_progress_copy p
               JOIN pg_subscription_rel sr ON sr.srrelid = p.relid AND sr.srsubid = $1
              WHERE p.datname = current_database()",
            &[&oid],
        )
        .await
        .map_err(sql("read the copy progress"))?;
    progress.bytes_copied = copied.get(0);
    Ok(progress)
}

/// Whether the subscription `name` exists on the target.
pub async fn subscription_exists(green: &Client, name: &str) -> Result<bool, ReplicationError> {
    Ok(green
        .query_opt("SELECT 1 FROM pg_subscription WHERE subname = $1", &[&name])
        .await
        .map_err(sql("look for the subscription"))?
        .is_some())
}

/// Initial-copy progress of the cutover's subscription on green.
pub async fn progress(green: &Client, names: &Names) -> Result<Progress, ReplicationError> {
    progress_named(green, &names.subscription).await
}

/// Replication lag.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Lag {
    /// Bytes of WAL between the publisher's current position and what the subscriber confirmed
    /// (`pg_current_wal_lsn() - confirmed_flush_lsn` of the slot); `None` without the slot.
    pub bytes: Option<i64>,
    /// Seconds behind: the publisher's own measure (`pg_stat_replication.replay_lag`, one
    /// clock, no skew between servers); 0 when caught up; `None` when unknown.
    pub seconds: Option<f64>,
}

/// Lag of the slot `slot` on this (publisher) database.
pub async fn lag_of_slot(publisher: &Client, slot: &str) -> Result<Lag, ReplicationError> {
    let row = publisher
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
                    extract(epoch FROM r.replay_lag)::float8
               FROM pg_replication_slots s
               LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
              WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("read the replication slot's lag"))?;
    let Some(row) = row else {
        return Ok(Lag::default());
    };
    let bytes: Option<i64> = row.get(0);
    let replay: Option<f64> = row.get(1);
    let seconds = match (bytes, replay) {
        (_, Some(s)) => Some(s),
        // The walsender clears replay_lag once the subscriber has caught up and goes idle.
        (Some(b), None) if b <= 0 => Some(0.0),
        _ => None,
    };
    Ok(Lag { bytes, seconds })
}

/// Why replication through `subscription` (on the subscriber) and its slot `slot` (on the
/// publisher) is broken, or `None` while it works. Broken means it cannot catch up without a
/// person: the subscription is missing or disabled (`disable_on_error`, or by hand), or the slot
/// is missing or lost WAL it needed (`wal_status = 'lost'`, past `max_slot_wal_keep_size`).
/// An apply worker that errors and restarts is not broken by itself: PostgreSQL retries it, and
/// the lag shows whether it keeps up.
pub async fn health(
    subscriber: &Client,
    publisher: &Client,
    subscription: &str,
    slot: &str,
) -> Result<Option<String>, ReplicationError> {
    let enabled: Option<bool> = subscriber
        .query_opt(
            "SELECT subenabled FROM pg_subscription
              WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_database
                                                 WHERE datname = current_database())",
            &[&subscription],
        )
        .await
        .map_err(sql("read the subscription"))?
        .map(|row| row.get(0));
    match enabled {
        None => return Ok(Some(format!("subscription {subscription} is missing"))),
        Some(false) => return Ok(Some(format!("subscription {subscription} is disabled"))),
        Some(true) => {}
    }
    let status: Option<Option<String>> = publisher
        .query_opt(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("read the replication slot"))?
        .map(|row| row.get(0));
    Ok(match status {
        None => Some(format!(
            "replication slot {slot} is missing on the publisher"
        )),
        Some(Some(s)) if s == "lost" => Some(format!(
            "replication slot {slot} lost WAL it needed (max_slot_wal_keep_size)"
        )),
        Some(_) => None,
    })
}

/// What `pg_stat_subscription_stats` says of a subscription's apply: errors of its apply and
/// table-sync workers, and on PostgreSQL 18 and newer the conflicts it met.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyHealth {
    /// `apply_error_count + sync_error_count`: each failed attempt of a worker (PostgreSQL then
    /// restarts it after `wal_retrieve_retry_interval`). Cumulative.
    pub errors: i64,
    /// Conflicts that stop the apply (18+): a change would duplicate a key green already holds
    /// (`insert_exists`, `update_exists`, `multiple_unique_conflicts`), with counts.
    pub blocking_conflicts: Vec<(String, i64)>,
    /// Conflicts PostgreSQL skips silently (18+): blue updated or deleted a row green lacks
    /// (`update_missing`, `delete_missing`) — green has diverged.
    pub skipped_conflicts: Vec<(String, i64)>,
}

/// Reads [`ApplyHealth`] of `subscription` on the subscriber, in one query: the row is read as
/// JSON, so the conflict counters (PostgreSQL 18 and newer) count as 0 where they do not exist.
pub async fn apply_health(
    subscriber: &Client,
    subscription: &str,
) -> Result<ApplyHealth, ReplicationError> {
    let row = subscriber
        .query_opt(
            "SELECT (s->>'apply_error_count')::int8 + (s->>'sync_error_count')::int8,
                    coalesce((s->>'confl_insert_exists')::int8, 0),
                    coalesce((s->>'confl_update_exists')::int8, 0),
                    coalesce((s->>'confl_multiple_unique_conflicts')::int8, 0),
                    coalesce((s->>'confl_update_missing')::int8, 0),
                    coalesce((s->>'confl_delete_missing')::int8, 0)
               FROM (SELECT to_jsonb(st) AS s FROM pg_stat_subscription_stats st
                      WHERE st.subname = $1) AS stats",
            &[&subscription],
        )
        .await
        .map_err(sql("read the subscription's statistics"))?;
    let Some(row) = row else {
        return Ok(ApplyHealth::default());
    };
    let named = |names: &[(usize, &str)]| -> Vec<(String, i64)> {
        names
            .iter()
            .map(|&(i, n)| (n.to_owned(), row.get::<_, i64>(i)))
            .filter(|(_, c)| *c > 0)
            .collect()
    };
    Ok(ApplyHealth {
        errors: row.get(0),
        blocking_conflicts: named(&[
            (1, "insert_exists"),
            (2, "update_exists"),
            (3, "multiple_unique_conflicts"),
        ]),
        skipped_conflicts: named(&[(4, "update_missing"), (5, "delete_missing")]),
    })
}

/// Lag of the cutover's forward replication, measured on blue.
pub async fn lag(blue: &Client, names: &Names) -> Result<Lag, ReplicationError> {
    lag_of_slot(blue, &names.slot).await
}

/// Waits until every table of the subscription is ready (initial copy done), failing early if
/// the subscription is missing or disabled (for example by `disable_on_error`).
pub async fn wait_ready_named(
    green: &Client,
    name: &str,
    deadline: Instant,
) -> Result<Progress, ReplicationError> {
    let started = Instant::now();
    loop {
        let p = progress_named(green, name).await?;
        if p.is_ready() {
            return Ok(p);
        }
        if Instant::now() >= deadline {
            return Err(ReplicationError::Timeout {
                what: format!("finish the initial copy of subscription {name}"),
                waited: started.elapsed(),
                detail: Some(format!(
                    "{}/{} tables ready; pending: {}",
                    p.tables_ready,
                    p.tables_total,
                    p.pending
                        .iter()
                        .map(|(t, s)| format!("{t} ({s})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until every table of the cutover's subscription on green is ready.
pub async fn wait_ready(
    green: &Client,
    names: &Names,
    deadline: Instant,
) -> Result<Progress, ReplicationError> {
    wait_ready_named(green, &names.subscription, deadline).await
}

/// Waits until the subscriber behind `slot` has applied and confirmed everything up to `lsn`
/// (the slot's `confirmed_flush_lsn` on the publisher reached it). The subscriber reports a
/// position only after committing every transaction before it, so the rows are there.
pub async fn wait_applied_slot(
    publisher: &Client,
    slot: &str,
    lsn: PgLsn,
    deadline: Instant,
) -> Result<PgLsn, ReplicationError> {
    let started = Instant::now();
    loop {
        let row = publisher
            .query_opt(
                "SELECT confirmed_flush_lsn, active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(sql("read the replication slot"))?;
        let Some(row) = row else {
            return Err(ReplicationError::Broken(format!(
                "replication slot {slot} does not exist on the source"
            )));
        };
        let confirmed: Option<PgLsn> = row.get(0);
        if let Some(c) = confirmed
            && c >= lsn
        {
            return Ok(c);
        }
        if Instant::now() >= deadline {
            let active: bool = row.get(1);
            return Err(ReplicationError::Timeout {
                what: format!("apply the source's changes up to {lsn}"),
                waited: started.elapsed(),
                detail: Some(format!(
                    "slot {slot} confirmed {}, {}",
                    confirmed.map_or_else(|| "nothing".into(), |c| c.to_string()),
                    if active {
                        "subscriber connected"
                    } else {
                        "no subscriber connected"
                    }
                )),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until green has applied blue's changes up to `lsn`.
pub async fn wait_applied(
    blue: &Client,
    names: &Names,
    lsn: PgLsn,
    deadline: Instant,
) -> Result<PgLsn, ReplicationError> {
    wait_applied_slot(blue, &names.slot, lsn, deadline).await
}

/// A position on blue to wait for after the freeze, chosen so green can confirm it fast.
///
/// Commits a transaction holding only a logical message (`pg_logical_emit_message`, which
/// subscribers never receive: the built-in subscription does not ask for messages, and PostgreSQL
/// 15+ skips the then-empty transaction) and returns `pg_current_wal_lsn()` after it. Every
/// transaction committed before the call therefore ends strictly before the returned position,
/// which is what makes [`wait_applied_by`]'s subscriber-side check sound. Falls back to the plain
/// current position when the role may not emit messages.
pub async fn sync_point(blue: &Client) -> Result<PgLsn, ReplicationError> {
    writable_session(blue)
        .await
        .map_err(sql("make the session writable"))?;
    let marked = blue
        .batch_execute(
            "BEGIN; SELECT pg_logical_emit_message(true, 'cutover', 'sync point'); COMMIT",
        )
        .await;
    if marked.is_err() {
        let _ = blue.batch_execute("ROLLBACK").await;
    }
    current_lsn(blue).await
}

/// Waits until green has applied blue's changes up to `lsn` (from [`sync_point`]), whichever
/// of two signals comes first:
/// - green's apply worker has *received* a position ≥ `lsn` (`pg_stat_subscription.received_lsn`).
///   It applies what it receives in order, and every change before a [`sync_point`] has a
///   position below it, so everything before was applied (committed, visible). This is the fast
///   signal: it moves as soon as blue's walsender sends its keepalive.
/// - blue's slot has `confirmed_flush_lsn ≥ lsn` (what [`wait_applied`] waits for), which the
///   subscriber reports only after its own commits are flushed — up to a second later.
pub async fn wait_applied_by(
    blue: &Client,
    green: &Client,
    names: &Names,
    lsn: PgLsn,
    deadline: Instant,
) -> Result<PgLsn, ReplicationError> {
    wait_applied_named(blue, green, &names.subscription, &names.slot, lsn, deadline).await
}

/// [`wait_applied_by`] for any direction: `subscription` on `subscriber`, its slot `slot` on
/// `publisher`.
pub async fn wait_applied_named(
    publisher: &Client,
    subscriber: &Client,
    subscription: &str,
    slot: &str,
    lsn: PgLsn,
    deadline: Instant,
) -> Result<PgLsn, ReplicationError> {
    let started = Instant::now();
    loop {
        let received: Option<PgLsn> = subscriber
            .query_opt(
                "SELECT received_lsn FROM pg_stat_subscription
                  WHERE subname = $1 AND relid IS NULL AND received_lsn IS NOT NULL",
                &[&subscription],
            )
            .await
            .map_err(sql("read the subscription's position"))?
            .map(|r| r.get(0));
        if let Some(r) = received
            && r >= lsn
        {
            return Ok(r);
        }
        match wait_applied_slot(publisher, slot, lsn, Instant::now()).await {
            Ok(c) => return Ok(c),
            Err(ReplicationError::Timeout { .. }) if Instant::now() < deadline => {}
            Err(ReplicationError::Timeout { detail, .. }) => {
                return Err(ReplicationError::Timeout {
                    what: format!("apply the source's changes up to {lsn}"),
                    waited: started.elapsed(),
                    detail: Some(format!(
                        "the subscriber received {}; {}",
                        received.map_or_else(|| "nothing".into(), |r| r.to_string()),
                        detail.unwrap_or_default()
                    )),
                });
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The publisher's current WAL position.
pub async fn current_lsn(client: &Client) -> Result<PgLsn, ReplicationError> {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()", &[])
        .await
        .map_err(sql("read the current WAL position"))?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_slot_names_and_never_collide() {
        let a = Names::for_cutover("shop/orders-to-pg16");
        let b = Names::for_cutover("shop/orders_to_pg16");
        assert_ne!(a.slot, b.slot);
        for n in [&a, &b] {
            for name in [&n.slot, &n.reverse_slot, &n.publication, &n.subscription] {
                assert!(name.len() <= 63, "{name}");
                assert!(
                    name.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                    "{name}"
                );
            }
            assert_ne!(n.slot, n.reverse_slot);
        }
        assert!(a.slot.starts_with("cutover_shop_orders_to_pg16_"));
        let long = Names::for_cutover(&"x".repeat(300));
        assert!(long.reverse_slot.len() <= 63);
        // Stable: the same id always gives the same names (a restarted operator finds them).
        assert_eq!(Names::for_cutover("shop/orders-to-pg16"), a);
    }

    #[test]
    fn spec_tables_parse() {
        assert_eq!(
            TableSelection::from_spec(&["my schema.Order Lines".into()]),
            TableSelection::List(vec![TableName::new("my schema", "Order Lines")])
        );
        assert_eq!(TableSelection::from_spec(&[]), TableSelection::All);
        assert_eq!(
            TableName::new("a\"b", "T").quoted(),
            r#""a""b"."T""#.to_owned()
        );
    }
}
