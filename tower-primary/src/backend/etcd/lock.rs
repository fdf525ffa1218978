//! One lock name in etcd: its keys, and the [`Lock`] operations, which the campaign
//! ([`super::campaign`]), the state API ([`super::state`]) and the watches ([`super::watch`])
//! carry out.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{GetOptions, KeyValue, SortOrder, SortTarget, Txn, TxnOp};

use super::campaign::gets;
use super::session::rpc;
use super::watch::EtcdChanges;
use super::{EtcdBackend, NAME};
use crate::backend::{
    AcquireRequest, BoxFuture, Candidate, Changes, Leadership, Lease, Lock, Registration, Stored,
};
use crate::error::Error;
use crate::role::Holder;

/// The term this node holds and the key that proves it, for guarded state writes: while the
/// key's mod revision is still `claim` (the revision of the term's claim; nothing writes a
/// holder's key but a claim), the term holds the lock.
#[derive(Clone, Debug)]
pub(super) struct Held {
    pub(super) term: u64,
    pub(super) key: Vec<u8>,
    pub(super) claim: i64,
}

/// What starts the name of a candidate key of this version, after the election prefix: the
/// mark that tells it from a key of version 0.1, whose names are 16 hex digits and so lie in
/// [`OLD_KEYS`]. Both kinds live under one prefix, so that each version waits for the other.
pub(super) const KEY_MARK: &str = "v2-";

/// The range (after the election prefix) that holds every candidate key of version 0.1: names
/// of 16 lowercase hex digits, from `0` up to, not including, `g`. [`KEY_MARK`] lies above it.
const OLD_KEYS: (&str, &str) = ("0", "g");

pub(super) type HeldSlot = Arc<Mutex<Option<Held>>>;

#[derive(Clone)]
pub(super) struct EtcdLock {
    pub(super) backend: EtcdBackend,
    pub(super) name: String,
    pub(super) election: Vec<u8>,
    pub(super) state: Vec<u8>,
    pub(super) held: HeldSlot,
}

impl fmt::Debug for EtcdLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLock")
            .field("lock", &self.name)
            .field("election", &String::from_utf8_lossy(&self.election))
            .finish_non_exhaustive()
    }
}

impl EtcdLock {
    pub(super) fn timeout(&self) -> Duration {
        self.backend.config.timeout
    }

