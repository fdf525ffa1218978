//! The etcd backend: a lease-bound election on a key prefix, terms from etcd revisions.
//!
//! Enable the `etcd` feature (it builds `etcd-client`, which needs `protoc` at build time). Choose
//! it with a backend string or build it directly:
//!
//! ```no_run
//! use tower_primary::Elector;
//! use tower_primary::backend::etcd::EtcdBackend;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = EtcdBackend::from_url("etcd://10.0.0.1:2379,10.0.0.2:2379?prefix=billing")?;
//! let elector = Elector::builder("report-scheduler").backend(backend).spawn()?;
//! # Ok(()) }
//! ```
//!
//! # Backend strings
//!
//! `etcd://[user[:password]@]host[:port][,host[:port]…][?prefix=…]` (port 2379 when omitted;
//! IPv6 hosts in brackets); `etcds://…` connects with TLS (system roots, or
//! [`with_ca_pem`](EtcdBackend::with_ca_pem)). `prefix` (default `tower-primary`) is the key
//! prefix every lock lives under. User name and password are percent-decoded and never repeated
//! in errors. No other parameter is accepted; the lease is the elector's setting.
//!
//! What retrying cannot fix is an [`Error::Misconfigured`]: etcd
//! refused the credentials or the permission, or the TLS handshake failed (`etcds://` against a
//! plain server, an untrusted certificate). An unreachable server or a timeout is an
//! [`Error::Backend`], retried.
//!
//! # How it works
//!
//! Keys of lock `L` under prefix `P`:
//!
//! | key | value |
//! |---|---|
//! | `P/L/election/v2-<lease id, 16 hex digits>` | one per candidate, bound to its lease: the [`Holder`] record as JSON (its `term` is 0 until the claim, and stays 0 for a raised term) |
//! | `P/L/raised` | empty; its mod revision is the latest **raised** term (below) |
//! | `P/L/state/<key>` | a state value: the writer's term (8 bytes, big endian), then the bytes |
//! | `P/L/registry/<node id>` | a [`Candidate`] entry as JSON, on the registration's own lease |
//! | `P/L/reserved` | a reservation: the node, the reserving holder's key and term (JSON), on a lease of the window |
//! | `P/L/reserved-holder` | the key of a holder that took a reservation ahead of the key order, on its lease |
//!
//! - **Acquire.** Grant a lease of the elector's TTL (etcd counts whole seconds: it is rounded
//!   up, so the server never frees the lock before the holder's deadline) and keep it alive every
//!   `ttl / 3` from then on, also while waiting: a waiting candidate whose lease lapsed must not
//!   win. Create the candidate key on the lease (a transaction that only creates). The candidate
//!   whose key is the **oldest** under `P/L/election/` (lowest create revision) holds the lock;
//!   the others wait on a **watch** of that prefix and try again when a key is deleted. A claim is
//!   one transaction: if no key under the prefix is older than ours (a range compare) **and our
//!   own key still exists with the create revision it had**, write the final holder record onto
//!   it. etcd's own Campaign can return success after the waiter's lease has expired; the second
//!   compare is why that cannot make a primary here. A handover therefore costs the releaser's
//!   key deletion, one watch event and one transaction.
//! - **Term** = the create revision of the holder's key, as version 0.1 has it — unless a term
//!   was **raised** after that key was made: a resumption (below) takes the revision of its own
//!   claim as its term, above the create revisions of the keys waiting behind it. A claim whose
//!   key is older than the latest raised term (the mod revision of `P/L/raised`, compared in the
//!   claim's transaction) raises its term too, to its own claim's revision, and writes
//!   `P/L/raised` in the same transaction. Revisions only grow and survive restarts of etcd; a
//!   claim needs every older key gone: terms strictly increase.
//! - **Resume** ([`Lock::resume`], for the next process of a host group once the holder's
//!   process is gone). The token ([`Leadership::resume_token`]) names the lease, the key, the
//!   claim's revision and the term. The new process keeps the same lease alive (etcd leases
//!   belong to no connection: one keepalive first, whose send time starts the new deadline) and
//!   claims the same key again in one transaction: if the key is still on that lease and its mod
//!   revision is still the token's claim, and no key of version 0.1 exists, put the new holder
//!   record and `P/L/raised`. The key keeps its create revision, hence its place ahead of the
//!   waiters; the put's revision is the new term. Otherwise the token resumes nothing (`None`).
//! - **Renewals.** Every confirmed keepalive is reported with its send time; the elector stops
//!   acting at `send time + lease - margin`, before etcd (which counts from the
//!   keepalive's arrival) can expire the lease.
//! - **Loss** is reported when a keepalive says the lease is gone, or when the watch sees the
//!   holder's own key deleted (revoked, expired, or removed by hand) or claimed again (resumed by
//!   another process) — usually well before the deadline would notice.
//! - **Release** deletes the key while it is still this term's claim (the next candidate's
//!   watch fires at once), then revokes the lease. A key claimed again since belongs to the
//!   process that resumed the lease: it keeps the lease, and the release only stops renewing.
//!   A dropped acquisition revokes its lease in the background. A leadership dropped without
//!   release (its runtime died) stops renewing and lets the lease run out, like a crash.
//! - **Holder view**: the oldest key's record, its term the record's, or for a raised term
//!   (a record saying 0) the key's mod revision; followed through a watch of the prefix.
//! - **State API**: a write is a transaction guarded by the holder key's mod revision (`==`
//!   the revision of the term's claim), so it succeeds only while that term holds the lock:
//!   while it does, no newer term can exist (a newer claim needs the key gone, a resumption
//!   writes it). [`watch_key`](crate::backend::Lock::watch_key) watches the value's key.
//! - **Registry** ([`Lock::register`]): a key per node under `P/L/registry/`, outside the
//!   candidates' range, on a lease of the registration's own (the elector's lease, at least
//!   2 s) with its own keepalives; gone when the node dies (etcd expires the lease), revoked when
//!   the registration is dropped, written again on a new lease should the lease have run out
//!   anyway. Read with a range, followed with a watch.
//! - **Reservations** ([`Leadership::reserve`]): `P/L/reserved` on a fresh lease of
//!   `max(window, 2 s)`, written while the term's claim still stands (as a state write). Every
//!   claim compares it (and `P/L/reserved-holder`) absent, and waiters watch both; the reserved
//!   node claims ahead of the key order once the reserving holder's key is gone and no key of
//!   version 0.1 exists: its term is its claim's revision (raised), the reservation is deleted
//!   and `P/L/reserved-holder` names its key until it lets go. The holder view reads that mark
//!   first; a key of this version that never claimed is no holder.
//!
//! # Nodes of version 0.1 on the same lock
//!
//! Version 0.1 names candidate keys with the 16 hex digits alone, takes the oldest key as holder
//! and its **create** revision as the term (so it reads a fresh claim of this version as its
//! own). Both kinds of keys live under one prefix, so each version waits for the other's holder.
//! A raised term while an old candidate waits could be above that candidate's future term; so
//! none is made: a resumption returns `None` — after revoking the dead holder's lease, so that
//! the lock passes at once — and a candidate whose term would be raised gives its place up (it
//! deletes its key and creates it again, behind the old ones, where its create revision is its
//! term). That is a passing state of a rolling upgrade, not a misconfiguration: the process
//! campaigns as every other. Old nodes read a raised term as the key's create revision (lower):
//! only their view of the holder is off, never their own terms.
//!
//! Old nodes see neither the registry nor reservations (their keys lie outside
//! `P/L/election/`). An old candidate whose key is the oldest takes a reserved lock in key order;
//! the reserved node, which makes no claim out of key order while an old candidate exists, then
//! deletes the reservation and waits in key order. While a node holds ahead of the key order, an
//! old node's view of the holder names the oldest (waiting) key.
//!
//! # Guarantees and limits
//!
//! etcd is raft-linearizable and times leases on its leader: the strongest of the lease backends.
//! A crashed primary is replaced after the rest of its lease plus etcd's expiry check, a released
//! one at once; terms rise while etcd keeps its data. The full statement, its assumptions and
//! where it stops are in GUARANTEES.md at the root of the repository. The minimum lease is 2 s
//! (etcd's own minimum TTL with default settings). Needs etcd 3.3 or newer (range compares);
//! tested with 3.4.
//!
//! [`Holder`]: crate::Holder
//! [`Candidate`]: crate::backend::Candidate
//! [`Leadership::resume_token`]: crate::backend::Leadership::resume_token
//! [`Lock::resume`]: crate::backend::Lock::resume
//! [`Lock::register`]: crate::backend::Lock::register
//! [`Leadership::reserve`]: crate::backend::Leadership::reserve

