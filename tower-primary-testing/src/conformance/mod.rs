//! The backend conformance suite: one set of checks every backend must pass.
//!
//! A backend author implements [`Fixture`] — how to open a new, independent [`Connection`] (one
//! node), the lease to use, and optionally [fault hooks](FaultHooks) — and runs every check
//! with one macro line:
//!
//! ```
//! use tower_primary_testing::conformance::{Connection, Fixture};
//! use tower_primary::MemoryBackend;
//!
//! struct Memory(MemoryBackend);
//!
//! impl Fixture for Memory {
//!     fn connect(&self) -> Connection {
//!         Connection::new(self.0.connection())
//!     }
//! }
//!
//! // One #[tokio::test] per check (needs tokio's `macros` and `rt-multi-thread` features).
//! tower_primary_testing::conformance_tests!(Memory(MemoryBackend::new()));
//! # fn main() {}
//! ```
//!
//! [`from_fn`] does the same from a closure, and [`MemoryFixture`] is the memory backend's own
//! fixture, fault hooks included. Each check is also a plain `async fn` taking the fixture, so
//! it can be run alone:
//!
//! ```
//! use tower_primary_testing::conformance::{self, MemoryFixture};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! conformance::handover_on_step_down(&MemoryFixture::new()).await;
//! # }
//! ```
//!
//! # The checks
//!
//! Every check uses its own lock name, runs real electors on the [system clock](Clock::system)
//! and records every primary period in a [`History`] that
//! must show no overlap and rising terms. Waits are bounded by [`Fixture::timeout`] (seconds);
//! the checks assert order and the absence of overlap, never tight times. A check panics, with
//! the backend, the lock name and the recorded periods, when the backend breaks the contract.
//!
//! | check | what it asserts |
//! |---|---|
//! | [`single_primary_among_candidates`] | five electors: exactly one primary at each handover, no overlap, rising terms |
//! | [`secondaries_see_the_holder`] | secondaries and [`Lock::holder`] name the primary; [`Lock::watch_holder`] wakes on a change |
//! | [`handover_on_step_down`] | `step_down()` hands over at once (without waiting for a lease) to a higher term |
//! | [`handover_on_shutdown`] | the same for `shutdown()` |
//! | [`terms_rise_over_handovers`] | terms rise over handovers, new nodes and an idle lock |
//! | [`failover_when_the_primary_crashes`] | a holder whose runtime dies is succeeded, with a higher term, not before its deadline |
//! | [`paused_primary_fences_itself`] | lease backends: a frozen holder reads "not primary" past its deadline, and does not disturb its successor when it resumes |
//! | [`paused_primary_keeps_a_lock_without_lease`] | backends without lease: a frozen holder keeps its lock and is still primary when it resumes |
//! | [`self_fencing_when_renewals_stop`] | lease backends: a holder whose renewals stop fences itself by its deadline and cancels its tasks; nobody takes over earlier |
//! | [`self_fencing_when_the_backend_fails`] | the same when every call of the holder's connection fails |
//! | [`fail_closed_on_backend_errors`] | a node whose backend fails never becomes primary, even on a free lock; it does once the backend works |
//! | [`task_cancelled_when_the_term_ends`] | singleton tasks see `cancelled()` on step-down and on a loss, and start afresh in the next term |
//! | [`shutdown_cancels_tasks_before_release`] | Tasks see cancellation (with `is_primary()` false) and finish before the lock is released |
//! | [`shutdown_aborts_tasks_after_the_grace`] | a task that ignores cancellation is aborted after the grace, before the release |
//! | [`state_api_guards_terms`] | `store`/`load`/`watch_key`: the holder's term writes, older terms get `StaleTerm`, a newer value is never overwritten |
//! | [`dropped_acquire_does_not_leak_the_lock`] | an `acquire` dropped around a release never keeps the lock |
//!
//! Checks that need a fault hook or a lease the backend does not have print
//! `skipped: <why>` and return.
//!
//! # Crashes and pauses
//!
//! [`failover_when_the_primary_crashes`] and [`paused_primary_fences_itself`] run the holder's
//! elector on its own current-thread tokio runtime in its own thread. Pausing stops polling that
//! runtime (like `SIGSTOP` for the async side); a crash then shuts it down with
//! [`Runtime::shutdown_background`](tokio::runtime::Runtime::shutdown_background), which drops
//! the [`Leadership`](tower_primary::backend::Leadership) without releasing it: a file lock's
//! descriptor closes, a memory lock without lease is dropped, a lease is no longer renewed and
//! expires.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::history::{History, Period, Recorder};
use tower_primary::backend::memory::MemoryBackend;
use tower_primary::backend::{AcquireRequest, Backend, Lock};
use tower_primary::clock::{Clock, Timestamp, monotonic_nanos};
use tower_primary::error::Error;
use tower_primary::role::{NodeId, RoleHandle, TermContext};
use tower_primary::{Elector, ElectorBuilder, Lease};

