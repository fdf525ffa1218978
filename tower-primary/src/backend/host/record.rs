//! The files a host group keeps beside its candidate lock: the `.host` record, the heartbeat,
//! the announcements of waiting processes and the keys followers want mirrored.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::file::{read_prefix, write_atomic};
use crate::process::ProcessIdentity;

/// A larger record is corrupt.
const MAX_RECORD: u64 = 64 * 1024;

/// `<dir>/<lock>.host`: who is the candidate of the group, and what a successor needs to resume
/// its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct HostRecord {
    /// The inner backend's [`address`](crate::backend::Backend::address).
    pub(super) address: String,
    /// The lock name.
    pub(super) lock: String,
    /// The lease of the candidate's requests, in milliseconds (`None`: no lease).
    pub(super) lease_ms: Option<u64>,
    /// The kernel's boot id when this was written.
    pub(super) boot_id: String,
    /// The candidate process.
    pub(super) candidate: Option<ProcessIdentity>,
    /// The candidate's node id, for people reading the file.
    pub(super) node: String,
    /// The inner leadership's resume token, while the candidate leads.
    pub(super) token: Option<String>,
    /// The inner leadership's term, while the candidate leads.
    pub(super) term: Option<u64>,
    /// Set by a candidate that passes its lease to a sibling at its exit.
    #[serde(default)]
    pub(super) released: bool,
}

/// `<dir>/<lock>.heartbeat`: the candidate's latest sign of life. A file of its own, rewritten
/// every third of a lease without `fsync` (a heartbeat is worthless after a crash, and the boot
/// id already tells a reboot), so that the `.host` record is written only when the candidate or
/// its lease changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Heartbeat {
    /// The candidate process.
    pub(super) candidate: Option<ProcessIdentity>,
    /// When, on the candidate's clock (`CLOCK_BOOTTIME` in production), in nanoseconds.
    pub(super) at_ns: u64,
}

/// What reading a record found.
#[derive(Debug)]
pub(super) enum Read<T> {
    Missing,
    Corrupt(String),
    Found(T),
}

/// The files of one lock name in a host directory.
#[derive(Debug)]
pub(super) struct Files {
    pub(super) dir: PathBuf,
    pub(super) lock: String,
    /// `<lock>.candidate`, the flock every process of the group waits on.
    pub(super) candidate: PathBuf,
    pub(super) candidate_name: OsString,
    pub(super) host: PathBuf,
    pub(super) host_name: OsString,
    pub(super) heartbeat_name: OsString,
    /// `<lock>.sibling.`, then `<pid>.<n>`: one file per waiting process.
    pub(super) sibling_prefix: String,
    /// `<lock>.want.`, then a state key: keys a follower asked the candidate to mirror.
    pub(super) want_prefix: String,
}

impl Files {
    pub(super) fn new(dir: &Path, lock: &str) -> Self {
        let candidate_name = OsString::from(format!("{lock}.candidate"));
        let host_name = OsString::from(format!("{lock}.host"));
        Files {
            dir: dir.to_owned(),
            lock: lock.to_owned(),
            candidate: dir.join(&candidate_name),
            candidate_name,
            host: dir.join(&host_name),
            host_name,
            heartbeat_name: OsString::from(format!("{lock}.heartbeat")),
            sibling_prefix: format!("{lock}.sibling."),
            want_prefix: format!("{lock}.want."),
        }
    }

    pub(super) fn read_host(&self) -> io::Result<Read<HostRecord>> {
        read_json(&self.host)
    }

    /// Writes the `.host` record atomically (0600, rename), without `fsync`: a record is only
    /// trusted within the boot that wrote it (its boot id), and what a process wrote survives
    /// the process's crash in the page cache. Two `fsync`s here took 5–50 ms on a virtual disk,
    /// on the path from a candidate's death to its successor's first term.
    pub(super) fn write_host(&self, record: &HostRecord) -> io::Result<()> {
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        write_atomic(&self.dir, &self.host_name, &json, false)
    }

    pub(super) fn read_heartbeat(&self) -> io::Result<Read<Heartbeat>> {
        read_json(&self.dir.join(&self.heartbeat_name))
    }

    pub(super) fn write_heartbeat(&self, beat: &Heartbeat) -> io::Result<()> {
        let json = serde_json::to_vec(beat).map_err(io::Error::other)?;
        write_atomic(&self.dir, &self.heartbeat_name, &json, false)
    }

    /// The lock of the one waiter that may replace a hung candidate's file
    /// (`<lock>.replacing`, a non-blocking `flock`); `None` while another holds it.
    pub(super) fn replacing(&self) -> Option<fs::File> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(self.dir.join(format!("{}.replacing", self.lock)))
            .ok()?;
        file.try_lock().ok()?;
        Some(file)
    }

    /// Announces this process as waiting for the candidate lock, until the guard is dropped.
    pub(super) fn announce(&self, me: Option<&ProcessIdentity>) -> io::Result<Announcement> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{}{}.{}",
            self.sibling_prefix,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let json = serde_json::to_vec(&me).map_err(io::Error::other)?;
        write_atomic(&self.dir, name.as_ref(), &json, false)?;
        Ok(Announcement {
            path: self.dir.join(name),
        })
    }

    /// Whether a process of this host announces itself as waiting, and still runs. The
    /// announcements of processes that are gone are deleted on the way.
    pub(super) fn live_sibling(&self, me: Option<&ProcessIdentity>) -> bool {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return false;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name
                .to_str()
                .is_some_and(|n| n.starts_with(&self.sibling_prefix))
            {
                continue;
            }
            match read_json::<Option<ProcessIdentity>>(&entry.path()) {
                Ok(Read::Found(Some(id))) => {
                    let here = me.is_some_and(|me| me.same_host(&id));
                    if here && id.is_gone() {
                        let _ = fs::remove_file(entry.path());
                    } else if here {
                        return true;
                    }
                }
                Ok(Read::Corrupt(_)) => {
                    let _ = fs::remove_file(entry.path());
                }
                _ => {}
            }
        }
        false
    }

    /// Records that a follower wants `key` mirrored (an empty file; kept for the life of the
    /// directory, so the candidate mirrors every key any process of the host ever wanted).
    pub(super) fn want(&self, key: &str) -> io::Result<()> {
        let path = self.dir.join(format!("{}{key}", self.want_prefix));
        if path.exists() {
            return Ok(());
        }
        write_atomic(&self.dir, path.file_name().unwrap_or_default(), b"", false)
    }

    /// The keys followers want mirrored.
    pub(super) fn wanted(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix(&self.want_prefix)
                    .filter(|k| crate::backend::check_key(k).is_ok())
                    .map(str::to_owned)
            })
            .collect()
    }
}

/// A waiting process's announcement; deleted on drop.
#[derive(Debug)]
pub(super) struct Announcement {
    path: PathBuf,
}

impl Drop for Announcement {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Reads a JSON record of at most 64 KiB, without following a symbolic link.
fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Read<T>> {
    let bytes = match read_prefix(path, MAX_RECORD + 1) {
        Ok(Ok(b)) => b,
        Ok(Err(problem)) => return Ok(Read::Corrupt(problem)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::Missing),
        Err(e) => return Err(e),
    };
    if bytes.len() as u64 > MAX_RECORD {
        return Ok(Read::Corrupt(format!("larger than {MAX_RECORD} bytes")));
    }
    Ok(match serde_json::from_slice(&bytes) {
        Ok(v) => Read::Found(v),
        Err(e) => Read::Corrupt(e.to_string()),
    })
}

/// The kernel's boot id, or an empty string where it cannot be read.
pub(super) fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
