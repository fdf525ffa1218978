//! Helpers shared by the integration tests that run real node processes.

#[path = "../../examples/support/node_process.rs"]
mod node_process;

/// The node side of a test binary: call it from a `#[test] fn node_entry()`. Returns at once
/// unless this process was started as a node (`TOWER_PRIMARY_TEST_NODE=1`); then it runs the
/// node and never returns. Node logs (`tracing`, `RUST_LOG`, default `tower_primary=info`) go to
/// stderr, which the parent keeps for failure messages.
pub(crate) fn node_entry() {
    node_process::run_if_node("tower_primary=info");
}

/// Milliseconds from `from` to `to` (CLOCK_MONOTONIC nanoseconds), for printed measurements.
#[allow(dead_code, clippy::cast_precision_loss)]
pub(crate) fn ms(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}
