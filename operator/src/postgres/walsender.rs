//! A replication-protocol connection (`replication=database`) to the source, for the one
//! command the SQL interface lacks: `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`, which
//! creates the forward slot and exports a snapshot that sees exactly the transactions committed
//! before the slot's consistent point. The parallel copy reads every table in that snapshot, and
//! the subscription then streams from the slot: nothing is missed, nothing applied twice.
//!
//! tokio-postgres does not speak the replication protocol, so this is a small client over
//! `postgres-protocol`'s message codecs: startup, authentication (cleartext, MD5, SCRAM-SHA-256),
//! TLS as [`super::connect`] configures it, and simple queries. The snapshot stays valid only
//! while this connection is open and sends nothing else, so [`ExportedSlot`] holds it idle until
//! the copy is done.
//!
//! The same client, in an ordinary session, reads the copy's `COPY … TO STDOUT` streams: the
//! server sends one message per row, and [`WalsenderConnection::copy_out`] hands the rows on in
//! large slices of its read buffer, without a message object, an allocation or a hand-off
//! between tasks per row (about half the relay's CPU).

use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::PgLsn;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::connect::{ConnectError, ConnectOptions, Dsn, TlsMode, describe, parse, tls_config};
use super::ident::quote_ident;

/// Why the replication connection failed.
#[derive(Debug, Error)]
pub enum WalsenderError {
    /// The connection string or TLS settings were refused before connecting.
    #[error(transparent)]
    Config(#[from] ConnectError),
    /// The network failed (connect, read, write, TLS handshake) or a limit passed.
    #[error("failed to talk to {server} over the replication protocol: {reason}")]
    Io {
        /// The redacted server.
        server: String,
        /// What happened.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{severity}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        /// `ERROR`, `FATAL`.
        severity: String,
        /// The SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
        /// Its detail, if any.
        detail: Option<String>,
    },
    /// The server sent something this client does not expect.
    #[error("unexpected reply over the replication protocol: {0}")]
    Protocol(String),
}

impl WalsenderError {
    /// The SQLSTATE, when the server gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether trying again may help (the network, a server restarting, too many connections).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Io { .. } => true,
            Self::Server { code, .. } => crate::engine::sqlstate_transient(code),
            Self::Config(_) | Self::Protocol(_) => false,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open replication-protocol session.
pub struct WalsenderConnection {
    stream: Box<dyn Stream>,
    buf: BytesMut,
    server: String,
    pid: i32,
    server_version: i32,
    copy: Option<CopyOut>,
}

/// A `COPY … TO STDOUT` under way.
#[derive(Default)]
struct CopyOut {
    rows: BytesMut,
    error: Option<WalsenderError>,
}

impl std::fmt::Debug for WalsenderConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalsenderConnection")
            .field("server", &self.server)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// A row of a simple query's result, every value as text.
pub type TextRow = Vec<Option<String>>;

impl WalsenderConnection {
    /// Connects to the server of `dsn` as a logical-replication session of its database.
    pub async fn connect(dsn: &Dsn, opts: &ConnectOptions) -> Result<Self, WalsenderError> {
        Self::open(dsn, opts, true).await
    }

    /// Connects to the server of `dsn` as an ordinary session (for [`Self::copy_out`]).
    pub async fn connect_plain(dsn: &Dsn, opts: &ConnectOptions) -> Result<Self, WalsenderError> {
        Self::open(dsn, opts, false).await
    }