mod campaign;
mod lock;
mod registry;
mod reserve;
mod resume;
mod session;
mod state;
mod url;
mod watch;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, TlsOptions};
use tokio::sync::OnceCell;

use self::lock::EtcdLock;
use self::session::{etcd_error, rpc};
use super::{Backend, Lock};
use crate::error::{ConfigError, Error, Misconfiguration, validate_lock_name};

const NAME: &str = "etcd";

/// The key prefix used when none is set.
pub const DEFAULT_PREFIX: &str = "tower-primary";

/// The shortest lease etcd grants with its default settings.
const MIN_LEASE: Duration = Duration::from_secs(2);

/// How long one request may take before it counts as failed, by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Locks in etcd. See the [module docs](self).
///
/// Cheap to clone; clones share one connection (a gRPC channel over all endpoints), made on first
/// use. [`connection`](Self::connection) gives a separate one.
#[derive(Clone)]
pub struct EtcdBackend {
    config: Arc<Config>,
    client: Arc<OnceCell<Client>>,
}

#[derive(Clone)]
struct Config {
    endpoints: Vec<String>,
    tls: bool,
    user: Option<(String, String)>,
    ca_pem: Option<Vec<u8>>,
    prefix: String,
    timeout: Duration,
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("EtcdBackend")
            .field("endpoints", &c.endpoints)
            .field("tls", &c.tls)
            .field("user", &c.user.as_ref().map(|(name, _)| name))
            .field("prefix", &c.prefix)
            .field("timeout", &c.timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdBackend {
    /// A backend on these endpoints (`host:port`, tried in turn by the client), without TLS, under
    /// the prefix [`DEFAULT_PREFIX`]. Endpoints are checked by [`Backend::lock`], i.e. when an
    /// elector is spawned.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EtcdBackend {
            config: Arc::new(Config {
                endpoints: endpoints.into_iter().map(Into::into).collect(),
                tls: false,
                user: None,
                ca_pem: None,
                prefix: DEFAULT_PREFIX.to_owned(),
                timeout: DEFAULT_TIMEOUT,
            }),
            client: Arc::default(),
        }
    }

