//! The backend contract, and the backends.
//!
//! A [`Backend`] names where locks live (a directory, a server). For each lock name the elector
//! asks it for a [`Lock`], which it drives:
//!
//! - [`Lock::acquire`] waits until this node holds the lock and returns a [`Leadership`]: the
//!   term, the holder record, the confirmed renewals of a lease, a future that resolves when the
//!   backend knows the lock is lost, and [`Leadership::release`].
//! - [`Lock::holder`] and [`Lock::watch_holder`] tell who is primary, and when that changes.
//! - the **state API** ([`Lock::load`], [`Lock::store`], [`Lock::watch_key`]): small values, written
//!   only by the term that holds the lock and never over a newer term's write. Schedules and
//!   run-once jobs keep their progress there.
//!
//! Backends know nothing of HTTP, the elector or schedules. Renewal loops live inside the backend;
//! the **deadline is enforced by the elector** from the send times the backend reports
//! through [`Renewals`].
//!
//! The traits are object-safe: [`from_url`] picks a backend at run time from a string.
//!
//! | backend | feature | string |
//! |---|---|---|
//! | [`FileBackend`](file::FileBackend) | `file` (default) | `/path/dir`, `./dir`, `file:///path/dir` |
//! | [`MemoryBackend`](memory::MemoryBackend) | always | `memory://name` |
//! | [`RedisBackend`](redis::RedisBackend) | `redis` | `redis://[user:pass@]host:port[/db][?prefix=p]`, `rediss://…` |
//! | [`PostgresBackend`](postgres::PostgresBackend) | `postgres` | `postgres://…[?namespace=n&schema=s&sslmode=m]`, `postgresql://…` |
//! | [`EtcdBackend`](etcd::EtcdBackend) | `etcd` | `etcd://host:port[,host:port…]`, `etcds://…` |
//!
//! # Writing a backend
//!
//! - `acquire` must be **cancellation-safe**: if the future is dropped after the server granted the
//!   lock, the grant must be released, never leaked (e.g. hand the grant over a channel and let the
//!   sending side release it when the receiver is gone).
//! - Nothing but a successful `acquire` may make a node primary. Errors are returned, not
//!   swallowed: the elector logs them, stays secondary and retries with backoff (fail closed).
//! - Terms must strictly increase per lock name across primaries, also across restarts of the
//!   server or the process.
//! - A lease backend reports the **send time** of the acquisition and of every confirmed renewal
//!   through [`Renewals`], read on the [`Clock`] of the request. A reply that arrives late is still
//!   reported with its send time; the elector decides whether it extends anything.
//! - The conformance suite (`tower_primary_testing::conformance`, a crate of its own) checks all of
//!   this against a real server in a few lines.
//!
//! What each backend promises, under which assumptions, and where that stops is stated once, in
//! GUARANTEES.md at the root of the repository.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::{Clock, Timestamp};

use crate::error::{ConfigError, Error};
use crate::role::{Holder, NodeId};

#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub mod etcd;
#[cfg(feature = "file")]
pub mod file;
#[cfg(feature = "file")]
pub mod host;
#[cfg(any(feature = "redis", feature = "postgres", feature = "etcd"))]
mod host_port;
mod lease;
pub mod memory;
mod mistyped;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

mod redact;
pub mod registry;

pub use lease::Lease;
pub use redact::redact;
pub(crate) use redact::{passwords_in, without_passwords};
pub(crate) use registry::Unregistered;
pub use registry::{Candidate, Registration};

/// A boxed, `Send` future, as the object-safe traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where locks live. See the [module docs](self).
pub trait Backend: fmt::Debug + Send + Sync + 'static {
    /// The backend's name, for logs and errors: `"file"`, `"memory"`, `"redis"`…
    fn name(&self) -> &'static str;

    /// The shortest lease the backend accepts, or `None` when the backend has no lease (the lock
    /// is held while the holder's process or session lives; the elector's lease is then ignored).
    fn min_lease(&self) -> Option<Duration>;

    /// The longest lease the backend accepts, if it has a limit (the default: none). An elector
    /// with a longer lease does not spawn.
    fn max_lease(&self) -> Option<Duration> {
        None
    }

    /// Where this backend keeps its locks, without secrets: the kind, the server address(es)
    /// and whatever else separates one election from another (database, key prefix, namespace,
    /// directory). Two processes with equal addresses and lock names campaign for the same lock.
    /// A host group compares it with the address in its `.host` record. The default: the
    /// backend's [`name`](Self::name).
    #[must_use]
    fn address(&self) -> String {
        self.name().to_owned()
    }

    /// The lock `name`, checked and prepared without network I/O. Called once per elector, at
    /// `spawn()`; errors here are configuration errors.
    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError>;
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn address(&self) -> String {
        (**self).address()
    }
    fn min_lease(&self) -> Option<Duration> {
        (**self).min_lease()
    }
    fn max_lease(&self) -> Option<Duration> {
        (**self).max_lease()
    }
    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        (**self).lock(name)
    }
}

impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn address(&self) -> String {
        (**self).address()
    }
    fn min_lease(&self) -> Option<Duration> {
        (**self).min_lease()
    }
    fn max_lease(&self) -> Option<Duration> {
        (**self).max_lease()
    }
    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        (**self).lock(name)
    }
}

/// A value kept by the state API, with the term that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stored {
    /// The bytes stored.
    pub value: Vec<u8>,
    /// The term that stored them.
    pub term: u64,
}

impl Stored {
    /// A stored value.
    #[must_use]
    pub fn new(value: Vec<u8>, term: u64) -> Self {
        Stored { value, term }
    }
}

/// One lock name on one backend, as one node sees it.
pub trait Lock: fmt::Debug + Send + Sync + 'static {
    /// Waits until this node holds the lock.
    ///
    /// # Cancellation safety
    ///
    /// Must be cancel-safe: a grant that arrives after the future was dropped is released.
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>>;

    /// Who holds the lock now, as the backend records it.
    fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>>;

    /// A subscription to changes of the holder record. Create it, then read [`holder`](Self::holder),
    /// then wait on it: no change in between is lost.
    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>>;

    /// Loads a state value.
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>>;

    /// Stores a state value, only if `term` holds the lock now and no newer term has written `key`;
    /// else [`Error::StaleTerm`].
    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// A subscription to changes of a state value (notification where the backend has one,
    /// polling otherwise).
    fn watch_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>>;

    /// Takes over the lease that `token` names ([`Leadership::resume_token`] of a predecessor
    /// in this process's host group), under a new term higher than the predecessor's, with
    /// `req`'s node in the holder record. The caller has proved that the predecessor can no
    /// longer act (its process is gone, or it passed the lease on at its exit): the backend
    /// only checks that the lease is still the one the token names.
    ///
    /// `Ok(None)` when it is not (expired, released, taken by another node): the caller then
    /// campaigns with [`acquire`](Self::acquire). The default, for backends that cannot hand a
    /// lease from one process to another: `Ok(None)`.
    ///
    /// # Cancellation safety
    ///
    /// As [`acquire`](Self::acquire): a resumed lease whose future was dropped is released.
    fn resume<'a>(
        &'a self,
        req: AcquireRequest,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Leadership>>, Error>> {
        let _ = (req, token);
        Box::pin(async { Ok(None) })
    }

    /// Enters `entry` in the lock's [candidate registry](registry), live until the returned
    /// [`Registration`] is dropped or this process dies (whichever comes first): the backend
    /// ties the entry to something that dies with the node and keeps it alive by itself. One
    /// registration per node; registering the same node again replaces its entry.
    ///
    /// The default, for backends without a registry: nothing is kept, and
    /// [`candidates`](Self::candidates) lists nobody.
    /// `lease` is the node's lease (the elector's): a backend whose entries live on a lease
    /// (Redis, etcd) uses it, so that a dead node's entry is gone within one lease. `None`: the
    /// backend's own default.
    fn register(
        &self,
        entry: Candidate,
        lease: Option<Lease>,
    ) -> BoxFuture<'_, Result<Box<dyn Registration>, Error>> {
        let _ = (entry, lease);
        Box::pin(async { Ok(Box::new(Unregistered) as Box<dyn Registration>) })
    }

    /// The live entries of the registry, in no particular order. The entry of a node that died
    /// is not listed (at the latest once the backend's liveness bound has passed: the lease, or
    /// the server's detection of a dead session).
    fn candidates(&self) -> BoxFuture<'_, Result<Vec<Candidate>, Error>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// A subscription to changes of the registry (an entry added, updated or gone). Create it,
    /// then read [`candidates`](Self::candidates), then wait on it. A backend may report a dead
    /// node's entry gone late (its liveness bound) or only at the next other change; the elector
    /// reads the registry again at least once a lease. The default never fires.
    fn watch_candidates(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async { Ok(Box::new(Never) as Box<dyn Changes>) })
    }
}

