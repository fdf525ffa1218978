//! Reservations ([`Leadership::reserve`](crate::backend::Leadership::reserve)): the lock held
//! for a chosen successor, which may take it out of key order.
//!
//! - `P/L/reserved` names the node, on a fresh lease of `max(window, 2 s)` (etcd times it),
//!   written in a transaction that checks this term still holds (the holder key's mod revision
//!   is still the term's claim), as state writes are. A later one replaces it.
//! - While it exists, no claim of another node succeeds (every claim compares it absent), and
//!   the waiters watch it: they try again when it is deleted (taken, or expired with its lease).
//! - The reserved node claims **out of key order**, in one transaction: the reservation is
//!   still the one it read (mod revision), the reserving holder's key is gone, no candidate of
//!   version 0.1 exists, no holder ahead of the order exists, our key still exists. It writes
//!   the holder record (term 0: the term is the claim's revision, above every earlier term),
//!   `P/L/raised` (so that keys older than the claim raise their terms too), deletes the
//!   reservation, and writes `P/L/reserved-holder` (our key, on our lease), which every other
//!   claim compares absent: keys older than ours must wait until we are gone. Releasing deletes
//!   it with our key; an expired lease deletes both at once.
//! - While a candidate of version 0.1 exists, no claim out of key order is made (its term, its
//!   key's create revision, could fall below ours): the reserved node deletes the reservation
//!   and waits in key order like everyone else. Nodes of version 0.1 do not know reservations:
//!   one whose key is the oldest takes the lock in order when the holder lets go.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};

use super::campaign::{Claim, encode, gets, revision_of};
use super::lock::EtcdLock;
use super::session::ttl_secs;
use super::{MIN_LEASE, NAME};
use crate::backend::{AcquireRequest, Lease};
use crate::error::Error;

/// The value of `P/L/reserved`.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The node the lock is reserved for.
    node: String,
    /// The reserving holder's key: the reserved node claims once it is gone.
    holder: String,
    /// The reserving term (for people reading the key).
    term: u64,
}

/// A live reservation for this node, as a claim read it.
#[derive(Debug)]
pub(super) struct Reservation {
    /// The reservation key's mod revision.
    revision: i64,
    /// The reserving holder's key.
    holder: Vec<u8>,
}

impl EtcdLock {
    /// `P/L/reserved`: the reservation. A prefix watch on it sees `P/L/reserved-holder` too.
    pub(super) fn reserved_key(&self) -> Vec<u8> {
        let mut key = self.base().to_vec();
        key.extend_from_slice(b"reserved");
        key
    }

    /// `P/L/reserved-holder`: the key of a holder that took a reservation (ahead of the key
    /// order), on its lease.
    pub(super) fn reserved_holder_key(&self) -> Vec<u8> {
        let mut key = self.reserved_key();
        key.extend_from_slice(b"-holder");
        key
    }

    /// The reservation stored in `kv`, if it names `node` (one that does not parse names
    /// nobody: it only delays the others until it expires).
    pub(super) fn reservation_for(&self, kv: &KeyValue, node: &str) -> Option<Reservation> {
        let record: Record = serde_json::from_slice(kv.value()).ok()?;
        (record.node == node).then(|| Reservation {
            revision: kv.mod_revision(),
            holder: record.holder.into_bytes(),
        })
    }

