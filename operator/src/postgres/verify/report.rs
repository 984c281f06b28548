//! What a verification found: per table, per sequence and per schema difference; rendered for
//! people (a table), for machines (JSON via serde) and for the resource's status.

use std::fmt::{self, Write as _};

use serde::Serialize;

use super::TableName;
use crate::api::status::{TableVerification, VerificationStatus};

/// The whole result.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Whether everything compared equal: every table, sequence and definition.
    pub matched: bool,
    /// One entry per compared table.
    pub tables: Vec<TableReport>,
    /// One entry per compared sequence.
    pub sequences: Vec<SequenceReport>,
    /// Differences in the definitions of the compared tables and sequences.
    pub schema_mismatches: Vec<SchemaMismatch>,
    /// Rows on the source, over all tables.
    pub source_rows: i64,
    /// Rows on the target, over all tables.
    pub target_rows: i64,
    /// Wall time of the whole verification, in seconds.
    pub elapsed_seconds: f64,
    /// Whether each side was read from a single snapshot shared by all its connections.
    pub consistent_snapshot: bool,
}

/// How a table was compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Primary-key ranges hashed in parallel; differing ranges narrowed down to keys.
    Chunked,
    /// No primary key: one hash over the whole table; slower (one connection) and differing
    /// rows cannot be named.
    FullHash,
    /// Compared while the application still wrote (key ranges, then the keys that changed),
    /// the keys changed since compared again inside the freeze.
    Online,
}

/// The comparison of one table.
#[derive(Clone, Debug, Serialize)]
pub struct TableReport {
    /// The table.
    pub table: TableName,
    /// How it was compared.
    pub method: Method,
    /// Rows on the source.
    pub source_rows: i64,
    /// Rows on the target.
    pub target_rows: i64,
    /// Key ranges hashed (1 for a full hash).
    pub chunks: usize,
    /// Key ranges whose hashes differed.
    pub chunks_differing: usize,
    /// Whether the table's rows compared equal.
    pub matched: bool,
    /// The differences found, up to the configured maximum.
    pub differences: Vec<Difference>,
    /// Whether more differences exist than are listed.
    pub differences_truncated: bool,
}

/// A primary key value: column names and values (as text, in the canonical session).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Key {
    /// Key column names, in key order.
    pub columns: Vec<String>,
    /// The values, as text.
    pub values: Vec<String>,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = |v: &String| {
            if !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '-' | '.' | '+' | 'e' | 'E'))
            {
                v.clone()
            } else {
                format!("'{}'", v.replace('\'', "''"))
            }
        };
        if self.columns.len() == 1 {
            write!(f, "{}={}", self.columns[0], value(&self.values[0]))
        } else {
            write!(
                f,
                "({})=({})",
                self.columns.join(", "),
                self.values.iter().map(value).collect::<Vec<_>>().join(", ")
            )
        }
    }
}

/// One difference in a table's rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Difference {
    /// The row is on the source only.
    MissingOnTarget {
        /// Its key.
        key: Key,
    },
    /// The row is on the target only.
    ExtraOnTarget {
        /// Its key.
        key: Key,
    },
    /// The row is on both sides with different contents.
    Changed {
        /// Its key.
        key: Key,
    },
    /// A key range differs and was not narrowed further (the difference limit was reached).
    Range {
        /// Lower bound (inclusive); none: from the first key.
        from: Option<Key>,
        /// Upper bound (exclusive); none: to the last key.
        to: Option<Key>,
        /// Rows in the range on the source.
        source_rows: i64,
        /// Rows in the range on the target.
        target_rows: i64,
    },
    /// A table without a primary key differs; its rows cannot be named.
    Content {
        /// Rows on the source.
        source_rows: i64,
        /// Rows on the target.
        target_rows: i64,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingOnTarget { key } => write!(f, "missing on target: {key}"),
            Self::ExtraOnTarget { key } => write!(f, "extra on target: {key}"),
            Self::Changed { key } => write!(f, "changed: {key}"),
            Self::Range {
                from,
                to,
                source_rows,
                target_rows,
            } => {
                let bound = |k: &Option<Key>, open: &str| {
                    k.as_ref().map_or_else(|| open.to_owned(), Key::to_string)
                };
                write!(
                    f,
                    "key range [{}, {}) differs ({source_rows} rows on source, {target_rows} on target)",
                    bound(from, "start"),
                    bound(to, "end")
                )
            }
            Self::Content {
                source_rows,
                target_rows,
            } => write!(
                f,
                "contents differ ({source_rows} rows on source, {target_rows} on target; \
                 no primary key, so rows cannot be named)"
            ),
        }
    }
}

/// A sequence's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SequenceValue {
    /// `last_value`.
    pub last_value: i64,
    /// `is_called`: whether `last_value` was handed out already.
    pub is_called: bool,
}

impl fmt::Display for SequenceValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (is_called {})", self.last_value, self.is_called)
    }
}

/// The comparison of one sequence.
#[derive(Clone, Debug, Serialize)]
pub struct SequenceReport {
    /// The sequence.
    pub sequence: TableName,
    /// On the source; none when missing there.
    pub source: Option<SequenceValue>,
    /// On the target; none when missing there.
    pub target: Option<SequenceValue>,
    /// Whether both exist and are equal.
    pub matched: bool,
}

impl fmt::Display for SequenceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show =
            |v: &Option<SequenceValue>| v.map_or_else(|| "missing".into(), |v| v.to_string());
        write!(
            f,
            "sequence {}: {} on source, {} on target",
            self.sequence,
            show(&self.source),
            show(&self.target)
        )
    }
}

