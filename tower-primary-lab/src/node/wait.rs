//! Waiting on the cluster's events: a single primary, a handover, an exit.

use std::fmt;
use std::time::Duration;

use super::observe::{settled_primary, single_primary};
use super::{Cluster, Event, EventKind, NodeSignal};

/// A wait on a [`Cluster`] that timed out. Its `Display` (and `Debug`) lists every event and the
/// last stderr lines of every node, so a failed test shows what happened.
pub struct WaitError {
    what: String,
    timeout: Duration,
    dump: String,
}

impl WaitError {
    /// What was awaited.
    #[must_use]
    pub fn what(&self) -> &str {
        &self.what
    }
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}\n{}",
            self.timeout, self.what, self.dump
        )
    }
}

impl fmt::Debug for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for WaitError {}

/// A primary's end and its successor, from [`Cluster::kill_primary`] or
/// [`Cluster::terminate_primary`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Succession {
    /// The old primary's pid.
    pub old: u32,
    /// The old primary's term.
    pub term: u64,
    /// When the signal was sent (`CLOCK_MONOTONIC` ns).
    pub signalled_at: u64,
    /// The successor's `primary` event: its pid, its term (above [`term`](Self::term)) and
    /// when it became primary.
    pub next: Event,
}

/// A graceful handover, from [`Cluster::terminate_primary`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Handover {
    /// Who handed over to whom.
    pub succession: Succession,
    /// When the old primary's task saw its term end (`CLOCK_MONOTONIC` ns).
    pub cancelled: u64,
    /// When the old primary's shutdown returned, the lock released (`CLOCK_MONOTONIC` ns).
    pub released: u64,
}

