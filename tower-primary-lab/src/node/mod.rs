//! Real processes as election nodes: a child side that runs one [`Elector`] and reports what
//! happens on its stdout, and a parent side ([`Cluster`]) that spawns such nodes, signals them
//! and awaits what they report.
//!
//! Fault tests and failover benchmarks need real processes: `SIGKILL` only means something when
//! the kernel closes the dead process's descriptors and connections. A test binary (or an example)
//! **re-executes itself in node mode**: the parent spawns copies of its own executable with
//! [`NODE_ENV`] set, and the child calls [`run_node_from_env`] instead of doing its normal work.
//!
//! # Node mode
//!
//! [`run_node_from_env`] reads a [`NodeConfig`] from the environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `TOWER_PRIMARY_TEST_NODE=1` | run as a node ([`is_node_process`]) |
//! | `TOWER_PRIMARY_BACKEND` | the backend string, e.g. a directory for the file backend |
//! | `TOWER_PRIMARY_TEST_LOCK` | the lock name |
//! | `TOWER_PRIMARY_TEST_LEASE` | optional lease, e.g. `2s` (ignored by backends without a lease) |
//! | `TOWER_PRIMARY_TEST_GRACE` | optional grace, e.g. `500ms` |
//! | `TOWER_PRIMARY_TEST_TICK` | how often the singleton task ticks (default `100ms`) |
//! | `TOWER_PRIMARY_TEST_SPAWN` | optional command (split on whitespace) that the singleton task spawns with [`std::process::Command`] at the start of every term, e.g. `sleep 30` |
//! | `TOWER_PRIMARY_TEST_PARENT_PIPE=1` | exit when stdin reaches end-of-file (the parent died) |
//! | `TOWER_PRIMARY_TEST_WITNESS` | optional `host:port` of a [fenced witness](tower_primary_testing::witness) to write to while primary, as node `<pid>` (its [`reported_pid`]) |
//! | `TOWER_PRIMARY_TEST_WITNESS_EVERY` | how often to write to the witness (default `2ms`) |
//! | `TOWER_PRIMARY_HOST_DIR` | optional host directory: the nodes sharing it campaign as one host group (the elector reads it) |
//! | `TOWER_PRIMARY_TEST_NODE_ID` | optional pid to report instead of its own in events and witness writes ([`reported_pid`]; set for a node in a [simulated host](crate::host)) |
//! | `TOWER_PRIMARY_PRIORITY` | optional priority (read by the elector) |
//! | `TOWER_PRIMARY_TEST_SETTLE`, `TOWER_PRIMARY_TEST_HANDOVER_WINDOW` | optional settle time and handover window |
//! | `TOWER_PRIMARY_TEST_NEVER_LEAD=1`, `TOWER_PRIMARY_TEST_READY_AT_SPAWN=0` | `never_lead`, `ready_at_spawn(false)` |
//! | `TOWER_PRIMARY_TEST_DRAIN_ON_TERM` | optional bound: on `SIGTERM`, drain (hand over) for up to this long before the shutdown |
//!
//! The node spawns an [`Elector`] on a current-thread runtime, registers a singleton task that
//! reports its start at once and then ticks, and prints one line per role change. On `SIGTERM` it
//! calls [`Elector::shutdown`] (graceful handover), prints `released` and exits with status 0.
//!
//! # Protocol
//!
//! One line per event on stdout, `EVENT <mono_ns> <pid> <what> [args]`, where `mono_ns` is
//! [`monotonic_nanos`] (`CLOCK_MONOTONIC`, comparable between processes of one host). Other lines
//! (a test harness's own output) are ignored by the parent.
//!
//! | line | [`EventKind`] | when |
//! |---|---|---|
//! | `started` | [`Started`](EventKind::Started) | the elector was spawned |
//! | `primary <term>` | [`Primary`](EventKind::Primary) | the role became primary |
//! | `secondary <holder term or -> <holder pid or ->` | [`Secondary`](EventKind::Secondary) | the role (or the known holder) changed to secondary |
//! | `task-start <term>` | [`TaskStart`](EventKind::TaskStart) | the singleton task started: the first tick of a term |
//! | `tick <term> <n>` | [`Tick`](EventKind::Tick) | the singleton task's `n`-th periodic tick |
//! | `task-cancelled <term>` | [`TaskCancelled`](EventKind::TaskCancelled) | the singleton task saw its term end |
//! | `child <pid>` | [`ChildSpawned`](EventKind::ChildSpawned) | the task spawned the `TOWER_PRIMARY_TEST_SPAWN` command |
//! | `sigterm` | [`SigTerm`](EventKind::SigTerm) | `SIGTERM` arrived; shutdown begins |
//! | `released` | [`Released`](EventKind::Released) | [`Elector::shutdown`] returned |
//! | `exit <code>` | [`Exit`](EventKind::Exit) | the process is about to exit |
//! | `error <message>` | [`Error`](EventKind::Error) | the node could not start |
//! | `node <id>` | [`Node`](EventKind::Node) | the node's id in the registry (after `started`) |
//! | `handing-over <term> <to>` | [`HandingOver`](EventKind::HandingOver) | the elector decided to hand the lock over to `to` (it reserved the lock; needs [`HandoverLayer`] in the node's subscriber) |
//! | `obeyed <order>`, `refused <order> -- <why>` | [`Obeyed`](EventKind::Obeyed), [`Refused`](EventKind::Refused) | an [`Order`] was carried out or failed |
//! | `drained` | [`Drained`](EventKind::Drained) | a drain order resolved: the node is not primary |
//!
//! The parent adds its own events to the same log: [`Spawned`](EventKind::Spawned),
//! [`Signalled`](EventKind::Signalled) (timestamped just before `kill(2)`) and
//! [`Exited`](EventKind::Exited).
//!
//! `task-start` and `task-cancelled` bound what a node does as primary: the task starts only after
//! the backend granted the lock, and the elector waits for the task to end before it releases the
//! lock. [`history()`] builds the primary periods from them as a
//! [`History`](tower_primary_testing::history::History).
//!
//! # Orders
//!
//! The parent gives a node [`Order`]s on its stdin, one a line ([`Cluster::order`]): `ready`,
//! `drain`, `hand-over-to <id>` and `step-down`, the elector's calls of those names.
//!
//! # Example
//!
//! A test binary whose `node_entry` test doubles as the node:
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_primary_lab::node::{self, Cluster, NodeCommand, NodeConfig, NodeSignal};
//!
//! #[test]
//! fn node_entry() {
//!     if node::is_node_process() {
//!         node::run_node_from_env();
//!     }
//! }
//!
//! #[tokio::test]
//! async fn secondary_takes_over() {
//!     let dir = tempfile::tempdir().unwrap();
//!     let config = NodeConfig::new(dir.path().to_str().unwrap(), "doc-lock");
//!     let mut cluster = Cluster::new(NodeCommand::test_entry("node_entry").unwrap(), config);
//!     cluster.spawn_nodes(3).unwrap();
//!     let t = Duration::from_secs(20);
//!     let (pid, term) = cluster.wait_settled(t).await.unwrap();
//!     cluster.signal(pid, NodeSignal::Kill).await.unwrap();
//!     let next = cluster.wait_primary_after(term, pid, t).await.unwrap();
//!     assert_ne!(next.pid, pid);
//!     cluster.history().assert_ok();
//! }
//! # fn main() {}
//! ```
//!
//! [`Elector`]: tower_primary::Elector
//! [`Elector::shutdown`]: tower_primary::Elector::shutdown
//! [`monotonic_nanos`]: tower_primary::clock::monotonic_nanos

