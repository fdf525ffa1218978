//! Host groups: one candidate per host for a server backend.
//!
//! Many processes of one host (the workers of a pre-fork server, the replicas of a service on
//! one machine) that share a **host directory** campaign as one group: every process waits in
//! `flock` on `<host dir>/<lock>.candidate`, and the holder of that lock, the **host candidate**,
//! is the only process that talks to the server backend for the lock. The others, the
//! **followers**, are secondary and read the role's holder (and the state values they load)
//! from mirrors the candidate keeps in the host directory: a server sees one connection per
//! host, not one per worker.
//!
//! [`HostGroup`] is that, as a [`Backend`] wrapping the server backend. The elector turns it on
//! with [`ElectorBuilder::host_dir`](crate::ElectorBuilder::host_dir), or when that is not called,
//! with the environment variable [`HOST_DIR_ENV`] (`TOWER_PRIMARY_HOST_DIR`) read at spawn. The
//! file and memory backends are left alone (a debug log says so): the file backend already is a
//! host lock, and a memory backend lives in one process.
//!
//! # Files
//!
//! | path | holds |
//! |---|---|
//! | `<lock>.candidate` | the candidate lock (the file backend's waiter and inode check); `<lock>.candidate-holder` names the candidate process |
//! | `<lock>.mirror/` | the mirrors the candidate writes under its candidate term: `h` (the inner lock's holder), `c` (the inner lock's candidate registry, JSON) and `k<key>` (a state value) |
//! | `<lock>.members/` | one member entry per process's [registration](Lock::register): the file backend's registry (a `flock`'d file each) |
//! | `<lock>.host` | JSON, 0600, written atomically (not fsynced: a record is trusted only within the boot that wrote it, and a crashed process loses nothing the page cache holds): the inner backend's [`address`](Backend::address), the lock, the lease, the boot id, the candidate's [`ProcessIdentity`](crate::process::ProcessIdentity), its leadership's resume token and term, a `released` mark |
//! | `<lock>.heartbeat` | the candidate's heartbeat on `CLOCK_BOOTTIME`, every third of a lease (not fsynced, so `.host` is written only when something changes) |
//! | `<lock>.sibling.<pid>.<n>` | one per process waiting for the candidate lock, while it waits |
//! | `<lock>.want.<key>` | a state key some follower loaded or watches |
//! | `<lock>.replacing` | a `flock` taken by the one follower that replaces a hung candidate's file |
//!
//! # How it works
//!
//! - **Candidate**: [`Lock::acquire`] waits for the candidate lock, then campaigns on the inner
//!   lock; the inner backend's holder record names the candidate's own node, so the health
//!   endpoint names the process that leads. While it is the candidate, a process mirrors the
//!   inner lock's holder (the inner `watch_holder`) and every wanted state key (the inner
//!   `load` and `watch_key`) into `<lock>.mirror/`; writes are atomic and fsynced, and refused
//!   once another process holds the candidate lock.
//! - **Followers**: [`Lock::holder`] and [`Lock::watch_holder`] read the holder mirror (inotify),
//!   in every process, the candidate included. [`Lock::load`] and [`Lock::watch_key`] on a
//!   follower record the key as wanted and read its mirror; they never open a backend
//!   connection. The cost: one backend watch, held by the candidate, per key any process of the
//!   host ever wanted. [`Lock::store`] is only called by the primary, which is the candidate: it
//!   passes through. State keys are at most 199 bytes in a host group (the mirror prefixes one).
//! - **Registry**: every process registers a member entry in the host directory
//!   ([`Lock::register`]). The group is **one** entry in the inner registry, kept by the
//!   candidate while it is the candidate: its own node id, the highest priority among the ready,
//!   non-draining members (among all when none is), ready when any member is eligible, draining
//!   when every member drains, yielded when the candidate's own member entry is. A member that
//!   registers, updates or dies (its `flock` goes with it) changes it at once (inotify).
//!   [`Lock::candidates`] and [`Lock::watch_candidates`] read the inner registry on the
//!   candidate, and its mirror `c` elsewhere (a mirror of an earlier candidate reads as empty).
//!   [`Leadership::reserve`](crate::backend::Leadership::reserve) passes to the inner
//!   leadership: the reserved node is another group's candidate (or a lone node).
//! - **Resume**: the process that takes the candidate lock reads `.host`. If the record names a
//!   candidate of the same address, lock, lease and boot whose process is gone (a death
//!   certificate: [`ProcessIdentity::wait_gone`](crate::process::ProcessIdentity::wait_gone),
//!   bounded), or carries the `released` mark of a handover, it takes the lease over with
//!   [`Lock::resume`] under a new term; otherwise, or when the backend says the lease is no
//!   longer the token's, it campaigns with [`Lock::acquire`]. `.host` is rewritten with
//!   the new candidate and token before the leadership is returned; the elector fences the term
//!   from the resumed leadership's renewals as for any acquisition.
//! - **Handover at exit** ([`Release::Exit`]): when a live process of the host announces that it
//!   waits, the candidate marks `.host` released (with its token), stops renewing and lets the
//!   candidate lock go; the sibling that takes it resumes the lease and rewrites `.host`. If
//!   nobody has within [`HANDOVER_BOUND`], the exiting process takes the candidate lock back,
//!   resumes its own lease and releases it to the backend. A step-down, a loss or a fencing
//!   ([`Release::StepDown`]) releases to the backend.
//! - **Hung candidate**: followers read the heartbeat every third of a lease. A candidate whose
//!   heartbeat is older than its lease and a half while it still holds the candidate lock (a
//!   stopped process) is replaced: a follower puts a new `<lock>.candidate` file in place, the
//!   waiting processes move to it, and the next candidate campaigns with a fresh identity,
//!   without resuming. The stopped process, once it runs again, finds its candidate lock replaced
//!   and steps down (its term's deadline passed long before).
//!
//! # Bad input
//!
//! [`Backend::lock`] (at spawn) refuses with [`ConfigError::HostDir`] a host directory that is
//! missing, a symbolic link, not a directory, not owned by this process's user, writable by group
//! or others, not writable, or on a network file system (NFS, SMB/CIFS, 9p, CephFS, AFS...); and a
//! group whose live candidate campaigns on another backend address. A corrupt `.host`, one of
//! another address, lock or lease, or one of an earlier boot, is not resumed from: the next
//! candidate campaigns with a fresh identity, with a warning. Whatever the files say, the
//! candidate lock is one `flock`: never two candidates in one group.
//!
//! # Examples
//!
//! ```
//! use tower_primary::backend::host::HostGroup;
//! use tower_primary::backend::{AcquireRequest, Backend};
//! use tower_primary::{MemoryBackend, NodeId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In production: a private directory such as /run/<app>, and a server backend, with
//! // `Elector::builder(..).host_dir("/run/myapp")` or TOWER_PRIMARY_HOST_DIR=/run/myapp.
//! let dir = tempfile::tempdir()?;
//! let server = MemoryBackend::new();
//! let worker_1 = HostGroup::new(server.clone(), dir.path()).lock("jobs")?;
//! let worker_2 = HostGroup::new(server.clone(), dir.path()).lock("jobs")?;
//!
//! // The first worker becomes the host candidate and leads.
//! let term = worker_1.acquire(AcquireRequest::new(NodeId::new("w1"))).await?;
//! assert_eq!(term.holder().id, "w1");
//! assert!(dir.path().join("jobs.host").exists());
//!
//! // The second waits for the candidate lock; it never calls the server meanwhile.
//! let waiting = tokio::time::timeout(
//!     std::time::Duration::from_millis(50),
//!     worker_2.acquire(AcquireRequest::new(NodeId::new("w2"))),
//! )
//! .await;
//! assert!(waiting.is_err());
//! term.release().await?;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::file::FileBackend;
use super::{Backend, Lease, Lock, Release};
use crate::error::{ConfigError, validate_lock_name};

