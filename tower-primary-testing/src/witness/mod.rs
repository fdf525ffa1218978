//! A fenced witness: a tiny store that refuses writes carrying an older term than one it has
//! accepted, as a fencing-aware database does (`UPDATE … WHERE term <= $term`), and that logs
//! every write it was offered. With it a test (or the `chaos` example) proves more than "no two
//! primary periods overlapped": it shows what a stale primary's writes did downstream.
//!
//! Three parts:
//!
//! - [`Witness`], the store: a TCP server on 127.0.0.1 that answers each write with its
//!   [`Verdict`] and keeps a [`WriteRecord`] of it. Its rule is [`Fence`].
//! - [`write_while_primary`], the node side: a [singleton task](tower_primary::Elector::singleton_task)
//!   that, while the node is primary, checks [`TermContext::is_valid`](tower_primary::role::TermContext::is_valid) and then writes
//!   `(node, term, time of the check, wall clock, deadline)` every few milliseconds. The
//!   multi-process node processes of your tests run it (the repository's own node mode does when `TOWER_PRIMARY_TEST_WITNESS` is
//!   set.
//! - [`merge`] and [`check`], the judge: the writes are merged into the [`History`](crate::history::History) of primary
//!   periods (deadlines, earliest evidence of a period), and every write is classified.
//!
//! # What is a violation
//!
//! A write is *unsafe* when its node claimed to be primary when it was not:
//! - its time (taken just before the node checked its term) lies outside its own period — after
//!   the period's reported end or deadline, whichever comes first;
//! - or a write with a higher term was checked before it: the writer task only runs after its
//!   node was granted the lock, so a lower term checked later was checked after a newer primary
//!   existed;
//! - or the witness accepted it although it had already accepted a higher term (a broken fence).
//!
//! An unsafe write the witness **accepted** is a stale write that reached the store: the failure
//! fencing exists to prevent. An unsafe write it **rejected** was a self-fencing failure that the
//! fence caught. Both are violations. Rejected writes that are not unsafe are expected: a node
//! that checked its term, was paused (`SIGSTOP`, a GC pause) and sent the write after a newer
//! primary had written is refused, which is what fencing is for.
//!
//! # Time
//!
//! Write times and deadlines are `CLOCK_MONOTONIC` nanoseconds
//! ([`monotonic_nanos`](tower_primary::clock::monotonic_nanos)), the clock of the
//! multi-process node events, when the elector runs on the system clock; on a
//! [`Clock::tokio`](tower_primary::Clock::tokio) they are that clock's nanoseconds. The witness stamps
//! `received_at` with `CLOCK_MONOTONIC` (display only).
//!
//! # Protocol
//!
//! One line per write, `write <term> <checked_at> <wall_ns> <deadline|-> <node>`, answered with
//! `accepted` or `rejected <highest term>`; a line that cannot be read is answered with
//! `error <message>` and the connection is closed. A node may hold one connection and send
//! writes one after another.
//!
//! # Examples
//!
//! Two electors on one lock, each writing to one witness while primary:
//!
//! ```
//! use std::time::Duration;
//! use tower_primary_testing::history::History;
//! use tower_primary_testing::witness::{self, Witness};
//! use tower_primary::{Elector, MemoryBackend, NodeId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Witness::start().await?;
//! let backend = MemoryBackend::new();
//! let mut electors = Vec::new();
//! for name in ["a", "b"] {
//!     let elector = Elector::builder("jobs")
//!         .backend(backend.connection())
//!         .node(NodeId::new(name))
//!         .spawn()?;
//!     witness::write_while_primary(&elector, store.addr(), name, Duration::from_millis(2));
//!     electors.push(elector);
//! }
//! store.wait_for(|writes| writes.len() >= 3).await;
//! for elector in electors {
//!     elector.shutdown().await;
//! }
//! // Here the periods come from the writes alone; a multi-process test passes the periods its
//! // nodes reported (`node::history`, on the same clock as the writes).
//! let records = store.records();
//! let history = witness::merge(&History::new(), &records);
//! let report = witness::check(&history, &records);
//! assert!(report.is_ok(), "{report}");
//! assert!(report.accepted >= 3);
//! # Ok(())
//! # }
//! ```

mod judge;
mod protocol;
mod store;
mod writer;

pub use self::judge::{WitnessReport, check, merge};
pub use self::protocol::{Fence, Verdict, WriteRecord};
pub use self::store::Witness;
pub use self::writer::write_while_primary;
