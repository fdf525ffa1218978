//! Singleton schedules and run-once jobs, on top of [singleton tasks](crate::Elector::singleton_task)
//! and the [state API](crate::Elector::state).
//!
//! - [`Elector::schedule`](crate::Elector::schedule) runs a job every interval or on a cron
//!   expression ([`Schedule`]), only on the primary. The last completed slot is stored with the
//!   term guard, so a slot runs at least once and by one term at a time, and runs again only if the
//!   term running it ended before recording completion. A new primary handles the slots that passed
//!   without a primary by the [`Missed`] policy. Each [`Run`] carries its slot and term, for
//!   idempotency keys and fenced writes.
//! - [`Elector::run_once`](crate::Elector::run_once) runs a job (migrations, say) to completion
//!   once per version, on whichever node is primary; every node can [wait](RunOnce::wait) for it.
//!
//! Neither is exactly-once: a primary that dies mid-run leaves the run half done and the next
//! primary runs it again. Make jobs idempotent ([`Run::idempotency_key`]) and fence their writes
//! with the term.

mod job;
mod once;
mod spec;

pub use self::job::{Run, RunNowError, ScheduleHandle};
pub use self::once::RunOnce;
pub(crate) use self::spec::Since;
pub use self::spec::{Missed, Schedule};
