//! A lock of a host group: the candidate's campaign (candidate lock, resume, inner acquire) and
//! the followers' reads from the mirrors.

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::candidacy::{
    Candidacy, decode_holder, decode_registry, decode_stored, holder_key, mirror_key, registry_key,
};
use super::leadership::HostLeadership;
use super::record::{Files, HostRecord, Read, boot_id};
use super::wake::or_slow_poll;
use super::{DEATH_CERTIFICATE_BOUND, FileBackend, heartbeat_timing};
use crate::backend::{
    AcquireRequest, Backend as _, BoxFuture, Candidate, Changes, Leadership, Lease, Lock,
    Registration, Stored,
};
use crate::error::Error;
use crate::process::ProcessIdentity;
use crate::role::Holder;
use crate::sync::lock;

/// How long a follower's first load of a key waits for the candidate to mirror it.
const MIRROR_WAIT: Duration = Duration::from_secs(5);

/// What a host group's processes share about one lock name, in one process.
pub(super) struct Group {
    pub(super) files: Files,
    pub(super) address: String,
    pub(super) backend: &'static str,
    pub(super) inner: Arc<dyn Lock>,
    /// The candidate lock object; a new one after the file was replaced (a hung candidate).
    candidate: Mutex<Arc<dyn Lock>>,
    dir: PathBuf,
    /// Whether this process is the candidate now (load and watch_key then use the inner lock).
    pub(super) is_candidate: AtomicBool,
    /// The next candidacy of this process campaigns without resuming (it replaced a hung one).
    fresh_next: AtomicBool,
    pub(super) me: Option<ProcessIdentity>,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostLock")
            .field("lock", &self.files.lock)
            .field("dir", &self.files.dir)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Group {
    pub(super) fn new(
        files: Files,
        address: String,
        backend: &'static str,
        inner: Arc<dyn Lock>,
        candidate: Arc<dyn Lock>,
        dir: PathBuf,
    ) -> Self {
        Group {
            files,
            address,
            backend,
            inner,
            candidate: Mutex::new(candidate),
            dir,
            is_candidate: AtomicBool::new(false),
            fresh_next: AtomicBool::new(false),
            me: ProcessIdentity::current(),
        }
    }

    pub(super) fn candidate_lock(&self) -> Arc<dyn Lock> {
        lock(&self.candidate).clone()
    }

    /// A fresh candidate lock object, on whatever file the path names now.
    fn reopen_candidate(&self) -> Result<(), Error> {
        let fresh = FileBackend::host_candidate(&self.dir)
            .lock(&self.files.lock)
            .map_err(Error::Config)?;
        *lock(&self.candidate) = fresh;
        Ok(())
    }

    /// The (device, inode) the candidate path names now.
    pub(super) fn candidate_inode(&self) -> Option<(u64, u64)> {
        fs::symlink_metadata(&self.files.candidate)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }

    /// A `.host` record naming this process as the candidate.
    pub(super) fn record(
        &self,
        req: &AcquireRequest,
        leadership: Option<&dyn Leadership>,
        released: bool,
    ) -> HostRecord {
        HostRecord {
            address: self.address.clone(),
            lock: self.files.lock.clone(),
            lease_ms: lease_ms(req),
            boot_id: boot_id(),
            candidate: self.me.clone(),
            node: req.node.id().to_owned(),
            token: leadership.and_then(|l| l.resume_token()),
            term: leadership.map(|l| l.term()),
            released,
        }
    }

    pub(super) fn error(&self, what: String, err: std::io::Error) -> Error {
        tracing::warn!(lock = %self.files.lock, dir = %self.files.dir.display(), error = %err, "{what}");
        Error::backend(self.backend, what, err)
    }

    /// The token to resume from, if `.host` carries a death certificate or a handover.
    pub(super) async fn resumable(&self, req: &AcquireRequest) -> Option<String> {
        let lock = &self.files.lock;
        let record = match self.files.read_host() {
            Ok(Read::Found(r)) => r,
            Ok(Read::Missing) => return None,
            Ok(Read::Corrupt(problem)) => {
                tracing::warn!(%lock, path = %self.files.host.display(), problem, "corrupt host record; campaigning with a fresh identity");
                return None;
            }
            Err(e) => {
                tracing::warn!(%lock, path = %self.files.host.display(), error = %e, "cannot read the host record; campaigning with a fresh identity");
                return None;
            }
        };
        let token = record.token.clone()?;
        if record.boot_id != boot_id() {
            tracing::info!(%lock, "the host record is from an earlier boot; campaigning with a fresh identity");
            return None;
        }
        if record.address != self.address
            || record.lock != *lock
            || record.lease_ms != lease_ms(req)
        {
            tracing::warn!(
                %lock,
                recorded_address = %record.address,
                recorded_lease_ms = ?record.lease_ms,
                address = %self.address,
                lease_ms = ?lease_ms(req),
                "the host record is of another backend, lock or lease; campaigning with a fresh identity"
            );
            return None;
        }
        let (Some(me), Some(candidate)) = (&self.me, &record.candidate) else {
            return None;
        };
        if !me.same_host(candidate) {
            return None;
        }
        if record.released {
            tracing::debug!(%lock, pid = candidate.pid, "the candidate passed its lease on at its exit");
            return Some(token);
        }
        if candidate == me {
            // This process's own earlier term, dropped without a release: no certificate.
            return None;
        }
        if candidate.wait_gone(DEATH_CERTIFICATE_BOUND).await {
            tracing::debug!(%lock, pid = candidate.pid, "the previous candidate's process is gone");
            return Some(token);
        }
        tracing::info!(%lock, pid = candidate.pid, "the previous candidate's process still runs; campaigning with a fresh identity");
        None
    }

    /// Waits for a hung candidate: returns `true` after replacing the candidate file of a
    /// candidate whose heartbeat is too old, `false` when the path names another file than
    /// `waited` (somebody else replaced it). Pends while the candidate is well.
    pub(super) async fn watch_hung(
        &self,
        waited: Option<(u64, u64)>,
        req: &AcquireRequest,
    ) -> bool {
        let (period, stale_after) = heartbeat_timing(req.lease);
        loop {
            tokio::time::sleep(period).await;
            if self.candidate_inode() != waited {
                return false;
            }
            let Ok(Read::Found(beat)) = self.files.read_heartbeat() else {
                continue;
            };
            let age = req
                .clock
                .now()
                .saturating_duration_since(crate::clock::Timestamp::from_nanos(beat.at_ns));
            if age <= stale_after {
                continue;
            }
            // One replacer at a time: the others find the path changed under the same lock and
            // move to the new file, instead of replacing the new candidate's file in turn.
            let Some(_replacing) = self.files.replacing() else {
                continue;
            };
            if self.candidate_inode() != waited {
                return false;
            }
            if !self.candidate_held(waited) {
                continue;
            }
            let lock = &self.files.lock;
            let replaced = crate::backend::file::write_atomic(
                &self.files.dir,
                &self.files.candidate_name,
                b"",
                true,
            );
            match replaced {
                Ok(()) => {
                    tracing::warn!(%lock, pid = beat.candidate.as_ref().map(|c| c.pid), ?age, "the host candidate's heartbeat stopped; replaced its candidate lock");
                    return true;
                }
                Err(e) => {
                    tracing::warn!(%lock, error = %e, "cannot replace the candidate lock of a hung candidate");
                }
            }
        }
    }

    /// Whether some process holds the candidate file `waited`, and the path still names it (a
    /// shared, non-blocking probe on the file the path names, checked to be `waited`).
    fn candidate_held(&self, waited: Option<(u64, u64)>) -> bool {
        let Ok(file) = fs::File::open(&self.files.candidate) else {
            return false;
        };
        if file.metadata().ok().map(|m| (m.dev(), m.ino())) != waited {
            // Replaced meanwhile by another waiter: not ours to replace again.
            return false;
        }
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                false
            }
            Err(fs::TryLockError::WouldBlock) => true,
            Err(fs::TryLockError::Error(_)) => false,
        }
    }

    /// Waits for the candidate lock (announced as a waiting sibling meanwhile), then leads the
    /// group's campaign on the inner lock.
    async fn campaign(self: &Arc<Self>, req: AcquireRequest) -> Result<Box<dyn Leadership>, Error> {
        loop {
            let candidate = self.candidate_lock();
            let waited = self.candidate_inode();
            let announced = self.files.announce(self.me.as_ref()).map_err(|e| {
                self.error(
                    "cannot announce this process in the host directory".to_owned(),
                    e,
                )
            })?;
            let file_req = req.clone().with_lease(None);
            let granted = tokio::select! {
                granted = candidate.acquire(file_req) => granted?,
                replaced = self.watch_hung(waited, &req) => {
                    if replaced {
                        self.fresh_next.store(true, Ordering::SeqCst);
                    }
                    self.reopen_candidate()?;
                    continue;
                }
            };
            drop(announced);
            return self.lead(granted, req).await;
        }
    }

    /// As the candidate: resume or campaign on the inner lock.
    async fn lead(
        self: &Arc<Self>,
        mut file: Box<dyn Leadership>,
        req: AcquireRequest,
    ) -> Result<Box<dyn Leadership>, Error> {
        let inode = self.candidate_inode();
        let candidacy = Candidacy::start(self.clone(), file.term(), inode, &req);
        let fresh = self.fresh_next.swap(false, Ordering::SeqCst);
        let token = if fresh {
            None
        } else {
            self.resumable(&req).await
        };
        let mut resumed = None;
        if let Some(token) = token {
            resumed = self.inner.resume(req.clone(), &token).await?;
            if resumed.is_none() {
                tracing::info!(lock = %self.files.lock, "the predecessor's lease is gone; campaigning");
            }
        }
        let leadership = match resumed {
            Some(l) => {
                tracing::info!(lock = %self.files.lock, term = l.term(), "resumed the previous candidate's lease");
                l
            }
            None => {
                candidacy.write_host(self.record(&req, None, false)).await?;
                tokio::select! {
                    acquired = self.inner.acquire(req.clone()) => acquired?,
                    lost = file.lost() => return Err(lost),
                    lost = candidacy.lost() => return Err(lost),
                }
            }
        };
        // Cancel-safe from here on: a term whose acquire is given up is released, not left to
        // run out (a container stop cancels a sibling's acquire right after it resumed).
        let mut guard = ReleaseOnDrop(Some(leadership));
        let written = candidacy
            .write_host(self.record(&req, guard.0.as_deref(), false))
            .await;
        let leadership = guard.0.take().expect("taken only here");
        if let Err(e) = written {
            let _ = leadership.release().await;
            return Err(e);
        }
        Ok(Box::new(HostLeadership::new(
            self.clone(),
            leadership,
            file,
            candidacy,
            req,
        )))
    }
}

