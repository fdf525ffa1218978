//! The in-process backend, for doctests, tests and users' own tests.
//!
//! Every clone of a [`MemoryBackend`] shares one store; [`MemoryBackend::connection`] gives another
//! node's view of the same store with its own [`Faults`], so a test can make one node's backend
//! fail, hang, lose its lock or stop renewing while the others go on.
//!
//! Without a lease (the default) a lock is held until it is released or its [`Leadership`] is
//! dropped, like a file lock whose process exits. [`MemoryBackend::with_lease`] makes it a lease
//! backend: the holder renews every `lease / 3`, reports each confirmed renewal's send time, and a
//! lock that is not renewed expires — so the elector's self-fencing can be tested on
//! tokio's paused clock.
//!
//! # Examples
//!
//! ```
//! use tower_primary::{Elector, MemoryBackend, NodeId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_primary::Error> {
//! let a = MemoryBackend::new();
//! let b = a.connection(); // another node, same store
//! let first = Elector::builder("jobs").backend(a.clone()).node(NodeId::new("a")).spawn()?;
//! first.handle().wait_primary().await;
//! let second = Elector::builder("jobs").backend(b).node(NodeId::new("b")).spawn()?;
//!
//! // A step-down hands the lock over to the waiting node, with a higher term.
//! first.step_down().await?;
//! let ctx = second.handle().wait_primary().await;
//! assert!(ctx.term() > 1);
//! # first.shutdown().await; second.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    AcquireRequest, Backend, BoxFuture, Candidate, Changes, Leadership, Lock, Registration,
    RenewalSender, Renewals, Stored, VersionChanges, renewals,
};
use crate::error::{ConfigError, Error, Misconfiguration, validate_lock_name};
use crate::role::Holder;

const NAME: &str = "memory";

/// The in-process backend. See the [module docs](self).
#[derive(Clone)]
pub struct MemoryBackend {
    store: Arc<Store>,
    faults: Faults,
    lease: bool,
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("lease", &self.lease)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend::new()
    }
}

impl MemoryBackend {
    /// A new, empty store without leases.
    #[must_use]
    pub fn new() -> Self {
        MemoryBackend {
            store: Arc::new(Store::default()),
            faults: Faults::default(),
            lease: false,
        }
    }

    /// The store registered under `name` in this process (what `memory://name` names).
    #[must_use]
    pub fn named(name: &str) -> Self {
        static NAMED: OnceLock<Mutex<HashMap<String, Arc<Store>>>> = OnceLock::new();
        let mut named = lock(NAMED.get_or_init(Default::default));
        let store = named.entry(name.to_owned()).or_default().clone();
        MemoryBackend {
            store,
            faults: Faults::default(),
            lease: false,
        }
    }

    /// Makes this a lease backend: locks expire unless renewed (every `lease / 3`), and the
    /// elector's lease applies. The minimum lease is 10 ms.
    #[must_use]
    pub fn with_lease(mut self) -> Self {
        self.lease = true;
        self
    }

    /// Another node's connection to the same store, with faults of its own.
    #[must_use]
    pub fn connection(&self) -> Self {
        MemoryBackend {
            store: self.store.clone(),
            faults: Faults::default(),
            lease: self.lease,
        }
    }

    /// The fault switches of this connection.
    #[must_use]
    pub fn faults(&self) -> &Faults {
        &self.faults
    }
}

/// Fault injection for one [`MemoryBackend`] connection.
///
/// ```
/// use tower_primary::{MemoryBackend, Misconfiguration};
///
/// let backend = MemoryBackend::new().with_lease();
/// backend.faults().set_failing(true); // every call errors
/// backend.faults().set_failing(false);
/// backend.faults().stop_renewals(true); // the holder's lease runs out
///
/// // Every call refuses, as a server with the wrong password would.
/// backend
///     .faults()
///     .misconfigure(Misconfiguration::Authentication, "wrong password for user \"app\"");
/// backend.faults().clear_misconfiguration();
/// ```
#[derive(Clone, Default)]
pub struct Faults {
    inner: Arc<FaultState>,
}

struct FaultState {
    id: u64,
    failing: AtomicBool,
    misconfigured: Mutex<Option<(Misconfiguration, String)>>,
    renewals_stopped: AtomicBool,
    hung: watch::Sender<bool>,
}

