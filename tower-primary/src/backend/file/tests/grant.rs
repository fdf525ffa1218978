//! Grants and handovers: a waiter gets the lock on release, terms rise, a cancelled acquire does
//! not leak the lock, child processes do not inherit it.

use super::*;

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
    println!("handover after release: {handover:?} (term write, holder record, fsyncs included)");
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
