//! Forwarding of primary-only requests to the primary: the settings ([`Forward`]) and the
//! forwarder each layer owns (one pooled HTTP client).
//!
//! See [`RequirePrimaryLayer::forward`](crate::RequirePrimaryLayer::forward) for what a user
//! sees. Inside: [`request`] prepares the request once (body buffered or kept for streaming,
//! headers rewritten), [`proxy`] finds the holder and sends it, retrying only where the request
//! cannot have run, [`response`] is the body of a forwarded response.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Extensions, HeaderMap, HeaderValue};
use hyper_rustls::builderstates::WantsSchemes;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::error::ConfigError;
use crate::http::header::X_PRIMARY_FORWARD_SECRET;

mod proxy;
mod request;
mod response;

pub(crate) use self::proxy::Job;
use self::request::OutBody;

/// How a [forwarding gate](crate::RequirePrimaryLayer::forward) forwards: its limits, timeouts
/// and shared secret.
///
/// | setting | default |
/// |---|---|
/// | [`buffer_limit`](Self::buffer_limit): bodies up to this size are buffered, so a refused or unreachable primary can be retried | 1 MiB |
/// | [`max_body`](Self::max_body): larger bodies get `413` without contacting the primary | none |
/// | [`connect_timeout`](Self::connect_timeout) | 1 s |
/// | [`response_timeout`](Self::response_timeout): from sending until the response head | 30 s |
/// | [`wait_for_holder`](Self::wait_for_holder): how long a request waits for a holder that takes it | 6 s (one failover on the default lease) |
/// | [`secret`](Self::secret) | none |
/// | [`client_addr`](Self::client_addr): where the client's address is read for `x-forwarded-for` | a [`SocketAddr`] or [`IpAddr`] extension |
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_primary::RequirePrimaryLayer;
/// use tower_primary::http::require::Forward;
///
/// let gate = RequirePrimaryLayer::new().forward_with(
///     Forward::new()
///         .max_body(16 << 20)
///         .wait_for_holder(Duration::from_secs(10))
///         .secret("kq8X2v-a-long-random-string-shared-by-the-nodes")?,
/// );
/// // Made outside a tokio runtime: the client's pool is used only once requests come.
/// let _route_layer = gate.clone();
/// # Ok::<_, tower_primary::ConfigError>(())
/// ```
#[derive(Clone)]
#[must_use]
pub struct Forward {
    pub(crate) buffer_limit: usize,
    pub(crate) max_body: Option<u64>,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) wait_for_holder: Duration,
    pub(crate) secret: Option<HeaderValue>,
    pub(crate) client_addr: fn(&Extensions) -> Option<IpAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("buffer_limit", &self.buffer_limit)
            .field("max_body", &self.max_body)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("wait_for_holder", &self.wait_for_holder)
            // Never the secret itself.
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("tls", &self.tls.as_ref().map(|_| "<custom>"))
            .finish_non_exhaustive()
    }
}

impl Default for Forward {
    fn default() -> Self {
        Forward::new()
    }
}

/// The default of [`Forward::buffer_limit`].
const DEFAULT_BUFFER_LIMIT: usize = 1 << 20;

impl Forward {
    /// The defaults in the table above.
    pub fn new() -> Self {
        Forward {
            buffer_limit: DEFAULT_BUFFER_LIMIT,
            max_body: None,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(30),
            wait_for_holder: Duration::from_secs(6),
            secret: None,
            client_addr: peer_from_extensions,
            tls: None,
        }
    }

