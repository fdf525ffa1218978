//! The file-lock backend: `flock(2)` on a file in a directory, for the processes of **one host**.
//!
//! [`FileBackend::new(dir)`](FileBackend::new) names a directory; every lock name gets its own files in
//! it. The kernel grants the lock to one open file at a time and takes it back when the holder's
//! descriptor closes, also when the holder's process dies, so a waiting node wakes at once
//! (no lease, no polling).
//!
//! # Files
//!
//! | path | holds | written |
//! |---|---|---|
//! | `<dir>/<name>.lock` | the file that is locked; bytes 0‥21 hold the last term as 20 decimal digits and `\n` | the term: by each new holder, `pwrite` before it becomes primary, `fsync` right after |
//! | `<dir>/<name>.holder` | the holder record, a [`Holder`] as JSON | by the holder, atomically (temporary file, `rename`; not fsynced: a record a crash left behind is recognised as stale); deleted on release |
//! | `<dir>/<name>.state/<key>` | state values of at most [`MAX_STATE_VALUE`] (16 MiB): a line `tower-primary-state 1 <term> <length>`, then the value | by the holder, atomically and durably (temporary file, `fsync`, `rename`, `fsync` of the directory) |
//! | `<dir>/<name>.reserved` | the [reservation](Leadership::reserve): JSON `{node, until_ns, term, boot}`, `until_ns` on this host's `CLOCK_BOOTTIME` | by the holder, atomically (not fsynced: a record of an earlier boot reads as expired); deleted by the node that takes the lock next |
//! | `<dir>/<name>.candidates/<node>.<pid>.<n>` | one [registry](Lock::register) entry each (the node id with bytes other than letters, digits, `_`, `-` as `%XX`): a line `tower-primary-candidate 1 <checksum> <length>`, then the [`Candidate`] as JSON | by its registrant, which holds an exclusive `flock` on it for the registration's life; rewritten in place on update; deleted on drop, or by any reader once nobody holds it |
//! | `<dir>/.<file>.<pid>.<n>.tmp` | temporary files of the atomic writes | renamed into place at once |
//!
//! The lock file is opened read-write with `O_NOFOLLOW` and `O_CLOEXEC`, created with mode 0600,
//! and **never deleted** by this crate. The state directory is created with mode 0700.
//!
//! [`Backend::lock`] (called by `Elector::builder(..).spawn()`) checks the directory and creates
//! the lock file and the state directory: a missing directory, a symbolic link, something that is
//! not a directory, or a directory this process cannot write are [`ConfigError::LockDir`] errors.
//! A relative path is resolved against the working directory at that moment.
//!
//! # Terms
//!
//! A new holder's term is `max(stored + 1, wall-clock microseconds since the Unix epoch)`, where
//! `stored` is the highest term it can read: the lock file's, the holder record's and the state
//! values'. It is written (through the page cache, which every process reads) before the node
//! becomes primary, and synced to disk right after, off the failover path; an OS crash before the
//! sync loses at most that write, and the wall-clock part still makes the next term higher. A stored term that cannot
//! be parsed is logged (`tracing` warning) and the other sources are used, so terms keep rising
//! even if the lock file is deleted or damaged (as long as the wall clock does not go back
//! further than the lost records reached).
//!
//! # How it works
//!
//! - **Acquire**: one dedicated waiter thread per `Lock` object (not `spawn_blocking`, which
//!   would keep a dropped tokio runtime from shutting down) opens the lock file, tries
//!   `LOCK_EX | LOCK_NB`, and if the lock is busy blocks in `flock(LOCK_EX)`. It serves the
//!   object's acquires in turn and ends when none waits: an acquire that is given up while
//!   another process holds the lock leaves the waiting thread to the next acquire rather than a
//!   blocked thread each, and a grant that arrives when nobody waits any more is unlocked at
//!   once.
//! - **Off the runtime**: everything else that touches the disk (holder and state reads, state
//!   writes with their `fsync`s, the loss check, release) runs on tokio's blocking pool, so a
//!   slow disk never stalls the runtime; no mutex is held across file I/O that the runtime
//!   waits for.
//! - **Inode check**: after every grant, the locked file's (device, inode) is compared with what
//!   the path names now. A waiter that was blocked on a file which has since been deleted or
//!   replaced drops that lock, reopens the path and waits again: it never becomes primary on a
//!   file nobody else can see.
//! - **Loss**: the holder watches its directory (inotify) and re-checks every second as a safety
//!   net; when the path no longer names the locked file, [`Leadership::lost`] resolves and the
//!   elector steps down. The holder also rewrites a holder record that was damaged or deleted.
//! - **Holder**: [`Lock::holder`] returns the record only if it is plausibly current: a record of
//!   a process on this host that no longer exists, or a record while nobody holds the lock
//!   (checked with a shared `flock` probe), is stale and reads as `None`. Secondaries follow the
//!   record through inotify.
//! - **State**: [`Lock::store`] writes only while this very lock object holds the lock with that
//!   term, the lock file is still the locked one, and no newer term has written the key. A write
//!   under way keeps the lock held until it is done; a release waits for it.
//! - **Registry**: an entry is a file locked by its registrant: it is live while locked, and the
//!   kernel frees the lock the instant the registrant's process dies, so a reader (probing with
//!   a non-blocking shared `flock`) never lists a dead node's entry, and deletes its file.
//!   [`Lock::watch_candidates`] follows the directory with inotify; a registrant's death closes
//!   its descriptor, which is reported at once. Entry files that are symbolic links, not regular
//!   files or not of this user are ignored.
//! - **Reservations**: the waiter thread reads the reservation record while it holds the
//!   `flock` (only a holder writes it). A live reservation for another node: it unlocks at once
//!   and waits for the record to change (inotify) or run out before it waits in `flock` again;
//!   the reserved node, or anybody after the window, deletes the record and takes the lock under
//!   a new term. Nodes of 0.1.0 ignore the record: they may take the lock during the window
//!   (one holder and rising terms all the same).
//! - **Damaged files**: a state value or holder record that cannot be parsed, is larger than its
//!   limit, or is not a regular file (a FIFO would block a reader) is an [`Error::Corrupt`]
//!   naming the file, read without blocking and never beyond the limit. The holder rewrites its
//!   record; the next [`Lock::store`] of the key replaces a damaged value.
//!
//! # Guarantees
//!
//! At most one holder per lock name on one host, by the kernel's `flock` and the inode check; a
//! crashed holder's lock is free the instant its process exits; terms rise across a deleted or
//! damaged term record. The full statement, its assumptions and where it stops (network file
//! systems, a deleted lock file, a raw `fork()`) are in GUARANTEES.md at the root of the
//! repository.
//!
//! # Where to put the directory
//!
//! - On one host's local file system: `flock` on NFS or other network file systems is emulated or
//!   local-only, and not supported.
//! - **Never delete the lock file**, nor the directory (no "stale lock" clean-up, no age-based tmp
//!   cleaners).
//! - Use a private directory owned by the service user, e.g. `/run/<app>` (systemd
//!   `RuntimeDirectory=<app>` with `RuntimeDirectoryPreserve=yes`) or `/var/lib/<app>`
//!   (`StateDirectory=`). **Not `/tmp`**: with systemd `PrivateTmp=yes` every unit has its own
//!   `/tmp`, so nodes in different units would never see each other's lock. Anyone who can open
//!   the lock file can hold the lock.
//! - Take the lock after forking workers: a raw `fork()` without exec shares it with the child
//!   (`std::process::Command`, fork + exec, does not: `O_CLOEXEC`).
//!
//! # Examples
//!
//! ```
//! use tower_primary::{Elector, FileBackend, NodeId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In production: FileBackend::new("/run/myapp"), a directory only the service user can write.
//! let dir = tempfile::tempdir()?;
//!
//! let first = Elector::builder("report-scheduler")
//!     .backend(FileBackend::new(dir.path()))
//!     .node(NodeId::new("a"))
//!     .spawn()?;
//! let term = first.handle().wait_primary().await.term();
//!
//! // Another node (here in the same process) waits in flock.
//! let second = Elector::builder("report-scheduler")
//!     .backend(FileBackend::new(dir.path()))
//!     .node(NodeId::new("b"))
//!     .spawn()?;
//!
//! // A step-down hands the lock over at once, with a higher term.
//! first.step_down().await?;
//! let ctx = second.handle().wait_primary().await;
//! assert!(ctx.term() > term);
//! assert_eq!(second.handle().holder().unwrap().id, "b");
//! assert!(dir.path().join("report-scheduler.lock").exists());
//! # second.shutdown().await;
//! # first.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::unistd::AccessFlags;
use notify::EventKind;
use notify::event::ModifyKind;
use tokio::sync::{oneshot, watch};

