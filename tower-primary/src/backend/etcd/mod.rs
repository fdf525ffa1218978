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
//! # How it works
//!
//! Keys of lock `L` under prefix `P`:
//!
//! | key | value |
//! |---|---|
//! | `P/L/election/<lease id, 16 hex digits>` | one per candidate, bound to its lease: the [`Holder`] record as JSON |
//! | `P/L/state/<key>` | a state value: the writer's term (8 bytes, big endian), then the bytes |
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
//!   compare is why that cannot make a primary here. A handover therefore costs the
//!   releaser's revoke, one watch event and one transaction.
//! - **Term** = the create revision of the holder's key. Revisions only grow, survive restarts of
//!   etcd, and a later holder's key is always younger: terms strictly increase.
//! - **Renewals.** Every confirmed keepalive is reported with its send time; the elector stops
//!   acting at `send time + lease - margin`, before etcd (which counts from the
//!   keepalive's arrival) can expire the lease.
//! - **Loss** is reported when a keepalive says the lease is gone, or when the watch sees the
//!   holder's own key deleted (revoked, expired, or removed by hand) — usually well before the
//!   deadline would notice.
//! - **Release** revokes the lease: the key goes, the next candidate's watch fires at once.
//!   A dropped acquisition revokes its lease in the background. A leadership dropped without
//!   release (its runtime died) stops renewing and lets the lease run out, like a crash.
//! - **Holder view**: the oldest key's record (its term is the key's create revision), followed
//!   through a watch of the prefix.
//! - **State API**: a write is a transaction guarded by the holder key's create revision
//!   (`== term`), so it succeeds only while that term holds the lock; while it does, no newer term
//!   can exist. [`watch_key`](crate::backend::Lock::watch_key) watches the value's key.
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

mod session;
mod url;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue,
    PutOptions, SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchOptions, WatchStream,
};
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

use self::session::{LostSender, Session, rpc};
use super::{AcquireRequest, Backend, BoxFuture, Changes, Leadership, Lock, Renewals, Stored};
use crate::error::{ConfigError, Error, validate_lock_name};
use crate::role::Holder;

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
            .map(|(name, _)| format!("{name}:***@"))
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
                rpc(
                    config.timeout,
                    "connect",
                    Client::connect(endpoints, Some(options)),
                )
                .await
            })
            .await
            .cloned()
    }
}

impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn min_lease(&self) -> Option<Duration> {
        Some(MIN_LEASE)
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

/// The term this node holds and the key that proves it, for guarded state writes.
#[derive(Clone, Debug)]
struct Held {
    term: u64,
    key: Vec<u8>,
}

type HeldSlot = Arc<Mutex<Option<Held>>>;

#[derive(Clone)]
struct EtcdLock {
    backend: EtcdBackend,
    name: String,
    election: Vec<u8>,
    state: Vec<u8>,
    held: HeldSlot,
}

impl fmt::Debug for EtcdLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLock")
            .field("lock", &self.name)
            .field("election", &String::from_utf8_lossy(&self.election))
            .finish_non_exhaustive()
    }
}

/// What a claim of the lock found.
enum Claim {
    /// The candidate's key was the oldest and still its own: it holds the lock now.
    Won,
    /// An older key exists; the transaction ran at this revision.
    Behind(i64),
    /// Its key is gone (its lease ran out).
    Gone,
}

impl EtcdLock {
    fn timeout(&self) -> Duration {
        self.backend.config.timeout
    }

