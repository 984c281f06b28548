//! Stopping writes on a database (blue, or green during a rollback) and undoing that exactly.
//!
//! Three methods (`spec.freeze.method`):
//! - `Strict` (the default): every writer of the database stops, not only the application
//!   roles. `ReadOnly`'s settings and, in the same transaction, a statement trigger on every
//!   replicated table (and every partition) refusing `INSERT`, `UPDATE`, `DELETE` and `TRUNCATE`
//!   with SQLSTATE `25006`; then every client session of the database that predates the freeze
//!   is ended (any role, after its transaction in flight, as below). Whatever the role — including
//!   `SET default_transaction_read_only = off`, `BEGIN READ WRITE`, roles not listed and
//!   superusers. Triggers do not fire in sessions with `session_replication_role = replica`:
//!   that is how logical replication's apply (reverse replication during hypercare) still
//!   writes, and also the one way a superuser can still write on purpose (so can one who drops
//!   the trigger) — the change witness reports such writes.
//! - `ReadOnly`: `default_transaction_read_only = on` for the database and for every
//!   application role *in that database* (`ALTER ROLE … IN DATABASE …`, the most specific
//!   level, so a role's own setting cannot override it and other databases of the cluster are
//!   untouched), then the application's sessions are ended. New sessions can connect and read;
//!   every write fails with `cannot execute … in a read-only transaction`.
//! - `RevokeLogin`: the application roles become `NOLOGIN`, their direct `CONNECT` grant on the
//!   database is revoked, and their sessions are ended. New sessions are refused at login.
//!   (A `CONNECT` that comes from `PUBLIC` is left alone; `NOLOGIN` already keeps them out.)
//!
//! Sessions opened before the freeze keep their old settings, so every application session
//! that started before the settings were committed is ended: idle ones at once, those inside a
//! transaction as soon as that transaction has ended (the client got its commit), and the rest
//! when the drain budget runs out. A session that already began its *next* transaction is ended
//! too: nothing of that one was acknowledged.
//!
//! **Prior state lives in the database, not in memory.** Before changing anything, `freeze`
//! records the settings it is about to change in the table `cutover.freeze_state` on the frozen
//! database (one row per cutover id, kind and object). `unfreeze` restores exactly those values
//! and deletes the rows in the same transaction, so both are idempotent and survive a crash of
//! the operator at any point: a repeated `freeze` keeps the first recorded (pre-freeze) values
//! (`ON CONFLICT DO NOTHING`); a repeated `unfreeze` finds no rows and does nothing. The schema
//! `cutover` is never published and is dropped by cleanup once no rows are left.

use std::time::{Duration, Instant};

use thiserror::Error;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::connect::{ConnectOptions, Dsn, connect};
use super::ident::{quote_ident, quote_literal};
use super::replication::TableName;
use super::shared::{STATE_SCHEMA, db_message, writable_session};
use crate::api::FreezeMethod;

/// What to freeze and how.
#[derive(Clone, Debug)]
pub struct FreezeConfig {
    /// The cutover id (the key of the recorded prior state).
    pub cutover_id: String,
    /// ReadOnly or RevokeLogin.
    pub method: FreezeMethod,
    /// The application roles whose writes stop and whose sessions end.
    pub roles: Vec<String>,
    /// How long transactions in flight may run before their sessions are ended.
    pub drain_timeout: Duration,
    /// The replicated tables (`Strict` puts its trigger on each, and on their partitions).
    pub tables: Vec<TableName>,
}