use super::{
    AcquireRequest, Backend, BoxFuture, Candidate, Changes, Leadership, Lease, Lock, Registration,
    Renewals, Stored, validate_key,
};
use crate::error::{ConfigError, Error, validate_lock_name};
use crate::role::Holder;

mod dir_watch;
mod held;
pub(in crate::backend) mod inotify;
mod paths;
mod records;
mod registry;
mod reserve;
mod state;
#[cfg(test)]
mod tests;
mod waiter;

use self::dir_watch::*;
use self::held::*;
pub(in crate::backend) use self::paths::existing_dir;
use self::paths::*;
use self::records::*;
pub(in crate::backend) use self::records::{encode_state, read_prefix, write_atomic};
use self::waiter::*;

const NAME: &str = "file";
/// How often a holder re-checks its lock path even without an inotify event.
const SAFETY_NET: Duration = Duration::from_secs(1);
/// The term at offset 0 of the lock file: 20 decimal digits and a newline.
const TERM_LEN: u64 = 21;
/// Grants on a replaced lock file in a row before giving up (the elector retries with backoff).
const MAX_GRANT_ATTEMPTS: u32 = 16;
/// A larger holder record is corrupt.
const MAX_HOLDER_BYTES: u64 = 64 * 1024;
/// The longest header line of a state file, line end included.
const MAX_STATE_HEADER: u64 = 128;
const STATE_MAGIC: &str = "tower-primary-state";

