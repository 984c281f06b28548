//! Preflight: read-only checks of both databases before anything is changed, one
//! [`CheckResult`] per check (pass / warn / fail with a reason a DBA understands).
//!
//! A check that cannot run (a query fails, for example for lack of privileges) is itself a
//! `Fail` naming what could not be read. Nothing here writes to either database.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use tokio_postgres::Client;

use super::replication::{TableName, TableSelection, resolve_tables};
use super::shared::db_message;
use crate::api::{CheckOutcome, CheckResult, ServerVersions};

/// What preflight checks against.
#[derive(Clone, Debug)]
pub struct PreflightOptions {
    /// The tables to replicate.
    pub tables: TableSelection,
    /// Whether reverse replication (green → blue) will be started: green then needs
    /// `wal_level = logical`, a free slot, and blue must accept a subscription.
    pub reverse: bool,
    /// Transactions on blue open longer than this are reported (they delay creating the slot).
    pub long_transaction: Duration,
    /// Application roles (checked to exist on blue).
    pub application_roles: Vec<String>,
    /// Migrations run on green after preflight and before replication: green's tables may not
    /// match blue yet, so a schema difference is a warning here and is checked again by
    /// [`schema_ready`] before replication starts.
    pub migrations_first: bool,
    /// Online verification will run (`verification.mode: Online`): a witness slot on each
    /// side, `wal_level = logical` on green, and the tables it cannot follow by key are named.
    pub online_verification: bool,
    /// `replication.largeObjects`: unset, blue's large objects fail preflight.
    pub large_objects: Option<crate::api::LargeObjects>,
}

impl Default for PreflightOptions {
    fn default() -> Self {
        Self {
            tables: TableSelection::All,
            reverse: false,
            long_transaction: Duration::from_secs(60),
            application_roles: Vec::new(),
            migrations_first: false,
            online_verification: false,
            large_objects: None,
        }
    }
}

fn check(name: &str, outcome: CheckOutcome, message: impl Into<String>) -> CheckResult {
    CheckResult {
        name: name.to_owned(),
        outcome,
        message: message.into(),
    }
}

fn pass(name: &str, message: impl Into<String>) -> CheckResult {
    check(name, CheckOutcome::Pass, message)
}

fn warn(name: &str, message: impl Into<String>) -> CheckResult {
    check(name, CheckOutcome::Warn, message)
}

fn fail(name: &str, message: impl Into<String>) -> CheckResult {
    check(name, CheckOutcome::Fail, message)
}

fn unreadable(name: &str, what: &str, e: &tokio_postgres::Error) -> CheckResult {
    fail(name, format!("failed to read {what}: {}", db_message(e)))
}

/// Runs every check. The tables are resolved on blue; if that fails, the table checks fail.
pub async fn preflight(blue: &Client, green: &Client, opts: &PreflightOptions) -> Vec<CheckResult> {
    run(blue, green, opts).await.0
}

/// [`preflight`], with both sides' versions as it read them (when it could).
pub async fn run(
    blue: &Client,
    green: &Client,
    opts: &PreflightOptions,
) -> (Vec<CheckResult>, Option<ServerVersions>) {
    let read = server_versions(blue, green).await;
    let versions = read.as_ref().ok().cloned();
    (checks(blue, green, opts, read).await, versions)
}

async fn checks(
    blue: &Client,
    green: &Client,
    opts: &PreflightOptions,
    versions: Result<ServerVersions, tokio_postgres::Error>,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    out.push(versions_check(versions));
    out.push(wal_level(blue, "wal-level-blue", "blue").await);
    if opts.reverse {
        out.push(wal_level(green, "wal-level-green", "green (for reverse replication)").await);
    } else if opts.online_verification {
        // Without it, online verification cannot watch green: the freeze hashes every row.
        let mut level =
            wal_level(green, "wal-level-green", "green (for online verification)").await;
        if level.outcome == CheckOutcome::Fail {
            level.outcome = CheckOutcome::Warn;
            level.message = format!(
                "{}; without it verification runs inside the freeze (every row hashed there)",
                level.message
            );
        }
        out.push(level);
    }
    // Blue holds the subscription's slot, from the freeze on the change witness's, and during
    // Replicating online verification's witness; green online verification's and reverse
    // replication's.
    let online = i32::from(opts.online_verification);
    out.push(slots(blue, "replication-slots-blue", "blue", 2 + online).await);
    if opts.reverse || opts.online_verification {
        out.push(
            slots(
                green,
                "replication-slots-green",
                "green",
                i32::from(opts.reverse) + online,
            )
            .await,
        );
    }
    out.push(workers(green).await);
    out.push(privileges_blue(blue).await);
    out.push(privileges_green(green).await);
    if opts.reverse {
        out.push(privileges_reverse(blue).await);
    }
    out.push(roles(blue, &opts.application_roles).await);
    if !opts.application_roles.is_empty() {
        out.push(roles_on_green(green, &opts.application_roles).await);
    }
    let tables = match resolve_tables(blue, &opts.tables).await {
        Ok(t) if t.is_empty() => {
            out.push(fail("tables", "no table to replicate on blue"));
            Vec::new()
        }
        Ok(t) => {
            out.push(pass("tables", format!("{} tables to replicate", t.len())));
            t
        }
        Err(e) => {
            out.push(fail("tables", e.to_string()));
            Vec::new()
        }
    };
    if !tables.is_empty() {
        out.push(ownership(blue, &tables).await);
        out.push(replica_identity(blue, &tables).await);
        let mut schema = schema_match(blue, green, &tables).await;
        if opts.migrations_first && schema.outcome == CheckOutcome::Fail {
            schema.outcome = CheckOutcome::Warn;
            schema.message = format!(
                "green does not match yet; the migrations run first and must bring it in line \
                 (checked again before replication starts): {}",
                schema.message
            );
        }
        out.push(schema);
        let mut sequences = sequences_match(blue, green).await;
        if opts.migrations_first && sequences.outcome == CheckOutcome::Fail {
            sequences.outcome = CheckOutcome::Warn;
            sequences.message = format!(
                "green lacks them yet; the migrations run first and must create them: {}",
                sequences.message
            );
        }
        out.push(sequences);
        out.push(target_empty(green, &tables).await);
        out.push(definitions(blue, green, &tables).await);
        let mut extensions = extensions(blue, green, &tables).await;
        if opts.migrations_first && extensions.outcome == CheckOutcome::Fail {
            extensions.outcome = CheckOutcome::Warn;
            extensions.message = format!(
                "green lacks them yet; the migrations run first and must create them: {}",
                extensions.message
            );
        }
        out.push(extensions);
        out.extend(special_objects(blue, &tables).await);
        out.push(large_objects(blue, green, opts.large_objects).await);
        if opts.online_verification {
            out.push(hashed_in_freeze(blue, &tables).await);
        }
    }
    out.push(long_transactions(blue, opts.long_transaction).await);
    out.push(slot_wal_limit(blue).await);
    out
}

