//! Test kit for [tower-primary](tower_primary): what you need to test your own code under an
//! elector, and what a backend author needs to test a backend.
//!
//! - [`history`]: record primary periods ([`Recorder::track`](history::Recorder::track), or
//!   `node event term time` lines from several processes) and check that none overlap and terms
//!   rise.
//! - [`conformance`]: the checks every backend must pass; a backend's test file is a
//!   [`Fixture`](conformance::Fixture) and one [`conformance_tests!`](crate::conformance_tests)
//!   line.
//! - [`witness`]: a fenced witness (a store that refuses older terms) that primaries write to, and
//!   the check of what they wrote against the primary periods.
//!
//! Fault injection for the elector (errors, hangs, a lost lease, a lease that is not renewed) is
//! part of the library's in-process backend, [`MemoryBackend`](tower_primary::MemoryBackend).

pub mod conformance;
pub mod history;
pub mod witness;

mod sync;
