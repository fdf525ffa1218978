//! Following the holder record while campaigning, so that a secondary knows who is primary.
//!
//! [`Follow`] subscribes to changes of the holder record and reads the record after each one
//! (and once subscribed). A failed subscription is retried with backoff; a failed read waits
//! for the next change. The campaign loop polls [`Follow::next`] and acts on its [`Update`]s.

use std::time::Duration;

use tokio::time::Instant;

use super::campaign::{after, maybe};
use crate::backend::{BoxFuture, Changes, Lock};
use crate::backoff::Backoff;
use crate::error::Error;
use crate::role::Holder;

/// What a secondary keeps about the current holder, and the calls under way to keep it current.
pub(super) struct Follow<'a> {
    lock: &'a dyn Lock,
    /// The subscription to changes of the holder record, once made.
    watch: Option<Box<dyn Changes>>,
    /// A subscription under way.
    subscribing: Option<BoxFuture<'a, Result<Box<dyn Changes>, Error>>>,
    /// The backoff between failed subscriptions.
    retry: Backoff,
    /// When to subscribe again after a failure.
    resubscribe_at: Option<Instant>,
    /// A read of the holder record under way.
    reading: Option<BoxFuture<'a, Result<Option<Holder>, Error>>>,
    /// The record may have changed since the last read began: read it (again).
    stale: bool,
    /// The holder as last read (`None`: nobody, or not read yet).
    holder: Option<Holder>,
}

/// What changed in a [`Follow`].
pub(super) enum Update {
    /// The holder record was read: who holds the lock (`None`: nobody).
    Holder(Option<Holder>),
    /// Subscribed to changes of the record; a read follows.
    Subscribed,
    /// The record changed; a read follows.
    Changed,
    /// A call failed. The follower retries on its own.
    Failed(Failure, Error),
}

/// Which call of a [`Follow`] failed.
#[derive(Clone, Copy, Debug)]
pub(super) enum Failure {
    /// Subscribing to changes: retried with backoff.
    Subscribe,
    /// The subscription broke: re-subscribed with backoff.
    Watch,
    /// Reading the record: read again at the next change.
    Read,
}

impl Failure {
    /// The `op` label of the backend error metric.
    pub(super) fn op(self) -> &'static str {
        match self {
            Failure::Subscribe | Failure::Watch => "watch",
            Failure::Read => "holder",
        }
    }
}

impl<'a> Follow<'a> {
    /// Starts following `lock`: the subscription is under way.
    pub(super) fn new(lock: &'a dyn Lock) -> Self {
        Follow {
            lock,
            watch: None,
            subscribing: Some(lock.watch_holder()),
            retry: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            resubscribe_at: None,
            reading: None,
            stale: false,
            holder: None,
        }
    }

    /// The holder as last read.
    pub(super) fn holder(&self) -> Option<&Holder> {
        self.holder.as_ref()
    }

    /// When the loop must wake to subscribe again, after a failure.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        self.resubscribe_at
    }

    /// The next update, with the follower's own state already updated.
    ///
    /// Cancel-safe: calls under way stay under way, and a change that comes while nobody waits
    /// is reported by the next call (the backend's [`Changes`] are cancel-safe).
    pub(super) async fn next(&mut self) -> Update {
        tokio::select! {
            biased;
            res = maybe(&mut self.subscribing) => {
                self.subscribing = None;
                match res {
                    Ok(watch) => {
                        self.watch = Some(watch);
                        self.retry.reset();
                        self.stale = true;
                        Update::Subscribed
                    }
                    Err(err) => {
                        self.resubscribe_at = Some(after(self.retry.next_delay()));
                        Update::Failed(Failure::Subscribe, err)
                    }
                }
            },
            res = async {
                match self.watch.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => match res {
                Ok(()) => {
                    self.stale = true;
                    Update::Changed
                }
                Err(err) => {
                    self.watch = None;
                    self.resubscribe_at = Some(after(self.retry.next_delay()));
                    Update::Failed(Failure::Watch, err)
                }
            },
            res = maybe(&mut self.reading) => {
                self.reading = None;
                match res {
                    Ok(holder) => {
                        self.holder.clone_from(&holder);
                        Update::Holder(holder)
                    }
                    Err(err) => Update::Failed(Failure::Read, err),
                }
            },
        }
    }

    /// Subscribes again once the time after a failure has come.
    pub(super) fn resubscribe_if_due(&mut self) {
        if self.resubscribe_at.is_some_and(|at| Instant::now() >= at) {
            self.resubscribe_at = None;
            self.subscribing = Some(self.lock.watch_holder());
        }
    }

    /// Reads the record when it may have changed and no read is under way.
    pub(super) fn read_if_needed(&mut self) {
        if self.stale && self.reading.is_none() {
            self.stale = false;
            self.reading = Some(self.lock.holder());
        }
    }
}