    /// Bodies up to `bytes` are read whole before the request is sent, so that a primary that
    /// refuses it (it was no longer primary) or cannot be reached can be tried again with the
    /// next holder. Larger bodies are streamed and never retried. Default 1 MiB.
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self
    }

    /// Requests with a longer body are answered `413 Payload Too Large`: at once, without
    /// contacting the primary, when their `content-length` says so or the body passes the limit
    /// while it is buffered; a streamed body that passes it is cut, and the answer is the same
    /// `413`. Default: no limit.
    pub fn max_body(mut self, bytes: u64) -> Self {
        self.max_body = Some(bytes);
        self
    }

    /// How long connecting to the primary (TCP and TLS) may take. A connection that fails or
    /// times out sent nothing, so the request waits for the next holder. Default 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long the primary may take from the request's sending to its response head; then the
    /// answer is `504` (the request may have run, so it is not retried). Default 30 s.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long a request waits for a holder that takes it, while none is known, none can be
    /// reached, or the one tried has stepped down; then the answer is `503` with `Retry-After`.
    /// Default 6 s: about one failover with the default lease (5 s).
    pub fn wait_for_holder(mut self, wait: Duration) -> Self {
        self.wait_for_holder = wait;
        self
    }

    /// A secret shared by the nodes: sent with every forwarded request
    /// (`x-primary-forward-secret`), and required by the gate on every request that says it was
    /// forwarded (`x-primary-forwarded`): without it the answer is `403`, so an outside client
    /// cannot pass itself off as a forwarding node. The gate removes the header before the
    /// handler runs.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidSecret`] when the secret is empty or is not visible ASCII (it is
    /// sent as a header value).
    pub fn secret(mut self, secret: impl AsRef<str>) -> Result<Self, ConfigError> {
        let secret = secret.as_ref();
        if secret.is_empty() {
            return Err(ConfigError::InvalidSecret {
                rule: "must not be empty",
            });
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::InvalidSecret {
                rule: "must be visible ASCII characters without spaces",
            });
        }
        let mut value = HeaderValue::from_str(secret).map_err(|_| ConfigError::InvalidSecret {
            rule: "must be visible ASCII characters without spaces",
        })?;
        value.set_sensitive(true);
        self.secret = Some(value);
        Ok(self)
    }

    /// Where the client's address for `x-forwarded-for` comes from. By default a
    /// [`SocketAddr`] or an [`IpAddr`] in the request's extensions; with axum's
    /// `into_make_service_with_connect_info::<SocketAddr>()`, read its `ConnectInfo`:
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use axum::extract::ConnectInfo;
    /// use tower_primary::http::require::Forward;
    ///
    /// let forward = Forward::new().client_addr(|ext| {
    ///     ext.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip())
    /// });
    /// ```
    pub fn client_addr(mut self, read: fn(&Extensions) -> Option<IpAddr>) -> Self {
        self.client_addr = read;
        self
    }

    /// The TLS settings for `https://` primaries. Default: the system's root certificates
    /// (rustls with ring); give your own for a private certificate authority.
    pub fn tls_config(mut self, config: rustls::ClientConfig) -> Self {
        self.tls = Some(Arc::new(config));
        self
    }
}

/// The default [`Forward::client_addr`].
fn peer_from_extensions(ext: &Extensions) -> Option<IpAddr> {
    ext.get::<SocketAddr>()
        .map(SocketAddr::ip)
        .or_else(|| ext.get::<IpAddr>().copied())
}

/// The forwarder of one layer: its settings and its pooled client.
pub(crate) struct Forwarder {
    pub(crate) settings: Forward,
    client: Client<HttpsConnector<HttpConnector>, OutBody>,
}

impl fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    pub(crate) fn new(settings: Forward) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        let tls = match &settings.tls {
            Some(config) => HttpsConnectorBuilder::new().with_tls_config((**config).clone()),
            None => native_roots(),
        };
        let connector = tls.https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Forwarder { settings, client }
    }

    /// Whether a request that says it was forwarded carries the shared secret (always, when
    /// none is set).
    pub(crate) fn secret_ok(&self, headers: &HeaderMap) -> bool {
        let Some(secret) = &self.settings.secret else {
            return true;
        };
        headers
            .get(X_PRIMARY_FORWARD_SECRET)
            .is_some_and(|given| constant_time_eq(given.as_bytes(), secret.as_bytes()))
    }
}

/// The system's roots with ring; with none (a machine without a CA bundle) an empty store, so
/// `https` primaries fail to connect with a certificate error, and a warning says why.
fn native_roots() -> HttpsConnectorBuilder<WantsSchemes> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    match HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
        Ok(builder) => builder,
        Err(err) => {
            tracing::warn!(
                error = %err,
                "no system root certificates: forwarding to https:// primaries will fail; give \
                 Forward::tls_config a configuration"
            );
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            HttpsConnectorBuilder::new().with_tls_config(config)
        }
    }
}

/// Compares two secrets in a time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_must_be_visible_ascii_and_never_show_in_debug() {
        assert!(Forward::new().secret("").is_err());
        assert!(Forward::new().secret("two words").is_err());
        assert!(Forward::new().secret("tab\there").is_err());
        let forward = Forward::new().secret("s3cr3t").unwrap();
        assert!(!format!("{forward:?}").contains("s3cr3t"));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
