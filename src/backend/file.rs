//! The file-lock backend: `flock(2)` on a file in a directory, for the processes of **one host**.
//!
//! [`FileLock::new(dir)`](FileLock::new) names a directory; every lock name gets its own files in
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
//! - **Damaged files**: a state value or holder record that cannot be parsed, is larger than its
//!   limit, or is not a regular file (a FIFO would block a reader) is an [`Error::Corrupt`]
//!   naming the file, read without blocking and never beyond the limit. The holder rewrites its
//!   record; the next [`Lock::store`] of the key replaces a damaged value.
//!
//! # Guarantees and hazards
//!
//! - **One host only.** flock on NFS or other network file systems is emulated or local-only;
//!   it is not supported.
//! - **Never delete the lock file**, nor the directory (no "stale lock" clean-up, no age-based tmp
//!   cleaners). A deleted or replaced lock file lets a new node lock a new file; the old holder
//!   notices (bounded by inotify latency, at most about a second) and steps down, but for that
//!   short time two nodes may act.
//! - Use a private directory owned by the service user, e.g. `/run/<app>` (systemd
//!   `RuntimeDirectory=<app>` with `RuntimeDirectoryPreserve=yes`) or `/var/lib/<app>`
//!   (`StateDirectory=`). **Not `/tmp`**: with systemd `PrivateTmp=yes` every unit has its own
//!   `/tmp`, so nodes in different units would never see each other's lock. Anyone who can open
//!   the lock file can hold the lock.
//! - A child started with `std::process::Command` (fork + exec) does not inherit the lock
//!   (`O_CLOEXEC`). A raw `fork()` without exec **shares** the lock: it stays held until the child
//!   exits too. Take the lock after forking workers.
//!
//! # Examples
//!
//! ```
//! use tower_primary::{Elector, FileLock, NodeId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In production: FileLock::new("/run/myapp"), a directory only the service user can write.
//! let dir = tempfile::tempdir()?;
//!
//! let first = Elector::builder("report-scheduler")
//!     .backend(FileLock::new(dir.path()))
//!     .node(NodeId::new("a"))
//!     .spawn()?;
//! let term = first.handle().wait_primary().await.term();
//!
//! // Another node (here in the same process) waits in flock.
//! let second = Elector::builder("report-scheduler")
//!     .backend(FileLock::new(dir.path()))
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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::unistd::AccessFlags;
use notify::event::ModifyKind;
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::{oneshot, watch};

use super::{
    AcquireRequest, Backend, BoxFuture, Changes, Leadership, Lock, Renewals, Stored, validate_key,
};
use crate::error::{ConfigError, Error, validate_lock_name};
use crate::role::Holder;

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
/// use tower_primary::FileLock;
/// use tower_primary::backend::Backend;
///
/// let dir = tempfile::tempdir().unwrap();
/// let backend = FileLock::new(dir.path());
/// assert_eq!(backend.name(), "file");
/// assert!(backend.min_lease().is_none());
/// backend.lock("jobs").unwrap();
/// assert!(dir.path().join("jobs.lock").exists());
///
/// let err = FileLock::new(dir.path().join("missing")).lock("jobs").unwrap_err();
/// assert!(err.to_string().contains("does not exist"), "{err}");
/// ```
#[derive(Clone, Debug)]
pub struct FileLock {
    dir: PathBuf,
}

impl FileLock {
    /// Locks kept in `dir`. Nothing is checked until the elector is spawned
    /// ([`Backend::lock`]).
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileLock { dir: dir.into() }
    }

    /// The directory, as given.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn open(&self, name: &str) -> Result<DirLock, ConfigError> {
        validate_lock_name(name)?;
        let paths = Paths::checked(&self.dir, name)?;
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
                #[cfg(test)]
                disk: tests::SlowDisk::new(),
            }),
        })
    }
}

impl Backend for FileLock {
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

/// The files of one lock name.
#[derive(Debug)]
struct Paths {
    dir: PathBuf,
    lock: PathBuf,
    holder: PathBuf,
    state_dir: PathBuf,
    lock_file: OsString,
    holder_file: OsString,
    state_name: OsString,
}

impl Paths {
    /// Checks the directory and prepares the lock file and the state directory.
    fn checked(given: &Path, name: &str) -> Result<Paths, ConfigError> {
        let problem = |problem: String| ConfigError::LockDir {
            path: given.to_owned(),
            problem,
        };
        if given.as_os_str().is_empty() {
            return Err(problem("the path is empty".to_owned()));
        }
        // Collecting the components drops a trailing slash, which would make lstat follow a
        // symbolic link.
        let dir: PathBuf = std::path::absolute(given)
            .map_err(|e| problem(format!("cannot be made absolute: {e}")))?
            .components()
            .collect();
        let meta = match fs::symlink_metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(problem(
                    "does not exist; create it first, owned by the service user (for example with \
                     systemd RuntimeDirectory= or StateDirectory=)"
                        .to_owned(),
                ));
            }
            Err(e) => return Err(problem(format!("cannot be inspected: {e}"))),
        };
        if meta.file_type().is_symlink() {
            return Err(problem(
                "is a symbolic link; give the real directory (a symlinked lock directory is \
                 refused, so the lock cannot be redirected)"
                    .to_owned(),
            ));
        }
        if !meta.is_dir() {
            return Err(problem("is not a directory".to_owned()));
        }
        // access(2) is what the kernel would decide for this process's (real) user. Root passes
        // it on any permission bits; a read-only file system still fails, and so does creating
        // the lock file below.
        if let Err(errno) = nix::unistd::access(&dir, AccessFlags::W_OK | AccessFlags::X_OK) {
            return Err(problem(format!(
                "is not writable by this process ({errno}); the service user must own it"
            )));
        }
        if meta.mode() & 0o002 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                "the lock directory is writable by every user: anyone can delete or replace the \
                 lock file; use a private directory such as /run/<app> or /var/lib/<app>"
            );
        }
        let lock_file = OsString::from(format!("{name}.lock"));
        let holder_file = OsString::from(format!("{name}.holder"));
        let state_name = OsString::from(format!("{name}.state"));
        let paths = Paths {
            lock: dir.join(&lock_file),
            holder: dir.join(&holder_file),
            state_dir: dir.join(&state_name),
            dir,
            lock_file,
            holder_file,
            state_name,
        };
        let shown = paths.lock_file.to_string_lossy();
        let file = open_lock_file(&paths.lock).map_err(|e| {
            problem(match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                Errno::ELOOP => format!("{shown} is a symbolic link (refused)"),
                Errno::EISDIR => format!("{shown} is a directory"),
                Errno::EACCES | Errno::EPERM | Errno::EROFS => {
                    format!("is not writable: cannot create or open {shown} for writing: {e}")
                }
                _ => format!("cannot open {shown}: {e}"),
            })
        })?;
        let file_meta = file
            .metadata()
            .map_err(|e| problem(format!("cannot inspect {shown}: {e}")))?;
        if !file_meta.is_file() {
            return Err(problem(format!("{shown} is not a regular file")));
        }
        if file_meta.mode() & 0o077 != 0 {
            tracing::warn!(
                path = %paths.lock.display(),
                mode = format_args!("{:o}", file_meta.mode() & 0o777),
                "the lock file is accessible to other users, who can then hold the lock; chmod 600 it"
            );
        }
        ensure_state_dir(&paths.state_dir).map_err(|e| {
            problem(format!(
                "cannot create the state directory {}: {e}",
                paths.state_name.to_string_lossy()
            ))
        })?;
        Ok(paths)
    }
}

/// Opens (creating if needed) the lock file: read-write, 0600, no symlinks, close-on-exec.
fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// Creates the state directory (0700) if missing; refuses anything but a real directory.
fn ensure_state_dir(path: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(path)?;
            if meta.is_dir() {
                Ok(())
            } else {
                Err(io::Error::other("exists and is not a directory"))
            }
        }
        Err(e) => Err(e),
    }
}

/// Opens a record file for reading: no symbolic link (`ELOOP`), and without blocking (a FIFO
/// planted there would block `open(2)` until a writer came); `Ok(Err(problem))` for anything
/// but a regular file.
fn open_record(path: &Path) -> io::Result<Result<(File, u64), String>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Err(format!(
            "is not a regular file ({:?})",
            meta.file_type()
        )));
    }
    Ok(Ok((file, meta.len())))
}

/// Reads at most the first `n` bytes of a record file.
fn read_prefix(path: &Path, n: u64) -> io::Result<Result<Vec<u8>, String>> {
    let (file, _) = match open_record(path)? {
        Ok(f) => f,
        Err(problem) => return Ok(Err(problem)),
    };
    let mut buf = Vec::new();
    file.take(n).read_to_end(&mut buf)?;
    Ok(Ok(buf))
}

/// Writes `bytes` to `dir/name` atomically: a temporary file, rename. With `durable`, the file is
/// fsynced before the rename and the directory after it.
fn write_atomic(dir: &Path, name: &OsStr, bytes: &[u8], durable: bool) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&tmp)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, dir.join(name))?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What a record file held.
enum Record<T> {
    Missing,
    Corrupt(String),
    Found(T),
}

