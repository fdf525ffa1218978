//! Resuming a lease: the token a leadership hands to the next process of its host group, and
//! the resumption that continues the lease under a new term.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::NAME;
use super::leadership::{RedisLeadership, Sent};
use super::lock::{Ask, Attempt, Prepared, RedisLock, new_token};
use crate::backend::{AcquireRequest, Leadership};
use crate::error::Error;

/// What [`Leadership::resume_token`] of a Redis leadership holds, as compact JSON:
/// `{"token":"<lock key's token>","term":<term>}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResumeToken {
    pub(super) token: String,
    pub(super) term: u64,
}

impl ResumeToken {
    pub(super) fn encode(&self) -> String {
        // A string and a number: nothing here can fail to serialise.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a resume token. Its contents are never repeated in the error: they are the key
    /// to the lease.
    pub(super) fn parse(text: &str) -> Result<Self, Error> {
        let corrupt = |problem: &str| Error::Corrupt {
            backend: NAME,
            what: "resume token".to_owned(),
            problem: problem.to_owned(),
        };
        let parsed: ResumeToken = serde_json::from_str(text).map_err(|_| {
            corrupt(r#"not the JSON {"token":"<32 hex digits>","term":<number>} of a Redis lease"#)
        })?;
        if parsed.token.len() != 32 || !parsed.token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(corrupt("the token is not 32 hex digits"));
        }
        if parsed.term == 0 {
            return Err(corrupt("term 0 is never granted"));
        }
        Ok(parsed)
    }
}

impl RedisLock {
    /// [`Lock::resume`](crate::backend::Lock::resume): one resume script per attempt, under a
    /// new token of its own; waits only for the restart guard (or a lost lease record), and gives
    /// up (`Ok(None)`) as soon as the lease is not the token's any more.
    pub(super) async fn resume_lease(
        &self,
        req: AcquireRequest,
        token: &str,
    ) -> Result<Option<Box<dyn Leadership>>, Error> {
        let resumed = ResumeToken::parse(token)?;
        let Prepared {
            lease,
            ms,
            mut record,
            record_json,
        } = self.prepare(&req)?;
        let token = new_token();
        loop {
            // The send time of the script that resumes the lease is its first confirmed renewal.
            let sent = Sent {
                at: req.clock.now(),
                instant: Instant::now(),
            };
            let ask = Ask::Resume {
                token: &resumed.token,
                term: resumed.term,
            };
            match self
                .attempt(ask, req.node.id(), &token, ms, &record_json)
                .await?
            {
                Attempt::Granted(grant) => {
                    let (token, term) = grant.take();
                    record.term = term;
                    tracing::debug!(
                        lock = %self.shared.name,
                        from = resumed.term,
                        term,
                        "resumed the lease of a predecessor"
                    );
                    return Ok(Some(Box::new(RedisLeadership::start(
                        self.shared.clone(),
                        token,
                        term,
                        record,
                        lease,
                        req.clock,
                        sent,
                    )) as Box<dyn Leadership>));
                }
                Attempt::Gone => return Ok(None),
                Attempt::Wait(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms.saturating_add(1))).await;
                }
                Attempt::Held { .. } | Attempt::Reserved(_) => {
                    return Err(Error::backend_msg(NAME, "resume: unexpected reply"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_tokens_round_trip_and_bad_ones_are_named_without_their_contents() {
        let t = ResumeToken {
            token: "0123456789abcdef0123456789abcdef".to_owned(),
            term: 1_796_022_380_000_063,
        };
        let text = t.encode();
        assert_eq!(
            text,
            r#"{"token":"0123456789abcdef0123456789abcdef","term":1796022380000063}"#
        );
        let back = ResumeToken::parse(&text).unwrap();
        assert_eq!((back.token.as_str(), back.term), (t.token.as_str(), t.term));
        for bad in [
            "",
            "secretsecret",
            r#"{"token":"secretsecret","term":5}"#,
            r#"{"token":"0123456789abcdef0123456789abcdef","term":0}"#,
            r#"{"token":"0123456789abcdef0123456789abcdef","term":-1}"#,
            r#"{"token":"0123456789abcdef0123456789abcdef","term":5,"x":1}"#,
        ] {
            let err = ResumeToken::parse(bad).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{bad}: {err}");
            assert!(!err.to_string().contains("secret"), "{bad}: {err}");
        }
    }
}
