//! What a process does while it is the host candidate: the heartbeat, the mirrors of the inner
//! lock's holder, of its candidate registry and of the state keys followers want, the group's
//! one entry in the inner registry, and the guarded `.host` writes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::heartbeat_timing;
use super::lock::Group;
use super::record::{Heartbeat, HostRecord};
use super::wake::{Wake, or_slow_poll};
use crate::backend::{AcquireRequest, Candidate, Lock, Registration, Stored};
use crate::error::Error;
use crate::role::Holder;

/// After a mirror failed, the pause before it starts again.
const MIRROR_RETRY: Duration = Duration::from_secs(1);

/// The mirror key of the inner lock's holder.
pub(super) fn holder_key() -> &'static str {
    "h"
}

/// The mirror key of the inner lock's candidate registry.
pub(super) fn registry_key() -> &'static str {
    "c"
}

pub(super) fn decode_registry(bytes: &[u8]) -> Result<Vec<Candidate>, Error> {
    serde_json::from_slice(bytes).map_err(|e| corrupt("the registry mirror", e.to_string()))
}

/// The group's entry in the inner registry, campaigned for by the candidate `node`, from the
/// live member entries: the highest priority among the eligible (ready, not draining) members
/// (among all when none is), ready when any member is eligible, draining when every member
/// drains, yielded when the candidate's own member entry is. `None` without members.
pub(super) fn group_entry(node: &str, members: &[Candidate]) -> Option<Candidate> {
    if members.is_empty() {
        return None;
    }
    let eligible = members.iter().any(Candidate::is_eligible);
    let priority = members
        .iter()
        .filter(|m| !eligible || m.is_eligible())
        .map(|m| m.priority)
        .max()
        .unwrap_or(0);
    Some(
        Candidate::new(node)
            .with_priority(priority)
            .with_ready(eligible)
            .with_draining(members.iter().all(|m| m.draining))
            .with_yielded(members.iter().any(|m| m.node == node && m.yielded)),
    )
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
            AbortOnDropHandle::new(tokio::spawn(mirror(
                group.clone(),
                file.clone(),
                term,
                Source::Holder,
            ))),
            AbortOnDropHandle::new(tokio::spawn(mirror(
                group.clone(),
                file.clone(),
                term,
                Source::Registry,
            ))),
            AbortOnDropHandle::new(tokio::spawn(register_group(
                group.clone(),
                file.clone(),
                req.clone(),
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

/// What a mirror copies from the inner lock.
enum Source {
    Holder,
    Registry,
    State(String),
}

impl Source {
    fn mirror_key(&self) -> String {
        match self {
            Source::Holder => holder_key().to_owned(),
            Source::Registry => registry_key().to_owned(),
            Source::State(key) => mirror_key(key),
        }
    }

    fn name(&self) -> &str {
        match self {
            Source::Holder => "the holder",
            Source::Registry => "the registry",
            Source::State(key) => key,
        }
    }

    async fn watch(&self, inner: &dyn Lock) -> Result<Box<dyn crate::backend::Changes>, Error> {
        match self {
            Source::Holder => inner.watch_holder().await,
            Source::Registry => inner.watch_candidates().await,
            Source::State(key) => inner.watch_key(key).await,
        }
    }

    async fn read(&self, group: &Group) -> Result<Vec<u8>, Error> {
        match self {
            Source::Holder => serde_json::to_vec(&group.inner.holder().await?)
                .map_err(|e| Error::backend(group.backend, "cannot encode the holder", e)),
            Source::Registry => {
                // In one order, so that an unchanged registry reads as the same bytes.
                let mut entries = group.inner.candidates().await?;
                entries.sort_by(|a, b| a.node.cmp(&b.node));
                serde_json::to_vec(&entries)
                    .map_err(|e| Error::backend(group.backend, "cannot encode the registry", e))
            }
            Source::State(key) => Ok(encode_stored(group.inner.load(key).await?.as_ref())),
        }
    }
}

/// Keeps a mirror equal to its source under the candidate lock's `term`: written when the source
/// changes, and again whenever the mirror is found holding anything else. A replaced candidate
/// that was stopped between its check and its write finishes that write when it runs again; the
/// live candidate sees the mirror change (inotify) and writes its own value back under its higher
/// term.
async fn mirror(group: Arc<Group>, file: Arc<dyn Lock>, term: u64, source: Source) {
    let key = source.mirror_key();
    loop {
        let outcome: Result<(), Error> = async {
            let mut changes = source.watch(&*group.inner).await?;
            let mut own = or_slow_poll(file.watch_key(&key).await, "own");
            loop {
                let bytes = source.read(&group).await?;
                // A corrupt mirror reads as an error: written again like a foreign one.
                let current = file.load(&key).await.ok().flatten();
                if current.is_none_or(|c| c.term != term || c.value != bytes) {
                    file.store(&key, &bytes, term).await?;
                }
                tokio::select! {
                    changed = changes.changed() => changed?,
                    changed = own.changed() => changed?,
                }
            }
        }
        .await;
        if !retry(&group, source.name(), outcome).await {
            return;
        }
    }
}

/// Keeps the group's one entry in the inner registry equal to what the live member entries
/// (`<lock>.members/` in the host directory) add up to; withdrawn when the candidacy ends.
async fn register_group(group: Arc<Group>, file: Arc<dyn Lock>, req: AcquireRequest) {
    let node = req.node.id().to_owned();
    let mut registration: Option<Box<dyn Registration>> = None;
    let mut registered: Option<Candidate> = None;
    loop {
        let mut changes = or_slow_poll(file.watch_candidates().await, "member");
        loop {
            let synced = async {
                let entry = group_entry(&node, &file.candidates().await?);
                if entry == registered {
                    return Ok(());
                }
                match (&entry, &registration) {
                    (None, _) => registration = None,
                    (Some(e), Some(r)) => r.update(e.clone()).await?,
                    (Some(e), None) => {
                        registration = Some(group.inner.register(e.clone(), req.lease).await?);
                    }
                }
                registered = entry;
                Ok::<(), Error>(())
            }
            .await;
            let outcome = match synced {
                Ok(()) => changes.changed().await,
                Err(e) => {
                    // Registered again from scratch.
                    (registration, registered) = (None, None);
                    Err(e)
                }
            };
            if let Err(e) = outcome {
                tracing::warn!(lock = %group.files.lock, error = %e, "cannot keep the host group's registry entry; trying again");
                tokio::time::sleep(MIRROR_RETRY).await;
                break;
            }
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
                AbortOnDropHandle::new(tokio::spawn(mirror(
                    group.clone(),
                    file.clone(),
                    term,
                    Source::State(key),
                )))
            });
        }
        wake.changed().await;
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

    #[test]
    fn a_group_entry_adds_its_members_up() {
        assert_eq!(group_entry("w1", &[]), None);
        let members = [
            Candidate::new("w1").with_priority(3),
            Candidate::new("w2").with_priority(9).with_ready(false),
            Candidate::new("w3").with_priority(5).with_draining(true),
            Candidate::new("w4").with_priority(4),
        ];
        let entry = group_entry("w1", &members).unwrap();
        assert_eq!(entry, Candidate::new("w1").with_priority(4));
        let draining: Vec<_> = members
            .iter()
            .map(|m| m.clone().with_draining(true).with_yielded(true))
            .collect();
        let entry = group_entry("w1", &draining).unwrap();
        assert_eq!(
            entry,
            Candidate::new("w1")
                .with_priority(9)
                .with_ready(false)
                .with_draining(true)
                .with_yielded(true)
        );
    }
}
