//! A lock: acquisition (one script run per attempt, in a task of its own), the guard of a grant
//! in flight, release, and reading the holder.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::Client;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::DropGuard;

use super::conn::{Conn, is_connection_error};
use super::events::{Events, subscribe};
use super::leadership::{RedisLeadership, Sent};
use super::scripts::{ACQUIRE, Keys, RELEASE, RESUME, Reply, parse_reply, parse_term};
use super::{ABANDONED_FOR, COMMAND_TIMEOUT, MIN_LEASE, NAME, RESTART_GUARD};
use crate::backend::Lease;
use crate::backend::{
    AcquireRequest, BoxFuture, Candidate, Changes, Leadership, Lock, Registration, Stored,
    VersionChanges,
};
use crate::error::{ConfigError, Error, Misconfiguration};
use crate::process::ProcessIdentity;
use crate::role::Holder;

/// What one lock shares between its handle, its leaderships and its tasks.
pub(super) struct LockShared {
    pub(super) name: String,
    pub(super) keys: Keys,
    pub(super) client: Client,
    /// The backend's command connection (holder, state, key-event configuration).
    pub(super) commands: Arc<Conn>,
    /// This lock's connection for acquire, renewals and release.
    pub(super) lease: Arc<Conn>,
    /// The backend's maximum lease, in ms.
    pub(super) max_lease_ms: u64,
    /// The largest maximum lease recorded in Redis that this process has seen.
    pub(super) seen_max_ms: AtomicU64,
    pub(super) allow_eviction: bool,
    pub(super) events: Arc<Events>,
    pub(super) subscriber: Mutex<Option<JoinHandle<()>>>,
    /// The tokens of the terms this node holds, for state writes.
    pub(super) tokens: Mutex<HashMap<u64, String>>,
    /// Stops the subscriber when the lock is dropped.
    pub(super) _stop: DropGuard,
}

impl fmt::Debug for LockShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock")
            .field("lock", &self.name)
            .field("key", &self.keys.lock)
            .finish_non_exhaustive()
    }
}

impl LockShared {
    /// Starts the notification task if it is not running (again, e.g. after its runtime ended).
    pub(super) fn ensure_subscriber(&self) {
        let mut slot = crate::sync::lock(&self.subscriber);
        if slot.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            *slot = Some(rt.spawn(subscribe(
                self.events.clone(),
                self.client.clone(),
                self.commands.clone(),
            )));
        }
    }

    pub(super) fn lost_msg(&self, reason: impl Into<String>) -> Error {
        Error::Lost {
            lock: self.name.clone(),
            reason: reason.into(),
        }
    }
}

/// A random 128-bit token, in hex.
pub(super) fn new_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !from_os {
        // Randomly keyed SipHash of the process, the time and a counter.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(n);
            h.write_usize(i);
            h.write_u32(std::process::id());
            h.write_u64(crate::clock::monotonic_nanos());
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        use std::fmt::Write;
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A lease in whole milliseconds, rounded up (the server must never expire before the client
/// stops).
pub(super) fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// What one attempt asks for: the lock, or the lease a predecessor's token names.
pub(super) enum Ask<'a> {
    Acquire,
    Resume { token: &'a str, term: u64 },
}

/// One attempt's outcome.
pub(super) enum Attempt {
    Granted(Grant),
    Held {
        pttl_ms: i64,
        lease_ms: Option<u64>,
    },
    /// Reserved for another node, for this long (ms; negative: about to end).
    Reserved(i64),
    Wait(u64),
    /// Resume: the lease is no longer the token's.
    Gone,
}

/// A granted lock on its way to the acquisition that asked for it: released (with a release
/// message, so successors take over at once) if dropped before [`take`](Self::take)n, e.g. with
/// an acquisition that was cancelled while the grant was in flight.
pub(super) struct Grant {
    shared: Arc<LockShared>,
    token: Option<String>,
    term: u64,
}

impl Grant {
    pub(super) fn take(mut self) -> (String, u64) {
        (self.token.take().unwrap_or_default(), self.term)
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        let shared = self.shared.clone();
        let term = self.term;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(err) = release(&shared, &token, Some(term), false).await {
                        tracing::warn!(lock = %shared.name, error = %err, "cannot release a grant nobody took; it runs out with its lease");
                    }
                });
            }
            Err(_) => tracing::warn!(
                lock = %shared.name,
                "a grant nobody took outlived its runtime; it runs out with its lease"
            ),
        }
    }
}