/// A term of the inner lock that the acquire has not handed out yet: released if the acquire is
/// dropped.
struct ReleaseOnDrop(Option<Box<dyn Leadership>>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(leadership) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(e) = leadership.release().await {
                    tracing::warn!(error = %e, "cannot release a term whose acquire was given up");
                }
            });
        }
    }
}

fn lease_ms(req: &AcquireRequest) -> Option<u64> {
    req.lease
        .map(|l| u64::try_from(l.ttl().as_millis()).unwrap_or(u64::MAX))
}

/// The [`Lock`] of a host group.
#[derive(Debug)]
pub(super) struct HostLock {
    group: Arc<Group>,
}

impl HostLock {
    pub(super) fn new(group: Group) -> Self {
        HostLock {
            group: Arc::new(group),
        }
    }

    fn is_candidate(&self) -> bool {
        self.group.is_candidate.load(Ordering::SeqCst)
    }

    /// The mirror key of a state key, or the error for a key too long to be prefixed.
    fn mirror_key(key: &str) -> Result<String, Error> {
        crate::backend::validate_key(key)?;
        if key.len() > 199 {
            return Err(Error::Config(crate::error::ConfigError::InvalidStateKey {
                key: key.to_owned(),
                rule: "must be at most 199 bytes in a host group",
            }));
        }
        Ok(mirror_key(key))
    }

