//! Settings of the PostgreSQL backend: the URL, the crate's own parameters, TLS and timings.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::ConfigError;

pub(super) const DEFAULT_SCHEMA: &str = "tower_primary";
pub(super) const DEFAULT_NAMESPACE: &str = "default";
/// How long a liveness check waits for an answer after its timeout ran out, so that a process
/// that was not running (stopped, frozen) reads the answer that is waiting before it judges.
pub(super) const ANSWER_GRACE: Duration = Duration::from_millis(100);
/// Scheduling jitter a healthy holder's liveness checks are allowed on top of their interval
/// and timeout before its fencing bound runs out.
pub(super) const JITTER: Duration = Duration::from_millis(50);
/// How often a waiting node looks for a stopped holder to end (see `stopped_after`).
pub(super) const STOPPED_CHECK_EVERY: Duration = Duration::from_secs(2);

/// How a connection is encrypted.
#[derive(Clone)]
pub(super) enum Tls {
    /// `sslmode=disable`.
    Off,
    /// rustls; whether the certificate is verified is in the connector.
    Rustls(MakeRustlsConnect),
}

/// Everything a [`PostgresBackend`](super::PostgresBackend) was configured with.
#[derive(Clone)]
pub(super) struct Settings {
    pub(super) pg: tokio_postgres::Config,
    pub(super) tls: Tls,
    /// `sslmode` as given (for `Debug`).
    pub(super) ssl_mode: &'static str,
    /// The URL with its password replaced, for messages.
    pub(super) url: String,
    pub(super) namespace: String,
    pub(super) schema: String,
    pub(super) liveness_every: Duration,
    pub(super) liveness_timeout: Duration,
    /// This node's fencing bound: recorded as `lease_ms`, the lease its liveness checks renew.
    pub(super) fencing_bound: Duration,
    /// The longest fencing bound a successor waits for (a corrupt or older record); `None`:
    /// the larger of the server's dead-peer detection and `fencing_bound`.
    pub(super) max_fencing_bound: Option<Duration>,
    pub(super) keepalive_idle: Duration,
    pub(super) keepalive_interval: Duration,
    pub(super) keepalive_count: u32,
    pub(super) connect_timeout: Duration,
    pub(super) request_timeout: Duration,
}