/// The oldest and newest major versions this release supports on either side.
pub const SUPPORTED_MAJORS: (i32, i32) = (13, 18);
/// The version pairs (source, target) this release's test suite runs end to end.
pub const TESTED_PAIRS: &[(i32, i32)] = &[(15, 15), (15, 18), (18, 18)];

/// Both sides' versions (`server_version` and its number).
pub async fn server_versions(
    blue: &Client,
    green: &Client,
) -> Result<ServerVersions, tokio_postgres::Error> {
    let q = "SELECT current_setting('server_version_num')::int, current_setting('server_version')";
    let b = blue.query_one(q, &[]).await?;
    let g = green.query_one(q, &[]).await?;
    let (bn, gn): (i32, i32) = (b.get(0), g.get(0));
    // `server_version` may carry the packager's suffix: "15.14 (Debian 15.14-0+deb12u1)".
    let short = |v: String| v.split_whitespace().next().unwrap_or_default().to_owned();
    Ok(ServerVersions {
        blue: short(b.get(1)),
        green: short(g.get(1)),
        blue_major: bn / 10_000,
        green_major: gn / 10_000,
        major_upgrade: gn / 10_000 > bn / 10_000,
    })
}

/// Whether a cutover from `v.blue` to `v.green` is supported, and what it means.
pub fn judge_versions(v: &ServerVersions) -> (CheckOutcome, String) {
    let (b, g) = (v.blue_major, v.green_major);
    let (oldest, newest) = SUPPORTED_MAJORS;
    let text = format!("blue {}, green {}", v.blue, v.green);
    let unsupported = |m: i32| m < oldest || m > newest;
    if unsupported(b) || unsupported(g) {
        let which = [("blue", b), ("green", g)]
            .into_iter()
            .filter(|&(_, m)| unsupported(m))
            .map(|(side, m)| format!("{side} runs PostgreSQL {m}"))
            .collect::<Vec<_>>()
            .join(" and ");
        return (
            CheckOutcome::Fail,
            format!(
                "{text}: {which}; this release supports PostgreSQL {oldest} to {newest} on both \
                 sides (13 publishes partitioned tables through their root; catalogs and \
                 statistics views newer than {newest} are unknown to it)"
            ),
        );
    }
    if g < b {
        return (
            CheckOutcome::Fail,
            format!(
                "{text}: a downgrade ({b} → {g}) is not supported: an older major may lack types, \
                 functions and syntax the newer one's schema and data use, and the verification \
                 compares output that changed between majors. Move back to an older major only \
                 through a rollback during hypercare (reverse replication of a cutover that \
                 upgraded)"
            ),
        );
    }
    let mut what = if g > b {
        format!(
            "{text}: a major upgrade ({b} → {g}); a rollback during hypercare replicates \
             {g} → {b}"
        )
    } else {
        format!("{text}: the same major version ({b})")
    };
    if g >= 16 {
        what.push_str("; green accepts a member of pg_create_subscription in place of a superuser");
    }
    if TESTED_PAIRS.contains(&(b, g)) {
        (CheckOutcome::Pass, what)
    } else {
        let tested = TESTED_PAIRS
            .iter()
            .map(|(b, g)| format!("{b} → {g}"))
            .collect::<Vec<_>>()
            .join(", ");
        (
            CheckOutcome::Warn,
            format!(
                "{what}; supported, but not among the pairs this release's tests run ({tested}): \
                 rehearse it first"
            ),
        )
    }
}

fn versions_check(read: Result<ServerVersions, tokio_postgres::Error>) -> CheckResult {
    const NAME: &str = "server-versions";
    match read {
        Ok(v) => {
            let (outcome, message) = judge_versions(&v);
            check(NAME, outcome, message)
        }
        Err(e) => unreadable(NAME, "the server versions", &e),
    }
}

async fn wal_level(client: &Client, name: &str, side: &str) -> CheckResult {
    match client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
    {
        Ok(r) => {
            let level: String = r.get(0);
            if level == "logical" {
                pass(name, format!("wal_level is logical on {side}"))
            } else {
                fail(
                    name,
                    format!(
                        "wal_level is {level} on {side}; logical replication needs wal_level = logical (changing it needs a restart)"
                    ),
                )
            }
        }
        Err(e) => unreadable(name, "wal_level", &e),
    }
}

async fn slots(client: &Client, name: &str, side: &str, needed: i32) -> CheckResult {
    let q = "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_stat_replication)::int";
    match client.query_one(q, &[]).await {
        Ok(r) => {
            let (free_slots, free_senders): (i32, i32) = (r.get(0), r.get(1));
            // Each table being copied uses one more slot and sender for a while
            // (max_sync_workers_per_subscription, 2 by default).
            let comfortable = needed + 2;
            let text = format!(
                "{free_slots} free replication slots and {free_senders} free WAL senders on {side}"
            );
            if free_slots < needed || free_senders < needed {
                fail(
                    name,
                    format!(
                        "{text}; at least {needed} of each is needed (raise max_replication_slots / max_wal_senders, or drop unused slots)"
                    ),
                )
            } else if free_slots < comfortable || free_senders < comfortable {
                warn(
                    name,
                    format!(
                        "{text}; the initial copy uses up to {comfortable} at once and will copy fewer tables in parallel"
                    ),
                )
            } else {
                pass(name, text)
            }
        }
        Err(e) => unreadable(name, "the replication slots", &e),
    }
}

