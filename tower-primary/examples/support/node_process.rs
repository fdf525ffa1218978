//! The node side of a program that re-executes itself as election nodes
//! ([`tower_primary_lab::node`]): shared by the examples that run node processes and by the
//! integration tests (`tests/common`).

use tower_primary_lab::node;

/// Returns at once unless this process was started as a node (`TOWER_PRIMARY_TEST_NODE=1`); then
/// it runs the node and never returns. The node logs (`tracing`) to stderr, which the parent
/// keeps, filtered by `RUST_LOG` or else by `default_filter`.
pub(crate) fn run_if_node(default_filter: &str) {
    if !node::is_node_process() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    node::run_node_from_env();
}