/// Reads a record that is absent, damaged, or present; an I/O error is an `Err`. A file larger
/// than `limit` bytes is damaged, and is not read: nothing larger is ever allocated.
fn read_record<T>(
    path: &Path,
    limit: u64,
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> io::Result<Record<T>> {
    let (file, len) = match open_record(path) {
        Ok(Ok(opened)) => opened,
        Ok(Err(problem)) => return Ok(Record::Corrupt(problem)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Record::Missing),
        Err(e) if e.raw_os_error() == Some(Errno::ELOOP as i32) => {
            return Ok(Record::Corrupt("is a symbolic link".to_owned()));
        }
        Err(e) => return Err(e),
    };
    let too_large = || {
        Record::Corrupt(format!(
            "is larger than {limit} bytes, the most this file may hold"
        ))
    };
    if len > limit {
        return Ok(too_large());
    }
    // The file may have grown since the `fstat`: read one byte more than allowed to tell.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Ok(too_large());
    }
    Ok(match parse(&bytes) {
        Ok(v) => Record::Found(v),
        Err(problem) => Record::Corrupt(problem),
    })
}

fn parse_holder(bytes: &[u8]) -> Result<Holder, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// The record as it reads back from disk (`since` keeps milliseconds), so the leadership's
/// record and what secondaries read are equal.
fn stored_form(record: Holder) -> Holder {
    serde_json::to_vec(&record)
        .ok()
        .and_then(|json| parse_holder(&json).ok())
        .unwrap_or(record)
}

/// Parses the term line at the start of the lock file.
fn parse_term(bytes: &[u8]) -> Result<u64, String> {
    let Some(end) = bytes.iter().position(|b| *b == b'\n') else {
        return Err(format!(
            "no line end in {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(32)])
        ));
    };
    let digits = &bytes[..end];
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "not a decimal number: {:?}",
            String::from_utf8_lossy(&digits[..digits.len().min(32)])
        ));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "out of range".to_owned())
}

/// Reads the term stored in the lock file: `Ok(None)` for a new, empty file.
fn read_term(file: &File) -> io::Result<Result<Option<u64>, String>> {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if n == 0 {
        return Ok(Ok(None));
    }
    Ok(parse_term(&buf[..n]).map(Some))
}

/// Writes the term at offset 0 of the lock file. The caller syncs it (see `sync_term`).
fn write_term(file: &File, term: u64) -> io::Result<()> {
    file.write_all_at(format!("{term:020}\n").as_bytes(), 0)?;
    if file.metadata()?.len() != TERM_LEN {
        file.set_len(TERM_LEN)?;
    }
    Ok(())
}

/// Syncs the term written by `write_term`, on the acquiring thread, after the grant was handed
/// over: every process reads the term through the page cache, so the successor of a holder that
/// dies before the sync still sees it; the sync only guards against losing it in an OS crash,
/// and even then the wall-clock part of the next term keeps terms rising. Keeping the sync off
/// the path to becoming primary saves milliseconds of failover on a disk.
fn sync_term(file: &File, lock: &str) {
    if let Err(e) = file.sync_data() {
        tracing::warn!(lock, error = %e, "cannot sync the term to disk");
    }
}

/// A state value on disk: header line, then the value.
fn encode_state(value: &[u8], term: u64) -> Vec<u8> {
    let mut bytes = format!("{STATE_MAGIC} 1 {term} {}\n", value.len()).into_bytes();
    bytes.extend_from_slice(value);
    bytes
}

/// Parses the header line of a state file: (term, value length, header length).
fn parse_state_header(bytes: &[u8]) -> Result<(u64, u64, usize), String> {
    let end = bytes
        .iter()
        .take(MAX_STATE_HEADER as usize)
        .position(|b| *b == b'\n')
        .ok_or("no header line")?;
    let line = std::str::from_utf8(&bytes[..end]).map_err(|_| "header is not UTF-8")?;
    let mut parts = line.split(' ');
    let (Some(STATE_MAGIC), Some("1"), Some(term), Some(len), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(format!("unknown header {line:?}"));
    };
    let term = term
        .parse()
        .map_err(|_| format!("bad term in header {line:?}"))?;
    let len: u64 = len
        .parse()
        .map_err(|_| format!("bad length in header {line:?}"))?;
    if len > MAX_STATE_VALUE as u64 {
        return Err(format!(
            "the header says {len} bytes, larger than the maximum of {MAX_STATE_VALUE}"
        ));
    }
    Ok((term, len, end + 1))
}

fn parse_state(bytes: &[u8]) -> Result<Stored, String> {
    let (term, len, start) = parse_state_header(bytes)?;
    let value = &bytes[start..];
    if value.len() as u64 != len {
        return Err(format!(
            "the header says {len} bytes, the file holds {}",
            value.len()
        ));
    }
    Ok(Stored::new(value.to_vec(), term))
}

/// The (device, inode) pair that identifies a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
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

/// An acquire waiting for the waiter thread of its lock object.
struct Pending {
    req: AcquireRequest,
    tx: oneshot::Sender<Result<HeldLock, Error>>,
    /// The acquirer's tracing context, for what the waiter thread logs for it.
    dispatch: tracing::Dispatch,
    span: tracing::Span,
}

/// The waiter thread of a lock object and the acquires it serves, oldest first.
#[derive(Default)]
struct Waiting {
    /// A waiter thread runs; it ends when no acquire waits any more.
    running: bool,
    queue: VecDeque<Pending>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section in this file leaves its data consistent before anything can panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
    /// A disk that stalls on demand, in tests.
    #[cfg(test)]
    disk: tests::SlowDisk,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLock")
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

    /// Queues an acquire for the waiter thread, starting it if none runs. One thread per lock
    /// object waits in `flock` for all its acquires, so acquires that are given up while the
    /// lock is held elsewhere do not leave a blocked thread each: the next acquire takes over
    /// the waiting thread.
    fn enqueue(self: &Arc<Self>, pending: Pending) -> Result<(), Error> {
        let mut waiting = lock(&self.waiting);
        waiting.queue.retain(|p| !p.tx.is_closed());
        waiting.queue.push_back(pending);
        if waiting.running {
            return Ok(());
        }
        let inner = self.clone();
        // A dedicated thread, not `spawn_blocking`: a task blocked in flock would keep a dropped
        // tokio runtime from shutting down.
        match std::thread::Builder::new()
            .name("tower-primary-flock".to_owned())
            .spawn(move || inner.serve())
        {
            Ok(_) => {
                waiting.running = true;
                Ok(())
            }
            Err(e) => {
                waiting.queue.pop_back();
                Err(self.io("cannot start the lock waiting thread".to_owned(), e))
            }
        }
    }

    /// Whether an acquire still waits.
    fn anyone_waiting(&self) -> bool {
        lock(&self.waiting).queue.iter().any(|p| !p.tx.is_closed())
    }

    /// The oldest acquire that still waits, taken off the queue.
    fn next_waiting(&self) -> Option<Pending> {
        let mut waiting = lock(&self.waiting);
        while let Some(p) = waiting.queue.pop_front() {
            if !p.tx.is_closed() {
                return Some(p);
            }
        }
        None
    }

    /// The waiter thread: serves the queued acquires one after the other, and ends when none is
    /// left.
    fn serve(self: Arc<Self>) {
        loop {
            let context = {
                let mut waiting = lock(&self.waiting);
                waiting.queue.retain(|p| !p.tx.is_closed());
                match waiting.queue.front() {
                    Some(p) => (p.dispatch.clone(), p.span.clone()),
                    None => {
                        waiting.running = false;
                        return;
                    }
                }
            };
            let (dispatch, span) = context;
            tracing::dispatcher::with_default(&dispatch, || span.in_scope(|| self.serve_one()));
        }
    }

    /// Waits for the lock, and hands it with a new term to the oldest acquire still waiting. A
    /// grant that nobody waits for any more is unlocked at once.
    fn serve_one(self: &Arc<Self>) {
        match self.wait_for_lock() {
            Ok(Some((file, id))) => {
                let Some(pending) = self.next_waiting() else {
                    tracing::debug!(lock = %self.name, "the acquire was given up while waiting; unlocking the grant");
                    return;
                };
                let granted = self.take_term(file, id, &pending.req);
                let to_sync = granted
                    .as_ref()
                    .ok()
                    .and_then(|h| h.file.as_deref()?.try_clone().ok());
                // If the acquirer is gone, the grant comes back and is dropped here, which
                // deletes its holder record and unlocks.
                let _ = pending.tx.send(granted);
                if let Some(file) = to_sync {
                    sync_term(&file, &self.name);
                }
            }
            Ok(None) => {}
            Err(e) => {
                if let Some(pending) = self.next_waiting() {
                    let _ = pending.tx.send(Err(e));
                }
            }
        }
    }

