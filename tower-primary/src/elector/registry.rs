//! The candidate registry as the elector keeps it: this node's registration, the live entries it
//! reads (published to [`RoleHandle::candidates`](crate::RoleHandle::candidates)), since when
//! each has been seen ready, and the choice of a handover target.
//!
//! Readiness is timed on this node's clock from when it first read an entry as ready: never by
//! comparing two hosts' clocks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, watch};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::TARGET;
use super::campaign::maybe;
use crate::backend::{Changes, Lease, Lock, Registration};
use crate::backoff::Backoff;
use crate::error::{Chain, Error, HandOverRefusal};
use crate::role::{Candidate, Shared};

/// A live entry, and since when this node has seen it ready (`None`: not ready).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Seen {
    pub(super) entry: Candidate,
    pub(super) ready_since: Option<Instant>,
}

/// The registry as read, and the latest request for a read that this read began after.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    pub(super) covers: u64,
    pub(super) seen: Vec<Seen>,
}

/// Requests for a read of the registry: a counter, and the follower's wake-up.
#[derive(Debug, Default)]
struct Pokes {
    count: AtomicU64,
    notify: Notify,
}

/// The registry follower of one elector: ends with it.
pub(super) struct Registry {
    pub(super) seen: watch::Receiver<Snapshot>,
    /// Asks the follower to read the registry now.
    poke: Arc<Pokes>,
    registration: Arc<Mutex<Option<Box<dyn Registration>>>>,
    _task: AbortOnDropHandle<()>,
}

