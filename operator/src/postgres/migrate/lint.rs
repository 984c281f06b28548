//! `cutover lint`: dangerous DDL in migration files, found by the squawk linter (its parser and
//! rules, used as a library), reported as `file:line:column` with advice.
//!
//! Files run the way `cutover migrate` runs them: a transactional file is linted as if wrapped
//! in a transaction (so `CREATE INDEX CONCURRENTLY` there, or a `COMMIT`, is flagged), a file
//! marked `-- cutover:no-transaction` as not.

use squawk_linter::{Linter, Rule};
use squawk_syntax::SourceFile;

use super::files::{MigrationSet, Script};
use super::sql_text::{classify, line_of, statements};

/// squawk's default rules that are off here, and why.
pub const OFF_BY_DEFAULT: &[(&str, &str)] = &[
    (
        "require-lock-timeout",
        "cutover migrate sets lock_timeout for every migration (--lock-timeout)",
    ),
    (
        "require-statement-timeout",
        "a migration may legitimately run long; the Job's activeDeadlineSeconds bounds it",
    ),
];

/// Which rules run.
#[derive(Clone, Debug, Default)]
pub struct LintOptions {
    /// Rules to add (squawk's names, e.g. `require-lock-timeout`, `ban-drop-index`).
    pub include: Vec<String>,
    /// Rules to leave out.
    pub exclude: Vec<String>,
    /// The PostgreSQL version the migrations target (`15`, `16.2`); squawk's rules take it
    /// into account (e.g. a volatile default needs a rewrite on every version).
    pub pg_version: Option<String>,
}

/// One problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column (in characters).
    pub column: u32,
    /// The rule (`syntax-error` for text squawk cannot parse).
    pub rule: String,
    /// What is wrong.
    pub message: String,
    /// What to do instead.
    pub help: Option<String>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.rule, self.message
        )?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// A rule name squawk does not know, or a bad version.
#[derive(Debug, thiserror::Error)]
#[error("failed to configure the linter: {0}")]
pub struct LintConfigError(String);

/// The rules that run with `opts`, by name, sorted.
pub fn active_rules(opts: &LintOptions) -> Result<Vec<String>, LintConfigError> {
    let parse = |names: &[String]| {
        names
            .iter()
            .map(|n| {
                n.parse::<Rule>()
                    .map_err(|_| LintConfigError(format!("unknown rule {n:?}")))
            })
            .collect::<Result<Vec<Rule>, _>>()
    };
    let include = parse(&opts.include)?;
    let mut exclude = parse(&opts.exclude)?;
    for (name, _) in OFF_BY_DEFAULT {
        let rule: Rule = name
            .parse()
            .map_err(|_| LintConfigError(format!("unknown rule {name:?}")))?;
        if !include.contains(&rule) {
            exclude.push(rule);
        }
    }
    let linter = Linter::with_rules(&include, &exclude);
    let mut names: Vec<String> = linter.rules.iter().map(ToString::to_string).collect();
    names.sort();
    Ok(names)
}

fn linter(opts: &LintOptions, in_transaction: bool) -> Result<Linter, LintConfigError> {
    let rules: Vec<Rule> = active_rules(opts)?
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    let mut linter = Linter::from(rules);
    linter.settings.assume_in_transaction = in_transaction;
    if let Some(v) = &opts.pg_version {
        linter.settings.pg_version = v
            .parse()
            .map_err(|e| LintConfigError(format!("PostgreSQL version {v:?}: {e}")))?;
    }
    Ok(linter)
}

/// Lints one file.
pub fn lint_script(script: &Script, opts: &LintOptions) -> Result<Vec<Finding>, LintConfigError> {
    let text = &script.sql;
    let position = |offset: usize| {
        let offset = offset.min(text.len());
        let line = line_of(text, offset);
        let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let column = u32::try_from(text[line_start..offset].chars().count() + 1).unwrap_or(1);
        (line, column)
    };
    let parse = SourceFile::parse(text);
    let mut findings: Vec<Finding> = parse
        .errors()
        .iter()
        .map(|e| {
            let (line, column) = position(usize::from(e.range().start()));
            Finding {
                file: script.file_name.clone(),
                line,
                column,
                rule: "syntax-error".into(),
                message: e.message().to_owned(),
                help: None,
            }
        })
        .collect();
    let mut linter = linter(opts, !script.no_transaction)?;
    for v in linter.lint(&parse, text) {
        let (line, column) = position(usize::from(v.text_range.start()));
        let mut help = v.help.clone();
        if v.code == Rule::BanConcurrentIndexCreationInTransaction {
            help = Some(no_transaction_help());
        }
        findings.push(Finding {
            file: script.file_name.clone(),
            line,
            column,
            rule: v.code.to_string(),
            message: v.message.clone(),
            help,
        });
    }
    // squawk reports this only for files of several statements (other tools run a lone
    // statement outside a transaction); `cutover migrate` wraps every unmarked file.
    if !script.no_transaction {
        for stmt in statements(text) {
            let concurrent = classify(&stmt, text).is_some();
            let reported = findings.iter().any(|f| {
                f.rule == CIC_IN_TRANSACTION && f.line >= stmt.line && f.line <= stmt.line + 1
            });
            if concurrent && !reported {
                let (line, column) = position(stmt.tokens[0].start);
                findings.push(Finding {
                    file: script.file_name.clone(),
                    line,
                    column,
                    rule: CIC_IN_TRANSACTION.into(),
                    message: "a CONCURRENTLY index operation cannot run inside a transaction, \
                              and this file runs in one"
                        .into(),
                    help: Some(no_transaction_help()),
                });
            }
        }
    }
    findings.sort_by_key(|f| (f.line, f.column));
    Ok(findings)
}