impl Default for FaultState {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        FaultState {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            failing: AtomicBool::new(false),
            misconfigured: Mutex::new(None),
            renewals_stopped: AtomicBool::new(false),
            hung: watch::channel(false).0,
        }
    }
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("failing", &self.inner.failing.load(Ordering::Relaxed))
            .field("misconfigured", &*lock(&self.inner.misconfigured))
            .field(
                "renewals_stopped",
                &self.inner.renewals_stopped.load(Ordering::Relaxed),
            )
            .field("hung", &*self.inner.hung.borrow())
            .finish()
    }
}

impl Faults {
    /// Every call (acquire, holder, state, renewals) fails with a backend error while set.
    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::SeqCst);
    }

    /// Every call (acquire, holder, state, renewals) fails with [`Error::Misconfigured`] of `kind`
    /// and `message` until [`clear_misconfiguration`](Self::clear_misconfiguration), as a server
    /// refusing the credentials, the database or the lease would. Takes precedence over
    /// [`set_failing`](Self::set_failing).
    pub fn misconfigure(&self, kind: Misconfiguration, message: impl Into<String>) {
        *lock(&self.inner.misconfigured) = Some((kind, message.into()));
    }

    /// Ends [`misconfigure`](Self::misconfigure): calls answer again.
    pub fn clear_misconfiguration(&self) {
        *lock(&self.inner.misconfigured) = None;
    }

    /// Every call hangs while set, and goes on when cleared.
    pub fn set_hung(&self, hung: bool) {
        self.inner.hung.send_replace(hung);
    }

    /// The holder stops renewing while set: the lease runs out (the lock is not released).
    pub fn stop_renewals(&self, stopped: bool) {
        self.inner.renewals_stopped.store(stopped, Ordering::SeqCst);
    }

    /// Takes away every lock this connection holds, as if the server had expired them: the
    /// leaderships' lost signal fires and waiters are woken.
    pub fn lose_locks(&self, backend: &MemoryBackend) {
        let mut locks = lock(&backend.store.locks);
        for entry in locks.values_mut() {
            if entry.held.as_ref().is_some_and(|h| h.conn == self.inner.id) {
                entry.held = None;
                entry.bump();
            }
        }
    }

    /// Waits while hung; errors while misconfigured or failing.
    async fn check(&self, what: &str) -> Result<(), Error> {
        let mut rx = self.inner.hung.subscribe();
        let _ = rx.wait_for(|hung| !*hung).await;
        if let Some((kind, message)) = lock(&self.inner.misconfigured).clone() {
            // The same message whatever the call, as a server's refusal would be.
            return Err(Error::misconfigured(NAME, kind, message, None));
        }
        if self.inner.failing.load(Ordering::SeqCst) {
            return Err(Error::backend_msg(
                NAME,
                format!("{what}: injected failure"),
            ));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Store {
    locks: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    last_term: u64,
    held: Option<Held>,
    state: HashMap<String, Stored>,
    /// Bumped at every change of the holder.
    holder_version: watch::Sender<u64>,
    /// Bumped at every state write.
    state_version: watch::Sender<u64>,
    /// The registry: node id → (registration id, entry).
    candidates: HashMap<String, (u64, Candidate)>,
    /// Bumped at every change of the registry.
    registry_version: watch::Sender<u64>,
    /// The node the lock is reserved for, and until when.
    reserved: Option<(String, Instant)>,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            last_term: 0,
            held: None,
            state: HashMap::new(),
            holder_version: watch::channel(0).0,
            state_version: watch::channel(0).0,
            candidates: HashMap::new(),
            registry_version: watch::channel(0).0,
            reserved: None,
        }
    }
}

impl Entry {
    fn bump(&self) {
        self.holder_version.send_modify(|v| *v += 1);
    }

    /// The node a live reservation is for, and when it runs out.
    fn reservation(&self) -> Option<(&str, Instant)> {
        self.reserved
            .as_ref()
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(node, until)| (node.as_str(), *until))
    }

    /// The holder, unless its lease has run out.
    fn live(&self) -> Option<&Held> {
        self.held
            .as_ref()
            .filter(|h| h.expires.is_none_or(|e| Instant::now() < e))
    }
}