#[derive(Debug)]
pub(super) struct RedisLock {
    pub(super) shared: Arc<LockShared>,
}

impl RedisLock {
    /// Runs the acquire or the resume script once, for the new `token`. The script runs in a
    /// task of its own, so a grant whose caller has gone is released ([`Grant`]), and a request
    /// that failed in a way that may still reach the server is abandoned: released with a
    /// tombstone, so that the request, should it arrive after the release (it may, on its old
    /// connection), is refused.
    pub(super) async fn attempt(
        &self,
        ask: Ask<'_>,
        node: &str,
        token: &str,
        lease_ms: u64,
        record: &str,
    ) -> Result<Attempt, Error> {
        let shared = self.shared.clone();
        let node = node.to_owned();
        let token = token.to_owned();
        let record = record.to_owned();
        let resumed = match ask {
            Ask::Acquire => None,
            Ask::Resume { token, term } => Some((token.to_owned(), term)),
        };
        let what = if resumed.is_some() {
            "resume"
        } else {
            "acquire"
        };
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let max_ms = shared
                .max_lease_ms
                .max(shared.seen_max_ms.load(Ordering::Relaxed));
            let mut tries = 0;
            let res = loop {
                tries += 1;
                let res = shared
                    .lease
                    .run(what, COMMAND_TIMEOUT, |mut c| {
                        let keys = shared.keys.clone();
                        let token = token.clone();
                        let node = node.clone();
                        let record = record.clone();
                        let resumed = resumed.clone();
                        let allow = if shared.allow_eviction { "1" } else { "0" };
                        async move {
                            let mut call = match &resumed {
                                None => ACQUIRE.prepare_invoke(),
                                Some(_) => RESUME.prepare_invoke(),
                            };
                            call.key(&keys.lock)
                                .key(&keys.holder)
                                .key(&keys.term)
                                .key(&keys.lease)
                                .key(keys.abandoned(&token))
                                .key(&keys.reserved);
                            if let Some((old, term)) = &resumed {
                                call.arg(old).arg(term);
                            }
                            call.arg(&token)
                                .arg(lease_ms)
                                .arg(&record)
                                .arg(max_ms)
                                .arg(&keys.channel)
                                .arg(allow)
                                .arg(lease_ms_of(RESTART_GUARD))
                                .arg(&node)
                                .invoke_async::<Vec<String>>(&mut c)
                                .await
                        }
                    })
                    .await;
                // The first command on a connection that broke while idle (e.g. after a Redis
                // restart) fails; try once more on a fresh one. Safe: the script is idempotent
                // for one token.
                match res {
                    Err(err) if tries < 2 && is_connection_error(&err) => continue,
                    res => break res.and_then(|reply| parse_reply(&reply)),
                }
            };
            let res = match res {
                Ok(Reply::Granted { term, max_ms }) => {
                    if let Some(max) = max_ms {
                        shared.seen_max_ms.fetch_max(max, Ordering::Relaxed);
                    }
                    Ok(Ok(Attempt::Granted(Grant {
                        shared: shared.clone(),
                        token: Some(token.clone()),
                        term,
                    })))
                }
                Ok(Reply::Held { pttl_ms, lease_ms }) => {
                    Ok(Ok(Attempt::Held { pttl_ms, lease_ms }))
                }
                Ok(Reply::Reserved { pttl_ms }) => Ok(Ok(Attempt::Reserved(pttl_ms))),
                Ok(Reply::Wait(ms)) => Ok(Ok(Attempt::Wait(ms))),
                Ok(Reply::Gone) => Ok(Ok(Attempt::Gone)),
                Ok(Reply::OtherLease(theirs)) => {
                    Ok(Err(other_lease(&shared.name, lease_ms, theirs)))
                }
                // A lease the server may end early (evicting the lock key) is not the lease the
                // node was configured with: the nearest kind, and it names the setting to change.
                Ok(Reply::Policy(policy)) => Ok(Err(Error::misconfigured(
                    NAME,
                    Misconfiguration::IncompatibleLease,
                    format!(
                        "lock {:?}: the server's maxmemory-policy is {policy}, which may evict \
                         the lock's keys and end a lease early; set maxmemory-policy \
                         noeviction, or allow eviction with RedisBackend::allow_eviction(true)",
                        shared.name
                    ),
                    None,
                ))),
                Ok(Reply::TooLong(max)) => Ok(Err(Error::misconfigured(
                    NAME,
                    Misconfiguration::IncompatibleLease,
                    format!(
                        "lock {:?}: the lease of {lease_ms} ms exceeds the maximum lease \
                         recorded for the lock ({max} ms); shorten the lease, or raise the \
                         recorded maximum (see RedisBackend::with_max_lease)",
                        shared.name
                    ),
                    None,
                ))),
                Ok(Reply::Abandoned) => Err(Error::backend_msg(
                    NAME,
                    format!("{what}: this request was abandoned"),
                )),
                Err(err) => Err(err),
            };
            match res {
                // An answer: the request is done. A grant nobody takes releases itself.
                Ok(answer) => {
                    let _ = tx.send(answer);
                }
                // The request may still reach the server: make sure it grants nothing.
                Err(err) => {
                    let _ = tx.send(Err(err));
                    let _ = release(&shared, &token, None, true).await;
                }
            }
        });
        rx.await
            .map_err(|_| Error::backend_msg(NAME, format!("{what}: the attempt's task ended")))?
    }
}