impl Settings {
    /// Parses a `postgres://` or `postgresql://` URL; removes the crate's parameters
    /// (`namespace`, `schema`) and the TLS ones the crate handles (`sslmode`, `sslrootcert`).
    pub(super) fn from_url(url: &str) -> Result<Self, ConfigError> {
        let invalid = |problem: String| ConfigError::InvalidBackendUrl {
            url: super::super::redact(url),
            problem,
        };
        let Some((scheme, _)) = url.split_once("://") else {
            return Err(invalid("expected postgres://… or postgresql://…".into()));
        };
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(invalid(format!(
                "scheme {scheme:?} is not postgres:// or postgresql://"
            )));
        }
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        super::url::check_head(&base[scheme.len() + 3..]).map_err(invalid)?;
        let mut namespace = DEFAULT_NAMESPACE.to_owned();
        let mut schema = DEFAULT_SCHEMA.to_owned();
        let mut ssl_mode = "prefer";
        let mut root_cert: Option<PathBuf> = None;
        let mut passed = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = percent_decode(value)
                .ok_or_else(|| invalid(format!("parameter {key:?}: bad percent-encoding")))?;
            match key {
                "namespace" => namespace = decoded,
                "schema" => schema = decoded,
                "sslmode" => {
                    ssl_mode = match decoded.as_str() {
                        "disable" => "disable",
                        "allow" | "prefer" => "prefer",
                        "require" => "require",
                        "verify-ca" => "verify-ca",
                        "verify-full" => "verify-full",
                        other => {
                            return Err(invalid(format!(
                                "sslmode {other:?}: expected disable, allow, prefer, require, \
                                 verify-ca or verify-full"
                            )));
                        }
                    }
                }
                "sslrootcert" => root_cert = Some(PathBuf::from(decoded)),
                _ => {
                    super::url::check_parameter(pair).map_err(invalid)?;
                    passed.push(pair);
                }
            }
        }
        validate_namespace(&namespace).map_err(|rule| invalid(format!("namespace: {rule}")))?;
        validate_schema(&schema).map_err(|rule| invalid(format!("schema: {rule}")))?;
        let driver_url = if passed.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", passed.join("&"))
        };
        let mut pg = tokio_postgres::Config::from_str(&driver_url).map_err(|e| {
            // The driver's own words, with their cause (checked above, so rarely seen).
            invalid(crate::error::Chain(&e).to_string())
        })?;
        let (mode, tls) = tls_for(ssl_mode, root_cert.as_deref()).map_err(invalid)?;
        pg.ssl_mode(mode);
        if pg.get_application_name().is_none() {
            pg.application_name("tower-primary");
        }
        let connect_timeout = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        Ok(Settings {
            pg,
            tls,
            ssl_mode,
            url: super::super::redact(url),
            namespace,
            schema,
            liveness_every: Duration::from_millis(150),
            liveness_timeout: Duration::from_millis(200),
            fencing_bound: Duration::from_millis(450),
            max_fencing_bound: None,
            keepalive_idle: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(1),
            keepalive_count: 2,
            connect_timeout,
            request_timeout: Duration::from_secs(5),
        })
    }

    /// How long after a partition began the server frees a silent holder's lock, at the
    /// earliest: the keepalive idle time plus `count` probes, less one liveness interval (the
    /// last liveness query may have reached the server that much before the partition).
    pub(super) fn server_detection(&self) -> Duration {
        self.keepalive_idle + self.keepalive_interval * self.keepalive_count
    }

    /// The longest a successor waits for a predecessor without a death certificate: the
    /// configured maximum, else the larger of the server's dead-peer detection (the implied
    /// lease of older versions) and this node's own bound.
    pub(super) fn max_fencing_bound(&self) -> Duration {
        self.max_fencing_bound
            .unwrap_or_else(|| self.server_detection().max(self.fencing_bound))
    }

    /// The margin the elector fences a term by before its implied lease runs out.
    pub(super) fn fencing_margin(&self) -> Duration {
        self.fencing_bound / 10
    }

    /// How long a lock session may look idle on the server before a waiting node ends it as
    /// stopped: longer than any successor waits without a query running (its predecessor's
    /// bound, at most `max_fencing_bound`) plus one liveness interval (a healthy holder's
    /// session is idle between checks).
    pub(super) fn stopped_after(&self) -> Duration {
        self.max_fencing_bound() + self.liveness_every
    }

    /// Checks the settings (at `lock()`, i.e. `spawn()` time).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |problem: String| ConfigError::InvalidBackendUrl {
            url: self.url.clone(),
            problem,
        };
        validate_namespace(&self.namespace).map_err(|r| invalid(format!("namespace: {r}")))?;
        validate_schema(&self.schema).map_err(|r| invalid(format!("schema: {r}")))?;
        for (setting, value) in [
            ("postgres liveness interval", self.liveness_every),
            ("postgres liveness timeout", self.liveness_timeout),
            ("postgres connect timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::InvalidTiming {
                    setting,
                    value,
                    rule: "must be longer than zero".into(),
                });
            }
        }
        if self.keepalive_idle < Duration::from_secs(1)
            || self.keepalive_interval < Duration::from_secs(1)
            || self.keepalive_count == 0
        {
            return Err(ConfigError::InvalidTiming {
                setting: "postgres server keepalive",
                value: self.keepalive_idle,
                rule: "idle and interval must be at least 1 s (the server counts whole seconds) \
                       and count at least 1"
                    .into(),
            });
        }
        // A partitioned holder must have stepped down before the server frees its lock.
        let step_down = self.liveness_every * 2 + self.liveness_timeout + ANSWER_GRACE;
        if step_down >= self.server_detection() {
            return Err(ConfigError::InvalidTiming {
                setting: "postgres liveness",
                value: step_down,
                rule: format!(
                    "2 × interval + timeout (+ 100 ms) must be shorter than the server's dead-peer \
                     detection (keepalive idle + interval × count = {:?}), so a partitioned \
                     holder steps down before the server frees its lock",
                    self.server_detection()
                ),
            });
        }
        // A healthy holder renews its implied lease (the bound) at every check: the next check
        // must be confirmed before the bound, less the margin, runs out.
        let healthy = self.liveness_every + self.liveness_timeout + self.fencing_margin() + JITTER;
        if self.fencing_bound <= healthy {
            return Err(ConfigError::InvalidTiming {
                setting: "postgres fencing bound",
                value: self.fencing_bound,
                rule: format!(
                    "must be longer than what a healthy holder needs between two confirmed \
                     liveness checks: interval ({:?}) + timeout ({:?}) + margin (a tenth of the \
                     bound, {:?}) + {JITTER:?} = {healthy:?}",
                    self.liveness_every,
                    self.liveness_timeout,
                    self.fencing_margin()
                ),
            });
        }
        if let Some(max) = self.max_fencing_bound
            && max < self.fencing_bound
        {
            return Err(ConfigError::InvalidTiming {
                setting: "postgres maximum fencing bound",
                value: max,
                rule: format!(
                    "must be at least this node's fencing bound ({:?})",
                    self.fencing_bound
                ),
            });
        }
        Ok(())
    }
}