async fn workers(green: &Client) -> CheckResult {
    const NAME: &str = "replication-workers-green";
    let q = "SELECT current_setting('max_logical_replication_workers')::int,
                    current_setting('max_worker_processes')::int,
                    (SELECT count(*) FROM pg_stat_subscription)::int";
    match green.query_one(q, &[]).await {
        Ok(r) => {
            let (max_lr, max_wp, used): (i32, i32, i32) = (r.get(0), r.get(1), r.get(2));
            let text = format!(
                "max_logical_replication_workers = {max_lr} ({used} in use), max_worker_processes = {max_wp} on green"
            );
            if max_lr - used < 1 {
                fail(NAME, format!("{text}: no worker left for the subscription"))
            } else if max_lr - used < 3 {
                warn(
                    NAME,
                    format!("{text}: the initial copy will run with fewer parallel table copies"),
                )
            } else {
                pass(NAME, text)
            }
        }
        Err(e) => unreadable(NAME, "the worker settings", &e),
    }
}

async fn privileges_blue(blue: &Client) -> CheckResult {
    const NAME: &str = "privileges-blue";
    let q = "SELECT current_user::text, rolsuper, rolreplication,
                    pg_has_role(current_user, 'pg_signal_backend', 'MEMBER'),
                    rolcreaterole,
                    (SELECT pg_has_role(current_user, datdba, 'MEMBER') FROM pg_database
                      WHERE datname = current_database())
               FROM pg_roles WHERE rolname = current_user";
    match blue.query_one(q, &[]).await {
        Ok(r) => {
            let user: String = r.get(0);
            let (sup, repl, signal, createrole, db_owner): (bool, bool, bool, bool, bool) =
                (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
            if sup {
                return pass(NAME, format!("{user} is a superuser on blue"));
            }
            let mut missing = Vec::new();
            if !repl {
                missing.push("REPLICATION (the subscription connects with it)");
            }
            if !signal {
                missing.push("pg_signal_backend (to end the application's sessions at the freeze)");
            }
            if !createrole {
                missing.push("CREATEROLE (to change the application roles at the freeze)");
            }
            if !db_owner {
                missing.push("ownership of the database (ALTER DATABASE … SET at the freeze)");
            }
            if missing.is_empty() {
                pass(
                    NAME,
                    format!(
                        "{user} has REPLICATION, CREATEROLE, pg_signal_backend and owns the database"
                    ),
                )
            } else {
                fail(
                    NAME,
                    format!("{user} lacks on blue: {}", missing.join("; ")),
                )
            }
        }
        Err(e) => unreadable(NAME, "the connecting role", &e),
    }
}

async fn privileges_green(green: &Client) -> CheckResult {
    const NAME: &str = "privileges-green";
    let q = "SELECT current_user::text, rolsuper, current_setting('server_version_num')::int,
                    pg_has_role(current_user, oid, 'MEMBER')
                      AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pg_create_subscription'
                                    AND pg_has_role(current_user, oid, 'MEMBER'))
               FROM pg_roles WHERE rolname = current_user";
    match green.query_one(q, &[]).await {
        Ok(r) => {
            let (user, sup, version, create_sub): (String, bool, i32, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if sup {
                pass(NAME, format!("{user} is a superuser on green"))
            } else if version >= 160_000 && create_sub {
                pass(
                    NAME,
                    format!("{user} is a member of pg_create_subscription on green"),
                )
            } else {
                fail(
                    NAME,
                    format!(
                        "{user} cannot create subscriptions on green: PostgreSQL {} needs a superuser{}",
                        version / 10_000,
                        if version >= 160_000 {
                            " or a member of pg_create_subscription"
                        } else {
                            ""
                        }
                    ),
                )
            }
        }
        Err(e) => unreadable(NAME, "the connecting role", &e),
    }
}

async fn privileges_reverse(blue: &Client) -> CheckResult {
    const NAME: &str = "privileges-reverse";
    match blue
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        Ok(r) if r.get::<_, bool>(0) => {
            pass(NAME, "blue accepts the reverse subscription (superuser)")
        }
        Ok(_) => warn(
            NAME,
            "the reverse subscription on blue needs a superuser (pg_create_subscription on PostgreSQL 16+)",
        ),
        Err(e) => unreadable(NAME, "the connecting role", &e),
    }
}

/// How the application roles stand on a database the application is about to be pointed at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplicationAccess {
    /// Roles that do not exist.
    pub missing: Vec<String>,
    /// Roles that exist but are `NOLOGIN`.
    pub no_login: Vec<String>,
    /// Roles without `CONNECT` on the database.
    pub no_connect: Vec<String>,
    /// Roles held read-only here (`default_transaction_read_only` set for the database, the
    /// role, or the role in this database — a freeze left behind, for example).
    pub read_only: Vec<String>,
}

impl ApplicationAccess {
    /// What the switch cannot fix, one line each: it never creates roles or changes their
    /// settings.
    pub fn blocking(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .missing
            .iter()
            .map(|r| format!("role {r} does not exist"))
            .collect();
        out.extend(
            self.read_only.iter().map(|r| {
                format!("role {r} is held read-only here (default_transaction_read_only)")
            }),
        );
        out
    }

    /// What the switch grants (`LOGIN`, `CONNECT`), one line each.
    pub fn to_grant(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .no_login
            .iter()
            .map(|r| format!("role {r} cannot log in yet (NOLOGIN)"))
            .collect();
        out.extend(
            self.no_connect
                .iter()
                .map(|r| format!("role {r} may not connect to the database yet")),
        );
        out
    }
}