/// The largest state value the file backend keeps: 16 MiB. [`Lock::store`] refuses a larger one
/// with [`Error::ValueTooLarge`], and [`Lock::load`] reports a larger file as
/// [`Error::Corrupt`] without reading it.
pub const MAX_STATE_VALUE: usize = 16 * 1024 * 1024;

/// Locks in a directory, with `flock(2)`. See the [module docs](self).
///
/// # Examples
///
/// ```
/// use tower_primary::FileBackend;
/// use tower_primary::backend::Backend;
///
/// let dir = tempfile::tempdir().unwrap();
/// let backend = FileBackend::new(dir.path());
/// assert_eq!(backend.name(), "file");
/// assert!(backend.min_lease().is_none());
/// backend.lock("jobs").unwrap();
/// assert!(dir.path().join("jobs.lock").exists());
///
/// let err = FileBackend::new(dir.path().join("missing")).lock("jobs").unwrap_err();
/// assert!(err.to_string().contains("does not exist"), "{err}");
/// ```
#[derive(Clone, Debug)]
pub struct FileBackend {
    dir: PathBuf,
    suffixes: Suffixes,
}

/// The former name of [`FileBackend`]: every backend type is now called `…Backend`.
#[deprecated(note = "renamed to `FileBackend`, like every other backend")]
pub type FileLock = FileBackend;

impl FileBackend {
    /// Locks kept in `dir`. Nothing is checked until the elector is spawned
    /// ([`Backend::lock`]).
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileBackend {
            dir: dir.into(),
            suffixes: Suffixes::LOCK,
        }
    }

    /// The candidate lock of a host group in `dir`: the same machinery under other file names
    /// (`<name>.candidate`, `<name>.candidate-holder`, `<name>.mirror/`), so that it never meets
    /// a file backend's lock of the same name in the same directory.
    pub(in crate::backend) fn host_candidate(dir: impl Into<PathBuf>) -> Self {
        FileBackend {
            dir: dir.into(),
            suffixes: Suffixes::CANDIDATE,
        }
    }

    /// The directory, as given.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn open(&self, name: &str) -> Result<DirLock, ConfigError> {
        validate_lock_name(name)?;
        let paths = Paths::checked(&self.dir, name, self.suffixes)?;
        Ok(DirLock {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                paths,
                host: hostname(),
                live: Mutex::new(None),
                writes: watch::channel(0).0,
                waiting: Mutex::new(Waiting::default()),
                watch: Mutex::new(None),
                blocked: watch::channel(0).0,
                stale_grants: watch::channel(0).0,
                deferred: watch::channel(0).0,
                #[cfg(test)]
                disk: tests::SlowDisk::new(),
            }),
        })
    }
}