/// What the suite needs from a backend. See the [module docs](self).
pub trait Fixture {
    /// A new, independent connection to the backend: one node. Every connection of a fixture must
    /// reach the same locks (the same server, directory or memory store).
    ///
    /// The crash and pause checks use a connection on a tokio runtime of its own, so a connection
    /// must not be tied to the runtime `connect` was called on: connect lazily (in
    /// [`Lock::acquire`] and the other calls), not here.
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
    fn hook(&self, fault: Fault) -> Option<&dyn FaultHooks> {
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

/// The names of the checks, in the order [`run_all`] runs them.
pub const CHECKS: &[&str] = &[
    "single_primary_among_candidates",
    "secondaries_see_the_holder",
    "handover_on_step_down",
    "handover_on_shutdown",
    "terms_rise_over_handovers",
    "failover_when_the_primary_crashes",
    "paused_primary_fences_itself",
    "paused_primary_keeps_a_lock_without_lease",
    "self_fencing_when_renewals_stop",
    "self_fencing_when_the_backend_fails",
    "fail_closed_on_backend_errors",
    "task_cancelled_when_the_term_ends",
    "shutdown_cancels_tasks_before_release",
    "shutdown_aborts_tasks_after_the_grace",
    "state_api_guards_terms",
    "dropped_acquire_does_not_leak_the_lock",
];

/// Runs every check, one after the other. [`conformance_tests!`](crate::conformance_tests)
/// gives one test per check instead, which runs them in parallel and names the one that fails.
///
/// # Panics
///
/// When a check fails.
pub async fn run_all<F: Fixture + ?Sized>(fixture: &F) {
    single_primary_among_candidates(fixture).await;
    secondaries_see_the_holder(fixture).await;
    handover_on_step_down(fixture).await;
    handover_on_shutdown(fixture).await;
    terms_rise_over_handovers(fixture).await;
    failover_when_the_primary_crashes(fixture).await;
    paused_primary_fences_itself(fixture).await;
    paused_primary_keeps_a_lock_without_lease(fixture).await;
    self_fencing_when_renewals_stop(fixture).await;
    self_fencing_when_the_backend_fails(fixture).await;
    fail_closed_on_backend_errors(fixture).await;
    task_cancelled_when_the_term_ends(fixture).await;
    shutdown_cancels_tasks_before_release(fixture).await;
    shutdown_aborts_tasks_after_the_grace(fixture).await;
    state_api_guards_terms(fixture).await;
    dropped_acquire_does_not_leak_the_lock(fixture).await;
}

/// Expands to one `#[tokio::test]` (multi-thread runtime) per conformance check, each running
/// the check against a fresh `$fixture` (the expression is evaluated once per test).
///
/// Put each backend's tests in a module of their own; the test crate needs `tokio` with the
/// `macros` and `rt-multi-thread` features.
///
/// ```
/// mod memory {
///     use tower_primary_testing::conformance::MemoryFixture;
///     tower_primary_testing::conformance_tests!(MemoryFixture::new());
/// }
///
/// mod memory_with_lease {
///     use std::time::Duration;
///     use tower_primary::Lease;
///     use tower_primary_testing::conformance::MemoryFixture;
///     tower_primary_testing::conformance_tests!(MemoryFixture::with_lease(Lease::new(
///         Duration::from_secs(1)
///     )));
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($fixture:expr $(,)?) => {
        $crate::conformance_tests!(@tests ($fixture)
            single_primary_among_candidates
            secondaries_see_the_holder
            handover_on_step_down
            handover_on_shutdown
            terms_rise_over_handovers
            failover_when_the_primary_crashes
            paused_primary_fences_itself
            paused_primary_keeps_a_lock_without_lease
            self_fencing_when_renewals_stop
            self_fencing_when_the_backend_fails
            fail_closed_on_backend_errors
            task_cancelled_when_the_term_ends
            shutdown_cancels_tasks_before_release
            shutdown_aborts_tasks_after_the_grace
            state_api_guards_terms
            dropped_acquire_does_not_leak_the_lock
        );
    };
    (@tests ($fixture:expr) $($check:ident)*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                $crate::conformance::$check(&$fixture).await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// Five electors compete for one lock; five times, the primary steps down. At every handover
/// exactly one node is primary, its term is higher than the last, and the recorded history has
/// no overlapping periods.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn single_primary_among_candidates<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "single_primary_among_candidates");
    let nodes: Vec<Node> = (1..=5).map(|i| h.spawn(&format!("n{i}"))).collect();
    let mut last = 0;
    for round in 1..=5 {
        let (i, ctx) = h
            .within(
                &format!("a primary among the 5 candidates (round {round})"),
                any_primary(&nodes),
            )
            .await;
        let primaries: Vec<&str> = nodes
            .iter()
            .filter(|n| n.handle.is_primary())
            .map(|n| n.id.as_str())
            .collect();
        h.ensure(primaries.len() == 1, || {
            format!("round {round}: expected exactly one primary, found {primaries:?}")
        });
        h.ensure(ctx.term() > last, || {
            format!(
                "round {round}: term {} of {} is not above the previous term {last}",
                ctx.term(),
                nodes[i].id
            )
        });
        last = ctx.term();
        h.ok("step_down", nodes[i].elector.step_down().await);
        h.ensure(!nodes[i].handle.is_primary() && !ctx.is_valid(), || {
            format!(
                "{} still reads as primary after step_down() returned",
                nodes[i].id
            )
        });
    }
    shutdown_all(&nodes).await;
    let history = h.recorder.history();
    h.ensure(history.periods().len() >= 5, || {
        format!(
            "expected at least 5 recorded periods, got {}",
            history.periods().len()
        )
    });
    h.finish();
}

/// A secondary's [`RoleHandle::holder`] and [`Lock::holder`] on another connection name the
/// primary and its term; [`Lock::watch_holder`] wakes when it changes; after a handover they
/// name the new primary.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn secondaries_see_the_holder<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "secondaries_see_the_holder");
    let a = h.spawn("a");
    let ta = h.within("a to become primary", a.primary()).await.term();
    let b = h.follower("b", "a", ta).await;

    let conn = h.connect();
    let lock = h.lock(&conn);
    let holder = h.ok("holder()", lock.holder().await);
    h.ensure(
        holder.as_ref().is_some_and(|x| x.id == "a" && x.term == ta),
        || {
            format!(
                "Lock::holder() on another connection gave {holder:?}, expected a with term {ta}"
            )
        },
    );
    let mut changes = h.ok("watch_holder()", lock.watch_holder().await);

    h.ok("step_down", a.elector.step_down().await);
    let woke = h
        .within(
            "watch_holder() to wake after the holder stepped down",
            changes.changed(),
        )
        .await;
    h.ok("Changes::changed()", woke);
    let tb = h.within("b to become primary", b.primary()).await.term();
    h.ensure(tb > ta, || format!("b's term {tb} is not above a's {ta}"));
    h.within(
        "a to see b as the holder",
        holder_is(&a.handle, "b", Some(tb)),
    )
    .await;
    h.within("Lock::holder() to name b", async {
        loop {
            let holder = h.ok("holder()", lock.holder().await);
            if holder.is_some_and(|x| x.id == "b" && x.term == tb) {
                return;
            }
            h.ok("Changes::changed()", changes.changed().await);
        }
    })
    .await;
    shutdown_all(&[a, b]).await;
    h.finish();
}

/// The primary steps down while another node waits: the waiting node becomes primary with a
/// higher term, at once (on lease backends well before the lease could have expired).
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn handover_on_step_down<F: Fixture + ?Sized>(fixture: &F) {
    handover(fixture, "handover_on_step_down", true).await;
}

/// The primary shuts down while another node waits: the waiting node becomes primary with a
/// higher term, at once (on lease backends well before the lease could have expired).
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn handover_on_shutdown<F: Fixture + ?Sized>(fixture: &F) {
    handover(fixture, "handover_on_shutdown", false).await;
}

async fn handover<F: Fixture + ?Sized>(fixture: &F, check: &'static str, step_down: bool) {
    let h = Harness::new(fixture, check);
    let a = h.spawn("a");
    let ctx_a = h.within("a to become primary", a.primary()).await;
    let b = h.follower("b", "a", ctx_a.term()).await;

    let started = Instant::now();
    let how = if step_down {
        h.ok("step_down", a.elector.step_down().await);
        "step_down()"
    } else {
        a.elector.shutdown().await;
        "shutdown()"
    };
    h.ensure(!a.handle.is_primary() && !ctx_a.is_valid(), || {
        format!("a still reads as primary after {how} returned")
    });
    let ctx_b = h.within("b to become primary", b.primary()).await;
    let took = started.elapsed();
    h.ensure(ctx_b.term() > ctx_a.term(), || {
        format!(
            "b's term {} is not above a's {}",
            ctx_b.term(),
            ctx_a.term()
        )
    });
    h.fast_handover(took, how);
    if step_down {
        h.within(
            "a to see b as the holder after stepping down",
            holder_is(&a.handle, "b", Some(ctx_b.term())),
        )
        .await;
    }
    shutdown_all(&[a, b]).await;
    h.finish();
}

/// Six handovers between nodes that step down, shut down and are replaced by new nodes on new
/// connections, then a new node on an idle lock: every term is higher than all before it.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn terms_rise_over_handovers<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "terms_rise_over_handovers");
    let mut nodes = vec![h.spawn("r0"), h.spawn("r1")];
    let mut next = 2;
    let mut terms: Vec<u64> = Vec::new();
    for round in 1..=6 {
        let (i, ctx) = h
            .within(&format!("a primary (round {round})"), any_primary(&nodes))
            .await;
        h.ensure(terms.last().is_none_or(|t| ctx.term() > *t), || {
            format!(
                "round {round}: term {} of {} is not above the terms before it {terms:?}",
                ctx.term(),
                nodes[i].id
            )
        });
        terms.push(ctx.term());
        if round % 2 == 1 {
            h.ok("step_down", nodes[i].elector.step_down().await);
        } else {
            let gone = nodes.remove(i);
            gone.elector.shutdown().await;
            nodes.push(h.spawn(&format!("r{next}")));
            next += 1;
        }
    }
    shutdown_all(&nodes).await;

