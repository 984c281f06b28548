//! Preflight catches what would break a cutover, names the object, and changes nothing.

mod common;

use std::time::Duration;

use common::*;
use cutover_operator::api::{CheckOutcome, CheckResult};
use cutover_operator::postgres::preflight::{
    PreflightOptions, preflight, schema_ready, server_versions,
};
use cutover_operator::postgres::replication::TableSelection;
use cutover_tests::{BlueGreen, PgCluster};

fn find<'a>(checks: &'a [CheckResult], name: &str) -> &'a CheckResult {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name}: {checks:#?}"))
}

fn expect(checks: &[CheckResult], name: &str, outcome: CheckOutcome, needles: &[&str]) {
    let c = find(checks, name);
    assert_eq!(c.outcome, outcome, "{c:#?}");
    for n in needles {
        assert!(c.message.contains(n), "{name}: {:?} lacks {n:?}", c.message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_catches_what_would_break_the_cutover() {
    // Blue: wal_level=replica, one slot and it is taken.
    let bg = BlueGreen::start_with(
        PgCluster::builder()
            .setting("wal_level", "replica")
            .setting("max_replication_slots", "1"),
        PgCluster::builder(),
    )
    .unwrap();
    bg.blue
        .execute(
            "postgres",
            "SELECT pg_create_physical_replication_slot('someone_elses')",
        )
        .unwrap();
    let common =
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric(12, 2) NOT NULL, note text);
                  CREATE TABLE \"Audit Log\" (at timestamptz, what text);
                  CREATE TABLE nothing_ident (id int PRIMARY KEY);
                  ALTER TABLE nothing_ident REPLICA IDENTITY NOTHING;
                  CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);";
    bg.blue
        .execute(
            APP,
            &format!(
                "{common} CREATE TABLE only_on_blue (id int PRIMARY KEY); SELECT lo_create(0);
                 CREATE SEQUENCE only_blue_seq;
                 CREATE TABLE gen (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) STORED);"
            ),
        )
        .unwrap();
    // Green: total is a float, note is NOT NULL, only_on_blue is missing.
    bg.green
        .execute(
            APP,
            "CREATE TABLE orders (id int PRIMARY KEY, total double precision NOT NULL, note text NOT NULL);
             CREATE TABLE \"Audit Log\" (at timestamptz, what text);
             CREATE TABLE nothing_ident (id int PRIMARY KEY);
             CREATE TABLE gen (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 3) STORED);",
        )
        .unwrap();
    let (blue, green) = engine_clients(&bg).await;
    // A transaction left open on blue.
    let idle_tx = bg.blue.connect(APP).await.unwrap();
    idle_tx
        .batch_execute("BEGIN; SELECT count(*) FROM orders")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let before = (leftovers(&bg.blue), leftovers(&bg.green));
    let opts = PreflightOptions {
        tables: TableSelection::All,
        reverse: true,
        long_transaction: Duration::from_millis(10),
        application_roles: vec!["orders_app".into()],
        migrations_first: false,
        online_verification: true,
        large_objects: None,
    };
    let checks = preflight(&blue, &green, &opts).await;
    for c in &checks {
        eprintln!("{:?} {}: {}", c.outcome, c.name, c.message);
    }
    expect(
        &checks,
        "wal-level-blue",
        CheckOutcome::Fail,
        &["wal_level is replica"],
    );
    expect(&checks, "wal-level-green", CheckOutcome::Pass, &[]);
    expect(
        &checks,
        "replication-slots-blue",
        CheckOutcome::Fail,
        &["0 free replication slots"],
    );
    expect(
        &checks,
        "replica-identity",
        CheckOutcome::Fail,
        &[
            "public.Audit Log (no primary key)",
            "public.nothing_ident (REPLICA IDENTITY NOTHING)",
        ],
    );
    expect(
        &checks,
        "schema-match",
        CheckOutcome::Fail,
        &[
            "public.only_on_blue: missing on green",
            "public.orders: column total is numeric(12,2) on blue, double precision on green",
            "public.orders: column note is nullable on blue, NOT NULL on green",
            "public.gen: column b is generated as (a * 2) on blue, (a * 3) on green",
        ],
    );
    expect(
        &checks,
        "sequences",
        CheckOutcome::Fail,
        &["missing on green", "public.only_blue_seq"],
    );
    // Online verification names what it will hash whole inside the freeze.
    expect(
        &checks,
        "verification-in-freeze",
        CheckOutcome::Warn,
        &[
            "public.Audit Log (~",
            "no primary key",
            "inside the write freeze",
        ],
    );
    expect(
        &checks,
        "unlogged-tables",
        CheckOutcome::Warn,
        &["public.scratch"],
    );
    // Unset in the plan: a large object is a failure, naming the field that decides.
    expect(
        &checks,
        "large-objects",
        CheckOutcome::Fail,
        &["1 large objects on blue", "replication.largeObjects"],
    );
    expect(&checks, "long-transactions", CheckOutcome::Warn, &["pid "]);
    expect(
        &checks,
        "max-slot-wal-keep-size",
        CheckOutcome::Warn,
        &["unlimited"],
    );
    expect(
        &checks,
        "application-roles",
        CheckOutcome::Fail,
        &["orders_app"],
    );
    // Green could not take the application either: the switch would stop there.
    expect(
        &checks,
        "application-roles-green",
        CheckOutcome::Fail,
        &["role orders_app does not exist"],
    );
    // The unlogged table is not among the replicated ones.
    expect(&checks, "tables", CheckOutcome::Pass, &["5 tables"]);
    // Nothing was changed on either side.
    assert_eq!((leftovers(&bg.blue), leftovers(&bg.green)), before);
    // No connection string or password in any message.
    for c in &checks {
        assert!(!c.message.contains(bg.blue.password()), "{c:?}");
        assert!(!c.message.contains(bg.green.password()), "{c:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_passes_a_healthy_pair_and_checks_a_table_list() {
    let bg = blue_green();
    with_schema(
        &bg,
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric(12, 2) NOT NULL);
         CREATE TABLE \"Order Lines\" (order_id int, line int, PRIMARY KEY (order_id, line));
         CREATE TABLE not_replicated (x int);",
        "",
    );
    bg.blue
        .execute(
            "postgres",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'",
        )
        .unwrap();
    bg.blue
        .execute("postgres", "SELECT pg_reload_conf()")
        .unwrap();
    wait_for(
        "the reload took effect",
        Duration::from_secs(10),
        || async { bg.blue.show("max_slot_wal_keep_size").unwrap() == "10GB" },
    )
    .await;
    let (blue, green) = engine_clients(&bg).await;
    let opts = PreflightOptions {
        tables: TableSelection::from_spec(&["public.orders".into(), "public.Order Lines".into()]),
        reverse: true,
        application_roles: vec![APP_ROLE.into()],
        ..PreflightOptions::default()
    };
    let checks = preflight(&blue, &green, &opts).await;
    let not_pass: Vec<_> = checks
        .iter()
        .filter(|c| c.outcome != CheckOutcome::Pass)
        .collect();
    assert!(not_pass.is_empty(), "{not_pass:#?}");
    expect(&checks, "tables", CheckOutcome::Pass, &["2 tables"]);
    expect(
        &checks,
        "server-versions",
        CheckOutcome::Pass,
        &["blue 1", "green 1"],
    );

    // A listed table that does not exist fails the table check by name.
    let opts = PreflightOptions {
        tables: TableSelection::from_spec(&["public.nope".into()]),
        ..opts
    };
    let checks = preflight(&blue, &green, &opts).await;
    expect(&checks, "tables", CheckOutcome::Fail, &["public.nope"]);
}