impl Backend for FileBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn min_lease(&self) -> Option<Duration> {
        None
    }

    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        Ok(Arc::new(self.open(name)?))
    }
}

/// The lock this `Lock` object holds now.
struct Live {
    term: u64,
    id: FileId,
    /// The locked file. The kernel keeps the lock until the last descriptor of this open file
    /// closes, so a state write holding a clone keeps the lock until it is done.
    file: Arc<File>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("term", &self.term)
            .field("inode", &self.id.ino)
            .finish_non_exhaustive()
    }
}

/// A write made under the live term (a state value, a holder record repair): it keeps the lock
/// file open, and so the lock held, until it is dropped, and a release waits for it before it
/// deletes the holder record.
struct WriteGuard {
    inner: Arc<Inner>,
    file: Option<Arc<File>>,
    id: FileId,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        // The descriptor first: a release that sees no write in flight then owns the last one.
        drop(self.file.take());
        self.inner.writes.send_modify(|n| *n -= 1);
    }
}

pub(super) use crate::sync::lock;

fn bump(v: &mut u64) {
    *v = v.wrapping_add(1);
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Whether a process of this host may still exist (`kill(pid, 0)` does not say ESRCH).
fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        // Not a pid this kernel hands out; let the lock probe decide.
        return true;
    };
    if raw <= 0 {
        return false;
    }
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
        Err(Errno::ESRCH)
    )
}

fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// One lock name, as one `Lock` object sees it.
struct Inner {
    name: String,
    paths: Paths,
    host: String,
    /// The lock held through this object, if any: what `store` checks. Held only for
    /// moments, never across file I/O.
    live: Mutex<Option<Live>>,
    /// Writes in flight under the live term ([`WriteGuard`]s).
    writes: watch::Sender<u64>,
    /// Acquires waiting for the one thread that waits in `flock` for this object.
    waiting: Mutex<Waiting>,
    /// The directory watch, created on first use and again after it broke.
    watch: Mutex<Option<Arc<DirWatch>>>,
    /// Times a waiting thread went into a blocking `flock` (observed by tests).
    blocked: watch::Sender<u64>,
    /// Grants dropped because the path no longer named the locked file (observed by tests).
    stale_grants: watch::Sender<u64>,
    /// Grants given back because the lock was reserved for another node (observed by tests).
    deferred: watch::Sender<u64>,
    /// A disk that stalls on demand, in tests.
    #[cfg(test)]
    disk: tests::SlowDisk,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirLock")
            .field("lock", &self.name)
            .field("dir", &self.paths.dir)
            .field("live", &self.live.try_lock().ok().as_deref())
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Where tests stall file operation `op` to play a slow disk.
    fn disk(&self, op: &'static str) {
        #[cfg(test)]
        self.disk.pass(op);
        #[cfg(not(test))]
        let _ = op;
    }

    /// A guard for a write under `term`, if `term` holds the lock through this object now.
    fn write_guard(self: &Arc<Self>, term: u64) -> Result<WriteGuard, Option<u64>> {
        let live = lock(&self.live);
        match live.as_ref() {
            Some(l) if l.term == term => {
                self.writes.send_modify(|n| *n += 1);
                Ok(WriteGuard {
                    inner: self.clone(),
                    file: Some(l.file.clone()),
                    id: l.id,
                })
            }
            Some(l) => Err(Some(l.term)),
            None => Err(None),
        }
    }

    /// Ends the live term `term` (if it is the live one): no write can start under it any more.
    fn end_term(&self, term: u64) {
        let mut live = lock(&self.live);
        if live.as_ref().is_some_and(|l| l.term == term) {
            *live = None;
        }
    }