impl Registry {
    /// Registers this node and follows the registry, re-reading it at least every `refresh`.
    pub(super) fn spawn(
        runtime: &tokio::runtime::Handle,
        lock: Arc<dyn Lock>,
        shared: Arc<Shared>,
        lease: Option<Lease>,
        refresh: Duration,
    ) -> Registry {
        let (tx, seen) = watch::channel(Snapshot::default());
        let registration = Arc::new(Mutex::new(None));
        let poke = Arc::new(Pokes::default());
        let task = runtime.spawn(follow(
            lock,
            shared,
            lease,
            refresh,
            registration.clone(),
            tx,
            poke.clone(),
        ));
        Registry {
            seen,
            poke,
            registration,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Asks for a read of the registry that begins now: the snapshot of that read (or of a
    /// later one) has `covers` at least the number returned.
    pub(super) fn read_now(&self) -> u64 {
        let n = self.poke.count.fetch_add(1, Ordering::SeqCst) + 1;
        self.poke.notify.notify_one();
        n
    }

    /// Writes this node's entry now (before a release that must find it written).
    pub(super) async fn update_now(&self, entry: Candidate) -> Result<(), Error> {
        match &*self.registration.lock().await {
            Some(r) => r.update(entry).await,
            None => Ok(()),
        }
    }
}

async fn follow(
    lock: Arc<dyn Lock>,
    shared: Arc<Shared>,
    lease: Option<Lease>,
    refresh: Duration,
    registration: Arc<Mutex<Option<Box<dyn Registration>>>>,
    tx: watch::Sender<Snapshot>,
    poke: Arc<Pokes>,
) {
    let mut own = shared.entry.subscribe();
    let mut changes: Option<Box<dyn Changes>> = None;
    let mut ready_since: HashMap<String, Instant> = HashMap::new();
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        refresh.max(Duration::from_millis(100)),
    );
    let mut failing = false;
    loop {
        let mut errors: Vec<(&str, Error)> = Vec::new();
        {
            let mut reg = registration.lock().await;
            if reg.is_none() {
                let entry = own.borrow_and_update().clone();
                match lock.register(entry, lease).await {
                    Ok(r) => *reg = Some(r),
                    Err(e) => errors.push(("register this node", e)),
                }
            }
        }
        if changes.is_none() {
            match lock.watch_candidates().await {
                Ok(c) => changes = Some(c),
                Err(e) => errors.push(("watch", e)),
            }
        }
        let covers = poke.count.load(Ordering::SeqCst);
        match lock.candidates().await {
            Ok(list) => {
                let now = Instant::now();
                ready_since.retain(|node, _| list.iter().any(|c| c.node == *node && c.ready));
                let seen: Vec<Seen> = list
                    .iter()
                    .map(|c| Seen {
                        entry: c.clone(),
                        ready_since: c
                            .ready
                            .then(|| *ready_since.entry(c.node.clone()).or_insert(now)),
                    })
                    .collect();
                // The elector's snapshot first: whoever reads the role's list and then asks the
                // elector finds the elector knowing as much.
                tx.send_replace(Snapshot { covers, seen });
                shared.set_candidates(list);
            }
            Err(e) => errors.push(("read", e)),
        }
        let mut retry_at = Instant::now() + refresh;
        if errors.is_empty() {
            failing = false;
            backoff.reset();
        } else {
            if !failing {
                for (what, e) in &errors {
                    if e.misconfiguration().is_some() {
                        // The campaign reports a misconfiguration (at ERROR, once per cause).
                        tracing::debug!(target: TARGET, lock = %shared.lock, node = %shared.node, error = %Chain(e), "candidate registry: cannot {what}; retrying");
                    } else {
                        tracing::warn!(target: TARGET, lock = %shared.lock, node = %shared.node, error = %Chain(e), "candidate registry: cannot {what}; retrying");
                    }
                }
            }
            failing = true;
            retry_at = retry_at.min(Instant::now() + backoff.next_delay());
        }
        tokio::select! {
            changed = own.changed() => {
                if changed.is_err() {
                    return;
                }
                let entry = own.borrow_and_update().clone();
                let mut reg = registration.lock().await;
                if let Some(r) = reg.as_ref()
                    && let Err(e) = r.update(entry).await
                {
                    tracing::warn!(target: TARGET, lock = %shared.lock, node = %shared.node, error = %Chain(&e), "candidate registry: cannot update this node's entry; registering again");
                    *reg = None;
                }
            }
            changed = maybe_changed(&mut changes) => {
                if changed.is_err() {
                    changes = None;
                }
            }
            () = poke.notify.notified() => {}
            () = tokio::time::sleep_until(retry_at) => {}
        }
    }
}

async fn maybe_changed(changes: &mut Option<Box<dyn Changes>>) -> Result<(), Error> {
    let mut fut = changes.as_mut().map(|c| c.changed());
    maybe(&mut fut).await
}

/// What the primary should do about the registry now.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Choice {
    /// Hand over to this node.
    pub(super) target: Option<String>,
    /// Look again then: a candidate that would be a target once it has settled.
    pub(super) recheck_at: Option<Instant>,
}

/// The handover target of a primary whose own entry is `me`:
/// - draining: the best eligible other candidate (highest priority, then ready longest), settled
///   or not: a draining primary wants out;
/// - else: the best eligible candidate whose priority is strictly higher than this node's (its
///   registry entry's: a host group's is its best member's) that has been ready for `settle`
///   and did not hand the lock away on request (`yielded`); while any node is `yielded` (an
///   operator moved the lock), no preferred handover at all.
///
/// Nodes in `shunned` (they did not take the lock handed to them) are never preferred, and a
/// draining primary takes one only when nobody else is eligible. Nodes in `suspects` (the
/// holder this term followed, perhaps dead) are never preferred.
pub(super) fn choose(
    me: &Candidate,
    seen: &[Seen],
    now: Instant,
    settle: Duration,
    shunned: &HashMap<String, Instant>,
    suspects: &HashMap<String, Instant>,
) -> Choice {
    let mut others: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.entry.node != me.node && s.entry.is_eligible())
        .collect();
    others.sort_by(|a, b| {
        let a_shunned = shunned.contains_key(&a.entry.node);
        let b_shunned = shunned.contains_key(&b.entry.node);
        a_shunned
            .cmp(&b_shunned)
            .then(b.entry.priority.cmp(&a.entry.priority))
            .then(a.ready_since.cmp(&b.ready_since))
            .then(a.entry.node.cmp(&b.entry.node))
    });
    if me.draining {
        return Choice {
            target: others.first().map(|s| s.entry.node.clone()),
            recheck_at: None,
        };
    }
    if seen
        .iter()
        .any(|s| s.entry.node != me.node && s.entry.yielded)
    {
        // An operator moved the lock (`hand_over_to`): it stays where they put it while the node
        // that handed it over lives and does not lead again.
        return Choice {
            target: None,
            recheck_at: None,
        };
    }
    let mine = seen
        .iter()
        .find(|s| s.entry.node == me.node)
        .map_or(me.priority, |s| s.entry.priority.max(me.priority));
    let mut recheck_at: Option<Instant> = None;
    for s in others {
        if s.entry.priority <= mine
            || s.entry.yielded
            || shunned.contains_key(&s.entry.node)
            || suspects.contains_key(&s.entry.node)
        {
            continue;
        }
        let settled_at = s.ready_since.map_or(now, |since| since + settle);
        if settled_at <= now {
            return Choice {
                target: Some(s.entry.node.clone()),
                recheck_at: None,
            };
        }
        recheck_at = Some(recheck_at.map_or(settled_at, |r| r.min(settled_at)));
    }
    Choice {
        target: None,
        recheck_at,
    }
}