    let late = h.spawn("late");
    let term = h
        .within(
            "a new node to become primary on the idle lock",
            late.primary(),
        )
        .await
        .term();
    h.ensure(terms.iter().all(|t| term > *t), || {
        format!("the term {term} after the lock was idle is not above the earlier terms {terms:?}")
    });
    late.elector.shutdown().await;
    h.finish();
}

/// The primary's runtime dies without releasing (its
/// [`Leadership`](tower_primary::backend::Leadership) is dropped): a waiting node becomes primary with a
/// higher term — on lease backends only after the dead holder's deadline.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn failover_when_the_primary_crashes<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "failover_when_the_primary_crashes");
    let a = h.thread_node("a", |_| {}).await;
    let ta = h.within("a to become primary", a.primary()).await.term();
    let b = h.follower("b", "a", ta).await;

    let killed = a.command(&h, NodeCommand::Kill).await;
    // A crashed node acts no more: its period ends at the crash.
    h.recorder.end("a", ta, killed.at.as_nanos());
    let tb = h
        .within("b to become primary after a crashed", b.primary())
        .await
        .term();
    h.ensure(tb > ta, || {
        format!("b's term {tb} is not above the crashed a's {ta}")
    });
    // On a lease backend only expiry frees a crashed holder's lock. (A session lock is freed
    // when the session dies, even where the backend implies a lease for self-fencing.)
    if let Some(deadline) = killed
        .deadline
        .filter(|d| fixture.lease().is_some() && *d != Timestamp::NEVER)
    {
        h.started_after("b", tb, "a's deadline", deadline.as_nanos());
    }
    b.elector.shutdown().await;
    h.finish();
}

/// Lease backends: the primary's runtime is frozen (not polled, as under `SIGSTOP`) past its
/// lease. Another node takes over only after the frozen node's deadline; meanwhile the frozen
/// node's `is_primary()` and `TermContext::is_valid()` read false without its elector running.
/// When it resumes, its task sees the term cancelled and the new primary keeps its lock.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn paused_primary_fences_itself<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "paused_primary_fences_itself");
    if fixture.lease().is_none() {
        return h.skip("the backend has no lease (see paused_primary_keeps_a_lock_without_lease)");
    }
    let (a, ctx_a, mut events, b) = h.pausable_primary_and_follower().await;
    let ta = ctx_a.term();

    let paused = a.command(&h, NodeCommand::Pause).await;
    let deadline = paused.deadline.filter(|d| *d != Timestamp::NEVER);
    let Some(deadline) = deadline else {
        h.fail(format!(
            "the paused primary has no lease deadline ({:?}) although the fixture has a lease",
            paused.deadline
        ));
    };
    h.recorder.extend_deadline("a", ta, deadline.as_nanos());

    let ctx_b = h
        .within("b to become primary while a is paused", b.primary())
        .await;
    let tb = ctx_b.term();
    h.ensure(!a.handle.is_primary() && !ctx_a.is_valid(), || {
        "the paused a still reads as primary after b took over".to_owned()
    });
    h.ensure(tb > ta, || format!("b's term {tb} is not above a's {ta}"));
    h.started_after("b", tb, "the paused a's deadline", deadline.as_nanos());

    a.command(&h, NodeCommand::Resume).await;
    let event = h
        .within("a's task to see its term end", events.recv())
        .await;
    h.ensure(
        event
            == Some(TaskEvent::Cancelled {
                term: ta,
                primary: false,
                valid: false,
            }),
        || format!("a's task saw {event:?} after resuming"),
    );
    h.within(
        "a to see b as the holder after resuming",
        holder_is(&a.handle, "b", Some(tb)),
    )
    .await;
    h.ensure(b.handle.is_primary() && ctx_b.is_valid(), || {
        "b lost the lock when the paused a resumed".to_owned()
    });
    a.command(&h, NodeCommand::Shutdown).await;
    b.elector.shutdown().await;
    h.finish();
}

/// Backends without a lease (a lock lives as long as the holder's process or session): a
/// primary whose runtime is frozen keeps its lock — nobody takes over in the meantime — and
/// when it resumes it is still primary with the same term.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn paused_primary_keeps_a_lock_without_lease<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "paused_primary_keeps_a_lock_without_lease");
    if fixture.lease().is_some() {
        return h.skip("the backend has a lease (see paused_primary_fences_itself)");
    }
    let (a, ctx_a, mut events, b) = h.pausable_primary_and_follower().await;
    let ta = ctx_a.term();

    a.command(&h, NodeCommand::Pause).await;
    let window = Duration::from_secs(1);
    if let Ok(ctx) = tokio::time::timeout(window, b.primary()).await {
        h.fail(format!(
            "b became primary with term {} while the holder a was only paused",
            ctx.term()
        ));
    }
    a.command(&h, NodeCommand::Resume).await;
    if let Ok(event) = tokio::time::timeout(window / 2, events.recv()).await {
        h.fail(format!(
            "after resuming, a's task saw {event:?}: the lock was taken from a paused holder"
        ));
    }
    h.ensure(a.handle.is_primary() && ctx_a.is_valid(), || {
        "a lost its primary role while it was paused".to_owned()
    });
    h.ensure(!b.handle.is_primary(), || {
        "b is primary although a still holds the lock".to_owned()
    });
    a.command(&h, NodeCommand::Shutdown).await;
    let tb = h
        .within("b to become primary after a shut down", b.primary())
        .await
        .term();
    h.ensure(tb > ta, || format!("b's term {tb} is not above a's {ta}"));
    b.elector.shutdown().await;
    h.finish();
}

/// Lease backends with [`Fault::StopRenewals`]: the primary's renewals stop. By its deadline
/// (at most a lease after the stop) it reads as not primary and its task is cancelled; the
/// waiting node becomes primary only after that deadline, with a higher term.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn self_fencing_when_renewals_stop<F: Fixture + ?Sized>(fixture: &F) {
    self_fencing(
        fixture,
        "self_fencing_when_renewals_stop",
        Fault::StopRenewals,
    )
    .await;
}

/// Lease backends with [`Fault::Fail`]: every call of the primary's connection fails (renewals,
/// release). It fences itself by its deadline and cancels its task; the waiting node becomes
/// primary only after that deadline, with a higher term.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn self_fencing_when_the_backend_fails<F: Fixture + ?Sized>(fixture: &F) {
    self_fencing(fixture, "self_fencing_when_the_backend_fails", Fault::Fail).await;
}

