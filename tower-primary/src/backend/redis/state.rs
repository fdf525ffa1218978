//! The state API: values kept next to the lock, written only by the term that holds it.

use super::COMMAND_TIMEOUT;
use super::lock::RedisLock;
use super::scripts::{STORE, parse_term, unexpected};
use crate::backend::{Changes, Stored, VersionChanges, validate_key};
use crate::error::Error;

impl RedisLock {
    /// Reads a state value and the term that wrote it.
    pub(super) async fn load_state(&self, key: &str) -> Result<Option<Stored>, Error> {
        validate_key(key)?;
        let (value, term) = self
            .shared
            .commands
            .run("load", COMMAND_TIMEOUT, |mut c| {
                let k = self.shared.keys.state(key);
                async move {
                    ::redis::cmd("HMGET")
                        .arg(&k)
                        .arg("value")
                        .arg("term")
                        .query_async::<(Option<Vec<u8>>, Option<String>)>(&mut c)
                        .await
                }
            })
            .await?;
        match (value, term) {
            (Some(value), Some(term)) => {
                Ok(Some(Stored::new(value, parse_term("state term", &term)?)))
            }
            _ => Ok(None),
        }
    }

    /// Writes a state value if `term` holds the lock and no newer term wrote it.
    pub(super) async fn store_state(
        &self,
        key: &str,
        value: &[u8],
        term: u64,
    ) -> Result<(), Error> {
        validate_key(key)?;
        let stale = |current: Option<u64>| Error::StaleTerm {
            lock: self.shared.name.clone(),
            term,
            current,
        };
        let Some(token) = crate::sync::lock(&self.shared.tokens).get(&term).cloned() else {
            return Err(stale(None));
        };
        let reply = self
            .shared
            .commands
            .run("store", COMMAND_TIMEOUT, |mut c| {
                let keys = self.shared.keys.clone();
                async move {
                    STORE
                        .key(&keys.lock)
                        .key(&keys.holder)
                        .key(keys.state(key))
                        .arg(&token)
                        .arg(term)
                        .arg(value)
                        .arg(&keys.channel)
                        .arg(key)
                        .invoke_async::<Vec<String>>(&mut c)
                        .await
                }
            })
            .await?;
        match reply.as_slice() {
            [ok] if ok == "ok" => Ok(()),
            [kind, current] if kind == "stale" => Err(stale(current.parse().ok())),
            _ => Err(unexpected("store", &reply)),
        }
    }

    /// Changes of one state value.
    pub(super) async fn watch_state(&self, key: &str) -> Result<Box<dyn Changes>, Error> {
        validate_key(key)?;
        self.shared.ensure_subscriber();
        let rx = self.shared.events.watch_state(key);
        self.shared.events.wait_live(&self.shared.name).await?;
        Ok(Box::new(VersionChanges(rx)) as Box<dyn Changes>)
    }
}