/// Reads how `roles` stand on this database (see [`ApplicationAccess`]).
pub async fn application_access(
    client: &Client,
    roles: &[String],
) -> Result<ApplicationAccess, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT r.name, a.rolcanlogin,
                    CASE WHEN a.oid IS NULL THEN NULL
                         ELSE has_database_privilege(a.oid, current_database(), 'CONNECT') END,
                    EXISTS (SELECT 1 FROM pg_db_role_setting s
                             WHERE (s.setdatabase = 0 OR s.setdatabase = (SELECT oid FROM pg_database
                                                        WHERE datname = current_database()))
                               AND (s.setrole = 0 OR s.setrole = a.oid)
                               AND 'default_transaction_read_only=on' = ANY(s.setconfig))
               FROM unnest($1::text[]) AS r(name)
               LEFT JOIN pg_roles a ON a.rolname = r.name
              ORDER BY 1",
            &[&roles],
        )
        .await?;
    let mut access = ApplicationAccess::default();
    for row in rows {
        let name: String = row.get(0);
        let login: Option<bool> = row.get(1);
        let connect: Option<bool> = row.get(2);
        let read_only: bool = row.get(3);
        match login {
            None => {
                access.missing.push(name);
                continue;
            }
            Some(false) => access.no_login.push(name.clone()),
            Some(true) => {}
        }
        if connect == Some(false) {
            access.no_connect.push(name.clone());
        }
        if read_only {
            access.read_only.push(name);
        }
    }
    Ok(access)
}

async fn roles_on_green(green: &Client, roles: &[String]) -> CheckResult {
    const NAME: &str = "application-roles-green";
    match application_access(green, roles).await {
        Ok(access) if !access.blocking().is_empty() => fail(
            NAME,
            format!(
                "the application could not work on green after the switch: {}",
                access.blocking().join("; ")
            ),
        ),
        Ok(access) if !access.to_grant().is_empty() => warn(
            NAME,
            format!(
                "granted at the switch, when the application moves to green: {}",
                access.to_grant().join("; ")
            ),
        ),
        Ok(_) => pass(
            NAME,
            format!("{} can log in and write on green", roles.join(", ")),
        ),
        Err(e) => unreadable(NAME, "the application roles on green", &e),
    }
}

async fn roles(blue: &Client, roles: &[String]) -> CheckResult {
    const NAME: &str = "application-roles";
    if roles.is_empty() {
        return warn(
            NAME,
            "no application roles listed: the freeze cannot end the application's sessions",
        );
    }
    match blue
        .query(
            "SELECT r FROM unnest($1::text[]) r WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)",
            &[&roles],
        )
        .await
    {
        Ok(rows) if rows.is_empty() => pass(NAME, format!("{} exist on blue", roles.join(", "))),
        Ok(rows) => fail(
            NAME,
            format!(
                "missing on blue: {}",
                rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join(", ")
            ),
        ),
        Err(e) => unreadable(NAME, "the roles", &e),
    }
}

fn names(tables: &[TableName]) -> (Vec<String>, Vec<String>) {
    tables
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .unzip()
}

const TABLES: &str = "(SELECT c.oid, n.nspname, c.relname, c.relkind, c.relreplident, c.relowner
       FROM unnest($1::text[], $2::text[]) AS t(s, r)
       JOIN pg_namespace n ON n.nspname = t.s
       JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.r)";

async fn ownership(blue: &Client, tables: &[TableName]) -> CheckResult {
    const NAME: &str = "table-ownership";
    let (s, r) = names(tables);
    let q = format!(
        "SELECT format('%s.%s', nspname, relname) FROM {TABLES} t
          WHERE NOT pg_has_role(current_user, relowner, 'USAGE')
            AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
          ORDER BY 1"
    );
    match blue.query(&q, &[&s, &r]).await {
        Ok(rows) if rows.is_empty() => pass(
            NAME,
            "the connecting role owns (or is superuser over) every replicated table on blue",
        ),
        Ok(rows) => fail(
            NAME,
            format!(
                "creating the publication needs ownership; not owned: {}",
                list(rows.iter().map(|r| r.get::<_, String>(0)))
            ),
        ),
        Err(e) => unreadable(NAME, "table owners", &e),
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.len() > 20 {
        format!("{} and {} more", items[..20].join(", "), items.len() - 20)
    } else {
        items.join(", ")
    }
}

/// Every replicated table (and every partition of a partitioned one: changes are decoded per
/// partition) needs a primary key or a usable replica identity.
async fn replica_identity(blue: &Client, tables: &[TableName]) -> CheckResult {
    const NAME: &str = "replica-identity";
    let (s, r) = names(tables);
    let q = format!(
        "WITH RECURSIVE t AS (SELECT oid FROM {TABLES} x
                              UNION SELECT i.inhrelid FROM pg_inherits i JOIN t ON i.inhparent = t.oid)
         SELECT format('%s.%s', n.nspname, c.relname), c.relreplident::text,
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
           FROM t JOIN pg_class c ON c.oid = t.oid JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind = 'r'
          ORDER BY 1"
    );
    match blue.query(&q, &[&s, &r]).await {
        Ok(rows) => {
            let mut bad = Vec::new();
            let mut full = Vec::new();
            for row in &rows {
                let name: String = row.get(0);
                let ident: String = row.get(1);
                let pk: bool = row.get(2);
                match ident.as_str() {
                    "n" => bad.push(format!("{name} (REPLICA IDENTITY NOTHING)")),
                    "d" if !pk => bad.push(format!("{name} (no primary key)")),
                    "f" => full.push(name),
                    _ => {}
                }
            }
            if !bad.is_empty() {
                fail(
                    NAME,
                    format!(
                        "updates and deletes cannot be replicated without a key: {}; add a primary key or set REPLICA IDENTITY FULL / USING INDEX",
                        list(bad.into_iter())
                    ),
                )
            } else if !full.is_empty() {
                pass(
                    NAME,
                    format!(
                        "every table has a key; REPLICA IDENTITY FULL (slower updates on green): {}",
                        list(full.into_iter())
                    ),
                )
            } else {
                pass(
                    NAME,
                    "every table has a primary key or a replica identity index",
                )
            }
        }
        Err(e) => unreadable(NAME, "replica identities", &e),
    }
}