/// [`Changes`] that never fire.
struct Never;

impl Changes for Never {
    fn changed(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(std::future::pending())
    }
}

/// Why the elector gives a lock up; see [`Leadership::release_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Release {
    /// The node stays and lets others lead: a step-down, a loss, a fencing.
    StepDown,
    /// The process is shutting down: a host group may pass the lease to a sibling process.
    Exit,
}

/// A subscription to changes; see [`Lock::watch_holder`] and [`Lock::watch_key`].
pub trait Changes: Send + 'static {
    /// Resolves at the next change (or a possible change: spurious wake-ups are allowed).
    ///
    /// # Cancellation safety
    ///
    /// Must be cancel-safe: a change that happens while nobody waits is reported by the next call.
    fn changed(&mut self) -> BoxFuture<'_, Result<(), Error>>;
}

/// [`Changes`] over a version counter that the backend bumps at every change.
pub(crate) struct VersionChanges(pub(crate) watch::Receiver<u64>);

impl Changes for VersionChanges {
    fn changed(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            // A closed sender means no change can come any more: wait for ever.
            if self.0.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    }
}

impl fmt::Debug for dyn Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Changes")
    }
}

/// Holding the lock: one term.
pub trait Leadership: fmt::Debug + Send + 'static {
    /// The fencing term.
    fn term(&self) -> u64;

    /// The holder record as stored.
    fn holder(&self) -> &Holder;

    /// The confirmed renewals of a lease backend (`None` for backends without a lease).
    fn renewals(&self) -> Option<Renewals>;

    /// A lease the backend implies although the elector configured none
    /// ([`Backend::min_lease`] is `None`): a session lock that the server frees once its
    /// dead-peer detection gives up on a silent holder, say. The elector then fences the term
    /// `ttl - margin` after the latest confirmed liveness check reported through
    /// [`renewals`](Self::renewals), as for lease backends, so a holder frozen for longer than
    /// that reads as not primary when it resumes, before anything else runs.
    fn implied_lease(&self) -> Option<Lease> {
        None
    }

    /// Resolves when the backend knows the lock is lost (renewal refused, key deleted, lock file
    /// replaced…), with the reason.
    ///
    /// # Cancellation safety
    ///
    /// Must be cancel-safe.
    fn lost(&mut self) -> BoxFuture<'_, Error>;

    /// Gives the lock up and wakes the waiters.
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>>;

    /// Gives the lock up for `why`: the elector calls this, never [`release`](Self::release)
    /// directly. A host group passes the lease to a sibling process on [`Release::Exit`]. The
    /// default: [`release`](Self::release).
    #[must_use]
    fn release_for(self: Box<Self>, why: Release) -> BoxFuture<'static, Result<(), Error>> {
        let _ = why;
        self.release()
    }

    /// What another process of this host group needs to take this term's lease over once this
    /// process is gone ([`Lock::resume`]): a backend-defined string (it is kept in the host
    /// directory, readable by the service user only). `None`, the default, for backends whose
    /// locks cannot pass from one process to another (a session lock, a flock).
    #[must_use]
    fn resume_token(&self) -> Option<String> {
        None
    }

    /// Reserves the lock for `node` for `window`, before this term releases it (a planned
    /// handover to a chosen candidate): until the reservation expires, [`Lock::acquire`] of any
    /// other node waits (it neither takes the lock nor fails), and wakes when the reservation is
    /// taken or runs out; `node`'s acquire takes the lock and consumes the reservation, under a
    /// new, higher term as always.
    ///
    /// Written only while this term holds the lock (checked by the backend like a state write:
    /// [`Error::StaleTerm`] or [`Error::Lost`] otherwise). The window is timed by the server
    /// from when it receives the request (or, on one host, by the lock file's owner): never by
    /// comparing two hosts' clocks. A backend may round it up (etcd leases last at least 2 s).
    /// A later reservation replaces an earlier one.
    ///
    /// The default, for backends without reservations: [`Error::Unsupported`]; the elector then
    /// keeps the lock rather than release it to whoever is fastest.
    fn reserve<'a>(
        &'a mut self,
        node: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let _ = (node, window);
        Box::pin(async {
            Err(Error::Unsupported {
                what: "reserving the lock for a chosen successor",
            })
        })
    }
}

