//! Reverse replication green → blue, for rollback readiness after the switch.
//!
//! Started while blue is frozen and green has applied everything (after the final sync), i.e.
//! while both hold the same rows: the publication on green, a subscription on blue with
//! `copy_data = false` whose slot on green starts at green's current position, so every write
//! the application makes on green afterwards reaches blue.
//!
//! The forward subscription (blue → green) is dropped first: PostgreSQL 15 has no `origin =
//! none`, so with both directions live, rows applied on blue would be published back to green.
//! On rollback, [`final_sync_back`] waits until blue has everything green had when green was
//! frozen and copies the sequences green → blue.

use std::time::Instant;

use tokio_postgres::Client;

use super::cleanup::{CleanupReport, drop_subscription};
use super::connect::Dsn;
use super::replication::{
    Lag, Names, ReplicationError, SubscriptionOptions, TableName, ensure_publication_named,
    ensure_subscription_named, lag_of_slot, sync_point, wait_applied_named,
};
use super::sync::{FinalSync, SyncError, copy_sequences};

/// Starts reverse replication: drops the forward subscription (and its slot on blue), creates
/// the publication on green for `tables` and the subscription on blue without copy.
/// `green_conninfo` is green as *blue* reaches it. Idempotent.
pub async fn start_reverse(
    blue: &Client,
    green: &Client,
    names: &Names,
    tables: &[TableName],
    green_conninfo: &Dsn,
) -> Result<(), ReplicationError> {
    let mut report = CleanupReport::default();
    drop_subscription(
        Some(green),
        Some(blue),
        &names.subscription,
        &names.slot,
        &mut report,
        ("green", "blue"),
    )
    .await
    .map_err(|e| ReplicationError::Broken(e.to_string()))?;
    ensure_publication_named(green, &names.reverse_publication, tables).await?;
    ensure_subscription_named(
        green,
        blue,
        &names.reverse_subscription,
        &names.reverse_publication,
        &names.reverse_slot,
        green_conninfo,
        SubscriptionOptions {
            copy_data: false,
            create_slot: true,
        },
    )
    .await?;
    Ok(())
}

/// Lag of the reverse replication, measured on green.
pub async fn reverse_lag(green: &Client, names: &Names) -> Result<Lag, ReplicationError> {
    lag_of_slot(green, &names.reverse_slot).await
}

/// The rollback's final sync, green → blue, once green is frozen
/// ([`super::freeze::freeze`] on green): a sync point on green, wait until blue has applied past
/// it, then copy every sequence green → blue. Afterwards blue holds everything the application
/// wrote on green and can be unfrozen and switched back to. Repeatable.
pub async fn final_sync_back(
    green: &Client,
    blue: &Client,
    names: &Names,
    deadline: Instant,
) -> Result<FinalSync, SyncError> {
    let freeze_lsn = sync_point(green).await?;
    let started = Instant::now();
    let applied_lsn = wait_applied_named(
        green,
        blue,
        &names.reverse_subscription,
        &names.reverse_slot,
        freeze_lsn,
        deadline,
    )
    .await?;
    let wait = started.elapsed();
    let started = Instant::now();
    let sequences = copy_sequences(green, blue).await?.len();
    Ok(FinalSync {
        freeze_lsn,
        applied_lsn,
        sequences,
        wait,
        sequence_copy: started.elapsed(),
    })
}
