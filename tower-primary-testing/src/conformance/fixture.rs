//! What a backend provides to the suite: fixtures, connections and fault hooks.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tower_primary::Lease;
use tower_primary::backend::Backend;
use tower_primary::backend::memory::MemoryBackend;
use tower_primary::clock::monotonic_nanos;

/// What the suite needs from a backend. See the [module docs](crate::conformance).
pub trait Fixture {
    /// A new, independent connection to the backend: one node. Every connection of a fixture must
    /// reach the same locks (the same server, directory or memory store).
    ///
    /// The crash and pause checks use a connection on a tokio runtime of its own, so a connection
    /// must not be tied to the runtime `connect` was called on: connect lazily (in
    /// [`Lock::acquire`](tower_primary::backend::Lock::acquire) and the other calls), not here.
    fn connect(&self) -> Connection;

    /// The lease electors use, for backends that have one. Default `None`.
    fn lease(&self) -> Option<Lease> {
        None
    }

    /// The lock name for one check: unique per check and per run, so that checks can run in
    /// parallel against one server and leftovers of earlier runs do not matter. Default
    /// [`unique_lock_name`].
    fn lock_name(&self, check: &str) -> String {
        unique_lock_name(check)
    }

    /// How long a check waits for something that must happen. Default: 10 s plus ten leases.
    fn timeout(&self) -> Duration {
        Duration::from_secs(10) + self.lease().map_or(Duration::ZERO, |l| l.ttl() * 10)
    }
}

/// A lock name for `check`, unique in this run: `check-<pid>-<n>` with a per-process counter
/// and the start time, at most 128 characters of `[A-Za-z0-9._-]`.
///
/// ```
/// let a = tower_primary_testing::conformance::unique_lock_name("x");
/// let b = tower_primary_testing::conformance::unique_lock_name("x");
/// assert_ne!(a, b);
/// assert!(a.starts_with("x-"));
/// ```
#[must_use]
pub fn unique_lock_name(check: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let clean: String = check
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(80)
        .collect();
    format!(
        "{clean}-{}-{:x}-{}",
        std::process::id(),
        monotonic_nanos(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One node's connection to the backend, with its fault hooks if the backend has any.
#[derive(Clone)]
pub struct Connection {
    backend: Arc<dyn Backend>,
    faults: Option<Arc<dyn FaultHooks>>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("backend", &self.backend)
            .field("faults", &self.faults)
            .finish()
    }
}

impl Connection {
    /// A connection without fault hooks.
    pub fn new(backend: impl Backend) -> Self {
        Connection {
            backend: Arc::new(backend),
            faults: None,
        }
    }

    /// Adds the fault hooks of this connection.
    #[must_use]
    pub fn with_faults(mut self, faults: impl FaultHooks) -> Self {
        self.faults = Some(Arc::new(faults));
        self
    }

    /// The backend.
    #[must_use]
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The fault hooks, if any.
    #[must_use]
    pub fn faults(&self) -> Option<&dyn FaultHooks> {
        self.faults.as_deref()
    }

    /// The fault hooks if they support `fault`.
    pub(super) fn hook(&self, fault: Fault) -> Option<&dyn FaultHooks> {
        self.faults().filter(|f| f.supports(fault))
    }
}

/// A fault the suite can inject into one connection through its [`FaultHooks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fault {
    /// Every call of the connection fails with a backend error (an unreachable server),
    /// including lease renewals and releases.
    Fail,
    /// The connection stops renewing its leases, without releasing them (a stalled renewal
    /// path). Only meaningful on lease backends.
    StopRenewals,
    /// The backend takes away every lock the connection holds, as a server that expired or
    /// deleted them: the holder's [`Leadership::lost`](tower_primary::backend::Leadership::lost) fires.
    /// One-shot: healing it does nothing.
    LoseLocks,
}

/// Fault injection into one connection, for the checks that need it. Backends without hooks
/// skip those checks.
pub trait FaultHooks: fmt::Debug + Send + Sync + 'static {
    /// Whether `fault` can be injected.
    fn supports(&self, fault: Fault) -> bool;

    /// Starts `fault` (only called when [`supports`](Self::supports) says so).
    fn inject(&self, fault: Fault);

    /// Ends `fault`.
    fn heal(&self, fault: Fault);
}