mod child;
mod cluster;
mod config;
mod events;
mod observe;
mod process;
mod wait;

pub use self::child::{
    HandoverLayer, emit, is_node_process, reported_pid, run_node, run_node_from_env,
};
pub use self::cluster::Cluster;
pub use self::config::NodeConfig;
pub use self::events::{Event, EventKind, NodeSignal, Order};
pub use self::observe::{EventLog, NodeState, ObservedRole, history, node_states, settled_primary};
pub use self::process::NodeCommand;
pub use self::wait::{Handover, Succession, WaitError};

use std::time::Duration;

/// Set to `1` in a node's environment: the process runs as a node ([`is_node_process`]).
pub const NODE_ENV: &str = "TOWER_PRIMARY_TEST_NODE";
/// The lock name a node competes for.
pub const LOCK_ENV: &str = "TOWER_PRIMARY_TEST_LOCK";
/// A node's lease (humantime, e.g. `2s`).
pub const LEASE_ENV: &str = "TOWER_PRIMARY_TEST_LEASE";
/// A node's grace (humantime, e.g. `500ms`).
pub const GRACE_ENV: &str = "TOWER_PRIMARY_TEST_GRACE";
/// How often a node's singleton task ticks (humantime, default `100ms`).
pub const TICK_ENV: &str = "TOWER_PRIMARY_TEST_TICK";
/// A command (split on whitespace) the singleton task spawns at the start of every term.
pub const SPAWN_ENV: &str = "TOWER_PRIMARY_TEST_SPAWN";
/// Set to `1`: the node exits when its stdin reaches end-of-file, so nodes never outlive a parent
/// that was killed. [`Cluster`] sets it and keeps the pipe open.
pub const PARENT_PIPE_ENV: &str = "TOWER_PRIMARY_TEST_PARENT_PIPE";
/// The address of a [fenced witness](tower_primary_testing::witness) the node writes to while primary.
pub const WITNESS_ENV: &str = "TOWER_PRIMARY_TEST_WITNESS";
/// How often the node writes to the witness (humantime, default `2ms`).
pub const WITNESS_EVERY_ENV: &str = "TOWER_PRIMARY_TEST_WITNESS_EVERY";
/// The host directory of a host group: the elector reads it when it is spawned.
pub use tower_primary::HOST_DIR_ENV;
/// The node's priority: the elector reads it when it is spawned.
pub use tower_primary::PRIORITY_ENV;
/// The elector's settle time (humantime).
pub const SETTLE_ENV: &str = "TOWER_PRIMARY_TEST_SETTLE";
/// The elector's handover window (humantime).
pub const WINDOW_ENV: &str = "TOWER_PRIMARY_TEST_HANDOVER_WINDOW";
/// Set to `1`: the node never leads.
pub const NEVER_LEAD_ENV: &str = "TOWER_PRIMARY_TEST_NEVER_LEAD";
/// Set to `0`: the node is not ready at spawn (an [`Order::Ready`] makes it ready).
pub const READY_AT_SPAWN_ENV: &str = "TOWER_PRIMARY_TEST_READY_AT_SPAWN";
/// On `SIGTERM`, drain for up to this long (humantime) before the shutdown.
pub const DRAIN_ON_TERM_ENV: &str = "TOWER_PRIMARY_TEST_DRAIN_ON_TERM";

const DEFAULT_TICK: Duration = Duration::from_millis(100);