    /// Locks the file the path names, waiting (blocking) as long as needed.
    /// `None` when no acquire waits any more.
    fn wait_for_lock(&self) -> Result<Option<(File, FileId)>, Error> {
        let path = &self.paths.lock;
        for attempt in 1..=MAX_GRANT_ATTEMPTS {
            let file = open_lock_file(path)
                .map_err(|e| self.io(format!("cannot open the lock file {}", path.display()), e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    tracing::debug!(lock = %self.name, "the lock is held; waiting for it");
                    self.blocked.send_modify(bump);
                    loop {
                        match file.lock() {
                            Ok(()) => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                return Err(self.io(
                                    format!("cannot lock the lock file {}", path.display()),
                                    e,
                                ));
                            }
                        }
                    }
                }
                Err(TryLockError::Error(e)) => {
                    return Err(self.io(format!("cannot lock the lock file {}", path.display()), e));
                }
            }
            if !self.anyone_waiting() {
                tracing::debug!(lock = %self.name, "the acquire was given up while waiting; unlocking the grant");
                return Ok(None);
            }
            let held = FileId::of(&file.metadata().map_err(|e| {
                self.io(
                    format!("cannot inspect the lock file {}", path.display()),
                    e,
                )
            })?);
            let now = match fs::symlink_metadata(path) {
                Ok(m) if FileId::of(&m) == held => return Ok(Some((file, held))),
                Ok(m) => format!("the path now names inode {}", m.ino()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => "the path was deleted".to_owned(),
                Err(e) => {
                    return Err(
                        self.io(format!("cannot check the lock file {}", path.display()), e)
                    );
                }
            };
            tracing::warn!(
                lock = %self.name,
                path = %path.display(),
                locked_inode = held.ino,
                attempt,
                "granted a lock on a file that was deleted or replaced ({now}); waiting again on \
                 the file the path names"
            );
            drop(file);
            self.stale_grants.send_modify(bump);
        }
        Err(Error::backend_msg(
            NAME,
            format!(
                "the lock file {} keeps being replaced; giving up for now",
                path.display()
            ),
        ))
    }

    /// While holding: computes, stores and syncs the term, then writes the holder record.
    fn take_term(
        self: &Arc<Self>,
        file: File,
        id: FileId,
        req: &AcquireRequest,
    ) -> Result<HeldLock, Error> {
        let term = self.next_term(&file)?;
        write_term(&file, term).map_err(|e| {
            self.io(
                format!("cannot write the term to {}", self.paths.lock.display()),
                e,
            )
        })?;
        // From here on, dropping `held` deletes our holder record and unlocks.
        let file = Arc::new(file);
        let held = HeldLock {
            inner: self.clone(),
            file: Some(file.clone()),
            id,
            term,
            record: stored_form(req.holder(term)),
        };
        self.write_holder(&held.record)?;
        *lock(&self.live) = Some(Live { term, id, file });
        tracing::debug!(lock = %self.name, term, "acquired the file lock");
        Ok(held)
    }

    /// `max(highest readable stored term + 1, wall-clock µs)`.
    fn next_term(&self, file: &File) -> Result<u64, Error> {
        let mut stored = 0u64;
        match read_term(file) {
            Ok(Ok(t)) => stored = stored.max(t.unwrap_or(0)),
            Ok(Err(problem)) => tracing::warn!(
                lock = %self.name,
                path = %self.paths.lock.display(),
                problem,
                "corrupt term in the lock file; using the holder record, the state values and \
                 the wall clock instead"
            ),
            Err(e) => tracing::warn!(
                lock = %self.name,
                path = %self.paths.lock.display(),
                error = %e,
                "cannot read the term from the lock file; using the holder record, the state \
                 values and the wall clock instead"
            ),
        }
        match self.read_holder() {
            Ok(Record::Found(h)) => stored = stored.max(h.term),
            Ok(Record::Missing) => {}
            Ok(Record::Corrupt(problem)) => tracing::warn!(
                lock = %self.name,
                path = %self.paths.holder.display(),
                problem,
                "corrupt holder record; its term is not used"
            ),
            Err(e) => tracing::warn!(
                lock = %self.name,
                path = %self.paths.holder.display(),
                error = %e,
                "cannot read the holder record; its term is not used"
            ),
        }
        stored = stored.max(self.max_state_term());
        let next = stored.checked_add(1).ok_or_else(|| Error::Corrupt {
            backend: NAME,
            what: format!("term of lock {:?}", self.name),
            problem: "the stored term is u64::MAX and cannot be increased".to_owned(),
        })?;
        Ok(next.max(wall_micros()))
    }

