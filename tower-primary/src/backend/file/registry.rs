//! The candidate registry of a file lock: one `flock`'d file per registration in
//! `<dir>/<name>.candidates/`.
//!
//! - **Register**: the registrant creates a temporary (dot) file, takes an exclusive `flock` on
//!   it, writes the entry and renames it to `<node, made safe>.<pid>.<n>`: the file is locked
//!   before it is visible, and the registration object keeps the descriptor (and so the lock)
//!   for its life. Names are never reused, so a reader that deletes a dead file never deletes a
//!   live one.
//! - **Update**: rewritten in place, under the same lock (a rename would replace the locked
//!   inode): the new bytes at offset 0, then the file is cut to their length. The content
//!   carries its length and an FNV-1a checksum, so a read torn by a concurrent update is
//!   recognised and read again.
//! - **Read**: every file (dot files excepted) is opened without following symbolic links or
//!   blocking, must be a regular file of this user, and is probed with a non-blocking shared
//!   `flock`: held means live, free means its registrant is gone (dropped, or its process
//!   died: the kernel frees the lock at once), and the reader deletes it. Several live entries
//!   of one node: the latest registration wins.
//! - **Watch**: inotify on the directory (the process's one instance). A registrant's death
//!   closes its descriptor, opened for writing, so it is reported at once (`IN_CLOSE_WRITE`);
//!   a reader's opens and probes report nothing.

use std::os::unix::fs::PermissionsExt;

use serde::{Deserialize, Serialize};

use super::*;
use crate::backend::{Candidate, Registration};

/// A larger entry file is corrupt.
const MAX_ENTRY_BYTES: u64 = 64 * 1024;
const ENTRY_MAGIC: &str = "tower-primary-candidate";
/// Reads of an entry torn by a concurrent update, in a row, before it is skipped this time.
const TORN_READS: usize = 8;

/// An entry file's content: the candidate, and what orders two registrations of one node.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    candidate: Candidate,
    /// `CLOCK_BOOTTIME` when registered.
    registered_ns: u64,
    pid: u32,
    seq: u64,
}

