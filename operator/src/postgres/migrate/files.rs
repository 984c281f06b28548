//! Migration files on disk: `V<version>__<description>.sql` and `R<version>__<description>.sql`
//! read from a directory (in a Job, a mounted ConfigMap), with their versions, checksums and the
//! no-transaction marker.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The line that makes a file run outside a transaction (needed for `CREATE INDEX CONCURRENTLY`).
pub const NO_TRANSACTION_MARKER: &str = "-- cutover:no-transaction";

/// A dotted numeric version: `1`, `1.2`, `2024.11.20.1` (`_` in file names reads as `.`).
///
/// Compared numerically component by component, missing components counting as zero, so
/// `1.10 > 1.9` and `1 == 1.0`.
#[derive(Clone, Debug)]
pub struct Version {
    parts: Vec<u64>,
    text: String,
}

impl Version {
    /// The components.
    pub fn parts(&self) -> &[u64] {
        &self.parts
    }
}

/// Why a version does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid version {0:?}: expected numbers separated by dots, like 1, 1.2 or 2024.11.20")]
pub struct VersionError(pub String);

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VersionError(s.to_owned());
        if s.is_empty() {
            return Err(err());
        }
        let parts = s
            .split(['.', '_'])
            .map(|p| {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err());
                }
                p.parse::<u64>().map_err(|_| err())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let text = parts
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(".");
        Ok(Self { parts, text })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.parts.len().max(other.parts.len());
        (0..n)
            .map(|i| {
                let a = self.parts.get(i).copied().unwrap_or(0);
                let b = other.parts.get(i).copied().unwrap_or(0);
                a.cmp(&b)
            })
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Version {}

/// Whether a file moves the schema forward or back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptKind {
    /// `V<version>__…sql`: applied once, in version order.
    Versioned,
    /// `R<version>__…sql`: undoes the versioned file of the same version (`--rollback-to`).
    Rollback,
}

/// One migration file.
#[derive(Clone, Debug)]
pub struct Script {
    /// Versioned or rollback.
    pub kind: ScriptKind,
    /// The version from the file name.
    pub version: Version,
    /// The description from the file name, `_` read as a space.
    pub description: String,
    /// The file name (no directory): what messages and the history name.
    pub file_name: String,
    /// The SQL.
    pub sql: String,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub checksum: String,
    /// Whether the file carries [`NO_TRANSACTION_MARKER`].
    pub no_transaction: bool,
}

/// The files of a directory, checked for duplicates and sorted by version.
#[derive(Clone, Debug, Default)]
pub struct MigrationSet {
    /// Versioned files, ascending.
    pub versioned: Vec<Script>,
    /// Rollback scripts by version.
    pub rollbacks: BTreeMap<Version, Script>,
}

impl MigrationSet {
    /// The versioned file of `version`.
    pub fn versioned(&self, version: &Version) -> Option<&Script> {
        self.versioned.iter().find(|s| &s.version == version)
    }

    /// Builds a set from (file name, content) pairs, as a ConfigMap holds them.
    pub fn from_files<I, N, C>(files: I) -> Result<Self, LoadError>
    where
        I: IntoIterator<Item = (N, C)>,
        N: Into<String>,
        C: Into<String>,
    {
        let mut set = Self::default();
        for (name, content) in files {
            let name = name.into();
            let Some(script) = Script::parse(&name, content.into())? else {
                continue;
            };
            set.insert(script)?;
        }
        set.versioned.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(set)
    }

    fn insert(&mut self, script: Script) -> Result<(), LoadError> {
        let existing = match script.kind {
            ScriptKind::Versioned => self.versioned(&script.version),
            ScriptKind::Rollback => self.rollbacks.get(&script.version),
        };
        if let Some(existing) = existing {
            return Err(LoadError::DuplicateVersion {
                version: script.version.to_string(),
                first: existing.file_name.clone(),
                second: script.file_name,
            });
        }
        match script.kind {
            ScriptKind::Versioned => self.versioned.push(script),
            ScriptKind::Rollback => {
                self.rollbacks.insert(script.version.clone(), script);
            }
        }
        Ok(())
    }
}

/// Why a migration directory could not be read.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The directory or a file could not be read.
    #[error("failed to read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A `.sql` file whose name does not follow the convention (most likely a typo that would
    /// otherwise be skipped silently).
    #[error(
        "failed to read the migration file name {file:?}: {reason} (expected V<version>__<description>.sql or R<version>__<description>.sql)"
    )]
    BadName {
        /// The file name.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// Two files claim one version.
    #[error("failed to load migrations: {first} and {second} both have version {version}")]
    DuplicateVersion {
        /// The version.
        version: String,
        /// One file.
        first: String,
        /// The other.
        second: String,
    },
    /// A file is not UTF-8.
    #[error("failed to read {file}: not UTF-8 text")]
    NotUtf8 {
        /// The file name.
        file: String,
    },
}

