//! The lock file's inode: deleting or replacing the file makes `lost()` fire, and a waiter
//! blocked on a deleted inode does not become primary.

use super::*;

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