/// What the elector asks a [`Lock`] for.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AcquireRequest {
    /// The node asking.
    pub node: NodeId,
    /// The URL it advertises.
    pub url: Option<String>,
    /// The lease, on backends that have one.
    pub lease: Option<Lease>,
    /// The clock send times are read on.
    pub clock: Clock,
}

impl AcquireRequest {
    /// A request for `node`, without URL or lease, on the system clock.
    #[must_use]
    pub fn new(node: NodeId) -> Self {
        AcquireRequest {
            node,
            url: None,
            lease: None,
            clock: Clock::system(),
        }
    }

    /// Sets the lease.
    #[must_use]
    pub fn with_lease(mut self, lease: Option<Lease>) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the clock.
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the advertised URL.
    #[must_use]
    pub fn with_url(mut self, url: Option<String>) -> Self {
        self.url = url;
        self
    }

    /// The holder record for `term`, since now.
    #[must_use]
    pub fn holder(&self, term: u64) -> Holder {
        Holder::new(&self.node, term)
            .with_url(self.url.clone())
            .with_lease_ms(
                self.lease
                    .map(|l| u64::try_from(l.ttl().as_millis()).unwrap_or(u64::MAX)),
            )
    }
}

/// The confirmed renewals of a lease: the send time of the latest one. See [`renewals`].
#[derive(Clone, Debug)]
pub struct Renewals {
    rx: watch::Receiver<Timestamp>,
}

/// The sending side of [`Renewals`], kept by a backend's renewal loop.
#[derive(Debug)]
pub struct RenewalSender {
    tx: watch::Sender<Timestamp>,
}

/// A channel of confirmed renewals, starting with the acquisition's send time.
///
/// # Examples
///
/// ```
/// use tower_primary::Clock;
/// use tower_primary::backend::renewals;
///
/// let clock = Clock::system();
/// let sent = clock.now();
/// let (tx, rx) = renewals(sent);
/// assert_eq!(rx.latest(), sent);
/// tx.confirm(clock.now());
/// assert!(rx.latest() >= sent);
/// ```
#[must_use]
pub fn renewals(acquired_sent_at: Timestamp) -> (RenewalSender, Renewals) {
    let (tx, rx) = watch::channel(acquired_sent_at);
    (RenewalSender { tx }, Renewals { rx })
}

impl RenewalSender {
    /// Reports a confirmed renewal that was sent at `sent_at`. Older reports than the latest are
    /// ignored.
    pub fn confirm(&self, sent_at: Timestamp) {
        self.tx.send_if_modified(|latest| {
            if sent_at > *latest {
                *latest = sent_at;
                true
            } else {
                false
            }
        });
    }

    /// Whether the receiving side is gone (the leadership was dropped or released).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Renewals {
    /// The send time of the latest confirmed renewal.
    #[must_use]
    pub fn latest(&self) -> Timestamp {
        *self.rx.borrow()
    }

    /// Waits for the next confirmed renewal, and returns its send time. Pends forever once the
    /// sender is gone.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe.
    pub async fn changed(&mut self) -> Timestamp {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        *self.rx.borrow_and_update()
    }
}

/// Environment variable holding a backend string.
pub const BACKEND_ENV: &str = "TOWER_PRIMARY_BACKEND";

/// Parses a backend string: a directory path or `file:///dir` for the file backend,
/// `memory://name`, and the server backends when their Cargo feature is on.
///
/// # Examples
///
/// ```
/// use tower_primary::backend::from_url;
///
/// let b = from_url("memory://doc-example").unwrap();
/// assert_eq!(b.name(), "memory");
///
/// let err = from_url("zookeeper://host:2181").unwrap_err();
/// assert!(err.to_string().contains("unknown scheme"));
/// ```
///
/// # Errors
///
/// [`ConfigError::InvalidBackendUrl`] for an unknown scheme or a malformed string,
/// [`ConfigError::FeatureDisabled`] (naming the feature) for a backend that is not compiled in.
pub fn from_url(url: &str) -> Result<Box<dyn Backend>, ConfigError> {
    // Drivers' messages may quote parts of the string; none of them may show a password.
    parse_backend(url).map_err(|e| without_passwords(url, e))
}

