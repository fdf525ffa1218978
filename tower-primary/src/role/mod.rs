//! Who is primary: [`Role`], [`Holder`], [`NodeId`], and the cheap [`RoleHandle`] that every
//! request, task and health check reads.
//!
//! A [`RoleHandle`] is a `watch` receiver plus an atomic deadline. Reading it never blocks and never
//! does I/O, so it can sit on the request path. [`RoleHandle::is_primary`] compares the deadline of
//! the current term with the [`Clock`] itself: a process resumed after `SIGSTOP` past its lease sees
//! "not primary" before the elector task has run.
//!
//! # Examples
//!
//! ```
//! use tower_primary::{Role, RoleHandle};
//!
//! // A fixed handle, for unit tests of code that reads the role.
//! let handle = RoleHandle::fixed(Role::primary(7));
//! assert!(handle.is_primary());
//! assert_eq!(handle.term(), Some(7));
//!
//! let handle = RoleHandle::fixed(Role::Secondary { holder: None });
//! assert!(!handle.is_primary());
//! ```

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

mod candidate;

pub use self::candidate::Candidate;
pub use crate::backend_error::BackendError;
use crate::clock::{Clock, Timestamp};
use crate::watchdog::{Liveness, Watchdog};

/// Environment variable holding this process's worker index.
pub const WORKER_ENV: &str = "TOWER_PRIMARY_WORKER";

/// The identity of one node (process) taking part in elections.
///
/// # Examples
///
/// ```
/// use tower_primary::NodeId;
///
/// let node = NodeId::from_env();
/// assert_eq!(node.pid(), std::process::id());
/// assert!(node.id().contains(&std::process::id().to_string()));
///
/// let named = NodeId::new("web-1").with_worker(3);
/// assert_eq!(named.id(), "web-1");
/// assert_eq!(named.worker(), Some(3));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeId {
    id: String,
    host: String,
    pid: u32,
    worker: Option<u32>,
}

impl NodeId {
    /// This process: host name, pid and the worker index from `TOWER_PRIMARY_WORKER` if set. The
    /// id is `host:pid`, or `host:pid:wN` for worker `N`.
    #[must_use]
    pub fn from_env() -> Self {
        let host = hostname();
        let pid = std::process::id();
        let worker = std::env::var(WORKER_ENV)
            .ok()
            .and_then(|w| w.trim().parse().ok());
        let id = match worker {
            Some(w) => format!("{host}:{pid}:w{w}"),
            None => format!("{host}:{pid}"),
        };
        NodeId {
            id,
            host,
            pid,
            worker,
        }
    }

    /// A node with a chosen id; host and pid are this process's.
    #[must_use]
    pub fn new(id: impl Into<String>) -> Self {
        NodeId {
            id: id.into(),
            host: hostname(),
            pid: std::process::id(),
            worker: None,
        }
    }

    /// Sets the worker index.
    #[must_use]
    pub fn with_worker(mut self, worker: u32) -> Self {
        self.worker = Some(worker);
        self
    }