async fn self_fencing<F: Fixture + ?Sized>(fixture: &F, check: &'static str, fault: Fault) {
    let h = Harness::new(fixture, check);
    let Some(lease) = fixture.lease() else {
        return h.skip("the backend has no lease");
    };
    let conn = h.connect();
    let Some(hooks) = conn.hook(fault) else {
        return h.skip(&format!("the fixture has no {fault:?} fault hook"));
    };
    let (tx, mut events) = mpsc::unbounded_channel();
    // Without exit_on_loss a node that can still acquire could win its lock back at once.
    let a = h.spawn_on("a", conn.clone(), |b| b.exit_on_loss(true));
    watch_task(&a.elector, tx);
    let ctx_a = h.within("a to become primary", a.primary()).await;
    let ta = ctx_a.term();
    h.expect_event("a's task to start", &mut events, TaskEvent::Started(ta))
        .await;
    let b = h.follower("b", "a", ta).await;

    let stopped_at = h.clock.now();
    hooks.inject(fault);
    let event = h
        .within(
            "a's task to be cancelled after its lease ran out",
            events.recv(),
        )
        .await;
    h.ensure(
        event
            == Some(TaskEvent::Cancelled {
                term: ta,
                primary: false,
                valid: false,
            }),
        || format!("a's task saw {event:?}, expected the end of term {ta} with is_primary() false"),
    );
    h.ensure(!a.handle.is_primary() && !ctx_a.is_valid(), || {
        "a reads as primary after its term was cancelled".to_owned()
    });
    let history = h.recorder.history();
    let deadline = period(&history, "a", ta).and_then(|p| p.deadline);
    let Some(deadline) = deadline else {
        h.fail("no deadline was recorded for a's lease term".to_owned());
    };
    let latest = stopped_at.saturating_add(lease.ttl()).as_nanos();
    h.ensure(deadline <= latest, || {
        format!(
            "a's deadline is {:?} after the fault, more than the lease {:?}",
            Duration::from_nanos(deadline.saturating_sub(stopped_at.as_nanos())),
            lease.ttl()
        )
    });

    let tb = h
        .within("b to become primary after a fenced itself", b.primary())
        .await
        .term();
    h.ensure(tb > ta, || format!("b's term {tb} is not above a's {ta}"));
    h.started_after("b", tb, "a's deadline", deadline);
    h.ensure(!a.handle.is_primary(), || {
        "a reads as primary again while its fault lasts".to_owned()
    });
    h.within("a to stop (exit_on_loss)", a.elector.stopped())
        .await;
    hooks.heal(fault);
    shutdown_all(&[a, b]).await;
    h.finish();
}

/// With [`Fault::Fail`]: a node whose every backend call fails does not become primary, neither
/// while another node holds the lock nor once the lock is free; when its backend works again it
/// becomes primary with a higher term. Nothing but a successful acquisition makes a node
/// primary.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn fail_closed_on_backend_errors<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "fail_closed_on_backend_errors");
    let conn = h.connect();
    let Some(hooks) = conn.hook(Fault::Fail) else {
        return h.skip("the fixture has no Fail fault hook");
    };
    let a = h.spawn("a");
    let ta = h.within("a to become primary", a.primary()).await.term();
    hooks.inject(Fault::Fail);
    let c = h.spawn_on("c", conn.clone(), |b| b);
    a.elector.shutdown().await;

    // The lock is free now; c retries every 20-200 ms and must fail every time.
    let window = Duration::from_secs(1);
    let mut handle = c.handle.clone();
    if let Ok(ctx) = tokio::time::timeout(window, handle.wait_primary()).await {
        h.fail(format!(
            "c became primary with term {} while every call of its backend failed",
            ctx.term()
        ));
    }
    h.ensure(!c.handle.is_primary(), || {
        "c reads as primary while its backend fails".to_owned()
    });

    hooks.heal(Fault::Fail);
    let tc = h
        .within(
            "c to become primary once its backend works again",
            c.primary(),
        )
        .await
        .term();
    h.ensure(tc > ta, || format!("c's term {tc} is not above a's {ta}"));
    c.elector.shutdown().await;
    h.finish();
}

/// A singleton task's `ctx.cancelled()` fires when its term ends: on step-down (before
/// `step_down()` returns, with `is_primary()` already false) and, with [`Fault::LoseLocks`],
/// when the backend takes the lock away. In the next term the task starts again with a fresh,
/// valid context.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn task_cancelled_when_the_term_ends<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "task_cancelled_when_the_term_ends");
    let conn = h.connect();
    let (tx, mut events) = mpsc::unbounded_channel();
    let a = h.spawn_on("a", conn.clone(), |b| {
        b.rejoin_delay(Duration::from_millis(300))
    });
    watch_task(&a.elector, tx);
    let ctx_a = h.within("a to become primary", a.primary()).await;
    let ta = ctx_a.term();
    h.expect_event("a's task to start", &mut events, TaskEvent::Started(ta))
        .await;

    h.ok("step_down", a.elector.step_down().await);
    let event = events.try_recv().ok();
    h.ensure(
        event
            == Some(TaskEvent::Cancelled {
                term: ta,
                primary: false,
                valid: false,
            }),
        || {
            format!(
                "when step_down() returned, a's task had seen {event:?}, expected the end of \
                 term {ta} with is_primary() false"
            )
        },
    );

    // Nobody else campaigns: a rejoins after its rejoin delay, with a new term and a new task.
    let ctx = h.within("a to become primary again", a.primary()).await;
    let tb = ctx.term();
    h.ensure(tb > ta, || format!("a's new term {tb} is not above {ta}"));
    h.ensure(!ctx_a.is_valid(), || {
        "the old term's context is valid again".to_owned()
    });
    h.expect_event(
        "a's task to start in the new term",
        &mut events,
        TaskEvent::Started(tb),
    )
    .await;

    match conn.hook(Fault::LoseLocks) {
        None => h.skip("part 2 (loss of the lock): the fixture has no LoseLocks fault hook"),
        Some(hooks) => {
            hooks.inject(Fault::LoseLocks);
            let event = h
                .within(
                    "a's task to be cancelled after the lock was lost",
                    events.recv(),
                )
                .await;
            h.ensure(
                event
                    == Some(TaskEvent::Cancelled {
                        term: tb,
                        primary: false,
                        valid: false,
                    }),
                || format!("after the loss a's task saw {event:?}, expected the end of term {tb}"),
            );
            h.ensure(!ctx.is_valid(), || {
                "the lost term's context is still valid".to_owned()
            });
            let tc = h
                .within("a to become primary again after the loss", a.primary())
                .await
                .term();
            h.ensure(tc > tb, || {
                format!("a's term {tc} after the loss is not above {tb}")
            });
            h.expect_event(
                "a's task to start after the loss",
                &mut events,
                TaskEvent::Started(tc),
            )
            .await;
        }
    }
    a.elector.shutdown().await;
    h.finish();
}

