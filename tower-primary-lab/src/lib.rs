//! The lab of tower-primary's own tests, examples and tools. Not published.
//!
//! - [`node`]: a test binary re-executed as a node process (N of them, then SIGKILL, SIGSTOP,
//!   SIGTERM), and the cluster that drives them.
//! - [`servers`]: start and stop test servers (redis-server, etcd, a throwaway PostgreSQL
//!   cluster), and the shared "skip loudly or fail" rule for backend tests.
//! - [`proxy`]: a TCP proxy whose connections a test can cut.
//! - [`host`]: simulated hosts (a PID namespace each), so that nodes on one machine can stand for
//!   nodes on different machines.
//! - [`sockets`]: the TCP connections a process holds to a server (from `/proc`).
//! - [`old_version`]: the node binary of an older commit, for tests that run old and new nodes on
//!   one lock (a rolling upgrade).

pub mod host;
pub mod node;
pub mod old_version;
pub mod proxy;
pub mod servers;
pub mod sockets;

mod sync;
