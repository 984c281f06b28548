//! The history table `cutover_schema_history`: one row per attempt (applied, failed, rolled
//! back), never updated, so the table is also the audit log. What is applied now is derived from
//! the rows: a version is applied when its latest successful row is a `migrate` row.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::files::{Script, ScriptKind, Version};
use crate::postgres::quote_qualified;

/// The table's name.
pub const TABLE: &str = "cutover_schema_history";

/// Where the history table lives.
#[derive(Clone, Debug)]
pub struct HistoryTable {
    qualified: String,
}

/// One row of the history.
#[derive(Clone, Debug)]
pub struct HistoryRow {
    /// Insertion order.
    pub id: i64,
    /// The version, as text.
    pub version: String,
    /// The file's description.
    pub description: String,
    /// `migrate` or `rollback`.
    pub kind: String,
    /// The file name.
    pub script: String,
    /// SHA-256 of the file.
    pub checksum: String,
    /// Whether it was applied.
    pub success: bool,
    /// The error, for failures.
    pub error: Option<String>,
}

/// The state of one version, derived from its rows.
#[derive(Clone, Debug, Default)]
pub struct VersionState {
    /// The row that applied it, when it is applied now.
    pub applied: Option<HistoryRow>,
    /// The latest row, when it is a failure (the last attempt failed).
    pub last_failure: Option<HistoryRow>,
}

/// Every version's state, ascending.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// By version.
    pub versions: BTreeMap<Version, VersionState>,
}

impl History {
    /// Derives the state from rows in insertion order. Rows whose version does not parse
    /// (written by hand) are ignored.
    pub fn from_rows(rows: Vec<HistoryRow>) -> Self {
        let mut versions: BTreeMap<Version, VersionState> = BTreeMap::new();
        for row in rows {
            let Ok(version) = row.version.parse::<Version>() else {
                continue;
            };
            let state = versions.entry(version).or_default();
            if row.success {
                state.last_failure = None;
                state.applied = (row.kind == "migrate").then_some(row);
            } else {
                state.last_failure = Some(row);
            }
        }
        Self { versions }
    }

    /// Versions applied now, ascending.
    pub fn applied(&self) -> impl DoubleEndedIterator<Item = (&Version, &HistoryRow)> {
        self.versions
            .iter()
            .filter_map(|(v, s)| s.applied.as_ref().map(|r| (v, r)))
    }

    /// The highest applied version.
    pub fn current(&self) -> Option<&Version> {
        self.applied().next_back().map(|(v, _)| v)
    }

    /// Whether `version` is applied now.
    pub fn is_applied(&self, version: &Version) -> bool {
        self.versions
            .get(version)
            .is_some_and(|s| s.applied.is_some())
    }
}

impl HistoryTable {
    /// The table in `schema`.
    pub fn new(schema: &str) -> Self {
        Self {
            qualified: quote_qualified(schema, TABLE),
        }
    }

    /// The quoted, qualified name.
    pub fn name(&self) -> &str {
        &self.qualified
    }

    /// Creates the table if it does not exist. Only under the migration lock (two concurrent
    /// `CREATE TABLE IF NOT EXISTS` can still collide).
    pub async fn ensure(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    version text NOT NULL,
                    description text NOT NULL,
                    kind text NOT NULL CHECK (kind IN ('migrate', 'rollback')),
                    script text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                    duration interval NOT NULL,
                    success boolean NOT NULL,
                    error text,
                    applied_by text NOT NULL DEFAULT current_user
                )",
                self.qualified
            ))
            .await
    }

    /// Reads the history; an absent table reads as empty (nothing applied yet).
    pub async fn read(&self, client: &Client) -> Result<History, tokio_postgres::Error> {
        let sql = format!(
            "SELECT id, version, description, kind, script, checksum, success, error
             FROM {} ORDER BY id",
            self.qualified
        );
        let rows = match client.query(&sql, &[]).await {
            Ok(rows) => rows,
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(History::default()),
            Err(e) => return Err(e),
        };
        Ok(History::from_rows(
            rows.iter()
                .map(|r| HistoryRow {
                    id: r.get(0),
                    version: r.get(1),
                    description: r.get(2),
                    kind: r.get(3),
                    script: r.get(4),
                    checksum: r.get(5),
                    success: r.get(6),
                    error: r.get(7),
                })
                .collect(),
        ))
    }

    /// Records an attempt at running `script`.
    pub async fn record(
        &self,
        client: &Client,
        script: &Script,
        took: Duration,
        error: Option<&str>,
    ) -> Result<(), tokio_postgres::Error> {
        let kind = match script.kind {
            ScriptKind::Versioned => "migrate",
            ScriptKind::Rollback => "rollback",
        };
        let sql = format!(
            "INSERT INTO {} (version, description, kind, script, checksum, duration, success, error)
             VALUES ($1, $2, $3, $4, $5, make_interval(secs => $6), $7, $8)",
            self.qualified
        );
        client
            .execute(
                &sql,
                &[
                    &script.version.to_string(),
                    &script.description,
                    &kind,
                    &script.file_name,
                    &script.checksum,
                    &took.as_secs_f64(),
                    &error.is_none(),
                    &error,
                ],
            )
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, version: &str, kind: &str, success: bool) -> HistoryRow {
        HistoryRow {
            id,
            version: version.into(),
            description: "d".into(),
            kind: kind.into(),
            script: format!("V{version}__d.sql"),
            checksum: "c".into(),
            success,
            error: (!success).then(|| "boom".into()),
        }
    }

    #[test]
    fn derives_the_current_state_from_attempts() {
        let h = History::from_rows(vec![
            row(1, "1", "migrate", true),
            row(2, "2", "migrate", false),
            row(3, "2", "migrate", true),
            row(4, "3", "migrate", true),
            row(5, "3", "rollback", true),
            row(6, "4", "migrate", false),
        ]);
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert!(h.is_applied(&v("1")) && h.is_applied(&v("2")));
        assert!(!h.is_applied(&v("3")), "rolled back");
        assert!(!h.is_applied(&v("4")));
        assert!(h.versions[&v("2")].last_failure.is_none(), "fixed");
        assert!(h.versions[&v("4")].last_failure.is_some());
        assert_eq!(h.current(), Some(&v("2")));
    }
}
