//! One etcd lease and its keepalive loop: what a candidate and then a primary stands on.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, Txn, TxnOp};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::NAME;
use crate::backend::Lease;
use crate::backend::{RenewalSender, Renewals, renewals};
use crate::clock::Clock;
use crate::error::{Error, Misconfiguration};

/// How soon a failed keepalive is retried (the elector's deadline bounds the whole episode).
const RETRY: Duration = Duration::from_millis(100);

/// Why a lease is gone, once it is; shared by the keepalive loop and the own-key watch.
pub(super) type LostSender = Arc<watch::Sender<Option<String>>>;

/// A granted lease, kept alive every `lease / 3` by a task of its own.
///
/// Dropping it stops the keepalives. While it only backs a candidate, dropping it also revokes
/// the lease in the background (a best effort: if that fails, the lease runs out on the server),
/// so a dropped acquisition never keeps the lock. Once it backs a leadership
/// ([`keep_on_drop`](Self::keep_on_drop)) a drop leaves the lease to expire, as a crash would: a
/// holder that vanished without releasing may still read as primary until its deadline, so the
/// lock must not be free before that. [`Session::revoke`] revokes it and waits.
pub(super) struct Session {
    pub(super) id: i64,
    client: Client,
    renewals: Renewals,
    lost_tx: LostSender,
    lost_rx: watch::Receiver<Option<String>>,
    keepalive: JoinHandle<()>,
    timeout: Duration,
    armed: bool,
}

/// The lease TTL etcd is asked for: whole seconds, rounded up so the server never expires a lease
/// before the elector's deadline.
pub(super) fn ttl_secs(lease: Lease) -> i64 {
    let ms = lease.ttl().as_millis();
    i64::try_from(ms.div_ceil(1000)).unwrap_or(i64::MAX)
}

impl Session {
    /// Grants a lease and starts keeping it alive. The grant's send time is the first renewal.
    pub(super) async fn grant(
        client: &Client,
        lease: Lease,
        clock: Clock,
        timeout: Duration,
    ) -> Result<Session, Error> {
        let ttl = ttl_secs(lease);
        let sent = clock.now();
        let granted = rpc(
            timeout,
            "grant a lease",
            client.clone().lease_grant(ttl, None),
        )
        .await?;
        if !granted.error().is_empty() {
            return Err(Error::backend_msg(
                NAME,
                format!("grant a lease: {}", granted.error()),
            ));
        }
        let id = granted.id();
        let (lost_tx, lost_rx) = watch::channel(None);
        let lost_tx = Arc::new(lost_tx);
        let (tx, renewals) = renewals(sent);
        let keepalive = tokio::spawn(keep_alive(
            client.clone(),
            id,
            None,
            lease.renew_every(),
            clock,
            tx,
            lost_tx.clone(),
        ));
        let session = Session {
            id,
            client: client.clone(),
            renewals,
            lost_tx,
            lost_rx,
            keepalive,
            timeout,
            armed: true,
        };
        if granted.ttl() < ttl {
            // Never seen: etcd raises short TTLs to its minimum, it does not shorten them.
            return Err(Error::backend_msg(
                NAME,
                format!("asked for a lease of {ttl} s, granted {} s", granted.ttl()),
            ));
        }
        if granted.ttl() > ttl {
            tracing::warn!(
                asked = ttl,
                granted = granted.ttl(),
                "etcd granted a longer lease than asked (its minimum TTL); failover takes longer"
            );
        }
        Ok(session)
    }