    fn want(&self, key: &str) -> Result<(), Error> {
        self.group.files.want(key).map_err(|e| {
            self.group.error(
                format!("cannot ask the host candidate to mirror {key:?}"),
                e,
            )
        })
    }
}

impl Lock for HostLock {
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
        let group = self.group.clone();
        Box::pin(async move { group.campaign(req).await })
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
        Box::pin(async move {
            let mirror = self.group.candidate_lock().load(holder_key()).await?;
            Ok(match mirror {
                Some(stored) => decode_holder(&stored.value)?,
                None => None,
            })
        })
    }

    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            let watched = self.group.candidate_lock().watch_key(holder_key()).await;
            Ok(or_slow_poll(watched, "holder"))
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
        Box::pin(async move {
            if self.is_candidate() {
                return self.group.inner.load(key).await;
            }
            let mirror = Self::mirror_key(key)?;
            self.want(key)?;
            let candidate = self.group.candidate_lock();
            let mut changes = or_slow_poll(candidate.watch_key(&mirror).await, "state value");
            let give_up = tokio::time::Instant::now() + MIRROR_WAIT;
            loop {
                if let Some(stored) = candidate.load(&mirror).await? {
                    return decode_stored(&stored.value);
                }
                if tokio::time::timeout_at(give_up, changes.changed())
                    .await
                    .is_err()
                {
                    return Err(Error::backend_msg(
                        self.group.backend,
                        format!(
                            "no host candidate mirrored the state key {key:?} within {MIRROR_WAIT:?}"
                        ),
                    ));
                }
            }
        })
    }

    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        self.group.inner.store(key, value, term)
    }

    fn watch_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            if self.is_candidate() {
                return self.group.inner.watch_key(key).await;
            }
            let mirror = Self::mirror_key(key)?;
            self.want(key)?;
            let watched = self.group.candidate_lock().watch_key(&mirror).await;
            Ok(or_slow_poll(watched, "state value"))
        })
    }

    /// A member entry in the host directory (`<lock>.members/`, the file backend's registry):
    /// the candidate adds the members up into the group's one entry in the inner registry.
    fn register(
        &self,
        entry: Candidate,
        lease: Option<Lease>,
    ) -> BoxFuture<'_, Result<Box<dyn Registration>, Error>> {
        Box::pin(async move { self.group.candidate_lock().register(entry, lease).await })
    }

    /// The inner registry: on the candidate, read from the backend; elsewhere, from the mirror
    /// the candidate keeps.
    fn candidates(&self) -> BoxFuture<'_, Result<Vec<Candidate>, Error>> {
        Box::pin(async move {
            if self.is_candidate() {
                return self.group.inner.candidates().await;
            }
            let candidate = self.group.candidate_lock();
            let Some(stored) = candidate.load(registry_key()).await? else {
                return Ok(Vec::new());
            };
            // Only the live candidate's mirror: an earlier candidate's is out of date (the
            // live one may be of a version that keeps none).
            let live = candidate.holder().await.ok().flatten().map(|h| h.term);
            if live != Some(stored.term) {
                return Ok(Vec::new());
            }
            decode_registry(&stored.value)
        })
    }

    fn watch_candidates(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            if self.is_candidate() {
                return self.group.inner.watch_candidates().await;
            }
            let watched = self.group.candidate_lock().watch_key(registry_key()).await;
            Ok(or_slow_poll(watched, "registry"))
        })
    }
}
