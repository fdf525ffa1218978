//! Campaigning for a lock: a lease, a candidate key, claims until this candidate's key is the
//! oldest; then the term it holds (the claim's revision), until it is released or lost.

use std::fmt;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, TxnResponse, WatchResponse, WatchStream,
};
use tokio::task::JoinHandle;

use super::lock::{EtcdLock, Held, HeldSlot, term_of};
use super::reserve::Reservation;
use super::resume::Token;
use super::session::{Session, etcd_error};
use super::watch::monitor;
use super::{MIN_LEASE, NAME};
use crate::backend::{AcquireRequest, BoxFuture, Leadership, Lease, Renewals};
use crate::error::{ConfigError, Error};
use crate::role::Holder;

/// What a claim of the lock found.
pub(super) enum Claim {
    /// The candidate's key was the oldest and still its own: it holds the lock now. `claim` is
    /// the revision of the write, `term` the term, `record` the holder record written.
    Won {
        claim: i64,
        term: i64,
        record: Vec<u8>,
    },
    /// An older key exists; the transaction ran at this revision.
    Behind(i64),
    /// Our key is the oldest, but a term was raised after its creation (so ours must be raised
    /// too) while a candidate of version 0.1 waits behind it: a raised term would be above that
    /// candidate's future one (its create revision).
    OldWaiting,
    /// Something changed between two transactions of one claim: claim again.
    Again,
    /// Its key is gone (its lease ran out).
    Gone,
    /// A live reservation names this node: claim with it ([`EtcdLock::claim_reserved`]).
    Reserved(Reservation),
}