mod candidacy;
mod dir;
mod leadership;
mod lock;
mod record;
#[cfg(test)]
mod tests;
mod wake;

use self::lock::{Group, HostLock};
use self::record::{Files, Read};

/// Environment variable naming the host directory, read when the elector is spawned and
/// [`ElectorBuilder::host_dir`](crate::ElectorBuilder::host_dir) was not called.
pub const HOST_DIR_ENV: &str = "TOWER_PRIMARY_HOST_DIR";

/// How long an exiting candidate waits for a sibling to take its lease over before it releases
/// the lease to the backend.
pub const HANDOVER_BOUND: Duration = Duration::from_millis(300);

/// How long a new candidate waits for its predecessor's process to be certified gone.
const DEATH_CERTIFICATE_BOUND: Duration = Duration::from_millis(500);

/// The lease assumed for heartbeats when the inner backend has none (a session lock).
const SESSION_HEARTBEAT_LEASE: Duration = Duration::from_secs(10);

/// A server backend shared by the processes of one host through a host directory: one
/// candidate per host. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct HostGroup {
    inner: Arc<dyn Backend>,
    dir: PathBuf,
}

impl HostGroup {
    /// `inner`'s locks, campaigned for by one process of the host at a time, the processes
    /// meeting in `dir`. Nothing is checked until the elector is spawned ([`Backend::lock`]).
    #[must_use]
    pub fn new(inner: impl Backend, dir: impl Into<PathBuf>) -> Self {
        HostGroup {
            inner: Arc::new(inner),
            dir: dir.into(),
        }
    }

