//! Helpers shared by the integration tests that run real node processes.

use tower_primary::testing::node;

/// The node side of a test binary: call it from a `#[test] fn node_entry()`. Returns at once
/// unless this process was started as a node (`TOWER_PRIMARY_TEST_NODE=1`); then it runs the
/// node and never returns. Node logs (`tracing`, `RUST_LOG`, default `tower_primary=info`) go to
/// stderr, which the parent keeps for failure messages.
pub(crate) fn node_entry() {
    if !node::is_node_process() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tower_primary=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    node::run_node_from_env();
}

/// Milliseconds from `from` to `to` (CLOCK_MONOTONIC nanoseconds), for printed measurements.
#[allow(dead_code, clippy::cast_precision_loss)]
pub(crate) fn ms(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}
