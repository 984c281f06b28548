//! Just enough of PostgreSQL's lexical structure to split a no-transaction file into statements
//! (PostgreSQL runs a multi-statement query string as one implicit transaction, which
//! `CREATE INDEX CONCURRENTLY` refuses) and to recognise the statements that get special care.
//! This is not a parser: it knows comments, quotes, dollar quotes and semicolons.

/// What a token is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A keyword or unquoted identifier, folded to lower case as PostgreSQL does.
    Word(String),
    /// A `"quoted identifier"`, unescaped.
    QuotedIdent(String),
    /// A string or dollar-quoted literal.
    Literal,
    /// Anything else, one character at a time (`;`, `(`, `.`, operators, digits).
    Punct(char),
}

/// A token and where it is in the text (byte offsets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// The kind.
    pub kind: TokenKind,
    /// Byte offset of the first character.
    pub start: usize,
    /// Byte offset after the last character.
    pub end: usize,
}

/// Splits `sql` into tokens, skipping whitespace and comments. Unterminated quotes and
/// comments run to the end of the text (PostgreSQL will report them).
pub fn tokens(sql: &str) -> Vec<Token> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            _ if c.is_ascii_whitespace() => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                // E'...' strings take backslash escapes.
                let escapes = matches!(out.last(), Some(Token { kind: TokenKind::Word(w), end, .. })
                    if *end == start && w == "e");
                if escapes {
                    out.pop();
                }
                i = skip_quoted(b, i, b'\'', escapes);
                out.push(Token {
                    kind: TokenKind::Literal,
                    start,
                    end: i,
                });
            }
            b'"' => {
                i = skip_quoted(b, i, b'"', false);
                let inner = &sql[start + 1..i.saturating_sub(1).max(start + 1)];
                out.push(Token {
                    kind: TokenKind::QuotedIdent(inner.replace("\"\"", "\"")),
                    start,
                    end: i,
                });
            }
            b'$' if dollar_tag(b, i).is_some() => {
                let tag_len = dollar_tag(b, i).unwrap_or(2);
                let tag = &b[i..i + tag_len];
                i += tag_len;
                loop {
                    if i >= b.len() {
                        break;
                    }
                    if b[i..].starts_with(tag) {
                        i += tag_len;
                        break;
                    }
                    i += 1;
                }
                out.push(Token {
                    kind: TokenKind::Literal,
                    start,
                    end: i,
                });
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'_'
                        || b[i] == b'$'
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                out.push(Token {
                    kind: TokenKind::Word(sql[start..i].to_lowercase()),
                    start,
                    end: i,
                });
            }
            _ => {
                let ch = sql[i..].chars().next().unwrap_or('\0');
                i += ch.len_utf8();
                out.push(Token {
                    kind: TokenKind::Punct(ch),
                    start,
                    end: i,
                });
            }
        }
    }
    out
}

/// Index after the closing quote; a doubled quote is an escaped one.
fn skip_quoted(b: &[u8], open: usize, quote: u8, backslash: bool) -> usize {
    let mut i = open + 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// Length of a dollar-quote tag (`$$`, `$body$`) starting at `i`, if there is one. `$1` is a
/// parameter, not a tag.
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if b.get(j).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        j += 1;
    }
    (b.get(j) == Some(&b'$')).then_some(j + 1 - i)
}

/// One statement of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement<'a> {
    /// The text, from its first token through its terminating `;` (if any).
    pub text: &'a str,
    /// 1-based line of its first token in the file.
    pub line: u32,
    /// Its tokens (offsets relative to the file).
    pub tokens: Vec<Token>,
}

/// Splits a file at top-level semicolons. Empty statements (only comments) are dropped.
pub fn statements(sql: &str) -> Vec<Statement<'_>> {
    let mut out = Vec::new();
    let mut current: Vec<Token> = Vec::new();
    let mut flush = |current: &mut Vec<Token>, end: usize| {
        let Some(first) = current.first() else { return };
        let start = first.start;
        out.push(Statement {
            text: &sql[start..end],
            line: line_of(sql, start),
            tokens: std::mem::take(current),
        });
    };
    for token in tokens(sql) {
        if token.kind == TokenKind::Punct(';') {
            let end = token.end;
            flush(&mut current, end);
            current.clear();
        } else {
            current.push(token);
        }
    }
    let end = current.last().map_or(0, |t| t.end);
    flush(&mut current, end);
    out
}

/// 1-based line number of byte offset `offset`.
pub fn line_of(sql: &str, offset: usize) -> u32 {
    let upto = &sql.as_bytes()[..offset.min(sql.len())];
    u32::try_from(upto.iter().filter(|&&c| c == b'\n').count() + 1).unwrap_or(u32::MAX)
}

/// What the runner needs to know about a `CREATE INDEX CONCURRENTLY` statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConcurrentIndex {
    /// The index name as PostgreSQL will store it, when the statement names it.
    pub index: Option<String>,
    /// The table as written (quoted, maybe schema-qualified), for `to_regclass`.
    pub table: String,
    /// Whether it says `IF NOT EXISTS` (which would skip an invalid leftover index).
    pub if_not_exists: bool,
}