/// The error of a node whose lease (`mine`, ms) differs from the holder's (`theirs`).
pub(super) fn other_lease(lock: &str, mine: u64, theirs: u64) -> Error {
    Error::misconfigured(
        NAME,
        Misconfiguration::IncompatibleLease,
        format!(
            "lock {lock:?}: the lease of {mine} ms differs from the lease of the current holder \
             ({theirs} ms): all nodes of a lock must use the same lease"
        ),
        None,
    )
}

/// What an acquisition or a resumption sends: the lease, checked, and the holder record.
pub(super) struct Prepared {
    pub(super) lease: Lease,
    pub(super) ms: u64,
    pub(super) record: Holder,
    pub(super) record_json: String,
}

impl RedisLock {
    /// Checks `req`'s lease (the backend's shortest and longest), starts the notification task,
    /// and writes the holder record (term 0 until granted), with this process's identity.
    pub(super) fn prepare(&self, req: &AcquireRequest) -> Result<Prepared, Error> {
        let lease = req.lease.unwrap_or_default();
        lease.validate(MIN_LEASE)?;
        let ms = lease_ms(lease.ttl());
        if ms > self.shared.max_lease_ms {
            return Err(Error::Config(ConfigError::InvalidTiming {
                setting: "lease",
                value: lease.ttl(),
                rule: format!(
                    "must not exceed the Redis backend's maximum lease ({} ms; see \
                     RedisBackend::with_max_lease)",
                    self.shared.max_lease_ms
                ),
            }));
        }
        self.shared.ensure_subscriber();
        let mut record = req.holder(0);
        record.process = ProcessIdentity::current();
        let record_json = serde_json::to_string(&record)
            .map_err(|e| Error::backend(NAME, "encode the holder record", e))?;
        Ok(Prepared {
            lease,
            ms,
            record,
            record_json,
        })
    }
}

fn lease_ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs the release script (checks the token and `term`, publishes `released`). `abandon` also
/// leaves a tombstone that refuses any later acquisition or resumption request with this token;
/// an abandoned request does not know its term (`None`), but its token is its own.
pub(super) async fn release(
    shared: &LockShared,
    token: &str,
    term: Option<u64>,
    abandon: bool,
) -> Result<bool, Error> {
    let tombstone_ms = if abandon {
        lease_ms_of(ABANDONED_FOR)
    } else {
        0
    };
    shared
        .lease
        .run("release", COMMAND_TIMEOUT, |mut c| {
            let keys = shared.keys.clone();
            let token = token.to_owned();
            async move {
                RELEASE
                    .key(&keys.lock)
                    .key(&keys.holder)
                    .key(&keys.lease)
                    .key(keys.abandoned(&token))
                    .arg(&token)
                    .arg(&keys.channel)
                    .arg(tombstone_ms)
                    .arg(term.map(|t| t.to_string()).unwrap_or_default())
                    .invoke_async::<i64>(&mut c)
                    .await
            }
        })
        .await
        .map(|n| n == 1)
}