/// Namespaces: 1 to 64 bytes of `[A-Za-z0-9._-]`.
impl Settings {
    /// Where the locks live, without credentials: the servers, the database, the namespace and
    /// the schema (`postgres://h1:5432,h2:5432/db?namespace=n&schema=s`). Default ports are filled
    /// in, so two spellings of one server compare equal.
    pub(super) fn address(&self) -> String {
        let ports = self.pg.get_ports();
        let servers: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                match host {
                    tokio_postgres::config::Host::Tcp(h) if h.contains(':') => {
                        format!("[{h}]:{port}")
                    }
                    tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                    tokio_postgres::config::Host::Unix(dir) => {
                        format!("{}:{port}", dir.display())
                    }
                }
            })
            .collect();
        let user = self.pg.get_user().unwrap_or_default();
        let db = self.pg.get_dbname().unwrap_or(user);
        format!(
            "postgres://{}/{db}?namespace={}&schema={}",
            servers.join(","),
            self.namespace,
            self.schema
        )
    }
}

pub(super) fn validate_namespace(ns: &str) -> Result<(), &'static str> {
    if ns.is_empty() || ns.len() > 64 {
        return Err("must be 1 to 64 bytes");
    }
    if !ns
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may only hold ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Schemas: a plain lower-case SQL identifier, so it needs no quoting rules beyond `"…"`.
pub(super) fn validate_schema(schema: &str) -> Result<(), &'static str> {
    let mut bytes = schema.bytes();
    let Some(first) = bytes.next() else {
        return Err("must not be empty");
    };
    if schema.len() > 63 {
        return Err("must be at most 63 bytes");
    }
    if !(first.is_ascii_lowercase() || first == b'_')
        || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err("must be a lower-case identifier: [a-z_][a-z0-9_]*");
    }
    Ok(())
}

