//! Large objects (`pg_largeobject`), which logical replication does not carry.
//!
//! With `replication.largeObjects: Carry` they are copied from blue to green inside the write
//! freeze, after the final sync (blue cannot change them then), each with its oid — the
//! application's tables refer to them by oid — and its owner where green has that role; the
//! verification then compares every object's contents (an MD5 per object, on each side). Green
//! must hold none before the cutover (preflight), so an abort removes every large object on
//! green and the next attempt starts clean.

use thiserror::Error;
use tokio_postgres::Client;

use super::ident::quote_ident;
use super::shared::{db_message, writable_session};

/// Why large objects could not be read, copied or compared.
#[derive(Debug, Error)]
#[error("failed to {action}: {}", db_message(source))]
pub struct LargeObjectError {
    /// What was being done.
    pub action: String,
    /// The driver's error.
    #[source]
    pub source: tokio_postgres::Error,
}

fn sql(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> LargeObjectError {
    let action = action.into();
    move |source| LargeObjectError { action, source }
}

/// How many large objects a database holds, and the size of `pg_largeobject` on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Objects (`pg_largeobject_metadata` rows).
    pub count: i64,
    /// Bytes of `pg_largeobject` (an upper bound of their data).
    pub bytes: i64,
}

/// Counts the large objects of `client`'s database.
pub async fn summary(client: &Client) -> Result<Summary, LargeObjectError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_largeobject_metadata)::int8,
                    pg_relation_size('pg_catalog.pg_largeobject')::int8",
            &[],
        )
        .await
        .map_err(sql("count the large objects"))?;
    Ok(Summary {
        count: row.get(0),
        bytes: row.get(1),
    })
}

/// Copies every large object of `blue` to `green` in one transaction on green: objects of the
/// same oid there (from an earlier try of this step) are replaced, so it can run again.
/// Returns how many were copied.
pub async fn copy(blue: &Client, green: &Client) -> Result<u64, LargeObjectError> {
    let objects = blue
        .query(
            "SELECT m.oid, pg_get_userbyid(m.lomowner)::text
               FROM pg_largeobject_metadata m ORDER BY m.oid",
            &[],
        )
        .await
        .map_err(sql("list blue's large objects"))?;
    writable_session(green)
        .await
        .map_err(sql("make the session writable"))?;
    green
        .batch_execute("BEGIN")
        .await
        .map_err(sql("begin on green"))?;
    let oids: Vec<u32> = objects.iter().map(|r| r.get(0)).collect();
    green
        .execute(
            "SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid = ANY($1)",
            &[&oids],
        )
        .await
        .map_err(sql("remove an earlier copy of the large objects on green"))?;
    for row in &objects {
        let oid: u32 = row.get(0);
        let owner: String = row.get(1);
        let data: Vec<u8> = blue
            .query_one("SELECT lo_get($1)", &[&oid])
            .await
            .map_err(sql(format!("read large object {oid} on blue")))?
            .get(0);
        green
            .execute("SELECT lo_from_bytea($1, $2)", &[&oid, &data])
            .await
            .map_err(sql(format!("write large object {oid} on green")))?;
        let owner_exists = green
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&owner])
            .await
            .map_err(sql("look up a large object's owner on green"))?
            .is_some();
        if owner_exists {
            // An oid is a number; the role name is quoted.
            green
                .batch_execute(&format!(
                    "ALTER LARGE OBJECT {oid} OWNER TO {}",
                    quote_ident(&owner)
                ))
                .await
                .map_err(sql(format!(
                    "give large object {oid} to its owner on green"
                )))?;
        }
    }
    green
        .batch_execute("COMMIT")
        .await
        .map_err(sql("commit the large objects on green"))?;
    Ok(objects.len() as u64)
}

/// What differs between the two sides' large objects, one line each (empty when they match):
/// an object missing on green, one only green has, or one whose contents differ.
pub async fn compare(blue: &Client, green: &Client) -> Result<Vec<String>, LargeObjectError> {
    const Q: &str = "SELECT m.oid, md5(lo_get(m.oid)) FROM pg_largeobject_metadata m ORDER BY 1";
    let (b, g) = tokio::join!(blue.query(Q, &[]), green.query(Q, &[]));
    let b = b.map_err(sql("read the large objects on blue"))?;
    let g = g.map_err(sql("read the large objects on green"))?;
    let b: std::collections::BTreeMap<u32, String> =
        b.iter().map(|r| (r.get(0), r.get(1))).collect();
    let g: std::collections::BTreeMap<u32, String> =
        g.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut out = Vec::new();
    for (oid, hash) in &b {
        match g.get(oid) {
            None => out.push(format!("large object {oid} is missing on the target")),
            Some(h) if h != hash => out.push(format!("large object {oid} differs")),
            Some(_) => {}
        }
    }
    for oid in g.keys().filter(|o| !b.contains_key(o)) {
        out.push(format!("large object {oid} exists only on the target"));
    }
    Ok(out)
}

/// Removes every large object of green's database (an aborted attempt's copy: green held none
/// before it). Returns how many.
pub async fn remove_all(green: &Client) -> Result<u64, LargeObjectError> {
    writable_session(green)
        .await
        .map_err(sql("make the session writable"))?;
    green
        .execute("SELECT lo_unlink(oid) FROM pg_largeobject_metadata", &[])
        .await
        .map_err(sql("remove the large objects copied to green"))
}