    /// A backend from an `etcd://` or `etcds://` string (see the [module docs](self)).
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidBackendUrl`] naming what is wrong (never repeating a password).
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let parsed = url::parse(url).map_err(|e| super::without_passwords(url, e))?;
        let mut backend = EtcdBackend::new(parsed.endpoints).with_tls(parsed.tls);
        if let Some((name, password)) = parsed.user {
            backend = backend.with_user(name, password);
        }
        if let Some(prefix) = parsed.prefix {
            backend = backend.with_prefix(prefix);
        }
        Ok(backend)
    }

    /// The key prefix locks live under (default [`DEFAULT_PREFIX`]); slashes at either end are
    /// dropped. Checked by [`Backend::lock`]: 1 to 200 bytes of `[A-Za-z0-9._:/-]`.
    #[must_use]
    pub fn with_prefix(self, prefix: impl Into<String>) -> Self {
        self.configure(|c| c.prefix = prefix.into())
    }

    /// Connects with TLS (what `etcds://` sets). Servers are verified against the system's roots,
    /// or against [`with_ca_pem`](Self::with_ca_pem).
    #[must_use]
    pub fn with_tls(self, tls: bool) -> Self {
        self.configure(|c| c.tls = tls)
    }

    /// Verifies servers against this CA certificate (PEM) instead of the system's roots; implies
    /// TLS.
    #[must_use]
    pub fn with_ca_pem(self, pem: impl Into<Vec<u8>>) -> Self {
        self.configure(|c| {
            c.ca_pem = Some(pem.into());
            c.tls = true;
        })
    }