/// A difference in the definition of a table or sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SchemaMismatch {
    /// The table or sequence.
    pub object: TableName,
    /// What differs.
    pub detail: String,
}

impl fmt::Display for SchemaMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.detail)
    }
}

impl VerifyReport {
    /// Every mismatch, one line each: schema, then table rows, then sequences.
    pub fn mismatches(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .schema_mismatches
            .iter()
            .map(|m| format!("schema {m}"))
            .collect();
        for t in self.tables.iter().filter(|t| !t.matched) {
            if t.differences.is_empty() {
                out.push(format!(
                    "table {}: differs ({} rows on source, {} on target)",
                    t.table, t.source_rows, t.target_rows
                ));
            }
            for d in &t.differences {
                out.push(format!("table {}: {d}", t.table));
            }
            if t.differences_truncated {
                out.push(format!("table {}: more differences not listed", t.table));
            }
        }
        out.extend(
            self.sequences
                .iter()
                .filter(|s| !s.matched)
                .map(ToString::to_string),
        );
        out
    }

    /// Rows compared per second (source rows over wall time).
    pub fn rows_per_second(&self) -> f64 {
        if self.elapsed_seconds > 0.0 {
            self.source_rows as f64 / self.elapsed_seconds
        } else {
            0.0
        }
    }

    /// The report for people: one line per table, totals, then every mismatch.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let width = self
            .tables
            .iter()
            .map(|t| t.table.to_string().len())
            .chain(std::iter::once(5))
            .max()
            .unwrap_or(5);
        let _ = writeln!(
            out,
            "{:<width$}  {:>12}  {:>12}  {:>7}  {:<9}  RESULT",
            "TABLE", "SOURCE ROWS", "TARGET ROWS", "CHUNKS", "METHOD"
        );
        for t in &self.tables {
            let method = match t.method {
                Method::Chunked => "chunked",
                Method::FullHash => "full hash",
                Method::Online => "online",
            };
            let result = if t.matched {
                "match".to_owned()
            } else {
                format!("DIFFERENT ({} ranges)", t.chunks_differing)
            };
            let _ = writeln!(
                out,
                "{:<width$}  {:>12}  {:>12}  {:>7}  {:<9}  {result}",
                t.table.to_string(),
                t.source_rows,
                t.target_rows,
                t.chunks,
                method
            );
        }
        let seq_diff = self.sequences.iter().filter(|s| !s.matched).count();
        let _ = writeln!(
            out,
            "\n{} tables, {} rows on source, {} on target; {} sequences ({} differ); {} schema differences",
            self.tables.len(),
            self.source_rows,
            self.target_rows,
            self.sequences.len(),
            seq_diff,
            self.schema_mismatches.len()
        );
        let _ = writeln!(
            out,
            "elapsed {:.2} s, {:.0} rows/s{}",
            self.elapsed_seconds,
            self.rows_per_second(),
            if self.consistent_snapshot {
                ""
            } else {
                " (no shared snapshot: each connection read its own)"
            }
        );
        if self.matched {
            out.push_str("MATCH: source and target are identical\n");
        } else {
            let mismatches = self.mismatches();
            let _ = writeln!(out, "MISMATCH: {} differences", mismatches.len());
            for m in mismatches {
                let _ = writeln!(out, "  {m}");
            }
        }
        out
    }
}

impl VerifyReport {
    /// Adds the tables compared online (and inside the freeze, by changed key) to this report
    /// of the rest.
    pub fn add_online(&mut self, tables: Vec<TableReport>) {
        for t in tables {
            self.matched &= t.matched;
            self.source_rows += t.source_rows;
            self.target_rows += t.target_rows;
            self.tables.push(t);
        }
        self.tables.sort_by(|a, b| a.table.cmp(&b.table));
    }
}

impl From<&VerifyReport> for VerificationStatus {
    fn from(report: &VerifyReport) -> Self {
        VerificationStatus {
            matched: report.matched,
            rows_compared: report.source_rows,
            tables: report
                .tables
                .iter()
                .map(|t| {
                    let mut differences: Vec<String> =
                        t.differences.iter().map(ToString::to_string).collect();
                    if t.differences_truncated {
                        differences.push("more differences not listed".into());
                    }
                    TableVerification {
                        table: t.table.to_string(),
                        source_rows: t.source_rows,
                        target_rows: t.target_rows,
                        matched: t.matched,
                        differences,
                    }
                })
                .collect(),
            other_mismatches: report
                .schema_mismatches
                .iter()
                .map(|m| format!("schema {m}"))
                .chain(
                    report
                        .sequences
                        .iter()
                        .filter(|s| !s.matched)
                        .map(ToString::to_string),
                )
                .collect(),
            method: None,
            fallback_reason: None,
            in_freeze_seconds: Some(report.elapsed_seconds),
            keys_in_freeze: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_like_postgres_messages() {
        let one = Key {
            columns: vec!["id".into()],
            values: vec!["42".into()],
        };
        assert_eq!(one.to_string(), "id=42");
        let two = Key {
            columns: vec!["a".into(), "b b".into()],
            values: vec!["-1.5".into(), "it's".into()],
        };
        assert_eq!(two.to_string(), "(a, b b)=(-1.5, 'it''s')");
        assert_eq!(
            Difference::Range {
                from: Some(one),
                to: None,
                source_rows: 3,
                target_rows: 2
            }
            .to_string(),
            "key range [id=42, end) differs (3 rows on source, 2 on target)"
        );
    }
}