    async fn rpc<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        rpc(
            self.timeout(),
            &format!("lock {:?}: {what}", self.name),
            fut,
        )
        .await
    }

    fn candidate_key(&self, lease: i64) -> Vec<u8> {
        let mut key = self.election.clone();
        // Lease ids are positive; as u64 they print the same.
        key.extend_from_slice(format!("{:016x}", lease.cast_unsigned()).as_bytes());
        key
    }

    fn state_key(&self, key: &str) -> Vec<u8> {
        let mut k = self.state.clone();
        k.extend_from_slice(key.as_bytes());
        k
    }

    fn corrupt(&self, what: &str, problem: impl Into<String>) -> Error {
        Error::Corrupt {
            backend: NAME,
            what: format!("{what} of lock {:?}", self.name),
            problem: problem.into(),
        }
    }

    /// The holder record stored in `kv`, with its term (the key's create revision).
    fn holder_from(&self, kv: &KeyValue) -> Result<Holder, Error> {
        let mut holder: Holder = serde_json::from_slice(kv.value())
            .map_err(|e| self.corrupt("holder record", e.to_string()))?;
        holder.term = term_of(kv.create_revision());
        Ok(holder)
    }

    /// Opens a watch on `key` (or every key under it) and waits until etcd confirms it, so that
    /// nothing that happens after this returns is missed.
    async fn watch(
        &self,
        client: &Client,
        key: &[u8],
        prefix: bool,
        start: Option<i64>,
    ) -> Result<WatchStream, Error> {
        let mut options = WatchOptions::new();
        if prefix {
            options = options.with_prefix();
        }
        if let Some(start) = start {
            options = options.with_start_revision(start);
        }
        let mut stream = self
            .rpc("watch", client.clone().watch(key.to_vec(), Some(options)))
            .await?;
        match self.rpc("watch", stream.message()).await? {
            Some(r) if r.created() && !r.canceled() => Ok(stream),
            Some(r) => Err(Error::backend_msg(
                NAME,
                format!(
                    "lock {:?}: watch refused: {}",
                    self.name,
                    if r.cancel_reason().is_empty() {
                        "no confirmation"
                    } else {
                        r.cancel_reason()
                    }
                ),
            )),
            None => Err(Error::backend_msg(
                NAME,
                format!("lock {:?}: watch stream closed", self.name),
            )),
        }
    }

    /// Claims the lock in one transaction: if our key still exists with its create revision and
    /// no older candidate does, writes the final holder record onto it; else tells why not.
    async fn claim(
        &self,
        client: &Client,
        key: &[u8],
        rev: i64,
        lease: i64,
        record: Vec<u8>,
    ) -> Result<Claim, Error> {
        let older = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1)
            // 0 would mean "no bound"; our own revision is always above 1.
            .with_max_create_revision((rev - 1).max(1));
        let txn = Txn::new()
            .when([
                // Our key, not one a lapsed lease left behind (research E5).
                Compare::create_revision(key.to_vec(), CompareOp::Equal, rev),
                // A range compare holds for every key in it: none is older than ours.
                Compare::create_revision(self.election.clone(), CompareOp::Greater, rev - 1)
                    .with_prefix(),
            ])
            .and_then([TxnOp::put(
                key.to_vec(),
                record,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([
                TxnOp::get(key.to_vec(), Some(GetOptions::new().with_keys_only())),
                TxnOp::get(self.election.clone(), Some(older)),
            ]);
        let resp = self.rpc("claim the lock", client.clone().txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Claim::Won);
        }
        let gets = gets(&resp);
        let (Some(own), Some(older)) = (gets.first(), gets.get(1)) else {
            return Err(self.corrupt("transaction reply", "missing range results"));
        };
        if own
            .kvs()
            .first()
            .is_none_or(|kv| kv.create_revision() != rev)
        {
            return Ok(Claim::Gone);
        }
        if older.kvs().is_empty() {
            // The compares and the reads saw the same revision: only a server that ignores range
            // compares (etcd before 3.3) gets here. Waiting would wait forever.
            return Err(Error::backend_msg(
                NAME,
                format!(
                    "lock {:?}: the server refused a claim although no older candidate exists \
                     (etcd 3.3 or newer is needed: range compares)",
                    self.name
                ),
            ));
        }
        Ok(Claim::Behind(revision_of(&resp)))
    }

    async fn acquire_inner(&self, req: AcquireRequest) -> Result<Box<dyn Leadership>, Error> {
        let lease = req.lease.unwrap_or_default();
        if lease.ttl() < MIN_LEASE {
            return Err(Error::Config(ConfigError::InvalidTiming {
                setting: "lease",
                value: lease.ttl(),
                rule: format!("must be at least {MIN_LEASE:?} on the etcd backend"),
            }));
        }
        let client = self.backend.client().await?;
        // From here on, dropping `session` (an error, or this future dropped) revokes the lease and
        // with it the candidate key: nothing is leaked.
        let session = Session::grant(&client, lease, req.clock, self.timeout()).await?;
        let key = self.candidate_key(session.id);
        let candidate = serde_json::to_vec(&req.holder(0))
            .map_err(|e| Error::backend(NAME, "encode the holder record", e))?;
        let create = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                candidate,
                Some(PutOptions::new().with_lease(session.id)),
            )]);
        let resp = self
            .rpc("create the candidate key", client.clone().txn(create))
            .await?;
        if !resp.succeeded() {
            return Err(self.corrupt(
                "candidate key",
                "a fresh lease's key already exists (another client with the same lease id?)",
            ));
        }
        let rev = revision_of(&resp);
        // Every deletion after our key was created wakes us; the reads below see all before.
        let mut watch = self
            .watch(&client, &self.election, true, Some(rev + 1))
            .await?;
        let record = loop {
            let value = serde_json::to_vec(&req.holder(term_of(rev)))
                .map_err(|e| Error::backend(NAME, "encode the holder record", e))?;
            let seen = match self
                .claim(&client, &key, rev, session.id, value.clone())
                .await?
            {
                // The record exactly as every other node reads it (`since` in milliseconds).
                Claim::Won => {
                    break serde_json::from_slice::<Holder>(&value)
                        .map_err(|e| Error::backend(NAME, "decode the holder record", e))?;
                }
                Claim::Gone => {
                    return Err(Error::backend_msg(
                        NAME,
                        format!(
                            "lock {:?}: our candidate key vanished while waiting (lease expired)",
                            self.name
                        ),
                    ));
                }
                Claim::Behind(seen) => seen,
            };
            // Wait for a deletion after that read; then claim again.
            loop {
                tokio::select! {
                    reason = session.lost() => {
                        return Err(Error::backend_msg(NAME, format!("lock {:?}: while waiting: {reason}", self.name)));
                    }
                    msg = watch.message() => match msg {
                        Ok(Some(r)) if !r.canceled() => {
                            let deleted = r.events().iter().any(|e| {
                                e.event_type() == EventType::Delete
                                    && e.kv().is_some_and(|kv| kv.mod_revision() > seen)
                            });
                            if deleted {
                                break;
                            }
                        }
                        Ok(_) => {
                            return Err(Error::backend_msg(NAME, format!("lock {:?}: the candidates' watch ended", self.name)));
                        }
                        Err(e) => return Err(Error::backend(NAME, format!("lock {:?}: the candidates' watch failed: {e}", self.name), e)),
                    }
                }
            }
        };
        let term = term_of(rev);
        // No await from here on: the grant is handed over whole, or dropped (and revoked) whole.
        let mut session = session;
        session.keep_on_drop();
        *crate::sync::lock(&self.held) = Some(Held {
            term,
            key: key.clone(),
        });
        let monitor = tokio::spawn(monitor(
            self.clone(),
            client,
            key,
            rev,
            watch,
            session.lost_sender(),
        ));
        Ok(Box::new(EtcdLeadership {
            lock: self.name.clone(),
            term,
            renewals: session.renewals(),
            record,
            session: Some(session),
            monitor,
            held: self.held.clone(),
        }))
    }

    /// The term of the current holder, if any (for error messages).
    async fn current_term(&self) -> Option<u64> {
        self.holder_inner().await.ok().flatten().map(|h| h.term)
    }

    async fn holder_inner(&self) -> Result<Option<Holder>, Error> {
        let client = self.backend.client().await?;
        let oldest = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let resp = self
            .rpc(
                "read the holder",
                client.clone().get(self.election.clone(), Some(oldest)),
            )
            .await?;
        resp.kvs()
            .first()
            .map(|kv| self.holder_from(kv))
            .transpose()
    }
}