pub(super) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The driver's SSL mode and the connector, as libpq reads `sslmode`: `prefer` and `require`
/// encrypt without verifying the certificate (unless `sslrootcert` is given), `verify-ca` and
/// `verify-full` verify it against the system roots and `sslrootcert` (both check the host
/// name: rustls always does).
fn tls_for(ssl_mode: &str, root_cert: Option<&std::path::Path>) -> Result<(SslMode, Tls), String> {
    if ssl_mode == "disable" {
        return Ok((SslMode::Disable, Tls::Off));
    }
    let mode = if ssl_mode == "prefer" {
        SslMode::Prefer
    } else {
        SslMode::Require
    };
    // rustls 0.23.48 deprecates the ring provider (it has no post-quantum key exchange). This
    // crate keeps ring, which builds with a plain C compiler (aws-lc-rs also needs cmake).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let verify = matches!(ssl_mode, "verify-ca" | "verify-full") || root_cert.is_some();
    let config = if verify {
        let mut roots = RootCertStore::empty();
        if matches!(ssl_mode, "verify-ca" | "verify-full") {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
        if let Some(path) = root_cert {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "sslrootcert {}: no certificate in the file",
                    path.display()
                ));
            }
            roots.add_parsable_certificates(certs);
        }
        if roots.is_empty() {
            return Err(format!(
                "sslmode={ssl_mode}: no trusted root certificate (none in the system store; \
                 give one with sslrootcert=path)"
            ));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth()
    };
    Ok((mode, Tls::Rustls(MakeRustlsConnect::new(config))))
}