struct Held {
    conn: u64,
    term: u64,
    record: Holder,
    expires: Option<Instant>,
}

use crate::sync::lock;

impl MemoryBackend {
    /// Runs `f` on the store's entry of lock `name`, under the store's mutex.
    fn with_entry<R>(&self, name: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut locks = lock(&self.store.locks);
        f(locks.entry(name.to_owned()).or_default())
    }
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn min_lease(&self) -> Option<Duration> {
        self.lease.then_some(Duration::from_millis(10))
    }

    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        validate_lock_name(name)?;
        lock(&self.store.locks).entry(name.to_owned()).or_default();
        Ok(Arc::new(MemoryLock {
            backend: self.clone(),
            name: name.to_owned(),
        }))
    }
}

#[derive(Debug)]
struct MemoryLock {
    backend: MemoryBackend,
    name: String,
}

impl MemoryLock {
    fn with_entry<R>(&self, f: impl FnOnce(&mut Entry) -> R) -> R {
        self.backend.with_entry(&self.name, f)
    }

    fn faults(&self) -> &Faults {
        &self.backend.faults
    }

    /// The leadership of a grant, with its renewal loop in lease mode.
    fn leadership(
        &self,
        term: u64,
        record: Holder,
        version: watch::Receiver<u64>,
        lease: Option<super::Lease>,
        sent: crate::clock::Timestamp,
        req: &AcquireRequest,
    ) -> Box<dyn Leadership> {
        let renewals = lease.map(|lease| {
            let (tx, rx) = renewals(sent);
            let task = tokio::spawn(renew(
                self.backend.clone(),
                self.name.clone(),
                term,
                lease.ttl(),
                req.clone(),
                tx,
            ));
            (rx, task)
        });
        Box::new(MemoryLeadership {
            backend: self.backend.clone(),
            name: self.name.clone(),
            term,
            record,
            version,
            renewals,
            released: false,
        })
    }
}