impl Lock for EtcdLock {
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
        Box::pin(self.acquire_inner(req))
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
        Box::pin(self.holder_inner())
    }

    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            let changes = EtcdChanges::open(self, self.election.clone(), true).await?;
            Ok(Box::new(changes) as Box<dyn Changes>)
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
        Box::pin(async move {
            let client = self.backend.client().await?;
            let resp = self
                .rpc(
                    "load a state value",
                    client.clone().get(self.state_key(key), None),
                )
                .await?;
            let Some(kv) = resp.kvs().first() else {
                return Ok(None);
            };
            decode_state(kv.value()).map(Some).ok_or_else(|| {
                self.corrupt(&format!("state value {key:?}"), "shorter than its term")
            })
        })
    }

    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let stale = |current| Error::StaleTerm {
                lock: self.name.clone(),
                term,
                current,
            };
            let held = crate::sync::lock(&self.held)
                .clone()
                .filter(|h| h.term == term);
            let Some(held) = held else {
                return Err(stale(self.current_term().await.filter(|c| *c != term)));
            };
            let client = self.backend.client().await?;
            let Ok(rev) = i64::try_from(term) else {
                return Err(stale(None));
            };
            // While our key exists with this create revision, this term holds the lock, and no
            // newer term can have existed (its key would be younger than ours).
            let txn = Txn::new()
                .when([Compare::create_revision(
                    held.key.clone(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then([TxnOp::put(
                    self.state_key(key),
                    encode_state(term, value),
                    None,
                )]);
            let resp = self
                .rpc("store a state value", client.clone().txn(txn))
                .await?;
            if resp.succeeded() {
                Ok(())
            } else {
                Err(stale(self.current_term().await.filter(|c| *c != term)))
            }
        })
    }

    fn watch_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            let changes = EtcdChanges::open(self, self.state_key(key), false).await?;
            Ok(Box::new(changes) as Box<dyn Changes>)
        })
    }
}