    /// The highest term among the state values (only their headers are read).
    fn max_state_term(&self) -> u64 {
        let Ok(entries) = fs::read_dir(&self.paths.state_dir) else {
            return 0;
        };
        let mut max = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(key) = name.to_str() else { continue };
            if validate_key(key).is_err() {
                continue;
            }
            let header = read_prefix(&entry.path(), MAX_STATE_HEADER)
                .map(|b| b.and_then(|b| parse_state_header(&b)));
            match header {
                Ok(Ok((term, _, _))) => max = max.max(term),
                Ok(Err(problem)) => tracing::warn!(
                    lock = %self.name,
                    key,
                    problem,
                    "corrupt state value; its term is not used"
                ),
                Err(e) => {
                    tracing::warn!(lock = %self.name, key, error = %e, "cannot read a state value");
                }
            }
        }
        max
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
        if holder.host == self.host && !pid_alive(holder.pid) {
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

    fn load(&self, key: &str) -> Result<Option<Stored>, Error> {
        self.disk("load");
        match self.read_state(key) {
            Ok(Record::Found(s)) => Ok(Some(s)),
            Ok(Record::Missing) => Ok(None),
            Ok(Record::Corrupt(problem)) => {
                tracing::warn!(
                    lock = %self.name,
                    key,
                    problem,
                    "corrupt state value; the next store replaces it"
                );
                Err(Error::Corrupt {
                    backend: NAME,
                    what: format!(
                        "state value {key:?} of lock {:?} ({})",
                        self.name,
                        self.state_path(key).display()
                    ),
                    problem,
                })
            }
            Err(e) => Err(self.io(
                format!(
                    "cannot read the state value {}",
                    self.state_path(key).display()
                ),
                e,
            )),
        }
    }

    fn store(self: &Arc<Self>, key: &str, value: &[u8], term: u64) -> Result<(), Error> {
        if value.len() > MAX_STATE_VALUE {
            return Err(Error::ValueTooLarge {
                backend: NAME,
                key: key.to_owned(),
                size: value.len() as u64,
                max: MAX_STATE_VALUE as u64,
            });
        }
        // The guard keeps the lock held until the write is done, so a write that passed the
        // check finishes before any other term can hold the lock.
        let (guard, live_term) = match self.write_guard(term) {
            Ok(guard) => (Some(guard), None),
            Err(live_term) => (None, live_term),
        };
        let holds = guard.as_ref().is_some_and(|g| {
            let holds = self.path_names(g.id);
            if !holds {
                tracing::warn!(lock = %self.name, term, "the lock file was deleted or replaced; refusing the state write");
            }
            holds
        });
        let stored = match self.read_state(key) {
            Ok(Record::Found(s)) => Some(s.term),
            Ok(Record::Missing) => None,
            Ok(Record::Corrupt(problem)) => {
                tracing::warn!(lock = %self.name, key, problem, "corrupt state value; it is overwritten");
                None
            }
            Err(e) => {
                return Err(self.io(
                    format!(
                        "cannot read the state value {}",
                        self.state_path(key).display()
                    ),
                    e,
                ));
            }
        };
        let newer = stored.filter(|t| *t > term);
        if !holds || newer.is_some() {
            return Err(Error::StaleTerm {
                lock: self.name.clone(),
                term,
                current: newer.or(live_term),
            });
        }
        self.disk("store");
        ensure_state_dir(&self.paths.state_dir).map_err(|e| {
            self.io(
                format!(
                    "cannot create the state directory {}",
                    self.paths.state_dir.display()
                ),
                e,
            )
        })?;
        let written = write_atomic(
            &self.paths.state_dir,
            OsStr::new(key),
            &encode_state(value, term),
            true,
        )
        .map_err(|e| {
            self.io(
                format!(
                    "cannot write the state value {}",
                    self.state_path(key).display()
                ),
                e,
            )
        });
        drop(guard);
        written
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
            // Queued at the first poll, so the wait starts at once.
            let (tx, rx) = oneshot::channel();
            inner.enqueue(Pending {
                req,
                tx,
                dispatch: tracing::dispatcher::get_default(Clone::clone),
                span: tracing::Span::current(),
            })?;
            // Meanwhile, the watch that `lost` follows. A change of the path before it is
            // subscribed is still seen: `lost` checks the path after subscribing.
            let watch = match self.dir_watch().await {
                Ok(w) => Some(w),
                Err(_) => {
                    tracing::warn!(lock = %inner.name, "loss of the lock is detected by the 1 s re-check only");
                    None
                }
            };
            let entry = watch.as_ref().map(|w| w.signals.entry.subscribe());
            let held = rx.await.map_err(|_| {
                Error::backend_msg(NAME, "the lock waiting thread ended without an answer")
            })??;
            Ok(Box::new(FileLeadership {
                held,
                watch,
                entry,
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
}

/// An inotify watch on the lock directory and the state directory, shared by the subscriptions
/// of one `Lock` object.
struct DirWatch {
    signals: Arc<Signals>,
    _watcher: notify::RecommendedWatcher,
}

impl DirWatch {
    fn start(paths: &Paths) -> Result<Arc<DirWatch>, Error> {
        ensure_state_dir(&paths.state_dir).map_err(|e| {
            Error::backend(
                NAME,
                format!(
                    "cannot create the state directory {}",
                    paths.state_dir.display()
                ),
                e,
            )
        })?;
        let signals = Arc::new(Signals {
            dir: paths.dir.clone(),
            state_dir: paths.state_dir.clone(),
            lock_file: paths.lock_file.clone(),
            holder_file: paths.holder_file.clone(),
            state_name: paths.state_name.clone(),
            entry: watch::channel(0).0,
            keys: Mutex::new(HashMap::new()),
            broken: AtomicBool::new(false),
        });
        let handler = signals.clone();
        let mut watcher = notify::recommended_watcher(move |res| handler.on_event(res))
            .map_err(|e| Error::backend(NAME, "cannot start watching the lock directory", e))?;
        for dir in [&paths.dir, &paths.state_dir] {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| Error::backend(NAME, format!("cannot watch {}", dir.display()), e))?;
        }
        Ok(Arc::new(DirWatch {
            signals,
            _watcher: watcher,
        }))
    }
}

/// Where the watch thread reports changes.
struct Signals {
    dir: PathBuf,
    state_dir: PathBuf,
    lock_file: OsString,
    holder_file: OsString,
    state_name: OsString,
    /// Bumped when the lock file or the holder record changes.
    entry: watch::Sender<u64>,
    /// Bumped when a state value changes, per key.
    keys: Mutex<HashMap<OsString, watch::Sender<u64>>>,
    /// The watch stopped (the directory went away, or inotify failed): subscribers must renew.
    broken: AtomicBool,
}

impl Signals {
    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    fn bump_all(&self) {
        self.entry.send_modify(bump);
        for tx in lock(&self.keys).values() {
            tx.send_modify(bump);
        }
    }

    fn break_all(&self) {
        self.broken.store(true, Ordering::Release);
        self.bump_all();
    }

    fn subscribe_key(&self, key: &str) -> watch::Receiver<u64> {
        let mut keys = lock(&self.keys);
        keys.retain(|_, tx| tx.receiver_count() > 0);
        keys.entry(OsString::from(key))
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Runs on notify's thread.
    fn on_event(&self, res: notify::Result<notify::Event>) {
        let event = match res {
            Ok(e) => e,
            Err(err) => {
                tracing::warn!(backend = NAME, dir = %self.dir.display(), error = %err, "the lock directory watch failed");
                self.break_all();
                return;
            }
        };
        if event.need_rescan() {
            self.bump_all();
            return;
        }
        // Opens and closes (every read, every probe) change nothing.
        if event.kind.is_access() {
            return;
        }
        let gone = matches!(
            event.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
        );
        for path in &event.paths {
            if *path == self.dir || *path == self.state_dir {
                if gone {
                    self.break_all();
                    return;
                }
                continue;
            }
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                continue;
            };
            if parent == self.dir {
                if name == self.lock_file || name == self.holder_file {
                    self.entry.send_modify(bump);
                } else if name == self.state_name && gone {
                    self.break_all();
                    return;
                }
            } else if parent == self.state_dir
                && let Some(tx) = lock(&self.keys).get(name)
            {
                tx.send_modify(bump);
            }
        }
    }
}

/// A subscription to the holder record or a state value.
struct DirChanges {
    watch: Arc<DirWatch>,
    rx: watch::Receiver<u64>,
}

impl DirChanges {
    fn broken(&self) -> Error {
        Error::backend_msg(
            NAME,
            format!(
                "the watch on {} ended (the directory was removed or inotify failed); subscribe again",
                self.watch.signals.dir.display()
            ),
        )
    }
}

impl Changes for DirChanges {
    fn changed(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if self.watch.signals.is_broken() {
                return Err(self.broken());
            }
            if self.rx.changed().await.is_err() {
                // The sender lives in `Signals`, which this subscription keeps alive.
                std::future::pending::<()>().await;
            }
            if self.watch.signals.is_broken() {
                return Err(self.broken());
            }
            Ok(())
        })
    }
}

/// A held flock with its term. Dropping it releases: the holder record (if ours) is deleted,
/// then the file is unlocked and closed (on tokio's blocking pool when dropped inside a runtime).
struct HeldLock {
    inner: Arc<Inner>,
    file: Option<Arc<File>>,
    id: FileId,
    term: u64,
    record: Holder,
}

/// Whether the lock still holds, and whether the holder record needs rewriting.
enum Check {
    Held { repair: bool },
    Lost(String),
}

/// Checks, for the holder of `term` on the file `id`, that the path still names the locked
/// file and that the holder record names this holder. Blocking file I/O.
fn check(inner: &Inner, id: FileId, term: u64, holder: &str) -> Check {
    let path = &inner.paths.lock;
    match fs::symlink_metadata(path) {
        Ok(m) if FileId::of(&m) == id => {}
        Ok(m) => {
            return Check::Lost(format!(
                "the lock file {} was replaced: the path names inode {} on device {}, not the \
                 locked inode {}",
                path.display(),
                m.ino(),
                m.dev(),
                id.ino
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Check::Lost(format!(
                "the lock file {} was deleted (the locked inode {} is no longer linked there)",
                path.display(),
                id.ino
            ));
        }
        Err(e) => {
            return Check::Lost(format!(
                "cannot check the lock file {}: {e}",
                path.display()
            ));
        }
    }
    let problem = match inner.read_holder() {
        Ok(Record::Found(h)) if h.id == holder && h.term == term => {
            return Check::Held { repair: false };
        }
        Ok(Record::Found(h)) if h.term > term => {
            return Check::Lost(format!(
                "a holder record with a newer term appeared (term {}, holder {:?})",
                h.term, h.id
            ));
        }
        Ok(Record::Found(h)) => format!("it names {:?} with term {}", h.id, h.term),
        Ok(Record::Missing) => "it is missing".to_owned(),
        Ok(Record::Corrupt(problem)) => format!("it is corrupt: {problem}"),
        Err(e) => {
            tracing::warn!(lock = %inner.name, error = %e, "cannot read the holder record");
            return Check::Held { repair: false };
        }
    };
    tracing::warn!(
        lock = %inner.name,
        path = %inner.paths.holder.display(),
        term,
        "the holder record does not name this primary ({problem}); rewriting it"
    );
    Check::Held { repair: true }
}

impl HeldLock {
    /// Ends the term (no state write starts under it any more) and takes the lock out of
    /// `self`, still held; `None` if that was done before.
    fn end(&mut self) -> Option<Releasing> {
        let file = self.file.take()?;
        self.inner.end_term(self.term);
        Some(Releasing {
            inner: self.inner.clone(),
            file: Some(file),
            id: self.id,
            term: self.term,
            holder: self.record.id.clone(),
        })
    }

    /// Releases: waits (without blocking the runtime) for the writes still in flight under the
    /// term, then deletes the record and unlocks on the blocking pool.
    async fn release(&mut self) -> Result<(), Error> {
        let Some(releasing) = self.end() else {
            return Ok(());
        };
        releasing.inner.writes_done().await;
        blocking("releases the lock", move || releasing.finish()).await
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let Some(releasing) = self.end() else {
            return;
        };
        // Inside a runtime: off its threads. If the task never runs (the runtime is shutting
        // down), dropping `releasing` finishes the release where it is dropped.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    releasing.inner.writes_done().await;
                    let _ = blocking("releases the lock", move || releasing.finish()).await;
                });
            }
            Err(_) => drop(releasing),
        }
    }
}

/// A lock whose term has ended, still held until [`finish`](Self::finish) (or drop) deletes the
/// holder record, if it is ours, and unlocks. Blocking file I/O.
struct Releasing {
    inner: Arc<Inner>,
    file: Option<Arc<File>>,
    id: FileId,
    term: u64,
    holder: String,
}

impl Releasing {
    fn finish(mut self) -> Result<(), Error> {
        self.finish_now()
    }

    fn finish_now(&mut self) -> Result<(), Error> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let inner = &self.inner;
        inner.disk("release");
        // While still holding: delete the record if it is ours (or damaged, and the lock file
        // is still ours), so nobody reads it as current after the unlock.
        let ours = match inner.read_holder() {
            Ok(Record::Found(h)) => h.id == self.holder && h.term == self.term,
            Ok(Record::Corrupt(_)) => inner.path_names(self.id),
            Ok(Record::Missing) | Err(_) => false,
        };
        let removed = if ours {
            match fs::remove_file(&inner.paths.holder) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            Ok(())
        };
        // A write still in flight (only after a drop, which does not wait) holds another
        // reference: the lock is then freed when it is done.
        let unlocked = match Arc::try_unwrap(file) {
            Ok(file) => file.unlock(),
            Err(_) => Ok(()),
        };
        tracing::debug!(lock = %inner.name, term = self.term, "released the file lock");
        removed.map_err(|e| {
            inner.io(
                format!(
                    "cannot delete the holder record {}",
                    inner.paths.holder.display()
                ),
                e,
            )
        })?;
        unlocked.map_err(|e| inner.io(format!("cannot unlock {}", inner.paths.lock.display()), e))
    }
}