    async fn open(
        dsn: &Dsn,
        opts: &ConnectOptions,
        replication: bool,
    ) -> Result<Self, WalsenderError> {
        let (config, tls_mode) = parse(dsn.expose())?;
        let server = describe(&config);
        let io = |reason: String| WalsenderError::Io {
            server: server.clone(),
            reason,
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let (stream, host): (Box<dyn Stream>, String) = match config.get_hosts().first() {
            Some(Host::Unix(dir)) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::time::timeout(
                    opts.connect_timeout,
                    tokio::net::UnixStream::connect(&path),
                )
                .await
                .map_err(|_| io("connect timed out".into()))?
                .map_err(|e| io(e.to_string()))?;
                (Box::new(s), "localhost".into())
            }
            host => {
                let host = match host {
                    Some(Host::Tcp(h)) => h.clone(),
                    _ => "localhost".into(),
                };
                let s = tokio::time::timeout(
                    opts.connect_timeout,
                    tokio::net::TcpStream::connect((host.as_str(), port)),
                )
                .await
                .map_err(|_| io("connect timed out".into()))?
                .map_err(|e| io(e.to_string()))?;
                let _ = s.set_nodelay(true);
                (Box::new(s), host)
            }
        };
        let mut conn = Self {
            stream,
            buf: BytesMut::new(),
            server: server.clone(),
            pid: 0,
            server_version: 0,
            copy: None,
        };
        let tls = tls_mode != TlsMode::Disable
            && !matches!(config.get_hosts().first(), Some(Host::Unix(_)));
        if tls {
            conn = conn.start_tls(tls_mode, opts, &host).await?;
        }
        let user = config
            .get_user()
            .ok_or_else(|| WalsenderError::Protocol("the connection string names no user".into()))?
            .to_owned();
        let db = config.get_dbname().unwrap_or(&user).to_owned();
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &user),
            ("database", &db),
            ("application_name", &opts.application_name),
            ("client_encoding", "UTF8"),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        if let Some(o) = config.get_options() {
            params.push(("options", o));
        }
        let mut out = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut out)
            .map_err(|e| io(e.to_string()))?;
        conn.send(&out).await?;
        let password = config.get_password().map(<[u8]>::to_vec);
        tokio::time::timeout(
            opts.connect_timeout,
            conn.authenticate(&user, password, tls),
        )
        .await
        .map_err(|_| io("authentication timed out".into()))??;
        Ok(conn)
    }

