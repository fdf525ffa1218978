//! Singleton schedules and run-once jobs, on top of [singleton tasks](crate::Elector::singleton_task)
//! and the [state API](crate::Elector::state).
//!
//! - [`Elector::schedule`](crate::Elector::schedule) runs a job every interval or on a cron
//!   expression ([`Schedule`]), only on the primary. The first primary to run a job records the
//!   first slot it is responsible for (the first slot after it took the job on); from then on
//!   the last completed slot is stored with the term guard, so a slot runs at least once — the
//!   very first one included — and by one term at a time, and runs again only if the term running
//!   it ended before recording completion. A new primary handles the slots that passed without a
//!   primary by the [`Missed`] policy. Each [`Run`] carries its slot and term, for idempotency
//!   keys and fenced writes. [`ScheduleHandle::run_now`] queues extra runs, at most
//!   [`Schedule::queue`] of them ([`RunNowError::Full`] beyond).
//! - [`Elector::run_once`](crate::Elector::run_once) runs a job (migrations, say) to completion
//!   once per version, on whichever node is primary; every node can [wait](RunOnce::wait) for it.
//!
//! Neither is exactly-once: a primary that dies mid-run leaves the run half done and the next
//! primary runs it again. Make jobs idempotent ([`Run::idempotency_key`]) and fence their writes
//! with the term.
//!
//! # Slots, time zones and daylight-saving time
//!
//! Every slot is an instant. An interval's slots are multiples of the interval since the Unix epoch.
//! A cron expression is read on the wall clock of its [time zone](Schedule::timezone), and where
//! that clock jumps:
//!
//! - an expression whose hour field is `*` (a minute or second pattern such as
//!   `0 */15 * * * *`, or hourly `0 0 * * * *`) runs at every instant of real time whose local
//!   time matches: in the hour that repeats when clocks fall back it runs again, and the hour
//!   skipped when they spring forward has no such instant;
//! - any other expression names fixed local times: a time that does not exist (skipped when
//!   clocks spring forward) runs at the first instant after the gap, once however many times of
//!   the gap match; a time that exists twice (clocks fall back) runs once, at its first
//!   occurrence.
//!
//! Catch-up after an outage walks back from now, so [`Missed::CatchUpLatest`] costs one step
//! however long the outage, and [`Missed::CatchUpAll`] at most [`Missed::MAX_CATCH_UP`] steps. A
//! search for the next slot is bounded too: cron years end at 2100.

mod job;
mod once;
mod spec;

pub use self::job::{Run, RunNowError, ScheduleHandle};
pub use self::once::RunOnce;
pub use self::spec::{Missed, Schedule};
