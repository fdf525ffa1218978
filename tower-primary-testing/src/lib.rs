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
//!
//! Add it as a dev-dependency, with tokio's `macros` and `rt-multi-thread` features for the
//! tests themselves. The repository's `check_a_singleton_task` example (`cargo run -p
//! tower-primary-testing --example check_a_singleton_task`) runs a whole scenario: three
//! electors, a handover, a forced failover and the history check.
//!
//! # Testing your code: the history of a singleton task
//!
//! The task records when it starts and when it stops acting; the check fails if two runs
//! overlapped or a term did not rise.
//!
//! ```
//! use std::convert::Infallible;
//! use tower_primary::clock::monotonic_nanos;
//! use tower_primary::{Elector, MemoryBackend, NodeId};
//! use tower_primary_testing::history::Recorder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_primary::Error> {
//! let backend = MemoryBackend::new();
//! let runs = Recorder::new();
//! let mut electors = Vec::new();
//! for name in ["a", "b"] {
//!     let elector = Elector::builder("report")
//!         .backend(backend.connection()) // another node on the same in-process store
//!         .node(NodeId::new(name))
//!         .spawn()?;
//!     let runs = runs.clone();
//!     elector.singleton_task("report", move |ctx| {
//!         let runs = runs.clone();
//!         async move {
//!             runs.start(name, ctx.term(), monotonic_nanos());
//!             ctx.cancelled().await; // the job's work, until the term ends
//!             runs.end(name, ctx.term(), monotonic_nanos());
//!             Ok::<_, Infallible>(())
//!         }
//!     });
//!     electors.push(elector);
//! }
//!
//! runs.wait_for(|h| h.periods().len() == 1).await;
//! let first = runs.history().periods()[0].node.clone();
//! let primary = if first == "a" { &electors[0] } else { &electors[1] };
//! primary.step_down().await?; // a handover to the other node
//! runs.wait_for(|h| h.periods().len() == 2).await;
//! for elector in &electors {
//!     elector.shutdown().await;
//! }
//! runs.assert_ok(); // panics with the periods on an overlap
//! # Ok(())
//! # }
//! ```
//!
//! # Testing a backend: the conformance suite
//!
//! A [`Fixture`](conformance::Fixture) opens one independent connection per node. Here the
//! backend under test is a wrapper that puts every lock under a prefix:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower_primary::backend::{Backend, Lock};
//! use tower_primary::{ConfigError, MemoryBackend};
//! use tower_primary_testing::conformance::{self, Connection, Fixture};
//!
//! #[derive(Debug)]
//! struct Prefixed(MemoryBackend);
//!
//! impl Backend for Prefixed {
//!     fn name(&self) -> &'static str {
//!         "prefixed"
//!     }
//!     fn min_lease(&self) -> Option<Duration> {
//!         self.0.min_lease()
//!     }
//!     fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
//!         self.0.lock(&format!("app.{name}"))
//!     }
//! }
//!
//! struct PrefixedFixture(MemoryBackend);
//!
//! impl Fixture for PrefixedFixture {
//!     fn connect(&self) -> Connection {
//!         Connection::new(Prefixed(self.0.connection()))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let fixture = PrefixedFixture(MemoryBackend::new());
//! conformance::handover_on_step_down(&fixture).await;
//! conformance::state_api_guards_terms(&fixture).await;
//! # }
//! // In a test file, one #[tokio::test] per check:
//! // tower_primary_testing::conformance_tests!(PrefixedFixture(MemoryBackend::new()));
//! ```
//!
//! # The fenced witness's rule
//!
//! The [`Witness`](witness::Witness) store applies a [`Fence`](witness::Fence): a write with a
//! term below the highest accepted one is refused, as a fencing-aware database refuses it.
//!
//! ```
//! use tower_primary_testing::witness::{Fence, Verdict};
//!
//! let mut fence = Fence::new();
//! assert_eq!(fence.offer(3), Verdict::Accepted); // the primary of term 3
//! assert_eq!(fence.offer(4), Verdict::Accepted); // its successor
//! assert_eq!(fence.offer(3), Verdict::Rejected { highest: 4 }); // the stale primary, refused
//! ```
//!
//! [`witness`]'s module docs run electors that write to a live witness, and check the writes.

pub mod conformance;
pub mod history;
pub mod witness;

mod sync;
