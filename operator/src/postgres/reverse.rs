//! Reverse replication green → blue, for rollback readiness after the switch.
//!
//! Started while blue is frozen and green has applied everything (after the final sync), i.e.
//! while both hold the same rows: the publication on green, a subscription on blue with
//! `copy_data = false` whose slot on green starts at green's current position, so every write
//! the application makes on green afterwards reaches blue.
//!
//! The forward subscription (blue → green) is dropped first: PostgreSQL 15 has no `origin =
//! none`, so with both directions live, rows applied on blue would be published back to green.
//! On rollback, sequences are copied green → blue with [`super::sync::copy_sequences`].

use tokio_postgres::Client;

use super::cleanup::{CleanupReport, drop_subscription};
use super::connect::Dsn;
use super::replication::{
    Lag, Names, ReplicationError, SubscriptionOptions, TableRef, ensure_publication_named,
    ensure_subscription_named, lag_of_slot,
};

/// Starts reverse replication: drops the forward subscription (and its slot on blue), creates
/// the publication on green for `tables` and the subscription on blue without copy.
/// `green_conninfo` is green as *blue* reaches it. Idempotent.
pub async fn start_reverse(
    blue: &Client,
    green: &Client,
    names: &Names,
    tables: &[TableRef],
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
        SubscriptionOptions { copy_data: false },
    )
    .await?;
    Ok(())
}

/// Lag of the reverse replication, measured on green.
pub async fn reverse_lag(green: &Client, names: &Names) -> Result<Lag, ReplicationError> {
    lag_of_slot(green, &names.reverse_slot).await
}
