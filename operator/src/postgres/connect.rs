//! Connections: libpq connection strings, TLS as libpq's `sslmode` means it, and secrets kept
//! out of every log line and error.
//!
//! A [`Dsn`] holds a connection string and never prints it: `Debug` and `Display` show
//! `postgres://user@host:port/db` only. Errors name the server the same way.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A connection string that never shows its password or parameters.
#[derive(Clone, PartialEq, Eq)]
pub struct Dsn(String);

impl Dsn {
    /// Wraps a libpq connection string (URI or `key=value` form).
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into().trim().to_owned())
    }

    /// The connection string itself, for the one place that connects (and for writing the
    /// application Secret at the switch).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `postgres://user@host:port/db`, safe for logs, status and errors.
    pub fn redacted(&self) -> String {
        match parse(&self.0) {
            Ok((config, _)) => describe(&config),
            Err(_) => "<malformed connection string>".into(),
        }
    }
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dsn({})", self.redacted())
    }
}

impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// libpq's `sslmode`, which tokio-postgres only partly understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, without verifying the certificate (unless a CA is given).
    Prefer,
    /// TLS, without verifying the certificate (unless a CA is given: then as `VerifyCa`).
    Require,
    /// TLS; the certificate must chain to a trusted CA.
    VerifyCa,
    /// TLS; the certificate must chain to a trusted CA and name the host.
    VerifyFull,
}

