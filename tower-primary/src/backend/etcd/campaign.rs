//! Campaigning for a lock: a lease, a candidate key, claims until this candidate's key is the
//! oldest; then the term it holds.

use std::fmt;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, TxnResponse,
};
use tokio::task::JoinHandle;

use super::lock::{EtcdLock, Held, HeldSlot, term_of};
use super::session::{Session, etcd_error};
use super::watch::monitor;
use super::{MIN_LEASE, NAME};
use crate::backend::{AcquireRequest, BoxFuture, Leadership, Renewals};
use crate::error::{ConfigError, Error};
use crate::role::Holder;

/// What a claim of the lock found.
enum Claim {
    /// The candidate's key was the oldest and still its own: it holds the lock now.
    Won,
    /// An older key exists; the transaction ran at this revision.
    Behind(i64),
    /// Its key is gone (its lease ran out).
    Gone,
}

impl EtcdLock {
    /// Claims the lock in one transaction: if our key still exists with its create revision and
    /// no older candidate does, writes the final holder record onto it; else tells why not.
    async fn claim(
        &self,
        client: &Client,
        key: &[u8],
        rev: i64,
        lease: i64,
        record: Vec<u8>,
    ) -> Result<Claim, Error> {
        let older = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1)
            // 0 would mean "no bound"; our own revision is always above 1.
            .with_max_create_revision((rev - 1).max(1));
        let txn = Txn::new()
            .when([
                // Our key, not one a lapsed lease left behind (research E5).
                Compare::create_revision(key.to_vec(), CompareOp::Equal, rev),
                // A range compare holds for every key in it: none is older than ours.
                Compare::create_revision(self.election.clone(), CompareOp::Greater, rev - 1)
                    .with_prefix(),
            ])
            .and_then([TxnOp::put(
                key.to_vec(),
                record,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([
                TxnOp::get(key.to_vec(), Some(GetOptions::new().with_keys_only())),
                TxnOp::get(self.election.clone(), Some(older)),
            ]);
        let resp = self.rpc("claim the lock", client.clone().txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Claim::Won);
        }
        let gets = gets(&resp);
        let (Some(own), Some(older)) = (gets.first(), gets.get(1)) else {
            return Err(self.corrupt("transaction reply", "missing range results"));
        };
        if own
            .kvs()
            .first()
            .is_none_or(|kv| kv.create_revision() != rev)
        {
            return Ok(Claim::Gone);
        }
        if older.kvs().is_empty() {
            // The compares and the reads saw the same revision: only a server that ignores range
            // compares (etcd before 3.3) gets here. Waiting would wait forever.
            return Err(Error::backend_msg(
                NAME,
                format!(
                    "lock {:?}: the server refused a claim although no older candidate exists \
                     (etcd 3.3 or newer is needed: range compares)",
                    self.name
                ),
            ));
        }
        Ok(Claim::Behind(revision_of(&resp)))
    }

    pub(super) async fn acquire_inner(
        &self,
        req: AcquireRequest,
    ) -> Result<Box<dyn Leadership>, Error> {
        let lease = req.lease.unwrap_or_default();
        if lease.ttl() < MIN_LEASE {
            return Err(Error::Config(ConfigError::InvalidTiming {
                setting: "lease",
                value: lease.ttl(),
                rule: format!("must be at least {MIN_LEASE:?} on the etcd backend"),
            }));
        }
        let client = self.backend.client().await?;
        // From here on, dropping `session` (an error, or this future dropped) revokes the lease and
        // with it the candidate key: nothing is leaked.
        let session = Session::grant(&client, lease, req.clock, self.timeout()).await?;
        let key = self.candidate_key(session.id);
        let candidate = serde_json::to_vec(&req.holder(0))
            .map_err(|e| Error::backend(NAME, "encode the holder record", e))?;
        let create = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                candidate,
                Some(PutOptions::new().with_lease(session.id)),
            )]);
        let resp = self
            .rpc("create the candidate key", client.clone().txn(create))
            .await?;
        if !resp.succeeded() {
            return Err(self.corrupt(
                "candidate key",
                "a fresh lease's key already exists (another client with the same lease id?)",
            ));
        }
        let rev = revision_of(&resp);
        // Every deletion after our key was created wakes us; the reads below see all before.
        let mut watch = self
            .watch(&client, &self.election, true, Some(rev + 1))
            .await?;
        let record = loop {
            let value = serde_json::to_vec(&req.holder(term_of(rev)))
                .map_err(|e| Error::backend(NAME, "encode the holder record", e))?;
            let seen = match self
                .claim(&client, &key, rev, session.id, value.clone())
                .await?
            {
                // The record exactly as every other node reads it (`since` in milliseconds).
                Claim::Won => {
                    break serde_json::from_slice::<Holder>(&value)
                        .map_err(|e| Error::backend(NAME, "decode the holder record", e))?;
                }
                Claim::Gone => {
                    return Err(Error::backend_msg(
                        NAME,
                        format!(
                            "lock {:?}: our candidate key vanished while waiting (lease expired)",
                            self.name
                        ),
                    ));
                }
                Claim::Behind(seen) => seen,
            };
            // Wait for a deletion after that read; then claim again.
            loop {
                tokio::select! {
                    reason = session.lost() => {
                        return Err(Error::backend_msg(NAME, format!("lock {:?}: while waiting: {reason}", self.name)));
                    }
                    msg = watch.message() => match msg {
                        Ok(Some(r)) if !r.canceled() => {
                            let deleted = r.events().iter().any(|e| {
                                e.event_type() == EventType::Delete
                                    && e.kv().is_some_and(|kv| kv.mod_revision() > seen)
                            });
                            if deleted {
                                break;
                            }
                        }
                        Ok(_) => {
                            return Err(Error::backend_msg(NAME, format!("lock {:?}: the candidates' watch ended", self.name)));
                        }
                        Err(e) => return Err(etcd_error(&format!("lock {:?}: the candidates' watch failed", self.name), e)),
                    }
                }
            }
        };
        let term = term_of(rev);
        // No await from here on: the grant is handed over whole, or dropped (and revoked) whole.
        let mut session = session;
        session.keep_on_drop();
        *crate::sync::lock(&self.held) = Some(Held {
            term,
            key: key.clone(),
        });
        let monitor = tokio::spawn(monitor(
            self.clone(),
            client,
            key,
            rev,
            watch,
            session.lost_sender(),
        ));
        Ok(Box::new(EtcdLeadership {
            lock: self.name.clone(),
            term,
            renewals: session.renewals(),
            record,
            session: Some(session),
            monitor,
            held: self.held.clone(),
        }))
    }
}

