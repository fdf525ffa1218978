//! The state API: values stored with the term that wrote them, written only while that term
//! holds the lock.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::lock::EtcdLock;
use crate::backend::Stored;
use crate::error::Error;

impl EtcdLock {
    /// The value of a state key, with the term that wrote it.
    pub(super) async fn load_value(&self, key: &str) -> Result<Option<Stored>, Error> {
        let client = self.backend.client().await?;
        let resp = self
            .rpc(
                "load a state value",
                client.clone().get(self.state_key(key), None),
            )
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        decode_state(kv.value())
            .map(Some)
            .ok_or_else(|| self.corrupt(&format!("state value {key:?}"), "shorter than its term"))
    }

    /// Writes a state value, only while `term` holds the lock.
    pub(super) async fn store_value(
        &self,
        key: &str,
        value: &[u8],
        term: u64,
    ) -> Result<(), Error> {
        let stale = |current| Error::StaleTerm {
            lock: self.name.clone(),
            term,
            current,
        };
        let held = crate::sync::lock(&self.held)
            .clone()
            .filter(|h| h.term == term);
        let Some(held) = held else {
            return Err(stale(self.current_term().await.filter(|c| *c != term)));
        };
        let client = self.backend.client().await?;
        // While our key's latest write is this term's claim, this term holds the lock, and no
        // newer term can have existed: a newer fresh claim needs our key gone, a resumption
        // writes it again.
        let txn = Txn::new()
            .when([Compare::mod_revision(
                held.key.clone(),
                CompareOp::Equal,
                held.claim,
            )])
            .and_then([TxnOp::put(
                self.state_key(key),
                encode_state(term, value),
                None,
            )]);
        let resp = self
            .rpc("store a state value", client.clone().txn(txn))
            .await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(stale(self.current_term().await.filter(|c| *c != term)))
        }
    }
}

fn encode_state(term: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&term.to_be_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_state(raw: &[u8]) -> Option<Stored> {
    let (term, value) = raw.split_first_chunk::<8>()?;
    Some(Stored::new(value.to_vec(), u64::from_be_bytes(*term)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_values_carry_their_term() {
        let raw = encode_state(42, b"hello");
        assert_eq!(decode_state(&raw), Some(Stored::new(b"hello".to_vec(), 42)));
        assert_eq!(
            decode_state(&encode_state(7, b"")),
            Some(Stored::new(Vec::new(), 7))
        );
        assert_eq!(decode_state(b"short"), None);
    }
}
