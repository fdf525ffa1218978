//! Holding a term, and leaving it in the shutdown order.

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::campaign::{Campaign, after};
use super::check::FirstAnswer;
use super::registry::{choose, directed};
use super::{Command, TARGET};
use crate::backend::{Leadership, Release};
use crate::clock::Timestamp;
use crate::error::{Chain, Error};
use crate::role::{Role, RoleState, TermContext};
use crate::task::TaskSet;
use crate::watchdog::Phase;

/// A node that did not take the lock handed to it is passed over for this many windows.
const SHUN_WINDOWS: u32 = 15;

/// After a reservation failed, when a preferred handover is tried again.
const HANDOVER_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a term ended.
pub(super) enum Leave {
    Lost(Error),
    Fenced,
    StepDown(oneshot::Sender<Result<(), Error>>),
    Shutdown(Option<oneshot::Sender<()>>),
    /// A planned handover to `to`, for whom the lock is reserved: preferred (a higher priority),
    /// for a draining primary, or `directed` by [`hand_over_to`](super::Elector::hand_over_to).
    HandOver {
        to: String,
        directed: bool,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
}

impl Leave {
    pub(super) fn reason(&self) -> &'static str {
        match self {
            Leave::Lost(_) => "lost",
            Leave::Fenced => "fenced",
            Leave::StepDown(_) => "stepped-down",
            Leave::Shutdown(_) => "shutdown",
            Leave::HandOver { .. } => "handed-over",
        }
    }
}