const CIC_IN_TRANSACTION: &str = "ban-concurrent-index-creation-in-transaction";

fn no_transaction_help() -> String {
    format!(
        "put the statement in a file of its own that starts with `{}`",
        super::NO_TRANSACTION_MARKER
    )
}

/// Lints every file of a set, versioned files first, in version order.
pub fn lint_set(set: &MigrationSet, opts: &LintOptions) -> Result<Vec<Finding>, LintConfigError> {
    let mut out = Vec::new();
    for script in set.versioned.iter().chain(set.rollbacks.values()) {
        out.extend(lint_script(script, opts)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lint(name: &str, sql: &str, opts: &LintOptions) -> Vec<Finding> {
        let script = Script::parse(name, sql.into()).unwrap().unwrap();
        lint_script(&script, opts).unwrap()
    }

    fn rules(findings: &[Finding]) -> Vec<(&str, u32)> {
        findings.iter().map(|f| (f.rule.as_str(), f.line)).collect()
    }

    #[test]
    fn flags_the_dangerous_ddl_the_issue_names() {
        let sql = "CREATE TABLE t (id bigint PRIMARY KEY, a text);\n\
                   ALTER TABLE big ADD COLUMN b text NOT NULL;\n\
                   CREATE INDEX t_a ON big (a);\n\
                   ALTER TABLE big RENAME COLUMN a TO c;\n\
                   ALTER TABLE big ALTER COLUMN c TYPE varchar(10);\n";
        let found = lint("V2__x.sql", sql, &LintOptions::default());
        let got = rules(&found);
        for expected in [
            ("adding-required-field", 2),
            ("require-concurrent-index-creation", 3),
            ("renaming-column", 4),
            ("changing-column-type", 5),
        ] {
            assert!(got.contains(&expected), "{expected:?} not in {got:?}");
        }
        assert!(
            !got.iter().any(|(r, _)| *r == "require-lock-timeout"),
            "{got:?}"
        );
        let shown = found[0].to_string();
        assert!(shown.starts_with("V2__x.sql:"), "{shown}");
    }

    #[test]
    fn knows_which_files_run_in_a_transaction() {
        let cic = "CREATE INDEX CONCURRENTLY t_a ON big (a);\n";
        let found = lint("V3__i.sql", cic, &LintOptions::default());
        let f = found
            .iter()
            .find(|f| f.rule == "ban-concurrent-index-creation-in-transaction")
            .unwrap_or_else(|| panic!("{found:?}"));
        assert!(
            f.help
                .as_deref()
                .unwrap()
                .contains("cutover:no-transaction")
        );
        let marked = format!("{}\n{cic}", super::super::NO_TRANSACTION_MARKER);
        let found = lint("V3__i.sql", &marked, &LintOptions::default());
        assert!(
            !found
                .iter()
                .any(|f| f.rule == "ban-concurrent-index-creation-in-transaction"),
            "{found:?}"
        );
    }

    #[test]
    fn lock_timeout_rule_can_be_turned_on() {
        let opts = LintOptions {
            include: vec!["require-lock-timeout".into()],
            ..LintOptions::default()
        };
        let found = lint("V4__a.sql", "ALTER TABLE big ADD COLUMN d int;\n", &opts);
        assert!(
            found.iter().any(|f| f.rule == "require-lock-timeout"),
            "{found:?}"
        );
        assert!(
            active_rules(&opts)
                .unwrap()
                .contains(&"require-lock-timeout".into())
        );
        assert!(
            !active_rules(&LintOptions::default())
                .unwrap()
                .contains(&"require-lock-timeout".into())
        );
        let bad = LintOptions {
            exclude: vec!["no-such-rule".into()],
            ..LintOptions::default()
        };
        assert!(active_rules(&bad).is_err());
    }
}
