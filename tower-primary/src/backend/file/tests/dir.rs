//! The lock directory: refused when missing, symlinked, not a directory or not writable; the lock
//! file is private and outlives a release.

use super::*;

#[test]
fn symlinked_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    for given in [link.clone(), link.join("")] {
        let problem = lock_dir_problem(FileBackend::new(&given).lock("jobs"));
        assert!(problem.contains("symbolic link"), "{problem}");
    }
    assert!(!real.join("jobs.lock").exists());
    FileBackend::new(&real).lock("jobs").unwrap();
}

#[test]
fn missing_dir_and_non_directories_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let problem = lock_dir_problem(FileBackend::new(tmp.path().join("nope")).lock("jobs"));
    assert!(problem.contains("does not exist"), "{problem}");

    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    let problem = lock_dir_problem(FileBackend::new(&file).lock("jobs"));
    assert!(problem.contains("not a directory"), "{problem}");

    let problem = lock_dir_problem(FileBackend::new("").lock("jobs"));
    assert!(problem.contains("empty"), "{problem}");

    // The lock file itself must not be a symbolic link.
    std::os::unix::fs::symlink(&file, tmp.path().join("jobs.lock")).unwrap();
    let problem = lock_dir_problem(FileBackend::new(tmp.path()).lock("jobs"));
    assert!(problem.contains("symbolic link"), "{problem}");

    let err = FileBackend::new(tmp.path()).lock("../escape").unwrap_err();
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
    let result = FileBackend::new(&dir).lock("jobs");
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
        let problem = lock_dir_problem(FileBackend::new("/sys").lock("tower-primary-test"));
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
