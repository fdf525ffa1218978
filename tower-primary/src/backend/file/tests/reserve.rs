//! Reservations: only the reserved node takes the lock during the window, the others wait it
//! out (on the record, not in a `flock` loop), a reservation is written only by the live term.

use super::*;

fn reserved_path(dir: &Path) -> PathBuf {
    dir.join("jobs.reserved")
}

/// A waiter that is not the reserved node neither takes the lock nor fails during the window,
/// waits on the record (the grant is given back once, not retried in a loop), and takes the
/// lock once the window ran out, with a higher term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_waiter_waits_out_the_window_then_takes_the_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (open(tmp.path(), "jobs"), open(tmp.path(), "jobs"));
    let mut first = a.acquire(req("a")).await.unwrap();
    let window = Duration::from_millis(600);
    // Before the call: the window is timed from inside it.
    let reserved_at = Instant::now();
    first.reserve("x", window).await.unwrap();
    let term = first.term();
    first.release().await.unwrap();

    let mut waiting = b.acquire(req("b"));
    assert!((&mut waiting).now_or_never().is_none());
    counted(&b.inner.deferred, 1, "b's grant to be given back").await;
    assert!(
        tokio::time::timeout(window / 3, &mut waiting)
            .await
            .is_err(),
        "b took a lock reserved for x"
    );
    let second = within("b's grant after the window", waiting).await.unwrap();
    let waited = reserved_at.elapsed();
    assert!(waited >= window, "b took the lock after {waited:?}");
    assert!(second.term() > term);
    assert_eq!(
        *b.inner.deferred.borrow(),
        1,
        "the waiter waited on the record, not in a flock loop"
    );
    assert!(
        !reserved_path(tmp.path()).exists(),
        "the expired record is deleted"
    );
    second.release().await.unwrap();
}

/// The reserved node's waiter takes the lock as soon as it is free, under a higher term, and
/// consumes the reservation: another waiter, given back its grant, then waits for that holder
/// like any waiter and takes the lock after it without waiting for the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reserved_waiter_takes_the_lock_at_once_and_consumes_the_reservation() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        open(tmp.path(), "jobs"),
        open(tmp.path(), "jobs"),
        open(tmp.path(), "jobs"),
    );
    let mut first = a.acquire(req("a")).await.unwrap();
    let mut other = b.acquire(req("b"));
    let mut chosen = c.acquire(req("c"));
    assert!((&mut other).now_or_never().is_none());
    assert!((&mut chosen).now_or_never().is_none());
    counted(&b.inner.blocked, 1, "b to block in flock").await;
    counted(&c.inner.blocked, 1, "c to block in flock").await;

    let window = Duration::from_secs(30);
    first.reserve("c", window).await.unwrap();
    assert!(reserved_path(tmp.path()).exists());
    let term = first.term();
    let released_at = Instant::now();
    first.release().await.unwrap();
    let second = within("c's grant", chosen).await.unwrap();
    println!("reserved handover: {:?}", released_at.elapsed());
    assert!(
        released_at.elapsed() < window / 2,
        "c waited for the window"
    );
    assert!(second.term() > term);
    assert_eq!(second.holder().id, "c");
    assert!(
        !reserved_path(tmp.path()).exists(),
        "the reservation is consumed"
    );
    assert!((&mut other).now_or_never().is_none(), "b took c's lock");

    // c's release lets b in without waiting for the window.
    let third_term = second.term();
    second.release().await.unwrap();
    let third = within("b's grant after c", other).await.unwrap();
    assert!(third.term() > third_term);
    assert_eq!(third.holder().id, "b");
    third.release().await.unwrap();
}

/// A reservation is written only by the term that holds the lock: after the lock file was
/// replaced, `reserve` is refused, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_that_lost_the_lock_cannot_reserve() {
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "jobs");
    let mut first = a.acquire(req("a")).await.unwrap();
    fs::remove_file(tmp.path().join("jobs.lock")).unwrap();
    let err = first
        .reserve("x", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err}");
    let lost = within("the loss", first.lost()).await;
    assert!(matches!(lost, Error::Lost { .. }), "{lost}");
    let err = first
        .reserve("x", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err}");
    assert!(!reserved_path(tmp.path()).exists());

    // A term this object no longer holds: StaleTerm.
    let b = open(tmp.path(), "jobs");
    let second = b.acquire(req("b")).await.unwrap();
    let err = a
        .inner
        .write_reservation(
            first.term(),
            FileId { dev: 0, ino: 0 },
            "x",
            Duration::from_secs(5),
        )
        .unwrap_err();
    assert!(matches!(err, Error::StaleTerm { .. }), "{err}");
    assert!(!reserved_path(tmp.path()).exists());
    second.release().await.unwrap();
}

