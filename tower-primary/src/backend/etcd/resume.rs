//! Resuming a predecessor's term in this process ([`Lock::resume`](crate::backend::Lock::resume)):
//! the same etcd lease, kept alive from here (etcd leases belong to no connection), and a new
//! claim on the same key, whose revision is the new term.
//!
//! The key keeps its create revision, so it keeps its place: the waiters stay behind it. A key
//! re-created instead would go to the back of the queue (etcd orders candidates by key age), and
//! one transaction cannot delete and put the same key.

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::campaign::{Claimed, check_lease, decode, encode, gets, revision_of};
use super::lock::EtcdLock;
use super::session::Session;
use crate::backend::{AcquireRequest, Leadership};
use crate::error::Error;

/// What a successor needs to take a term's lease over: the lease, the holder's key, the
/// revision of the term's claim (the key's mod revision while the term lasts) and the term.
/// Kept as JSON in the host directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Token {
    pub(super) lease: i64,
    pub(super) key: String,
    pub(super) revision: i64,
    pub(super) term: u64,
}

impl Token {
    pub(super) fn encode(&self) -> String {
        // Three plain fields: serialising them cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    fn parse(raw: &str) -> Result<Token, String> {
        let token: Token = serde_json::from_str(raw).map_err(|e| e.to_string())?;
        if token.lease <= 0 || token.revision <= 0 || token.term == 0 {
            return Err("lease, revision and term must be positive".to_owned());
        }
        if i64::try_from(token.term).is_ok_and(|t| t > token.revision) {
            return Err("the term is above the claim's revision".to_owned());
        }
        Ok(token)
    }
}

impl EtcdLock {
    pub(super) async fn resume_inner(
        &self,
        req: AcquireRequest,
        token: &str,
    ) -> Result<Option<Box<dyn Leadership>>, Error> {
        let lease = check_lease(&req)?;
        let token = Token::parse(token).map_err(|p| self.corrupt("resume token", p))?;
        let key = self.candidate_key(token.lease);
        if token.key.as_bytes() != key.as_slice() {
            return Err(self.corrupt(
                "resume token",
                format!(
                    "it names the key {:?}, not this lock's candidate key of its lease",
                    token.key
                ),
            ));
        }
        let client = self.backend.client().await?;
        // One keepalive first: its send time starts the new term's deadline, which must not
        // reach beyond what the server counts from a renewal.
        let Some(mut session) =
            Session::adopt(&client, token.lease, lease, req.clock, self.timeout()).await?
        else {
            return Ok(None);
        };
        let (old_start, old_end) = self.old_keys();
        let raw = encode(&req.holder(0))?;
        let txn = Txn::new()
            .when([
                // The key still stands on the token's lease (so the lease lives) ...
                Compare::lease(key.clone(), CompareOp::Equal, token.lease),
                // ... and nothing has claimed it since the token's term did.
                Compare::mod_revision(key.clone(), CompareOp::Equal, token.revision),
                // A claim out of key order: no candidate of version 0.1 may wait, as its term
                // (its create revision) could then fall below ours.
                Compare::create_revision(old_start.clone(), CompareOp::Equal, 0)
                    .with_range(old_end.clone()),
            ])
            .and_then([
                TxnOp::put(
                    key.clone(),
                    raw.clone(),
                    Some(PutOptions::new().with_lease(token.lease)),
                ),
                // A raised term: candidates older than this write must raise theirs too.
                TxnOp::put(self.raised_key(), Vec::new(), None),
            ])
            .or_else([
                TxnOp::get(key.clone(), Some(GetOptions::new().with_keys_only())),
                TxnOp::get(
                    old_start,
                    Some(GetOptions::new().with_range(old_end).with_count_only()),
                ),
            ]);
        // From here a drop revokes the lease: a claim whose answer is lost with this future
        // must not keep the lock.
        session.arm();
        let resp = self
            .rpc("resume the lease", client.clone().txn(txn))
            .await?;
        if !resp.succeeded() {
            let gets = gets(&resp);
            let still_the_tokens = gets
                .first()
                .and_then(|g| g.kvs().first())
                .is_some_and(|kv| kv.lease() == token.lease && kv.mod_revision() == token.revision);
            if still_the_tokens {
                // Only the old version's candidate stood in the way. The predecessor is gone
                // (the caller proved it): end its term now rather than after its lease, and
                // campaign like everyone else.
                tracing::info!(
                    lock = %self.name,
                    "a node of version 0.1 waits for this lock: not resuming, releasing the lease"
                );
                session.revoke().await?;
            } else {
                // Expired, released, or claimed since: not ours to touch.
                session.keep_on_drop();
            }
            return Ok(None);
        }
        // The record says term 0: the term is this claim's revision.
        let term = revision_of(&resp);
        let watch = self.watch(&client, &key, false, Some(term + 1)).await?;
        let won = Claimed {
            key,
            term,
            claim: term,
            record: decode(&raw, term)?,
        };
        Ok(Some(self.hand_over(client, session, won, watch)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let token = Token {
            lease: 0x1234,
            key: "p/jobs/election/v2-0000000000001234".to_owned(),
            revision: 42,
            term: 40,
        };
        assert_eq!(Token::parse(&token.encode()), Ok(token));
        assert!(Token::parse("").is_err());
        assert!(Token::parse(r#"{"lease":1,"key":"k"}"#).is_err());
        assert!(Token::parse(r#"{"lease":-1,"key":"k","revision":3,"term":3}"#).is_err());
        assert!(Token::parse(r#"{"lease":1,"key":"k","revision":3,"term":4}"#).is_err());
    }
}