/// Whether `node` may be handed the lock on request, by a primary whose node id is `me`.
pub(super) fn directed(me: &str, node: &str, seen: &[Seen]) -> Result<(), HandOverRefusal> {
    if node == me {
        return Err(HandOverRefusal::AlreadyPrimary);
    }
    let entry = seen
        .iter()
        .find(|s| s.entry.node == node)
        .ok_or(HandOverRefusal::UnknownNode)?;
    if entry.entry.draining {
        return Err(HandOverRefusal::Draining);
    }
    if !entry.entry.ready {
        return Err(HandOverRefusal::NotReady);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(node: &str, priority: u64, ready_since: Option<Instant>) -> Seen {
        Seen {
            entry: Candidate::new(node)
                .with_priority(priority)
                .with_ready(ready_since.is_some()),
            ready_since,
        }
    }

    const SETTLE: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_higher_ready_candidate_is_chosen_once_settled() {
        let t0 = Instant::now();
        let me = Candidate::new("a").with_priority(1);
        let list = [seen("a", 1, Some(t0)), seen("b", 2, Some(t0))];
        let early = choose(&me, &list, t0, SETTLE, &HashMap::new(), &HashMap::new());
        assert_eq!(early.target, None);
        assert_eq!(early.recheck_at, Some(t0 + SETTLE));
        let later = choose(
            &me,
            &list,
            t0 + SETTLE,
            SETTLE,
            &HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(later.target.as_deref(), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn equal_unready_draining_and_yielded_candidates_do_not_move_the_lock() {
        let t0 = Instant::now();
        let late = t0 + Duration::from_secs(60);
        let me = Candidate::new("a").with_priority(5);
        let mut draining = seen("d", 9, Some(t0));
        draining.entry.draining = true;
        let mut yielded = seen("y", 9, Some(t0));
        yielded.entry.yielded = true;
        let list = [
            seen("a", 5, Some(t0)),
            seen("equal", 5, Some(t0)),
            seen("lower", 1, Some(t0)),
            seen("unready", 9, None),
            draining,
            yielded,
        ];
        assert_eq!(
            choose(&me, &list, late, SETTLE, &HashMap::new(), &HashMap::new()),
            Choice {
                target: None,
                recheck_at: None
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_primary_takes_the_best_eligible_successor_settled_or_not() {
        let t0 = Instant::now();
        let me = Candidate::new("a").with_priority(5).with_draining(true);
        let list = [
            seen("old", 5, Some(t0)),
            seen("new", 6, Some(t0 + Duration::from_millis(900))),
            seen("unready", 9, None),
        ];
        let now = t0 + Duration::from_millis(901);
        assert_eq!(
            choose(&me, &list, now, SETTLE, &HashMap::new(), &HashMap::new())
                .target
                .as_deref(),
            Some("new")
        );
        assert_eq!(
            choose(
                &me,
                &list[2..],
                now,
                SETTLE,
                &HashMap::new(),
                &HashMap::new()
            )
            .target,
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_directed_handover_stays_while_the_node_that_yielded_lives() {
        let t0 = Instant::now();
        let me = Candidate::new("b").with_priority(1);
        let mut yielded = seen("a", 2, Some(t0));
        yielded.entry.yielded = true;
        let list = [seen("b", 1, Some(t0)), yielded, seen("a2", 2, Some(t0))];
        let later = t0 + SETTLE * 10;
        assert_eq!(
            choose(&me, &list, later, SETTLE, &HashMap::new(), &HashMap::new()).target,
            None
        );
        // Gone (restarted by a deploy, say): preference applies again.
        let list = [seen("b", 1, Some(t0)), seen("a2", 2, Some(t0))];
        assert_eq!(
            choose(&me, &list, later, SETTLE, &HashMap::new(), &HashMap::new())
                .target
                .as_deref(),
            Some("a2")
        );
        // A draining primary still hands over.
        let draining = me.with_draining(true);
        let mut yielded = seen("a", 2, Some(t0));
        yielded.entry.yielded = true;
        let list = [seen("b", 1, Some(t0)), yielded];
        assert_eq!(
            choose(
                &draining,
                &list,
                later,
                SETTLE,
                &HashMap::new(),
                &HashMap::new()
            )
            .target
            .as_deref(),
            Some("a")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_group_compares_with_its_best_member() {
        let t0 = Instant::now();
        // This process's own priority is 1; its group's entry carries the best member's, 7.
        let me = Candidate::new("a").with_priority(1);
        let list = [seen("a", 7, Some(t0)), seen("b", 5, Some(t0))];
        assert_eq!(
            choose(
                &me,
                &list,
                t0 + SETTLE,
                SETTLE,
                &HashMap::new(),
                &HashMap::new()
            )
            .target,
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_did_not_take_the_lock_is_passed_over() {
        let t0 = Instant::now();
        let me = Candidate::new("a").with_priority(1);
        let list = [
            seen("a", 1, Some(t0)),
            seen("hung", 9, Some(t0)),
            seen("b", 2, Some(t0)),
        ];
        let shunned = HashMap::from([("hung".to_owned(), t0 + Duration::from_secs(30))]);
        let later = t0 + SETTLE;
        assert_eq!(
            choose(&me, &list, later, SETTLE, &shunned, &HashMap::new())
                .target
                .as_deref(),
            Some("b")
        );
        let draining = me.with_draining(true);
        assert_eq!(
            choose(&draining, &list, later, SETTLE, &shunned, &HashMap::new())
                .target
                .as_deref(),
            Some("b")
        );
        assert_eq!(
            choose(
                &draining,
                &list[..2],
                later,
                SETTLE,
                &shunned,
                &HashMap::new()
            )
            .target
            .as_deref(),
            Some("hung")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn directed_handovers_name_their_refusals() {
        let t0 = Instant::now();
        let mut draining = seen("d", 1, Some(t0));
        draining.entry.draining = true;
        let list = [
            seen("a", 1, Some(t0)),
            seen("u", 1, None),
            draining,
            seen("ok", 0, Some(t0)),
        ];
        assert_eq!(
            directed("a", "a", &list),
            Err(HandOverRefusal::AlreadyPrimary)
        );
        assert_eq!(directed("a", "x", &list), Err(HandOverRefusal::UnknownNode));
        assert_eq!(directed("a", "u", &list), Err(HandOverRefusal::NotReady));
        assert_eq!(directed("a", "d", &list), Err(HandOverRefusal::Draining));
        assert_eq!(directed("a", "ok", &list), Ok(()));
    }
}