/// The memory backend's hooks, through its [`Faults`](tower_primary::backend::memory::Faults).
impl FaultHooks for MemoryBackend {
    fn supports(&self, fault: Fault) -> bool {
        match fault {
            Fault::Fail | Fault::LoseLocks => true,
            Fault::StopRenewals => self.min_lease().is_some(),
        }
    }

    fn inject(&self, fault: Fault) {
        match fault {
            Fault::Fail => self.faults().set_failing(true),
            Fault::StopRenewals => self.faults().stop_renewals(true),
            Fault::LoseLocks => self.faults().lose_locks(self),
        }
    }

    fn heal(&self, fault: Fault) {
        match fault {
            Fault::Fail => self.faults().set_failing(false),
            Fault::StopRenewals => self.faults().stop_renewals(false),
            Fault::LoseLocks => {}
        }
    }
}

/// The [`MemoryBackend`]'s fixture: one store, a [`MemoryBackend::connection`] per node, with
/// fault hooks.
///
/// ```
/// use std::time::Duration;
/// use tower_primary::Lease;
/// use tower_primary_testing::conformance::{self, MemoryFixture};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let fixture = MemoryFixture::with_lease(Lease::new(Duration::from_millis(500)));
/// conformance::handover_on_shutdown(&fixture).await;
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryFixture {
    backend: MemoryBackend,
    lease: Option<Lease>,
}

impl Default for MemoryFixture {
    fn default() -> Self {
        MemoryFixture::new()
    }
}

impl MemoryFixture {
    /// A fresh store without leases: a lock is held until released or dropped.
    #[must_use]
    pub fn new() -> Self {
        MemoryFixture {
            backend: MemoryBackend::new(),
            lease: None,
        }
    }

    /// A fresh store with leases ([`MemoryBackend::with_lease`]), electors using `lease`.
    #[must_use]
    pub fn with_lease(lease: Lease) -> Self {
        MemoryFixture {
            backend: MemoryBackend::new().with_lease(),
            lease: Some(lease),
        }
    }
}

impl Fixture for MemoryFixture {
    fn connect(&self) -> Connection {
        let conn = self.backend.connection();
        Connection::new(conn.clone()).with_faults(conn)
    }

    fn lease(&self) -> Option<Lease> {
        self.lease
    }
}

/// A [`Fixture`] made from a closure; see [`from_fn`].
pub struct FnFixture<F> {
    connect: F,
    lease: Option<Lease>,
    timeout: Option<Duration>,
}

impl<F> fmt::Debug for FnFixture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnFixture")
            .field("lease", &self.lease)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A fixture whose [`connect`](Fixture::connect) calls `connect`.
///
/// ```
/// use tower_primary_testing::conformance::{self, Connection};
/// use tower_primary::MemoryBackend;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MemoryBackend::new();
/// let fixture = conformance::from_fn(move || Connection::new(store.connection()));
/// conformance::handover_on_step_down(&fixture).await;
/// # }
/// ```
pub fn from_fn<F: Fn() -> Connection>(connect: F) -> FnFixture<F> {
    FnFixture {
        connect,
        lease: None,
        timeout: None,
    }
}

impl<F> FnFixture<F> {
    /// Sets the lease electors use.
    #[must_use]
    pub fn with_lease(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Sets how long a check waits for something that must happen (see [`Fixture::timeout`]).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

impl<F: Fn() -> Connection> Fixture for FnFixture<F> {
    fn connect(&self) -> Connection {
        (self.connect)()
    }

    fn lease(&self) -> Option<Lease> {
        self.lease
    }

    fn timeout(&self) -> Duration {
        match self.timeout {
            Some(t) => t,
            None => Duration::from_secs(10) + self.lease.map_or(Duration::ZERO, |l| l.ttl() * 10),
        }
    }
}