/// Preflight reads both versions from the servers: 15 → 18 is named a major upgrade and passes,
/// 18 → 15 is a downgrade and fails, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_names_a_major_upgrade_and_refuses_a_downgrade() {
    for (majors, outcome, words) in [
        (
            UPGRADE,
            CheckOutcome::Pass,
            &["blue 15.", "green 18.", "a major upgrade (15 → 18)"][..],
        ),
        (
            Majors {
                blue: Some(18),
                green: Some(15),
            },
            CheckOutcome::Fail,
            &["blue 18.", "a downgrade (18 → 15) is not supported"][..],
        ),
    ] {
        let bg = blue_green_of(majors);
        with_schema(&bg, "CREATE TABLE t (id int PRIMARY KEY);", "");
        let (blue, green) = engine_clients(&bg).await;
        let checks = preflight(&blue, &green, &PreflightOptions::default()).await;
        expect(&checks, "server-versions", outcome, words);
        let v = server_versions(&blue, &green).await.unwrap();
        assert_eq!(
            (v.blue_major, v.green_major),
            (majors.blue.unwrap() as i32, majors.green.unwrap() as i32)
        );
        assert_eq!(v.major_upgrade, outcome == CheckOutcome::Pass, "{v:?}");
    }
}

/// Extensions are not replicated: one a replicated column needs fails preflight, one nothing
/// replicated uses warns, and one at another version on green (across 15 → 18: citext 1.6 →
/// 1.8) is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_names_extensions_green_lacks_or_has_at_another_version() {
    let bg = blue_green_of(UPGRADE);
    bg.blue
        .execute(
            APP,
            "CREATE EXTENSION hstore; CREATE EXTENSION citext; CREATE EXTENSION pg_trgm;
             CREATE TABLE t (id int PRIMARY KEY, h hstore, c citext);",
        )
        .unwrap();
    bg.green
        .execute(
            APP,
            "CREATE EXTENSION citext; CREATE TABLE t (id int PRIMARY KEY, h text, c citext);",
        )
        .unwrap();
    let (blue, green) = engine_clients(&bg).await;
    let checks = preflight(&blue, &green, &PreflightOptions::default()).await;
    expect(
        &checks,
        "extensions",
        CheckOutcome::Fail,
        &[
            "hstore (columns public.t.h)",
            "CREATE EXTENSION them on green first",
            "not on green (no replicated column uses them): pg_trgm",
            "at another version on green: citext 1.6 → 1.8",
        ],
    );
    // With migrations to run first, green may still get them.
    let opts = PreflightOptions {
        migrations_first: true,
        ..PreflightOptions::default()
    };
    expect(
        &preflight(&blue, &green, &opts).await,
        "extensions",
        CheckOutcome::Warn,
        &["the migrations run first", "hstore"],
    );

    bg.green
        .execute(APP, "CREATE EXTENSION hstore; CREATE EXTENSION pg_trgm;")
        .unwrap();
    let checks = preflight(&blue, &green, &PreflightOptions::default()).await;
    expect(
        &checks,
        "extensions",
        CheckOutcome::Pass,
        &["at another version on green: citext 1.6 → 1.8"],
    );
    let found = find(&checks, "extensions");
    assert!(!found.message.contains("hstore"), "{found:?}");
}