    /// The host directory, as given.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The wrapped backend.
    #[must_use]
    pub fn inner(&self) -> &dyn Backend {
        &*self.inner
    }
}

impl Backend for HostGroup {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn address(&self) -> String {
        self.inner.address()
    }

    fn min_lease(&self) -> Option<Duration> {
        self.inner.min_lease()
    }

    fn max_lease(&self) -> Option<Duration> {
        self.inner.max_lease()
    }

    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        validate_lock_name(name)?;
        let dir = dir::check(&self.dir)?;
        let files = Files::new(&dir, name);
        let address = self.inner.address();
        refuse_other_address(&files, &address, &self.dir)?;
        let candidate = FileBackend::host_candidate(&dir).lock(name)?;
        let inner = self.inner.lock(name)?;
        Ok(Arc::new(HostLock::new(Group::new(
            files,
            address,
            self.inner.name(),
            inner,
            candidate,
            dir,
        ))))
    }
}

/// A live candidate of the group that campaigns on another backend address makes the newcomer's
/// configuration wrong: refused at spawn, so that nobody believes two elections are one.
fn refuse_other_address(files: &Files, address: &str, given: &Path) -> Result<(), ConfigError> {
    let Ok(Read::Found(record)) = files.read_host() else {
        return Ok(());
    };
    if record.address == address {
        return Ok(());
    }
    let me = crate::process::ProcessIdentity::current();
    let live = record
        .candidate
        .as_ref()
        .zip(me.as_ref())
        .is_some_and(|(c, me)| me.same_host(c) && !c.is_gone());
    if !live {
        return Ok(());
    }
    Err(ConfigError::HostDir {
        path: given.to_owned(),
        problem: format!(
            "the candidate of lock {:?} in this host directory (pid {}) campaigns on {}, this \
             process on {address}: every process of a host group must use the same backend",
            files.lock,
            record.candidate.as_ref().map_or(0, |c| c.pid),
            record.address
        ),
    })
}

/// The host directory from [`HOST_DIR_ENV`], if set and not empty.
pub(crate) fn dir_from_env() -> Option<PathBuf> {
    std::env::var_os(HOST_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// `backend` in a host group in `dir`, unless `dir` is `None` or the backend is the file or
/// memory backend (said at debug level).
pub(crate) fn wrap(
    backend: Arc<dyn Backend>,
    dir: Option<PathBuf>,
    lock: &str,
) -> Arc<dyn Backend> {
    let Some(dir) = dir else {
        return backend;
    };
    // A backend the user already put in a group (the `Debug` of `HostGroup` says so; the trait
    // has no other way to tell): a second group would wait on its own candidate lock.
    if format!("{backend:?}").starts_with("HostGroup") {
        return backend;
    }
    if matches!(backend.name(), "file" | "memory") {
        tracing::debug!(
            lock,
            backend = backend.name(),
            dir = %dir.display(),
            "a host directory is ignored with this backend: the file backend already is one \
             lock per host, and a memory backend lives in one process"
        );
        return backend;
    }
    Arc::new(HostGroup {
        inner: backend,
        dir,
    })
}

/// The heartbeat period and the age after which a candidate counts as hung, for `lease`.
fn heartbeat_timing(lease: Option<Lease>) -> (Duration, Duration) {
    let ttl = lease.map_or(SESSION_HEARTBEAT_LEASE, |l| l.ttl());
    (ttl / 3, ttl + ttl / 2)
}

/// Whether `release` may pass the lease to a sibling.
fn passes_on(why: Release) -> bool {
    matches!(why, Release::Exit)
}