/// What online verification cannot follow by key and will hash whole inside the freeze: tables
/// without a primary key, and tables (or partitions) whose replica identity is not the key.
async fn hashed_in_freeze(blue: &Client, tables: &[TableName]) -> CheckResult {
    const NAME: &str = "verification-in-freeze";
    let (s, r) = names(tables);
    let q = format!(
        "SELECT format('%s.%s', n.nspname, c.relname),
                (SELECT coalesce(sum(greatest(p.reltuples, 0)), 0)::bigint FROM pg_class p
                  WHERE p.oid = c.oid OR p.oid IN (SELECT relid FROM pg_partition_tree(c.oid))),
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                NOT EXISTS (SELECT 1 FROM pg_partition_tree(c.oid) t JOIN pg_class p ON p.oid = t.relid
                             WHERE p.relkind = 'r' AND p.relreplident NOT IN ('d', 'f'))
           FROM {TABLES} x JOIN pg_class c ON c.oid = x.oid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          ORDER BY 1"
    );
    match blue.query(&q, &[&s, &r]).await {
        Ok(rows) => {
            let mut whole = Vec::new();
            let mut total: i64 = 0;
            for row in &rows {
                let (name, rows_est, pk, keyed): (String, i64, bool, bool) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                if !pk || !keyed {
                    let why = if pk {
                        "replica identity is not the key"
                    } else {
                        "no primary key"
                    };
                    whole.push(format!("{name} (~{rows_est} rows, {why})"));
                    total += rows_est;
                }
            }
            if whole.is_empty() {
                pass(
                    NAME,
                    "every table is compared online; the freeze compares only the keys that changed",
                )
            } else {
                warn(
                    NAME,
                    format!(
                        "hashed whole inside the write freeze (~{total} rows): {}; give them a primary key to compare them online",
                        list(whole.into_iter())
                    ),
                )
            }
        }
        Err(e) => unreadable(NAME, "the tables' keys", &e),
    }
}

/// Per table: column → (type, not null, generation expression), plus the primary key columns.
type TableShape = (
    BTreeMap<String, (String, bool, Option<String>)>,
    Vec<String>,
);

/// The shapes of `tables`, from the catalog reader verification uses too.
async fn shapes(
    client: &Client,
    tables: &[TableName],
) -> Result<BTreeMap<TableName, TableShape>, tokio_postgres::Error> {
    let catalog = super::catalog::read(client).await.map_err(|e| e.0)?;
    Ok(catalog
        .tables
        .into_iter()
        .filter(|(name, _)| tables.contains(name))
        .map(|(name, table)| {
            let key = table.key().iter().map(|c| c.name.clone()).collect();
            let columns = table
                .columns
                .into_iter()
                .map(|c| {
                    let generated = c.generated.then(|| c.generated_expr.unwrap_or_default());
                    (c.name, (c.type_full, c.not_null, generated))
                })
                .collect();
            (name, (columns, key))
        })
        .collect())
}

/// The schema check of preflight, run again once the migrations are applied: `Err` with the
/// differences when green's tables still do not match blue's.
pub async fn schema_ready(
    blue: &Client,
    green: &Client,
    selection: &TableSelection,
) -> Result<(), SchemaError> {
    let tables = resolve_tables(blue, selection).await?;
    let check = schema_match(blue, green, &tables).await;
    match check.outcome {
        CheckOutcome::Fail => Err(SchemaError::Differs(check.message)),
        CheckOutcome::Pass | CheckOutcome::Warn => Ok(()),
    }
}

/// How green's replicated tables differ from blue's, when they do (the `schema-match` check's
/// words): the usual reason an apply worker keeps failing is DDL run on blue only.
pub async fn schema_difference(
    blue: &Client,
    green: &Client,
    tables: &[TableName],
) -> Option<String> {
    let check = schema_match(blue, green, tables).await;
    (check.outcome == CheckOutcome::Fail).then_some(check.message)
}

/// Why green's schema is not ready for replication.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The replicated tables could not be read.
    #[error(transparent)]
    Read(#[from] super::replication::ReplicationError),
    /// Green's tables differ from blue's.
    #[error("after the migrations green's tables still differ from blue's: {0}")]
    Differs(String),
}

/// Every sequence of blue must exist on green: the final sync copies each one's value, and a
/// missing one would stop the cutover there, with writes frozen.
async fn sequences_match(blue: &Client, green: &Client) -> CheckResult {
    const NAME: &str = "sequences";
    let (b, g) = match (
        super::catalog::read(blue).await,
        super::catalog::read(green).await,
    ) {
        (Ok(b), Ok(g)) => (b, g),
        (Err(e), _) | (_, Err(e)) => return unreadable(NAME, "the sequences", &e.0),
    };
    let missing: Vec<String> = b
        .sequences
        .keys()
        .filter(|s| !g.sequences.contains_key(*s))
        .map(ToString::to_string)
        .collect();
    if missing.is_empty() {
        pass(
            NAME,
            format!(
                "{} sequences on blue, each also on green (copied at the final sync)",
                b.sequences.len()
            ),
        )
    } else {
        fail(
            NAME,
            format!(
                "missing on green (the final sync copies every sequence's value): {}",
                list(missing.into_iter())
            ),
        )
    }
}

