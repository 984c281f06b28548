//! Replication slots: dropped only when nothing streams from them any more, because a slot
//! left behind holds WAL on the source until its disk fills.

use std::time::{Duration, Instant};

use thiserror::Error;
use tokio_postgres::Client;

use super::shared::{POLL, db_message};

/// Why a slot could not be dropped.
#[derive(Debug, Error)]
pub enum SlotError {
    /// A statement failed.
    #[error("failed to {action}: {}", db_message(source))]
    Sql {
        /// What was being done.
        action: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The slot stayed in use.
    #[error("failed to drop replication slot {slot}: still in use after {waited:?}")]
    Busy {
        /// The slot.
        slot: String,
        /// How long it was awaited.
        waited: Duration,
    },
}

fn sql(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SlotError {
    let action = action.into();
    move |source| SlotError::Sql { action, source }
}

/// Drops every replication slot whose name starts with `prefix` (each as [`drop_slot`] does);
/// returns the names dropped.
pub async fn drop_slots_named(
    client: &Client,
    prefix: &str,
    patience: Duration,
) -> Result<Vec<String>, SlotError> {
    let rows = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots
              WHERE left(slot_name::text, length($1)) = $1",
            &[&prefix],
        )
        .await
        .map_err(sql("list the replication slots"))?;
    let mut dropped = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        if drop_slot(client, &name, patience).await? {
            dropped.push(name);
        }
    }
    Ok(dropped)
}

/// Drops the replication slot `slot` if it exists. An active slot (a walsender still streams
/// from it) is waited for, and after `patience` its walsender is terminated.
pub async fn drop_slot(client: &Client, slot: &str, patience: Duration) -> Result<bool, SlotError> {
    let started = Instant::now();
    loop {
        let row = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(sql("look up the replication slot"))?;
        let Some(row) = row else { return Ok(false) };
        let active_pid: Option<i32> = row.get(0);
        match active_pid {
            None => {
                match client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                    .await
                {
                    Ok(_) => return Ok(true),
                    // Gone meanwhile, or became active meanwhile: look again.
                    Err(e)
                        if matches!(
                            e.code(),
                            Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT)
                                | Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                        ) => {}
                    Err(e) => return Err(sql(format!("drop replication slot {slot}"))(e)),
                }
            }
            Some(pid) if started.elapsed() >= patience => {
                client
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .map_err(sql("stop the walsender of the replication slot"))?;
                if started.elapsed() >= patience * 3 {
                    return Err(SlotError::Busy {
                        slot: slot.to_owned(),
                        waited: started.elapsed(),
                    });
                }
            }
            Some(_) => {}
        }
        tokio::time::sleep(POLL).await;
    }
}