    /// The node's id, unique among the nodes of a lock.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The host name.
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The worker index, if any.
    #[must_use]
    pub fn worker(&self) -> Option<u32> {
        self.worker
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Who holds a lock: the record every backend stores and `/health/role` shows.
///
/// # Examples
///
/// ```
/// use tower_primary::{Holder, NodeId};
///
/// let h = Holder::new(&NodeId::new("web-1"), 42);
/// let json = serde_json::to_value(&h).unwrap();
/// assert_eq!(json["id"], "web-1");
/// assert_eq!(json["term"], 42);
/// assert!(json["since"].as_str().unwrap().ends_with('Z'));
/// let back: Holder = serde_json::from_value(json).unwrap();
/// assert_eq!(back.term, 42);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Holder {
    /// The node id.
    pub id: String,
    /// The host name.
    pub host: String,
    /// The process id.
    pub pid: u32,
    /// The worker index.
    pub worker: Option<u32>,
    /// The URL the node advertised (for 307 redirects), if any.
    pub url: Option<String>,
    /// The term of this primary period.
    pub term: u64,
    /// When this primary period began, wall-clock, for display only (RFC 3339).
    #[serde(with = "crate::rfc3339")]
    pub since: SystemTime,
    /// The lease in milliseconds, on backends that have one; on PostgreSQL the holder's
    /// fencing bound (how long a successor that cannot prove it gone waits for it).
    pub lease_ms: Option<u64>,
    /// The holder's process, so that a successor on the same host can tell when it is gone
    /// (`None` in records of older versions and where `/proc` cannot tell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<crate::process::ProcessIdentity>,
    /// Set by the holder itself once its term has ended cleanly (stepped down, then released):
    /// its successor need not wait for it. `false` in records of older versions.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

impl Holder {
    /// A record for `node` holding `term` from now on.
    #[must_use]
    pub fn new(node: &NodeId, term: u64) -> Self {
        Holder {
            id: node.id.clone(),
            host: node.host.clone(),
            pid: node.pid,
            worker: node.worker,
            url: None,
            term,
            since: SystemTime::now(),
            lease_ms: None,
            process: None,
            released: false,
        }
    }

    /// Sets the advertised URL.
    #[must_use]
    pub fn with_url(mut self, url: Option<String>) -> Self {
        self.url = url;
        self
    }

    /// Sets the lease in milliseconds.
    #[must_use]
    pub fn with_lease_ms(mut self, lease_ms: Option<u64>) -> Self {
        self.lease_ms = lease_ms;
        self
    }
}

/// The role of this node for one lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The elector has not yet learned anything.
    Starting,
    /// This node holds the lock.
    Primary {
        /// The fencing term of this primary period.
        term: u64,
        /// When this node became primary (wall-clock, for display).
        since: SystemTime,
    },
    /// Another node holds the lock, or nobody does.
    Secondary {
        /// The current holder, when known.
        holder: Option<Holder>,
    },
}

impl Role {
    /// `Primary` with `term`, since now.
    #[must_use]
    pub fn primary(term: u64) -> Self {
        Role::Primary {
            term,
            since: SystemTime::now(),
        }
    }

    /// Whether this is `Primary`.
    #[must_use]
    pub fn is_primary(&self) -> bool {
        matches!(self, Role::Primary { .. })
    }

    /// The term: this node's when primary, the holder's when secondary and known.
    #[must_use]
    pub fn term(&self) -> Option<u64> {
        match self {
            Role::Primary { term, .. } => Some(*term),
            Role::Secondary { holder } => holder.as_ref().map(|h| h.term),
            Role::Starting => None,
        }
    }

    /// `"primary"`, `"secondary"` or `"starting"`, as `/health/role` and `x-primary-role` spell it.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Primary { .. } => "primary",
            Role::Secondary { .. } => "secondary",
        }
    }
}

/// What the elector publishes.
#[derive(Clone, Debug)]
pub(crate) struct RoleState {
    pub(crate) role: Role,
    /// The holder as last known; on the primary, itself.
    pub(crate) holder: Option<Holder>,
    /// The current term's context, while primary.
    pub(crate) term: Option<TermContext>,
}

/// State shared by the elector and every handle of one lock.
pub(crate) struct Shared {
    pub(crate) lock: String,
    pub(crate) node: NodeId,
    pub(crate) clock: Clock,
    /// Deadline of the current term in `clock` nanoseconds: 0 when not primary, `u64::MAX` when the
    /// backend has no lease.
    pub(crate) deadline: AtomicU64,
    pub(crate) state: watch::Sender<RoleState>,
    /// The elector loop's heartbeat, for `/health/live`.
    pub(crate) watchdog: Watchdog,
    /// The misconfiguration the campaign is stuck on, if any.
    backend_error: RwLock<Option<BackendError>>,
    /// This node's own registry entry, as configured (priority, ready, draining, yielded).
    pub(crate) entry: watch::Sender<Candidate>,
    /// The lock's registry as this node last read it.
    candidates: watch::Sender<Vec<Candidate>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("lock", &self.lock)
            .field("node", &self.node.id)
            .field("deadline", &self.deadline.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(lock: String, node: NodeId, clock: Clock, role: Role) -> Arc<Self> {
        let (state, _) = watch::channel(RoleState {
            role,
            holder: None,
            term: None,
        });
        let node_id = node.id.clone();
        Arc::new(Shared {
            lock,
            node,
            clock,
            deadline: AtomicU64::new(0),
            state,
            watchdog: Watchdog::unsupervised(),
            backend_error: RwLock::new(None),
            entry: watch::channel(Candidate::new(node_id)).0,
            candidates: watch::channel(Vec::new()).0,
        })
    }

    pub(crate) fn backend_error(&self) -> Option<BackendError> {
        crate::sync::read(&self.backend_error).clone()
    }

    pub(crate) fn set_backend_error(&self, error: Option<BackendError>) -> Option<BackendError> {
        std::mem::replace(&mut *crate::sync::write(&self.backend_error), error)
    }

    pub(crate) fn candidates(&self) -> Vec<Candidate> {
        self.candidates.borrow().clone()
    }

    /// Publishes the registry as read (sorted by priority, highest first), if it changed.
    pub(crate) fn set_candidates(&self, mut candidates: Vec<Candidate>) {
        candidates.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.node.cmp(&b.node))
        });
        self.candidates.send_if_modified(|c| {
            let changed = *c != candidates;
            *c = candidates;
            changed
        });
    }

    pub(crate) fn set_deadline(&self, at: Timestamp) {
        self.deadline.store(at.as_nanos(), Ordering::Release);
    }

    /// Whether the current term's deadline is still ahead.
    pub(crate) fn within_deadline(&self) -> bool {
        let d = self.deadline.load(Ordering::Acquire);
        d == u64::MAX || (d != 0 && self.clock.now().as_nanos() < d)
    }
}

