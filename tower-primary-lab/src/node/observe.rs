//! The event log and what it tells: node states and the history of primary periods.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::{Event, EventKind, NodeSignal};
use crate::sync::lock;
use tower_primary_testing::history::{History, Period};

/// The shared, append-only log of events of every node of a [`Cluster`](super::Cluster), in arrival order.
///
/// Events of one node arrive in the order the node printed them; between nodes, compare
/// [`Event::at`].
#[derive(Clone, Debug)]
pub struct EventLog {
    inner: Arc<LogInner>,
}

#[derive(Debug)]
struct LogInner {
    events: Mutex<Vec<Event>>,
    version: watch::Sender<u64>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new()
    }
}

impl EventLog {
    /// An empty log.
    #[must_use]
    pub fn new() -> Self {
        EventLog {
            inner: Arc::new(LogInner {
                events: Mutex::new(Vec::new()),
                version: watch::channel(0).0,
            }),
        }
    }

    /// Appends an event and wakes the waiters.
    pub fn push(&self, event: Event) {
        lock(&self.inner.events).push(event);
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// A copy of the events so far.
    #[must_use]
    pub fn snapshot(&self) -> Vec<Event> {
        lock(&self.inner.events).clone()
    }

    /// Calls `check` on the events so far, then again after every new event, until it returns
    /// `Some`, or `timeout` passes (`None`).
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&[Event]) -> Option<T>,
    ) -> Option<T> {
        let mut version = self.inner.version.subscribe();
        let waiting = async {
            loop {
                version.borrow_and_update();
                if let Some(found) = check(&lock(&self.inner.events)) {
                    return found;
                }
                // The sender lives in `self`: `changed` cannot fail while we wait.
                let _ = version.changed().await;
            }
        };
        tokio::time::timeout(timeout, waiting).await.ok()
    }
}

/// The role a node last reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ObservedRole {
    /// `primary <term>`.
    Primary {
        /// The term.
        term: u64,
    },
    /// `secondary`, knowing a holder of this term (or none).
    Secondary {
        /// The term of the holder it knows of.
        holder_term: Option<u64>,
    },
}

/// What the log says about one node now.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeState {
    /// The process id.
    pub pid: u32,
    /// Neither reaped nor sent `SIGKILL`.
    pub alive: bool,
    /// Sent `SIGSTOP` and not `SIGCONT` since.
    pub stopped: bool,
    /// Sent `SIGTERM` (or `SIGINT`).
    pub terminating: bool,
    /// The role the node last reported, if any.
    pub role: Option<ObservedRole>,
}

/// The state of every node that appears in `events` (see [`NodeState`]), by pid.
#[must_use]
pub fn node_states(events: &[Event]) -> BTreeMap<u32, NodeState> {
    let mut states: BTreeMap<u32, NodeState> = BTreeMap::new();
    for e in events {
        let s = states.entry(e.pid).or_insert(NodeState {
            pid: e.pid,
            alive: true,
            stopped: false,
            terminating: false,
            role: None,
        });
        match e.kind {
            EventKind::Primary { term } => s.role = Some(ObservedRole::Primary { term }),
            EventKind::Secondary { holder_term, .. } => {
                s.role = Some(ObservedRole::Secondary { holder_term });
            }
            EventKind::Released => s.role = Some(ObservedRole::Secondary { holder_term: None }),
            EventKind::Exit { .. } | EventKind::Exited { .. } => {
                s.alive = false;
                s.role = None;
            }
            EventKind::Signalled { signal } => match signal {
                NodeSignal::Kill => {
                    s.alive = false;
                    s.role = None;
                }
                NodeSignal::Stop => s.stopped = true,
                NodeSignal::Cont => s.stopped = false,
                NodeSignal::Term | NodeSignal::Int => s.terminating = true,
            },
            _ => {}
        }
    }
    states
}

/// The primary periods in `events` as a [`History`], one node per pid (the node id is the pid in
/// decimal), times in `CLOCK_MONOTONIC` ns; check it with [`History::check`].
///
/// A period starts at a node's first `primary <t>` or `task-start <t>` (both come after the
/// backend's grant) and ends at the first of: `task-cancelled` (the elector waits for the task
/// before it releases the lock), `secondary`, `released`, `exit`, a `primary` of another term, the
/// parent's `SIGKILL` (timestamped before `kill(2)`) or the reaping. A `SIGSTOP`ped node's period
/// goes on: on the file backend a frozen process still holds its lock (lease backends bound it
/// with their deadline, which these events do not carry).
///
/// # Examples
///
/// ```
/// use tower_primary_lab::node::{Event, history};
///
/// let events: Vec<Event> = [
///     "EVENT 100 7 task-start 1",
///     "EVENT 101 7 primary 1",
///     "EVENT 200 7 signal SIGKILL",
///     "EVENT 250 8 primary 2",
/// ]
/// .iter()
/// .map(|l| Event::parse(l).unwrap())
/// .collect();
/// let h = history(&events);
/// assert_eq!(h.periods().len(), 2);
/// assert_eq!(h.periods()[0].end, Some(200));
/// h.assert_ok();
/// ```
#[must_use]
pub fn history(events: &[Event]) -> History {
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| e.at);
    let mut open: HashMap<u32, Period> = HashMap::new();
    let mut done: Vec<Period> = Vec::new();
    for e in sorted {
        let start_of = match e.kind {
            EventKind::Primary { term } | EventKind::TaskStart { term } => Some(term),
            _ => None,
        };
        let ends = match e.kind {
            EventKind::Secondary { .. }
            | EventKind::TaskCancelled { .. }
            | EventKind::Released
            | EventKind::Exit { .. }
            | EventKind::Exited { .. }
            | EventKind::Signalled {
                signal: NodeSignal::Kill,
            } => true,
            EventKind::Primary { term } | EventKind::TaskStart { term } => {
                open.get(&e.pid).is_some_and(|p| p.term != term)
            }
            _ => false,
        };
        if ends && let Some(p) = open.remove(&e.pid) {
            done.push(p.with_end(e.at));
        }
        if let Some(term) = start_of {
            // A late line of a term that already ended (its `primary` printed after its
            // `task-cancelled`) starts nothing.
            let node = e.pid.to_string();
            let seen = done.iter().any(|p| p.node == node && p.term == term);
            if !seen && !open.contains_key(&e.pid) {
                open.insert(e.pid, Period::new(node, term, e.at));
            }
        }
    }
    done.extend(open.into_values());
    done.sort_by_key(|p| p.start);
    let mut history = History::new();
    for p in done {
        history.push(p);
    }
    history
}