impl Entry {
    fn order(&self) -> (u64, u32, u64) {
        (self.registered_ns, self.pid, self.seq)
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn encode_entry(entry: &Entry) -> Result<Vec<u8>, Error> {
    let json = serde_json::to_vec(entry)
        .map_err(|e| Error::backend(NAME, "cannot encode a registry entry", e))?;
    let mut bytes = format!("{ENTRY_MAGIC} 1 {:016x} {}\n", fnv1a(&json), json.len()).into_bytes();
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

/// Parses an entry file; bytes after the stated length (an update that has not cut the file
/// yet) are ignored.
fn parse_entry(bytes: &[u8]) -> Result<Entry, String> {
    let (sum, len, start) = super::records::split_header(bytes, ENTRY_MAGIC, 128)?;
    let line = String::from_utf8_lossy(&bytes[..start - 1]);
    let sum = u64::from_str_radix(sum, 16).map_err(|_| format!("bad checksum in {line:?}"))?;
    let len: usize = len.parse().map_err(|_| format!("bad length in {line:?}"))?;
    let json = bytes
        .get(start..start + len)
        .ok_or("shorter than its header says")?;
    if fnv1a(json) != sum {
        return Err("checksum mismatch".to_owned());
    }
    serde_json::from_slice(json).map_err(|e| e.to_string())
}

/// A node id as a file name: ASCII letters, digits, `_` and `-` as they are, every other byte
/// as `%XX`; at most 160 bytes (the entry holds the full id).
fn safe_name(node: &str) -> String {
    let mut name = String::new();
    for b in node.bytes() {
        if name.len() >= 160 {
            break;
        }
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-') {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name
}

/// Creates the registry directory (0700) if missing; refuses a symbolic link or anything that
/// is not a directory of this user.
fn ensure_registry_dir(path: &Path) -> io::Result<()> {
    ensure_state_dir(path)?;
    let meta = fs::symlink_metadata(path)?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(
            "is not owned by this process's user (refused)",
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(io::Error::other("is writable by group or others (refused)"));
    }
    Ok(())
}

/// Opens an entry file for a probe: no symbolic link, no blocking open; `Ok(None)` for anything
/// but a regular file of this user (logged).
fn open_entry(inner: &Inner, path: &Path) -> io::Result<Option<(File, fs::Metadata)>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.uid() != nix::unistd::geteuid().as_raw() {
        tracing::warn!(lock = %inner.name, path = %path.display(), "not a regular file of this user in the candidate registry; ignored");
        return Ok(None);
    }
    Ok(Some((file, meta)))
}

/// Reads a live entry file (with `pread`), again while a concurrent update tears the read.
fn read_entry(file: &File, len: u64) -> io::Result<Result<Entry, String>> {
    if len > MAX_ENTRY_BYTES {
        return Ok(Err(format!("larger than {MAX_ENTRY_BYTES} bytes")));
    }
    let mut last = String::new();
    let mut buf = vec![0u8; usize::try_from(MAX_ENTRY_BYTES).unwrap_or(65_536)];
    for _ in 0..TORN_READS {
        let mut n = 0;
        while n < buf.len() {
            match file.read_at(&mut buf[n..], n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        match parse_entry(&buf[..n]) {
            Ok(entry) => return Ok(Ok(entry)),
            Err(problem) => last = problem,
        }
        std::thread::yield_now();
    }
    Ok(Err(last))
}

impl Inner {
    /// The live entries; dead entry files are deleted on the way. Blocking file I/O.
    pub(super) fn read_candidates(&self) -> Result<Vec<Candidate>, Error> {
        let dir = &self.paths.registry_dir;
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(self.io(
                    format!("cannot read the candidate registry {}", dir.display()),
                    e,
                ));
            }
        };
        let mut live: HashMap<String, Entry> = HashMap::new();
        for dirent in entries {
            let dirent = dirent.map_err(|e| {
                self.io(
                    format!("cannot read the candidate registry {}", dir.display()),
                    e,
                )
            })?;
            if dirent.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = dirent.path();
            let (file, meta) = match open_entry(self, &path) {
                Ok(Some(opened)) => opened,
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(lock = %self.name, path = %path.display(), error = %e, "cannot open a registry entry; ignored");
                    continue;
                }
            };
            match file.try_lock_shared() {
                Ok(()) => {
                    // Nobody holds it: its registrant is gone. Deleted only if the path still
                    // names it (names are never reused, so this is the dead file).
                    let _ = file.unlock();
                    if fs::symlink_metadata(&path)
                        .is_ok_and(|m| FileId::of(&m) == FileId::of(&meta))
                    {
                        let _ = fs::remove_file(&path);
                    }
                    continue;
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => {
                    tracing::warn!(lock = %self.name, path = %path.display(), error = %e, "cannot probe a registry entry; ignored");
                    continue;
                }
            }
            let entry = match read_entry(&file, meta.len()) {
                Ok(Ok(entry)) => entry,
                Ok(Err(problem)) => {
                    tracing::warn!(lock = %self.name, path = %path.display(), problem, "unreadable registry entry; ignored");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(lock = %self.name, path = %path.display(), error = %e, "cannot read a registry entry; ignored");
                    continue;
                }
            };
            match live.get(&entry.candidate.node) {
                Some(seen) if seen.order() >= entry.order() => {}
                _ => {
                    live.insert(entry.candidate.node.clone(), entry);
                }
            }
        }
        Ok(live.into_values().map(|e| e.candidate).collect())
    }

    /// Enters `candidate` in the registry. Blocking file I/O.
    pub(super) fn register(
        self: &Arc<Self>,
        candidate: Candidate,
    ) -> Result<FileRegistration, Error> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = &self.paths.registry_dir;
        let fail = |what: &str, e: io::Error| {
            self.io(
                format!("cannot {what} the candidate registry {}", dir.display()),
                e,
            )
        };
        ensure_registry_dir(dir).map_err(|e| fail("create", e))?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("{}.{pid}.{seq}", safe_name(&candidate.node));
        let entry = Entry {
            candidate,
            registered_ns: crate::Clock::system().now().as_nanos(),
            pid,
            seq,
        };
        let bytes = encode_entry(&entry)?;
        let tmp = dir.join(format!(".{name}.tmp"));
        let path = dir.join(&name);
        let made = (|| {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&tmp)?;
            // A new file nobody else opens by this name: the lock is free.
            file.try_lock().map_err(|e| match e {
                TryLockError::Error(e) => e,
                TryLockError::WouldBlock => io::Error::other("a new entry file is locked"),
            })?;
            file.write_all(&bytes)?;
            fs::rename(&tmp, &path)?;
            let id = FileId::of(&file.metadata()?);
            Ok((file, id))
        })();
        let (file, id) = made.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            fail("write to", e)
        })?;
        tracing::debug!(lock = %self.name, node = %entry.candidate.node, "registered a candidate");
        Ok(FileRegistration(Arc::new(Registered {
            inner: self.clone(),
            path,
            id,
            node: entry.candidate.node.clone(),
            order: (entry.registered_ns, pid, seq),
            file: Mutex::new(Some(file)),
        })))
    }
}

/// A registration: the entry file, locked while this lives.
pub(super) struct FileRegistration(Arc<Registered>);

pub(super) struct Registered {
    inner: Arc<Inner>,
    path: PathBuf,
    id: FileId,
    node: String,
    order: (u64, u32, u64),
    /// The locked descriptor; `None` once withdrawn.
    file: Mutex<Option<File>>,
}

impl fmt::Debug for FileRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileRegistration")
            .field("lock", &self.0.inner.name)
            .field("node", &self.0.node)
            .field("path", &self.0.path)
            .finish_non_exhaustive()
    }
}