/// How to connect, besides the connection string.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// PEM CA bundle for verifying the server (from the spec's `caSecretRef`).
    pub ca_pem: Option<Vec<u8>>,
    /// `application_name`, so DBAs see who is connected.
    pub application_name: String,
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            ca_pem: None,
            application_name: "cutover".into(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a connection could not be made. The server is named by its redacted form only.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The connection string does not parse.
    #[error("failed to parse the connection string: {reason}")]
    Malformed {
        /// What is wrong, without the string's content.
        reason: String,
    },
    /// The CA bundle does not parse.
    #[error("failed to read the CA bundle: {0}")]
    BadCa(String),
    /// The server refused or could not be reached.
    #[error("failed to connect to {server}: {}", super::shared::db_message(source))]
    Connect {
        /// The redacted server.
        server: String,
        /// The driver's error (it never contains the password).
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Connects and spawns the connection task; the connection closes when the client is dropped.
pub async fn connect(dsn: &Dsn, opts: &ConnectOptions) -> Result<Client, ConnectError> {
    let (mut config, tls_mode) = parse(dsn.expose())?;
    config.application_name(&opts.application_name);
    config.connect_timeout(opts.connect_timeout);
    let server = describe(&config);
    let wrap = |source| ConnectError::Connect {
        server: server.clone(),
        source,
    };
    if tls_mode == TlsMode::Disable {
        let (client, connection) = config.connect(NoTls).await.map_err(wrap)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        return Ok(client);
    }
    let tls = MakeRustlsConnect::new(tls_config(tls_mode, opts.ca_pem.as_deref())?);
    let (client, connection) = config.connect(tls).await.map_err(wrap)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Parses a connection string, taking `sslmode` out (tokio-postgres knows only three of libpq's
/// modes) and setting the driver's mode to match.
pub fn parse(text: &str) -> Result<(Config, TlsMode), ConnectError> {
    let (rest, mode) = take_sslmode(text);
    let mode = match mode.as_deref() {
        None | Some("prefer") | Some("allow") => TlsMode::Prefer,
        Some("disable") => TlsMode::Disable,
        Some("require") => TlsMode::Require,
        Some("verify-ca") => TlsMode::VerifyCa,
        Some("verify-full") => TlsMode::VerifyFull,
        Some(_) => {
            return Err(ConnectError::Malformed {
                reason:
                    "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full"
                        .into(),
            });
        }
    };
    let mut config = Config::from_str(&rest).map_err(|_| ConnectError::Malformed {
        reason: "expected postgres://user:password@host:port/database or key=value pairs".into(),
    })?;
    config.ssl_mode(match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    Ok((config, mode))
}

/// Removes `sslmode` from a URI's query or a `key=value` string.
fn take_sslmode(text: &str) -> (String, Option<String>) {
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        let Some((base, query)) = text.split_once('?') else {
            return (text.to_owned(), None);
        };
        let mut mode = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| match pair.split_once('=') {
                Some(("sslmode", value)) => {
                    mode = Some(value.to_owned());
                    false
                }
                _ => true,
            })
            .collect();
        let rebuilt = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rebuilt, mode)
    } else {
        let mut mode = None;
        let kept: Vec<&str> = text
            .split_whitespace()
            .filter(|pair| match pair.split_once('=') {
                Some(("sslmode", value)) => {
                    mode = Some(value.trim_matches('\'').to_owned());
                    false
                }
                _ => true,
            })
            .collect();
        (kept.join(" "), mode)
    }
}

/// The application's connection string pointed at another server: host, port and database
/// come from `target`; user, password and every other parameter stay as the application had
/// them. This is what the switch writes into the application Secret.
pub fn retarget(app: &Dsn, target: &Dsn) -> Result<Dsn, ConnectError> {
    let (target_config, _) = parse(target.expose())?;
    parse(app.expose())?;
    let host = match target_config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = target_config.get_ports().first().copied().unwrap_or(5432);
    let db = target_config.get_dbname().map(str::to_owned);
    let text = app.expose();
    let rewritten = if let Some(rest) = text
        .strip_prefix("postgres://")
        .map(|r| ("postgres://", r))
        .or_else(|| {
            text.strip_prefix("postgresql://")
                .map(|r| ("postgresql://", r))
        }) {
        let (scheme, rest) = rest;
        let (authority_and_path, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match authority_and_path.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (authority_and_path, None),
        };
        let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
        let host_text = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let mut out = String::from(scheme);
        if let Some(u) = userinfo {
            out.push_str(u);
            out.push('@');
        }
        out.push_str(&format!("{host_text}:{port}"));
        if let Some(db) = db.as_deref().or(path) {
            out.push('/');
            out.push_str(db);
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    } else {
        let mut kept: Vec<String> = text
            .split_whitespace()
            .filter(|pair| {
                !matches!(
                    pair.split_once('=').map(|(k, _)| k),
                    Some("host" | "hostaddr" | "port" | "dbname")
                )
            })
            .map(str::to_owned)
            .collect();
        kept.push(format!("host={host}"));
        kept.push(format!("port={port}"));
        if let Some(db) = db {
            kept.push(format!("dbname={db}"));
        }
        kept.join(" ")
    };
    Ok(Dsn::new(rewritten))
}

/// `postgres://user@host:port/db` — what logs and errors may say about a server.
pub fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("?");
    let db = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{host}:{port}/{db}")
}

pub(crate) fn tls_config(
    mode: TlsMode,
    ca_pem: Option<&[u8]>,
) -> Result<rustls::ClientConfig, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::BadCa(e.to_string()))?;
    // libpq: with a root certificate, `require` verifies the chain like `verify-ca`.
    let mode = match (mode, ca_pem) {
        (TlsMode::Require | TlsMode::Prefer, Some(_)) => TlsMode::VerifyCa,
        (m, _) => m,
    };
    let config = match mode {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth(),
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let roots = Arc::new(root_store(ca_pem)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| ConnectError::BadCa(e.to_string()))?;
            let verifier: Arc<dyn ServerCertVerifier> = if mode == TlsMode::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(config)
}

fn root_store(ca_pem: Option<&[u8]>) -> Result<RootCertStore, ConnectError> {
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            let mut reader = pem;
            for cert in rustls_pemfile::certs(&mut reader) {
                let cert = cert.map_err(|e| ConnectError::BadCa(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| ConnectError::BadCa(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ConnectError::BadCa(
                    "no PEM certificate in the CA bundle".into(),
                ));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(roots)
}

/// `verify-ca`: the chain must be trusted; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` / `prefer` without a CA: encrypted, not authenticated — what libpq does.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_form_hides_password_and_parameters() {
        let dsn = Dsn::new(
            "postgres://app:s3cret@db.internal:6543/orders?sslmode=verify-full&options=-c%20x",
        );
        assert_eq!(dsn.redacted(), "postgres://app@db.internal:6543/orders");
        assert!(!format!("{dsn:?} {dsn}").contains("s3cret"));
    }

    #[test]
    fn key_value_strings_work_too() {
        let dsn = Dsn::new(
            "host=10.0.0.5 port=5433 user=admin password=hunter2 dbname=shop sslmode=require",
        );
        assert_eq!(dsn.redacted(), "postgres://admin@10.0.0.5:5433/shop");
        let (_, mode) = parse(dsn.expose()).unwrap();
        assert_eq!(mode, TlsMode::Require);
    }

    #[test]
    fn libpq_ssl_modes_are_understood() {
        for (text, mode) in [
            ("postgres://u@h/d", TlsMode::Prefer),
            ("postgres://u@h/d?sslmode=disable", TlsMode::Disable),
            ("postgres://u@h/d?sslmode=verify-ca", TlsMode::VerifyCa),
            (
                "postgres://u@h/d?connect_timeout=3&sslmode=verify-full",
                TlsMode::VerifyFull,
            ),
        ] {
            assert_eq!(parse(text).unwrap().1, mode, "{text}");
        }
        assert!(parse("postgres://u@h/d?sslmode=sometimes").is_err());
    }

    #[test]
    fn retarget_keeps_the_application_credentials() {
        let app = Dsn::new(
            "postgres://orders_app:p%40ss@blue.db:5432/orders?sslmode=require&application_name=api",
        );
        let green = Dsn::new("postgres://admin:other@green.db:6432/orders_v2");
        let moved = retarget(&app, &green).unwrap();
        assert_eq!(
            moved.expose(),
            "postgres://orders_app:p%40ss@green.db:6432/orders_v2?sslmode=require&application_name=api"
        );
        // And back again.
        assert_eq!(
            retarget(&moved, &Dsn::new("postgres://x@blue.db:5432/orders"))
                .unwrap()
                .expose(),
            app.expose()
        );

        let kv = Dsn::new("host=blue.db port=5432 user=orders_app password=pw dbname=orders");
        assert_eq!(
            retarget(&kv, &green).unwrap().expose(),
            "user=orders_app password=pw host=green.db port=6432 dbname=orders_v2"
        );
    }

    #[test]
    fn malformed_strings_do_not_echo_their_content() {
        let err = parse("postgres://app:s3cret@host:notaport/db").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert_eq!(
            Dsn::new("postgres://app:s3cret@host:notaport/db").redacted(),
            "<malformed connection string>"
        );
    }
}