fn parse_backend(url: &str) -> Result<Box<dyn Backend>, ConfigError> {
    let invalid = |problem: &str| ConfigError::InvalidBackendUrl {
        url: redact(url),
        problem: problem.to_owned(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        if url.is_empty() {
            return Err(invalid("empty"));
        }
        if let Some(mistyped) = mistyped::mistyped_url(url) {
            return Err(mistyped.error());
        }
        return file_backend(url);
    };
    // Unused when every server backend is compiled in.
    #[cfg_attr(
        all(feature = "redis", feature = "postgres", feature = "etcd"),
        allow(unused_variables)
    )]
    let disabled = |feature| ConfigError::FeatureDisabled {
        scheme: scheme.to_owned(),
        feature,
    };
    match scheme {
        "file" => {
            if !rest.starts_with('/') {
                return Err(invalid("file URLs take an absolute path: file:///path/dir"));
            }
            file_backend(rest)
        }
        "memory" => {
            if rest.is_empty() {
                return Err(invalid("memory URLs take a name: memory://name"));
            }
            Ok(Box::new(memory::MemoryBackend::named(rest)))
        }
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok(Box::new(self::redis::RedisBackend::new(url)?)),
        #[cfg(not(feature = "redis"))]
        "redis" | "rediss" => Err(disabled("redis")),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Box::new(self::postgres::PostgresBackend::new(url)?)),
        #[cfg(not(feature = "postgres"))]
        "postgres" | "postgresql" => Err(disabled("postgres")),
        #[cfg(feature = "etcd")]
        "etcd" | "etcds" => Ok(Box::new(etcd::EtcdBackend::from_url(url)?)),
        #[cfg(not(feature = "etcd"))]
        "etcd" | "etcds" => Err(disabled("etcd")),
        _ => Err(invalid(
            "unknown scheme (expected a path, file://, memory://, redis://, rediss://, \
             postgres://, postgresql://, etcd:// or etcds://)",
        )),
    }
}

/// Reads a backend string from `TOWER_PRIMARY_BACKEND`; `Ok(None)` when it is not set.
///
/// # Errors
///
/// As [`from_url`].
pub fn from_env() -> Result<Option<Box<dyn Backend>>, ConfigError> {
    match std::env::var(BACKEND_ENV) {
        Ok(s) if !s.trim().is_empty() => from_url(s.trim()).map(Some),
        _ => Ok(None),
    }
}

#[cfg(feature = "file")]
fn file_backend(path: &str) -> Result<Box<dyn Backend>, ConfigError> {
    Ok(Box::new(file::FileBackend::new(path)))
}

#[cfg(not(feature = "file"))]
fn file_backend(_path: &str) -> Result<Box<dyn Backend>, ConfigError> {
    Err(ConfigError::FeatureDisabled {
        scheme: "file".to_owned(),
        feature: "file",
    })
}

/// Checks a state key: 1 to 200 bytes of `[A-Za-z0-9._:-]`, not starting with a dot.
///
/// # Errors
///
/// [`ConfigError::InvalidStateKey`] naming the rule.
pub fn validate_key(key: &str) -> Result<(), Error> {
    check_key(key).map_err(Error::Config)
}