    /// Authenticates as this etcd user.
    #[must_use]
    pub fn with_user(self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.configure(|c| c.user = Some((name.into(), password.into())))
    }

    /// How long one request may take before it counts as failed (default 5 s). Keepalives use
    /// `lease / 3` instead.
    #[must_use]
    pub fn with_request_timeout(self, timeout: Duration) -> Self {
        self.configure(|c| c.timeout = timeout)
    }

    /// The key prefix.
    #[must_use]
    pub fn prefix(&self) -> &str {
        self.config.prefix.trim_matches('/')
    }

    /// The same settings on a connection of its own (another node's view, in tests).
    #[must_use]
    pub fn connection(&self) -> Self {
        EtcdBackend {
            config: self.config.clone(),
            client: Arc::default(),
        }
    }

    fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        // New settings, new connection.
        self.client = Arc::default();
        self
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |problem: String| ConfigError::InvalidBackendUrl {
            url: self.describe(),
            problem,
        };
        if self.config.endpoints.is_empty() {
            return Err(invalid("no endpoints".to_owned()));
        }
        for e in &self.config.endpoints {
            url::endpoint(e).map_err(&invalid)?;
        }
        url::check_prefix(&self.config.prefix).map_err(|p| invalid(format!("prefix: {p}")))?;
        if self.config.timeout.is_zero() {
            return Err(invalid(
                "the request timeout must be longer than zero".to_owned(),
            ));
        }
        Ok(())
    }

    /// The settings as a backend string, without the password.
    fn describe(&self) -> String {
        let c = &self.config;
        let scheme = if c.tls { "etcds" } else { "etcd" };
        let user = c
            .user
            .as_ref()
            // `:***` only where there is a password to hide.
            .map(|(name, password)| {
                if password.is_empty() {
                    format!("{name}@")
                } else {
                    format!("{name}:***@")
                }
            })
            .unwrap_or_default();
        format!(
            "{scheme}://{user}{}?prefix={}",
            c.endpoints.join(","),
            c.prefix
        )
    }

    async fn client(&self) -> Result<Client, Error> {
        let config = &self.config;
        self.client
            .get_or_try_init(|| async {
                let scheme = if config.tls { "https" } else { "http" };
                let endpoints: Vec<String> = config
                    .endpoints
                    .iter()
                    .map(|e| url::endpoint(e).map(|e| format!("{scheme}://{e}")))
                    .collect::<Result<_, _>>()
                    .map_err(|p| Error::backend_msg(NAME, p))?;
                let mut options = ConnectOptions::new()
                    .with_connect_timeout(config.timeout)
                    // etcd refuses pings more often than every 5 s (too_many_pings).
                    .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
                    .with_keep_alive_while_idle(false)
                    // A member cut off from its cluster answers "no leader" at once.
                    .with_require_leader(true);
                if let Some((name, password)) = &config.user {
                    options = options.with_user(name.clone(), password.clone());
                }
                if config.tls {
                    let tls = match &config.ca_pem {
                        Some(pem) => TlsOptions::new().ca_certificate(Certificate::from_pem(pem)),
                        None => TlsOptions::new().with_native_roots(),
                    };
                    options = options.with_tls(tls);
                }
                let client = rpc(
                    config.timeout,
                    "connect",
                    Client::connect(endpoints, Some(options)),
                )
                .await?;
                if config.tls {
                    check_tls(config, &client).await?;
                }
                Ok(client)
            })
            .await
            .cloned()
    }
}