/// When `shutdown()` returns, the primary's task has seen its term cancelled, with
/// `is_primary()` already false, and has finished its clean-up; the successor's task starts only
/// after that (the lock was released last).
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn shutdown_cancels_tasks_before_release<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "shutdown_cancels_tasks_before_release");
    let log = Log::default();
    let a = h.spawn("a");
    {
        let log = log.clone();
        let handle = a.handle.clone();
        a.elector.singleton_task("conformance-cleanup", move |ctx| {
            let log = log.clone();
            let handle = handle.clone();
            async move {
                log.push("a started");
                ctx.cancelled().await;
                log.push(if handle.is_primary() {
                    "a cancelled while primary"
                } else {
                    "a cancelled"
                });
                // Clean-up work that takes a while.
                tokio::time::sleep(Duration::from_millis(200)).await;
                log.push("a finished");
                Ok::<(), Infallible>(())
            }
        });
    }
    h.within("a to become primary", a.primary()).await;
    h.within("a's task to start", log.wait_for("a started"))
        .await;
    let (b, mut b_started) = h.logging_successor(&log).await;

    h.within("a's shutdown", a.elector.shutdown()).await;
    let at_return = log.entries();
    h.ensure(
        at_return.iter().any(|e| e == "a cancelled") && at_return.iter().any(|e| e == "a finished"),
        || {
            format!(
                "when shutdown() returned, a's task had logged {at_return:?}; expected it \
                 cancelled (not primary) and finished"
            )
        },
    );
    h.within("b's task to start", b_started.recv()).await;
    let entries = log.entries();
    let position = |what: &str| entries.iter().position(|e| e == what);
    h.ensure(
        position("a cancelled") < position("a finished")
            && position("a finished") < position("b started"),
        || format!("expected a cancelled, a finished, then b started; got {entries:?}"),
    );
    b.elector.shutdown().await;
    h.finish();
}

/// A task that ignores cancellation is aborted when the grace is over, and only
/// then is the lock released: `shutdown()` takes at least the grace, and the successor's task
/// starts after the stuck task was dropped.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn shutdown_aborts_tasks_after_the_grace<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "shutdown_aborts_tasks_after_the_grace");
    let grace = Duration::from_millis(300);
    let log = Log::default();
    let a = h.spawn_on("a", h.connect(), |b| b.grace(grace));
    {
        let log = log.clone();
        a.elector.singleton_task("conformance-stuck", move |_ctx| {
            let log = log.clone();
            async move {
                let _dropped = LogOnDrop(log.clone(), "a dropped");
                log.push("a started");
                std::future::pending::<()>().await;
                Ok::<(), Infallible>(())
            }
        });
    }
    h.within("a to become primary", a.primary()).await;
    h.within("a's task to start", log.wait_for("a started"))
        .await;
    let (b, mut b_started) = h.logging_successor(&log).await;

    let started = Instant::now();
    h.within("a's shutdown", a.elector.shutdown()).await;
    let took = started.elapsed();
    h.ensure(took >= grace, || {
        format!(
            "shutdown() returned after {took:?}, before the grace {grace:?}, although a task \
             never finished"
        )
    });
    h.ensure(log.entries().iter().any(|e| e == "a dropped"), || {
        "when shutdown() returned, the stuck task had not been aborted".to_owned()
    });
    h.within("b's task to start", b_started.recv()).await;
    let entries = log.entries();
    let position = |what: &str| entries.iter().position(|e| e == what);
    h.ensure(position("a dropped") < position("b started"), || {
        format!("expected the stuck task dropped before b started; got {entries:?}")
    });
    b.elector.shutdown().await;
    h.finish();
}

/// The state API: the primary stores under its term and every node loads the value
/// with that term; `watch_key` wakes on a change; after a handover, writes with the old term —
/// through the elector's [`StateStore`](tower_primary::StateStore) and through [`Lock::store`] on the old holder's
/// and on another connection — fail with [`Error::StaleTerm`] and change nothing; a write with
/// a term that never held the lock fails too; the new term's value is never overwritten by an
/// older term.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn state_api_guards_terms<F: Fixture + ?Sized>(fixture: &F) {
    const KEY: &str = "conformance-key";
    const OTHER: &str = "conformance-other";
    let h = Harness::new(fixture, "state_api_guards_terms");
    let a = h.spawn("a");
    let ctx_a = h.within("a to become primary", a.primary()).await;
    let ta = ctx_a.term();
    let b = h.follower("b", "a", ta).await;
    let (state_a, state_b) = (a.elector.state(), b.elector.state());

    let loaded = h.ok("load", state_b.load(KEY).await);
    h.ensure(loaded.is_none(), || {
        format!("a fresh lock's key loaded as {loaded:?}")
    });
    let mut watch = h.ok("watch", state_b.watch(KEY).await);
    h.ok(
        "store by the primary",
        state_a.store(KEY, b"one", &ctx_a).await,
    );
    let woke = h
        .within("watch_key to wake after a store", watch.changed())
        .await;
    h.ok("Changes::changed()", woke);
    for (who, state) in [("a", &state_a), ("b", &state_b)] {
        let loaded = h.ok("load", state.load(KEY).await);
        h.ensure(
            loaded
                .as_ref()
                .is_some_and(|s| s.value == b"one" && s.term == ta),
            || format!("{who} loaded {loaded:?}, expected \"one\" with term {ta}"),
        );
    }
    let other = h.connect();
    let other_lock = h.lock(&other);
    let loaded = h.ok("load", other_lock.load(KEY).await);
    h.ensure(
        loaded
            .as_ref()
            .is_some_and(|s| s.value == b"one" && s.term == ta),
        || format!("another connection loaded {loaded:?}, expected \"one\" with term {ta}"),
    );

    // Handover to b.
    let mut watch_a = h.ok("watch", state_a.watch(KEY).await);
    h.ok("step_down", a.elector.step_down().await);
    let ctx_b = h.within("b to become primary", b.primary()).await;
    let tb = ctx_b.term();
    h.ensure(tb > ta, || format!("b's term {tb} is not above a's {ta}"));

    let stale = |res: Result<(), Error>, how: &str| {
        h.ensure(matches!(res, Err(Error::StaleTerm { .. })), || {
            format!("{how} returned {res:?}, expected a StaleTerm error")
        });
    };
    stale(
        state_a.store(KEY, b"stale", &ctx_a).await,
        &format!("StateStore::store with the old term {ta}"),
    );
    let a_lock = h.lock(&a.conn);
    stale(
        a_lock.store(KEY, b"stale", ta).await,
        &format!("Lock::store on the old holder's connection with its old term {ta}"),
    );
    stale(
        other_lock.store(KEY, b"stale", ta).await,
        &format!("Lock::store on another connection with the old term {ta}"),
    );
    stale(
        other_lock.store(OTHER, b"stale", ta).await,
        &format!("Lock::store of a new key with the old term {ta}"),
    );
    stale(
        other_lock.store(OTHER, b"future", tb + 1000).await,
        &format!(
            "Lock::store with the term {} that never held the lock",
            tb + 1000
        ),
    );
    let loaded = h.ok("load", state_b.load(KEY).await);
    h.ensure(
        loaded
            .as_ref()
            .is_some_and(|s| s.value == b"one" && s.term == ta),
        || {
            format!(
                "after refused stale writes the key loaded as {loaded:?}, expected \"one\" \
                 with term {ta}"
            )
        },
    );

    h.ok(
        "store by the new primary",
        state_b.store(KEY, b"two", &ctx_b).await,
    );
    h.within(
        "watch_key on the old primary to wake after the new primary's store",
        async {
            loop {
                h.ok("Changes::changed()", watch_a.changed().await);
                let loaded = h.ok("load", state_a.load(KEY).await);
                if loaded.is_some_and(|s| s.term == tb) {
                    return;
                }
            }
        },
    )
    .await;
    stale(
        a_lock.store(KEY, b"stale", ta).await,
        &format!("Lock::store over term {tb}'s value with the old term {ta}"),
    );
    let loaded = h.ok("load", other_lock.load(KEY).await);
    h.ensure(
        loaded
            .as_ref()
            .is_some_and(|s| s.value == b"two" && s.term == tb),
        || format!("term {tb}'s value was changed by an older term: loaded {loaded:?}"),
    );
    let loaded = h.ok("load", other_lock.load(OTHER).await);
    h.ensure(loaded.is_none(), || {
        format!("a refused write of a new key left {loaded:?}")
    });
    shutdown_all(&[a, b]).await;
    h.finish();
}