/// The settled cluster's primary (pid, term): exactly one live node is primary, its singleton
/// task has started its term, and every other live, running node reports secondary with that
/// term as its holder's (what [`Cluster::wait_settled`](super::Cluster::wait_settled) waits for).
#[must_use]
pub fn settled_primary(events: &[Event]) -> Option<(u32, u64)> {
    single_primary(events, true).filter(|&(pid, term)| {
        events.iter().any(|e| {
            e.pid == pid && matches!(e.kind, EventKind::TaskStart { term: t } if t == term)
        })
    })
}

pub(super) fn single_primary(events: &[Event], settled: bool) -> Option<(u32, u64)> {
    let states = node_states(events);
    let live: Vec<&NodeState> = states.values().filter(|s| s.alive).collect();
    let primaries: Vec<(u32, u64)> = live
        .iter()
        .filter_map(|s| match s.role {
            Some(ObservedRole::Primary { term }) => Some((s.pid, term)),
            _ => None,
        })
        .collect();
    let [(pid, term)] = primaries[..] else {
        return None;
    };
    let others_ok = live
        .iter()
        .filter(|s| s.pid != pid && !s.stopped)
        .all(|s| match s.role {
            Some(ObservedRole::Secondary { holder_term }) => !settled || holder_term == Some(term),
            None | Some(ObservedRole::Primary { .. }) => false,
        });
    others_ok.then_some((pid, term))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: u64, pid: u32, kind: EventKind) -> Event {
        Event { at, pid, kind }
    }

    #[test]
    fn periods_end_at_cancel_kill_or_exit_and_overlaps_are_found() {
        let events = [
            ev(1, 10, EventKind::Spawned),
            ev(2, 11, EventKind::Spawned),
            ev(5, 10, EventKind::TaskStart { term: 1 }),
            ev(6, 10, EventKind::Primary { term: 1 }),
            ev(
                8,
                10,
                EventKind::Signalled {
                    signal: NodeSignal::Stop,
                },
            ),
            ev(
                20,
                10,
                EventKind::Signalled {
                    signal: NodeSignal::Kill,
                },
            ),
            ev(21, 11, EventKind::Primary { term: 2 }),
            ev(30, 11, EventKind::TaskCancelled { term: 2 }),
            ev(
                31,
                11,
                EventKind::Secondary {
                    holder_term: None,
                    holder_pid: None,
                },
            ),
            ev(29, 12, EventKind::Primary { term: 3 }),
        ];
        let history = history(&events);
        let periods: Vec<_> = history
            .periods()
            .iter()
            .map(|p| (p.node.as_str(), p.term, p.start, p.end))
            .collect();
        assert_eq!(
            periods,
            [
                ("10", 1, 5, Some(20)),
                ("11", 2, 21, Some(30)),
                ("12", 3, 29, None),
            ]
        );
        let report = history.check();
        assert_eq!(report.overlaps.len(), 1);
        assert_eq!(report.overlaps[0].length, Duration::from_nanos(1));

        let states = node_states(&events);
        assert!(!states[&10].alive);
        assert_eq!(
            states[&11].role,
            Some(ObservedRole::Secondary { holder_term: None })
        );
        assert_eq!(single_primary(&events, false), Some((12, 3)));
    }

    #[test]
    fn a_late_primary_line_of_an_ended_term_starts_nothing() {
        let events = [
            ev(5, 10, EventKind::TaskStart { term: 1 }),
            ev(6, 10, EventKind::TaskCancelled { term: 1 }),
            ev(7, 10, EventKind::Primary { term: 1 }),
            ev(
                8,
                10,
                EventKind::Secondary {
                    holder_term: None,
                    holder_pid: None,
                },
            ),
            ev(9, 11, EventKind::Primary { term: 2 }),
        ];
        let history = history(&events);
        assert_eq!(history.periods().len(), 2);
        history.assert_ok();
    }
}
