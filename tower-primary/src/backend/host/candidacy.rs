//! What a process does while it is the host candidate: the heartbeat, the mirrors of the inner
//! lock's holder and of the state keys followers want, and the guarded `.host` writes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::heartbeat_timing;
use super::lock::Group;
use super::record::{Heartbeat, HostRecord};
use super::wake::Wake;
use crate::backend::{AcquireRequest, Lock, Stored};
use crate::error::Error;
use crate::role::Holder;

/// After a mirror failed, the pause before it starts again.
const MIRROR_RETRY: Duration = Duration::from_secs(1);

/// The mirror key of the inner lock's holder.
pub(super) fn holder_key() -> &'static str {
    "h"
}

/// The mirror key of a state key (checked by the caller: at most 199 bytes).
pub(super) fn mirror_key(key: &str) -> String {
    format!("k{key}")
}

pub(super) fn decode_holder(bytes: &[u8]) -> Result<Option<Holder>, Error> {
    serde_json::from_slice(bytes).map_err(|e| corrupt("the holder mirror", e.to_string()))
}

fn encode_stored(stored: Option<&Stored>) -> Vec<u8> {
    match stored {
        None => b"none\n".to_vec(),
        Some(s) => {
            let mut out = format!("some {}\n", s.term).into_bytes();
            out.extend_from_slice(&s.value);
            out
        }
    }
}

pub(super) fn decode_stored(bytes: &[u8]) -> Result<Option<Stored>, Error> {
    if bytes == b"none\n" {
        return Ok(None);
    }
    let bad = || {
        corrupt(
            "a state mirror",
            "neither `none` nor `some <term>`".to_owned(),
        )
    };
    let rest = bytes.strip_prefix(b"some ").ok_or_else(bad)?;
    let end = rest.iter().position(|b| *b == b'\n').ok_or_else(bad)?;
    let term = std::str::from_utf8(&rest[..end])
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(bad)?;
    Ok(Some(Stored::new(rest[end + 1..].to_vec(), term)))
}

fn corrupt(what: &str, problem: String) -> Error {
    Error::Corrupt {
        backend: "host group",
        what: what.to_owned(),
        problem,
    }
}

/// This process's candidacy: its tasks end, and the process stops being the candidate, when it
/// is dropped.
pub(super) struct Candidacy {
    group: Arc<Group>,
    /// The candidate file this process locked.
    inode: Option<(u64, u64)>,
    /// Why the candidacy ended under it (the candidate file was replaced).
    lost: watch::Receiver<Option<String>>,
    _tasks: Vec<AbortOnDropHandle<()>>,
}

impl Candidacy {
    /// Starts the heartbeat and the mirrors, under the candidate lock's `term`.
    pub(super) fn start(
        group: Arc<Group>,
        term: u64,
        inode: Option<(u64, u64)>,
        req: &AcquireRequest,
    ) -> Candidacy {
        group.is_candidate.store(true, Ordering::SeqCst);
        let (lost_tx, lost) = watch::channel(None);
        let file = group.candidate_lock();
        let tasks = vec![
            AbortOnDropHandle::new(tokio::spawn(heartbeat(
                group.clone(),
                inode,
                req.clone(),
                lost_tx,
            ))),
            AbortOnDropHandle::new(tokio::spawn(mirror_holder(
                group.clone(),
                file.clone(),
                term,
            ))),
            AbortOnDropHandle::new(tokio::spawn(mirror_keys(group.clone(), file, term))),
        ];
        Candidacy {
            group,
            inode,
            lost,
            _tasks: tasks,
        }
    }