    /// Waits until no write is in flight under an ended term.
    async fn writes_done(&self) {
        let mut rx = self.writes.subscribe();
        // The sender lives in `self`: this cannot fail.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// A backend error, logged.
    fn io(&self, what: String, err: io::Error) -> Error {
        tracing::warn!(lock = %self.name, backend = NAME, error = %err, "{what}");
        Error::backend(NAME, what, err)
    }

    fn dir_watch(&self) -> Result<Arc<DirWatch>, Error> {
        let mut slot = lock(&self.watch);
        if let Some(w) = slot.as_ref().filter(|w| !w.signals.is_broken()) {
            return Ok(w.clone());
        }
        let w = DirWatch::start(&self.paths).map_err(|e| {
            tracing::warn!(lock = %self.name, backend = NAME, error = %e, "cannot watch the lock directory");
            e
        })?;
        *slot = Some(w.clone());
        Ok(w)
    }

    fn read_holder(&self) -> io::Result<Record<Holder>> {
        read_record(&self.paths.holder, MAX_HOLDER_BYTES, parse_holder)
    }

    fn state_path(&self, key: &str) -> PathBuf {
        self.paths.state_dir.join(key)
    }

    fn read_state(&self, key: &str) -> io::Result<Record<Stored>> {
        read_record(
            &self.state_path(key),
            MAX_STATE_HEADER + MAX_STATE_VALUE as u64,
            parse_state,
        )
    }

    fn write_holder(&self, record: &Holder) -> Result<(), Error> {
        let json = serde_json::to_vec(record).map_err(|e| {
            tracing::warn!(lock = %self.name, error = %e, "cannot encode the holder record");
            Error::backend(NAME, "cannot encode the holder record", e)
        })?;
        // Not fsynced: the record is for display, and one that a crash left behind is detected
        // as stale (dead pid, lock not held).
        write_atomic(&self.paths.dir, &self.paths.holder_file, &json, false).map_err(|e| {
            self.io(
                format!(
                    "cannot write the holder record {}",
                    self.paths.holder.display()
                ),
                e,
            )
        })
    }

    /// Rewrites a damaged or missing holder record, if `term` still holds the lock here.
    fn rewrite_holder(
        self: &Arc<Self>,
        term: u64,
        id: FileId,
        record: &Holder,
    ) -> Result<(), Error> {
        let Ok(guard) = self.write_guard(term) else {
            return Ok(());
        };
        if guard.id != id {
            return Ok(());
        }
        self.write_holder(record)
    }

    /// Who holds the lock, if the record is plausibly current.
    /// Whether the process a holder record names has certainly ended. With a process identity
    /// (written by this version) only a process of this host's PID namespace can be checked; a
    /// holder in another one (another container on the same volume) is left to the lock probe.
    /// A record without one falls back to the host name and the pid.
    fn holder_has_exited(&self, holder: &Holder) -> bool {
        match &holder.process {
            Some(process) => crate::process::ProcessIdentity::current()
                .is_some_and(|me| me.same_host(process) && process.is_gone()),
            None => holder.host == self.host && !pid_alive(holder.pid),
        }
    }

    fn current_holder(&self) -> Result<Option<Holder>, Error> {
        self.disk("holder");
        let holder = match self.read_holder() {
            Ok(Record::Found(h)) => h,
            Ok(Record::Missing) => return Ok(None),
            Ok(Record::Corrupt(problem)) => {
                tracing::warn!(
                    lock = %self.name,
                    path = %self.paths.holder.display(),
                    problem,
                    "corrupt holder record; the holder rewrites it"
                );
                return Err(Error::Corrupt {
                    backend: NAME,
                    what: format!(
                        "holder record of lock {:?} ({})",
                        self.name,
                        self.paths.holder.display()
                    ),
                    problem,
                });
            }
            Err(e) => {
                return Err(self.io(
                    format!(
                        "cannot read the holder record {}",
                        self.paths.holder.display()
                    ),
                    e,
                ));
            }
        };
        if self.holder_has_exited(&holder) {
            tracing::debug!(lock = %self.name, pid = holder.pid, "the holder record names a process that has exited");
            return Ok(None);
        }
        match self.lock_is_free() {
            Ok(true) => {
                tracing::debug!(lock = %self.name, "the holder record is left over: nobody holds the lock");
                Ok(None)
            }
            Ok(false) => Ok(Some(holder)),
            Err(e) => {
                tracing::warn!(lock = %self.name, error = %e, "cannot probe the lock; trusting the holder record");
                Ok(Some(holder))
            }
        }
    }

    /// Whether nobody holds the lock: a shared, non-blocking probe on the file the path names.
    fn lock_is_free(&self) -> io::Result<bool> {
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
            .open(&self.paths.lock)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(e),
        };
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                Ok(true)
            }
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    /// Whether the path still names the file with `id`.
    fn path_names(&self, id: FileId) -> bool {
        fs::symlink_metadata(&self.paths.lock).is_ok_and(|m| FileId::of(&m) == id)
    }
}

