//! The self-healing connection, and the driver's errors in our words: what is wrong, classified
//! as a permanent misconfiguration ([`Error::Misconfigured`]) where retrying will not fix it.

use std::error::Error as _;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, ConnectionAddr, ErrorKind, RedisError, RedisResult, ServerErrorKind};

use super::NAME;
use crate::error::{Error, Misconfiguration};

/// A lazily opened, self-healing connection: a stuck or broken connection is dropped and the next
/// call opens a new one (also on the current tokio runtime).
pub(super) struct Conn {
    client: Client,
    manager: Mutex<Option<ConnectionManager>>,
}

impl Conn {
    pub(super) fn new(client: Client) -> Self {
        Conn {
            client,
            manager: Mutex::new(None),
        }
    }

    fn manager(&self) -> RedisResult<ConnectionManager> {
        let mut slot = crate::sync::lock(&self.manager);
        if let Some(m) = &*slot {
            return Ok(m.clone());
        }
        // Our own timeouts bound every call; the driver only retries a reconnect briefly.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let m = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        *slot = Some(m.clone());
        Ok(m)
    }

    /// The database index of the backend string.
    fn db(&self) -> i64 {
        self.client.get_connection_info().redis_settings().db()
    }

    fn reset(&self) {
        *crate::sync::lock(&self.manager) = None;
    }

    /// Runs `f` on the connection, for at most `limit`.
    pub(super) async fn run<T, F, Fut>(&self, what: &str, limit: Duration, f: F) -> Result<T, Error>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let manager = self
            .manager()
            .map_err(|e| classify(&format!("{what}: cannot connect"), e, self.db()))?;
        match tokio::time::timeout(limit, f(manager)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let broken = e.is_io_error() || e.is_connection_dropped() || e.is_timeout();
                if broken {
                    self.reset();
                }
                let err = classify(what, e, self.db());
                // A TLS error, too, may come from a server that does not speak TLS: say so
                // when it answers plain text.
                if broken && matches!(err.misconfiguration(), None | Some(Misconfiguration::Tls)) {
                    return Err(self.plain_text_server(what).await.unwrap_or(err));
                }
                Err(err)
            }
            Err(_) => {
                self.reset();
                let err = Error::backend_msg(NAME, format!("{what}: no reply within {limit:?}"));
                Err(self.plain_text_server(what).await.unwrap_or(err))
            }
        }
    }

    /// With `rediss://`, whether the server answers plain text: a TLS client then waits for a
    /// handshake that never comes, or reads a reply it cannot decrypt. `None` without TLS, or
    /// when the server does not answer plain text either.
    async fn plain_text_server(&self, what: &str) -> Option<Error> {
        let ConnectionAddr::TcpTls { host, port, .. } = self.client.get_connection_info().addr()
        else {
            return None;
        };
        let (host, port) = (host.clone(), *port);
        let target = format!("{host}:{port}");
        let plain = tokio::task::spawn_blocking(move || answers_plain_text(&target))
            .await
            .unwrap_or(false);
        plain.then(|| {
            Error::misconfigured(
                NAME,
                Misconfiguration::Tls,
                format!(
                    "{what}: the server at {host}:{port} answers without TLS and may not speak \
                     TLS: use redis:// instead of rediss://, or enable TLS on the server"
                ),
                None,
            )
        })
    }
}

/// Whether the server at `target` answers a plain-text `PING` as Redis does (`+PONG`, or an
/// error such as `-NOAUTH`).
fn answers_plain_text(target: &str) -> bool {
    let limit = Duration::from_millis(500);
    let Some(addr) = target.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, limit) else {
        return false;
    };
    let mut reply = [0u8; 1];
    s.set_read_timeout(Some(limit)).is_ok()
        && s.write_all(b"PING\r\n").is_ok()
        && s.read_exact(&mut reply).is_ok()
        && matches!(reply[0], b'+' | b'-')
}

/// The driver's error as the source of ours: its text without the driver's type names, each
/// cause once.
#[derive(Debug)]
pub(super) struct DriverError(pub(super) RedisError);

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(&self.0))
    }
}

impl std::error::Error for DriverError {}