async fn schema_match(blue: &Client, green: &Client, tables: &[TableName]) -> CheckResult {
    const NAME: &str = "schema-match";
    let (b, g) = match (shapes(blue, tables).await, shapes(green, tables).await) {
        (Ok(b), Ok(g)) => (b, g),
        (Err(e), _) | (_, Err(e)) => return unreadable(NAME, "the table definitions", &e),
    };
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for t in tables {
        let Some((bcols, bpk)) = b.get(t) else {
            continue;
        };
        let Some((gcols, gpk)) = g.get(t) else {
            problems.push(format!("{t}: missing on green"));
            continue;
        };
        for (col, (btype, bnn, bgen)) in bcols {
            match gcols.get(col) {
                None if bgen.is_some() => {
                    notes.push(format!("{t}.{col}: generated on blue, missing on green"))
                }
                None => problems.push(format!("{t}: column {col} missing on green")),
                Some((gtype, gnn, ggen)) => {
                    if btype != gtype {
                        problems.push(format!(
                            "{t}: column {col} is {btype} on blue, {gtype} on green"
                        ));
                    }
                    if bnn != gnn {
                        let say = |nn: &bool| if *nn { "NOT NULL" } else { "nullable" };
                        problems.push(format!(
                            "{t}: column {col} is {} on blue, {} on green",
                            say(bnn),
                            say(gnn)
                        ));
                    }
                    if let (Some(bexpr), Some(gexpr)) = (bgen, ggen)
                        && bexpr != gexpr
                    {
                        problems.push(format!(
                            "{t}: column {col} is generated as {bexpr} on blue, {gexpr} on green \
                             (verification would find every row different)"
                        ));
                    }
                    if bgen.is_some() && ggen.is_none() {
                        problems.push(format!("{t}: column {col} is generated on blue but not on green (generated values are not replicated and would stay empty)"));
                    }
                    if bgen.is_none() && ggen.is_some() {
                        problems.push(format!(
                            "{t}: column {col} is generated on green but not on blue"
                        ));
                    }
                }
            }
        }
        for (col, (_, gnn, _)) in gcols {
            if !bcols.contains_key(col) {
                if *gnn {
                    problems.push(format!(
                        "{t}: column {col} exists only on green and is NOT NULL"
                    ));
                } else {
                    notes.push(format!("{t}: column {col} exists only on green"));
                }
            }
        }
        if bpk != gpk {
            problems.push(format!(
                "{t}: primary key ({}) on blue, ({}) on green",
                bpk.join(", "),
                gpk.join(", ")
            ));
        }
    }
    if !problems.is_empty() {
        let mut m = list(problems.into_iter());
        if !notes.is_empty() {
            let _ = write!(m, "; also: {}", list(notes.into_iter()));
        }
        fail(NAME, m)
    } else if !notes.is_empty() {
        warn(NAME, list(notes.into_iter()))
    } else {
        pass(
            NAME,
            format!(
                "{} tables have the same columns, types, nullability and keys on both",
                tables.len()
            ),
        )
    }
}

async fn special_objects(blue: &Client, tables: &[TableName]) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let (s, r) = names(tables);
    let q = format!(
        "SELECT
           (SELECT array_agg(format('%s.%s', nspname, relname) ORDER BY 1) FROM {TABLES} t WHERE relkind = 'p'),
           (SELECT array_agg(DISTINCT format('%s.%s', nspname, relname)) FROM {TABLES} t
              JOIN pg_attribute a ON a.attrelid = t.oid WHERE a.attgenerated <> ''),
           (SELECT array_agg(format('%s.%s', n.nspname, c.relname) ORDER BY 1) FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relpersistence = 'u' AND c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%'),
           (SELECT array_agg(format('%s.%s', n.nspname, c.relname) ORDER BY 1) FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'm' AND n.nspname NOT LIKE 'pg\\_%')"
    );
    let row = match blue.query_one(&q, &[&s, &r]).await {
        Ok(r) => r,
        Err(e) => return vec![unreadable("special-objects", "the special objects", &e)],
    };
    let arr = |i: usize| row.get::<_, Option<Vec<String>>>(i).unwrap_or_default();
    let partitioned = arr(0);
    out.push(if partitioned.is_empty() {
        pass("partitioned-tables", "none")
    } else {
        pass(
            "partitioned-tables",
            format!(
                "published through their root, so green may partition them differently: {}",
                list(partitioned.into_iter())
            ),
        )
    });
    let generated = arr(1);
    out.push(if generated.is_empty() {
        pass("generated-columns", "none")
    } else {
        pass(
            "generated-columns",
            format!(
                "not replicated; green computes them itself (its definition must match): {}",
                list(generated.into_iter())
            ),
        )
    });
    let unlogged = arr(2);
    out.push(if unlogged.is_empty() {
        pass("unlogged-tables", "none")
    } else {
        warn(
            "unlogged-tables",
            format!(
                "cannot be replicated and are left out; copy them by hand if needed: {}",
                list(unlogged.into_iter())
            ),
        )
    });
    let matviews = arr(3);
    out.push(if matviews.is_empty() {
        pass("materialized-views", "none")
    } else {
        warn(
            "materialized-views",
            format!(
                "not replicated; refresh them on green after the switch: {}",
                list(matviews.into_iter())
            ),
        )
    });
    out
}

/// Column defaults and CHECK / foreign-key constraints of the replicated tables, per side:
/// `(table, kind, what) → definition`.
async fn definitions_of(
    client: &Client,
    tables: &[TableName],
) -> Result<BTreeMap<(String, &'static str, String), String>, tokio_postgres::Error> {
    let (s, r) = names(tables);
    let q = format!(
        "SELECT format('%s.%s', t.nspname, t.relname), 'default', a.attname::text,
                pg_get_expr(d.adbin, d.adrelid)
           FROM {TABLES} t
           JOIN pg_attrdef d ON d.adrelid = t.oid
           JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.adnum
          WHERE a.attgenerated = ''
         UNION ALL
         SELECT format('%s.%s', t.nspname, t.relname),
                CASE con.contype WHEN 'c' THEN 'check' ELSE 'foreign key' END,
                pg_get_constraintdef(con.oid), ''
           FROM {TABLES} t
           JOIN pg_constraint con ON con.conrelid = t.oid AND con.contype IN ('c', 'f')"
    );
    Ok(client
        .query(&q, &[&s, &r])
        .await?
        .iter()
        .map(|row| {
            let kind: String = row.get(1);
            let kind = match kind.as_str() {
                "default" => "default",
                "check" => "check",
                _ => "foreign key",
            };
            ((row.get(0), kind, row.get(2)), row.get(3))
        })
        .collect())
}