impl Drop for Releasing {
    fn drop(&mut self) {
        // Errors are logged by `finish_now`; the file is closed (and so unlocked) in any case.
        let _ = self.finish_now();
    }
}

/// One term of a file lock.
struct FileLeadership {
    held: HeldLock,
    watch: Option<Arc<DirWatch>>,
    entry: Option<watch::Receiver<u64>>,
    lost: Option<String>,
}

impl fmt::Debug for FileLeadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLeadership")
            .field("lock", &self.held.inner.name)
            .field("term", &self.held.term)
            .field("inode", &self.held.id.ino)
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl FileLeadership {
    /// Subscribes again if the directory watch broke (or never started).
    async fn renew_watch(&mut self) {
        if self.watch.as_ref().is_some_and(|w| !w.signals.is_broken()) {
            return;
        }
        let inner = self.held.inner.clone();
        if let Ok(w) = blocking("watches the lock directory", move || inner.dir_watch()).await {
            self.entry = Some(w.signals.entry.subscribe());
            self.watch = Some(w);
        }
    }

    /// Checks the lock and repairs the holder record, off the runtime.
    async fn check(&self) -> Check {
        let inner = self.held.inner.clone();
        let (id, term, record) = (self.held.id, self.held.term, self.held.record.clone());
        let checked = blocking("checks the lock file", move || {
            let checked = check(&inner, id, term, &record.id);
            if let Check::Held { repair: true } = checked
                && let Err(e) = inner.rewrite_holder(term, id, &record)
            {
                tracing::warn!(lock = %inner.name, error = %e, "the holder record rewrite failed");
            }
            Ok(checked)
        })
        .await;
        checked.unwrap_or_else(|e| {
            // The check could not run (the runtime is shutting down): the next round retries.
            tracing::warn!(lock = %self.held.inner.name, error = %e, "cannot check the lock file");
            Check::Held { repair: false }
        })
    }
}

impl Leadership for FileLeadership {
    fn term(&self) -> u64 {
        self.held.term
    }

    fn holder(&self) -> &Holder {
        &self.held.record
    }

    fn renewals(&self) -> Option<Renewals> {
        None
    }