impl EtcdLock {
    /// Claims the lock: if our key still exists with its create revision and no older
    /// candidate does, writes the final holder record onto it; else tells why not.
    ///
    /// The term is the key's create revision, as in version 0.1, when no term was raised after
    /// the key's creation (the mod revision of [`raised_key`](Self::raised_key) is below it):
    /// every earlier term is then below it. Otherwise the term is **raised** to the claim's own
    /// revision, which a second transaction writes, with the raised key, only while no
    /// candidate of version 0.1 exists.
    async fn claim(
        &self,
        client: &Client,
        key: &[u8],
        rev: i64,
        lease: i64,
        req: &AcquireRequest,
    ) -> Result<Claim, Error> {
        let older = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1)
            // 0 would mean "no bound"; our own revision is always above 1.
            .with_max_create_revision((rev - 1).max(1));
        let ours = [
            // Our key, not one a lapsed lease left behind (research E5).
            Compare::create_revision(key.to_vec(), CompareOp::Equal, rev),
            // A range compare holds for every key in it: none is older than ours.
            Compare::create_revision(self.election.clone(), CompareOp::Greater, rev - 1)
                .with_prefix(),
            // No reservation for anybody (ours is claimed by `claim_reserved`), and no holder
            // that took one ahead of the key order.
            Compare::create_revision(self.reserved_key(), CompareOp::Equal, 0),
            Compare::create_revision(self.reserved_holder_key(), CompareOp::Equal, 0),
        ];
        let (old_start, old_end) = self.old_keys();
        let record = encode(&req.holder(term_of(rev)))?;
        let txn = Txn::new()
            .when(
                ours.iter()
                    .cloned()
                    .chain([Compare::mod_revision(
                        self.raised_key(),
                        CompareOp::Less,
                        rev,
                    )])
                    .collect::<Vec<_>>(),
            )
            .and_then([TxnOp::put(
                key.to_vec(),
                record.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([
                TxnOp::get(key.to_vec(), Some(GetOptions::new().with_keys_only())),
                TxnOp::get(self.election.clone(), Some(older)),
                TxnOp::get(self.raised_key(), Some(GetOptions::new().with_keys_only())),
                TxnOp::get(
                    old_start.clone(),
                    Some(
                        GetOptions::new()
                            .with_range(old_end.clone())
                            .with_count_only(),
                    ),
                ),
                TxnOp::get(self.reserved_key(), None),
                TxnOp::get(
                    self.reserved_holder_key(),
                    Some(GetOptions::new().with_keys_only()),
                ),
            ]);
        let resp = self.rpc("claim the lock", client.clone().txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Claim::Won {
                claim: revision_of(&resp),
                term: rev,
                record,
            });
        }
        let gets = gets(&resp);
        let (Some(own), Some(older), Some(raised), Some(old), Some(reserved), Some(ahead)) = (
            gets.first(),
            gets.get(1),
            gets.get(2),
            gets.get(3),
            gets.get(4),
            gets.get(5),
        ) else {
            return Err(self.corrupt("transaction reply", "missing range results"));
        };
        if own
            .kvs()
            .first()
            .is_none_or(|kv| kv.create_revision() != rev)
        {
            return Ok(Claim::Gone);
        }
        if !ahead.kvs().is_empty() {
            return Ok(Claim::Behind(revision_of(&resp)));
        }
        if let Some(kv) = reserved.kvs().first() {
            return Ok(match self.reservation_for(kv, req.node.id()) {
                Some(reservation) => Claim::Reserved(reservation),
                None => Claim::Behind(revision_of(&resp)),
            });
        }
        if !older.kvs().is_empty() {
            return Ok(Claim::Behind(revision_of(&resp)));
        }
        if raised
            .kvs()
            .first()
            .is_none_or(|kv| kv.mod_revision() < rev)
        {
            // The compares and the reads saw the same revision: only a server that ignores
            // range compares (etcd before 3.3) gets here. Waiting would wait forever.
            return Err(Error::backend_msg(
                NAME,
                format!(
                    "lock {:?}: the server refused a claim although no older candidate exists \
                     (etcd 3.3 or newer is needed: range compares)",
                    self.name
                ),
            ));
        }
        if old.count() > 0 {
            return Ok(Claim::OldWaiting);
        }
        // A raised claim: the term is this write's revision.
        let record = encode(&req.holder(0))?;
        let txn = Txn::new()
            .when(
                ours.into_iter()
                    .chain([Compare::create_revision(old_start, CompareOp::Equal, 0)
                        .with_range(old_end)])
                    .collect::<Vec<_>>(),
            )
            .and_then([
                TxnOp::put(
                    key.to_vec(),
                    record.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(self.raised_key(), Vec::new(), None),
            ]);
        let resp = self.rpc("claim the lock", client.clone().txn(txn)).await?;
        if !resp.succeeded() {
            return Ok(Claim::Again);
        }
        let claim = revision_of(&resp);
        Ok(Claim::Won {
            claim,
            term: claim,
            record,
        })
    }

    /// Gives our place up to the candidates of version 0.1 behind us: deletes our key and
    /// creates it again (two transactions: one cannot delete and put the same key), so that it
    /// is younger than theirs. Returns the new key's create revision.
    async fn yield_place(
        &self,
        client: &Client,
        key: &[u8],
        rev: i64,
        lease: i64,
        candidate: Vec<u8>,
    ) -> Result<i64, Error> {
        let delete = Txn::new()
            .when([Compare::create_revision(
                key.to_vec(),
                CompareOp::Equal,
                rev,
            )])
            .and_then([TxnOp::delete(key.to_vec(), None)]);
        self.rpc("give our place up", client.clone().txn(delete))
            .await?;
        self.create_candidate(client, key, lease, candidate).await
    }

    /// Creates our candidate key on `lease` (a transaction that only creates); returns its
    /// create revision.
    async fn create_candidate(
        &self,
        client: &Client,
        key: &[u8],
        lease: i64,
        candidate: Vec<u8>,
    ) -> Result<i64, Error> {
        let create = Txn::new()
            .when([Compare::create_revision(key.to_vec(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.to_vec(),
                candidate,
                Some(PutOptions::new().with_lease(lease)),
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
        Ok(revision_of(&resp))
    }

    pub(super) async fn acquire_inner(
        &self,
        req: AcquireRequest,
    ) -> Result<Box<dyn Leadership>, Error> {
        let lease = check_lease(&req)?;
        let client = self.backend.client().await?;
        // From here on, dropping `session` (an error, or this future dropped) revokes the lease and
        // with it the candidate key: nothing is leaked.
        let session = Session::grant(&client, lease, req.clock, self.timeout()).await?;
        let key = self.candidate_key(session.id);
        // A candidate's record has no term yet.
        let candidate = encode(&req.holder(0))?;
        let mut rev = self
            .create_candidate(&client, &key, session.id, candidate.clone())
            .await?;
        // Every deletion after our key was created wakes us; the reads below see all before.
        let mut watch = self
            .watch(&client, &self.election, true, Some(rev + 1))
            .await?;
        // And so does every deletion of a reservation, or of the mark of a holder that took one.
        let reserved_key = self.reserved_key();
        let mut reserved = self
            .watch(&client, &reserved_key, true, Some(rev + 1))
            .await?;
        let mut reservation = None;
        let (claim, term, record) = loop {
            let outcome = match reservation.take() {
                Some(r) => {
                    let outcome = self
                        .claim_reserved(&client, &key, rev, session.id, &req, &r)
                        .await?;
                    // Waiting for the reserving holder to let go: claim with it at once then.
                    if matches!(outcome, Claim::Behind(_)) {
                        reservation = Some(r);
                    }
                    outcome
                }
                None => self.claim(&client, &key, rev, session.id, &req).await?,
            };
            let seen = match outcome {
                Claim::Won {
                    claim,
                    term,
                    record,
                } => break (claim, term, record),
                Claim::Again => continue,
                Claim::Gone => {
                    return Err(Error::backend_msg(
                        NAME,
                        format!(
                            "lock {:?}: our candidate key vanished while waiting (lease expired)",
                            self.name
                        ),
                    ));
                }
                Claim::OldWaiting => {
                    tracing::info!(
                        lock = %self.name,
                        "a term was raised since our key was made, and a node of version 0.1 \
                         waits for this lock: giving it our place"
                    );
                    rev = self
                        .yield_place(&client, &key, rev, session.id, candidate.clone())
                        .await?;
                    continue;
                }
                Claim::Reserved(r) => {
                    reservation = Some(r);
                    continue;
                }
                Claim::Behind(seen) => seen,
            };
            // Wait for a deletion after that read; then claim again.
            loop {
                tokio::select! {
                    reason = session.lost() => {
                        return Err(Error::backend_msg(NAME, format!("lock {:?}: while waiting: {reason}", self.name)));
                    }
                    msg = watch.message() => if self.deleted_after(msg, seen)? {
                        break;
                    },
                    msg = reserved.message() => {
                        // A reservation for us, made while we wait: claim with it at once when
                        // the holder lets go.
                        if let Ok(Some(r)) = &msg {
                            let ours = r.events().iter().filter(|e| e.event_type() == EventType::Put)
                                .filter_map(|e| e.kv())
                                .filter(|kv| kv.key() == reserved_key.as_slice())
                                .find_map(|kv| self.reservation_for(kv, req.node.id()));
                            if ours.is_some() {
                                reservation = ours;
                            }
                        }
                        if self.deleted_after(msg, seen)? {
                            break;
                        }
                    },
                }
            }
        };
        let won = Claimed {
            key,
            term,
            claim,
            record: decode(&record, term)?,
        };
        Ok(self.hand_over(client, session, won, watch))
    }

    /// Whether a watch message reports a deletion after revision `seen`; an error when the
    /// watch ended.
    fn deleted_after(
        &self,
        msg: Result<Option<WatchResponse>, etcd_client::Error>,
        seen: i64,
    ) -> Result<bool, Error> {
        match msg {
            Ok(Some(r)) if !r.canceled() => Ok(r.events().iter().any(|e| {
                e.event_type() == EventType::Delete
                    && e.kv().is_some_and(|kv| kv.mod_revision() > seen)
            })),
            Ok(_) => Err(Error::backend_msg(
                NAME,
                format!("lock {:?}: the candidates' watch ended", self.name),
            )),
            Err(e) => Err(etcd_error(
                &format!("lock {:?}: the candidates' watch failed", self.name),
                e,
            )),
        }
    }

    /// Makes the leadership of a won claim (a fresh one or a resumption): no await, so that the
    /// grant is handed over whole, or dropped (and revoked) whole.
    pub(super) fn hand_over(
        &self,
        client: Client,
        mut session: Session,
        won: Claimed,
        watch: WatchStream,
    ) -> Box<dyn Leadership> {
        let Claimed {
            key,
            term,
            claim,
            record,
        } = won;
        session.keep_on_drop();
        let lease = session.id;
        *crate::sync::lock(&self.held) = Some(Held {
            term: term_of(term),
            key: key.clone(),
            claim,
        });
        let monitor = tokio::spawn(monitor(
            self.clone(),
            client,
            key.clone(),
            claim,
            watch,
            session.lost_sender(),
        ));
        Box::new(EtcdLeadership {
            etcd: self.clone(),
            lock: self.name.clone(),
            term: term_of(term),
            renewals: session.renewals(),
            record,
            token: Token {
                lease,
                key: String::from_utf8_lossy(&key).into_owned(),
                revision: claim,
                term: term_of(term),
            },
            session: Some(session),
            monitor,
            held: self.held.clone(),
        })
    }
}

/// A won claim: our key, the term, the revision of the claim's write, the holder record.
pub(super) struct Claimed {
    pub(super) key: Vec<u8>,
    pub(super) term: i64,
    pub(super) claim: i64,
    pub(super) record: Holder,
}

/// The lease of a request, checked against etcd's minimum.
pub(super) fn check_lease(req: &AcquireRequest) -> Result<Lease, Error> {
    let lease = req.lease.unwrap_or_default();
    if lease.ttl() < MIN_LEASE {
        return Err(Error::Config(ConfigError::InvalidTiming {
            setting: "lease",
            value: lease.ttl(),
            rule: format!("must be at least {MIN_LEASE:?} on the etcd backend"),
        }));
    }
    Ok(lease)
}

pub(super) fn encode(holder: &Holder) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(holder).map_err(|e| Error::backend(NAME, "encode the holder record", e))
}

/// The record exactly as every other node reads it (`since` in milliseconds), with its term.
pub(super) fn decode(raw: &[u8], term: i64) -> Result<Holder, Error> {
    let mut holder = serde_json::from_slice::<Holder>(raw)
        .map_err(|e| Error::backend(NAME, "decode the holder record", e))?;
    holder.term = term_of(term);
    Ok(holder)
}

/// Holding the lock: one term.
struct EtcdLeadership {
    etcd: EtcdLock,
    lock: String,
    term: u64,
    record: Holder,
    token: Token,
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

    fn resume_token(&self) -> Option<String> {
        Some(self.token.encode())
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            self.forget();
            match self.session.take() {
                Some(session) => {
                    let key = self.token.key.clone().into_bytes();
                    let ahead = self.etcd.reserved_holder_key();
                    session.release_claim(key, self.token.revision, ahead).await
                }
                None => Ok(()),
            }
        })
    }

    fn reserve<'a>(
        &'a mut self,
        node: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if let Some(reason) = self.session.as_ref().and_then(Session::lost_now) {
                return Err(Error::Lost {
                    lock: self.lock.clone(),
                    reason,
                });
            }
            let key = self.token.key.clone().into_bytes();
            self.etcd
                .reserve_for(&key, self.token.revision, self.term, node, window)
                .await
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

pub(super) fn revision_of(resp: &TxnResponse) -> i64 {
    resp.header().map_or(0, |h| h.revision())
}

pub(super) fn gets(resp: &TxnResponse) -> Vec<etcd_client::GetResponse> {
    resp.op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}