/// How a statement touches locks, for the statements the runner treats specially.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Special {
    /// `CREATE [UNIQUE] INDEX CONCURRENTLY …`.
    CreateIndexConcurrently(ConcurrentIndex),
    /// `DROP INDEX CONCURRENTLY` or `REINDEX … CONCURRENTLY`: waits for other transactions but
    /// never blocks the application's reads and writes.
    OtherConcurrent,
}

fn word(t: Option<&Token>) -> Option<&str> {
    match t.map(|t| &t.kind) {
        Some(TokenKind::Word(w)) => Some(w),
        _ => None,
    }
}

/// Recognises the statements that wait for other transactions by design.
pub fn classify(stmt: &Statement<'_>, sql: &str) -> Option<Special> {
    let t = &stmt.tokens;
    let w = |i: usize| word(t.get(i));
    match w(0)? {
        "create" => {
            let mut i = 1;
            if w(i) == Some("unique") {
                i += 1;
            }
            if w(i) != Some("index") || w(i + 1) != Some("concurrently") {
                return None;
            }
            i += 2;
            let mut if_not_exists = false;
            if w(i) == Some("if") && w(i + 1) == Some("not") && w(i + 2) == Some("exists") {
                if_not_exists = true;
                i += 3;
            }
            let index = match t.get(i).map(|t| &t.kind) {
                Some(TokenKind::Word(n)) if n != "on" => Some(n.clone()),
                Some(TokenKind::QuotedIdent(n)) => Some(n.clone()),
                _ => None,
            };
            if index.is_some() {
                i += 1;
            }
            if w(i) != Some("on") {
                return None;
            }
            i += 1;
            if w(i) == Some("only") {
                i += 1;
            }
            // The table: name tokens joined by dots.
            let first = t.get(i)?;
            let mut last = first;
            let mut j = i;
            while let Some(TokenKind::Punct('.')) = t.get(j + 1).map(|t| &t.kind) {
                last = t.get(j + 2)?;
                j += 2;
            }
            Some(Special::CreateIndexConcurrently(ConcurrentIndex {
                index,
                table: sql[first.start..last.end].to_owned(),
                if_not_exists,
            }))
        }
        "drop" if w(1) == Some("index") && w(2) == Some("concurrently") => {
            Some(Special::OtherConcurrent)
        }
        "reindex"
            if t.iter()
                .take(4)
                .any(|t| word(Some(t)) == Some("concurrently")) =>
        {
            Some(Special::OtherConcurrent)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_top_level_semicolons_only() {
        let sql = "-- header; not a statement\nCREATE TABLE a (x text DEFAULT 'a;b');\n\
                   /* c; /* nested; */ */ INSERT INTO a VALUES (E'\\';'), ($q$;$q$);\n\
                   CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$;\n\
                   SELECT \"we;ird\" FROM a\n";
        let stmts = statements(sql);
        let texts: Vec<&str> = stmts.iter().map(|s| s.text).collect();
        assert_eq!(texts.len(), 4, "{texts:#?}");
        assert!(texts[0].starts_with("CREATE TABLE a") && texts[0].ends_with(';'));
        assert!(texts[1].starts_with("INSERT INTO a"));
        assert!(texts[2].contains("RETURN 1; END $$;"));
        assert_eq!(texts[3], "SELECT \"we;ird\" FROM a");
        assert_eq!(
            stmts.iter().map(|s| s.line).collect::<Vec<_>>(),
            [2, 3, 4, 5]
        );
        assert!(statements("-- only a comment\n;;\n").is_empty());
    }

    #[test]
    fn recognises_concurrent_index_statements() {
        let sql = "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS \"Orders_Key\" ON ONLY shop.\"Orders\" (id)";
        let s = &statements(sql)[0];
        assert_eq!(
            classify(s, sql),
            Some(Special::CreateIndexConcurrently(ConcurrentIndex {
                index: Some("Orders_Key".into()),
                table: "shop.\"Orders\"".into(),
                if_not_exists: true,
            }))
        );
        let sql = "create index concurrently on t using btree (a)";
        let s = &statements(sql)[0];
        assert_eq!(
            classify(s, sql),
            Some(Special::CreateIndexConcurrently(ConcurrentIndex {
                index: None,
                table: "t".into(),
                if_not_exists: false,
            }))
        );
        let sql =
            "CREATE INDEX Idx ON t (a); DROP INDEX CONCURRENTLY x; REINDEX INDEX CONCURRENTLY y";
        let kinds: Vec<_> = statements(sql).iter().map(|s| classify(s, sql)).collect();
        assert_eq!(
            kinds,
            [
                None,
                Some(Special::OtherConcurrent),
                Some(Special::OtherConcurrent)
            ]
        );
    }
}
