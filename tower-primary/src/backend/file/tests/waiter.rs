//! The waiter thread: dropping a runtime while an acquire waits returns at once.

use super::*;

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