/// The channel connects lazily, and a server without TLS answers a TLS handshake either with
/// bytes the handshake cannot read ("tls handshake eof", classified as TLS by `etcd_error`) or,
/// as often, by resetting the connection, which reads as any transport failure. So a TLS client
/// makes one request before it is used; when that fails and is not already classified, the
/// same endpoints are asked once without TLS: an answer there means a server without TLS.
async fn check_tls(config: &Config, client: &Client) -> Result<(), Error> {
    const WHAT: &str = "check the connection";
    let e = match tokio::time::timeout(config.timeout, client.clone().status()).await {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => e,
        Err(_) => {
            return Err(Error::backend_msg(
                NAME,
                format!("{WHAT}: no answer within {:?}", config.timeout),
            ));
        }
    };
    let problem = session::describe(&e);
    let err = etcd_error(WHAT, e);
    if err.misconfiguration().is_some() {
        return Err(err);
    }
    let plain: Vec<String> = config
        .endpoints
        .iter()
        .filter_map(|e| url::endpoint(e).ok())
        .map(|e| format!("http://{e}"))
        .collect();
    let probe = async {
        let mut plain = Client::connect(plain, None).await?;
        plain.status().await
    };
    let speaks_plain = match tokio::time::timeout(config.timeout, probe).await {
        Ok(Ok(_)) => true,
        // Any status but 14, "unavailable", came from a gRPC server without TLS.
        Ok(Err(etcd_client::Error::GRpcStatus(s))) => i32::from(s.code()) != 14,
        _ => false,
    };
    if speaks_plain {
        return Err(Error::misconfigured(
            NAME,
            Misconfiguration::Tls,
            format!(
                "{WHAT}: the server answers without TLS (with TLS: {problem}); check etcd:// or \
                 etcds:// (does the server serve TLS?) and the CA certificate"
            ),
            None,
        ));
    }
    Err(err)
}

impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn min_lease(&self) -> Option<Duration> {
        Some(MIN_LEASE)
    }

    /// `etcd://` or `etcds://`, the endpoints as `host:port` (the default port filled in), and
    /// the prefix; never the user or the password.
    fn address(&self) -> String {
        let c = &self.config;
        let scheme = if c.tls { "etcds" } else { "etcd" };
        let endpoints: Vec<String> = c
            .endpoints
            .iter()
            .map(|e| url::endpoint(e).unwrap_or_else(|_| e.trim().to_owned()))
            .collect();
        format!(
            "{scheme}://{}?prefix={}",
            endpoints.join(","),
            self.prefix()
        )
    }

    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        validate_lock_name(name)?;
        self.check()?;
        let base = format!("{}/{name}", self.prefix());
        Ok(Arc::new(EtcdLock {
            backend: self.clone(),
            name: name.to_owned(),
            election: format!("{base}/election/").into_bytes(),
            state: format!("{base}/state/").into_bytes(),
            held: Arc::default(),
        }))
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_laid_out_under_the_prefix() {
        let backend = EtcdBackend::from_url("etcd://h?prefix=/apps/x/").unwrap();
        assert_eq!(backend.prefix(), "apps/x");
        let lock = backend.lock("jobs").unwrap();
        let dbg = format!("{lock:?}");
        assert!(dbg.contains("apps/x/jobs/election/"), "{dbg}");
        let lock = EtcdLock {
            backend: backend.clone(),
            name: "jobs".into(),
            election: b"apps/x/jobs/election/".to_vec(),
            state: b"apps/x/jobs/state/".to_vec(),
            held: Arc::default(),
        };
        assert_eq!(
            lock.candidate_key(0x1234),
            b"apps/x/jobs/election/v2-0000000000001234".to_vec()
        );
        assert_eq!(lock.state_key("k"), b"apps/x/jobs/state/k".to_vec());
        // Keys of version 0.1 are 16 hex digits: inside the old range; ours are above it.
        let (start, end) = lock.old_keys();
        let old = b"apps/x/jobs/election/0000000000001234".to_vec();
        let ours = lock.candidate_key(0x1234);
        assert!(start <= old && old < end);
        assert!(ours >= end, "{ours:?}");
        let highest_old = b"apps/x/jobs/election/ffffffffffffffff".to_vec();
        assert!(highest_old < end);
        assert!(lock.is_own_kind(&ours));
        assert!(!lock.is_own_kind(&old));
        // The registry and the reservation keys lie outside the candidates' range, which every
        // version reads (a key there would be taken for a candidate).
        let registry = lock.registry_prefix();
        assert_eq!(registry, b"apps/x/jobs/registry/".to_vec());
        assert_eq!(lock.reserved_key(), b"apps/x/jobs/reserved".to_vec());
        assert_eq!(
            lock.reserved_holder_key(),
            b"apps/x/jobs/reserved-holder".to_vec()
        );
        for key in [registry, lock.reserved_key(), lock.reserved_holder_key()] {
            assert!(!key.starts_with(&lock.election), "{key:?}");
            assert!(!key.starts_with(&lock.state), "{key:?}");
        }
        // A prefix watch on the reservation sees the reserved holder's mark too.
        assert!(lock.reserved_holder_key().starts_with(&lock.reserved_key()));
    }

    #[test]
    fn bad_settings_are_configuration_errors() {
        let err = EtcdBackend::new(["h:0"]).lock("x").unwrap_err().to_string();
        assert!(err.contains(r#"port "0" of host "h:0""#), "{err}");
        let err = EtcdBackend::new(Vec::<String>::new())
            .lock("x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no endpoints"), "{err}");
        let err = EtcdBackend::new(["h:1"])
            .with_prefix("a b")
            .lock("x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prefix"), "{err}");
        let err = EtcdBackend::new(["h:1"])
            .with_user("root", "hunter2")
            .with_prefix("")
            .lock("x")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(EtcdBackend::new(["h:1"]).lock("../x").is_err());
        let dbg = format!(
            "{:?}",
            EtcdBackend::new(["h:1"]).with_user("root", "hunter2")
        );
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }

    #[test]
    fn described_settings_show_a_password_only_as_stars() {
        let with = EtcdBackend::new(["h:1"]).with_user("root", "hunter2");
        assert_eq!(with.describe(), "etcd://root:***@h:1?prefix=tower-primary");
        let without = EtcdBackend::new(["[::1]:2379"]).with_user("alice", "");
        assert_eq!(
            without.describe(),
            "etcd://alice@[::1]:2379?prefix=tower-primary"
        );
        let nobody = EtcdBackend::new(["[::1]:2379"]).with_tls(true);
        assert_eq!(nobody.describe(), "etcds://[::1]:2379?prefix=tower-primary");
    }

    #[test]
    fn the_address_names_scheme_endpoints_and_prefix_without_credentials() {
        let backend =
            EtcdBackend::from_url("etcds://root:hunter2@h1:2379,h2?prefix=/apps/x/").unwrap();
        assert_eq!(backend.address(), "etcds://h1:2379,h2:2379?prefix=apps/x");
        let plain = EtcdBackend::new(["[::1]:2379"]);
        assert_eq!(plain.address(), "etcd://[::1]:2379?prefix=tower-primary");
    }

    #[test]
    fn the_minimum_lease_is_two_seconds() {
        assert_eq!(EtcdBackend::new(["h:1"]).min_lease(), Some(MIN_LEASE));
    }
}
