//! The checks of a host directory, at spawn.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::sys::statfs;
use nix::unistd::AccessFlags;

use crate::backend::file::existing_dir;
use crate::error::ConfigError;

/// File systems whose `flock` is emulated, local to one client, or absent: a host directory on
/// one of them could let two machines (or two clients) each hold the candidate lock.
const NETWORK_FILE_SYSTEMS: &[(i64, &str)] = &[
    (0x6969, "NFS"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x517B, "SMB"),
    (0x0102_1997, "9p"),
    (0x00C3_6400, "CephFS"),
    (0x5346_414F, "AFS"),
    (0x0BD0_0BD0, "Lustre"),
    (0x4750_4653, "GPFS"),
];

/// Checks `given` and returns it absolute: an existing directory (not a symbolic link), owned
/// by this process's effective user, not writable by group or others, writable by this
/// process, on a local file system.
pub(super) fn check(given: &Path) -> Result<PathBuf, ConfigError> {
    let problem = |problem: String| ConfigError::HostDir {
        path: given.to_owned(),
        problem,
    };
    let (dir, meta) = existing_dir(
        given,
        "owned by the service user with mode 0700 (for example with systemd RuntimeDirectory=)",
        "a symlinked host directory is refused, so the group cannot be redirected",
    )
    .map_err(problem)?;
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(problem(format!(
            "is owned by uid {}, not by this process's user (uid {uid}); every process of a \
             host group must run as the directory's owner",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(problem(format!(
            "is writable by group or others (mode {:o}): they could replace the candidate lock \
             or forge the host record; chmod 700 it",
            meta.mode() & 0o7777
        )));
    }
    if let Err(errno) = nix::unistd::access(&dir, AccessFlags::W_OK | AccessFlags::X_OK) {
        return Err(problem(format!(
            "is not writable by this process ({errno})"
        )));
    }
    let fs = statfs::statfs(&dir)
        .map_err(|errno| problem(format!("cannot tell its file system ({errno})")))?;
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    let magic = i64::from(fs.filesystem_type().0 as i64) & 0xFFFF_FFFF;
    if let Some((_, name)) = NETWORK_FILE_SYSTEMS.iter().find(|(m, _)| *m == magic) {
        return Err(problem(format!(
            "is on a network file system ({name}), where flock is emulated or local to one \
             client: two machines could each have a host candidate; use a local directory \
             (tmpfs, a local disk, overlayfs)"
        )));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn private_local_directories_pass_and_others_are_named() {
        let base = tempfile::tempdir().unwrap();
        let ok = base.path().join("ok");
        fs::create_dir(&ok).unwrap();
        fs::set_permissions(&ok, fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(check(&ok).unwrap(), ok);

        let err = |p: &Path| check(p).unwrap_err().to_string();
        assert!(err(&base.path().join("missing")).contains("does not exist"));
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert!(err(&link).contains("symbolic link"), "{}", err(&link));
        let file = base.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(err(&file).contains("not a directory"));
        let open = base.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(err(&open).contains("writable by group or others"));
        let group = base.path().join("group");
        fs::create_dir(&group).unwrap();
        fs::set_permissions(&group, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(err(&group).contains("chmod 700"));
        assert!(err(Path::new("")).contains("empty"));
        if nix::unistd::geteuid().is_root() {
            let other = base.path().join("other");
            fs::create_dir(&other).unwrap();
            fs::set_permissions(&other, fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(&other, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            assert!(
                err(&other).contains("owned by uid 65534"),
                "{}",
                err(&other)
            );
        }
    }
}
