//! [`conformance_tests!`](crate::conformance_tests): one test per check.

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
            resume_continues_the_lease_under_a_higher_term
            registry_lists_live_candidates
            reservation_admits_only_its_node
            priorities_move_the_lock_once
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