/// libpq's `sslmode=prefer/require`: the channel is encrypted, the certificate is not checked
/// (the handshake signatures still are).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
    fn crate_parameters_are_taken_out_of_the_url() {
        let s = Settings::from_url(
            "postgres://u:pw@db.example:6543/app?namespace=billing&schema=locks_v1&sslmode=disable&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(s.namespace, "billing");
        assert_eq!(s.schema, "locks_v1");
        assert_eq!(s.ssl_mode, "disable");
        assert!(matches!(s.tls, Tls::Off));
        assert_eq!(s.pg.get_dbname(), Some("app"));
        assert_eq!(s.pg.get_ports(), &[6543]);
        assert_eq!(s.connect_timeout, Duration::from_secs(3));
        assert_eq!(s.pg.get_application_name(), Some("tower-primary"));
        assert!(!s.url.contains("pw"), "{}", s.url);
    }

    #[test]
    fn address_names_servers_database_namespace_and_schema_without_credentials() {
        let s = Settings::from_url(
            "postgres://u:pw@db.example:6543/app?namespace=billing&schema=locks_v1&sslmode=disable",
        )
        .unwrap();
        assert_eq!(
            s.address(),
            "postgres://db.example:6543/app?namespace=billing&schema=locks_v1"
        );
        // The default port is filled in and the database defaults to the user, as in libpq, so
        // two spellings of one election compare equal.
        let a = Settings::from_url("postgresql://root@127.0.0.1/root").unwrap();
        let b = Settings::from_url("postgres://root@127.0.0.1:5432").unwrap();
        assert_eq!(a.address(), b.address());
        assert_eq!(
            a.address(),
            "postgres://127.0.0.1:5432/root?namespace=default&schema=tower_primary"
        );
        let other = Settings::from_url("postgres://root@127.0.0.1/root?namespace=n2").unwrap();
        assert_ne!(a.address(), other.address());
    }

    #[test]
    fn defaults_follow_libpq() {
        let s = Settings::from_url("postgresql://root@127.0.0.1/test").unwrap();
        assert_eq!(s.namespace, DEFAULT_NAMESPACE);
        assert_eq!(s.schema, DEFAULT_SCHEMA);
        assert_eq!(s.ssl_mode, "prefer");
        assert_eq!(s.pg.get_ssl_mode(), SslMode::Prefer);
        assert!(matches!(s.tls, Tls::Rustls(_)));
        s.validate().unwrap();
    }

    #[test]
    fn bad_parameters_are_config_errors_without_the_password() {
        for (url, needle) in [
            ("postgres://u:hunter2@h/db?namespace=a/b", "namespace"),
            ("postgres://u:hunter2@h/db?schema=Bad-Name", "schema"),
            ("postgres://u:hunter2@h/db?sslmode=sometimes", "sslmode"),
            ("postgres://u:hunter2@h:notaport/db", "port"),
            (
                "postgres://u:hunter2@h/db?sslmode=require&sslrootcert=/nonexistent.pem",
                "sslrootcert",
            ),
            ("mysql://u:hunter2@h/db", "scheme"),
        ] {
            let err = Settings::from_url(url).err().unwrap().to_string();
            assert!(err.contains(needle), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
    }

    /// The whole message, as users read it: the bad part named, the password never.
    #[test]
    fn problems_name_the_bad_part() {
        for (url, expected) in [
            (
                "postgres://root@h:notaport/db",
                r#"invalid backend string "postgres://root@h:notaport/db": port "notaport" of host "h:notaport": expected a number from 1 to 65535"#,
            ),
            (
                "postgres://u:hunter2@h:notaport/db",
                r#"invalid backend string "postgres://u:***@h:notaport/db": port "notaport" of host "h:notaport": expected a number from 1 to 65535"#,
            ),
            (
                "postgres://root@h/db?sslmod=require",
                r#"invalid backend string "postgres://root@h/db?sslmod=require": unknown parameter "sslmod": expected one of namespace, schema, sslmode, sslrootcert, user, password, dbname, options, application_name, sslnegotiation, host, hostaddr, port, connect_timeout, tcp_user_timeout, keepalives, keepalives_idle, keepalives_interval, keepalives_retries, target_session_attrs, channel_binding, load_balance_hosts"#,
            ),
            (
                "postgres://root@h/db?connect_timeout=soon",
                r#"invalid backend string "postgres://root@h/db?connect_timeout=soon": parameter "connect_timeout": invalid value "soon", expected whole seconds"#,
            ),
            (
                "postgres://root@h/db?sslmode=sometimes",
                r#"invalid backend string "postgres://root@h/db?sslmode=sometimes": sslmode "sometimes": expected disable, allow, prefer, require, verify-ca or verify-full"#,
            ),
            (
                "postgres://root@[::1/db",
                r#"invalid backend string "postgres://root@[::1/db": host "[::1": unclosed '['"#,
            ),
            (
                "postgres://root@h/d%ZZb",
                r#"invalid backend string "postgres://root@h/d%ZZb": database name "d%ZZb": bad percent-encoding or not UTF-8"#,
            ),
            (
                "postgres://root@h/db?namespace=a/b",
                r#"invalid backend string "postgres://root@h/db?namespace=a/b": namespace: may only hold ASCII letters, digits, '.', '_' and '-'"#,
            ),
        ] {
            let err = Settings::from_url(url).err().unwrap().to_string();
            assert_eq!(err, expected, "{url}");
        }
    }

    #[test]
    fn liveness_must_beat_the_servers_dead_peer_detection() {
        let mut s = Settings::from_url("postgres://root@127.0.0.1/test").unwrap();
        s.validate().unwrap();
        s.liveness_timeout = Duration::from_secs(4);
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("dead-peer detection"), "{err}");
        s.keepalive_idle = Duration::from_secs(10);
        s.fencing_bound = Duration::from_secs(5);
        s.validate().unwrap();
    }

    #[test]
    fn the_fencing_bound_must_exceed_what_a_healthy_holder_needs() {
        let mut s = Settings::from_url("postgres://root@127.0.0.1/test").unwrap();
        // 150 ms + 200 ms + 45 ms + 50 ms < 450 ms.
        s.validate().unwrap();
        assert_eq!(s.max_fencing_bound(), Duration::from_secs(4));
        s.fencing_bound = Duration::from_millis(400);
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("fencing bound"), "{err}");
        assert!(err.contains("healthy holder"), "{err}");
        s.fencing_bound = Duration::from_secs(1);
        s.max_fencing_bound = Some(Duration::from_millis(800));
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("maximum fencing bound"), "{err}");
        s.max_fencing_bound = Some(Duration::from_secs(2));
        s.validate().unwrap();
        assert_eq!(s.stopped_after(), Duration::from_millis(2150));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb+c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
    }
}