    /// Keeps an existing lease alive from this process (etcd leases belong to no connection):
    /// one keepalive now, whose send time is the first renewal, then the loop. `None` when
    /// the lease is gone, or was granted shorter than `lease` (the server would expire it
    /// before this node's deadline).
    ///
    /// The session starts disarmed: a drop leaves the lease alone until [`arm`](Self::arm).
    pub(super) async fn adopt(
        client: &Client,
        id: i64,
        lease: Lease,
        clock: Clock,
        timeout: Duration,
    ) -> Result<Option<Session>, Error> {
        let ttl = ttl_secs(lease);
        let live = rpc(
            timeout,
            "read the lease",
            client.clone().lease_time_to_live(id, None),
        )
        .await?;
        if live.ttl() <= 0 {
            return Ok(None);
        }
        if live.granted_ttl() < ttl {
            tracing::warn!(
                lease = id,
                granted = live.granted_ttl(),
                asked = ttl,
                "the lease to resume was granted shorter than this node's lease; campaigning instead"
            );
            return Ok(None);
        }
        let sent = clock.now();
        let stream = match tokio::time::timeout(timeout, client.clone().lease_keep_alive(id)).await
        {
            // Opening the stream sends a keepalive and awaits its answer.
            Ok(Ok(opened)) => opened,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(msg))) if msg.contains("not found") => {
                return Ok(None);
            }
            Ok(Err(e)) => return Err(etcd_error("keep the lease alive", e)),
            Err(_) => {
                return Err(Error::backend_msg(
                    NAME,
                    format!("keep the lease alive: no answer within {timeout:?}"),
                ));
            }
        };
        let (lost_tx, lost_rx) = watch::channel(None);
        let lost_tx = Arc::new(lost_tx);
        let (tx, renewals) = renewals(sent);
        let keepalive = tokio::spawn(keep_alive(
            client.clone(),
            id,
            Some(stream),
            lease.renew_every(),
            clock,
            tx,
            lost_tx.clone(),
        ));
        Ok(Some(Session {
            id,
            client: client.clone(),
            renewals,
            lost_tx,
            lost_rx,
            keepalive,
            timeout,
            armed: false,
        }))
    }

    /// From now on a drop revokes the lease (in the background).
    pub(super) fn arm(&mut self) {
        self.armed = true;
    }

    /// From now on a drop stops the keepalives but leaves the lease to expire.
    pub(super) fn keep_on_drop(&mut self) {
        self.armed = false;
    }

    /// The confirmed renewals (send times).
    pub(super) fn renewals(&self) -> Renewals {
        self.renewals.clone()
    }

    /// Where the own-key watch reports a loss.
    pub(super) fn lost_sender(&self) -> LostSender {
        self.lost_tx.clone()
    }

    /// Resolves with the reason once the lease (or the key on it) is known to be gone.
    ///
    /// Cancel-safe.
    pub(super) async fn lost(&self) -> String {
        let mut rx = self.lost_rx.clone();
        let reason = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|r| r.clone());
        match reason {
            Some(reason) => reason,
            // The sender lives as long as `self`.
            None => std::future::pending().await,
        }
    }

    /// The reason, if the lease (or the key on it) is already known to be gone.
    pub(super) fn lost_now(&self) -> Option<String> {
        self.lost_rx.borrow().clone()
    }

    /// Stops the keepalives and revokes the lease, deleting the keys attached to it (which wakes
    /// the waiters). A lease that has already expired counts as revoked.
    pub(super) async fn revoke(mut self) -> Result<(), Error> {
        self.armed = false;
        self.keepalive.abort();
        revoke(&self.client, self.id, self.timeout).await
    }

    /// Ends a term whose claim on `key` was at revision `claim`: deletes the key if nothing has
    /// claimed it since (which wakes the waiters), with `ahead` (the mark of a holder that took
    /// a reservation) if it stands on this lease, and only then revokes the lease. A key claimed
    /// again belongs to the process that resumed this lease: then the lease is left to it, and
    /// only the keepalives stop. Should the check fail to get an answer, the lease is revoked as
    /// before resumptions existed.
    pub(super) async fn release_claim(
        self,
        key: Vec<u8>,
        claim: i64,
        ahead: Vec<u8>,
    ) -> Result<(), Error> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, claim)])
            .and_then([
                TxnOp::delete(key, None),
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::lease(ahead.clone(), CompareOp::Equal, self.id)])
                        .and_then([TxnOp::delete(ahead, None)]),
                ),
            ]);
        match rpc(self.timeout, "delete our key", self.client.clone().txn(txn)).await {
            Ok(done) if !done.succeeded() => {
                let mut session = self;
                session.armed = false;
                Ok(())
            }
            Ok(_) => self.revoke().await,
            Err(err) => {
                tracing::debug!(lease = self.id, error = %err, "deleting our key failed; revoking");
                self.revoke().await
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keepalive.abort();
        if !self.armed {
            return;
        }
        // A dropped acquisition: free the lock now rather than after the TTL.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (client, id, timeout) = (self.client.clone(), self.id, self.timeout);
            rt.spawn(async move {
                if let Err(err) = revoke(&client, id, timeout).await {
                    tracing::debug!(lease = id, error = %err, "revoking a dropped lease failed; it will expire");
                }
            });
        }
    }
}

async fn revoke(client: &Client, id: i64, timeout: Duration) -> Result<(), Error> {
    match tokio::time::timeout(timeout, client.clone().lease_revoke(id)).await {
        Ok(Ok(_)) => Ok(()),
        // gRPC NOT_FOUND (5): "etcdserver: requested lease not found".
        Ok(Err(etcd_client::Error::GRpcStatus(s))) if i32::from(s.code()) == 5 => Ok(()),
        Ok(Err(e)) => Err(etcd_error("revoke the lease", e)),
        Err(_) => Err(Error::backend_msg(
            NAME,
            format!("revoke the lease: no answer within {timeout:?}"),
        )),
    }
}

/// Runs `fut` with a timeout, mapping both failures to backend errors saying what was done.
pub(super) async fn rpc<T>(
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(etcd_error(what, e)),
        Err(_) => Err(Error::backend_msg(
            NAME,
            format!("{what}: no answer within {timeout:?}"),
        )),
    }
}

