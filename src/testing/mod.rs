//! Test helpers that users may reuse: the history checker, the backend conformance suite and
//! multi-process node helpers.
//!
//! - [`history`]: record primary periods ([`Recorder::track`](history::Recorder::track), or
//!   `node event term time` lines from several processes) and check that none overlap and terms
//!   rise.
//! - [`conformance`]: the checks every backend must pass; a backend's test file is a
//!   [`Fixture`](conformance::Fixture) and one [`conformance_tests!`](crate::conformance_tests)
//!   line.
//! - [`witness`]: a fenced witness (a store that refuses older terms) that primaries write to, and
//!   the check of what they wrote against the primary periods.
//! - [`host`]: simulated hosts (a PID namespace each), so that nodes on one machine can stand for
//!   nodes on different machines.
//! - [`old_version`]: the node binary of an older commit, for tests that run old and new nodes on
//!   one lock (a rolling upgrade).

pub mod conformance;
pub mod history;
pub mod host;
pub mod node;
pub mod old_version;
pub mod proxy;
pub mod servers;
pub mod witness;