    /// Writes `.host`, if this process's candidate file is still the one in place.
    pub(super) async fn write_host(&self, record: HostRecord) -> Result<(), Error> {
        let group = self.group.clone();
        let inode = self.inode;
        let written = tokio::task::spawn_blocking(move || {
            if group.candidate_inode() != inode {
                return Ok(false);
            }
            group.files.write_host(&record).map(|()| true)
        })
        .await
        .map_err(|e| Error::backend(self.group.backend, "the host record write failed", e))?;
        match written {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.replaced()),
            Err(e) => Err(self.group.error(
                format!(
                    "cannot write the host record {}",
                    self.group.files.host.display()
                ),
                e,
            )),
        }
    }

    fn replaced(&self) -> Error {
        Error::Lost {
            lock: self.group.files.lock.clone(),
            reason: format!(
                "the candidate lock {} was replaced: another process took this one for a hung \
                 host candidate",
                self.group.files.candidate.display()
            ),
        }
    }

    /// Resolves when the candidate file is found replaced. Cancel-safe.
    pub(super) async fn lost(&self) -> Error {
        let mut rx = self.lost.clone();
        let reason = rx.wait_for(Option::is_some).await.map(|r| r.clone());
        match reason {
            Ok(reason) => Error::Lost {
                lock: self.group.files.lock.clone(),
                reason: reason.unwrap_or_default(),
            },
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Candidacy {
    fn drop(&mut self) {
        self.group.is_candidate.store(false, Ordering::SeqCst);
    }
}

/// Beats every third of a lease while the candidate file is still this process's.
async fn heartbeat(
    group: Arc<Group>,
    inode: Option<(u64, u64)>,
    req: AcquireRequest,
    lost: watch::Sender<Option<String>>,
) {
    let (period, _) = heartbeat_timing(req.lease);
    loop {
        let beat = Heartbeat {
            candidate: group.me.clone(),
            at_ns: req.clock.now().as_nanos(),
        };
        let g = group.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            if g.candidate_inode() != inode {
                return Ok(false);
            }
            g.files.write_heartbeat(&beat).map(|()| true)
        })
        .await;
        match outcome {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                tracing::warn!(lock = %group.files.lock, "the candidate lock was replaced (this process was taken for a hung candidate); stepping down");
                let _ = lost.send(Some(
                    "the candidate lock was replaced: another process took this one for a hung \
                     host candidate"
                        .to_owned(),
                ));
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(lock = %group.files.lock, error = %e, "cannot write the heartbeat");
            }
            Err(_) => {}
        }
        tokio::time::sleep(period).await;
    }
}

/// Mirrors the inner lock's holder into the candidate lock's state (key `h`).
async fn mirror_holder(group: Arc<Group>, file: Arc<dyn Lock>, term: u64) {
    let mut last: Option<Vec<u8>> = None;
    loop {
        let outcome: Result<(), Error> = async {
            let mut changes = group.inner.watch_holder().await?;
            loop {
                let holder = group.inner.holder().await?;
                let bytes = serde_json::to_vec(&holder)
                    .map_err(|e| Error::backend(group.backend, "cannot encode the holder", e))?;
                if last.as_ref() != Some(&bytes) {
                    file.store(holder_key(), &bytes, term).await?;
                    last = Some(bytes);
                }
                changes.changed().await?;
            }
        }
        .await;
        if !retry(&group, "the holder", outcome).await {
            return;
        }
    }
}

/// Mirrors every wanted state key, one task per key.
async fn mirror_keys(group: Arc<Group>, file: Arc<dyn Lock>, term: u64) {
    let mut wake = Wake::subscribe(&group.files.dir, &group.files.want_prefix);
    let mut running: HashMap<String, AbortOnDropHandle<()>> = HashMap::new();
    loop {
        let g = group.clone();
        let wanted = tokio::task::spawn_blocking(move || g.files.wanted())
            .await
            .unwrap_or_default();
        for key in wanted {
            running.entry(key.clone()).or_insert_with(|| {
                AbortOnDropHandle::new(tokio::spawn(mirror_state(
                    group.clone(),
                    file.clone(),
                    term,
                    key,
                )))
            });
        }
        wake.changed().await;
    }
}

/// Mirrors one state key (key `k<key>`).
async fn mirror_state(group: Arc<Group>, file: Arc<dyn Lock>, term: u64, key: String) {
    let mirror = mirror_key(&key);
    let mut last: Option<Vec<u8>> = None;
    loop {
        let outcome: Result<(), Error> = async {
            let mut changes = group.inner.watch_key(&key).await?;
            loop {
                let bytes = encode_stored(group.inner.load(&key).await?.as_ref());
                if last.as_ref() != Some(&bytes) {
                    file.store(&mirror, &bytes, term).await?;
                    last = Some(bytes);
                }
                changes.changed().await?;
            }
        }
        .await;
        if !retry(&group, &key, outcome).await {
            return;
        }
    }
}

/// After a mirror stopped: `false` when this process is no longer the candidate (a stale
/// term), else waits and says to start again.
async fn retry(group: &Group, what: &str, outcome: Result<(), Error>) -> bool {
    match outcome {
        Err(Error::StaleTerm { .. }) => false,
        Err(e) => {
            tracing::warn!(lock = %group.files.lock, mirror = what, error = %e, "a host group mirror failed; starting it again");
            tokio::time::sleep(MIRROR_RETRY).await;
            true
        }
        Ok(()) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_mirrors_round_trip() {
        for stored in [None, Some(Stored::new(b"a\nb".to_vec(), 7))] {
            let bytes = encode_stored(stored.as_ref());
            assert_eq!(decode_stored(&bytes).unwrap(), stored);
        }
        assert!(decode_stored(b"some x\n").is_err());
        assert!(decode_stored(b"").is_err());
    }
}