    async fn start_tls(
        mut self,
        mode: TlsMode,
        opts: &ConnectOptions,
        host: &str,
    ) -> Result<Self, WalsenderError> {
        let mut out = BytesMut::new();
        frontend::ssl_request(&mut out);
        self.send(&out).await?;
        let mut answer = [0u8; 1];
        self.stream
            .read_exact(&mut answer)
            .await
            .map_err(|e| self.io(e.to_string()))?;
        if answer[0] != b'S' {
            if mode == TlsMode::Prefer {
                return Ok(self);
            }
            return Err(self.io("the server does not offer TLS".into()));
        }
        let mut make = MakeRustlsConnect::new(tls_config(mode, opts.ca_pem.as_deref())?);
        let connect = <MakeRustlsConnect as MakeTlsConnect<Box<dyn Stream>>>::make_tls_connect(
            &mut make, host,
        )
        .map_err(|e| self.io(e.to_string()))?;
        let server = self.server.clone();
        let stream = connect
            .connect(self.stream)
            .await
            .map_err(|e| WalsenderError::Io {
                server: server.clone(),
                reason: format!("TLS handshake: {e}"),
            })?;
        Ok(Self {
            stream: Box::new(stream),
            buf: self.buf,
            server,
            pid: 0,
            server_version: 0,
            copy: None,
        })
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<Vec<u8>>,
        tls: bool,
    ) -> Result<(), WalsenderError> {
        let need_password = || {
            WalsenderError::Protocol(
                "the server asks for a password the connection string lacks".into(),
            )
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let mut out = BytesMut::new();
            match self.receive().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = password.as_deref().ok_or_else(need_password)?;
                    frontend::password_message(pw, &mut out).map_err(|e| self.io(e.to_string()))?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = password.as_deref().ok_or_else(need_password)?;
                    let hash = md5_hash(user.as_bytes(), pw, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|e| self.io(e.to_string()))?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let pw = password.as_deref().ok_or_else(need_password)?;
                    let mut offered = false;
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms.next().map_err(|e| self.io(e.to_string()))? {
                        offered |= m == sasl::SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(WalsenderError::Protocol(
                            "the server offers no SASL mechanism this client knows".into(),
                        ));
                    }
                    let binding = if tls {
                        sasl::ChannelBinding::unrequested()
                    } else {
                        sasl::ChannelBinding::unsupported()
                    };
                    let s = sasl::ScramSha256::new(pw, binding);
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)
                        .map_err(|e| self.io(e.to_string()))?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| WalsenderError::Protocol("SASL out of order".into()))?;
                    s.update(body.data())
                        .map_err(|e| WalsenderError::Protocol(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut out)
                        .map_err(|e| self.io(e.to_string()))?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| WalsenderError::Protocol("SASL out of order".into()))?;
                    s.finish(body.data())
                        .map_err(|e| WalsenderError::Protocol(format!("SCRAM: {e}")))?;
                }
                backend::Message::BackendKeyData(body) => self.pid = body.process_id(),
                backend::Message::ParameterStatus(body) => {
                    if body.name().ok() == Some("server_version") {
                        self.server_version = version_num(body.value().unwrap_or_default());
                    }
                }
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::NoticeResponse(_) => {}
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {
                    return Err(WalsenderError::Protocol(
                        "an authentication method this client does not support".into(),
                    ));
                }
            }
            if !out.is_empty() {
                self.send(&out).await?;
            }
        }
    }

    /// The walsender's process id on the server (`pg_stat_activity.pid`).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// `server_version_num` of the server (for example 150004).
    pub fn server_version(&self) -> i32 {
        self.server_version
    }

    /// Runs one statement by the simple-query protocol and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, WalsenderError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| self.io(e.to_string()))?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.receive().await? {
                backend::Message::DataRow(body) => {
                    let buffer = body.buffer();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(range) = ranges.next().map_err(|e| self.io(e.to_string()))? {
                        row.push(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()));
                    }
                    rows.push(row);
                }
                backend::Message::ErrorResponse(body) => error = Some(server_error(&body)),
                backend::Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Starts `COPY … TO STDOUT`; [`Self::copy_out_next`] then returns its rows.
    pub async fn copy_out_start(&mut self, sql: &str) -> Result<(), WalsenderError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| self.io(e.to_string()))?;
        self.copy = Some(CopyOut::default());
        self.send(&out).await
    }

    /// The next rows of the `COPY … TO STDOUT` started: whole rows (COPY's own format) of at
    /// least `batch` bytes, the last ones shorter; `None` once the server has sent everything
    /// and is ready again.
    pub async fn copy_out_next(
        &mut self,
        batch: usize,
    ) -> Result<Option<bytes::Bytes>, WalsenderError> {
        loop {
            let Some(copy) = self.copy.as_mut() else {
                return Ok(None);
            };
            // Whole CopyData messages in the buffer are taken without parsing them further.
            while self.buf.len() >= 5 && self.buf[0] == b'd' {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() < 1 + len {
                    break;
                }
                copy.rows.extend_from_slice(&self.buf[5..1 + len]);
                bytes::Buf::advance(&mut self.buf, 1 + len);
            }
            if copy.rows.len() >= batch {
                return Ok(Some(copy.rows.split().freeze()));
            }
            if self.buf.len() >= 5 && self.buf[0] != b'd' {
                let parsed =
                    backend::Message::parse(&mut self.buf).map_err(|e| self.io(e.to_string()))?;
                let copy = self.copy.as_mut().expect("a copy runs");
                match parsed {
                    Some(backend::Message::ErrorResponse(body)) => {
                        copy.error = Some(server_error(&body));
                    }
                    Some(backend::Message::ReadyForQuery(_)) => {
                        let done = self.copy.take().expect("a copy runs");
                        if let Some(e) = done.error {
                            return Err(e);
                        }
                        return Ok((!done.rows.is_empty()).then(|| done.rows.freeze()));
                    }
                    Some(_) => {}
                    None => self.fill().await?,
                }
                continue;
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), WalsenderError> {
        if self.buf.capacity() - self.buf.len() < 64 * 1024 {
            self.buf.reserve(256 * 1024);
        }
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| self.io(e.to_string()))?;
        if n == 0 {
            return Err(self.io("the server closed the connection".into()));
        }
        Ok(())
    }

    /// Ends the session politely (the server then releases what it held, the exported
    /// snapshot included).
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.shutdown().await;
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), WalsenderError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| self.io(e.to_string()))?;
        self.stream
            .flush()
            .await
            .map_err(|e| self.io(e.to_string()))
    }

    async fn receive(&mut self) -> Result<backend::Message, WalsenderError> {
        loop {
            if let Some(m) =
                backend::Message::parse(&mut self.buf).map_err(|e| self.io(e.to_string()))?
            {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    fn io(&self, reason: String) -> WalsenderError {
        WalsenderError::Io {
            server: self.server.clone(),
            reason,
        }
    }
}

fn server_error(body: &backend::ErrorResponseBody) -> WalsenderError {
    let (mut severity, mut code, mut message, mut detail) =
        (String::from("ERROR"), String::new(), String::new(), None);
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'V' => severity = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'D' => detail = Some(String::from_utf8_lossy(f.value_bytes()).into_owned()),
            _ => {}
        }
    }
    WalsenderError::Server {
        severity,
        code,
        message,
        detail,
    }
}