/// A cheap, cloneable view of one lock's role on this node.
///
/// Get one from [`Elector::handle`](crate::Elector::handle), or make a fixed one with
/// [`RoleHandle::fixed`] for tests. Reads never block and never do I/O.
#[derive(Clone)]
pub struct RoleHandle {
    shared: Arc<Shared>,
    rx: watch::Receiver<RoleState>,
}

impl fmt::Debug for RoleHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoleHandle")
            .field("lock", &self.shared.lock)
            .field("node", &self.shared.node.id)
            .field("role", &self.role())
            .finish()
    }
}

impl RoleHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let rx = shared.state.subscribe();
        RoleHandle { shared, rx }
    }

    /// A handle whose role never changes, for unit tests of handlers and tasks.
    ///
    /// On `Role::Primary` the term never expires; its [`TermContext`] is never cancelled.
    #[must_use]
    pub fn fixed(role: Role) -> Self {
        let node = NodeId::new("fixed");
        let shared = Shared::new(
            "fixed".to_owned(),
            node.clone(),
            Clock::system(),
            role.clone(),
        );
        let (holder, term) = match &role {
            Role::Primary { term, since } => {
                let mut h = Holder::new(&node, *term);
                h.since = *since;
                shared.set_deadline(Timestamp::NEVER);
                (
                    Some(h),
                    Some(TermContext::new(
                        *term,
                        shared.clone(),
                        CancellationToken::new(),
                    )),
                )
            }
            Role::Secondary { holder } => (holder.clone(), None),
            Role::Starting => (None, None),
        };
        shared.state.send_replace(RoleState { role, holder, term });
        RoleHandle::new(shared)
    }

    /// The lock name.
    #[must_use]
    pub fn lock(&self) -> &str {
        &self.shared.lock
    }

    /// This node.
    #[must_use]
    pub fn node(&self) -> &NodeId {
        &self.shared.node
    }

    /// Whether this node is primary now: the elector says so and the term's deadline has not passed.
    #[must_use]
    pub fn is_primary(&self) -> bool {
        self.shared.within_deadline() && self.rx.borrow().role.is_primary()
    }

    /// The current role. A primary whose deadline has passed reads as `Secondary` with an unknown
    /// holder, even before the elector has noticed.
    #[must_use]
    pub fn role(&self) -> Role {
        let state = self.rx.borrow();
        match &state.role {
            Role::Primary { .. } if !self.shared.within_deadline() => {
                Role::Secondary { holder: None }
            }
            role => role.clone(),
        }
    }

    /// The latest known term of the lock: this node's while primary, else the holder's.
    #[must_use]
    pub fn term(&self) -> Option<u64> {
        self.role().term()
    }

    /// The current holder: this node's own record while primary.
    #[must_use]
    pub fn holder(&self) -> Option<Holder> {
        let state = self.rx.borrow();
        if state.role.is_primary() && !self.shared.within_deadline() {
            return None;
        }
        state.holder.clone()
    }

    /// The deadline of the current term on [`clock`](Self::clock): `None` when not primary,
    /// [`Timestamp::NEVER`] on backends without a lease.
    #[must_use]
    pub fn deadline(&self) -> Option<Timestamp> {
        let d = self.shared.deadline.load(Ordering::Acquire);
        (d != 0 && self.rx.borrow().role.is_primary()).then_some(Timestamp::from_nanos(d))
    }

    /// Whether the elector's campaign loop is making progress: what `/health/live` reports (see
    /// [`ElectorBuilder::liveness_bound`](crate::ElectorBuilder::liveness_bound)). A handle
    /// without an elector ([`fixed`](Self::fixed)) is always live. An atomic read and a clock read.
    #[must_use]
    pub fn liveness(&self) -> Liveness {
        self.shared
            .watchdog
            .check(&self.shared.lock, self.shared.clock.now())
    }

    /// The backend misconfiguration that keeps this node secondary, from the campaign's first
    /// failed call with it until the step that failed answers again (a refused acquisition:
    /// until one succeeds, or a retry has waited for the lock 2 s without an error; the holder
    /// watch answering does not end it); `None` when there is none (transient
    /// errors are not reported here). Not a role change: [`changed`](Self::changed) does not wake
    /// for it. A lock read.
    #[must_use]
    pub fn backend_error(&self) -> Option<BackendError> {
        self.shared.backend_error()
    }

    /// This node's entry in the lock's candidate registry: its priority, and whether it is
    /// ready, draining, or has handed the lock away on request. A lock read.
    #[must_use]
    pub fn entry(&self) -> Candidate {
        self.shared.entry.borrow().clone()
    }

    /// The lock's candidate registry as this node last read it (every live node's
    /// [`entry`](Self::entry); with a host group, one entry per group), sorted by priority,
    /// highest first. Empty on a backend without a registry. A lock read, no I/O.
    ///
    /// ```
    /// use tower_primary::{Elector, MemoryBackend};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_primary::Error> {
    /// let elector = Elector::builder("jobs").backend(MemoryBackend::new()).priority(7).spawn()?;
    /// let mut role = elector.handle();
    /// role.wait_primary().await;
    /// let registry = role.wait_candidates(|c| !c.is_empty()).await;
    /// assert_eq!(registry[0].priority, 7);
    /// # elector.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn candidates(&self) -> Vec<Candidate> {
        self.shared.candidates()
    }

    /// Waits until [`candidates`](Self::candidates) satisfies `until` (checked at once, then
    /// at every change), and returns them.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe.
    pub async fn wait_candidates(
        &self,
        mut until: impl FnMut(&[Candidate]) -> bool,
    ) -> Vec<Candidate> {
        let mut rx = self.shared.candidates.subscribe();
        // The sender lives in `Shared`, which this handle keeps alive: it cannot be closed.
        match rx.wait_for(|c| until(c)).await {
            Ok(c) => c.clone(),
            Err(_) => std::future::pending().await,
        }
    }

    /// The clock the deadline is read on.
    #[must_use]
    pub fn clock(&self) -> Clock {
        self.shared.clock
    }

    /// The current term's context, while primary.
    #[must_use]
    pub fn term_context(&self) -> Option<TermContext> {
        let state = self.rx.borrow();
        state.term.clone().filter(TermContext::is_valid)
    }

    /// Waits until the role or the known holder changes, and returns the new role.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: a change that happens while no call is waiting is returned by the next call.
    pub async fn changed(&mut self) -> Role {
        // The sender lives in `Shared`, which this handle keeps alive: it cannot be closed.
        let _ = self.rx.changed().await;
        self.rx.borrow_and_update();
        self.role()
    }

    /// Waits until this node is primary, and returns the term's context.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe.
    pub async fn wait_primary(&mut self) -> TermContext {
        loop {
            if let Some(ctx) = self.term_context() {
                return ctx;
            }
            let _ = self.rx.changed().await;
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// One primary period (term) as seen by the work that runs in it.
///
/// Handed to every [singleton task](crate::Elector::singleton_task), and to handlers as an axum
/// extractor that succeeds only on the primary ([`http::extract`](crate::http::extract)). Carry [`term`](Self::term) into downstream writes so a stale primary's
/// writes can be rejected (`UPDATE … WHERE term <= $term`); check [`is_valid`](Self::is_valid)
/// before a side effect; select on [`cancelled`](Self::cancelled) to stop in time.
#[derive(Clone)]
pub struct TermContext {
    inner: Arc<TermInner>,
    /// Set on a context extracted from a request: the request counts as in flight while this
    /// context (or a clone of it) lives.
    _in_flight: Option<Arc<InFlight>>,
}

struct TermInner {
    term: u64,
    shared: Arc<Shared>,
    token: CancellationToken,
    tracker: TaskTracker,
    /// Fired when the grace after the end of the term ran out: gated requests still in flight
    /// are cut.
    abort: CancellationToken,
}

impl fmt::Debug for TermContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TermContext")
            .field("lock", &self.inner.shared.lock)
            .field("term", &self.inner.term)
            .field("valid", &self.is_valid())
            .finish()
    }
}

