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
    let upto: PgLsn = super::shared::flush_wal(db)
        .await
        .map_err(sql("flush the WAL"))?;
    let rows = db
        .query(
            "SELECT lsn, data FROM pg_logical_slot_peek_changes($1, $2, NULL,
                    'include-xids', '1', 'skip-empty-xacts', '1', 'only-local', '1')",
            &[&slot, &upto],
        )
        .await
        .map_err(sql("read the change witness"))?;
    let lines: Vec<(PgLsn, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let keys = primary_keys(db).await?;
    let mut seen = count(&lines, after, &keys);
    seen.upto = Some(upto);
    Ok(seen)
}

/// Each table's primary key columns, by the name `test_decoding` prints (`schema.table`).
pub(crate) async fn primary_keys(
    db: &Client,
) -> Result<HashMap<String, Vec<String>>, WitnessError> {
    let rows = db
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                    array_agg(a.attname::text ORDER BY k.ord)
               FROM pg_constraint con
               JOIN pg_class c ON c.oid = con.conrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
              WHERE con.contype = 'p'
              GROUP BY 1",
            &[],
        )
        .await
        .map_err(sql("read the primary keys"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The `name[type]:value` columns of a `test_decoding` change, as (name, value).
fn columns(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut name = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                    } else {
                        break;
                    }
                }
                name.push(c);
            }
        }
        for c in chars.by_ref() {
            if c == '[' {
                break;
            }
            name.push(c);
        }
        // The type, which may itself contain brackets (`integer[]`), ends at "]:".
        let mut last = ' ';
        for c in chars.by_ref() {
            if last == ']' && c == ':' {
                break;
            }
            last = c;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            value.push(chars.next().unwrap_or('\''));
            while let Some(c) = chars.next() {
                value.push(c);
                if c == '\'' {
                    if chars.peek() == Some(&'\'') {
                        value.push(chars.next().unwrap_or('\''));
                    } else {
                        break;
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((name, value));
    }
}

/// A change for people: its table, its operation and its key — never the other columns'
/// values, which may hold personal data and end up in the status and Events.
pub(crate) fn describe(change: &str, keys: &HashMap<String, Vec<String>>) -> String {
    let mut parts = change.splitn(3, ": ");
    let table = parts.next().unwrap_or_default();
    let op = parts.next().unwrap_or_default();
    let cols = parts.next().unwrap_or_default();
    let key: Vec<String> = match keys.get(table) {
        Some(key_columns) => columns(cols)
            .into_iter()
            .filter(|(name, _)| key_columns.contains(name))
            .map(|(name, value)| format!("{name}={value}"))
            .collect(),
        None => Vec::new(),
    };
    if key.is_empty() {
        format!("{table} {op}")
    } else {
        format!("{table} {op} {}", key.join(", "))
    }
}

/// Counts the changes of transactions that committed after `after`, leaving out the
/// operator's own state table. `lines` are `test_decoding`'s output with `include-xids`.
fn count(lines: &[(PgLsn, String)], after: PgLsn, keys: &HashMap<String, Vec<String>>) -> Seen {
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
                let short: String = describe(change, keys).chars().take(200).collect();
                open.entry(xid.clone()).or_default().push(short);
            }
        }
    }
    seen
}

/// What a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

/// One row change (or truncation) as `test_decoding` prints it: the tables (raw schema and
/// name), the operation, and the tuples it shows — for an update that changed the key, the
/// old key and the new tuple; otherwise the one tuple (a delete shows the old key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    pub tables: Vec<(String, String)>,
    pub op: Op,
    pub tuples: Vec<Vec<(String, String)>>,
}

