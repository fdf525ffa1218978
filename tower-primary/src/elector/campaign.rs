//! The campaign loop: wait for the lock while following the holder, hold the term, campaign
//! again.
//!
//! While campaigning the loop waits for four things at once (in this order of priority): a
//! command ([`step_down`](super::Elector::step_down), [`shutdown`](super::Elector::shutdown), a
//! new task), the outcome of the acquisition under way, an update of the holder record
//! ([`Follow`]), and a timer (the next attempt, a re-subscription, the heartbeat). Each has its
//! own step below.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use super::backend_errors::{ACQUISITION_SETTLED, BackendErrors, Step};
use super::check::FirstAnswer;
use super::follow::{Failure, Follow, Update};
use super::registry::Registry;
use super::term::Leave;
use super::{Command, TARGET};
use crate::backend::{AcquireRequest, BoxFuture, Leadership, Lease, Lock};
use crate::backoff::Backoff;
use crate::error::{Chain, Error};
use crate::role::{Holder, Role, Shared};
use crate::task::TaskSpec;

/// What the campaign loop owns.
pub(super) struct Campaign {
    pub(super) shared: Arc<Shared>,
    pub(super) lock: Arc<dyn Lock>,
    pub(super) backend_name: &'static str,
    pub(super) request: AcquireRequest,
    pub(super) lease: Option<Lease>,
    pub(super) grace: Duration,
    pub(super) backoff: Backoff,
    pub(super) rejoin_delay: Duration,
    pub(super) exit_on_loss: bool,
    pub(super) tasks: Arc<Mutex<Vec<Arc<TaskSpec>>>>,
    pub(super) cmd_rx: mpsc::UnboundedReceiver<Command>,
    /// How often an idle loop stamps its heartbeat: a quarter of the liveness bound.
    pub(super) tick: Duration,
    /// Classifies, logs, counts and publishes backend errors.
    pub(super) errors: BackendErrors,
    /// Waiting for the backend's first answer ([`spawn_checked`](super::ElectorBuilder::spawn_checked)).
    pub(super) first_answer: Option<FirstAnswer>,
    /// This node's registration and the registry as read.
    pub(super) registry: Registry,
    /// How long a higher-priority candidate must have been ready before the lock moves to it.
    pub(super) settle: Duration,
    /// How long a handover reserves the lock for its target.
    pub(super) window: Duration,
    /// The target of this node's latest handover, until it is seen holding the lock.
    pub(super) handed_to: Option<String>,
    /// Targets that did not take the lock handed to them, and until when they are passed over.
    pub(super) shunned: std::collections::HashMap<String, Instant>,
    /// The latest other node seen holding the lock.
    pub(super) last_holder: Option<String>,
    /// Holders this node's terms followed, and until when they are not preferred.
    pub(super) suspects: std::collections::HashMap<String, Instant>,
}

/// Why a campaign ended without a grant: the elector was shut down (with the reply to send once
/// stopped), or every handle of it was dropped.
type Stopped = Option<oneshot::Sender<()>>;

/// The instant `d` from now; for a delay past tokio's range, a year from now (saturating rather
/// than overflowing).
pub(super) fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// Polls an optional future; pends forever when there is none.
pub(super) async fn maybe<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The acquisition: the attempt under way, or when the next one starts.
struct Attempt<'a> {
    future: Option<BoxFuture<'a, Result<Box<dyn Leadership>, Error>>>,
    /// When the next attempt starts, while none is under way.
    at: Instant,
    /// After a step-down: wait until `at` unless another node takes the lock first.
    holding_off: bool,
    span: tracing::Span,
    started: Instant,
}

impl<'a> Attempt<'a> {
    fn new(hold_off: Option<Instant>) -> Self {
        Attempt {
            future: None,
            at: hold_off.unwrap_or_else(Instant::now),
            holding_off: hold_off.is_some(),
            span: tracing::Span::none(),
            started: Instant::now(),
        }
    }

    /// Starts an attempt when none is under way and its time has come.
    fn start_if_due(&mut self, lock: &'a dyn Lock, request: &AcquireRequest, shared: &Shared) {
        if self.future.is_some() || Instant::now() < self.at {
            return;
        }
        self.span = tracing::info_span!(
            target: TARGET,
            "acquire",
            lock = %shared.lock,
            node = %shared.node,
            term = tracing::field::Empty,
        );
        self.started = Instant::now();
        self.future = Some(Box::pin(
            lock.acquire(request.clone()).instrument(self.span.clone()),
        ));
    }

