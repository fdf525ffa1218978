//! The held lock: one term, renewed by a task of its own until it is released or lost.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::COMMAND_TIMEOUT;
use super::lock::{LockShared, lease_ms, release};
use super::resume::ResumeToken;
use super::scripts::{RENEW, RESERVE, unexpected};
use crate::backend::{BoxFuture, Leadership, Lease, RenewalSender, Renewals, renewals};
use crate::clock::{Clock, Timestamp};
use crate::error::Error;
use crate::role::Holder;

/// When a request was sent: on the request's clock (for the deadline) and on tokio's (for timers).
#[derive(Clone, Copy)]
pub(super) struct Sent {
    pub(super) at: Timestamp,
    pub(super) instant: Instant,
}

/// Holding the lock: one term, renewed by a task of its own.
pub(super) struct RedisLeadership {
    shared: Arc<LockShared>,
    token: String,
    term: u64,
    record: Holder,
    renewals: Renewals,
    lost: watch::Receiver<Option<String>>,
    task: JoinHandle<()>,
}

impl fmt::Debug for RedisLeadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLeadership")
            .field("lock", &self.shared.name)
            .field("term", &self.term)
            .finish_non_exhaustive()
    }
}

impl RedisLeadership {
    pub(super) fn start(
        shared: Arc<LockShared>,
        token: String,
        term: u64,
        record: Holder,
        lease: Lease,
        clock: Clock,
        sent: Sent,
    ) -> Self {
        crate::sync::lock(&shared.tokens).insert(term, token.clone());
        let (tx, renewals) = renewals(sent.at);
        let (lost_tx, lost) = watch::channel(None);
        let task = tokio::spawn(renew(
            shared.clone(),
            Owner {
                token: token.clone(),
                term,
            },
            lease,
            clock,
            tx,
            lost_tx,
            sent,
        ));
        RedisLeadership {
            shared,
            token,
            term,
            record,
            renewals,
            lost,
            task,
        }
    }

    /// Stops renewing and forgets the term.
    fn stop(&mut self) {
        self.task.abort();
        crate::sync::lock(&self.shared.tokens).remove(&self.term);
    }
}

/// The renewal loop: every `lease / 3`, and at once when the holder may have changed. Transient
/// errors are retried quickly until the deadline; a refusal or a passed deadline ends the term.
/// What a renewal must show to be the holder's: the lock key's token and the holder record's term.
struct Owner {
    token: String,
    term: u64,
}

async fn renew(
    shared: Arc<LockShared>,
    owner: Owner,
    lease: Lease,
    clock: Clock,
    tx: RenewalSender,
    lost: watch::Sender<Option<String>>,
    acquired: Sent,
) {
    let every = lease.renew_every();
    let ms = lease_ms(lease.ttl());
    let attempt_limit = every.clamp(Duration::from_millis(100), COMMAND_TIMEOUT);
    let mut changed = shared.events.holder.subscribe();
    let mut confirmed = acquired.at;
    let mut next = acquired.instant + every;
    let mut retry = Duration::from_millis(25);
    loop {
        let deadline = lease.deadline_after(confirmed);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = tokio::time::sleep_until(clock.to_tokio_instant(deadline)) => {}
            _ = changed.changed() => {}
        }
        if tx.is_closed() {
            return;
        }
        if clock.now() >= deadline {
            let _ = lost.send(Some(
                "no renewal was confirmed before the lease deadline".to_owned(),
            ));
            return;
        }
        let sent = clock.now();
        let sent_at = Instant::now();
        let res = shared
            .lease
            .run("renew", attempt_limit, |mut c| {
                let keys = shared.keys.clone();
                let (token, term) = (owner.token.clone(), owner.term);
                async move {
                    RENEW
                        .key(&keys.lock)
                        .key(&keys.holder)
                        .key(&keys.lease)
                        .arg(&token)
                        .arg(ms)
                        .arg(term)
                        .invoke_async::<i64>(&mut c)
                        .await
                }
            })
            .await;
        match res {
            Ok(1) => {
                tx.confirm(sent);
                confirmed = confirmed.max(sent);
                next = sent_at + every;
                retry = Duration::from_millis(25);
            }
            Ok(_) => {
                let _ = lost.send(Some(
                    "the lock key is gone, held by another node, or resumed under a newer term \
                     (expired, deleted, Redis restarted without its data, or taken over by \
                     another process of this host)"
                        .to_owned(),
                ));
                return;
            }
            Err(err) => {
                tracing::debug!(lock = %shared.name, error = %err, retry_in = ?retry, "renewal failed; retrying");
                next = Instant::now() + retry;
                retry = (retry * 2).min(Duration::from_millis(200));
            }
        }
    }
}

impl Leadership for RedisLeadership {
    fn term(&self) -> u64 {
        self.term
    }

    fn holder(&self) -> &Holder {
        &self.record
    }

    fn renewals(&self) -> Option<Renewals> {
        Some(self.renewals.clone())
    }

    fn lost(&mut self) -> BoxFuture<'_, Error> {
        Box::pin(async move {
            let reason = self
                .lost
                .wait_for(Option::is_some)
                .await
                .map(|r| r.clone().unwrap_or_default());
            match reason {
                Ok(reason) => self.shared.lost_msg(reason),
                // The renewal task ended without a loss (released): nothing more to report.
                Err(_) => std::future::pending().await,
            }
        })
    }

    fn resume_token(&self) -> Option<String> {
        Some(
            ResumeToken {
                token: self.token.clone(),
                term: self.term,
            }
            .encode(),
        )
    }

    /// The reservation script: only while the lock key holds this term's token and the holder
    /// record its term; the window (`PX`, at least 1 ms) is counted by the server.
    fn reserve<'a>(
        &'a mut self,
        node: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let window_ms = lease_ms(window).max(1);
            let reply = self
                .shared
                .lease
                .run("reserve", COMMAND_TIMEOUT, |mut c| {
                    let keys = self.shared.keys.clone();
                    let (token, term) = (self.token.clone(), self.term);
                    let node = node.to_owned();
                    async move {
                        RESERVE
                            .key(&keys.lock)
                            .key(&keys.holder)
                            .key(&keys.reserved)
                            .arg(&token)
                            .arg(term)
                            .arg(&node)
                            .arg(window_ms)
                            .invoke_async::<Vec<String>>(&mut c)
                            .await
                    }
                })
                .await?;
            match reply.as_slice() {
                [ok] if ok == "ok" => Ok(()),
                [kind, current] if kind == "stale" => Err(Error::StaleTerm {
                    lock: self.shared.name.clone(),
                    term: self.term,
                    current: current.parse().ok(),
                }),
                _ => Err(unexpected("reserve", &reply)),
            }
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            self.stop();
            let mut delay = Duration::from_millis(50);
            let mut tries = 0;
            loop {
                match release(&self.shared, &self.token, Some(self.term), false).await {
                    Ok(_) => return Ok(()),
                    Err(err) if tries >= 2 => return Err(err),
                    Err(_) => {
                        tries += 1;
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        })
    }
}

impl Drop for RedisLeadership {
    fn drop(&mut self) {
        // Dropped without release (the process or its runtime is going away): stop renewing and
        // let the lease run out, as after a crash. The elector always releases explicitly.
        self.stop();
    }
}
