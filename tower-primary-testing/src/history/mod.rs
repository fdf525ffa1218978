//! The history checker: record every primary period of one lock, then check that no two overlap
//! and that terms rise.
//!
//! A [`History`] holds [`Period`]s — a node, its term, a start, and an end — and optionally the
//! writes nodes made to a fenced witness. [`History::check`] returns a [`Report`]: every pair of
//! overlapping periods and the total overlap, every period whose term did not rise above the
//! terms of the periods that started before it, the longest gap without a primary, and the
//! fenced-witness writes that a downstream store should have refused.
//!
//! # Time
//!
//! Times are `u64` nanoseconds on **one clock shared by every recorder of a history**:
//! [`Clock::system`](tower_primary::Clock::system)`.now().as_nanos()` (`CLOCK_BOOTTIME`, comparable
//! between the processes of one host), or [`monotonic_nanos`](tower_primary::clock::monotonic_nanos)
//! (`CLOCK_MONOTONIC`), or one [`Clock::tokio`](tower_primary::Clock::tokio) value under tokio's paused
//! clock. Never mix clocks in one history.
//!
//! # Ends and deadlines
//!
//! A period ends at its reported end or at its **deadline**, whichever comes first:
//! on a lease backend a primary stops acting at its deadline even when it never gets to report
//! it (a paused or killed process). A period with neither end nor deadline is *open* and counts
//! as lasting forever: any later period of another node overlaps it. Periods are half-open
//! intervals, so a period that starts exactly when another ends does not overlap it.
//!
//! # Recording
//!
//! - by hand: [`History::start`], [`History::end`], [`History::extend_deadline`],
//!   [`History::write`], or whole [`Period`]s with [`History::push`];
//! - from [`Event`]s, e.g. lines printed by the processes of a multi-process test
//!   ([`History::parse`], [`History::from_events`]);
//! - from live electors: [`Recorder::track`] (in process) or [`track`] with your own sink (print
//!   the events, parse them in the test).
//!
//! One history is about one lock name.
//!
//! # Examples
//!
//! ```
//! use tower_primary_testing::history::History;
//!
//! // node event term time, as printed by the nodes of a multi-process test
//! let history = History::parse(
//!     "a primary 1 1000
//!      a secondary 1 2000
//!      b primary 2 1500
//!      b secondary 2 3000",
//! )
//! .unwrap();
//! let report = history.check();
//! assert!(!report.is_ok());
//! assert_eq!(report.overlaps.len(), 1);
//! assert_eq!(report.total_overlap.as_nanos(), 500);
//! ```
//!
//! Recording the periods of live electors:
//!
//! ```
//! use tower_primary_testing::history::Recorder;
//! use tower_primary::{Elector, MemoryBackend, NodeId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_primary::Error> {
//! let recorder = Recorder::new();
//! let backend = MemoryBackend::new();
//! let a = Elector::builder("jobs").backend(backend.clone()).node(NodeId::new("a")).spawn()?;
//! recorder.track(&a);
//! let b = Elector::builder("jobs").backend(backend.connection()).node(NodeId::new("b")).spawn()?;
//! recorder.track(&b);
//!
//! a.handle().wait_primary().await;
//! a.shutdown().await;
//! b.handle().wait_primary().await;
//! b.shutdown().await;
//!
//! let history = recorder.history();
//! assert_eq!(history.periods().len(), 2);
//! history.assert_ok();
//! # Ok(())
//! # }
//! ```

mod build;
mod check;
mod event;
mod period;
mod recorder;

pub use self::check::{Gap, Overlap, Report, StaleWrite, TermRegression};
pub use self::event::{Event, EventKind, ParseError};
pub use self::period::{Period, Write};
pub use self::recorder::{Recorder, track};

use serde::{Deserialize, Serialize};

/// The primary periods (and fenced-witness writes) of one lock. See the [module docs](self).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    periods: Vec<Period>,
    writes: Vec<Write>,
}