impl TermContext {
    pub(crate) fn new(term: u64, shared: Arc<Shared>, token: CancellationToken) -> Self {
        TermContext {
            inner: Arc::new(TermInner {
                term,
                shared,
                token,
                tracker: TaskTracker::new(),
                abort: CancellationToken::new(),
            }),
            _in_flight: None,
        }
    }

    /// This context, counting `in_flight` as long as it or a clone lives (the extractor's).
    #[cfg(feature = "axum")]
    pub(crate) fn holding(mut self, in_flight: InFlight) -> Self {
        self._in_flight = Some(Arc::new(in_flight));
        self
    }

    /// The fencing term.
    #[must_use]
    pub fn term(&self) -> u64 {
        self.inner.term
    }

    /// The lock name.
    #[must_use]
    pub fn lock(&self) -> &str {
        &self.inner.shared.lock
    }

    /// Whether the term still holds: not cancelled, and its deadline (on lease backends) not passed.
    /// An atomic read and a clock read; call it before every side effect.
    #[must_use]
    pub fn is_valid(&self) -> bool {
        !self.inner.token.is_cancelled() && self.inner.shared.within_deadline()
    }

    /// Resolves when the term ends (loss, step-down or shutdown).
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.inner.token.cancelled()
    }

    /// The term's cancellation token, to hand to code that takes one.
    #[must_use]
    pub fn token(&self) -> &CancellationToken {
        &self.inner.token
    }

    /// Counts a piece of work (a request behind the primary-only gate) as in flight: step-down and
    /// shutdown wait for it, up to the grace period, before releasing the lock.
    #[must_use]
    pub fn in_flight(&self) -> InFlight {
        InFlight {
            _token: self.inner.tracker.token(),
        }
    }

    /// Runs `fut` until it completes or the term ends; `None` if the term ended first.
    pub async fn run_until_cancelled<F: Future>(&self, fut: F) -> Option<F::Output> {
        self.inner.token.run_until_cancelled(fut).await
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// Fired once the grace after the term's end has run out: the primary-only gate cuts the
    /// requests of this term that are still in flight.
    pub(crate) fn abort_token(&self) -> &CancellationToken {
        &self.inner.abort
    }
}