/// Holding the lock: one term.
struct EtcdLeadership {
    lock: String,
    term: u64,
    record: Holder,
    renewals: Renewals,
    session: Option<Session>,
    monitor: JoinHandle<()>,
    held: HeldSlot,
}

impl fmt::Debug for EtcdLeadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLeadership")
            .field("lock", &self.lock)
            .field("term", &self.term)
            .field("lease", &self.session.as_ref().map(|s| s.id))
            .finish_non_exhaustive()
    }
}

impl EtcdLeadership {
    fn forget(&self) {
        self.monitor.abort();
        let mut held = crate::sync::lock(&self.held);
        if held.as_ref().is_some_and(|h| h.term == self.term) {
            *held = None;
        }
    }
}

impl Leadership for EtcdLeadership {
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
            let reason = match &self.session {
                Some(session) => session.lost().await,
                None => std::future::pending().await,
            };
            Error::Lost {
                lock: self.lock.clone(),
                reason,
            }
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            self.forget();
            match self.session.take() {
                Some(session) => session.revoke().await,
                None => Ok(()),
            }
        })
    }
}

impl Drop for EtcdLeadership {
    fn drop(&mut self) {
        // Dropped without release (the runtime died): the session stops renewing and the lease
        // runs out, as after a crash; this node's deadline passes first.
        self.forget();
    }
}

fn revision_of(resp: &TxnResponse) -> i64 {
    resp.header().map_or(0, |h| h.revision())
}

fn gets(resp: &TxnResponse) -> Vec<etcd_client::GetResponse> {
    resp.op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}