/// Column defaults and constraints that differ: a CHECK constraint only green has may refuse
/// rows the apply brings (the apply would stop), so it fails; the rest — defaults, constraints
/// only blue has, foreign keys (the apply does not check them) — change what the application
/// meets after the switch, so they warn.
async fn definitions(blue: &Client, green: &Client, tables: &[TableName]) -> CheckResult {
    const NAME: &str = "defaults-and-constraints";
    let (b, g) = match (
        definitions_of(blue, tables).await,
        definitions_of(green, tables).await,
    ) {
        (Ok(b), Ok(g)) => (b, g),
        (Err(e), _) | (_, Err(e)) => return unreadable(NAME, "defaults and constraints", &e),
    };
    let (mut problems, mut notes) = (Vec::new(), Vec::new());
    for ((table, kind, what), def) in &b {
        match (kind, g.get(&(table.clone(), kind, what.clone()))) {
            (&"default", Some(gdef)) if gdef != def => notes.push(format!(
                "{table}.{what}: default {def} on blue, {gdef} on green"
            )),
            (&"default", None) => {
                notes.push(format!(
                    "{table}.{what}: default {def} on blue, none on green"
                ));
            }
            (_, None) if *kind != "default" => {
                notes.push(format!("{table}: {kind} {what} only on blue"));
            }
            _ => {}
        }
    }
    for ((table, kind, what), def) in &g {
        if b.contains_key(&(table.clone(), kind, what.clone())) {
            continue;
        }
        match *kind {
            "default" => notes.push(format!("{table}.{what}: default {def} only on green")),
            "check" => problems.push(format!(
                "{table}: check {what} only on green (rows blue holds may break it and stop the \
                 apply)"
            )),
            _ => notes.push(format!("{table}: {kind} {what} only on green")),
        }
    }
    if !problems.is_empty() {
        problems.extend(notes);
        fail(NAME, list(problems.into_iter()))
    } else if !notes.is_empty() {
        warn(NAME, list(notes.into_iter()))
    } else {
        pass(
            NAME,
            "column defaults, CHECK and foreign-key constraints match",
        )
    }
}

/// Green's replicated tables must be empty: the initial copy inserts every row, and one already
/// there (say from an earlier attempt) stops it on a duplicate key.
async fn target_empty(green: &Client, tables: &[TableName]) -> CheckResult {
    const NAME: &str = "target-empty";
    match super::replication::tables_with_rows(green, tables).await {
        Ok(full) if full.is_empty() => pass(NAME, "green's replicated tables are empty"),
        Ok(full) => fail(
            NAME,
            format!(
                "green's replicated tables already hold rows: {}; the initial copy would stop on \
                 duplicate keys. Empty them on green (TRUNCATE) if an earlier attempt left them \
                 (an abort empties what it copied), or point the cutover at an empty database",
                list(full.iter().map(ToString::to_string))
            ),
        ),
        Err(e) => fail(NAME, format!("failed to look into green's tables: {e}")),
    }
}

/// Large objects are not carried by logical replication: blue's fail preflight unless the plan
/// says what to do with them (`Carry`: green must hold none yet; `Ignore`: a warning).
async fn large_objects(
    blue: &Client,
    green: &Client,
    how: Option<crate::api::LargeObjects>,
) -> CheckResult {
    use crate::api::LargeObjects;
    const NAME: &str = "large-objects";
    let (b, g) = match (
        super::large_objects::summary(blue).await,
        super::large_objects::summary(green).await,
    ) {
        (Ok(b), Ok(g)) => (b, g),
        (Err(e), _) | (_, Err(e)) => return fail(NAME, e.to_string()),
    };
    let size = crate::api::units::human_bytes(u64::try_from(b.bytes).unwrap_or(0));
    match how {
        _ if b.count == 0 && how != Some(LargeObjects::Carry) => pass(NAME, "none on blue"),
        None => fail(
            NAME,
            format!(
                "{} large objects on blue ({size} in pg_largeobject) are not carried by logical \
                 replication: set replication.largeObjects to Carry (copied inside the write \
                 freeze and verified) or Ignore (left behind)",
                b.count
            ),
        ),
        Some(LargeObjects::Ignore) => warn(
            NAME,
            format!(
                "{} large objects on blue ({size}) are left behind (replication.largeObjects: \
                 Ignore); green gets none",
                b.count
            ),
        ),
        Some(LargeObjects::Carry) if g.count > 0 => fail(
            NAME,
            format!(
                "green already holds {} large objects; with largeObjects: Carry it must hold \
                 none (an abort removes every large object on green)",
                g.count
            ),
        ),
        Some(LargeObjects::Carry) => pass(
            NAME,
            format!(
                "{} large objects on blue ({size} in pg_largeobject) are copied inside the \
                 write freeze and verified: the freeze grows with their size",
                b.count
            ),
        ),
    }
}

