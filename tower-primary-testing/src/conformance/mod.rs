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
//! Every check uses its own lock name, runs real electors on the [system clock](tower_primary::clock::Clock::system)
//! and records every primary period in a [`History`](crate::history::History) that
//! must show no overlap and rising terms. Waits are bounded by [`Fixture::timeout`] (seconds);
//! the checks assert order and the absence of overlap, never tight times. A check panics, with
//! the backend, the lock name and the recorded periods, when the backend breaks the contract.
//!
//! | check | what it asserts |
//! |---|---|
//! | [`single_primary_among_candidates`] | five electors: exactly one primary at each handover, no overlap, rising terms |
//! | [`secondaries_see_the_holder`] | secondaries and [`Lock::holder`](tower_primary::backend::Lock::holder) name the primary; [`Lock::watch_holder`](tower_primary::backend::Lock::watch_holder) wakes on a change |
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
//! | [`resume_continues_the_lease_under_a_higher_term`] | backends with resume tokens: a dead holder's lease resumed from another connection gets a higher term and the new holder record, once; the old term's writes are refused |
//! | [`registry_lists_live_candidates`] | backends with a registry: an entry registered, updated and withdrawn on one connection shows on another at once, and wakes its `watch_candidates` |
//! | [`reservation_admits_only_its_node`] | backends with reservations: only the reserved node takes the released lock (higher term), the reservation is consumed; one for a node that never comes keeps the others out until it runs out |
//! | [`priorities_move_the_lock_once`] | electors: equal priorities and unready nodes move nothing; a ready higher priority gets the lock once; directed handovers and their refusals; a draining primary hands over |
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

mod acquire;
mod failover;
mod fixture;
mod harness;
mod macros;
mod registry;
mod resume;
mod state;
mod tasks;
mod thread_node;

pub use self::acquire::{
    dropped_acquire_does_not_leak_the_lock, handover_on_shutdown, handover_on_step_down,
    secondaries_see_the_holder, single_primary_among_candidates, terms_rise_over_handovers,
};
pub use self::failover::{
    fail_closed_on_backend_errors, failover_when_the_primary_crashes, paused_primary_fences_itself,
    paused_primary_keeps_a_lock_without_lease, self_fencing_when_renewals_stop,
    self_fencing_when_the_backend_fails,
};
pub use self::fixture::{
    Connection, Fault, FaultHooks, Fixture, FnFixture, MemoryFixture, from_fn, unique_lock_name,
};
pub use self::registry::{
    priorities_move_the_lock_once, registry_lists_live_candidates, reservation_admits_only_its_node,
};
pub use self::resume::resume_continues_the_lease_under_a_higher_term;
pub use self::state::state_api_guards_terms;
pub use self::tasks::{
    shutdown_aborts_tasks_after_the_grace, shutdown_cancels_tasks_before_release,
    task_cancelled_when_the_term_ends,
};

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
    "resume_continues_the_lease_under_a_higher_term",
    "registry_lists_live_candidates",
    "reservation_admits_only_its_node",
    "priorities_move_the_lock_once",
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
    resume_continues_the_lease_under_a_higher_term(fixture).await;
    registry_lists_live_candidates(fixture).await;
    reservation_admits_only_its_node(fixture).await;
    priorities_move_the_lock_once(fixture).await;
}