/// A guard counting one piece of work as in flight in a term; see [`TermContext::in_flight`].
#[derive(Debug)]
pub struct InFlight {
    _token: TaskTrackerToken,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_primary_has_a_valid_term_context() {
        let h = RoleHandle::fixed(Role::primary(3));
        let ctx = h.term_context().unwrap();
        assert_eq!(ctx.term(), 3);
        assert!(ctx.is_valid());
        assert_eq!(h.holder().unwrap().term, 3);
        assert_eq!(h.role().as_str(), "primary");
    }

    #[test]
    fn primary_past_its_deadline_reads_secondary() {
        let h = RoleHandle::fixed(Role::primary(3));
        h.shared().set_deadline(Timestamp::from_nanos(1));
        assert!(!h.is_primary());
        assert_eq!(h.role(), Role::Secondary { holder: None });
        assert!(h.term_context().is_none());
        assert!(h.holder().is_none());
    }

    #[test]
    fn holder_round_trips_through_json_with_nulls() {
        let h = Holder::new(&NodeId::new("n"), 1);
        let v = serde_json::to_value(&h).unwrap();
        for k in [
            "id", "host", "pid", "worker", "url", "term", "since", "lease_ms",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert!(v["worker"].is_null() && v["url"].is_null() && v["lease_ms"].is_null());
    }
}
