//! The stuck-primary watchdog behind `/health/live`.
//!
//! The elector's campaign loop stamps a heartbeat on every iteration and at least every quarter
//! of the [liveness bound](crate::ElectorBuilder::liveness_bound), so an idle, healthy loop stays
//! fresh. A wait the elector planned for is stamped ahead: the step-down's wait for tasks and
//! in-flight requests, and the wait for aborted tasks to stop, are each due within the grace. The
//! loop counts as stuck when it has made no progress for longer than the bound past its last stamp:
//! a loop that stopped running (a runtime starved by blocking code), a step-down or a task abort
//! that did not finish within the grace (a task blocking its thread cannot be aborted, and the lock
//! is not released while it runs), or a release the backend does not answer.
//!
//! A process in that state holds its lock without acting on it, and on backends without a lease
//! (file, PostgreSQL) it holds it until it exits: `/health/live` answers 503 so that an
//! orchestrator restarts it.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

/// What the campaign loop is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Campaigning or holding a term.
    Running = 0,
    /// Leaving a term: waiting for tasks and in-flight requests, up to the grace.
    SteppingDown = 1,
    /// Waiting for aborted tasks to stop.
    AbortingTasks = 2,
    /// Waiting for the backend to release the lock.
    Releasing = 3,
    /// The loop has ended on purpose (shutdown, or a loss with `exit_on_loss`).
    Stopped = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Phase::SteppingDown,
            2 => Phase::AbortingTasks,
            3 => Phase::Releasing,
            4 => Phase::Stopped,
            _ => Phase::Running,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::SteppingDown => "stepping-down",
            Phase::AbortingTasks => "aborting-tasks",
            Phase::Releasing => "releasing",
            Phase::Stopped => "stopped",
        }
    }
}

const UNSUPERVISED: u64 = u64::MAX;

/// The heartbeat of one elector's loop. Lock-free: the health handler reads it without waiting.
#[derive(Debug)]
pub(crate) struct Watchdog {
    /// The liveness bound in nanoseconds; `UNSUPERVISED` for handles without an elector.
    bound: AtomicU64,
    grace: AtomicU64,
    /// The last progress, or the due time of a planned wait, on the elector's clock.
    beat: AtomicU64,
    phase: AtomicU8,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Watchdog {
    /// A watchdog that always reports live (fixed handles, an elector not spawned yet).
    pub(crate) fn unsupervised() -> Self {
        Watchdog {
            bound: AtomicU64::new(UNSUPERVISED),
            grace: AtomicU64::new(0),
            beat: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::Running as u8),
        }
    }

    /// Starts supervising a loop that may go `bound` without progress, and leaves terms within
    /// `grace`.
    pub(crate) fn supervise(&self, bound: Duration, grace: Duration, now: Timestamp) {
        self.grace.store(nanos(grace), Ordering::Relaxed);
        self.beat(now);
        self.bound
            .store(nanos(bound).min(UNSUPERVISED - 1), Ordering::Release);
    }

    /// The loop made progress at `now`.
    pub(crate) fn beat(&self, now: Timestamp) {
        self.enter(Phase::Running, now.as_nanos());
    }

    /// The loop starts a planned wait that is due within the grace.
    pub(crate) fn wait_within_grace(&self, phase: Phase, now: Timestamp) {
        let grace = Duration::from_nanos(self.grace.load(Ordering::Relaxed));
        self.enter(phase, now.saturating_add(grace).as_nanos());
    }

    /// The loop starts waiting on the backend, which should answer within the bound.
    pub(crate) fn wait_on_backend(&self, phase: Phase, now: Timestamp) {
        self.enter(phase, now.as_nanos());
    }

    /// The loop has ended on purpose.
    pub(crate) fn stop(&self) {
        self.phase.store(Phase::Stopped as u8, Ordering::Release);
    }