    /// Reserves the lock for `node`, while the term `term` (holder key `key`, claimed at
    /// `claim`) holds it.
    pub(super) async fn reserve_for(
        &self,
        key: &[u8],
        claim: i64,
        term: u64,
        node: &str,
        window: Duration,
    ) -> Result<(), Error> {
        let client = self.backend.client().await?;
        let ttl = ttl_secs(Lease::new(window.max(MIN_LEASE)));
        let granted = self
            .rpc(
                "grant the reservation's lease",
                client.clone().lease_grant(ttl, None),
            )
            .await?;
        let lease = granted.id();
        let record = serde_json::to_vec(&Record {
            node: node.to_owned(),
            holder: String::from_utf8_lossy(key).into_owned(),
            term,
        })
        .map_err(|e| Error::backend(NAME, "encode the reservation", e))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key.to_vec(), CompareOp::Equal, claim)])
            .and_then([TxnOp::put(
                self.reserved_key(),
                record,
                Some(PutOptions::new().with_lease(lease).with_prev_key()),
            )]);
        let resp = match self.rpc("reserve the lock", client.clone().txn(txn)).await {
            Ok(resp) => resp,
            Err(e) => {
                revoke_later(&client, lease);
                return Err(e);
            }
        };
        if !resp.succeeded() {
            revoke_later(&client, lease);
            return Err(Error::StaleTerm {
                lock: self.name.clone(),
                term,
                current: self.current_term().await.filter(|c| *c != term),
            });
        }
        // The replaced reservation's lease holds nothing any more.
        for op in resp.op_responses() {
            if let TxnOpResponse::Put(put) = op
                && let Some(prev) = put.prev_key()
                && prev.lease() != 0
            {
                revoke_later(&client, prev.lease());
            }
        }
        Ok(())
    }

    /// Claims the lock with `reservation`, which names us, ahead of the key order (see the
    /// module docs). The term is the claim's revision.
    pub(super) async fn claim_reserved(
        &self,
        client: &etcd_client::Client,
        key: &[u8],
        rev: i64,
        lease: i64,
        req: &AcquireRequest,
        reservation: &Reservation,
    ) -> Result<Claim, Error> {
        let (old_start, old_end) = self.old_keys();
        let reserved = self.reserved_key();
        let ahead = self.reserved_holder_key();
        let keys_only = || Some(GetOptions::new().with_keys_only());
        let record = encode(&req.holder(0))?;
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.to_vec(), CompareOp::Equal, rev),
                Compare::mod_revision(reserved.clone(), CompareOp::Equal, reservation.revision),
                Compare::create_revision(reservation.holder.clone(), CompareOp::Equal, 0),
                Compare::create_revision(ahead.clone(), CompareOp::Equal, 0),
                Compare::create_revision(old_start.clone(), CompareOp::Equal, 0)
                    .with_range(old_end.clone()),
            ])
            .and_then([
                TxnOp::put(
                    key.to_vec(),
                    record.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(self.raised_key(), Vec::new(), None),
                TxnOp::delete(reserved.clone(), None),
                TxnOp::put(
                    ahead.clone(),
                    key.to_vec(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            ])
            .or_else([
                TxnOp::get(key.to_vec(), keys_only()),
                TxnOp::get(reserved.clone(), keys_only()),
                TxnOp::get(reservation.holder.clone(), keys_only()),
                TxnOp::get(ahead, keys_only()),
                TxnOp::get(
                    old_start,
                    Some(GetOptions::new().with_range(old_end).with_count_only()),
                ),
            ]);
        let resp = self
            .rpc("claim the reserved lock", client.clone().txn(txn))
            .await?;
        if resp.succeeded() {
            let claim = revision_of(&resp);
            return Ok(Claim::Won {
                claim,
                term: claim,
                record,
            });
        }
        let gets = gets(&resp);
        let (Some(own), Some(still), Some(holder), Some(ahead), Some(old)) = (
            gets.first(),
            gets.get(1),
            gets.get(2),
            gets.get(3),
            gets.get(4),
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
        if still
            .kvs()
            .first()
            .is_none_or(|kv| kv.mod_revision() != reservation.revision)
        {
            // Expired, or replaced: read it all again.
            return Ok(Claim::Again);
        }
        if !holder.kvs().is_empty() || !ahead.kvs().is_empty() {
            // The reserving holder has not let go yet.
            return Ok(Claim::Behind(revision_of(&resp)));
        }
        if old.count() > 0 {
            tracing::info!(
                lock = %self.name,
                "the lock is reserved for this node, but a node of version 0.1 waits for it: \
                 giving the reservation up and waiting in key order"
            );
            let withdraw = Txn::new()
                .when([Compare::mod_revision(
                    reserved.clone(),
                    CompareOp::Equal,
                    reservation.revision,
                )])
                .and_then([TxnOp::delete(reserved, None)]);
            self.rpc("give the reservation up", client.clone().txn(withdraw))
                .await?;
            return Ok(Claim::Again);
        }
        Err(Error::backend_msg(
            NAME,
            format!(
                "lock {:?}: the server refused a reserved claim although nothing stands in its \
                 way (etcd 3.3 or newer is needed: range compares)",
                self.name
            ),
        ))
    }
}

/// Revokes `lease` in the background (a best effort: it runs out anyway).
fn revoke_later(client: &etcd_client::Client, lease: i64) {
    let mut client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = client.lease_revoke(lease).await {
            tracing::debug!(lease, error = %e, "revoking a reservation's lease failed; it will expire");
        }
    });
}