    /// When the loop must wake to start the next attempt; `None` while one is under way.
    fn wake_at(&self) -> Option<Instant> {
        self.future.is_none().then_some(self.at)
    }

    fn in_flight(&self) -> bool {
        self.future.is_some()
    }

    /// Gives the attempt under way up (cancel-safe: a grant that arrives later is released).
    fn cancel(&mut self) {
        self.future = None;
    }

    /// When the attempt under way will have waited [`ACQUISITION_SETTLED`] without an error;
    /// `None` while none is under way.
    fn settled_at(&self) -> Option<Instant> {
        self.in_flight().then(|| self.started + ACQUISITION_SETTLED)
    }

    /// The outcome of the attempt under way; pends while there is none.
    ///
    /// Cancel-safe: the attempt stays under way until it resolves here.
    async fn outcome(&mut self) -> Result<Box<dyn Leadership>, Error> {
        let res = maybe(&mut self.future).await;
        self.future = None;
        res
    }

    /// Another node holds the lock: a hold-off after a step-down ends now.
    fn rejoin_now(&mut self) {
        if self.holding_off {
            self.holding_off = false;
            self.at = Instant::now();
        }
    }
}

impl Campaign {
    pub(super) async fn run(mut self) {
        let mut hold_off = None;
        loop {
            let leadership = match self.campaign(hold_off.take()).await {
                Ok(l) => l,
                Err(reply) => {
                    self.publish_secondary(None);
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    tracing::info!(target: TARGET, lock = %self.shared.lock, node = %self.shared.node, "elector stopped");
                    return;
                }
            };
            let leave = self.lead(leadership).await;
            match leave {
                Leave::Shutdown(reply) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    tracing::info!(target: TARGET, lock = %self.shared.lock, node = %self.shared.node, "elector stopped");
                    return;
                }
                Leave::StepDown(_) | Leave::HandOver { .. } => {
                    hold_off = Some(after(self.rejoin_delay));
                }
                Leave::Lost(_) | Leave::Fenced if self.exit_on_loss => {
                    tracing::info!(target: TARGET,
                        lock = %self.shared.lock,
                        node = %self.shared.node,
                        "elector stopped after losing the lock (exit_on_loss)"
                    );
                    return;
                }
                Leave::Lost(_) | Leave::Fenced => {
                    // Rejoin after a short, growing pause, unless another node takes the lock
                    // first: a node whose renewals keep failing must not re-take the lock
                    // ahead of the waiters its release has just woken.
                    hold_off = Some(after(self.backoff.next_delay()));
                }
            }
        }
    }

    /// Campaigns until acquired; `Err` when stopped.
    async fn campaign(
        &mut self,
        hold_off: Option<Instant>,
    ) -> Result<Box<dyn Leadership>, Stopped> {
        let lock = self.lock.clone();
        let lock = &*lock;
        let mut attempt = Attempt::new(hold_off);
        let mut follow = Follow::new(lock);
        let mut entry = self.shared.entry.subscribe();
        loop {
            self.shared.watchdog.beat(self.shared.clock.now());
            if entry.borrow_and_update().draining {
                // A draining node never becomes primary.
                attempt.cancel();
            } else {
                attempt.start_if_due(lock, &self.request, &self.shared);
            }
            // An idle loop still stamps its heartbeat.
            let settled = self
                .errors
                .met_by_acquisition()
                .then(|| attempt.settled_at())
                .flatten();
            let wake = [attempt.wake_at(), follow.wake_at(), settled]
                .into_iter()
                .flatten()
                .fold(after(self.tick), Instant::min);
            tokio::select! {
                biased;
                cmd = self.cmd_rx.recv() => self.command(cmd)?,
                res = attempt.outcome() => match res {
                    Ok(leadership) => return Ok(self.granted(leadership, &attempt)),
                    Err(err) => self.acquire_failed(err, &mut attempt, &follow),
                },
                update = follow.next() => self.followed(update, &mut attempt),
                _ = entry.changed() => {}
                () = tokio::time::sleep_until(wake) => follow.resubscribe_if_due(),
            }
            follow.read_if_needed();
            if self.errors.met_by_acquisition()
                && attempt.settled_at().is_some_and(|at| at <= Instant::now())
            {
                // A retried acquisition waits without an error: the refusal is over.
                self.errors.answered(Step::Acquire);
            }
        }
    }

    /// A command while campaigning: only shutdown (or the last handle gone) ends the campaign.
    fn command(&self, cmd: Option<Command>) -> Result<(), Stopped> {
        match cmd {
            None => Err(None),
            Some(Command::Shutdown(reply)) => Err(Some(reply)),
            Some(Command::StepDown(reply) | Command::HandOver(_, reply)) => {
                let _ = reply.send(Err(Error::NotPrimary {
                    lock: self.shared.lock.clone(),
                }));
                Ok(())
            }
            Some(Command::TaskAdded) => Ok(()),
        }
    }

    fn granted(
        &mut self,
        leadership: Box<dyn Leadership>,
        attempt: &Attempt<'_>,
    ) -> Box<dyn Leadership> {
        self.backoff.reset();
        attempt.span.record("term", leadership.term());
        crate::metrics::acquired(&self.shared.lock, attempt.started.elapsed());
        // The first answer is reported once `Primary` is published (`lead`).
        self.errors.answered(Step::Acquire);
        leadership
    }

    /// A failed acquisition: stay secondary, try again after the backoff.
    fn acquire_failed(&mut self, err: Error, attempt: &mut Attempt<'_>, follow: &Follow<'_>) {
        let delay = self.backoff.next_delay();
        if self.errors.failed(Step::Acquire, "acquire", &err) {
            tracing::warn!(
                target: TARGET,
                lock = %self.shared.lock,
                node = %self.shared.node,
                backend = self.backend_name,
                error = %Chain(&err),
                retry_in = ?delay,
                "acquire failed; staying secondary"
            );
        }
        attempt.at = after(delay);
        self.publish_secondary(follow.holder().cloned());
        FirstAnswer::failed(&mut self.first_answer, err);
    }

    /// An update from following the holder record.
    fn followed(&mut self, update: Update, attempt: &mut Attempt<'_>) {
        match update {
            Update::Subscribed => self.errors.answered(Step::Follow),
            Update::Changed => {}
            Update::Holder(holder) => {
                self.errors.answered(Step::Follow);
                if holder
                    .as_ref()
                    .is_some_and(|h| self.handed_to.as_deref() == Some(h.id.as_str()))
                {
                    // The node the lock was handed to took it.
                    self.handed_to = None;
                }
                if let Some(h) = holder.as_ref().filter(|h| h.id != self.shared.node.id()) {
                    self.last_holder = Some(h.id.clone());
                }
                let other = holder
                    .as_ref()
                    .is_some_and(|h| h.id != self.shared.node.id());
                if other {
                    // Another node took over (after our step-down, say): rejoin now.
                    attempt.rejoin_now();
                }
                // Nobody holds it and our first attempt is under way: stay `Starting` rather
                // than flash `Secondary` before `Primary`.
                let starting = matches!(self.shared.state.borrow().role, Role::Starting);
                if holder.is_some() || !starting || !attempt.in_flight() {
                    self.publish_secondary(holder);
                }
                if other {
                    // Secondary behind a known holder, published.
                    FirstAnswer::answered(&mut self.first_answer);
                }
            }
            Update::Failed(failure, err) => {
                if self.errors.failed(Step::Follow, failure.op(), &err) {
                    let lock = &self.shared.lock;
                    let error = Chain(&err);
                    match failure {
                        Failure::Subscribe => {
                            tracing::warn!(target: TARGET, %lock, %error, "cannot watch the holder record; retrying")
                        }
                        Failure::Watch => {
                            tracing::warn!(target: TARGET, %lock, %error, "holder watch failed; re-subscribing")
                        }
                        Failure::Read => {
                            tracing::warn!(target: TARGET, %lock, %error, "cannot read the holder record")
                        }
                    }
                }
                if matches!(failure, Failure::Read) {
                    self.publish_secondary(None);
                }
                FirstAnswer::failed(&mut self.first_answer, err);
            }
        }
    }

    /// Publishes `Secondary` behind `holder` (`None`: unknown, or nobody), unless it is so
    /// already.
    pub(super) fn publish_secondary(&self, holder: Option<Holder>) {
        self.shared.state.send_if_modified(|state| {
            let role = Role::Secondary {
                holder: holder.clone(),
            };
            if state.role == role && state.term.is_none() {
                return false;
            }
            if !matches!(state.role, Role::Secondary { .. }) {
                tracing::info!(target: TARGET,
                    lock = %self.shared.lock,
                    node = %self.shared.node,
                    term = holder.as_ref().map(|h| h.term),
                    holder = holder.as_ref().map(|h| h.id.as_str()),
                    "secondary"
                );
            }
            crate::metrics::role(&self.shared.lock, false, holder.as_ref().map(|h| h.term));
            state.role = role;
            state.holder.clone_from(&holder);
            state.term = None;
            true
        });
    }
}
