//! Operations stalled on the disk leave the runtime free; a release waits for a stalled store.

use super::*;

/// A disk that stalls on demand: the named operations wait in [`pass`](Self::pass) until
/// [`free`](Self::free) (or, so that a runtime blocked by one cannot hang a test, until
/// `PATIENCE` is over).
pub(in crate::backend::file) struct SlowDisk {
    /// The stalled operations, and how many calls wait in a stall now.
    stalled: Mutex<(Vec<&'static str>, usize)>,
    freed: std::sync::Condvar,
    /// Operations that reached a stall.
    stalls: watch::Sender<u64>,
}

impl SlowDisk {
    pub(in crate::backend::file) fn new() -> Self {
        SlowDisk {
            stalled: Mutex::new((Vec::new(), 0)),
            freed: std::sync::Condvar::new(),
            stalls: watch::channel(0).0,
        }
    }

    pub(in crate::backend::file) fn pass(&self, op: &'static str) {
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