/// Reads one identifier (quoted or bare) from the front of `text`; returns it raw and the rest.
fn identifier(text: &str) -> Option<(String, &str)> {
    if let Some(rest) = text.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if chars.peek().map(|(_, n)| *n) == Some('"') {
                    chars.next();
                    out.push('"');
                } else {
                    return Some((out, &rest[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        None
    } else {
        let end = text.find(['.', ':', ',', ' ']).unwrap_or(text.len());
        (end > 0).then(|| (text[..end].to_owned(), &text[end..]))
    }
}

/// A value as `test_decoding` prints it, back to the type's text: quotes removed (`'a''b'` is
/// `a'b`), bit strings without their `B'…'`.
pub(crate) fn unquote(value: &str) -> String {
    let inner = value
        .strip_prefix("B'")
        .or_else(|| value.strip_prefix('\''))
        .and_then(|v| v.strip_suffix('\''));
    match inner {
        Some(v) => v.replace("''", "'"),
        None => value.to_owned(),
    }
}

/// Parses a `table …: OP: columns` line of `test_decoding` (without `include-xids` noise);
/// `None` for anything else (BEGIN, COMMIT, messages).
pub(crate) fn parse_change(data: &str) -> Option<Change> {
    let mut rest = data.strip_prefix("table ")?;
    let mut tables = Vec::new();
    loop {
        let (schema, after) = identifier(rest)?;
        let after = after.strip_prefix('.')?;
        let (name, after) = identifier(after)?;
        tables.push((schema, name));
        if let Some(more) = after.strip_prefix(", ") {
            rest = more;
            continue;
        }
        rest = after.strip_prefix(": ")?;
        break;
    }
    let (op, body) = rest.split_once(':').unwrap_or((rest, ""));
    let op = match op {
        "INSERT" => Op::Insert,
        "UPDATE" => Op::Update,
        "DELETE" => Op::Delete,
        "TRUNCATE" => Op::Truncate,
        _ => return None,
    };
    let body = body.trim_start();
    let parse = |text: &str| -> Vec<(String, String)> {
        columns(text)
            .into_iter()
            .map(|(name, value)| (name, unquote(&value)))
            .collect()
    };
    let tuples = if op == Op::Truncate || body.starts_with('(') {
        // `(no-flags)`, `(no-tuple-data)`: nothing that names a row.
        Vec::new()
    } else if let Some(old) = body.strip_prefix("old-key: ") {
        match old.split_once(" new-tuple: ") {
            Some((old, new)) => vec![parse(old), parse(new)],
            None => vec![parse(old)],
        }
    } else {
        vec![parse(body)]
    };
    Some(Change { tables, op, tuples })
}

/// Every change committed before `upto`, from where the slot was last advanced, without
/// consuming it: `(xid, test_decoding line)` of each row change. With `only_local`, changes
/// that carry a replication origin (applied by a subscription) are left out.
pub(crate) async fn peek(
    db: &Client,
    slot: &str,
    upto: PgLsn,
    only_local: bool,
) -> Result<Vec<(u32, String)>, WitnessError> {
    let local = if only_local { "1" } else { "0" };
    let rows = db
        .query(
            "SELECT xid::text::bigint, data FROM pg_logical_slot_peek_changes($1, $2, NULL,
                    'skip-empty-xacts', '1', 'only-local', $3)
              WHERE data LIKE 'table %'",
            &[&slot, &upto, &local],
        )
        .await
        .map_err(sql("read the change witness"))?;
    Ok(rows
        .iter()
        .map(|r| (u32::try_from(r.get::<_, i64>(0)).unwrap_or(0), r.get(1)))
        .collect())
}

/// Whether `slot` exists and still has the WAL it needs.
pub(crate) async fn intact(db: &Client, slot: &str) -> Result<bool, WitnessError> {
    let row = db
        .query_opt(
            "SELECT coalesce(wal_status, '') <> 'lost' FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("look up the change witness slot"))?;
    Ok(row.is_some_and(|r| r.get(0)))
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
        let keys = HashMap::from([
            ("public.ledger".to_owned(), vec!["id".to_owned()]),
            ("public.accounts".to_owned(), vec!["id".to_owned()]),
        ]);
        let seen = count(&lines, lsn(15), &keys);
        assert_eq!(seen.writes, 2);
        assert_eq!(
            seen.samples,
            ["public.ledger INSERT id=9", "public.accounts DELETE id=2"]
        );
        assert_eq!(count(&lines, lsn(40), &keys).writes, 0);
    }

    #[test]
    fn samples_name_the_key_and_no_other_value() {
        let keys = HashMap::from([(
            "public.\"Order Lines\"".to_owned(),
            vec!["order id".to_owned(), "line".to_owned()],
        )]);
        let change = "public.\"Order Lines\": UPDATE: \"order id\"[integer]:7 line[text]:'a b''c' \
                      secret[text]:'card 4111' tags[text[]]:'{x,y}'";
        assert_eq!(
            describe(change, &keys),
            "public.\"Order Lines\" UPDATE order id=7, line='a b''c'"
        );
        // A table whose key is unknown shows no value at all.
        assert_eq!(
            describe("public.t: INSERT: a[integer]:1 b[text]:'x'", &keys),
            "public.t INSERT"
        );
    }

    #[test]
    fn parses_changes_with_their_keys() {
        let c = parse_change(
            "table public.\"Order Lines\": UPDATE: old-key: id[integer]:1 new-tuple: id[integer]:2 v[text]:'a''b'",
        )
        .unwrap();
        assert_eq!(c.tables, [("public".to_owned(), "Order Lines".to_owned())]);
        assert_eq!(c.op, Op::Update);
        assert_eq!(c.tuples[0], [("id".to_owned(), "1".to_owned())]);
        assert_eq!(c.tuples[1][1], ("v".to_owned(), "a'b".to_owned()));
        let t = parse_change("table a.b, \"x.y\".c: TRUNCATE: (no-flags)").unwrap();
        assert_eq!(t.op, Op::Truncate);
        assert_eq!(
            t.tables,
            [
                ("a".to_owned(), "b".to_owned()),
                ("x.y".to_owned(), "c".to_owned())
            ]
        );
        let d = parse_change("table s.t: DELETE: k[bit(4)]:B'0101' n[text]:'x y'").unwrap();
        assert_eq!(d.tuples[0][0].1, "0101");
        assert_eq!(d.tuples[0][1].1, "x y");
        assert!(
            parse_change("table s.t: DELETE: (no-tuple-data)")
                .unwrap()
                .tuples
                .is_empty()
        );
        assert_eq!(parse_change("BEGIN 5"), None);
    }
}
