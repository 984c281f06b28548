//! The application roles at the switch: let them in on green (`LOGIN`, `CONNECT`) when the
//! switch points the application there, and say what cannot be fixed from here.

use thiserror::Error;
use tokio_postgres::Client;

use super::shared::db_message;
use super::{freeze, preflight, quote_ident};

/// Why the application roles cannot work on green.
#[derive(Debug, Error)]
pub enum RolesError {
    /// A statement failed.
    #[error("failed to {action}: {}", db_message(source))]
    Sql {
        /// What was being done.
        action: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The freeze record could not be read.
    #[error(transparent)]
    Freeze(#[from] freeze::FreezeError),
    /// Something the switch cannot fix.
    #[error("the application could not work on green: {}", .0.join("; "))]
    Blocked(Vec<String>),
    /// Granting did not take.
    #[error("the application roles still cannot work on green: {}", .0.join("; "))]
    StillBlocked(Vec<String>),
}

fn sql(action: &'static str) -> impl FnOnce(tokio_postgres::Error) -> RolesError {
    move |source| RolesError::Sql { action, source }
}

/// Lets the application roles log in on green: `LOGIN` for roles that are `NOLOGIN` there,
/// `CONNECT` on green's database for roles without it. What it cannot fix — a role missing on
/// green, a role held read-only there, or a role made `NOLOGIN` by the freeze of blue on the same
/// server (letting it log in would reopen blue) — stops the switch before the Secret moves.
/// Idempotent: a second run finds nothing to grant.
pub async fn allow_application(
    blue: &Client,
    green: &Client,
    roles: &[String],
) -> Result<(), RolesError> {
    let read = async || {
        preflight::application_access(green, roles)
            .await
            .map_err(sql("read the application roles on green"))
    };
    let access = read().await?;
    let mut blocking = access.blocking();
    for role in &access.no_login {
        if freeze::login_revoked_by_freeze(blue, role).await? {
            blocking.push(format!(
                "role {role} is kept from logging in by the freeze of blue, which shares green's \
                 server (use freeze.method ReadOnly when both databases are on one server)"
            ));
        }
    }
    if !blocking.is_empty() {
        return Err(RolesError::Blocked(blocking));
    }
    let grant = |statement: String| async move {
        green
            .batch_execute(&statement)
            .await
            .map_err(sql("let the application roles log in on green"))
    };
    for role in &access.no_login {
        grant(format!("ALTER ROLE {} LOGIN", quote_ident(role))).await?;
    }
    if !access.no_connect.is_empty() {
        let database: String = green
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(sql("read green's database name"))?
            .get(0);
        for role in &access.no_connect {
            grant(format!(
                "GRANT CONNECT ON DATABASE {} TO {}",
                quote_ident(&database),
                quote_ident(role)
            ))
            .await?;
        }
    }
    let after = read().await?;
    if !after.to_grant().is_empty() || !after.blocking().is_empty() {
        return Err(RolesError::StillBlocked(
            [after.blocking(), after.to_grant()].concat(),
        ));
    }
    Ok(())
}
