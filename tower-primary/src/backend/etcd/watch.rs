//! Watches: the holder view and state keys for readers, and a holder's own key, whose deletion
//! ends its term.

use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions, WatchStream};

use super::NAME;
use super::lock::EtcdLock;
use super::session::LostSender;
use crate::backend::{BoxFuture, Changes};
use crate::error::Error;

impl EtcdLock {
    /// Opens a watch on `key` (or every key under it) and waits until etcd confirms it, so that
    /// nothing that happens after this returns is missed.
    pub(super) async fn watch(
        &self,
        client: &Client,
        key: &[u8],
        prefix: bool,
        start: Option<i64>,
    ) -> Result<WatchStream, Error> {
        let mut options = WatchOptions::new();
        if prefix {
            options = options.with_prefix();
        }
        if let Some(start) = start {
            options = options.with_start_revision(start);
        }
        let mut stream = self
            .rpc("watch", client.clone().watch(key.to_vec(), Some(options)))
            .await?;
        match self.rpc("watch", stream.message()).await? {
            Some(r) if r.created() && !r.canceled() => Ok(stream),
            Some(r) => Err(Error::backend_msg(
                NAME,
                format!(
                    "lock {:?}: watch refused: {}",
                    self.name,
                    if r.cancel_reason().is_empty() {
                        "no confirmation"
                    } else {
                        r.cancel_reason()
                    }
                ),
            )),
            None => Err(Error::backend_msg(
                NAME,
                format!("lock {:?}: watch stream closed", self.name),
            )),
        }
    }
}

/// A watch on the holder's prefix or on a state key. After a broken stream it reopens the watch
/// and reports a possible change (one may have been missed).
pub(super) struct EtcdChanges {
    lock: EtcdLock,
    key: Vec<u8>,
    prefix: bool,
    stream: Option<WatchStream>,
}

impl EtcdChanges {
    pub(super) async fn open(lock: &EtcdLock, key: Vec<u8>, prefix: bool) -> Result<Self, Error> {
        let client = lock.backend.client().await?;
        let stream = lock.watch(&client, &key, prefix, None).await?;
        Ok(EtcdChanges {
            lock: lock.clone(),
            key,
            prefix,
            stream: Some(stream),
        })
    }
}

impl Changes for EtcdChanges {
    fn changed(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            loop {
                let Some(stream) = self.stream.as_mut() else {
                    let client = self.lock.backend.client().await?;
                    let stream = self
                        .lock
                        .watch(&client, &self.key, self.prefix, None)
                        .await?;
                    self.stream = Some(stream);
                    return Ok(());
                };
                match stream.message().await {
                    Ok(Some(r)) if !r.canceled() => {
                        if !r.events().is_empty() {
                            return Ok(());
                        }
                    }
                    Ok(_) | Err(_) => self.stream = None,
                }
            }
        })
    }
}

/// Watches the holder's own key and reports its deletion, or a claim by another process (a
/// write of another revision than our claim's, `claim`), as a loss. A broken watch is reopened
/// after reading the key again, so a change in between is not missed.
pub(super) async fn monitor(
    lock: EtcdLock,
    client: Client,
    key: Vec<u8>,
    claim: i64,
    watch: WatchStream,
    lost: LostSender,
) {
    let mut watch = Some(watch);
    let mut retry = crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        if let Some(stream) = watch.as_mut() {
            match stream.message().await {
                Ok(Some(r)) if !r.canceled() => {
                    // The watch may start before our claim (an acquisition watches from its
                    // key's creation): only what happened after the claim counts.
                    let after = r.events().iter().find(|e| {
                        e.kv().is_some_and(|kv| {
                            kv.key() == key.as_slice() && kv.mod_revision() > claim
                        })
                    });
                    if let Some(event) = after {
                        let reason = match event.event_type() {
                            EventType::Delete => "our key was deleted (lease revoked or expired)",
                            EventType::Put => {
                                "our key was claimed again (resumed by another process)"
                            }
                        };
                        lost.send_replace(Some(reason.to_owned()));
                        return;
                    }
                }
                Ok(_) | Err(_) => watch = None,
            }
            continue;
        }
        tokio::time::sleep(retry.next_delay()).await;
        let read = lock
            .rpc("read our key", client.clone().get(key.clone(), None))
            .await;
        let Ok(resp) = read else { continue };
        if resp
            .kvs()
            .first()
            .is_none_or(|kv| kv.mod_revision() != claim)
        {
            lost.send_replace(Some(
                "our key is gone or claimed again (lease revoked or expired, or resumed)"
                    .to_owned(),
            ));
            return;
        }
        let from = resp.header().map_or(claim, |h| h.revision()) + 1;
        if let Ok(w) = lock.watch(&client, &key, false, Some(from)).await {
            retry.reset();
            watch = Some(w);
        }
    }
}