/// Defaults and constraints the catalogs show differently: a CHECK only green has fails (rows
/// blue holds may break it and stop the apply); differing defaults warn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_compares_defaults_and_constraints() {
    let bg = blue_green();
    bg.blue
        .execute(
            APP,
            "CREATE TABLE d (id int PRIMARY KEY, x int DEFAULT 0 CHECK (x >= 0), note text DEFAULT 'a')",
        )
        .unwrap();
    bg.green
        .execute(
            APP,
            "CREATE TABLE d (id int PRIMARY KEY, x int DEFAULT 1 CHECK (x >= 0) CHECK (x < 100), note text)",
        )
        .unwrap();
    let (blue, green) = engine_clients(&bg).await;
    let checks = preflight(&blue, &green, &PreflightOptions::default()).await;
    expect(
        &checks,
        "defaults-and-constraints",
        CheckOutcome::Fail,
        &[
            "public.d: check CHECK ((x < 100)) only on green",
            "public.d.x: default 0 on blue, 1 on green",
            "public.d.note: default 'a'::text on blue, none on green",
        ],
    );
    bg.green
        .execute(
            APP,
            "ALTER TABLE d DROP CONSTRAINT d_x_check1; ALTER TABLE d ALTER x SET DEFAULT 0;
             ALTER TABLE d ALTER note SET DEFAULT 'a'",
        )
        .unwrap();
    let checks = preflight(&blue, &green, &PreflightOptions::default()).await;
    expect(&checks, "defaults-and-constraints", CheckOutcome::Pass, &[]);
}

/// With migrations to run on green first, an empty green is expected at preflight: the schema
/// difference is a warning, and the same check runs again once the migrations are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_migrations_green_may_be_empty_at_preflight_and_is_checked_again_after() {
    let bg = blue_green();
    bg.blue
        .execute(
            APP,
            "CREATE TABLE orders (id int PRIMARY KEY, total numeric NOT NULL)",
        )
        .unwrap();
    let (blue, green) = engine_clients(&bg).await;
    let opts = PreflightOptions {
        migrations_first: true,
        ..PreflightOptions::default()
    };
    let checks = preflight(&blue, &green, &opts).await;
    expect(
        &checks,
        "schema-match",
        CheckOutcome::Warn,
        &[
            "the migrations run first",
            "public.orders: missing on green",
        ],
    );
    let without = preflight(&blue, &green, &PreflightOptions::default()).await;
    expect(
        &without,
        "schema-match",
        CheckOutcome::Fail,
        &["public.orders: missing on green"],
    );

    let err = schema_ready(&blue, &green, &TableSelection::All)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("public.orders: missing on green"), "{err}");
    // What a migration would do: now green matches and replication may start.
    bg.green
        .execute(
            APP,
            "CREATE TABLE orders (id int PRIMARY KEY, total numeric NOT NULL)",
        )
        .unwrap();
    schema_ready(&blue, &green, &TableSelection::All)
        .await
        .expect("green matches after the migrations");
}