impl Campaign {
    /// Holds one term until it ends, then leaves it in the shutdown order.
    pub(super) async fn lead(&mut self, mut leadership: Box<dyn Leadership>) -> Leave {
        let term = leadership.term();
        let holder = leadership.holder().clone();
        let clock = self.shared.clock;
        let mut renewals = leadership.renewals();
        let lease = self.lease.or_else(|| leadership.implied_lease());
        let mut deadline = match (&renewals, lease) {
            (Some(r), Some(lease)) => lease.deadline_after(r.latest()),
            _ => Timestamp::NEVER,
        };
        let token = CancellationToken::new();
        let ctx = TermContext::new(term, self.shared.clone(), token.clone());
        let since = holder.since;
        // The deadline first: a waiter woken by the new state must find it valid.
        self.shared.set_deadline(deadline);
        self.shared.state.send_replace(RoleState {
            role: Role::Primary { term, since },
            holder: Some(holder),
            term: Some(ctx.clone()),
        });
        FirstAnswer::answered(&mut self.first_answer);
        tracing::info!(target: TARGET,
            lock = %self.shared.lock,
            node = %self.shared.node,
            term,
            reason = "acquired",
            "became primary"
        );
        crate::metrics::role(&self.shared.lock, true, Some(term));
        crate::metrics::transition(&self.shared.lock, "acquired");
        let mut tasks = TaskSet::new();
        tasks.sync(&crate::sync::lock(&self.tasks), &ctx);
        // Leading again ends a yield.
        self.shared
            .entry
            .send_if_modified(|e| std::mem::replace(&mut e.yielded, false));
        if let Some(target) = self.handed_to.take() {
            // Leading again, and the node the lock was handed to never took it (hung, or gone
            // without its entry yet): pass it over for a while, or the lock would be handed to
            // it again and again.
            tracing::warn!(target: TARGET,
                lock = %self.shared.lock,
                node = %self.shared.node,
                to = %target,
                "the node the lock was handed to did not take it; passing it over for a while"
            );
            self.shunned
                .insert(target, after(self.window * SHUN_WINDOWS));
        }
        if let Some(previous) = self.last_holder.take() {
            // The node this term follows may have died (a failover): its registry entry can
            // outlive it by up to the backend's liveness bound (a lease), and a preferred
            // handover to it would leave the lock reserved for nobody. (A drain may still choose
            // it: a live predecessor is often the best successor.)
            let bound = lease.map_or(self.window, |l| l.ttl()) + self.window;
            self.suspects.insert(previous, after(bound));
        }
        let mut entry = self.shared.entry.subscribe();
        let mut seen = self.registry.seen.clone();
        let mut look_again: Option<Instant> = None;
        // Choose from a registry read after this term began, not from one read before the
        // predecessor's last update (a node that just yielded would look like a target).
        let mut fresh = self.registry.read_now();

        let leave = loop {
            self.shared.watchdog.beat(clock.now());
            if clock.now() >= deadline {
                break Leave::Fenced;
            }
            if look_again.is_none_or(|at| at <= Instant::now()) && seen.borrow().covers >= fresh {
                let me = entry.borrow_and_update().clone();
                let now = Instant::now();
                self.shunned.retain(|_, until| *until > now);
                self.suspects.retain(|_, until| *until > now);
                let choice = choose(
                    &me,
                    &seen.borrow_and_update().seen,
                    now,
                    self.settle,
                    &self.shunned,
                    &self.suspects,
                );
                look_again = choice.recheck_at;
                if let Some(to) = choice.target {
                    match self.reserve(&mut *leadership, &to).await {
                        Ok(()) => {
                            break Leave::HandOver {
                                to,
                                directed: false,
                                reply: None,
                            };
                        }
                        // Keep leading; try again a little later.
                        Err(err) => {
                            tracing::warn!(target: TARGET,
                                lock = %self.shared.lock,
                                node = %self.shared.node,
                                to,
                                error = %Chain(&err),
                                "cannot reserve the lock for a handover; keeping it"
                            );
                            look_again = Some(after(HANDOVER_RETRY));
                        }
                    }
                }
            }
            let wake = clock.to_tokio_instant(deadline).min(after(self.tick));
            tokio::select! {
                biased;
                cmd = self.cmd_rx.recv() => match cmd {
                    None => break Leave::Shutdown(None),
                    Some(Command::Shutdown(reply)) => break Leave::Shutdown(Some(reply)),
                    Some(Command::StepDown(reply)) => break Leave::StepDown(reply),
                    Some(Command::HandOver(to, reply)) => {
                        let refused = directed(self.shared.node.id(), &to, &seen.borrow().seen);
                        if let Err(refusal) = refused {
                            let _ = reply.send(Err(Error::HandOver {
                                lock: self.shared.lock.clone(),
                                node: to,
                                refusal,
                            }));
                            continue;
                        }
                        match self.reserve(&mut *leadership, &to).await {
                            Ok(()) => {
                                // Answered now, not after the release: a caller inside a
                                // primary-only request would otherwise wait for itself (the
                                // release waits for the term's requests in flight).
                                let _ = reply.send(Ok(()));
                                break Leave::HandOver { to, directed: true, reply: None };
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    Some(Command::TaskAdded) => tasks.sync(&crate::sync::lock(&self.tasks), &ctx),
                },
                err = leadership.lost() => break Leave::Lost(err),
                _ = seen.changed() => look_again = None,
                _ = entry.changed() => {
                    // Draining (say): choose from a registry read from now on, not from one
                    // that may not list a successor's latest entry yet.
                    fresh = self.registry.read_now();
                    look_again = None;
                }
                // Wakes at the deadline, at a candidate's settle time, and at least every tick to
                // stamp the heartbeat.
                () = tokio::time::sleep_until(look_again.map_or(wake, |at| at.min(wake))) => {}
                sent = async { match renewals.as_mut() { Some(r) => r.changed().await, None => std::future::pending().await } } => {
                    // Renewals run inside the backend; this is where the elector sees one confirmed.
                    let took = clock.now().saturating_duration_since(sent);
                    let _span = tracing::debug_span!(target: TARGET,
                        "renew",
                        lock = %self.shared.lock,
                        term,
                        took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                    )
                    .entered();
                    crate::metrics::renewed(&self.shared.lock, took);
                    tracing::trace!(target: TARGET, "renewal confirmed");
                    if let Some(lease) = lease {
                        // A renewal confirmed after the deadline extends nothing: the term is over.
                        if clock.now() < deadline {
                            deadline = deadline.max(lease.deadline_after(sent));
                            self.shared.set_deadline(deadline);
                        }
                    }
                },
            }
        };
        self.leave(leadership, ctx, tasks, leave).await
    }

    /// Reserves the lock for `to`, bounded by the window (a backend that hangs must not keep
    /// the leading loop from its deadline). On `Err` the caller keeps the lock rather than
    /// release it to whoever is fastest.
    async fn reserve(&self, leadership: &mut dyn Leadership, to: &str) -> Result<(), Error> {
        tokio::time::timeout(self.window, leadership.reserve(to, self.window))
            .await
            .unwrap_or_else(|_| {
                Err(Error::backend_msg(
                    self.backend_name,
                    format!("reserving the lock did not answer within {:?}", self.window),
                ))
            })
    }

    async fn leave(
        &mut self,
        mut leadership: Box<dyn Leadership>,
        ctx: TermContext,
        mut tasks: TaskSet,
        leave: Leave,
    ) -> Leave {
        let term = ctx.term();
        let lock = self.shared.lock.clone();
        let node = self.shared.node.id().to_owned();
        // 1. Stop admitting primary-only requests and work.
        self.shared.set_deadline(Timestamp::ZERO);
        self.publish_secondary(None);
        match &leave {
            Leave::Lost(err) => {
                tracing::warn!(target: TARGET, %lock, %node, term, reason = "lost", error = %Chain(&err), "lost the lock");
            }
            Leave::Fenced => tracing::warn!(target: TARGET,
                %lock, %node, term, reason = "fenced",
                "lease deadline passed without a confirmed renewal; stepping down"
            ),
            Leave::HandOver { to, directed, .. } => {
                tracing::info!(target: TARGET, %lock, %node, term, reason = "handed-over", to = %to, directed, "handing the lock over")
            }
            other => {
                tracing::info!(target: TARGET, %lock, %node, term, reason = other.reason(), "stepping down")
            }
        }
        crate::metrics::transition(&lock, leave.reason());
        // 2. Cancel the term (ordered with task starts: none starts after this).
        tasks.end_term(&ctx);
        // 3. Wait for tasks and in-flight gated requests, up to the grace; 4. abort the rest.
        let clock = self.shared.clock;
        self.shared
            .watchdog
            .wait_within_grace(Phase::SteppingDown, clock.now());
        ctx.tracker().close();
        let drained = tokio::time::timeout(self.grace, async {
            tasks.join().await;
            ctx.tracker().wait().await;
        })
        .await;
        // Gated requests still in flight are cut: handlers dropped, response bodies ended with an
        // error. No code of theirs runs after their current poll.
        ctx.abort_token().cancel();
        if drained.is_err() {
            let names = tasks.running();
            let requests = ctx.tracker().len();
            tracing::warn!(target: TARGET, %lock, %node, term, grace = ?self.grace, tasks = ?names, requests, "grace period over; aborting what is left");
            for name in &names {
                crate::metrics::task_aborted(&lock, name);
            }
            // Unbounded on purpose: the lock is not released while a task of the term still runs
            // (one that blocks its thread cannot be aborted). The watchdog reports it instead.
            self.shared
                .watchdog
                .wait_within_grace(Phase::AbortingTasks, clock.now());
            tasks.abort().await;
        }
        // 5. Release the lock, which wakes the waiters.
        self.shared
            .watchdog
            .wait_on_backend(Phase::Releasing, clock.now());
        if let Leave::HandOver { to, directed, .. } = &leave {
            self.handed_to = Some(to.clone());
            if *directed {
                self.shared.entry.send_modify(|e| e.yielded = true);
            }
            // This node's entry (draining, yielded) is written before the release, so that the
            // next primary reads it.
            let me = self.shared.entry.borrow().clone();
            if let Err(e) = self.registry.update_now(me).await {
                tracing::warn!(target: TARGET, %lock, %node, error = %Chain(&e), "cannot write this node's registry entry before the handover");
            }
            // Again, right before the release: winding the term down may have taken a part of
            // the window.
            if let Err(e) = self.reserve(&mut *leadership, to).await {
                tracing::warn!(target: TARGET, %lock, %node, term, to = %to, error = %Chain(&e), "cannot renew the reservation before the release; releasing anyway");
            }
        }
        // A shutdown may pass a host group's lease to a sibling process; anything else gives it
        // back to the backend.
        let why = match leave {
            Leave::Shutdown(_) => Release::Exit,
            _ => Release::StepDown,
        };
        let release = leadership
            .release_for(why)
            .instrument(tracing::info_span!(target: TARGET,
                "release",
                lock = %lock,
                term,
                reason = leave.reason(),
            ));
        let released = match tokio::time::timeout(self.grace, release).await {
            Ok(r) => r,
            Err(_) => Err(Error::backend_msg(
                self.backend_name,
                format!("release timed out after {:?}", self.grace),
            )),
        };
        self.shared.watchdog.beat(clock.now());
        if let Err(err) = &released {
            crate::metrics::backend_error_kind(&lock, "release", err.misconfiguration());
            tracing::warn!(target: TARGET, %lock, %node, term, backend = self.backend_name, error = %Chain(&err), "release failed");
        } else {
            if !matches!(leave, Leave::Lost(_)) {
                // After a loss there was nothing left to give back.
                crate::metrics::transition(&lock, "released");
            }
            tracing::info!(target: TARGET, %lock, %node, term, reason = leave.reason(), "released the lock");
        }
        match leave {
            Leave::StepDown(reply) => {
                let _ = reply.send(released);
                Leave::StepDown(oneshot::channel().0)
            }
            Leave::HandOver {
                to,
                directed,
                reply: Some(reply),
            } => {
                let _ = reply.send(released);
                Leave::HandOver {
                    to,
                    directed,
                    reply: None,
                }
            }
            other => other,
        }
    }
}
