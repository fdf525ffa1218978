//! Holding a term, and leaving it in the shutdown order.

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::campaign::{Campaign, after};
use super::check::FirstAnswer;
use super::{Command, TARGET};
use crate::backend::{Leadership, Release};
use crate::clock::Timestamp;
use crate::error::{Chain, Error};
use crate::role::{Role, RoleState, TermContext};
use crate::task::TaskSet;
use crate::watchdog::Phase;

/// Why a term ended.
pub(super) enum Leave {
    Lost(Error),
    Fenced,
    StepDown(oneshot::Sender<Result<(), Error>>),
    Shutdown(Option<oneshot::Sender<()>>),
}

impl Leave {
    pub(super) fn reason(&self) -> &'static str {
        match self {
            Leave::Lost(_) => "lost",
            Leave::Fenced => "fenced",
            Leave::StepDown(_) => "stepped-down",
            Leave::Shutdown(_) => "shutdown",
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

        let leave = loop {
            self.shared.watchdog.beat(clock.now());
            if clock.now() >= deadline {
                break Leave::Fenced;
            }
            tokio::select! {
                biased;
                cmd = self.cmd_rx.recv() => match cmd {
                    None => break Leave::Shutdown(None),
                    Some(Command::Shutdown(reply)) => break Leave::Shutdown(Some(reply)),
                    Some(Command::StepDown(reply)) => break Leave::StepDown(reply),
                    Some(Command::TaskAdded) => tasks.sync(&crate::sync::lock(&self.tasks), &ctx),
                },
                err = leadership.lost() => break Leave::Lost(err),
                // Wakes at the deadline, and at least every tick to stamp the heartbeat.
                () = tokio::time::sleep_until(clock.to_tokio_instant(deadline).min(after(self.tick))) => {}
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

    async fn leave(
        &mut self,
        leadership: Box<dyn Leadership>,
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
            other => other,
        }
    }
}
