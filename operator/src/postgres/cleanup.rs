//! Removing every replication object of a cutover from both servers: subscriptions (disabled
//! first, their slot detached so dropping works even when the publisher is gone), the
//! replication slots (the subscription's and any left by initial-copy workers), publications,
//! and the operator's bookkeeping schema once nothing is frozen.
//!
//! Idempotent: each object is looked up in the catalogs and dropped only if it is there, so
//! cleanup can run after an abort at any step, after a crash halfway through itself, and again.

use std::time::Duration;

use thiserror::Error;
use tokio_postgres::Client;

use super::ident::quote_ident;
use super::replication::Names;
use super::shared::{STATE_SCHEMA, db_message, writable_session};
use super::slots::{SlotError, drop_slot, drop_slots_named};

/// Why cleanup failed.
#[derive(Debug, Error)]
pub enum CleanupError {
    /// A statement failed.
    #[error("failed to {action}: {}", db_message(source))]
    Sql {
        /// What was being done.
        action: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A slot could not be dropped.
    #[error(transparent)]
    Slot(#[from] SlotError),
}

fn sql(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CleanupError {
    let action = action.into();
    move |source| CleanupError::Sql { action, source }
}

/// What cleanup removed, for the log and the step message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Objects dropped, e.g. `subscription cutover_x on green`.
    pub dropped: Vec<String>,
    /// Objects that could not be reached (their server was unavailable).
    pub skipped: Vec<String>,
}

/// Drops subscription `name` on `subscriber`, and on `publisher` (when reachable) its slot
/// `slot` and the slots its initial-copy workers made (`pg_<suboid>_sync_…`).
///
/// Order matters for crash safety: the subscription is disabled (its workers stop), the
/// copy-worker slots — named after the subscription's oid, which is lost once it is dropped —
/// are dropped, the subscription's slot is detached (`slot_name = NONE`, so `DROP SUBSCRIPTION`
/// does not need the publisher), the subscription is dropped, and last its slot, which is named
/// by us and found again after a crash.
pub async fn drop_subscription(
    subscriber: Option<&Client>,
    publisher: Option<&Client>,
    name: &str,
    slot: &str,
    report: &mut CleanupReport,
    sides: (&str, &str),
) -> Result<(), CleanupError> {
    let (sub_side, pub_side) = sides;
    if let Some(sub) = subscriber {
        writable_session(sub)
            .await
            .map_err(sql("make the session writable"))?;
        let row = sub
            .query_opt(
                "SELECT s.oid, s.subenabled, s.subslotname IS NOT NULL
                   FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid
                  WHERE s.subname = $1 AND d.datname = current_database()",
                &[&name],
            )
            .await
            .map_err(sql("look up the subscription"))?;
        if let Some(row) = row {
            let oid: u32 = row.get(0);
            let enabled: bool = row.get(1);
            let has_slot: bool = row.get(2);
            let q = quote_ident(name);
            if enabled {
                sub.batch_execute(&format!("ALTER SUBSCRIPTION {q} DISABLE"))
                    .await
                    .map_err(sql(format!("disable subscription {name}")))?;
            }
            if let Some(publ) = publisher {
                let sync_slots = publ
                    .query(
                        "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE $1",
                        &[&format!("pg\\_{oid}\\_sync\\_%")],
                    )
                    .await
                    .map_err(sql("look up initial-copy slots"))?;
                for row in sync_slots {
                    let s: String = row.get(0);
                    if drop_slot(publ, &s, Duration::from_secs(5)).await? {
                        report.dropped.push(format!("slot {s} on {pub_side}"));
                    }
                }
            }
            if has_slot {
                sub.batch_execute(&format!("ALTER SUBSCRIPTION {q} SET (slot_name = NONE)"))
                    .await
                    .map_err(sql(format!("detach the slot of subscription {name}")))?;
            }
            sub.batch_execute(&format!("DROP SUBSCRIPTION IF EXISTS {q}"))
                .await
                .map_err(sql(format!("drop subscription {name}")))?;
            report
                .dropped
                .push(format!("subscription {name} on {sub_side}"));
        }
    } else {
        report
            .skipped
            .push(format!("subscription {name} on {sub_side} (unreachable)"));
    }
    match publisher {
        Some(publ) => {
            if drop_slot(publ, slot, Duration::from_secs(5)).await? {
                report.dropped.push(format!("slot {slot} on {pub_side}"));
            }
        }
        None => report
            .skipped
            .push(format!("slot {slot} on {pub_side} (unreachable)")),
    }
    Ok(())
}

/// Drops publication `name` if it exists.
pub async fn drop_publication(client: &Client, name: &str) -> Result<bool, CleanupError> {
    writable_session(client)
        .await
        .map_err(sql("make the session writable"))?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(sql("look up the publication"))?
        .is_some();
    if exists {
        client
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
            .await
            .map_err(sql(format!("drop publication {name}")))?;
    }
    Ok(exists)
}

/// Drops the operator's bookkeeping schema if no frozen state is recorded in it any more.
pub async fn drop_state_schema_if_unused(client: &Client) -> Result<bool, CleanupError> {
    let has_table = client
        .query_one(
            "SELECT to_regclass(format('%I.freeze_state', $1::text)) IS NOT NULL,
                    EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&STATE_SCHEMA],
        )
        .await
        .map_err(sql("look up the state schema"))?;
    let (table, schema): (bool, bool) = (has_table.get(0), has_table.get(1));
    if !schema {
        return Ok(false);
    }
    if table {
        let rows: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {}.freeze_state",
                    quote_ident(STATE_SCHEMA)
                ),
                &[],
            )
            .await
            .map_err(sql("read the freeze state"))?
            .get(0);
        if rows > 0 {
            return Ok(false);
        }
    }
    writable_session(client)
        .await
        .map_err(sql("make the session writable"))?;
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(STATE_SCHEMA)
        ))
        .await
        .map_err(sql("drop the state schema"))?;
    Ok(true)
}

