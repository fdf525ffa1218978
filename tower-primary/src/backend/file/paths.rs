//! The lock directory and the files of one lock name in it.

use super::*;

/// The (device, inode) pair that identifies a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileId {
    pub(super) dev: u64,
    pub(super) ino: u64,
}

impl FileId {
    pub(super) fn of(meta: &fs::Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// The suffixes of the files of one lock name.
#[derive(Clone, Copy, Debug)]
pub(super) struct Suffixes {
    lock: &'static str,
    holder: &'static str,
    state: &'static str,
    reserved: &'static str,
    registry: &'static str,
}

impl Suffixes {
    /// The file backend's own files.
    pub(super) const LOCK: Suffixes = Suffixes {
        lock: "lock",
        holder: "holder",
        state: "state",
        reserved: "reserved",
        registry: "candidates",
    };
    /// A host group's candidate lock.
    pub(super) const CANDIDATE: Suffixes = Suffixes {
        lock: "candidate",
        holder: "candidate-holder",
        state: "mirror",
        reserved: "candidate-reserved",
        registry: "members",
    };
}

/// The files of one lock name.
#[derive(Debug)]
pub(super) struct Paths {
    pub(super) dir: PathBuf,
    pub(super) lock: PathBuf,
    pub(super) holder: PathBuf,
    pub(super) state_dir: PathBuf,
    /// The reservation record (see `reserve.rs`).
    pub(super) reserved: PathBuf,
    /// The candidate registry, one file per registration (see `registry.rs`).
    pub(super) registry_dir: PathBuf,
    pub(super) lock_file: OsString,
    pub(super) holder_file: OsString,
    pub(super) state_name: OsString,
    pub(super) reserved_file: OsString,
}

impl Paths {
    /// Checks the directory and prepares the lock file and the state directory.
    pub(super) fn checked(
        given: &Path,
        name: &str,
        suffixes: Suffixes,
    ) -> Result<Paths, ConfigError> {
        let problem = |problem: String| ConfigError::LockDir {
            path: given.to_owned(),
            problem,
        };
        let (dir, meta) = existing_dir(
            given,
            "owned by the service user (for example with systemd RuntimeDirectory= or \
             StateDirectory=)",
            "a symlinked lock directory is refused, so the lock cannot be redirected",
        )
        .map_err(problem)?;
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
        let lock_file = OsString::from(format!("{name}.{}", suffixes.lock));
        let holder_file = OsString::from(format!("{name}.{}", suffixes.holder));
        let state_name = OsString::from(format!("{name}.{}", suffixes.state));
        let reserved_file = OsString::from(format!("{name}.{}", suffixes.reserved));
        let paths = Paths {
            lock: dir.join(&lock_file),
            holder: dir.join(&holder_file),
            state_dir: dir.join(&state_name),
            reserved: dir.join(&reserved_file),
            registry_dir: dir.join(format!("{name}.{}", suffixes.registry)),
            dir,
            lock_file,
            holder_file,
            state_name,
            reserved_file,
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
pub(super) fn open_lock_file(path: &Path) -> io::Result<File> {
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
pub(super) fn ensure_state_dir(path: &Path) -> io::Result<()> {
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

/// `given`, made absolute, and its metadata, when it names an existing directory that is not a
/// symbolic link; else the problem, in words. `create` says how to create it, `why_not_a_link`
/// why a symbolic link is refused. The lock directory and a host group's directory are checked
/// with it.
pub(in crate::backend) fn existing_dir(
    given: &Path,
    create: &str,
    why_not_a_link: &str,
) -> Result<(PathBuf, fs::Metadata), String> {
    if given.as_os_str().is_empty() {
        return Err("the path is empty".to_owned());
    }
    // Collecting the components drops a trailing slash, which would make lstat follow a
    // symbolic link.
    let dir: PathBuf = std::path::absolute(given)
        .map_err(|e| format!("cannot be made absolute: {e}"))?
        .components()
        .collect();
    let meta = match fs::symlink_metadata(&dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("does not exist; create it first, {create}"));
        }
        Err(e) => return Err(format!("cannot be inspected: {e}")),
    };
    if meta.file_type().is_symlink() {
        return Err(format!(
            "is a symbolic link; give the real directory ({why_not_a_link})"
        ));
    }
    if !meta.is_dir() {
        return Err("is not a directory".to_owned());
    }
    Ok((dir, meta))
}