    pub(super) async fn rpc<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        rpc(
            self.timeout(),
            &format!("lock {:?}: {what}", self.name),
            fut,
        )
        .await
    }

    pub(super) fn candidate_key(&self, lease: i64) -> Vec<u8> {
        let mut key = self.election.clone();
        // Lease ids are positive; as u64 they print the same.
        key.extend_from_slice(format!("{KEY_MARK}{:016x}", lease.cast_unsigned()).as_bytes());
        key
    }

    /// The range of the candidate keys of version 0.1 (start, end): a range compare that
    /// finds no key there proves that no node of that version campaigns.
    pub(super) fn old_keys(&self) -> (Vec<u8>, Vec<u8>) {
        let mut start = self.election.clone();
        start.extend_from_slice(OLD_KEYS.0.as_bytes());
        let mut end = self.election.clone();
        end.extend_from_slice(OLD_KEYS.1.as_bytes());
        (start, end)
    }

    /// Whether `key` is a candidate key of this version (else one of version 0.1, or foreign).
    pub(super) fn is_own_kind(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.election.as_slice())
            .is_some_and(|name| name.starts_with(KEY_MARK.as_bytes()))
    }

    /// The key whose mod revision is the latest term **raised** above its key's create
    /// revision: written by every claim whose term is its own revision (a resumption, or a
    /// claim by a key older than such a term). A candidate whose key is younger than that
    /// revision may take its create revision as its term, as version 0.1 does.
    pub(super) fn raised_key(&self) -> Vec<u8> {
        let mut key = self.base().to_vec();
        key.extend_from_slice(b"raised");
        key
    }

    /// Where the lock's keys live: `P/L/`.
    pub(super) fn base(&self) -> &[u8] {
        self.election
            .strip_suffix(b"election/".as_slice())
            .unwrap_or(&self.election)
    }

    pub(super) fn state_key(&self, key: &str) -> Vec<u8> {
        let mut k = self.state.clone();
        k.extend_from_slice(key.as_bytes());
        k
    }

    pub(super) fn corrupt(&self, what: &str, problem: impl Into<String>) -> Error {
        Error::Corrupt {
            backend: NAME,
            what: format!("{what} of lock {:?}", self.name),
            problem: problem.into(),
        }
    }

    /// The holder record stored in `kv`, with its term. A key of this version records its term
    /// when it is its create revision; a record with term 0 stands for the revision of the
    /// claim that wrote it, the key's mod revision (a resumption, a raised claim; a candidate
    /// that has not claimed yet shows its creation). A key of version 0.1 stands for its create
    /// revision, as that version reads it.
    pub(super) fn holder_from(&self, kv: &KeyValue) -> Result<Holder, Error> {
        let mut holder: Holder = serde_json::from_slice(kv.value())
            .map_err(|e| self.corrupt("holder record", e.to_string()))?;
        holder.term = if !self.is_own_kind(kv.key()) {
            term_of(kv.create_revision())
        } else if holder.term == 0 {
            term_of(kv.mod_revision())
        } else {
            holder.term
        };
        Ok(holder)
    }

    /// The term of the current holder, if any (for error messages).
    pub(super) async fn current_term(&self) -> Option<u64> {
        self.holder_inner().await.ok().flatten().map(|h| h.term)
    }

    /// The holder: the one that took a reservation ahead of the key order, if one did (its key
    /// is named by the reserved-holder mark), else the oldest candidate key's once it claimed.
    pub(super) async fn holder_inner(&self) -> Result<Option<Holder>, Error> {
        let client = self.backend.client().await?;
        let oldest = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let read = Txn::new().and_then([
            TxnOp::get(self.reserved_holder_key(), None),
            TxnOp::get(self.election.clone(), Some(oldest)),
        ]);
        // A holder ahead of the order that lets go between the two reads is read again.
        for _ in 0..3 {
            let resp = self
                .rpc("read the holder", client.clone().txn(read.clone()))
                .await?;
            let gets = gets(&resp);
            let (Some(ahead), Some(oldest)) = (gets.first(), gets.get(1)) else {
                return Err(self.corrupt("transaction reply", "missing range results"));
            };
            let Some(mark) = ahead.kvs().first() else {
                return oldest
                    .kvs()
                    .first()
                    // A key of this version that was never written again has not claimed: its
                    // node waits (for a reservation to be taken or to expire, or to claim).
                    .filter(|kv| {
                        !self.is_own_kind(kv.key()) || kv.mod_revision() > kv.create_revision()
                    })
                    .map(|kv| self.holder_from(kv))
                    .transpose();
            };
            let resp = self
                .rpc(
                    "read the holder",
                    client.clone().get(mark.value().to_vec(), None),
                )
                .await?;
            if let Some(kv) = resp.kvs().first().filter(|kv| kv.lease() == mark.lease()) {
                return self.holder_from(kv).map(Some);
            }
        }
        Err(Error::backend_msg(
            NAME,
            format!(
                "lock {:?}: the holder changed at every read; try again",
                self.name
            ),
        ))
    }
}

impl Lock for EtcdLock {
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
        Box::pin(self.acquire_inner(req))
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
        Box::pin(self.holder_inner())
    }

    fn resume<'a>(
        &'a self,
        req: AcquireRequest,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Leadership>>, Error>> {
        Box::pin(self.resume_inner(req, token))
    }

    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            let changes = EtcdChanges::open(self, self.election.clone(), true).await?;
            Ok(Box::new(changes) as Box<dyn Changes>)
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
        Box::pin(self.load_value(key))
    }

    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.store_value(key, value, term))
    }

    fn watch_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            let changes = EtcdChanges::open(self, self.state_key(key), false).await?;
            Ok(Box::new(changes) as Box<dyn Changes>)
        })
    }

    fn register(
        &self,
        entry: Candidate,
        lease: Option<Lease>,
    ) -> BoxFuture<'_, Result<Box<dyn Registration>, Error>> {
        Box::pin(self.register_inner(entry, lease))
    }

    fn candidates(&self) -> BoxFuture<'_, Result<Vec<Candidate>, Error>> {
        Box::pin(self.candidates_inner())
    }

    fn watch_candidates(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(self.watch_candidates_inner())
    }
}

pub(super) fn term_of(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}
