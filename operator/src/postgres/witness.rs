//! The change witness on the source: proof, not hope, that nothing but the cutover wrote to
//! blue after the freeze.
//!
//! A dedicated logical replication slot (`test_decoding`, available on every PostgreSQL and on
//! the managed services) is created on blue right after the freeze and before the sync point is
//! read, so every transaction that commits after the sync point is decoded. It is read over
//! plain SQL with `pg_logical_slot_peek_changes` and the options `include-xids`,
//! `skip-empty-xacts` and `only-local`: changes that carry a replication origin — reverse
//! replication's apply during hypercare — are left out, and so are the operator's own rows in
//! its `cutover` schema. What is left, committed after the sync point, is a write the target
//! would miss: before the point of no return it aborts the cutover, after the switch it is
//! reported. The slot is advanced past what was counted (the count lives in the status), so it
//! holds WAL only since the last look, and it is dropped with every other replication object.

use std::collections::HashMap;

use thiserror::Error;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use super::shared::{STATE_SCHEMA, db_message};

/// Why the witness could not be created or read.
#[derive(Debug, Error)]
#[error("failed to {action}: {}", db_message(source))]
pub struct WitnessError {
    /// What was being done.
    pub action: &'static str,
    /// The driver's error.
    #[source]
    pub source: tokio_postgres::Error,
}

fn sql(action: &'static str) -> impl FnOnce(tokio_postgres::Error) -> WitnessError {
    move |source| WitnessError { action, source }
}

/// How many changes are kept as examples for people.
pub const SAMPLES: usize = 10;

/// Creates the witness slot if it does not exist (idempotent).
pub async fn ensure(db: &Client, slot: &str) -> Result<(), WitnessError> {
    db.execute(
        "SELECT pg_create_logical_replication_slot($1, 'test_decoding')
          WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
        &[&slot],
    )
    .await
    .map_err(sql("create the change witness slot"))?;
    Ok(())
}

/// What one look at the witness found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Changes committed after the sync point by anyone but the cutover, since the last look.
    pub writes: u64,
    /// Some of them, for people: `public.accounts UPDATE id[integer]:5 …`.
    pub samples: Vec<String>,
    /// Everything up to here was looked at (advance the slot to it once recorded).
    pub upto: Option<PgLsn>,
    /// The slot is gone or its WAL was removed: nothing can be proven any more.
    pub lost: bool,
}

/// Looks at what the source committed after `after` (the sync point), from where the slot was
/// last advanced up to the current WAL position, without consuming it.
pub async fn look(db: &Client, slot: &str, after: PgLsn) -> Result<Seen, WitnessError> {
    let state = db
        .query_opt(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("look up the change witness slot"))?;
    match state {
        None => {
            return Ok(Seen {
                lost: true,
                ..Seen::default()
            });
        }
        Some(row) if row.get::<_, String>(0) == "lost" => {
            return Ok(Seen {
                lost: true,
                ..Seen::default()
            });
        }
        Some(_) => {}
    }
    let upto: PgLsn = db
        .query_one("SELECT pg_current_wal_lsn()", &[])
        .await
        .map_err(sql("read the WAL position"))?
        .get(0);
    let rows = db
        .query(
            "SELECT lsn, data FROM pg_logical_slot_peek_changes($1, $2, NULL,
                    'include-xids', '1', 'skip-empty-xacts', '1', 'only-local', '1')",
            &[&slot, &upto],
        )
        .await
        .map_err(sql("read the change witness"))?;
    let lines: Vec<(PgLsn, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut seen = count(&lines, after);
    seen.upto = Some(upto);
    Ok(seen)
}

/// Counts the changes of transactions that committed after `after`, leaving out the
/// operator's own state table. `lines` are `test_decoding`'s output with `include-xids`.
fn count(lines: &[(PgLsn, String)], after: PgLsn) -> Seen {
    let own = format!("table {STATE_SCHEMA}.");
    let mut open: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen = Seen::default();
    let mut current: Option<String> = None;
    for (lsn, data) in lines {
        if let Some(xid) = data.strip_prefix("BEGIN ") {
            current = Some(xid.to_owned());
            open.entry(xid.to_owned()).or_default();
        } else if let Some(xid) = data.strip_prefix("COMMIT ") {
            let changes = open.remove(xid).unwrap_or_default();
            if *lsn > after {
                seen.writes += changes.len() as u64;
                for c in changes {
                    if seen.samples.len() < SAMPLES {
                        seen.samples.push(c);
                    }
                }
            }
            current = None;
        } else if let Some(change) = data.strip_prefix("table ") {
            if data.starts_with(&own) {
                continue;
            }
            if let Some(xid) = &current {
                let short: String = change.replacen(": ", " ", 2).chars().take(200).collect();
                open.entry(xid.clone()).or_default().push(short);
            }
        }
    }
    seen
}

/// Moves the slot past `to`, once what was seen up to there is recorded, so it holds no WAL
/// from before. Idempotent: a position already passed is left alone.
pub async fn advance(db: &Client, slot: &str, to: PgLsn) -> Result<(), WitnessError> {
    db.execute(
        "SELECT pg_replication_slot_advance(slot_name, $2)
           FROM pg_replication_slots
          WHERE slot_name = $1 AND confirmed_flush_lsn < $2",
        &[&slot, &to],
    )
    .await
    .map_err(sql("advance the change witness slot"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(n: u64) -> PgLsn {
        PgLsn::from(n)
    }

    #[test]
    fn counts_only_foreign_changes_committed_after_the_sync_point() {
        let lines = [
            (lsn(10), "BEGIN 700"),
            (
                lsn(11),
                "table public.accounts: UPDATE: id[integer]:1 balance[bigint]:5",
            ),
            (lsn(12), "COMMIT 700"),
            (lsn(20), "BEGIN 701"),
            (
                lsn(21),
                "table cutover.freeze_state: INSERT: cutover_id[text]:'x'",
            ),
            (lsn(22), "COMMIT 701"),
            (lsn(30), "BEGIN 702"),
            (
                lsn(31),
                "table public.ledger: INSERT: id[bigint]:9 client[integer]:1",
            ),
            (lsn(32), "table public.accounts: DELETE: id[integer]:2"),
            (lsn(33), "COMMIT 702"),
        ]
        .map(|(l, d)| (l, d.to_owned()));
        // The sync point was at 15: transaction 700 committed before it (replicated), 701 is the
        // operator's own bookkeeping, 702 is a write green would miss.
        let seen = count(&lines, lsn(15));
        assert_eq!(seen.writes, 2);
        assert_eq!(
            seen.samples,
            [
                "public.ledger INSERT id[bigint]:9 client[integer]:1",
                "public.accounts DELETE id[integer]:2"
            ]
        );
        assert_eq!(count(&lines, lsn(40)).writes, 0);
    }
}