/// Raw [`Lock::acquire`] calls on another connection are dropped (timed out) around the moment
/// the holder releases, eight times: whenever such a call was granted after it was dropped, the
/// backend must release the grant, so one of the electors becomes primary again, at once. At
/// the end, with every elector gone, a new node must get the free lock: no dropped call may
/// still be waiting for it.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn dropped_acquire_does_not_leak_the_lock<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "dropped_acquire_does_not_leak_the_lock");
    let nodes = vec![h.spawn("a"), h.spawn("b")];
    let x = h.connect();
    let x_lock = h.lock(&x);
    let request = AcquireRequest::new(NodeId::new("x"))
        .with_lease(fixture.lease())
        .with_clock(h.clock);
    let mut last = 0;
    let mut handed_over: Option<Instant> = None;
    for round in 1..=8 {
        let (i, ctx) = h
            .within(&format!("a primary (round {round})"), any_primary(&nodes))
            .await;
        if let Some(at) = handed_over {
            h.fast_handover(at.elapsed(), "step_down() around a dropped acquire");
        }
        h.ensure(ctx.term() > last, || {
            format!("round {round}: term {} is not above {last}", ctx.term())
        });
        last = ctx.term();
        // The other elector may still hold off after its own step-down a round ago, until it
        // reads a holder other than itself; the primary of this round may hold the lock for too
        // short a time to be read. Wait until it has seen this term's holder, so that it
        // campaigns: a slow handover then means a leaked grant, not a held-off elector.
        let primary_id = nodes[i].id.clone();
        for other in nodes.iter().filter(|n| n.id != primary_id) {
            h.within(
                &format!(
                    "{} to see {primary_id} as the holder (round {round})",
                    other.id
                ),
                holder_is(&other.handle, &primary_id, Some(last)),
            )
            .await;
        }

        // Odd rounds drop the acquire for sure while the lock is held, before the step-down;
        // even rounds race the drop against the step-down.
        let dropped_first = round % 2 == 1;
        let give_up_after = if dropped_first {
            Duration::from_millis(5)
        } else {
            jitter(Duration::from_millis(20))
        };
        let lock = x_lock.clone();
        let req = request.clone();
        let recorder = h.recorder.clone();
        let clock = h.clock;
        let attempt = tokio::spawn(async move {
            match tokio::time::timeout(give_up_after, lock.acquire(req)).await {
                Ok(Ok(leadership)) => {
                    // A grant in time is fine: record it and give it back.
                    let term = leadership.term();
                    recorder.start("x", term, clock.now().as_nanos());
                    recorder.end("x", term, clock.now().as_nanos());
                    leadership.release().await.map(|()| Some(term))
                }
                Ok(Err(err)) => Err(err),
                Err(_) => Ok(None),
            }
        });
        let outcome = if dropped_first {
            let outcome = h.within("the raw acquire to give up", attempt).await;
            h.ok("step_down", nodes[i].elector.step_down().await);
            handed_over = Some(Instant::now());
            outcome
        } else {
            h.ok("step_down", nodes[i].elector.step_down().await);
            handed_over = Some(Instant::now());
            h.within("the raw acquire to finish", attempt).await
        };
        match outcome {
            Ok(Ok(Some(term))) => h.ensure(term > last, || {
                format!("the raw acquire got term {term}, not above {last}")
            }),
            Ok(Ok(None)) => {}
            Ok(Err(err)) => h.fail(format!("the raw acquire or its release failed: {err}")),
            Err(join) => h.fail(format!("the raw acquire panicked: {join}")),
        }
    }
    let (_, ctx) = h
        .within("a primary after the last round", any_primary(&nodes))
        .await;
    h.ensure(ctx.term() > last, || {
        format!("term {} is not above {last}", ctx.term())
    });
    last = ctx.term();

    // With every elector gone, a dropped acquire that still runs somewhere would take the free
    // lock now: for a while, nobody may.
    let mut changes = h.ok("watch_holder()", x_lock.watch_holder().await);
    shutdown_all(&nodes).await;
    let quiet_until = Instant::now() + Duration::from_millis(500);
    loop {
        let holder = h.ok("holder()", x_lock.holder().await);
        if let Some(holder) = holder.filter(|x| x.id == "x" && x.term > last) {
            h.fail(format!(
                "a dropped acquire took the free lock with term {} after every elector was gone",
                holder.term
            ));
        }
        match tokio::time::timeout_at(quiet_until, changes.changed()).await {
            Ok(res) => h.ok("Changes::changed()", res),
            Err(_) => break,
        }
    }
    let late = h.spawn("late");
    let term = h
        .within(
            "a new node to become primary once the electors are gone \
             (is a dropped acquire holding the lock?)",
            late.primary(),
        )
        .await
        .term();
    h.ensure(term > last, || format!("term {term} is not above {last}"));
    let holder = h.ok("holder()", x_lock.holder().await);
    h.ensure(holder.as_ref().is_some_and(|x| x.id == "late"), || {
        format!("the holder record names {holder:?}, expected the new node")
    });
    late.elector.shutdown().await;
    h.finish();
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// One check's context: the fixture, the lock, the recorder and the bounds.
struct Harness<'f, F: ?Sized> {
    fixture: &'f F,
    check: &'static str,
    lock: String,
    recorder: Recorder,
    clock: Clock,
    bound: Duration,
    backend: OnceLock<&'static str>,
}

impl<'f, F: Fixture + ?Sized> Harness<'f, F> {
    fn new(fixture: &'f F, check: &'static str) -> Self {
        Harness {
            fixture,
            check,
            lock: fixture.lock_name(check),
            recorder: Recorder::new(),
            clock: Clock::system(),
            bound: fixture.timeout(),
            backend: OnceLock::new(),
        }
    }

    fn connect(&self) -> Connection {
        let conn = self.fixture.connect();
        let _ = self.backend.set(conn.backend().name());
        conn
    }