impl Lock for MemoryLock {
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
        Box::pin(async move {
            let lease = if self.backend.lease { req.lease } else { None };
            loop {
                self.faults().check("acquire").await?;
                let sent = req.clock.now();
                let sent_instant = Instant::now();
                // Granted synchronously under the mutex: a dropped future cannot leak a grant.
                let outcome = self.with_entry(|e| {
                    let rx = e.holder_version.subscribe();
                    if let Some(h) = e.live() {
                        return Err((rx, h.expires));
                    }
                    match e.reservation() {
                        Some((node, until)) if node != req.node.id() => {
                            return Err((rx, Some(until)));
                        }
                        _ => e.reserved = None,
                    }
                    e.last_term += 1;
                    let term = e.last_term;
                    let record = req.holder(term);
                    e.held = Some(Held {
                        conn: self.faults().inner.id,
                        term,
                        record: record.clone(),
                        expires: lease.map(|l| sent_instant + l.ttl()),
                    });
                    e.bump();
                    Ok((term, record, e.holder_version.subscribe()))
                });
                match outcome {
                    Ok((term, record, version)) => {
                        return Ok(self.leadership(term, record, version, lease, sent, &req));
                    }
                    Err((mut rx, expires)) => {
                        let far = Instant::now() + Duration::from_secs(86_400);
                        tokio::select! {
                            _ = rx.changed() => {}
                            () = tokio::time::sleep_until(expires.unwrap_or(far)) => {}
                        }
                    }
                }
            }
        })
    }

    /// In lease mode, the lease of `token` (its term) while it is still live, under a new term.
    fn resume<'a>(
        &'a self,
        req: AcquireRequest,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Leadership>>, Error>> {
        Box::pin(async move {
            self.faults().check("resume").await?;
            let (Some(lease), Ok(old)) = (
                req.lease.filter(|_| self.backend.lease),
                token.parse::<u64>(),
            ) else {
                return Ok(None);
            };
            let sent = req.clock.now();
            let sent_instant = Instant::now();
            let taken = self.with_entry(|e| {
                if e.live().is_none_or(|h| h.term != old) {
                    return None;
                }
                e.last_term += 1;
                let term = e.last_term;
                let record = req.holder(term);
                e.held = Some(Held {
                    conn: self.faults().inner.id,
                    term,
                    record: record.clone(),
                    expires: Some(sent_instant + lease.ttl()),
                });
                e.bump();
                Some((term, record, e.holder_version.subscribe()))
            });
            Ok(taken.map(|(term, record, version)| {
                self.leadership(term, record, version, Some(lease), sent, &req)
            }))
        })
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
        Box::pin(async move {
            self.faults().check("holder").await?;
            Ok(self.with_entry(|e| e.live().map(|h| h.record.clone())))
        })
    }

    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            self.faults().check("watch holder").await?;
            let rx = self.with_entry(|e| e.holder_version.subscribe());
            Ok(Box::new(VersionChanges(rx)) as Box<dyn Changes>)
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
        Box::pin(async move {
            self.faults().check("load").await?;
            Ok(self.with_entry(|e| e.state.get(key).cloned()))
        })
    }

    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.faults().check("store").await?;
            let conn = self.faults().inner.id;
            self.with_entry(|e| {
                let holds = e.live().is_some_and(|h| h.term == term && h.conn == conn);
                let newer = e.state.get(key).map(|s| s.term).filter(|t| *t > term);
                if !holds || newer.is_some() {
                    return Err(Error::StaleTerm {
                        lock: self.name.clone(),
                        term,
                        current: newer.or_else(|| e.live().map(|h| h.term)),
                    });
                }
                e.state
                    .insert(key.to_owned(), Stored::new(value.to_vec(), term));
                e.state_version.send_modify(|v| *v += 1);
                Ok(())
            })
        })
    }

    fn watch_key<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            self.faults().check("watch key").await?;
            let rx = self.with_entry(|e| e.state_version.subscribe());
            Ok(Box::new(VersionChanges(rx)) as Box<dyn Changes>)
        })
    }

    /// Kept in the store until the registration is dropped (the node's "death").
    fn register(
        &self,
        entry: Candidate,
        _lease: Option<super::Lease>,
    ) -> BoxFuture<'_, Result<Box<dyn Registration>, Error>> {
        Box::pin(async move {
            self.faults().check("register").await?;
            static IDS: AtomicU64 = AtomicU64::new(1);
            let id = IDS.fetch_add(1, Ordering::Relaxed);
            let node = entry.node.clone();
            self.with_entry(|e| {
                e.candidates.insert(node.clone(), (id, entry));
                e.registry_version.send_modify(|v| *v += 1);
            });
            Ok(Box::new(MemoryRegistration {
                backend: self.backend.clone(),
                name: self.name.clone(),
                node,
                id,
            }) as Box<dyn Registration>)
        })
    }

    fn candidates(&self) -> BoxFuture<'_, Result<Vec<Candidate>, Error>> {
        Box::pin(async move {
            self.faults().check("candidates").await?;
            Ok(self.with_entry(|e| e.candidates.values().map(|(_, c)| c.clone()).collect()))
        })
    }

    fn watch_candidates(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            self.faults().check("watch candidates").await?;
            let rx = self.with_entry(|e| e.registry_version.subscribe());
            Ok(Box::new(VersionChanges(rx)) as Box<dyn Changes>)
        })
    }
}

/// A registry entry of the memory backend: removed when dropped.
#[derive(Debug)]
struct MemoryRegistration {
    backend: MemoryBackend,
    name: String,
    node: String,
    id: u64,
}

impl MemoryRegistration {
    fn with_entry<R>(&self, f: impl FnOnce(&mut Entry) -> R) -> R {
        self.backend.with_entry(&self.name, f)
    }
}

impl Registration for MemoryRegistration {
    fn update(&self, entry: Candidate) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.backend.faults.check("update registration").await?;
            self.with_entry(|e| {
                e.candidates.insert(self.node.clone(), (self.id, entry));
                e.registry_version.send_modify(|v| *v += 1);
            });
            Ok(())
        })
    }
}

impl Drop for MemoryRegistration {
    fn drop(&mut self) {
        self.with_entry(|e| {
            if e.candidates
                .get(&self.node)
                .is_some_and(|(id, _)| *id == self.id)
            {
                e.candidates.remove(&self.node);
                e.registry_version.send_modify(|v| *v += 1);
            }
        });
    }
}