/// Extensions of blue's database that green's lacks: a `Fail` when a replicated table has a
/// column of one of its types (the apply could not store it), a `Warn` otherwise. Extensions at
/// another version on green (usual across a major upgrade) are named in a pass.
async fn extensions(blue: &Client, green: &Client, tables: &[TableName]) -> CheckResult {
    const NAME: &str = "extensions";
    let (s, r) = names(tables);
    let q = format!(
        "SELECT e.extname::text, e.extversion,
                (SELECT array_agg(DISTINCT format('%s.%s.%s', t.nspname, t.relname, a.attname))
                   FROM {TABLES} t
                   JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
                   JOIN pg_type ty ON ty.oid = a.atttypid
                   JOIN pg_depend d ON d.classid = 'pg_type'::regclass
                                   AND d.refclassid = 'pg_extension'::regclass
                                   AND d.refobjid = e.oid AND d.deptype = 'e'
                                   AND d.objid IN (ty.oid, ty.typelem))
           FROM pg_extension e
          WHERE e.extname <> 'plpgsql'
          ORDER BY 1"
    );
    let on_blue = match blue.query(&q, &[&s, &r]).await {
        Ok(rows) => rows,
        Err(e) => return unreadable(NAME, "blue's extensions", &e),
    };
    let on_green: BTreeMap<String, String> = match green
        .query("SELECT extname::text, extversion FROM pg_extension", &[])
        .await
    {
        Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        Err(e) => return unreadable(NAME, "green's extensions", &e),
    };
    let (mut needed, mut missing, mut other_version) = (Vec::new(), Vec::new(), Vec::new());
    for row in &on_blue {
        let (name, version): (String, String) = (row.get(0), row.get(1));
        let used: Vec<String> = row.get::<_, Option<Vec<String>>>(2).unwrap_or_default();
        match on_green.get(&name) {
            None if !used.is_empty() => {
                needed.push(format!("{name} (columns {})", list(used.into_iter())));
            }
            None => missing.push(name),
            Some(v) if *v != version => other_version.push(format!("{name} {version} → {v}")),
            Some(_) => {}
        }
    }
    let mut parts = Vec::new();
    if !needed.is_empty() {
        parts.push(format!(
            "replicated columns use extensions green's database lacks: {}; CREATE EXTENSION \
             them on green first",
            needed.join(", ")
        ));
    }
    if !missing.is_empty() {
        parts.push(format!(
            "installed on blue but not on green (no replicated column uses them): {}",
            missing.join(", ")
        ));
    }
    if !other_version.is_empty() {
        parts.push(format!(
            "at another version on green: {}",
            other_version.join(", ")
        ));
    }
    let text = parts.join("; ");
    if !needed.is_empty() {
        fail(NAME, text)
    } else if !missing.is_empty() {
        warn(NAME, text)
    } else if text.is_empty() {
        pass(
            NAME,
            format!(
                "{} extensions of blue's database installed on green",
                on_blue.len()
            ),
        )
    } else {
        pass(NAME, text)
    }
}

async fn long_transactions(blue: &Client, threshold: Duration) -> CheckResult {
    const NAME: &str = "long-transactions";
    let secs = threshold.as_secs_f64();
    match blue
        .query(
            "SELECT pid, usename::text, extract(epoch FROM now() - xact_start)::float8, state
               FROM pg_stat_activity
              WHERE xact_start < now() - make_interval(secs => $1) AND pid <> pg_backend_pid()
                AND backend_type = 'client backend'
              ORDER BY xact_start",
            &[&secs],
        )
        .await
    {
        Ok(rows) if rows.is_empty() => pass(
            NAME,
            format!("no transaction open longer than {secs:.0}s on blue"),
        ),
        Ok(rows) => warn(
            NAME,
            format!(
                "creating the replication slot waits for these to finish: {}",
                list(rows.iter().map(|r| format!(
                    "pid {} ({}, {:.0}s, {})",
                    r.get::<_, i32>(0),
                    r.get::<_, Option<String>>(1).unwrap_or_default(),
                    r.get::<_, f64>(2),
                    r.get::<_, Option<String>>(3).unwrap_or_default()
                )))
            ),
        ),
        Err(e) => unreadable(NAME, "pg_stat_activity", &e),
    }
}

async fn slot_wal_limit(blue: &Client) -> CheckResult {
    const NAME: &str = "max-slot-wal-keep-size";
    match blue
        .query_one("SELECT current_setting('max_slot_wal_keep_size')", &[])
        .await
    {
        Ok(r) => {
            let v: String = r.get(0);
            if v == "-1" {
                warn(
                    NAME,
                    "max_slot_wal_keep_size is unlimited on blue: if green stops consuming, the slot keeps WAL until the disk is full",
                )
            } else {
                pass(NAME, format!("max_slot_wal_keep_size = {v} on blue"))
            }
        }
        Err(e) => unreadable(NAME, "max_slot_wal_keep_size", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(blue: &str, green: &str) -> ServerVersions {
        let major = |v: &str| v.split('.').next().unwrap().parse().unwrap();
        ServerVersions {
            blue: blue.into(),
            green: green.into(),
            blue_major: major(blue),
            green_major: major(green),
            major_upgrade: major(green) > major(blue),
        }
    }

    #[test]
    fn tested_pairs_pass_and_an_upgrade_is_named() {
        let (o, m) = judge_versions(&pair("15.14", "18.6"));
        assert_eq!(o, CheckOutcome::Pass, "{m}");
        assert!(m.contains("a major upgrade (15 → 18)"), "{m}");
        assert!(
            m.contains("rollback during hypercare replicates 18 → 15"),
            "{m}"
        );
        assert!(m.contains("pg_create_subscription"), "{m}");
        let (o, m) = judge_versions(&pair("15.14", "15.14"));
        assert_eq!(o, CheckOutcome::Pass, "{m}");
        assert!(m.contains("the same major version (15)"), "{m}");
        assert!(!m.contains("pg_create_subscription"), "{m}");
        assert_eq!(judge_versions(&pair("18.6", "18.6")).0, CheckOutcome::Pass);
    }

    #[test]
    fn an_untested_supported_pair_warns() {
        let (o, m) = judge_versions(&pair("14.10", "17.2"));
        assert_eq!(o, CheckOutcome::Warn, "{m}");
        assert!(m.contains("not among the pairs"), "{m}");
        assert!(m.contains("15 → 18"), "{m}");
    }

    #[test]
    fn a_downgrade_or_an_unknown_major_is_refused() {
        let (o, m) = judge_versions(&pair("18.6", "15.14"));
        assert_eq!(o, CheckOutcome::Fail, "{m}");
        assert!(m.contains("a downgrade (18 → 15) is not supported"), "{m}");
        let (o, m) = judge_versions(&pair("12.20", "15.14"));
        assert_eq!(o, CheckOutcome::Fail, "{m}");
        assert!(m.contains("blue runs PostgreSQL 12"), "{m}");
        let (o, m) = judge_versions(&pair("15.14", "19.0"));
        assert_eq!(o, CheckOutcome::Fail, "{m}");
        assert!(m.contains("green runs PostgreSQL 19"), "{m}");
        assert!(m.contains("13 to 18"), "{m}");
    }
}