/// A watch on the holder's prefix or on a state key. After a broken stream it reopens the watch
/// and reports a possible change (one may have been missed).
struct EtcdChanges {
    lock: EtcdLock,
    key: Vec<u8>,
    prefix: bool,
    stream: Option<WatchStream>,
}

impl EtcdChanges {
    async fn open(lock: &EtcdLock, key: Vec<u8>, prefix: bool) -> Result<Self, Error> {
        let client = lock.backend.client().await?;
        let stream = lock.watch(&client, &key, prefix, None).await?;
        Ok(EtcdChanges {
            lock: lock.clone(),
            key,
            prefix,
            stream: Some(stream),
        })
    }
}

impl Changes for EtcdChanges {
    fn changed(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            loop {
                let Some(stream) = self.stream.as_mut() else {
                    let client = self.lock.backend.client().await?;
                    let stream = self
                        .lock
                        .watch(&client, &self.key, self.prefix, None)
                        .await?;
                    self.stream = Some(stream);
                    return Ok(());
                };
                match stream.message().await {
                    Ok(Some(r)) if !r.canceled() => {
                        if !r.events().is_empty() {
                            return Ok(());
                        }
                    }
                    Ok(_) | Err(_) => self.stream = None,
                }
            }
        })
    }
}

/// Holding the lock: one term.
struct EtcdLeadership {
    lock: String,
    term: u64,
    record: Holder,
    renewals: Renewals,
    session: Option<Session>,
    monitor: JoinHandle<()>,
    held: HeldSlot,
}

impl fmt::Debug for EtcdLeadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLeadership")
            .field("lock", &self.lock)
            .field("term", &self.term)
            .field("lease", &self.session.as_ref().map(|s| s.id))
            .finish_non_exhaustive()
    }
}

impl EtcdLeadership {
    fn forget(&self) {
        self.monitor.abort();
        let mut held = crate::sync::lock(&self.held);
        if held.as_ref().is_some_and(|h| h.term == self.term) {
            *held = None;
        }
    }
}

impl Leadership for EtcdLeadership {
    fn term(&self) -> u64 {
        self.term
    }

    fn holder(&self) -> &Holder {
        &self.record
    }

    fn renewals(&self) -> Option<Renewals> {
        Some(self.renewals.clone())
    }