/// The renewal loop of a lease-mode leadership.
async fn renew(
    backend: MemoryBackend,
    name: String,
    term: u64,
    ttl: Duration,
    req: AcquireRequest,
    tx: RenewalSender,
) {
    let every = ttl / 3;
    let mut next = Instant::now() + every;
    loop {
        tokio::time::sleep_until(next).await;
        next += every;
        if tx.is_closed() {
            return;
        }
        if backend.faults.inner.renewals_stopped.load(Ordering::SeqCst) {
            continue;
        }
        let sent = req.clock.now();
        let sent_instant = Instant::now();
        if backend.faults.check("renew").await.is_err() {
            continue;
        }
        let renewed = {
            let mut locks = lock(&backend.store.locks);
            let entry = locks.entry(name.clone()).or_default();
            let ours = entry.live().is_some_and(|h| h.term == term);
            if let Some(h) = entry.held.as_mut().filter(|_| ours) {
                h.expires = Some(sent_instant + ttl);
            }
            ours
        };
        if !renewed {
            return;
        }
        tx.confirm(sent);
    }
}

struct MemoryLeadership {
    backend: MemoryBackend,
    name: String,
    term: u64,
    record: Holder,
    version: watch::Receiver<u64>,
    renewals: Option<(Renewals, tokio::task::JoinHandle<()>)>,
    released: bool,
}

impl fmt::Debug for MemoryLeadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLeadership")
            .field("lock", &self.name)
            .field("term", &self.term)
            .finish_non_exhaustive()
    }
}

impl MemoryLeadership {
    /// Whether this term still holds the lock in the store (expired leases count as held until
    /// someone else takes them: the elector's deadline fences first).
    fn still_held(&self) -> bool {
        let mut locks = lock(&self.backend.store.locks);
        let entry = locks.entry(self.name.clone()).or_default();
        entry.held.as_ref().is_some_and(|h| h.term == self.term)
    }

    fn give_up(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        if let Some((_, task)) = self.renewals.take() {
            task.abort();
        }
        let mut locks = lock(&self.backend.store.locks);
        let entry = locks.entry(self.name.clone()).or_default();
        if entry.held.as_ref().is_some_and(|h| h.term == self.term) {
            entry.held = None;
            entry.bump();
        }
    }
}

impl Leadership for MemoryLeadership {
    fn term(&self) -> u64 {
        self.term
    }

    fn holder(&self) -> &Holder {
        &self.record
    }

    fn renewals(&self) -> Option<Renewals> {
        self.renewals.as_ref().map(|(r, _)| r.clone())
    }

    /// In lease mode: the term, which [`Lock::resume`] takes over while the lease is live.
    fn resume_token(&self) -> Option<String> {
        self.backend.lease.then(|| self.term.to_string())
    }

    fn lost(&mut self) -> BoxFuture<'_, Error> {
        Box::pin(async move {
            loop {
                if !self.still_held() {
                    return Error::Lost {
                        lock: self.name.clone(),
                        reason: "the lock was taken away".to_owned(),
                    };
                }
                if self.version.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            self.backend.faults.check("release").await?;
            self.give_up();
            Ok(())
        })
    }

    fn reserve<'a>(
        &'a mut self,
        node: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.backend.faults.check("reserve").await?;
            let mut locks = lock(&self.backend.store.locks);
            let entry = locks.entry(self.name.clone()).or_default();
            if entry.held.as_ref().is_none_or(|h| h.term != self.term) {
                return Err(Error::StaleTerm {
                    lock: self.name.clone(),
                    term: self.term,
                    current: entry.live().map(|h| h.term),
                });
            }
            entry.reserved = Some((node.to_owned(), Instant::now() + window));
            entry.bump();
            Ok(())
        })
    }
}

impl Drop for MemoryLeadership {
    fn drop(&mut self) {
        if self.backend.lease {
            // Like a crashed lease holder: stop renewing and let the lease run out.
            if let Some((_, task)) = self.renewals.take() {
                task.abort();
            }
        } else {
            // Like a process holding a file lock exiting: the lock goes with it.
            self.give_up();
        }
    }
}