    fn lost(&mut self) -> BoxFuture<'_, Error> {
        Box::pin(async move {
            loop {
                if let Some(reason) = &self.lost {
                    return Error::Lost {
                        lock: self.held.inner.name.clone(),
                        reason: reason.clone(),
                    };
                }
                self.renew_watch().await;
                if let Some(rx) = &mut self.entry {
                    rx.borrow_and_update();
                }
                if let Check::Lost(reason) = self.check().await {
                    self.held.inner.end_term(self.held.term);
                    self.lost = Some(reason);
                    continue;
                }
                let entry = &mut self.entry;
                let changed = async {
                    if let Some(rx) = entry
                        && rx.changed().await.is_ok()
                    {
                        return;
                    }
                    // No watch (or its sender is gone): the safety net alone.
                    std::future::pending::<()>().await;
                };
                tokio::select! {
                    () = changed => {}
                    () = tokio::time::sleep(SAFETY_NET) => {}
                }
            }
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move { self.held.release().await })
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Instant;

    use futures_util::FutureExt as _;

    use super::*;
    use crate::role::NodeId;

    const PATIENCE: Duration = Duration::from_secs(10);

    fn req(id: &str) -> AcquireRequest {
        AcquireRequest::new(NodeId::new(id))
    }

    fn open(dir: &Path, name: &str) -> DirLock {
        FileLock::new(dir).open(name).unwrap()
    }

    async fn within<F: Future>(what: &str, fut: F) -> F::Output {
        match tokio::time::timeout(PATIENCE, fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }

    /// Waits until a test counter reaches `n`.
    async fn counted(tx: &watch::Sender<u64>, n: u64, what: &str) {
        let mut rx = tx.subscribe();
        within(what, rx.wait_for(|v| *v >= n)).await.unwrap();
    }

    fn lock_dir_problem(result: Result<Arc<dyn Lock>, ConfigError>) -> String {
        match result {
            Err(ConfigError::LockDir { problem, .. }) => problem,
            other => panic!("expected a lock directory error, got {other:?}"),
        }
    }

    /// Captures warnings, also from the acquiring thread (it inherits the dispatcher).
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn capture(&self) -> tracing::subscriber::DefaultGuard {
            let logs = self.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || logs.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::WARN)
                .finish();
            tracing::subscriber::set_default(subscriber)
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&lock(&self.0)).into_owned()
        }
    }

    /// A disk that stalls on demand: the named operations wait in [`pass`](Self::pass) until
    /// [`free`](Self::free) (or, so that a runtime blocked by one cannot hang a test, until
    /// `PATIENCE` is over).
    pub(super) struct SlowDisk {
        /// The stalled operations, and how many calls wait in a stall now.
        stalled: Mutex<(Vec<&'static str>, usize)>,
        freed: std::sync::Condvar,
        /// Operations that reached a stall.
        stalls: watch::Sender<u64>,
    }

    impl SlowDisk {
        pub(super) fn new() -> Self {
            SlowDisk {
                stalled: Mutex::new((Vec::new(), 0)),
                freed: std::sync::Condvar::new(),
                stalls: watch::channel(0).0,
            }
        }

        pub(super) fn pass(&self, op: &'static str) {
            let mut stalled = lock(&self.stalled);
            if !stalled.0.contains(&op) {
                return;
            }
            stalled.1 += 1;
            self.stalls.send_modify(bump);
            let until = Instant::now() + PATIENCE;
            while stalled.0.contains(&op) {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                stalled = self
                    .freed
                    .wait_timeout(stalled, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            stalled.1 -= 1;
        }

        fn stall(&self, op: &'static str) {
            lock(&self.stalled).0.push(op);
        }

        /// How many calls wait in a stall now.
        fn waiting(&self) -> usize {
            lock(&self.stalled).1
        }

        fn free(&self) {
            lock(&self.stalled).0.clear();
            self.freed.notify_all();
        }
    }

    /// Runs `fut` (an operation of `lock`) with `op` stalled on the disk, and checks that the
    /// runtime stays free meanwhile: a timer set once the operation waits on the disk fires
    /// while it still waits. On a current-thread runtime, an operation that blocks the thread
    /// leaves the stall (after its `PATIENCE`) before the timer can fire.
    async fn stalled<T: Send + 'static>(
        lock: &DirLock,
        op: &'static str,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> T {
        let disk = &lock.inner.disk;
        let before = *disk.stalls.borrow();
        disk.stall(op);
        let task = tokio::spawn(fut);
        counted(&disk.stalls, before + 1, "the operation to reach the disk").await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let blocked = disk.waiting() == 0;
        disk.free();
        assert!(
            !blocked,
            "{op}: the timer fired only after the stalled operation ended: it blocked the runtime"
        );
        within(op, task).await.unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stalled_file_operations_leave_the_runtime_free() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Arc::new(open(tmp.path(), "jobs"));

        let lease = a.acquire(req("a")).await.unwrap();
        let term = lease.term();
        let l = a.clone();
        stalled(&a, "store", async move { l.store("k", b"v", term).await })
            .await
            .unwrap();
        let l = a.clone();
        let loaded = stalled(&a, "load", async move { l.load("k").await }).await;
        assert_eq!(loaded.unwrap(), Some(Stored::new(b"v".to_vec(), term)));
        let l = a.clone();
        let holder = stalled(&a, "holder", async move { l.holder().await }).await;
        assert_eq!(holder.unwrap().as_ref(), Some(lease.holder()));
        stalled(&a, "release", lease.release()).await.unwrap();
        assert_eq!(a.holder().await.unwrap(), None);
    }

    /// A state write stalled on the disk keeps the lock until it is done, but a release that
    /// meets it waits without blocking the runtime; the next holder gets a higher term and sees
    /// the write.
    #[tokio::test(flavor = "current_thread")]
    async fn release_waits_for_a_stalled_store_without_blocking_the_runtime() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, c) = (Arc::new(open(tmp.path(), "jobs")), open(tmp.path(), "jobs"));
        let lease = a.acquire(req("a")).await.unwrap();
        let term = lease.term();
        let disk = &a.inner.disk;
        disk.stall("store");
        let l = a.clone();
        let store = tokio::spawn(async move { l.store("k", b"v", term).await });
        counted(&disk.stalls, 1, "the store to reach the disk").await;

        let release = tokio::spawn(lease.release());
        let mut next = c.acquire(req("c"));
        assert!((&mut next).now_or_never().is_none());
        counted(&c.inner.blocked, 1, "c to wait in flock").await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let blocked = disk.waiting() == 0;
        disk.free();
        assert!(
            !blocked,
            "the release blocked the runtime until the stalled store ended"
        );
        within("the store", store).await.unwrap().unwrap();
        within("the release", release).await.unwrap().unwrap();
        let next = within("c's grant", next).await.unwrap();
        assert!(next.term() > term);
        assert_eq!(
            c.load("k").await.unwrap(),
            Some(Stored::new(b"v".to_vec(), term))
        );
        next.release().await.unwrap();
    }

    /// State files that are damaged, too large or not files at all are reported as corrupt;
    /// nothing larger than the maximum is read into memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_and_garbled_state_values_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let a = open(tmp.path(), "jobs");
        let dir = &a.inner.paths.state_dir;
        let corrupt = |r: Result<Option<Stored>, Error>| match r {
            Err(Error::Corrupt { what, problem, .. }) => format!("{what}: {problem}"),
            Err(other) => panic!("expected a corrupt-record error, got {other:?}"),
            Ok(v) => panic!(
                "expected a corrupt-record error, got a value of {:?} bytes",
                v.map(|s| s.value.len())
            ),
        };

        // A header that claims, and a (sparse) file that holds, far more than the maximum.
        let big = 4 * MAX_STATE_VALUE as u64;
        let mut header = format!("{STATE_MAGIC} 1 7 {big}\n").into_bytes();
        let f = File::create(dir.join("big")).unwrap();
        f.write_all_at(&header, 0).unwrap();
        f.set_len(header.len() as u64 + big).unwrap();
        let problem = corrupt(a.load("big").await);
        assert!(
            problem.contains("big") && problem.contains("larger"),
            "{problem}"
        );

        // An honest header, but more bytes than it says.
        header = format!("{STATE_MAGIC} 1 7 3\n").into_bytes();
        f.write_all_at(&header, 0).unwrap();
        let problem = corrupt(a.load("big").await);
        assert!(
            problem.contains("larger") || problem.contains("holds"),
            "{problem}"
        );

        for (key, bytes) in [
            (
                "garbled",
                &b"\x00\xff\xfe garbage without a header line"[..],
            ),
            ("no-magic", &b"something-else 1 7 1\nx"[..]),
            ("short", &b"tower-primary-state 1 7 99\nshort"[..]),
            ("bad-term", &b"tower-primary-state 1 -7 1\nx"[..]),
            ("empty", &b""[..]),
        ] {
            fs::write(dir.join(key), bytes).unwrap();
            let problem = corrupt(a.load(key).await);
            assert!(problem.contains(key), "{problem}");
        }

        // A FIFO would block a reader for ever; it is refused at once.
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let unblock = std::thread::spawn({
            let fifo = fifo.clone();
            move || {
                // Only a safety net for a reader stuck in open(2), so the test ends.
                std::thread::sleep(PATIENCE);
                let _ = OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                    .open(&fifo);
            }
        });
        let started = Instant::now();
        let problem = corrupt(a.load("fifo").await);
        assert!(started.elapsed() < PATIENCE, "the FIFO blocked the load");
        assert!(problem.contains("regular file"), "{problem}");
        drop(unblock);

        // A store of more than the maximum is refused with a typed error, and stores nothing.
        let lease = a.acquire(req("a")).await.unwrap();
        let value = vec![b'x'; MAX_STATE_VALUE + 1];
        match a.store("k", &value, lease.term()).await {
            Err(Error::ValueTooLarge { key, size, max, .. }) => {
                assert_eq!(
                    (key.as_str(), size, max),
                    ("k", value.len() as u64, MAX_STATE_VALUE as u64)
                );
            }
            other => panic!("expected ValueTooLarge, got {:?}", other.err()),
        }
        assert_eq!(a.load("k").await.unwrap(), None);
        let value = vec![b'y'; MAX_STATE_VALUE];
        a.store("k", &value, lease.term()).await.unwrap();
        assert_eq!(
            a.load("k").await.unwrap().unwrap().value.len(),
            MAX_STATE_VALUE
        );
        // A corrupt value is overwritten by the holder's next store.
        a.store("garbled", b"fixed", lease.term()).await.unwrap();
        assert_eq!(
            a.load("garbled").await.unwrap(),
            Some(Stored::new(b"fixed".to_vec(), lease.term()))
        );
        lease.release().await.unwrap();
    }

    /// A holder record that is damaged, too large or not a file is an error, not a holder.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_and_garbled_holder_records_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let a = open(tmp.path(), "jobs");
        let path = a.inner.paths.holder.clone();
        let corrupt = |r: Result<Option<Holder>, Error>| match r {
            Err(Error::Corrupt { what, problem, .. }) => format!("{what}: {problem}"),
            other => panic!("expected a corrupt-record error, got {other:?}"),
        };
        let f = File::create(&path).unwrap();
        f.set_len(1 << 30).unwrap();
        drop(f);
        let problem = corrupt(a.holder().await);
        assert!(
            problem.contains("holder") && problem.contains("larger"),
            "{problem}"
        );

        fs::write(&path, b"{\"id\": \"x\", \"term\": ").unwrap();
        let problem = corrupt(a.holder().await);
        assert!(problem.contains("holder"), "{problem}");

        fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let problem = corrupt(within("holder() on a FIFO", a.holder()).await);
        assert!(problem.contains("regular file"), "{problem}");

        // The next holder replaces whatever is there, and its term rises.
        fs::remove_file(&path).unwrap();
        fs::write(&path, vec![b'{'; 100_000]).unwrap();
        let lease = a.acquire(req("a")).await.unwrap();
        assert_eq!(a.holder().await.unwrap().as_ref(), Some(lease.holder()));
        lease.release().await.unwrap();
    }

    #[test]
    fn symlinked_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        for given in [link.clone(), link.join("")] {
            let problem = lock_dir_problem(FileLock::new(&given).lock("jobs"));
            assert!(problem.contains("symbolic link"), "{problem}");
        }
        assert!(!real.join("jobs.lock").exists());
        FileLock::new(&real).lock("jobs").unwrap();
    }

    #[test]
    fn missing_dir_and_non_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let problem = lock_dir_problem(FileLock::new(tmp.path().join("nope")).lock("jobs"));
        assert!(problem.contains("does not exist"), "{problem}");

        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        let problem = lock_dir_problem(FileLock::new(&file).lock("jobs"));
        assert!(problem.contains("not a directory"), "{problem}");

        let problem = lock_dir_problem(FileLock::new("").lock("jobs"));
        assert!(problem.contains("empty"), "{problem}");

        // The lock file itself must not be a symbolic link.
        std::os::unix::fs::symlink(&file, tmp.path().join("jobs.lock")).unwrap();
        let problem = lock_dir_problem(FileLock::new(tmp.path()).lock("jobs"));
        assert!(problem.contains("symbolic link"), "{problem}");

        let err = FileLock::new(tmp.path()).lock("../escape").unwrap_err();
        assert!(matches!(err, ConfigError::InvalidLockName { .. }), "{err}");
    }

    #[test]
    fn unwritable_dir_is_refused() {
        use std::os::unix::fs::PermissionsExt;

        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ro");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o500)).unwrap();
        let bypass = nix::unistd::access(&dir, AccessFlags::W_OK).is_ok();
        let result = FileLock::new(&dir).lock("jobs");
        if bypass {
            println!(
                "note: this process bypasses permission bits (root or CAP_DAC_OVERRIDE), so a \
                 mode 0500 directory is writable for it; checking an unwritable file system instead"
            );
            assert!(result.is_ok(), "{:?}", result.err());
        } else {
            let problem = lock_dir_problem(result);
            assert!(problem.contains("not writable"), "{problem}");
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();

        // Where even root cannot create files (sysfs), the open fails and says so.
        if fs::symlink_metadata("/sys").is_ok_and(|m| m.is_dir()) {
            let problem = lock_dir_problem(FileLock::new("/sys").lock("tower-primary-test"));
            assert!(problem.contains("not writable"), "{problem}");
        }
    }

    #[tokio::test]
    async fn lock_file_is_private_and_kept_after_release() {
        use std::os::unix::fs::PermissionsExt;

        let tmp = tempfile::tempdir().unwrap();
        let a = open(tmp.path(), "jobs");
        let lease = a.acquire(req("a")).await.unwrap();
        assert!(lease.renewals().is_none());
        let paths = &a.inner.paths;
        let record: Holder = serde_json::from_slice(&fs::read(&paths.holder).unwrap()).unwrap();
        assert_eq!(&record, lease.holder());
        let term = lease.term();
        let stored = fs::read_to_string(&paths.lock).unwrap();
        assert_eq!(stored, format!("{term:020}\n"));
        lease.release().await.unwrap();

        let meta = fs::symlink_metadata(&paths.lock).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let state = fs::symlink_metadata(&paths.state_dir).unwrap();
        assert_eq!(state.permissions().mode() & 0o777, 0o700);
        assert!(
            !paths.holder.exists(),
            "the holder record is deleted on release"
        );
        assert_eq!(a.holder().await.unwrap(), None);
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_lock_waits_and_gets_the_lock_when_the_first_is_released() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (open(tmp.path(), "jobs"), open(tmp.path(), "jobs"));
        let first = a.acquire(req("a")).await.unwrap();
        assert_eq!(b.holder().await.unwrap().unwrap().id, "a");

        let mut waiting = b.acquire(req("b"));
        assert!((&mut waiting).now_or_never().is_none());
        counted(&b.inner.blocked, 1, "b to block in flock").await;
        assert!((&mut waiting).now_or_never().is_none(), "b got a held lock");

        let first_term = first.term();
        let released_at = Instant::now();
        first.release().await.unwrap();
        let second = within("b's grant", waiting).await.unwrap();
        let handover = released_at.elapsed();
        println!(
            "handover after release: {handover:?} (term write, holder record, fsyncs included)"
        );
        assert!(second.term() > first_term);
        assert_eq!(second.holder().id, "b");
        assert_eq!(a.holder().await.unwrap().unwrap().id, "b");
        // Dropping a leadership releases it (off the runtime's threads, so a moment later).
        let mut changes = a.watch_holder().await.unwrap();
        drop(second);
        within("the dropped leadership's release", async {
            while a.holder().await.unwrap().is_some() {
                changes.changed().await.unwrap();
            }
        })
        .await;
        within("a's grant", a.acquire(req("a")))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }

    /// Prints release-to-grant times: the term and holder record writes (three fsyncs) are
    /// most of it on a disk; on tmpfs (/run) they are nearly free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handover_time_is_measured() {
        let mut dirs = vec![("temp dir", tempfile::tempdir().unwrap())];
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(("tmpfs /dev/shm", shm));
        }
        for (what, tmp) in dirs {
            let (a, b) = (open(tmp.path(), "jobs"), open(tmp.path(), "jobs"));
            let mut times = Vec::new();
            let mut last = 0;
            for round in 0..20u64 {
                let first = a.acquire(req("a")).await.unwrap();
                assert!(first.term() > last);
                let mut waiting = b.acquire(req("b"));
                assert!((&mut waiting).now_or_never().is_none());
                counted(&b.inner.blocked, round + 1, "b to block in flock").await;
                let released_at = Instant::now();
                first.release().await.unwrap();
                let second = within("b's grant", waiting).await.unwrap();
                times.push(released_at.elapsed());
                last = second.term();
                second.release().await.unwrap();
            }
            times.sort();
            println!(
                "handover (release -> waiter's leadership) on {what}: min {:?}, median {:?}, \
                 p90 {:?}, max {:?} (n = {})",
                times[0],
                times[times.len() / 2],
                times[times.len() * 9 / 10],
                times[times.len() - 1],
                times.len()
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terms_rise_across_handovers() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (open(tmp.path(), "jobs"), open(tmp.path(), "jobs"));
        let mut last = 0;
        for i in 0..6 {
            let l = if i % 2 == 0 { &a } else { &b };
            let lease = l
                .acquire(req(if i % 2 == 0 { "a" } else { "b" }))
                .await
                .unwrap();
            assert!(lease.term() > last, "{} after {last}", lease.term());
            last = lease.term();
            lease.release().await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_acquire_does_not_leak_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            open(tmp.path(), "jobs"),
            open(tmp.path(), "jobs"),
            open(tmp.path(), "jobs"),
        );
        let first = a.acquire(req("a")).await.unwrap();
        let mut waiting = b.acquire(req("b"));
        assert!((&mut waiting).now_or_never().is_none());
        counted(&b.inner.blocked, 1, "b to block in flock").await;
        drop(waiting);

        let term_a = first.term();
        first.release().await.unwrap();
        // b's thread gets the lock when a releases, sees nobody waits, and unlocks at once.
        let third = within("c's grant", c.acquire(req("c"))).await.unwrap();
        assert!(third.term() > term_a);
        assert_eq!(b.holder().await.unwrap().unwrap().id, "c");
        assert!(lock(&b.inner.live).is_none(), "b never became the holder");
        let err = b.store("k", b"x", third.term()).await.unwrap_err();
        assert!(matches!(err, Error::StaleTerm { .. }), "{err}");
        third.release().await.unwrap();
    }

    /// Dropping a runtime while one of its tasks waits for the lock returns at once: the wait
    /// runs on the waiter thread, not on the runtime's blocking pool. Acquires given up in a row
    /// share that one waiting thread.
    #[test]
    fn dropping_a_runtime_while_an_acquire_waits_returns_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (open(tmp.path(), "jobs"), Arc::new(open(tmp.path(), "jobs")));
        let runtime = |flavor| {
            match flavor {
                "current" => tokio::runtime::Builder::new_current_thread(),
                _ => tokio::runtime::Builder::new_multi_thread(),
            }
            .enable_all()
            .build()
            .unwrap()
        };
        let rt = runtime("current");
        let first = rt.block_on(a.acquire(req("a"))).unwrap();
        for _ in 0..5 {
            let _in_runtime = rt.enter();
            let mut given_up = b.acquire(req("b"));
            assert!((&mut given_up).now_or_never().is_none());
        }
        let waiting = b.clone();
        rt.spawn(async move { waiting.acquire(req("b")).await.map(drop) });
        rt.block_on(counted(&b.inner.blocked, 1, "b to wait in flock"));
        assert_eq!(
            *b.inner.blocked.borrow(),
            1,
            "one thread waits for all of b's acquires"
        );

        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(rt);
            let _ = tx.send(());
        });
        rx.recv_timeout(PATIENCE)
            .expect("dropping the runtime hung on the acquire waiting in flock");

        // The waiting thread, left without an acquire, unlocks its grant at once.
        drop(first);
        let rt = runtime("multi");
        let c = open(tmp.path(), "jobs");
        rt.block_on(async {
            let third = within("c's grant", c.acquire(req("c"))).await.unwrap();
            assert!(lock(&b.inner.live).is_none(), "b never became the holder");
            third.release().await.unwrap();
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleting_the_lock_file_makes_lost_fire() {
        let tmp = tempfile::tempdir().unwrap();
        let a = open(tmp.path(), "jobs");
        let path = a.inner.paths.lock.clone();
        let mut times = Vec::new();
        for _ in 0..7 {
            let mut lease = a.acquire(req("a")).await.unwrap();
            let term = lease.term();
            let (ready_tx, ready_rx) = oneshot::channel();
            let waiter = tokio::spawn(async move {
                let _ = ready_tx.send(());
                let err = lease.lost().await;
                (Instant::now(), err, lease)
            });
            ready_rx.await.unwrap();
            tokio::task::yield_now().await;
            let deleted_at = Instant::now();
            fs::remove_file(&path).unwrap();
            let (seen_at, err, lease) = within("lost()", waiter).await.unwrap();
            times.push(seen_at.duration_since(deleted_at));
            match &err {
                Error::Lost { lock, reason } => {
                    assert_eq!(lock, "jobs");
                    assert!(reason.contains("deleted"), "{reason}");
                }
                other => panic!("expected Lost, got {other:?}"),
            }
            // The loss is sticky, and the term can no longer write state.
            let mut lease = lease;
            assert!(matches!(lease.lost().await, Error::Lost { .. }));
            let err = a.store("k", b"x", term).await.unwrap_err();
            assert!(matches!(err, Error::StaleTerm { .. }), "{err}");
            lease.release().await.unwrap();
        }
        times.sort();
        println!(
            "lock file deletion -> lost(): min {:?}, median {:?}, max {:?} (n = {})",
            times[0],
            times[times.len() / 2],
            times[times.len() - 1],
            times.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replacing_the_lock_file_makes_lost_fire() {
        let tmp = tempfile::tempdir().unwrap();
        let a = open(tmp.path(), "jobs");
        let mut lease = a.acquire(req("a")).await.unwrap();
        let other = tmp.path().join("other");
        fs::write(&other, b"").unwrap();
        fs::rename(&other, &a.inner.paths.lock).unwrap();
        match within("lost()", lease.lost()).await {
            Error::Lost { reason, .. } => assert!(reason.contains("replaced"), "{reason}"),
            other => panic!("expected Lost, got {other:?}"),
        }
        lease.release().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiter_blocked_on_a_deleted_inode_does_not_become_primary() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            open(tmp.path(), "jobs"),
            open(tmp.path(), "jobs"),
            open(tmp.path(), "jobs"),
        );
        let first = a.acquire(req("a")).await.unwrap();
        let mut waiting = b.acquire(req("b"));
        assert!((&mut waiting).now_or_never().is_none());
        counted(&b.inner.blocked, 1, "b to block on the first inode").await;

        // Someone "cleans up" the lock file; c locks the new file the path now names.
        fs::remove_file(&a.inner.paths.lock).unwrap();
        let third = within("c's grant", c.acquire(req("c"))).await.unwrap();

        // a's release wakes b on the old inode: b must see it is stale and wait on c's file.
        first.release().await.unwrap();
        counted(
            &b.inner.stale_grants,
            1,
            "b to drop its grant on the old inode",
        )
        .await;
        counted(&b.inner.blocked, 2, "b to block again, on the new inode").await;
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "b became primary while c holds the lock"
        );

        let term_c = third.term();
        third.release().await.unwrap();
        let second = within("b's grant", waiting).await.unwrap();
        assert!(second.term() > term_c);
        let path_id = FileId::of(&fs::symlink_metadata(&b.inner.paths.lock).unwrap());
        assert_eq!(lock(&b.inner.live).as_ref().unwrap().id, path_id);
        second.release().await.unwrap();
    }

    #[tokio::test]
    async fn corrupt_term_and_holder_files_are_reported_and_a_higher_term_comes_out() {
        let logs = Logs::default();
        let _guard = logs.capture();
        let tmp = tempfile::tempdir().unwrap();
        let a = open(tmp.path(), "jobs");
        let paths = &a.inner.paths;

        // A stored term ahead of the wall clock is followed exactly.
        let ahead = wall_micros() + 1_000_000_000_000;
        fs::write(&paths.lock, format!("{ahead:020}\n")).unwrap();
        let lease = a.acquire(req("a")).await.unwrap();
        assert_eq!(lease.term(), ahead + 1);
        lease.release().await.unwrap();

        // Corrupt term: the holder record's term is used.
        fs::write(&paths.lock, b"garbage!").unwrap();
        let mut record = Holder::new(&NodeId::new("old"), ahead + 10);
        record.pid = 0;
        fs::write(&paths.holder, serde_json::to_vec(&record).unwrap()).unwrap();
        let lease = a.acquire(req("a")).await.unwrap();
        assert_eq!(lease.term(), ahead + 11);
        lease.release().await.unwrap();
        assert!(logs.text().contains("corrupt term"), "{}", logs.text());

        // Corrupt term and corrupt holder record: the state values' terms are used.
        fs::write(&paths.lock, b"\0\0\0\0").unwrap();
        fs::write(&paths.holder, b"{not json").unwrap();
        fs::write(paths.state_dir.join("k"), encode_state(b"v", ahead + 20)).unwrap();
        let lease = a.acquire(req("a")).await.unwrap();
        assert_eq!(lease.term(), ahead + 21);
        assert!(
            logs.text().contains("corrupt holder record"),
            "{}",
            logs.text()
        );

        // Terms never go back below what the lock file now holds.
        lease.release().await.unwrap();
        fs::remove_file(paths.state_dir.join("k")).unwrap();
        let lease = a.acquire(req("a")).await.unwrap();
        assert_eq!(lease.term(), ahead + 22);
        lease.release().await.unwrap();
    }

    #[tokio::test]
    async fn holder_rewrites_a_damaged_holder_record() {
        let logs = Logs::default();
        let _guard = logs.capture();
        let tmp = tempfile::tempdir().unwrap();
        let a = open(tmp.path(), "jobs");
        let mut lease = a.acquire(req("a")).await.unwrap();
        let mine = lease.holder().clone();
        let mut changes = a.watch_holder().await.unwrap();
        fs::write(&a.inner.paths.holder, b"{\"id\": tru").unwrap();
        let err = a.holder().await.unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { what, .. } if what.contains("holder record")),
            "a corrupt record is an error: {err}"
        );
        let repaired = async {
            loop {
                // Until the rewrite, the damaged record reads as an error.
                if a.holder().await.ok().flatten().as_ref() == Some(&mine) {
                    break;
                }
                changes.changed().await.unwrap();
            }
        };
        tokio::select! {
            err = lease.lost() => panic!("lost: {err}"),
            res = tokio::time::timeout(PATIENCE, repaired) => res.expect("the record was not rewritten"),
        }
        let text = logs.text();
        assert!(text.contains("corrupt holder record"), "{text}");
        assert!(text.contains("rewriting"), "{text}");

        // Deleted: rewritten too.
        fs::remove_file(&a.inner.paths.holder).unwrap();
        let repaired = async {
            loop {
                // Until the rewrite, the damaged record reads as an error.
                if a.holder().await.ok().flatten().as_ref() == Some(&mine) {
                    break;
                }
                changes.changed().await.unwrap();
            }
        };
        tokio::select! {
            err = lease.lost() => panic!("lost: {err}"),
            res = tokio::time::timeout(PATIENCE, repaired) => res.expect("the record was not rewritten"),
        }
        lease.release().await.unwrap();
    }

    #[tokio::test]
    async fn stale_holder_records_are_not_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let a = open(tmp.path(), "jobs");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();

        let mut record = Holder::new(&NodeId::new("ghost"), 5);
        record.pid = dead;
        fs::write(&a.inner.paths.holder, serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(
            a.holder().await.unwrap(),
            None,
            "the holder process has exited"
        );

        // Our own, live pid, but nobody holds the lock: left over.
        record.pid = std::process::id();
        fs::write(&a.inner.paths.holder, serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(a.holder().await.unwrap(), None, "nobody holds the lock");

        // Held: reported.
        let b = open(tmp.path(), "jobs");
        let lease = b.acquire(req("b")).await.unwrap();
        assert_eq!(a.holder().await.unwrap().as_ref(), Some(lease.holder()));
        lease.release().await.unwrap();
    }

    #[tokio::test]
    async fn state_store_with_a_wrong_or_stale_term_is_refused() {
        let logs = Logs::default();
        let _guard = logs.capture();
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (open(tmp.path(), "jobs"), open(tmp.path(), "jobs"));
        let stale = |r: Result<(), Error>| match r {
            Err(Error::StaleTerm { current, .. }) => current,
            other => panic!("expected StaleTerm, got {other:?}"),
        };

        assert_eq!(
            stale(a.store("k", b"0", 1).await),
            None,
            "nobody holds the lock"
        );
        let first = a.acquire(req("a")).await.unwrap();
        let ta = first.term();
        a.store("k", b"1", ta).await.unwrap();
        assert_eq!(
            a.load("k").await.unwrap(),
            Some(Stored::new(b"1".to_vec(), ta))
        );
        assert_eq!(
            b.load("k").await.unwrap(),
            Some(Stored::new(b"1".to_vec(), ta))
        );
        assert_eq!(stale(a.store("k", b"2", ta + 1).await), Some(ta));
        assert_eq!(stale(a.store("k", b"2", ta - 1).await), Some(ta));
        stale(b.store("k", b"2", ta).await);
        assert!(a.store("bad/key", b"", ta).await.is_err());
        first.release().await.unwrap();
        stale(a.store("k", b"2", ta).await);

        let mut watch = a.watch_key("k").await.unwrap();
        let second = b.acquire(req("b")).await.unwrap();
        let tb = second.term();
        assert!(tb > ta);
        b.store("k", b"3", tb).await.unwrap();
        within("a state change", watch.changed()).await.unwrap();
        assert_eq!(
            a.load("k").await.unwrap(),
            Some(Stored::new(b"3".to_vec(), tb))
        );

        // A newer term has written the key: refused, naming it.
        let paths = &b.inner.paths;
        fs::write(paths.state_dir.join("k2"), encode_state(b"n", tb + 1000)).unwrap();
        assert_eq!(stale(b.store("k2", b"x", tb).await), Some(tb + 1000));

        // A corrupt value is an error, and is repaired by the next store.
        fs::write(
            paths.state_dir.join("k3"),
            b"tower-primary-state 1 7 99\nshort",
        )
        .unwrap();
        let err = b.load("k3").await.unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(
            logs.text().contains("corrupt state value"),
            "{}",
            logs.text()
        );
        b.store("k3", b"fixed", tb).await.unwrap();
        assert_eq!(
            b.load("k3").await.unwrap(),
            Some(Stored::new(b"fixed".to_vec(), tb))
        );
        second.release().await.unwrap();
        stale(b.store("k3", b"late", tb).await);
    }

    #[tokio::test]
    async fn holder_watch_wakes_on_change() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (open(tmp.path(), "jobs"), open(tmp.path(), "jobs"));
        let mut changes = b.watch_holder().await.unwrap();
        assert_eq!(b.holder().await.unwrap(), None);

        let lease = a.acquire(req("a")).await.unwrap();
        let mine = lease.holder().clone();
        within("b to see a", async {
            while b.holder().await.unwrap().as_ref() != Some(&mine) {
                changes.changed().await.unwrap();
            }
        })
        .await;

        lease.release().await.unwrap();
        within("b to see no holder", async {
            while b.holder().await.unwrap().is_some() {
                changes.changed().await.unwrap();
            }
        })
        .await;
    }

    #[tokio::test]
    async fn child_processes_do_not_inherit_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let a = open(tmp.path(), "jobs");
        let lease = a.acquire(req("a")).await.unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fds = fs::read_dir(format!("/proc/{}/fd", child.id())).unwrap();
        let inherited: Vec<PathBuf> = fds
            .flatten()
            .filter_map(|e| fs::read_link(e.path()).ok())
            .filter(|target| target.starts_with(tmp.path()))
            .collect();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(inherited.is_empty(), "the child inherited {inherited:?}");
        lease.release().await.unwrap();

        // And the lock is free for the next node.
        let b = open(tmp.path(), "jobs");
        within("b's grant", b.acquire(req("b")))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
}