pub(crate) fn check_key(key: &str) -> Result<(), ConfigError> {
    let bad = |rule| {
        Err(ConfigError::InvalidStateKey {
            key: key.to_owned(),
            rule,
        })
    };
    if key.is_empty() || key.len() > 200 {
        return bad("must be 1 to 200 bytes");
    }
    if key.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
    {
        return bad("may only hold ASCII letters, digits, '.', '_', ':' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_strings_pick_backends_and_name_missing_features() {
        assert_eq!(from_url("memory://x").unwrap().name(), "memory");
        #[cfg(feature = "file")]
        {
            assert_eq!(from_url("/tmp/locks").unwrap().name(), "file");
            assert_eq!(from_url("./locks").unwrap().name(), "file");
            assert_eq!(from_url("file:///tmp/locks").unwrap().name(), "file");
        }
        for url in ["redis://localhost:6379", "rediss://u:secret@h/1"] {
            match from_url(url) {
                #[cfg(feature = "redis")]
                Ok(b) => assert_eq!(b.name(), "redis"),
                #[cfg(not(feature = "redis"))]
                Err(ConfigError::FeatureDisabled { feature, .. }) => assert_eq!(feature, "redis"),
                other => panic!("{url}: {other:?}"),
            }
        }
        for url in [
            "postgresql://root@localhost/test",
            "postgres://u:secret@h/db?namespace=n",
        ] {
            match from_url(url) {
                #[cfg(feature = "postgres")]
                Ok(b) => assert_eq!(b.name(), "postgres"),
                #[cfg(not(feature = "postgres"))]
                Err(ConfigError::FeatureDisabled { feature, .. }) => {
                    assert_eq!(feature, "postgres")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        match from_url("etcd://a:2379,b:2379") {
            #[cfg(feature = "etcd")]
            Ok(b) => assert_eq!(b.name(), "etcd"),
            #[cfg(not(feature = "etcd"))]
            Err(ConfigError::FeatureDisabled { feature, .. }) => assert_eq!(feature, "etcd"),
            other => panic!("etcd: {other:?}"),
        }
        assert!(from_url("file://relative").is_err());
        assert!(from_url("memory://").is_err());
        assert!(from_url("").is_err());
    }

    #[test]
    fn errors_never_repeat_passwords() {
        let err = from_url("nope://user:hunter2@host/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("user:***@host"), "{err}");
    }

    /// Passwords with characters that should have been percent-encoded, in every scheme: the
    /// password, and every piece of it between those characters, must appear in no error.
    #[test]
    fn redaction_hides_every_part_of_any_password() {
        let passwords = [
            "hunter2xx",
            "pa55/w0rd",
            "pa55@w0rd",
            "pa55?w0rd",
            "pa55#w0rd",
            "pa55:w0rd",
            "p4ss/w0rd@h0st/db?x=yy#zz:qq",
            "/leading5lash",
            "trailing5lash/",
            "@at5ign",
            "s3cret%2Fenc",
        ];
        let shapes = [
            "redis://user:{pw}@127.0.0.1:6379/0",
            "redis://:{pw}@127.0.0.1/0?prefix=p",
            "rediss://user:{pw}@host:6380/1?bogus=1",
            "redis://user:{pw}@host/0?lease=5s",
            "postgres://u:{pw}@h/db",
            "postgresql://u:{pw}@h:5432/db?sslmode=nope",
            "postgres://u:{pw}@h/db?namespace=bad%ZZ",
            "postgres://h/db?user=u&password={pw}&sslmode=nope",
            "etcd://u:{pw}@a:2379,b:2379",
            "etcds://u:{pw}@a:2379/extra/path",
            "etcd://u:{pw}@a:2379?prefix=/bad prefix",
            "nope://u:{pw}@host/db",
            "file://u:{pw}@host/dir",
        ];
        for pw in passwords {
            let pieces: Vec<&str> = pw
                .split(['/', '@', '?', '#', ':', '='])
                .filter(|p| p.len() >= 4)
                .collect();
            for shape in shapes {
                let url = shape.replace("{pw}", pw);
                let shown = redact(&url);
                let err = match from_url(&url) {
                    Ok(backend) => format!("{backend:?}"),
                    Err(e) => format!("{e} {e:?}"),
                };
                // The backends' own constructors, called directly, hide it too.
                let direct = direct_constructor_error(&url);
                for text in [&shown, &err, &direct] {
                    assert!(!text.contains(pw), "{url} -> {text}");
                    for piece in &pieces {
                        assert!(!text.contains(piece), "{url} -> {text} (shows {piece:?})");
                    }
                }
            }
        }
    }

    fn direct_constructor_error(url: &str) -> String {
        fn shown<T: std::fmt::Debug>(r: Result<T, ConfigError>) -> String {
            match r {
                Ok(backend) => format!("{backend:?}"),
                Err(e) => format!("{e} {e:?}"),
            }
        }
        match url.split_once("://").map(|(scheme, _)| scheme) {
            #[cfg(feature = "redis")]
            Some("redis" | "rediss") => shown(self::redis::RedisBackend::new(url)),
            #[cfg(feature = "postgres")]
            Some("postgres" | "postgresql") => shown(self::postgres::PostgresBackend::new(url)),
            #[cfg(feature = "etcd")]
            Some("etcd" | "etcds") => shown(etcd::EtcdBackend::from_url(url)),
            _ => String::new(),
        }
    }

    #[test]
    fn state_keys_are_checked() {
        assert!(validate_key("schedule:daily-report").is_ok());
        assert!(validate_key("a/b").is_err());
        assert!(validate_key("").is_err());
        assert!(validate_key(".x").is_err());
    }
}