    fn lock(&self, conn: &Connection) -> Arc<dyn Lock> {
        match conn.backend().lock(&self.lock) {
            Ok(lock) => lock,
            Err(err) => self.fail(format!("Backend::lock({:?}) failed: {err}", self.lock)),
        }
    }

    fn builder(&self, id: &str, conn: &Connection) -> ElectorBuilder {
        let builder = Elector::builder(self.lock.clone())
            .backend(conn.backend().clone())
            .node(NodeId::new(id))
            .clock(self.clock)
            .grace(Duration::from_secs(5))
            // Long: a node that stepped down rejoins as soon as another node holds the lock, and
            // must not race the waiting node for it meanwhile.
            .rejoin_delay(Duration::from_secs(2))
            .retry_backoff(Duration::from_millis(20), Duration::from_millis(200));
        match self.fixture.lease() {
            Some(lease) => builder.lease(lease),
            None => builder,
        }
    }

    /// An elector on a new connection, on the current runtime, tracked by the recorder.
    fn spawn(&self, id: &str) -> Node {
        self.spawn_on(id, self.connect(), |b| b)
    }

    /// Like [`spawn`](Self::spawn), then waits until the new node reads `holder` (with `term`)
    /// as the holder: it campaigns as a secondary from then on.
    async fn follower(&self, id: &str, holder: &str, term: u64) -> Node {
        let node = self.spawn(id);
        self.within(
            &format!("{id} to see {holder} as the holder"),
            holder_is(&node.handle, holder, Some(term)),
        )
        .await;
        node
    }

    /// Primary `a` on a thread of its own (it can be paused), its task running and reporting to
    /// the returned receiver, and `b` following it.
    async fn pausable_primary_and_follower(
        &self,
    ) -> (
        ThreadNode,
        TermContext,
        mpsc::UnboundedReceiver<TaskEvent>,
        Node,
    ) {
        let (tx, mut events) = mpsc::unbounded_channel();
        let a = self.thread_node("a", move |e| watch_task(e, tx)).await;
        let ctx_a = self.within("a to become primary", a.primary()).await;
        self.expect_event(
            "a's task to start",
            &mut events,
            TaskEvent::Started(ctx_a.term()),
        )
        .await;
        let b = self.follower("b", "a", ctx_a.term()).await;
        (a, ctx_a, events, b)
    }

    /// Node `b`, whose singleton task logs `b started` to `log` and sends its term, once it has
    /// read `a` as the holder.
    async fn logging_successor(&self, log: &Log) -> (Node, mpsc::UnboundedReceiver<u64>) {
        let b = self.spawn("b");
        let (tx, started) = mpsc::unbounded_channel();
        let log = log.clone();
        b.elector
            .singleton_task("conformance-successor", move |ctx| {
                log.push("b started");
                let _ = tx.send(ctx.term());
                async { Ok::<(), Infallible>(()) }
            });
        self.within("b to see a as the holder", holder_is(&b.handle, "a", None))
            .await;
        (b, started)
    }

    fn spawn_on(
        &self,
        id: &str,
        conn: Connection,
        configure: impl FnOnce(ElectorBuilder) -> ElectorBuilder,
    ) -> Node {
        let elector = match configure(self.builder(id, &conn)).spawn() {
            Ok(elector) => elector,
            Err(err) => self.fail(format!("spawning elector {id} failed: {err}")),
        };
        self.recorder.track(&elector);
        Node {
            id: id.to_owned(),
            recorder: self.recorder.clone(),
            handle: elector.handle(),
            conn,
            elector,
        }
    }

    /// An elector on its own current-thread runtime in its own thread, which can be paused,
    /// resumed, killed or shut down. `setup` runs on the new elector before it campaigns.
    async fn thread_node(
        &self,
        id: &str,
        setup: impl FnOnce(&Elector) + Send + 'static,
    ) -> ThreadNode {
        let conn = self.connect();
        let builder = self.builder(id, &conn);
        let recorder = self.recorder.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let spawned = std::thread::Builder::new()
            .name(format!("conformance-{id}"))
            .spawn(move || run_thread_node(builder, recorder, setup, ready_tx, cmd_rx));
        if let Err(err) = spawned {
            self.fail(format!("cannot start a thread for node {id}: {err}"));
        }
        let handle = match self.within("the node thread to start", ready_rx).await {
            Ok(Ok(handle)) => handle,
            Ok(Err(err)) => self.fail(format!(
                "starting node {id} on its own runtime failed: {err}"
            )),
            Err(_) => self.fail(format!("the thread of node {id} died while starting")),
        };
        ThreadNode {
            id: id.to_owned(),
            recorder: self.recorder.clone(),
            handle,
            commands: cmd_tx,
        }
    }

    /// Checks that `node`'s period with `term` started at or after `at`.
    fn started_after(&self, node: &str, term: u64, what: &str, at: u64) {
        let history = self.recorder.history();
        let Some(p) = period(&history, node, term) else {
            self.fail(format!("no period of {node} with term {term} was recorded"));
        };
        self.ensure(p.start >= at, || {
            format!(
                "{node} became primary (term {term}) {:?} before {what}",
                Duration::from_nanos(at - p.start)
            )
        });
    }

    /// On lease backends, a handover must not have waited for the lease to expire.
    fn fast_handover(&self, took: Duration, how: &str) {
        if let Some(lease) = self.fixture.lease() {
            let limit = lease.ttl() / 2;
            self.ensure(took < limit, || {
                format!(
                    "the handover after {how} took {took:?}, as long as waiting for the lease \
                     ({:?}) to expire: release() must free the lock at once",
                    lease.ttl()
                )
            });
        }
    }

    /// Receives the next task event, which must be `expected`.
    async fn expect_event(
        &self,
        what: &str,
        events: &mut mpsc::UnboundedReceiver<TaskEvent>,
        expected: TaskEvent,
    ) {
        let got = self.within(what, events.recv()).await;
        self.ensure(got.as_ref() == Some(&expected), || {
            format!("{what}: expected {expected:?}, got {got:?}")
        });
    }

    async fn within<T>(&self, what: &str, fut: impl Future<Output = T>) -> T {
        match tokio::time::timeout(self.bound, fut).await {
            Ok(value) => value,
            Err(_) => self.fail(format!(
                "timed out after {:?} waiting for {what}",
                self.bound
            )),
        }
    }

    fn ok<T, E: fmt::Display>(&self, what: &str, res: Result<T, E>) -> T {
        match res {
            Ok(value) => value,
            Err(err) => self.fail(format!("{what} failed: {err}")),
        }
    }

    fn ensure(&self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond {
            self.fail(msg());
        }
    }

    #[track_caller]
    fn fail(&self, msg: String) -> ! {
        panic!(
            "conformance check `{}` failed on the {} backend (lock {}): {msg}\n{}",
            self.check,
            self.backend.get().copied().unwrap_or("?"),
            self.lock,
            self.recorder.history()
        );
    }

    fn skip(&self, why: &str) {
        println!(
            "conformance check `{}` on the {} backend: skipped: {why}",
            self.check,
            self.backend
                .get()
                .copied()
                .unwrap_or_else(|| self.fixture.connect().backend().name())
        );
    }