/// The error of a failed request, in words (the driver's `Display` of a gRPC status shows its
/// metadata map): [`Error::Misconfigured`] when retrying cannot help (credentials refused, no
/// permission, a failed TLS handshake), else [`Error::Backend`]. The causes are in the message
/// too, since loggers often print only the top error.
pub(super) fn etcd_error(what: &str, e: etcd_client::Error) -> Error {
    let problem = describe(&e);
    let lower = problem.to_lowercase();
    // The channel connects lazily: a failed handshake shows as the status of the first request
    // ("unavailable"), in the transport's words.
    let tls = ["tls", "certificate", "handshake", "corrupt message"]
        .iter()
        .any(|w| lower.contains(w));
    let kind = match &e {
        _ if tls => Some(Misconfiguration::Tls),
        etcd_client::Error::GRpcStatus(status) => match i32::from(status.code()) {
            // gRPC codes: 16 unauthenticated, 7 permission denied.
            16 => Some(Misconfiguration::Authentication),
            7 => Some(Misconfiguration::Permission),
            _ if lower.contains("authentication") || lower.contains("auth token") => {
                Some(Misconfiguration::Authentication)
            }
            _ if lower.contains("permission denied") => Some(Misconfiguration::Permission),
            _ => None,
        },
        _ => None,
    };
    let message = format!("{what}: {problem}");
    // A status says no more than its message, and its `Display` would bring the metadata map
    // into every log that shows the sources.
    let source: Option<crate::error::BoxError> = match e {
        etcd_client::Error::GRpcStatus(_) => None,
        other => Some(Box::new(other)),
    };
    match kind {
        Some(kind) => {
            let fix = match kind {
                Misconfiguration::Authentication => "check the user name and password",
                Misconfiguration::Permission => {
                    "grant this user a role with read-write access to the key prefix"
                }
                _ => {
                    "check etcd:// or etcds:// (does the server serve TLS?) and the CA certificate"
                }
            };
            Error::misconfigured(NAME, kind, format!("{message}; {fix}"), source)
        }
        None => Error::Backend {
            backend: NAME,
            message,
            source,
        },
    }
}

/// What went wrong, in words: a gRPC status as its message (the driver's `Display` of one shows
/// its metadata map), anything else with its causes, each once.
pub(super) fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let text = status.message().trim_start_matches("etcdserver: ");
            let mut shown = if text.is_empty() {
                status.code().description().to_lowercase()
            } else {
                text.to_owned()
            };
            // A transport failure carries its cause (connection refused, …) as the source.
            if let Some(source) = std::error::Error::source(status) {
                for part in crate::error::Chain(source).to_string().split(": ") {
                    if !shown.contains(part) {
                        shown.push_str(": ");
                        shown.push_str(part);
                    }
                }
            }
            shown
        }
        other => crate::error::Chain(other).to_string(),
    }
}

enum Renewal {
    Alive,
    Gone,
    Failed(String),
}

/// The keepalive loop: one request every `every`, one answer awaited at a time (so an answer is
/// always the answer to the request whose send time is reported), a fresh stream after any
/// failure. `stream` is one already open, if any.
async fn keep_alive(
    client: Client,
    id: i64,
    mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    every: Duration,
    clock: Clock,
    tx: RenewalSender,
    lost: LostSender,
) {
    let mut next = Instant::now() + every;
    loop {
        tokio::time::sleep_until(next).await;
        let started = Instant::now();
        let sent = clock.now();
        let outcome = match tokio::time::timeout(every, renew(&client, id, &mut stream)).await {
            Ok(outcome) => outcome,
            Err(_) => Renewal::Failed(format!("no answer within {every:?}")),
        };
        match outcome {
            Renewal::Alive => {
                tx.confirm(sent);
                next = started + every;
            }
            Renewal::Gone => {
                lost.send_replace(Some("the lease expired on the etcd server".to_owned()));
                return;
            }
            Renewal::Failed(why) => {
                tracing::debug!(lease = id, error = %why, "lease keepalive failed; retrying");
                stream = None;
                next = Instant::now() + RETRY;
            }
        }
    }
}

async fn renew(
    client: &Client,
    id: i64,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Renewal {
    match stream {
        Some((keeper, responses)) => {
            if let Err(e) = keeper.keep_alive().await {
                return Renewal::Failed(describe(&e));
            }
            match responses.message().await {
                Ok(Some(r)) if r.ttl() > 0 => Renewal::Alive,
                Ok(Some(_)) => Renewal::Gone,
                Ok(None) => Renewal::Failed("keepalive stream ended".to_owned()),
                Err(e) => Renewal::Failed(describe(&e)),
            }
        }
        None => match client.clone().lease_keep_alive(id).await {
            // Opening the stream sends a keepalive and awaits its answer.
            Ok(opened) => {
                *stream = Some(opened);
                Renewal::Alive
            }
            Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg.contains("not found") => {
                Renewal::Gone
            }
            Err(e) => Renewal::Failed(describe(&e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_round_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Lease::new(Duration::from_secs(2))), 2);
        assert_eq!(ttl_secs(Lease::new(Duration::from_millis(2001))), 3);
        assert_eq!(ttl_secs(Lease::new(Duration::from_millis(2500))), 3);
    }
}
