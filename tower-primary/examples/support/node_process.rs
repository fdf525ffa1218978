//! The node side of a program that re-executes itself as election nodes
//! ([`tower_primary_lab::node`]): shared by the examples that run node processes and by the
//! integration tests (`tests/common`).

use tower_primary_lab::node;

/// Returns at once unless this process was started as a node (`TOWER_PRIMARY_TEST_NODE=1`); then
/// it runs the node and never returns. The node logs (`tracing`) to stderr, which the parent
/// keeps, filtered by `RUST_LOG` or else by `default_filter`; whatever the filter, a handover
/// decision is also reported as a `handing-over` line ([`node::HandoverLayer`]).
pub(crate) fn run_if_node(default_filter: &str) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    if !node::is_node_process() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_filter(filter),
        )
        .with(node::HandoverLayer)
        .try_init();
    node::run_node_from_env();
}