impl Registered {
    /// Rewrites the entry in place, under the lock. Blocking file I/O.
    fn update(&self, mut candidate: Candidate) -> Result<(), Error> {
        candidate.node.clone_from(&self.node);
        let (registered_ns, pid, seq) = self.order;
        let bytes = encode_entry(&Entry {
            candidate,
            registered_ns,
            pid,
            seq,
        })?;
        let file = lock(&self.file);
        let Some(file) = file.as_ref() else {
            return Ok(());
        };
        file.write_all_at(&bytes, 0)
            .and_then(|()| file.set_len(bytes.len() as u64))
            .map_err(|e| {
                self.inner.io(
                    format!("cannot update the registry entry {}", self.path.display()),
                    e,
                )
            })
    }
}

impl Registration for FileRegistration {
    fn update(&self, entry: Candidate) -> BoxFuture<'_, Result<(), Error>> {
        let registered = self.0.clone();
        Box::pin(blocking("updates a registry entry", move || {
            registered.update(entry)
        }))
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Deleted while still locked, so no reader reads it as dead and deletes it meanwhile;
        // the unlock is the close.
        let file = lock(&self.file).take();
        if file.is_some()
            && fs::symlink_metadata(&self.path).is_ok_and(|m| FileId::of(&m) == self.id)
        {
            let _ = fs::remove_file(&self.path);
        }
        drop(file);
    }
}

/// Changes of the registry directory.
pub(super) struct RegistryChanges {
    _subscription: super::inotify::Subscription,
    rx: watch::Receiver<u64>,
    broken: Arc<AtomicBool>,
    dir: PathBuf,
}

impl Inner {
    /// A watch on the registry directory (created if missing). Blocking.
    pub(super) fn watch_registry(&self) -> Result<RegistryChanges, Error> {
        let dir = self.paths.registry_dir.clone();
        ensure_registry_dir(&dir).map_err(|e| {
            self.io(
                format!("cannot create the candidate registry {}", dir.display()),
                e,
            )
        })?;
        let (tx, rx) = watch::channel(0u64);
        let broken = Arc::new(AtomicBool::new(false));
        let (flag, watched) = (broken.clone(), dir.clone());
        let handler: super::inotify::Handler = Arc::new(move |res| {
            match res {
                Ok(event) => {
                    // A reader's opens and closes change nothing; a registrant's close (it
                    // wrote) is its death or its withdrawal.
                    if matches!(
                        event.kind,
                        EventKind::Access(notify::event::AccessKind::Close(
                            notify::event::AccessMode::Write
                        ))
                    ) || !event.kind.is_access()
                    {
                        let gone = matches!(
                            event.kind,
                            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                        );
                        if gone && event.paths.contains(&watched) {
                            flag.store(true, Ordering::Release);
                        }
                        tx.send_modify(bump);
                    }
                }
                Err(_) => {
                    flag.store(true, Ordering::Release);
                    tx.send_modify(bump);
                }
            }
        });
        let subscription = super::inotify::subscribe(&dir, handler).map_err(|e| {
            Error::backend_msg(NAME, format!("cannot watch {}: {e}", dir.display()))
        })?;
        Ok(RegistryChanges {
            _subscription: subscription,
            rx,
            broken,
            dir,
        })
    }
}

impl Changes for RegistryChanges {
    fn changed(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let broken = |dir: &Path| {
                Error::backend_msg(
                    NAME,
                    format!(
                        "the watch on {} ended (the directory was removed or inotify failed); subscribe again",
                        dir.display()
                    ),
                )
            };
            if self.broken.load(Ordering::Acquire) {
                return Err(broken(&self.dir));
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if self.broken.load(Ordering::Acquire) {
                return Err(broken(&self.dir));
            }
            Ok(())
        })
    }
}

impl DirLock {
    pub(super) async fn register_candidate(
        &self,
        entry: Candidate,
    ) -> Result<Box<dyn Registration>, Error> {
        let inner = self.inner.clone();
        let registration = blocking("registers a candidate", move || inner.register(entry)).await?;
        Ok(Box::new(registration))
    }

    pub(super) async fn list_candidates(&self) -> Result<Vec<Candidate>, Error> {
        let inner = self.inner.clone();
        blocking("reads the candidate registry", move || {
            inner.read_candidates()
        })
        .await
    }

    pub(super) async fn watch_registry(&self) -> Result<Box<dyn Changes>, Error> {
        let inner = self.inner.clone();
        let changes = blocking("watches the candidate registry", move || {
            inner.watch_registry()
        })
        .await?;
        Ok(Box::new(changes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_torn_ones_are_refused() {
        let entry = Entry {
            candidate: Candidate::new("web/7").with_priority(9),
            registered_ns: 5,
            pid: 1,
            seq: 2,
        };
        let mut bytes = encode_entry(&entry).unwrap();
        assert_eq!(parse_entry(&bytes).unwrap().candidate, entry.candidate);
        // An update not yet cut to length: the tail is ignored.
        bytes.extend_from_slice(b"\"tail\"}");
        assert_eq!(parse_entry(&bytes).unwrap().candidate, entry.candidate);
        let at = bytes.iter().position(|b| *b == b'9').unwrap();
        bytes[at] = b'8';
        assert!(parse_entry(&bytes).unwrap_err().contains("checksum"));
        assert_eq!(safe_name("web/7.a"), "web%2F7%2Ea");
        assert!(safe_name(&"x".repeat(300)).len() <= 162);
    }
}