    /// The recorded history must show no overlap and rising terms.
    fn finish(&self) {
        let history = self.recorder.history();
        let report = history.check();
        self.ensure(report.is_ok(), || format!("{report}"));
    }
}

/// An elector on the test's runtime.
struct Node {
    id: String,
    recorder: Recorder,
    conn: Connection,
    elector: Elector,
    handle: RoleHandle,
}

impl Node {
    /// Waits until this node is primary and its tracker has recorded the period.
    async fn primary(&self) -> TermContext {
        primary_recorded(&self.id, &self.handle, &self.recorder).await
    }
}

/// Waits until `handle` is primary and `recorder` holds the period: a term that ended before its
/// tracker ran would be missing from the history.
async fn primary_recorded(id: &str, handle: &RoleHandle, recorder: &Recorder) -> TermContext {
    let ctx = handle.clone().wait_primary().await;
    recorder
        .wait_for(|h| period(h, id, ctx.term()).is_some())
        .await;
    ctx
}

async fn shutdown_all(nodes: &[Node]) {
    futures_util::future::join_all(nodes.iter().map(|n| n.elector.shutdown())).await;
}

/// The first of `nodes` to be primary, and its term.
async fn any_primary(nodes: &[Node]) -> (usize, TermContext) {
    let waits = nodes.iter().map(|n| Box::pin(n.primary()));
    let (ctx, i, _) = futures_util::future::select_all(waits).await;
    (i, ctx)
}

/// Waits until `handle` names `id` (with `term`, if given) as the holder.
async fn holder_is(handle: &RoleHandle, id: &str, term: Option<u64>) {
    let mut handle = handle.clone();
    loop {
        let holder = handle.holder();
        if holder
            .as_ref()
            .is_some_and(|h| h.id == id && term.is_none_or(|t| h.term == t))
        {
            return;
        }
        handle.changed().await;
    }
}

fn period<'h>(history: &'h History, node: &str, term: u64) -> Option<&'h Period> {
    history
        .periods()
        .iter()
        .find(|p| p.node == node && p.term == term)
}

/// A duration in `[0, max)`, different from call to call.
fn jitter(max: Duration) -> Duration {
    let max = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(monotonic_nanos().wrapping_mul(0x9E37_79B9_7F4A_7C15) % max)
}

/// What a watched singleton task saw.
#[derive(Clone, Debug, PartialEq, Eq)]
enum TaskEvent {
    Started(u64),
    Cancelled {
        term: u64,
        primary: bool,
        valid: bool,
    },
}

/// Registers a task that reports its start and the end of its term.
fn watch_task(elector: &Elector, tx: mpsc::UnboundedSender<TaskEvent>) {
    let handle = elector.handle();
    elector.singleton_task("conformance-watch", move |ctx| {
        let tx = tx.clone();
        let handle = handle.clone();
        async move {
            let _ = tx.send(TaskEvent::Started(ctx.term()));
            ctx.cancelled().await;
            let _ = tx.send(TaskEvent::Cancelled {
                term: ctx.term(),
                primary: handle.is_primary(),
                valid: ctx.is_valid(),
            });
            Ok::<(), Infallible>(())
        }
    });
}

/// An ordered log shared by tasks of several nodes.
#[derive(Clone, Default)]
struct Log {
    entries: Arc<Mutex<Vec<String>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Log {
    fn push(&self, entry: &str) {
        self.lock().push(entry.to_owned());
        self.changed.notify_waiters();
    }

    fn entries(&self) -> Vec<String> {
        self.lock().clone()
    }

    async fn wait_for(&self, entry: &str) {
        loop {
            let notified = self.changed.notified();
            if self.lock().iter().any(|e| e == entry) {
                return;
            }
            notified.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        crate::sync::lock(&self.entries)
    }
}

/// Logs an entry when dropped (a task aborted).
struct LogOnDrop(Log, &'static str);

impl Drop for LogOnDrop {
    fn drop(&mut self) {
        self.0.push(self.1);
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes on their own runtime.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeCommand {
    /// Stop polling the runtime.
    Pause,
    /// Poll it again.
    Resume,
    /// Shut the runtime down without releasing anything.
    Kill,
    /// Shut the elector down gracefully, then the runtime.
    Shutdown,
}

/// When a thread node's runtime stopped being polled, and its deadline then.
#[derive(Clone, Copy, Debug)]
struct Frozen {
    at: Timestamp,
    deadline: Option<Timestamp>,
}

struct ThreadNode {
    id: String,
    recorder: Recorder,
    handle: RoleHandle,
    commands: mpsc::UnboundedSender<(NodeCommand, oneshot::Sender<Frozen>)>,
}

impl ThreadNode {
    async fn primary(&self) -> TermContext {
        primary_recorded(&self.id, &self.handle, &self.recorder).await
    }

    async fn command<F: Fixture + ?Sized>(
        &self,
        h: &Harness<'_, F>,
        command: NodeCommand,
    ) -> Frozen {
        let (tx, rx) = oneshot::channel();
        if self.commands.send((command, tx)).is_err() {
            h.fail(format!("the node thread is gone; cannot {command:?} it"));
        }
        match h
            .within(&format!("the node thread to {command:?}"), rx)
            .await
        {
            Ok(frozen) => frozen,
            Err(_) => h.fail(format!("the node thread died during {command:?}")),
        }
    }
}

fn run_thread_node(
    builder: ElectorBuilder,
    recorder: Recorder,
    setup: impl FnOnce(&Elector),
    ready: oneshot::Sender<Result<RoleHandle, String>>,
    mut commands: mpsc::UnboundedReceiver<(NodeCommand, oneshot::Sender<Frozen>)>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            let _ = ready.send(Err(err.to_string()));
            return;
        }
    };
    let elector = match runtime.block_on(async { builder.spawn() }) {
        Ok(elector) => elector,
        Err(err) => {
            let _ = ready.send(Err(err.to_string()));
            runtime.shutdown_background();
            return;
        }
    };
    // Registered before the campaign is first polled.
    recorder.track(&elector);
    setup(&elector);
    let handle = elector.handle();
    let clock = handle.clock();
    let _ = ready.send(Ok(handle.clone()));
    let mut running = true;
    loop {
        let next = if running {
            runtime.block_on(commands.recv())
        } else {
            commands.blocking_recv()
        };
        // The runtime is not polled from here until the next `block_on`.
        let Some((command, reply)) = next else { break };
        let frozen = Frozen {
            at: clock.now(),
            deadline: handle.deadline(),
        };
        match command {
            NodeCommand::Pause => running = false,
            NodeCommand::Resume => running = true,
            NodeCommand::Kill => {
                // Drops every task, the leadership among them, without running them again.
                runtime.shutdown_background();
                drop(elector);
                let _ = reply.send(frozen);
                return;
            }
            NodeCommand::Shutdown => {
                runtime.block_on(elector.shutdown());
                runtime.shutdown_background();
                drop(elector);
                let _ = reply.send(frozen);
                return;
            }
        }
        let _ = reply.send(frozen);
    }
    // The test is gone.
    runtime.shutdown_background();
    drop(elector);
}
