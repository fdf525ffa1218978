//! The candidate registry ([`Lock::register`](crate::backend::Lock::register)): one key per
//! node under `P/L/registry/`, on a lease of the registration's own, kept alive by a task of its
//! own; outside `P/L/election/`, the range every version reads candidates from.
//!
//! A node that dies stops the keepalives: etcd expires the lease (within one lease) and deletes
//! the key. A registration whose lease ran out anyway (a long stall) grants a new one and writes
//! the entry again. Dropping the registration revokes its lease: the key goes at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use tokio::task::JoinHandle;

use super::lock::EtcdLock;
use super::session::Session;
use super::watch::EtcdChanges;
use super::{MIN_LEASE, NAME};
use crate::backend::{BoxFuture, Candidate, Changes, Lease, Registration};
use crate::clock::Clock;
use crate::error::Error;

/// What a registration and its keepalive task share: the entry, and the lease it stands on.
#[derive(Debug)]
struct Entry {
    candidate: Candidate,
    lease: i64,
}

/// A node's registry key, live while this lives.
pub(super) struct EtcdRegistration {
    lock: EtcdLock,
    key: Vec<u8>,
    entry: Arc<Mutex<Entry>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for EtcdRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistration")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("entry", &*crate::sync::lock(&self.entry))
            .finish_non_exhaustive()
    }
}

impl EtcdLock {
    /// Where the registry's keys live: `P/L/registry/`. Not under `P/L/election/`: nodes of
    /// version 0.1 take every key there for a candidate.
    pub(super) fn registry_prefix(&self) -> Vec<u8> {
        let mut key = self.base().to_vec();
        key.extend_from_slice(b"registry/");
        key
    }

    fn registry_key(&self, node: &str) -> Vec<u8> {
        let mut key = self.registry_prefix();
        key.extend_from_slice(node.as_bytes());
        key
    }

    /// Writes `candidate` onto `lease`.
    async fn put_entry(
        &self,
        client: &Client,
        key: &[u8],
        candidate: &Candidate,
        lease: i64,
    ) -> Result<(), Error> {
        let value = serde_json::to_vec(candidate)
            .map_err(|e| Error::backend(NAME, "encode a registry entry", e))?;
        self.rpc(
            "write the registry entry",
            client.clone().put(
                key.to_vec(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn register_inner(
        &self,
        candidate: Candidate,
        lease: Option<Lease>,
    ) -> Result<Box<dyn Registration>, Error> {
        let lease = Lease::new(lease.unwrap_or_default().ttl().max(MIN_LEASE));
        let client = self.backend.client().await?;
        // Dropped (revoked) with this future until the registration owns it.
        let session = Session::grant(&client, lease, Clock::system(), self.timeout()).await?;
        let key = self.registry_key(&candidate.node);
        self.put_entry(&client, &key, &candidate, session.id)
            .await?;
        let entry = Arc::new(Mutex::new(Entry {
            candidate,
            lease: session.id,
        }));
        let task = tokio::spawn(keep(
            self.clone(),
            client,
            key.clone(),
            lease,
            entry.clone(),
            session,
        ));
        Ok(Box::new(EtcdRegistration {
            lock: self.clone(),
            key,
            entry,
            task,
        }))
    }

    /// The live entries; an entry that does not parse (another version's, or a foreign key) is
    /// left out, with a warning.
    pub(super) async fn candidates_inner(&self) -> Result<Vec<Candidate>, Error> {
        let client = self.backend.client().await?;
        let resp = self
            .rpc(
                "read the registry",
                client.clone().get(
                    self.registry_prefix(),
                    Some(GetOptions::new().with_prefix()),
                ),
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| match serde_json::from_slice::<Candidate>(kv.value()) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(
                        lock = %self.name,
                        key = %String::from_utf8_lossy(kv.key()),
                        error = %e,
                        "a registry entry that does not parse; left out"
                    );
                    None
                }
            })
            .collect())
    }

    pub(super) async fn watch_candidates_inner(&self) -> Result<Box<dyn Changes>, Error> {
        let changes = EtcdChanges::open(self, self.registry_prefix(), true).await?;
        Ok(Box::new(changes) as Box<dyn Changes>)
    }
}

/// Keeps the registration's lease alive (the session's own loop); when the lease is gone
/// anyway, grants a new one and writes the entry onto it. Dropped (the registration dropped):
/// the session revokes the lease, which deletes the key.
async fn keep(
    lock: EtcdLock,
    client: Client,
    key: Vec<u8>,
    lease: Lease,
    entry: Arc<Mutex<Entry>>,
    mut session: Session,
) {
    let mut retry = crate::backoff::Backoff::new(Duration::from_millis(100), lease.renew_every());
    loop {
        let reason = session.lost().await;
        tracing::info!(lock = %lock.name, %reason, "the registry entry's lease is gone; writing it again");
        loop {
            let again = async {
                let fresh = Session::grant(&client, lease, Clock::system(), lock.timeout()).await?;
                let candidate = crate::sync::lock(&entry).candidate.clone();
                lock.put_entry(&client, &key, &candidate, fresh.id).await?;
                Ok::<_, Error>(fresh)
            };
            match again.await {
                Ok(fresh) => {
                    crate::sync::lock(&entry).lease = fresh.id;
                    session = fresh;
                    retry.reset();
                    break;
                }
                Err(e) => {
                    tracing::debug!(lock = %lock.name, error = %e, "writing the registry entry again failed");
                    tokio::time::sleep(retry.next_delay()).await;
                }
            }
        }
    }
}

impl Registration for EtcdRegistration {
    fn update(&self, candidate: Candidate) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let client = self.lock.backend.client().await?;
            let lease = {
                let mut entry = crate::sync::lock(&self.entry);
                entry.candidate = candidate.clone();
                entry.lease
            };
            // Should the lease have been replaced meanwhile, the keepalive task writes the new
            // entry onto the new one.
            self.lock
                .put_entry(&client, &self.key, &candidate, lease)
                .await
        })
    }
}

impl Drop for EtcdRegistration {
    fn drop(&mut self) {
        // The task's session revokes the lease as it is dropped.
        self.task.abort();
    }
}