impl Lock for RedisLock {
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
        Box::pin(async move {
            let Prepared {
                lease,
                ms,
                mut record,
                record_json,
            } = self.prepare(&req)?;
            let token = new_token();
            let poll = lease.ttl();
            let mut told_restart = false;
            loop {
                let mut changed = self.shared.events.holder.subscribe();
                let sent = Sent {
                    at: req.clock.now(),
                    instant: Instant::now(),
                };
                let attempt = self
                    .attempt(Ask::Acquire, req.node.id(), &token, ms, &record_json)
                    .await?;
                match attempt {
                    Attempt::Granted(grant) => {
                        let (token, term) = grant.take();
                        record.term = term;
                        return Ok(Box::new(RedisLeadership::start(
                            self.shared.clone(),
                            token,
                            term,
                            record,
                            lease,
                            req.clock,
                            sent,
                        )) as Box<dyn Leadership>);
                    }
                    Attempt::Wait(ms) => {
                        if !told_restart && ms >= 1000 {
                            told_restart = true;
                            tracing::info!(
                                lock = %self.shared.name,
                                wait_ms = ms,
                                "waiting until an earlier holder whose lock key may have been \
                                 lost (Redis restarted, flushed, or the key deleted or evicted) \
                                 has passed its lease"
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(ms.saturating_add(1))).await;
                    }
                    Attempt::Gone => {
                        return Err(Error::backend_msg(NAME, "acquire: unexpected reply gone"));
                    }
                    Attempt::Reserved(pttl_ms) => {
                        // Reserved for another node: wait until it takes the lock (its grant
                        // publishes `acquired`) or the reservation runs out, by the server's
                        // count.
                        let until_expiry = u64::try_from(pttl_ms)
                            .map_or(Duration::from_millis(1), |ms| {
                                Duration::from_millis(ms.saturating_add(1))
                            });
                        tokio::select! {
                            _ = changed.changed() => {}
                            () = tokio::time::sleep(until_expiry.min(poll)) => {}
                        }
                    }
                    Attempt::Held {
                        pttl_ms,
                        lease_ms: theirs,
                    } => {
                        if let Some(theirs) = theirs.filter(|t| *t != ms) {
                            return Err(other_lease(&self.shared.name, ms, theirs));
                        }
                        // Wake when the holder's key runs out (a crash costs the lease, not the
                        // lease plus a poll), on a release or key event, or on the slow poll.
                        let until_expiry = u64::try_from(pttl_ms)
                            .map_or(poll, |ms| Duration::from_millis(ms.saturating_add(1)));
                        tokio::select! {
                            _ = changed.changed() => {}
                            () = tokio::time::sleep(until_expiry.min(poll)) => {}
                        }
                    }
                }
            }
        })
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
        Box::pin(async move {
            let (record, term) = self
                .shared
                .commands
                .run("read the holder", COMMAND_TIMEOUT, |mut c| {
                    let key = self.shared.keys.holder.clone();
                    async move {
                        ::redis::cmd("HMGET")
                            .arg(&key)
                            .arg("record")
                            .arg("term")
                            .query_async::<(Option<String>, Option<String>)>(&mut c)
                            .await
                    }
                })
                .await?;
            let (Some(record), Some(term)) = (record, term) else {
                return Ok(None);
            };
            let mut holder: Holder = serde_json::from_str(&record).map_err(|e| Error::Corrupt {
                backend: NAME,
                what: format!("holder record of lock {:?}", self.shared.name),
                problem: e.to_string(),
            })?;
            holder.term = parse_term("holder term", &term)?;
            Ok(Some(holder))
        })
    }

    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            self.shared.ensure_subscriber();
            let rx = self.shared.events.holder.subscribe();
            self.shared.events.wait_live(&self.shared.name).await?;
            Ok(Box::new(VersionChanges(rx)) as Box<dyn Changes>)
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
        Box::pin(self.load_state(key))
    }

    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.store_state(key, value, term))
    }

    fn watch_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
        Box::pin(self.watch_state(key))
    }

    fn resume<'a>(
        &'a self,
        req: AcquireRequest,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Leadership>>, Error>> {
        Box::pin(self.resume_lease(req, token))
    }

    fn register(
        &self,
        entry: Candidate,
        lease: Option<Lease>,
    ) -> BoxFuture<'_, Result<Box<dyn Registration>, Error>> {
        Box::pin(self.register_candidate(entry, lease))
    }

    fn candidates(&self) -> BoxFuture<'_, Result<Vec<Candidate>, Error>> {
        Box::pin(self.read_candidates())
    }

    fn watch_candidates(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(self.watch_registry())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_leases_round_up() {
        let a = new_token();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_token());
        assert_eq!(lease_ms(Duration::from_micros(1_500_001)), 1501);
        assert_eq!(lease_ms(Duration::from_secs(2)), 2000);
    }
}