impl Script {
    /// Parses a file; `Ok(None)` for names that are not `.sql` files (a ConfigMap may carry a
    /// README) and for hidden entries (a mounted ConfigMap's `..data` links).
    pub fn parse(file_name: &str, sql: String) -> Result<Option<Self>, LoadError> {
        let bad = |reason: &str| LoadError::BadName {
            file: file_name.to_owned(),
            reason: reason.to_owned(),
        };
        // `V1__x.SQL` or `V2__y.sq` would otherwise be skipped without a word.
        if looks_like_migration(file_name) && !file_name.ends_with(".sql") {
            return Err(bad("a migration file's name ends in .sql"));
        }
        if file_name.starts_with('.') || !file_name.ends_with(".sql") {
            return Ok(None);
        }
        let stem = &file_name[..file_name.len() - ".sql".len()];
        let kind = match stem.chars().next() {
            Some('V') => ScriptKind::Versioned,
            Some('R') => ScriptKind::Rollback,
            _ => return Err(bad("it must start with V or R")),
        };
        let (version, description) = stem[1..]
            .split_once("__")
            .ok_or_else(|| bad("no \"__\" between the version and the description"))?;
        let version: Version = version
            .parse()
            .map_err(|e: VersionError| bad(&e.to_string()))?;
        let description = description.replace('_', " ").trim().to_owned();
        if description.is_empty() {
            return Err(bad("the description is empty"));
        }
        let checksum = hex(&Sha256::digest(sql.as_bytes()));
        let no_transaction = sql.lines().any(|l| l.trim() == NO_TRANSACTION_MARKER);
        Ok(Some(Self {
            kind,
            version,
            description,
            file_name: file_name.to_owned(),
            sql,
            checksum,
            no_transaction,
        }))
    }
}

/// `V<digit>…` or `R<digit>…`: meant as a migration, whatever its extension.
fn looks_like_migration(file_name: &str) -> bool {
    let mut chars = file_name.chars();
    matches!(chars.next(), Some('V' | 'R')) && chars.next().is_some_and(|c| c.is_ascii_digit())
}

/// Reads every migration file in `dir` (not recursive). Symbolic links are followed, so a
/// mounted ConfigMap works; hidden entries and non-`.sql` files are skipped.
pub fn load_dir(dir: &Path) -> Result<MigrationSet, LoadError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| LoadError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !(name.ends_with(".sql") || looks_like_migration(name)) {
            continue;
        }
        let path = entry.path();
        if !std::fs::metadata(&path).map_err(io(&path))?.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let text = String::from_utf8(bytes).map_err(|_| LoadError::NotUtf8 {
            file: name.to_owned(),
        })?;
        files.push((name.to_owned(), text));
    }
    MigrationSet::from_files(files)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(v("1.10") > v("1.9"));
        assert!(v("2") > v("1.99.99"));
        assert_eq!(v("1"), v("1.0"));
        assert_eq!(v("1_2").to_string(), "1.2");
        assert!(v("10") > v("9"));
        for bad in ["", "1..2", "a", "1.x", ".1", "1."] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn parses_names_and_markers() {
        let s = Script::parse(
            "V1_2__add_orders.sql",
            format!("{NO_TRANSACTION_MARKER}\nCREATE INDEX CONCURRENTLY i ON t (a);\n"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.kind, ScriptKind::Versioned);
        assert_eq!(s.version.to_string(), "1.2");
        assert_eq!(s.description, "add orders");
        assert!(s.no_transaction);
        assert_eq!(s.checksum.len(), 64);
        let r = Script::parse("R3__drop.sql", "DROP TABLE x;".into())
            .unwrap()
            .unwrap();
        assert_eq!(r.kind, ScriptKind::Rollback);
        assert!(!r.no_transaction);
        assert!(Script::parse("README.md", String::new()).unwrap().is_none());
        assert!(Script::parse("..data", String::new()).unwrap().is_none());
        for bad in [
            "v1__x.sql",
            "V1_x.sql",
            "Vx__y.sql",
            "V1__.sql",
            "init.sql",
            "V1__x.SQL",
            "R2__y.sq",
        ] {
            assert!(
                matches!(
                    Script::parse(bad, String::new()),
                    Err(LoadError::BadName { .. })
                ),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn sorts_and_rejects_duplicates() {
        let set = MigrationSet::from_files([
            ("V10__c.sql", "select 1"),
            ("V2__b.sql", "select 1"),
            ("V1.1__a.sql", "select 1"),
            ("R2__b.sql", "select 1"),
        ])
        .unwrap();
        let order: Vec<String> = set
            .versioned
            .iter()
            .map(|s| s.version.to_string())
            .collect();
        assert_eq!(order, ["1.1", "2", "10"]);
        assert!(set.rollbacks.contains_key(&v("2")));
        let err = MigrationSet::from_files([("V1__a.sql", ""), ("V1.0__b.sql", "")]).unwrap_err();
        assert!(
            err.to_string().contains("V1__a.sql and V1.0__b.sql"),
            "{err}"
        );
    }
}