/// Why freezing, unfreezing or the proof failed.
#[derive(Debug, Error)]
pub enum FreezeError {
    /// A statement failed.
    #[error("failed to {action}: {}", db_message(source))]
    Sql {
        /// What was being done.
        action: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// An application role does not exist.
    #[error("failed to find application role {0}")]
    NoSuchRole(String),
    /// No freeze is recorded for this cutover.
    #[error("failed to find a recorded freeze of cutover {0} on this database")]
    NotFrozen(String),
    /// The proof found a way to write.
    #[error("failed to prove the freeze: {0}")]
    NotProven(String),
    /// Application sessions did not go away.
    #[error("failed to end the application's sessions within {waited:?}: {remaining} left")]
    SessionsRemain {
        /// How long it was tried.
        waited: Duration,
        /// How many were left.
        remaining: usize,
    },
    /// A write probe could connect and write.
    #[error("failed to stop writes: a write as {0} succeeded")]
    Writable(String),
    /// A write probe failed in a way that proves nothing.
    #[error("failed to probe writes as {who}: {message}")]
    ProbeInconclusive {
        /// The redacted connection.
        who: String,
        /// What happened.
        message: String,
    },
}

fn sql(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> FreezeError {
    let action = action.into();
    move |source| FreezeError::Sql { action, source }
}

/// What the freeze did.
#[derive(Clone, Debug, PartialEq)]
pub struct FreezeOutcome {
    /// When the settings were committed (the database's clock); sessions older than this were
    /// ended.
    pub frozen_at: jiff::Timestamp,
    /// Application sessions ended while idle.
    pub ended_idle: usize,
    /// Application sessions that were inside a transaction and finished it within the budget.
    pub drained: usize,
    /// Application sessions ended inside a transaction when the budget ran out.
    pub forced: usize,
    /// How long ending the sessions took.
    pub drain: Duration,
}

const STATE_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS cutover.freeze_state (
    cutover_id text NOT NULL,
    kind text NOT NULL,
    name text NOT NULL,
    prior text,
    frozen_at timestamptz,
    PRIMARY KEY (cutover_id, kind, name))";

/// Kinds of recorded state.
const DB_READ_ONLY: &str = "database-read-only";
const ROLE_READ_ONLY: &str = "role-read-only";
const ROLE_LOGIN: &str = "role-login";
const ROLE_CONNECT: &str = "role-connect";
const TABLE_TRIGGER: &str = "table-trigger";
const METHOD: &str = "method";

/// The trigger a `Strict` freeze puts on every replicated table, and the function it runs.
const TRIGGER: &str = "cutover_freeze";
const REFUSE_FUNCTION: &str = "cutover.refuse_write()";
const REFUSE_FUNCTION_DDL: &str = r#"CREATE OR REPLACE FUNCTION cutover.refuse_write() RETURNS trigger
LANGUAGE plpgsql AS $f$
BEGIN
  RAISE EXCEPTION 'cannot % % during a cutover: writes are frozen', TG_OP, TG_TABLE_NAME::regclass
    USING ERRCODE = 'read_only_sql_transaction',
          HINT = 'the database is being moved; write to the new one once the cutover has switched';
END
$f$"#;

fn method_name(m: FreezeMethod) -> &'static str {
    match m {
        FreezeMethod::Strict => "Strict",
        FreezeMethod::ReadOnly => "ReadOnly",
        FreezeMethod::RevokeLogin => "RevokeLogin",
    }
}

/// The replicated tables with every partition below them (a statement trigger on a
/// partitioned table does not fire for a statement on one of its partitions).
async fn tables_and_partitions(
    db: &Client,
    tables: &[TableName],
) -> Result<Vec<TableName>, FreezeError> {
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let rows = db
        .query(
            "SELECT DISTINCT n.nspname::text, c.relname::text
               FROM unnest($1::text[]) t(name),
                    LATERAL (SELECT t.name::regclass AS relid
                             UNION SELECT relid FROM pg_partition_tree(t.name::regclass)) p
               JOIN pg_class c ON c.oid = p.relid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p')
              ORDER BY 1, 2",
            &[&names],
        )
        .await
        .map_err(sql("list the replicated tables and their partitions"))?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Whether a freeze on this database (of any cutover) made `role` `NOLOGIN` and has not been
/// undone: when the target shares the source's server, the role is the same one, and letting
/// it log in would reopen the frozen source.
pub async fn login_revoked_by_freeze(db: &Client, role: &str) -> Result<bool, FreezeError> {
    let found = db
        .query_opt(
            "SELECT 1 FROM cutover.freeze_state WHERE kind = $1 AND name = $2",
            &[&ROLE_LOGIN, &role],
        )
        .await;
    match found {
        Ok(row) => Ok(row.is_some()),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(false),
        Err(source) => Err(FreezeError::Sql {
            action: "read the recorded freeze".into(),
            source,
        }),
    }
}

/// The value of `default_transaction_read_only` recorded at one level of `pg_db_role_setting`
/// (`role` 0 = the database level), or NULL.
const READ_ONLY_AT: &str = "(SELECT substring(c FROM '^default_transaction_read_only=(.*)$')
       FROM pg_db_role_setting s, unnest(s.setconfig) c
      WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND s.setrole = $1 AND c LIKE 'default\\_transaction\\_read\\_only=%')";

/// Stops writes of the application roles on this database. Idempotent; see the module docs.
pub async fn freeze(db: &Client, cfg: &FreezeConfig) -> Result<FreezeOutcome, FreezeError> {
    writable_session(db)
        .await
        .map_err(sql("make the session writable"))?;
    db.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {}; {STATE_TABLE_DDL}",
        quote_ident(STATE_SCHEMA)
    ))
    .await
    .map_err(sql("create the freeze state table"))?;
    let database: String = db
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(sql("read the database name"))?
        .get(0);
    let mut roles = Vec::new();
    for role in &cfg.roles {
        let row = db
            .query_opt(
                "SELECT oid, rolcanlogin,
                        EXISTS (SELECT 1 FROM pg_database d, aclexplode(d.datacl) a
                                 WHERE d.datname = current_database() AND a.grantee = r.oid
                                   AND a.privilege_type = 'CONNECT')
                   FROM pg_roles r WHERE rolname = $1",
                &[role],
            )
            .await
            .map_err(sql("look up an application role"))?
            .ok_or_else(|| FreezeError::NoSuchRole(role.clone()))?;
        roles.push((
            role.clone(),
            row.get::<_, u32>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2),
        ));
    }

    let strict_tables = if cfg.method == FreezeMethod::Strict {
        tables_and_partitions(db, &cfg.tables).await?
    } else {
        Vec::new()
    };

    // 1. Record what is there, once: a repeated freeze must not record its own frozen values.
    let record = "INSERT INTO cutover.freeze_state (cutover_id, kind, name, prior)
                  VALUES ($1, $2, $3, $4) ON CONFLICT (cutover_id, kind, name) DO NOTHING";
    let mut statements = Vec::new();
    db.batch_execute("BEGIN")
        .await
        .map_err(sql("begin recording the prior state"))?;
    let recorded: Result<(), FreezeError> = async {
        let method = method_name(cfg.method);
        db.execute(
            record,
            &[&cfg.cutover_id, &METHOD, &method, &None::<String>],
        )
        .await
        .map_err(sql("record the freeze method"))?;
        match cfg.method {
            FreezeMethod::ReadOnly | FreezeMethod::Strict => {
                let prior: Option<String> = db
                    .query_one(&format!("SELECT {READ_ONLY_AT}"), &[&0u32])
                    .await
                    .map_err(sql("read the database's settings"))?
                    .get(0);
                db.execute(record, &[&cfg.cutover_id, &DB_READ_ONLY, &database, &prior])
                    .await
                    .map_err(sql("record the database's setting"))?;
                statements.push(format!(
                    "ALTER DATABASE {} SET default_transaction_read_only = on",
                    quote_ident(&database)
                ));
                for (role, oid, _, _) in &roles {
                    let prior: Option<String> = db
                        .query_one(&format!("SELECT {READ_ONLY_AT}"), &[oid])
                        .await
                        .map_err(sql("read the role's settings"))?
                        .get(0);
                    db.execute(record, &[&cfg.cutover_id, &ROLE_READ_ONLY, role, &prior])
                        .await
                        .map_err(sql("record the role's setting"))?;
                    statements.push(format!(
                        "ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on",
                        quote_ident(role),
                        quote_ident(&database)
                    ));
                }
            }
            FreezeMethod::RevokeLogin => {}
        }
        if cfg.method == FreezeMethod::Strict {
            for table in &strict_tables {
                db.execute(
                    record,
                    &[
                        &cfg.cutover_id,
                        &TABLE_TRIGGER,
                        &table.quoted(),
                        &None::<String>,
                    ],
                )
                .await
                .map_err(sql("record a table's freeze trigger"))?;
            }
        }
        match cfg.method {
            FreezeMethod::ReadOnly | FreezeMethod::Strict => {}
            FreezeMethod::RevokeLogin => {
                for (role, _, can_login, has_connect) in &roles {
                    let login = Some(can_login.to_string());
                    db.execute(record, &[&cfg.cutover_id, &ROLE_LOGIN, role, &login])
                        .await
                        .map_err(sql("record the role's login"))?;
                    let connect = has_connect.then(|| "granted".to_owned());
                    db.execute(record, &[&cfg.cutover_id, &ROLE_CONNECT, role, &connect])
                        .await
                        .map_err(sql("record the role's CONNECT grant"))?;
                    statements.push(format!("ALTER ROLE {} NOLOGIN", quote_ident(role)));
                    statements.push(format!(
                        "REVOKE CONNECT ON DATABASE {} FROM {}",
                        quote_ident(&database),
                        quote_ident(role)
                    ));
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = recorded {
        let _ = db.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    db.batch_execute("COMMIT")
        .await
        .map_err(sql("commit the prior state"))?;

    // 2. Apply, atomically. Under `Strict` the triggers come in the same transaction: from
    //    its commit on, no session writes a replicated table, whatever its role or settings.
    //    Creating a trigger waits for the transactions in flight on that table (their writes
    //    commit before the freeze, and are replicated); one still running when the drain
    //    budget is spent is ended and the freeze tried again.
    if cfg.method == FreezeMethod::Strict {
        statements.push(REFUSE_FUNCTION_DDL.to_owned());
        for t in &strict_tables {
            statements.push(format!(
                "CREATE OR REPLACE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR \
                 TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {REFUSE_FUNCTION}",
                t.quoted()
            ));
        }
    }
    let mut apply = format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms';",
        cfg.drain_timeout.as_millis().max(100)
    );
    for s in &statements {
        apply.push_str(s);
        apply.push(';');
    }
    apply.push_str("COMMIT;");
    let applying = Instant::now();
    loop {
        match db.batch_execute(&apply).await {
            Ok(()) => break,
            Err(e)
                if matches!(
                    e.code(),
                    Some(&SqlState::LOCK_NOT_AVAILABLE | &SqlState::T_R_DEADLOCK_DETECTED)
                ) && applying.elapsed() < cfg.drain_timeout + Duration::from_secs(30) =>
            {
                let _ = db.batch_execute("ROLLBACK").await;
                end_lock_holders(db, &strict_tables).await?;
            }
            Err(e) => {
                let _ = db.batch_execute("ROLLBACK").await;
                return Err(sql("apply the freeze")(e));
            }
        }
    }
    let frozen_at: jiff::Timestamp = db
        .query_one(
            "UPDATE cutover.freeze_state SET frozen_at = clock_timestamp()
              WHERE cutover_id = $1 AND kind = $2 RETURNING frozen_at",
            &[&cfg.cutover_id, &METHOD],
        )
        .await
        .map_err(sql("record the freeze time"))?
        .get(0);

    // 3. End every application session that predates the settings (under `Strict`, every
    //    client session of the database, whatever its role: they reconnect read-only).
    let whose = match cfg.method {
        FreezeMethod::Strict => Sessions::All,
        _ => Sessions::Roles(&cfg.roles),
    };
    let drain = end_sessions(db, whose, Some(frozen_at), cfg.drain_timeout).await?;

    tracing::info!(
        cutover = %cfg.cutover_id,
        method = method_name(cfg.method),
        %frozen_at,
        ended_idle = drain.ended_idle,
        drained = drain.drained,
        forced = drain.forced,
        drain_ms = drain.took.as_millis() as u64,
        "froze writes"
    );
    Ok(FreezeOutcome {
        frozen_at,
        ended_idle: drain.ended_idle,
        drained: drain.drained,
        forced: drain.forced,
        drain: drain.took,
    })
}

/// Ends the sessions holding a lock on one of `tables` (transactions in flight past the drain
/// budget: nothing of theirs was acknowledged).
async fn end_lock_holders(db: &Client, tables: &[TableName]) -> Result<(), FreezeError> {
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    db.execute(
        "SELECT pg_terminate_backend(l.pid)
           FROM pg_locks l
          WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
            AND l.relation = ANY (SELECT n::regclass FROM unnest($1::text[]) n)",
        &[&names],
    )
    .await
    .map_err(sql("end a session holding a table the freeze needs"))?;
    Ok(())
}

/// Whose sessions to end.
#[derive(Clone, Copy)]
enum Sessions<'a> {
    /// The application roles'.
    Roles(&'a [String]),
    /// Every client session of the database but this one.
    All,
}

struct Drain {
    ended_idle: usize,
    drained: usize,
    forced: usize,
    took: Duration,
}

/// Ends the sessions of `roles` in this database that started before `before` (all when
/// `None`): idle ones at once, ones inside a transaction as soon as that transaction has ended
/// (committed or rolled back), and whatever is left when `budget` is spent.
async fn end_sessions(
    db: &Client,
    whose: Sessions<'_>,
    before: Option<jiff::Timestamp>,
    budget: Duration,
) -> Result<Drain, FreezeError> {
    let (roles, all): (&[String], bool) = match whose {
        Sessions::Roles(roles) => (roles, false),
        Sessions::All => (&[], true),
    };
    use std::collections::{HashMap, HashSet};
    let started = Instant::now();
    let mut drain = Drain {
        ended_idle: 0,
        drained: 0,
        forced: 0,
        took: Duration::ZERO,
    };
    // Sessions found inside a transaction, with that transaction's start: once it has ended
    // (the session is idle, gone, or in a *new* transaction the client has not been told is
    // committed) the session is ended at once — waiting for it to be idle again could take
    // forever under a steady load.
    let mut in_flight: HashMap<i32, Option<jiff::Timestamp>> = HashMap::new();
    let mut terminated: HashSet<i32> = HashSet::new();
    loop {
        let rows = db
            .query(
                "SELECT pid, state IS NOT DISTINCT FROM 'idle' AND backend_xid IS NULL, xact_start
                   FROM pg_stat_activity
                  WHERE datname = current_database() AND backend_type = 'client backend'
                    AND (usename = ANY($1) OR $3)
                    AND pid <> pg_backend_pid()
                    AND ($2::timestamptz IS NULL OR backend_start < $2)",
                &[&roles, &before, &all],
            )
            .await
            .map_err(sql("list the application's sessions"))?;
        // Sessions that were in a transaction and have since gone on their own: drained.
        in_flight.retain(|pid, _| {
            let present = rows.iter().any(|r| r.get::<_, i32>(0) == *pid);
            if !present && !terminated.contains(pid) {
                drain.drained += 1;
            }
            present
        });
        if rows.is_empty() {
            drain.took = started.elapsed();
            return Ok(drain);
        }
        let out_of_budget = started.elapsed() >= budget;
        for row in &rows {
            let pid: i32 = row.get(0);
            let idle: bool = row.get(1);
            let xact_start: Option<jiff::Timestamp> = row.get(2);
            let first_sight = !in_flight.contains_key(&pid) && !terminated.contains(&pid);
            let finished = match in_flight.get(&pid) {
                Some(waited_for) => idle || xact_start != *waited_for,
                None => idle,
            };
            if !(finished || out_of_budget) {
                if first_sight {
                    in_flight.insert(pid, xact_start);
                }
                continue;
            }
            if terminated.insert(pid) {
                if finished && in_flight.contains_key(&pid) {
                    drain.drained += 1;
                } else if finished {
                    drain.ended_idle += 1;
                } else {
                    drain.forced += 1;
                }
            }
            db.execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(sql("end an application session"))?;
        }
        if out_of_budget && started.elapsed() >= budget + Duration::from_secs(30) {
            return Err(FreezeError::SessionsRemain {
                waited: started.elapsed(),
                remaining: rows.len(),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What unfreezing restored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnfreezeOutcome {
    /// Settings restored (0: nothing was frozen).
    pub restored: usize,
    /// Application sessions ended because they connected during the freeze and would stay
    /// read-only.
    pub ended_sessions: usize,
}

/// Restores exactly what the freeze of `cutover_id` changed on this database, from the state
/// recorded there. Idempotent: without recorded state it does nothing.
pub async fn unfreeze(db: &Client, cutover_id: &str) -> Result<UnfreezeOutcome, FreezeError> {
    writable_session(db)
        .await
        .map_err(sql("make the session writable"))?;
    let rows = match db
        .query(
            "SELECT kind, name, prior FROM cutover.freeze_state WHERE cutover_id = $1
              ORDER BY kind, name",
            &[&cutover_id],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(Default::default()),
        Err(e) if e.code() == Some(&SqlState::INVALID_SCHEMA_NAME) => {
            return Ok(Default::default());
        }
        Err(e) => return Err(sql("read the freeze state")(e)),
    };
    if rows.is_empty() {
        return Ok(Default::default());
    }
    let database: String = db
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(sql("read the database name"))?
        .get(0);
    let db_q = quote_ident(&database);
    let mut script = String::from("BEGIN;");
    let mut roles = Vec::new();
    let mut drop_function = false;
    let restore_setting = |target: String, prior: Option<&str>| match prior {
        None => format!("ALTER {target} RESET default_transaction_read_only;"),
        Some(v) => format!(
            "ALTER {target} SET default_transaction_read_only = {};",
            quote_literal(v)
        ),
    };
    for row in &rows {
        let kind: &str = row.get(0);
        let name: &str = row.get(1);
        let prior: Option<&str> = row.get(2);
        match kind {
            DB_READ_ONLY => script.push_str(&restore_setting(format!("DATABASE {db_q}"), prior)),
            ROLE_READ_ONLY => {
                roles.push(name.to_owned());
                script.push_str(&restore_setting(
                    format!("ROLE {} IN DATABASE {db_q}", quote_ident(name)),
                    prior,
                ));
            }
            ROLE_LOGIN => {
                roles.push(name.to_owned());
                if prior == Some("true") {
                    script.push_str(&format!("ALTER ROLE {} LOGIN;", quote_ident(name)));
                }
            }
            TABLE_TRIGGER => {
                // The table may be gone since: drop the trigger only where it still is.
                script.push_str(&format!(
                    "DO $d$ BEGIN IF to_regclass({lit}) IS NOT NULL THEN \
                     DROP TRIGGER IF EXISTS {TRIGGER} ON {name}; END IF; END $d$;",
                    lit = quote_literal(name)
                ));
                drop_function = true;
            }
            ROLE_CONNECT if prior.is_some() => {
                script.push_str(&format!(
                    "GRANT CONNECT ON DATABASE {db_q} TO {};",
                    quote_ident(name)
                ));
            }
            _ => {}
        }
    }
    if drop_function {
        // Only when no other cutover's freeze on this database still uses it.
        script.push_str(&format!(
            "DO $d$ BEGIN IF NOT EXISTS (SELECT 1 FROM cutover.freeze_state \
             WHERE kind = {kind} AND cutover_id <> {id}) THEN \
             DROP FUNCTION IF EXISTS {REFUSE_FUNCTION}; END IF; END $d$;",
            kind = quote_literal(TABLE_TRIGGER),
            id = quote_literal(cutover_id)
        ));
    }
    script.push_str(&format!(
        "DELETE FROM cutover.freeze_state WHERE cutover_id = {};COMMIT;",
        quote_literal(cutover_id)
    ));
    if let Err(e) = db.batch_execute(&script).await {
        let _ = db.batch_execute("ROLLBACK").await;
        return Err(sql("restore the settings from before the freeze")(e));
    }
    roles.sort();
    roles.dedup();
    // Sessions that connected during a ReadOnly freeze carry `default_transaction_read_only =
    // on` for their whole life: end them so the application reconnects writable.
    let drain = end_sessions(db, Sessions::Roles(&roles), None, Duration::ZERO).await?;
    tracing::info!(
        cutover = %cutover_id,
        restored = rows.len().saturating_sub(1),
        "unfroze writes, restoring the recorded settings"
    );
    Ok(UnfreezeOutcome {
        restored: rows.len().saturating_sub(1),
        ended_sessions: drain.ended_idle + drain.forced + drain.drained,
    })
}

/// Whether a freeze of `cutover_id` is recorded on this database.
pub async fn is_frozen(db: &Client, cutover_id: &str) -> Result<bool, FreezeError> {
    match db
        .query_opt(
            "SELECT 1 FROM cutover.freeze_state WHERE cutover_id = $1 AND kind = $2",
            &[&cutover_id, &METHOD],
        )
        .await
    {
        Ok(row) => Ok(row.is_some()),
        Err(e)
            if matches!(
                e.code(),
                Some(&SqlState::UNDEFINED_TABLE) | Some(&SqlState::INVALID_SCHEMA_NAME)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(sql("read the freeze state")(e)),
    }
}

/// What the proof of a freeze saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrozenProof {
    /// The method recorded.
    pub method: String,
    /// Application sessions that connected since the freeze (read-only under `ReadOnly`).
    pub sessions_since_freeze: usize,
}

/// Proves from the catalogs that the freeze holds: the recorded settings are in force for every
/// application role (effective `default_transaction_read_only` is on in this database, or the
/// role cannot log in), no application session from before the freeze is left, and no
/// application session holds a transaction id (a writing transaction).
pub async fn assert_frozen(db: &Client, cutover_id: &str) -> Result<FrozenProof, FreezeError> {
    if !is_frozen(db, cutover_id).await? {
        return Err(FreezeError::NotFrozen(cutover_id.to_owned()));
    }
    let rows = db
        .query(
            "SELECT kind, name, frozen_at FROM cutover.freeze_state WHERE cutover_id = $1",
            &[&cutover_id],
        )
        .await
        .map_err(sql("read the freeze state"))?;
    let mut method = String::new();
    let mut frozen_at: Option<jiff::Timestamp> = None;
    let mut roles = Vec::new();
    let mut problems = Vec::new();
    for row in &rows {
        let kind: &str = row.get(0);
        let name: String = row.get(1);
        match kind {
            METHOD => {
                method = name;
                frozen_at = row.get(2);
            }
            ROLE_READ_ONLY => {
                let effective: Option<String> = db
                    .query_one(
                        &format!(
                            "SELECT coalesce({READ_ONLY_AT}, (SELECT {}))",
                            READ_ONLY_AT.replace("$1", "0")
                        ),
                        &[&db
                            .query_one("SELECT oid FROM pg_roles WHERE rolname = $1", &[&name])
                            .await
                            .map_err(sql("look up an application role"))?
                            .get::<_, u32>(0)],
                    )
                    .await
                    .map_err(sql("read the effective setting"))?
                    .get(0);
                if !matches!(effective.as_deref(), Some("on" | "true" | "1" | "yes")) {
                    problems.push(format!(
                        "role {name}: default_transaction_read_only is {}",
                        effective.as_deref().unwrap_or("not set")
                    ));
                }
                roles.push(name);
            }
            TABLE_TRIGGER => {
                let enabled: Option<String> = db
                    .query_opt(
                        "SELECT tgenabled::text FROM pg_trigger
                          WHERE tgrelid = to_regclass($1) AND tgname = $2",
                        &[&name, &TRIGGER],
                    )
                    .await
                    .map_err(sql("look up a freeze trigger"))?
                    .map(|r| r.get(0));
                if enabled.as_deref() != Some("O") {
                    problems.push(format!(
                        "table {name}: the freeze trigger is {}",
                        if enabled.is_some() {
                            "disabled"
                        } else {
                            "missing"
                        }
                    ));
                }
            }
            ROLE_LOGIN => {
                let can_login: bool = db
                    .query_one(
                        "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
                        &[&name],
                    )
                    .await
                    .map_err(sql("look up an application role"))?
                    .get(0);
                if can_login {
                    problems.push(format!("role {name} can log in"));
                }
                roles.push(name);
            }
            _ => {}
        }
    }
    let sessions = db
        .query(
            "SELECT pid, usename::text, backend_start < $2 AS old, backend_xid IS NOT NULL AS writing
               FROM pg_stat_activity
              WHERE datname = current_database() AND usename = ANY($1)",
            &[&roles, &frozen_at],
        )
        .await
        .map_err(sql("list the application's sessions"))?;
    let mut since = 0;
    for s in &sessions {
        let pid: i32 = s.get(0);
        let user: &str = s.get(1);
        let old: Option<bool> = s.get(2);
        let writing: bool = s.get(3);
        if old == Some(true) {
            problems.push(format!("session {pid} of {user} predates the freeze"));
        } else {
            since += 1;
        }
        if writing {
            problems.push(format!(
                "session {pid} of {user} is in a writing transaction"
            ));
        }
    }
    if problems.is_empty() {
        Ok(FrozenProof {
            method,
            sessions_since_freeze: since,
        })
    } else {
        Err(FreezeError::NotProven(problems.join("; ")))
    }
}

/// Tries to write as the application would: connects with `dsn` (an application role's own
/// connection string) and runs `UPDATE table SET col = col WHERE false` (which changes
/// nothing but is refused in a read-only transaction; the role needs UPDATE on `table`). Returns the refusal when the freeze holds —
/// login refused, or the write refused as read-only — and an error when the write went through
/// or failed for another reason.
pub async fn probe_write(dsn: &Dsn, table: &TableName) -> Result<String, FreezeError> {
    let who = dsn.redacted();
    let opts = ConnectOptions {
        application_name: "cutover-freeze-probe".into(),
        ..ConnectOptions::default()
    };
    let client = match connect(dsn, &opts).await {
        Ok(c) => c,
        Err(super::connect::ConnectError::Connect { source, .. }) => {
            return match source.as_db_error() {
                Some(db)
                    if matches!(
                        db.code(),
                        &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                            | &SqlState::INSUFFICIENT_PRIVILEGE
                    ) =>
                {
                    Ok(db.message().to_owned())
                }
                _ => Err(FreezeError::ProbeInconclusive {
                    who,
                    message: db_message(&source),
                }),
            };
        }
        Err(e) => {
            return Err(FreezeError::ProbeInconclusive {
                who,
                message: e.to_string(),
            });
        }
    };
    let column: String = match client
        .query_one(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
                AND attgenerated = '' ORDER BY attnum LIMIT 1",
            &[&table.quoted()],
        )
        .await
    {
        Ok(row) => row.get(0),
        Err(e) => {
            return Err(FreezeError::ProbeInconclusive {
                who,
                message: db_message(&e),
            });
        }
    };
    let column = quote_ident(&column);
    match client
        .batch_execute(&format!(
            "UPDATE {} SET {column} = {column} WHERE false",
            table.quoted()
        ))
        .await
    {
        Ok(()) => Err(FreezeError::Writable(who)),
        Err(e) if e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) => Ok(e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_owned())),
        Err(e) => Err(FreezeError::ProbeInconclusive {
            who,
            message: db_message(&e),
        }),
    }
}