    fn enter(&self, phase: Phase, beat: u64) {
        // The beat first: a reader that sees the new phase sees its beat too.
        self.beat.store(beat, Ordering::Release);
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// The liveness of the loop at `now`.
    pub(crate) fn check(&self, lock: &str, now: Timestamp) -> Liveness {
        let phase = Phase::from_u8(self.phase.load(Ordering::Acquire));
        let beat = Timestamp::from_nanos(self.beat.load(Ordering::Acquire));
        let bound = self.bound.load(Ordering::Acquire);
        let since = now.saturating_duration_since(beat);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if bound == UNSUPERVISED {
            return Liveness {
                live: true,
                lock: lock.to_owned(),
                phase: phase.as_str().to_owned(),
                since_progress_ms: 0,
                bound_ms: None,
                reason: None,
            };
        }
        let bound = Duration::from_nanos(bound);
        let grace = Duration::from_nanos(self.grace.load(Ordering::Relaxed));
        let live = phase == Phase::Stopped || since <= bound;
        let reason = (!live).then(|| match phase {
            Phase::Running | Phase::Stopped => {
                format!("the elector's loop has made no progress for {since:?} (bound {bound:?})")
            }
            Phase::SteppingDown => format!(
                "the step-down has not finished {since:?} after its grace ({grace:?}) ran out"
            ),
            Phase::AbortingTasks => format!(
                "aborted singleton tasks have not stopped {since:?} after the grace ({grace:?}) \
                 ran out (does a task block its thread?); the lock is kept until they do"
            ),
            Phase::Releasing => format!(
                "the backend has not answered the release of the lock for {since:?} \
                 (bound {bound:?})"
            ),
        });
        Liveness {
            live,
            lock: lock.to_owned(),
            phase: phase.as_str().to_owned(),
            since_progress_ms: ms(since),
            bound_ms: Some(ms(bound)),
            reason,
        }
    }
}

/// Whether an elector's campaign loop is making progress: the body of `/health/live` (see
/// [`health::live`](crate::http::health) and the [`watchdog`](crate::ElectorBuilder::liveness_bound)).
///
/// Get it from [`RoleHandle::liveness`](crate::RoleHandle::liveness).
///
/// ```json
/// {"live": false, "lock": "report-scheduler", "phase": "aborting-tasks",
///  "since_progress_ms": 10250, "bound_ms": 10000,
///  "reason": "aborted singleton tasks have not stopped 10.25s after the grace (5s) ran out ..."}
/// ```
///
/// # Examples
///
/// ```
/// use tower_primary::{Role, RoleHandle};
///
/// // A handle without an elector is never stuck.
/// let live = RoleHandle::fixed(Role::Starting).liveness();
/// assert!(live.is_live());
/// assert_eq!(live.phase, "running");
/// assert_eq!(live.bound_ms, None);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Liveness {
    /// Whether the loop is making progress (always `true` once it has stopped on purpose).
    pub live: bool,
    /// The lock name.
    pub lock: String,
    /// What the loop is doing: `running` (campaigning or holding a term), `stepping-down` (waiting
    /// for tasks and in-flight requests, up to the grace), `aborting-tasks`, `releasing`, or
    /// `stopped`.
    pub phase: String,
    /// How long the loop has gone without progress; 0 within a planned wait (a step-down's grace).
    pub since_progress_ms: u64,
    /// The liveness bound; `None` for a handle without an elector.
    pub bound_ms: Option<u64>,
    /// Why the loop is not live.
    pub reason: Option<String>,
}

impl Liveness {
    /// Whether the loop is making progress.
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_nanos(1).saturating_add(S * u32::try_from(secs).unwrap())
    }

    #[test]
    fn a_fresh_heartbeat_is_live_and_a_stale_one_is_not() {
        let w = Watchdog::unsupervised();
        assert!(w.check("l", at(1_000)).live, "unsupervised is always live");
        w.supervise(10 * S, 5 * S, at(0));
        assert!(w.check("l", at(10)).live);
        let stale = w.check("l", at(11));
        assert!(!stale.live);
        assert_eq!(stale.phase, "running");
        assert_eq!(stale.since_progress_ms, 11_000);
        assert_eq!(stale.bound_ms, Some(10_000));
        assert!(stale.reason.unwrap().contains("no progress"));
        w.beat(at(11));
        assert!(w.check("l", at(11)).live);
    }

    #[test]
    fn a_planned_wait_is_due_within_the_grace_then_the_bound() {
        let w = Watchdog::unsupervised();
        w.supervise(2 * S, 5 * S, at(0));
        w.wait_within_grace(Phase::SteppingDown, at(1));
        // Due at 1 + 5; stuck once the bound has passed beyond that.
        let during = w.check("l", at(8));
        assert!(during.live, "{during:?}");
        assert_eq!(during.since_progress_ms, 2_000);
        let late = w.check("l", at(9));
        assert!(!late.live);
        assert_eq!(late.phase, "stepping-down");
        assert!(late.reason.unwrap().contains("step-down"));

        w.wait_within_grace(Phase::AbortingTasks, at(9));
        assert!(w.check("l", at(16)).live);
        let wedged = w.check("l", at(17));
        assert!(!wedged.live);
        assert!(wedged.reason.unwrap().contains("aborted singleton tasks"));

        // A release is a backend call: due within the bound, not the grace.
        w.wait_on_backend(Phase::Releasing, at(20));
        assert!(w.check("l", at(22)).live);
        let hung = w.check("l", at(23));
        assert!(!hung.live);
        assert_eq!(hung.phase, "releasing");

        w.stop();
        let stopped = w.check("l", at(1_000));
        assert!(stopped.live, "a loop that ended on purpose is not stuck");
        assert_eq!(stopped.phase, "stopped");
    }
}