/// The text of a driver error, in the server's or the operating system's words.
fn describe(e: &RedisError) -> String {
    let shown = e.to_string();
    // The driver's own errors read "<description> - <kind>[: <detail>]".
    let kind = format!(" - {:?}", e.kind());
    if let Some(i) = shown.find(&kind) {
        return format!("{}{}", &shown[..i], &shown[i + kind.len()..]);
    }
    // A server's error: its code and its words, e.g. `WRONGPASS invalid username-password pair`.
    if let Some(code) = e.code() {
        return match e.detail() {
            Some(detail) => format!("{code} {detail}"),
            None => code.to_owned(),
        };
    }
    // An I/O or TLS error: the driver shows its cause, which is also its source.
    let mut text = shown;
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        source = s.source();
    }
    text
}

/// Our error for a driver error, classified: a refusal that retrying will not fix is
/// [`Error::Misconfigured`], naming what to change; anything else is [`Error::Backend`].
pub(super) fn classify(what: &str, e: RedisError, db: i64) -> Error {
    let misconfigured = |kind, problem: &str| {
        Error::misconfigured(
            NAME,
            kind,
            format!("{what}: {problem}"),
            Some(Box::new(DriverError(e.clone()))),
        )
    };
    let detail = e.detail().unwrap_or_default();
    if e.kind() == ErrorKind::AuthenticationFailed || e.code() == Some("WRONGPASS") {
        return misconfigured(
            Misconfiguration::Authentication,
            "the server refused the user name or password of the backend string",
        );
    }
    // Redis closes an unauthenticated connection that sends a long command with "Protocol
    // error: unauthenticated multibulk length" rather than NOAUTH.
    if e.code() == Some("NOAUTH") || detail.contains("unauthenticated") {
        return misconfigured(
            Misconfiguration::Authentication,
            "the server requires a password; give it in the backend string \
             (redis://[user]:password@host)",
        );
    }
    if e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) || e.code() == Some("NOPERM") {
        return misconfigured(
            Misconfiguration::Permission,
            "the server's ACL denies the backend string's user a command or key the backend \
             needs (scripts, INFO, TIME, PUBLISH, SUBSCRIBE, and the keys under its prefix)",
        );
    }
    if detail.contains("DB index is out of range") {
        return misconfigured(
            Misconfiguration::MissingDatabase,
            &format!(
                "the server has no database {db} (see its `databases` setting); choose another \
                 /db in the backend string"
            ),
        );
    }
    if is_tls_error(&e) {
        return misconfigured(
            Misconfiguration::Tls,
            "check that the server speaks TLS on that port and that its certificate is \
             trusted (the system's root certificates)",
        );
    }
    Error::backend(NAME, what.to_owned(), DriverError(e))
}

/// Whether a TLS library error is among the causes of `e`.
fn is_tls_error(e: &RedisError) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<::rustls::Error>() {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<::rustls::Error>())
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// Whether `err` is a connection that broke (not a refusal by the server or a timeout).
pub(super) fn is_connection_error(err: &Error) -> bool {
    let Error::Backend {
        source: Some(source),
        ..
    } = err
    else {
        return false;
    };
    source
        .downcast_ref::<DriverError>()
        .is_some_and(|DriverError(e)| e.is_io_error() || e.is_connection_dropped())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Chain;

    #[test]
    fn an_io_error_is_shown_once_and_retried() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let err = classify("acquire", refused, 0);
        assert!(err.misconfiguration().is_none(), "{err}");
        assert!(is_connection_error(&err));
        assert_eq!(
            Chain(&err).to_string(),
            "redis backend: acquire: connection refused"
        );
    }

    #[test]
    fn refusals_that_retrying_will_not_fix_are_misconfigurations_without_driver_names() {
        let auth = RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        let err = classify("acquire", auth, 0);
        assert_eq!(
            err.misconfiguration(),
            Some(Misconfiguration::Authentication)
        );
        assert_eq!(
            Chain(&err).to_string(),
            "redis backend: authentication failed: acquire: the server refused the user name or \
             password of the backend string: Password authentication failed"
        );

        let select = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "Redis server refused to switch database",
            "DB index is out of range".to_owned(),
        ));
        let err = classify("acquire", select, 99);
        assert_eq!(
            err.misconfiguration(),
            Some(Misconfiguration::MissingDatabase)
        );
        assert_eq!(
            Chain(&err).to_string(),
            "redis backend: database does not exist: acquire: the server has no database 99 (see \
             its `databases` setting); choose another /db in the backend string: Redis server \
             refused to switch database: DB index is out of range"
        );
        assert!(!Chain(&err).to_string().contains("ResponseError"));
    }
}