    fn lost(&mut self) -> BoxFuture<'_, Error> {
        Box::pin(async move {
            let reason = match &self.session {
                Some(session) => session.lost().await,
                None => std::future::pending().await,
            };
            Error::Lost {
                lock: self.lock.clone(),
                reason,
            }
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            self.forget();
            match self.session.take() {
                Some(session) => session.revoke().await,
                None => Ok(()),
            }
        })
    }
}

impl Drop for EtcdLeadership {
    fn drop(&mut self) {
        // Dropped without release (the runtime died): the session stops renewing and the lease
        // runs out, as after a crash; this node's deadline passes first.
        self.forget();
    }
}

/// Watches the holder's own key and reports its deletion as a loss. A broken watch is reopened
/// after reading the key again, so a deletion in between is not missed.
async fn monitor(
    lock: EtcdLock,
    client: Client,
    key: Vec<u8>,
    rev: i64,
    watch: WatchStream,
    lost: LostSender,
) {
    let mut watch = Some(watch);
    let mut retry = crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        if let Some(stream) = watch.as_mut() {
            match stream.message().await {
                Ok(Some(r)) if !r.canceled() => {
                    let gone = r.events().iter().any(|e| {
                        e.event_type() == EventType::Delete
                            && e.kv().is_some_and(|kv| kv.key() == key.as_slice())
                    });
                    if gone {
                        lost.send_replace(Some(
                            "our key was deleted (lease revoked or expired)".to_owned(),
                        ));
                        return;
                    }
                }
                Ok(_) | Err(_) => watch = None,
            }
            continue;
        }
        tokio::time::sleep(retry.next_delay()).await;
        let read = lock
            .rpc("read our key", client.clone().get(key.clone(), None))
            .await;
        let Ok(resp) = read else { continue };
        if resp
            .kvs()
            .first()
            .is_none_or(|kv| kv.create_revision() != rev)
        {
            lost.send_replace(Some(
                "our key is gone (lease revoked or expired)".to_owned(),
            ));
            return;
        }
        let from = resp.header().map_or(rev, |h| h.revision()) + 1;
        if let Ok(w) = lock.watch(&client, &key, false, Some(from)).await {
            retry.reset();
            watch = Some(w);
        }
    }
}

fn term_of(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

fn revision_of(resp: &TxnResponse) -> i64 {
    resp.header().map_or(0, |h| h.revision())
}

fn gets(resp: &TxnResponse) -> Vec<etcd_client::GetResponse> {
    resp.op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}

fn encode_state(term: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&term.to_be_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_state(raw: &[u8]) -> Option<Stored> {
    let (term, value) = raw.split_first_chunk::<8>()?;
    Some(Stored::new(value.to_vec(), u64::from_be_bytes(*term)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Lease;

    #[test]
    fn state_values_carry_their_term() {
        let raw = encode_state(42, b"hello");
        assert_eq!(decode_state(&raw), Some(Stored::new(b"hello".to_vec(), 42)));
        assert_eq!(
            decode_state(&encode_state(7, b"")),
            Some(Stored::new(Vec::new(), 7))
        );
        assert_eq!(decode_state(b"short"), None);
    }

    #[test]
    fn leases_round_up_to_whole_seconds() {
        assert_eq!(session::ttl_secs(Lease::new(Duration::from_secs(2))), 2);
        assert_eq!(
            session::ttl_secs(Lease::new(Duration::from_millis(2001))),
            3
        );
        assert_eq!(
            session::ttl_secs(Lease::new(Duration::from_millis(2500))),
            3
        );
    }

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
            b"apps/x/jobs/election/0000000000001234".to_vec()
        );
        assert_eq!(lock.state_key("k"), b"apps/x/jobs/state/k".to_vec());
    }

    #[test]
    fn bad_settings_are_configuration_errors() {
        let err = EtcdBackend::new(["h:0"]).lock("x").unwrap_err().to_string();
        assert!(err.contains("invalid port"), "{err}");
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
    fn the_minimum_lease_is_two_seconds() {
        assert_eq!(EtcdBackend::new(["h:1"]).min_lease(), Some(MIN_LEASE));
    }
}