impl Cluster {
    /// Waits until `check` returns `Some` on the events (re-checked after every new event).
    ///
    /// # Errors
    ///
    /// [`WaitError`] naming `what`, with a dump of the events, after `timeout`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut(&[Event]) -> Option<T>,
    ) -> Result<T, WaitError> {
        match self.log.wait_for(timeout, check).await {
            Some(found) => Ok(found),
            None => Err(WaitError {
                what: what.to_owned(),
                timeout,
                dump: self.dump(),
            }),
        }
    }

    /// Waits for the first event (in arrival order) that matches `pred`.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event, WaitError> {
        self.wait_for(what, timeout, |events| {
            events.iter().find(|e| pred(e)).cloned()
        })
        .await
    }

    /// Waits until exactly one live node reports primary and every other live, running node has
    /// reported a role; returns the primary's pid and term.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_single_primary(&self, timeout: Duration) -> Result<(u32, u64), WaitError> {
        self.wait_for("exactly one primary", timeout, |events| {
            single_primary(events, false)
        })
        .await
    }

    /// Like [`wait_single_primary`](Self::wait_single_primary), and every other live, running
    /// node reports secondary with the primary's term as its holder's, and the primary's
    /// singleton task has started its term: the cluster has settled, and a fault injected now
    /// hits a running task.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_settled(&self, timeout: Duration) -> Result<(u32, u64), WaitError> {
        self.wait_for(
            "exactly one primary, known to every secondary, its task started",
            timeout,
            settled_primary,
        )
        .await
    }

    /// Waits for a `primary` event with a term above `term` from a node other than `except`.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_primary_after(
        &self,
        term: u64,
        except: u32,
        timeout: Duration,
    ) -> Result<Event, WaitError> {
        self.wait_event(
            &format!("a primary with a term above {term} other than pid {except}"),
            timeout,
            |e| e.pid != except && matches!(e.kind, EventKind::Primary { term: t } if t > term),
        )
        .await
    }

    /// Waits for a `task-start` event with a term above `term` from a node other than `except`:
    /// the first moment the successor's singleton work runs.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_task_start_after(
        &self,
        term: u64,
        except: u32,
        timeout: Duration,
    ) -> Result<Event, WaitError> {
        self.wait_event(
            &format!("a task start with a term above {term} other than pid {except}"),
            timeout,
            |e| e.pid != except && matches!(e.kind, EventKind::TaskStart { term: t } if t > term),
        )
        .await
    }

    /// Waits until node `pid` has been reaped; returns its exit code and the signal that ended
    /// it, if any.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_exit(
        &self,
        pid: u32,
        timeout: Duration,
    ) -> Result<(Option<i32>, Option<i32>), WaitError> {
        self.wait_for(&format!("pid {pid} to exit"), timeout, |events| {
            events.iter().find_map(|e| match e.kind {
                EventKind::Exited { code, signal } if e.pid == pid => Some((code, signal)),
                _ => None,
            })
        })
        .await
    }

    /// Kills (`SIGKILL`) every node still alive and waits until they are reaped.
    ///
    /// # Errors
    ///
    /// [`WaitError`] when a node was not reaped within `timeout`.
    pub async fn kill_all(&self, timeout: Duration) -> Result<(), WaitError> {
        let alive: Vec<u32> = self
            .states()
            .values()
            .filter(|s| s.alive)
            .map(|s| s.pid)
            .collect();
        for pid in &alive {
            let _ = self.signal(*pid, NodeSignal::Kill).await;
        }
        for pid in alive {
            self.wait_exit(pid, timeout).await?;
        }
        Ok(())
    }

    /// The first event of node `pid` at or after `after` (`CLOCK_MONOTONIC` ns) whose kind
    /// matches `pred`.
    #[must_use]
    pub fn first_event(
        &self,
        pid: u32,
        after: u64,
        pred: impl Fn(&EventKind) -> bool,
    ) -> Option<Event> {
        self.log
            .snapshot()
            .into_iter()
            .find(|e| e.pid == pid && e.at >= after && pred(&e.kind))
    }

    /// A scenario every backend's process tests share: in a [settled](Self::wait_settled)
    /// cluster, `SIGKILL` the primary. Exactly one other node succeeds it with a higher term —
    /// the history holds the old period and the new one, without overlap — and the cluster
    /// settles on it.
    ///
    /// # Panics
    ///
    /// When a step does not happen within `timeout` or a check fails, with [`dump`](Self::dump).
    pub async fn kill_primary(&self, timeout: Duration) -> Succession {
        let s = self.succession(NodeSignal::Kill, timeout).await;
        let exit = self.wait_exit(s.old, timeout).await;
        self.ensure(matches!(exit, Ok((None, Some(9)))), || {
            format!("pid {} did not die of SIGKILL: {exit:?}", s.old)
        });
        let holders: Vec<(String, u64)> = self
            .history()
            .periods()
            .iter()
            .filter(|p| p.term >= s.term)
            .map(|p| (p.node.clone(), p.term))
            .collect();
        let successor = (s.next.pid.to_string(), s.next.term().unwrap_or_default());
        self.ensure(holders == [(s.old.to_string(), s.term), successor], || {
            format!("expected the killed primary's period, then one successor's: {holders:?}")
        });
        self.assert_history_ok();
        s
    }

    /// A scenario every backend's process tests share: in a [settled](Self::wait_settled)
    /// cluster, `SIGTERM` the primary. It winds its term down (its task sees the term end after
    /// the signal and before anyone else is primary), releases, and exits with 0; one other
    /// node succeeds it with a higher term, the cluster settles on it, and no periods overlap.
    ///
    /// # Panics
    ///
    /// When a step does not happen within `timeout` or a check fails, with [`dump`](Self::dump).
    pub async fn terminate_primary(&self, timeout: Duration) -> Handover {
        let succession = self.succession(NodeSignal::Term, timeout).await;
        let (old, term) = (succession.old, succession.term);
        let exit = self.wait_exit(old, timeout).await;
        self.ensure(matches!(exit, Ok((Some(0), None))), || {
            format!("pid {old} did not exit with 0 after SIGTERM: {exit:?}")
        });
        let at = |what: &str, pred: &dyn Fn(&EventKind) -> bool| match self.first_event(
            old,
            succession.signalled_at,
            pred,
        ) {
            Some(e) => e.at,
            None => panic!("pid {old} logged no {what} after SIGTERM\n{}", self.dump()),
        };
        let cancelled = at(
            "task-cancelled",
            &|k| matches!(k, EventKind::TaskCancelled { term: t } if *t == term),
        );
        let released = at("released", &|k| matches!(k, EventKind::Released));
        self.ensure(
            cancelled < succession.next.at && cancelled <= released,
            || {
                "the old primary's task did not end before its successor became primary and it \
             released"
                    .to_owned()
            },
        );
        self.assert_history_ok();
        Handover {
            succession,
            cancelled,
            released,
        }
    }

    /// Signals the primary of the settled cluster, waits for a successor with a higher term and
    /// for the cluster to settle on it.
    async fn succession(&self, signal: NodeSignal, timeout: Duration) -> Succession {
        let (old, term) = self
            .wait_settled(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let signalled_at = self
            .signal(old, signal)
            .await
            .unwrap_or_else(|e| panic!("cannot signal pid {old}: {e}\n{}", self.dump()));
        let next = self
            .wait_primary_after(term, old, timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (new, new_term) = self
            .wait_settled(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.ensure(
            (new, Some(new_term)) == (next.pid, next.term())
                && new_term > term
                && next.at > signalled_at,
            || format!("settled on pid {new} term {new_term}, after {next} replaced term {term}"),
        );
        Succession {
            old,
            term,
            signalled_at,
            next,
        }
    }

    fn ensure(&self, cond: bool, what: impl FnOnce() -> String) {
        assert!(cond, "{}\n{}", what(), self.dump());
    }
}