/// `15.4` → 150004, `18.6 (Debian …)` → 180006, `9.6.3` → 90603.
fn version_num(text: &str) -> i32 {
    let numbers: Vec<i32> = text
        .split(|c: char| !c.is_ascii_digit())
        .take_while(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect();
    match numbers.as_slice() {
        [major, minor, ..] if *major >= 10 => major * 10_000 + minor,
        [major] if *major >= 10 => major * 10_000,
        [major, minor, patch, ..] => major * 10_000 + minor * 100 + patch,
        _ => 0,
    }
}

/// A logical slot just created with an exported snapshot, and the idle session keeping that
/// snapshot importable (`SET TRANSACTION SNAPSHOT`).
#[derive(Debug)]
pub struct ExportedSlot {
    /// The slot's consistent point: the snapshot sees every transaction committed before it,
    /// and the slot streams every transaction committed after it.
    pub consistent_point: PgLsn,
    /// The snapshot's name, for `SET TRANSACTION SNAPSHOT`.
    pub snapshot: String,
    /// The session that exported it; the snapshot lives as long as it stays open and idle.
    pub session: WalsenderConnection,
}

/// Creates the logical slot `slot` (plugin `pgoutput`) on the session's server with an
/// exported snapshot. The server first waits for every transaction running at that moment to
/// end; after `wait`, the attempt is given up (the session is closed, which discards the
/// half-made slot) and the error names what it waited for, read through `observer`.
pub async fn create_slot_exporting(
    mut session: WalsenderConnection,
    slot: &str,
    wait: Duration,
    observer: &tokio_postgres::Client,
) -> Result<ExportedSlot, WalsenderError> {
    let stmt = if session.server_version >= 150_000 {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
            quote_ident(slot)
        )
    } else {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(slot)
        )
    };
    let pid = session.pid;
    let server = session.server.clone();
    let rows = match tokio::time::timeout(wait, session.simple_query(&stmt)).await {
        Ok(r) => r?,
        Err(_) => {
            let blockers = transactions_older_than_slot(observer, pid).await;
            session.close().await;
            return Err(WalsenderError::Io {
                server,
                reason: format!(
                    "creating replication slot {slot} waited {wait:?} for transactions running \
                     on the source to end: {blockers}"
                ),
            });
        }
    };
    let row = rows.first().ok_or_else(|| {
        WalsenderError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
    })?;
    let field = |i: usize, what: &str| {
        row.get(i).cloned().flatten().ok_or_else(|| {
            WalsenderError::Protocol(format!("CREATE_REPLICATION_SLOT gave no {what}"))
        })
    };
    let consistent_point: PgLsn = field(1, "consistent point")?
        .parse()
        .map_err(|_| WalsenderError::Protocol("an unreadable consistent point".into()))?;
    let snapshot = field(2, "snapshot name")?;
    Ok(ExportedSlot {
        consistent_point,
        snapshot,
        session,
    })
}

/// The transactions a slot creation by walsender `pid` waits for, for people: pid, role,
/// application and age (never the query text, which may hold data).
async fn transactions_older_than_slot(observer: &tokio_postgres::Client, pid: i32) -> String {
    let rows = observer
        .query(
            "SELECT pid, coalesce(usename::text, '?'), coalesce(application_name, ''),
                    coalesce(extract(epoch FROM now() - xact_start)::bigint, 0)
               FROM pg_stat_activity
              WHERE pid <> $1 AND pid <> pg_backend_pid()
                AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
                AND xact_start IS NOT NULL
              ORDER BY xact_start LIMIT 5",
            &[&pid],
        )
        .await;
    match rows {
        Ok(rows) if !rows.is_empty() => rows
            .iter()
            .map(|r| {
                format!(
                    "pid {} (role {}, application {:?}, open {} s)",
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, i64>(3)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        Ok(_) => "no transaction is open now".into(),
        Err(e) => format!("(could not list them: {})", super::shared::db_message(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::version_num;

    #[test]
    fn server_versions_read_as_numbers() {
        assert_eq!(version_num("15.4"), 150_004);
        assert_eq!(version_num("18.6 (Debian 18.6-1.pgdg13+1)"), 180_006);
        assert_eq!(version_num("16beta2"), 160_000);
        assert_eq!(version_num("9.6.3"), 90_603);
    }
}