/// Runs short file I/O on tokio's blocking pool, in the caller's tracing context. Never a wait
/// without bound: a `spawn_blocking` task blocked in `flock` would keep a dropped runtime from
/// shutting down, so lock waits run on the waiter thread.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        tracing::dispatcher::with_default(&dispatch, || span.in_scope(f))
    })
    .await
    .map_err(|e| Error::backend(NAME, format!("the file task that {what} failed"), e))?
}

/// The lock of one name in one directory.
#[derive(Debug)]
struct DirLock {
    inner: Arc<Inner>,
}

impl DirLock {
    /// The directory watch, set up off the runtime.
    async fn dir_watch(&self) -> Result<Arc<DirWatch>, Error> {
        let inner = self.inner.clone();
        blocking("watches the lock directory", move || inner.dir_watch()).await
    }
}

impl Lock for DirLock {
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
        Box::pin(async move {
            let inner = self.inner.clone();
            // Queued at the first poll, so the wait starts at once; nothing else runs before
            // the grant, so an acquire given up at once costs no thread.
            let (tx, rx) = oneshot::channel();
            inner.enqueue(Pending {
                req,
                tx,
                dispatch: tracing::dispatcher::get_default(Clone::clone),
                span: tracing::Span::current(),
            })?;
            let held = rx.await.map_err(|_| {
                Error::backend_msg(NAME, "the lock waiting thread ended without an answer")
            })??;
            // `lost` sets up the directory watch it follows; it checks the path after
            // subscribing, so no change since the grant is missed.
            Ok(Box::new(FileLeadership {
                held,
                watch: None,
                entry: None,
                lost: None,
            }) as Box<dyn Leadership>)
        })
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
        let inner = self.inner.clone();
        Box::pin(blocking("reads the holder record", move || {
            inner.current_holder()
        }))
    }

    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            let watch = self.dir_watch().await?;
            let rx = watch.signals.entry.subscribe();
            Ok(Box::new(DirChanges { watch, rx }) as Box<dyn Changes>)
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
        Box::pin(async move {
            validate_key(key)?;
            let inner = self.inner.clone();
            let key = key.to_owned();
            blocking("reads a state value", move || inner.load(&key)).await
        })
    }

    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            validate_key(key)?;
            if value.len() > MAX_STATE_VALUE {
                return Err(Error::ValueTooLarge {
                    backend: NAME,
                    key: key.to_owned(),
                    size: value.len() as u64,
                    max: MAX_STATE_VALUE as u64,
                });
            }
            let inner = self.inner.clone();
            let key = key.to_owned();
            let value = value.to_vec();
            // A write that outlives a dropped future still runs under the check in
            // `Inner::store`, and keeps the lock until it is done.
            blocking("writes a state value", move || {
                inner.store(&key, &value, term)
            })
            .await
        })
    }

    fn watch_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            validate_key(key)?;
            let watch = self.dir_watch().await?;
            let rx = watch.signals.subscribe_key(key);
            Ok(Box::new(DirChanges { watch, rx }) as Box<dyn Changes>)
        })
    }

    /// An entry file held with `flock` (see `registry.rs`); no lease: it lives with the process.
    fn register(
        &self,
        entry: Candidate,
        _lease: Option<Lease>,
    ) -> BoxFuture<'_, Result<Box<dyn Registration>, Error>> {
        Box::pin(self.register_candidate(entry))
    }

    fn candidates(&self) -> BoxFuture<'_, Result<Vec<Candidate>, Error>> {
        Box::pin(self.list_candidates())
    }

    fn watch_candidates(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(self.watch_registry())
    }
}
