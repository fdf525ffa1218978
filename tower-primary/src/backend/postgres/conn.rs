//! One unpooled connection: connecting (with TLS when asked), driving the connection task,
//! noticing when it ends, and closing it at once.

use std::future::poll_fn;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_postgres::tls::NoTls;
use tokio_postgres::{AsyncMessage, Client, Connection};
use tokio_util::sync::CancellationToken;

use super::NAME;
use super::config::{Settings, Tls};
use crate::error::{Error, Misconfiguration};

/// Called with the payload of every notification the connection receives.
pub(super) type OnNotify = Arc<dyn Fn(&str) + Send + Sync>;

/// A connection and its driver task.
pub(super) struct Conn {
    pub(super) client: Client,
    ended: watch::Receiver<Option<String>>,
    kill: CancellationToken,
}

impl Conn {
    /// Resolves when the connection has ended, with why.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe.
    pub(super) async fn ended(&self) -> String {
        let mut rx = self.ended.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "connection task ended".to_owned(),
        }
    }

    /// Whether the connection has ended.
    pub(super) fn is_ended(&self) -> bool {
        self.ended.borrow().is_some() || self.client.is_closed()
    }

    /// Closes the socket now, without a goodbye (for a connection that stopped answering).
    pub(super) fn kill(&self) {
        self.kill.cancel();
    }

    /// Sends a cancel request for the statement running on this connection.
    pub(super) async fn cancel(&self, tls: &Tls) -> Result<(), tokio_postgres::Error> {
        let token = self.client.cancel_token();
        match tls {
            Tls::Off => token.cancel_query(NoTls).await,
            Tls::Rustls(make) => token.cancel_query(make.clone()).await,
        }
    }

    /// Drops the client (the driver sends `Terminate`) and waits a little for the connection to
    /// end, so the server ends the session before this returns in the normal case.
    pub(super) async fn close(self, settings: &Settings) {
        let Conn {
            client,
            ended,
            kill,
        } = self;
        drop(client);
        let mut ended = ended;
        let wait = ended.wait_for(Option::is_some);
        if tokio::time::timeout(settings.request_timeout, wait)
            .await
            .is_err()
        {
            kill.cancel();
        }
    }
}

/// Connects within the connect timeout (socket, TLS and start-up together). The session's
/// `application_name` is the configured one (default `tower-primary`) followed by
/// `application_name`.
pub(super) async fn connect(
    settings: &Settings,
    application_name: Option<&str>,
    on_notify: Option<OnNotify>,
) -> Result<Conn, Error> {
    let mut pg = settings.pg.clone();
    if let Some(suffix) = application_name {
        let name = format!(
            "{} {suffix}",
            settings
                .pg
                .get_application_name()
                .unwrap_or("tower-primary")
        );
        pg.application_name(truncate(&name, 63));
    }
    pg.keepalives(true)
        .keepalives_idle(settings.keepalive_idle)
        .keepalives_interval(settings.keepalive_interval)
        .keepalives_retries(settings.keepalive_count)
        .tcp_user_timeout(settings.server_detection())
        .connect_timeout(settings.connect_timeout);
    let kill = CancellationToken::new();
    let (tx, ended) = watch::channel(None);
    let attempt = async {
        match &settings.tls {
            Tls::Off => pg.connect(NoTls).await.map(|(client, conn)| {
                tokio::spawn(drive(conn, kill.clone(), tx, on_notify));
                client
            }),
            Tls::Rustls(make) => pg.connect(make.clone()).await.map(|(client, conn)| {
                tokio::spawn(drive(conn, kill.clone(), tx, on_notify));
                client
            }),
        }
    };
    match tokio::time::timeout(settings.connect_timeout, attempt).await {
        Ok(Ok(client)) => Ok(Conn {
            client,
            ended,
            kill,
        }),
        Ok(Err(e)) => Err(pg_error(&format!("connect to {}", settings.url), e)),
        Err(_) => Err(Error::backend_msg(
            NAME,
            format!(
                "connect to {}: timed out after {:?}",
                settings.url, settings.connect_timeout
            ),
        )),
    }
}

async fn drive<S, T>(
    mut conn: Connection<S, T>,
    kill: CancellationToken,
    ended: watch::Sender<Option<String>>,
    on_notify: Option<OnNotify>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let reason = loop {
        let message = tokio::select! {
            () = kill.cancelled() => break "closed: the server stopped answering".to_owned(),
            m = poll_fn(|cx| conn.poll_message(cx)) => m,
        };
        match message {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if let Some(f) = &on_notify {
                    f(n.payload());
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break describe(&e),
            None => break "connection closed".to_owned(),
        }
    };
    drop(conn);
    ended.send_replace(Some(reason));
}

/// The error with its causes, each once: the driver's own `Display` of a server error says only
/// "db error".
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    }
    crate::error::Chain(e).to_string()
}

/// A backend error for `what` caused by `e`: [`Error::Misconfigured`] when retrying cannot help
/// (wrong credentials, no such database, no permission, TLS refused), else [`Error::Backend`].
pub(super) fn pg_error(what: &str, e: tokio_postgres::Error) -> Error {
    let message = format!("{what}: {}", describe(&e));
    match misconfiguration(&e) {
        Some((kind, fix)) => {
            Error::misconfigured(NAME, kind, format!("{message}; {fix}"), Some(Box::new(e)))
        }
        None => Error::backend(NAME, message, e),
    }
}

/// Whether `e` is a permanent misconfiguration, and what to fix.
fn misconfiguration(e: &tokio_postgres::Error) -> Option<(Misconfiguration, &'static str)> {
    if let Some(db) = e.as_db_error() {
        return match db.code().code() {
            // invalid_password, invalid_authorization_specification
            "28P01" | "28000" => Some((
                Misconfiguration::Authentication,
                "check the user name and password of the connection string",
            )),
            // invalid_catalog_name
            "3D000" => Some((
                Misconfiguration::MissingDatabase,
                "create the database or fix its name in the connection string",
            )),
            // insufficient_privilege
            "42501" => Some((
                Misconfiguration::Permission,
                "grant this role the rights it needs (see the backend's docs) or use another role",
            )),
            _ => None,
        };
    }
    // The driver's only public sign of a failed handshake is its message.
    e.to_string()
        .starts_with("error performing TLS handshake")
        .then_some((
            Misconfiguration::Tls,
            "check sslmode (does the server offer TLS?) and sslrootcert",
        ))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