/// A record of an earlier boot (whose clock started again) or a damaged one does not hold
/// anybody back; a later reservation replaces an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_or_damaged_records_do_not_hold_waiters_back() {
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "jobs");
    let record = serde_json::json!({
        "node": "x", "until_ns": u64::MAX, "term": 1, "boot": "an-earlier-boot"
    });
    fs::write(reserved_path(tmp.path()), record.to_string()).unwrap();
    let mut lease = within("a's grant", a.acquire(req("a"))).await.unwrap();
    assert!(!reserved_path(tmp.path()).exists());

    lease.reserve("x", Duration::from_secs(60)).await.unwrap();
    lease.reserve("a", Duration::from_secs(60)).await.unwrap();
    lease.release().await.unwrap();
    // The later reservation (for a) replaced the one for x.
    within("a's grant", a.acquire(req("a")))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    fs::write(reserved_path(tmp.path()), b"{not json").unwrap();
    within("a's grant", a.acquire(req("a")))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert!(!reserved_path(tmp.path()).exists());
}

/// Prints the time from `reserve` + `release` to the reserved node's acquire returning, with
/// another node waiting too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_handover_time_is_measured() {
    let mut dirs = vec![("temp dir", tempfile::tempdir().unwrap())];
    if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
        dirs.push(("tmpfs /dev/shm", shm));
    }
    for (what, tmp) in dirs {
        let (a, c) = (open(tmp.path(), "jobs"), open(tmp.path(), "jobs"));
        let mut times = Vec::new();
        let mut last = 0;
        for round in 0..20u64 {
            let mut first = a.acquire(req("a")).await.unwrap();
            assert!(first.term() > last);
            // A new object each round: the waiting thread of the last round's given-up acquire
            // may still wait in flock, and would not count as blocking again.
            let b = open(tmp.path(), "jobs");
            let mut other = b.acquire(req("b"));
            let mut chosen = c.acquire(req("c"));
            assert!((&mut other).now_or_never().is_none());
            assert!((&mut chosen).now_or_never().is_none());
            counted(&b.inner.blocked, 1, "b to block in flock").await;
            counted(&c.inner.blocked, round + 1, "c to block in flock").await;
            let started = Instant::now();
            first.reserve("c", Duration::from_secs(2)).await.unwrap();
            first.release().await.unwrap();
            let second = within("c's grant", chosen).await.unwrap();
            times.push(started.elapsed());
            assert_eq!(second.holder().id, "c");
            drop(other);
            last = second.term();
            second.release().await.unwrap();
        }
        times.sort();
        println!(
            "reserve + release -> reserved node's acquire on {what}: p50 {:?}, p99 {:?}, \
             min {:?}, max {:?} (n = {})",
            times[times.len() / 2],
            times[(times.len() * 99).div_ceil(100) - 1],
            times[0],
            times[times.len() - 1],
            times.len()
        );
    }
}

/// End to end on the elector: a ready node of higher priority that joins gets the lock handed
/// over (registry, reservation, release), under a higher term, and the former primary follows
/// it; with a third, lower node waiting, which must not take the reserved lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elector_hands_the_lock_to_a_higher_priority_node() {
    use crate::{Elector, FileBackend, NodeId};
    let tmp = tempfile::tempdir().unwrap();
    let spawn = |node: &str, priority: u64| {
        Elector::builder("jobs")
            .backend(FileBackend::new(tmp.path()))
            .node(NodeId::new(node))
            .priority(priority)
            .settle_time(Duration::from_millis(10))
            .spawn()
            .unwrap()
    };
    let low = spawn("low", 1);
    let term = within("low to lead", low.handle().wait_primary())
        .await
        .term();
    let lowest = spawn("lowest", 0);
    let high = spawn("high", 2);
    let ctx = within("the handover to high", high.handle().wait_primary()).await;
    assert!(ctx.term() > term);
    assert!(!lowest.handle().is_primary());
    within("low to follow high", async {
        let mut role = low.handle();
        while role.holder().is_none_or(|h| h.id != "high") {
            role.changed().await;
        }
    })
    .await;
    assert!(!low.handle().is_primary());
    high.shutdown().await;
    lowest.shutdown().await;
    low.shutdown().await;
}