/// Removes every replication object of the cutover from both servers: forward and reverse
/// subscriptions with their slots, both publications, and the bookkeeping schema when nothing
/// is frozen. A server given as `None` is unreachable: what lives there is reported as skipped
/// (subscriptions on the other side are still dropped, their slots detached).
///
/// It does not unfreeze: see [`super::freeze::unfreeze`] (and [`abort`]).
pub async fn cleanup(
    blue: Option<&Client>,
    green: Option<&Client>,
    names: &Names,
) -> Result<CleanupReport, CleanupError> {
    let mut report = CleanupReport::default();
    drop_subscription(
        green,
        blue,
        &names.subscription,
        &names.slot,
        &mut report,
        ("green", "blue"),
    )
    .await?;
    drop_subscription(
        blue,
        green,
        &names.reverse_subscription,
        &names.reverse_slot,
        &mut report,
        ("blue", "green"),
    )
    .await?;
    match blue {
        Some(b) => {
            if drop_slot(b, &names.witness_slot, Duration::from_secs(5)).await? {
                report
                    .dropped
                    .push(format!("replication slot {} on blue", names.witness_slot));
            }
        }
        None => report.skipped.push(format!(
            "replication slot {} on blue (unreachable)",
            names.witness_slot
        )),
    }
    // Online verification's witnesses: one pair per pass, named by the prefix.
    for (client, prefix, side) in [
        (blue, &names.online_source_slot, "blue"),
        (green, &names.online_target_slot, "green"),
    ] {
        match client {
            Some(c) => {
                for slot in drop_slots_named(c, prefix, Duration::from_secs(5)).await? {
                    report
                        .dropped
                        .push(format!("replication slot {slot} on {side}"));
                }
            }
            None => report.skipped.push(format!(
                "replication slots {prefix}* on {side} (unreachable)"
            )),
        }
    }
    for (client, publication, side) in [
        (blue, &names.publication, "blue"),
        (green, &names.reverse_publication, "green"),
    ] {
        match client {
            Some(c) => {
                if drop_publication(c, publication).await? {
                    report
                        .dropped
                        .push(format!("publication {publication} on {side}"));
                }
            }
            None => report
                .skipped
                .push(format!("publication {publication} on {side} (unreachable)")),
        }
    }
    for (client, side) in [(blue, "blue"), (green, "green")] {
        if let Some(c) = client
            && drop_state_schema_if_unused(c).await?
        {
            report
                .dropped
                .push(format!("schema {STATE_SCHEMA} on {side}"));
        }
    }
    tracing::info!(dropped = ?report.dropped, skipped = ?report.skipped, "cleaned up replication objects");
    Ok(report)
}

/// Why an abort failed.
#[derive(Debug, Error)]
pub enum AbortError {
    /// Unfreezing failed.
    #[error("failed to unfreeze: {0}")]
    Unfreeze(#[from] super::freeze::FreezeError),
    /// Cleanup failed.
    #[error("failed to clean up: {0}")]
    Cleanup(#[from] CleanupError),
}

/// Aborts a cutover before the point of no return: unfreezes blue (a no-op if it was never
/// frozen) and removes every replication object from both servers. Blue is writable afterwards
/// and nothing of the cutover remains. Idempotent.
pub async fn abort(
    blue: &Client,
    green: Option<&Client>,
    names: &Names,
    cutover_id: &str,
) -> Result<CleanupReport, AbortError> {
    super::freeze::unfreeze(blue, cutover_id).await?;
    Ok(cleanup(Some(blue), green, names).await?)
}
