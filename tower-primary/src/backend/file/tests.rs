//! Unit tests of the file backend: directory checks, handovers, cancelled and stalled
//! operations, damaged records, terms, the holder record and state values.

use std::future::Future;
use std::time::Instant;

use futures_util::FutureExt as _;

use super::*;
use crate::role::NodeId;

const PATIENCE: Duration = Duration::from_secs(10);

fn req(id: &str) -> AcquireRequest {
    AcquireRequest::new(NodeId::new(id))
}

fn open(dir: &Path, name: &str) -> DirLock {
    FileBackend::new(dir).open(name).unwrap()
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Waits until a test counter reaches `n`.
async fn counted(tx: &watch::Sender<u64>, n: u64, what: &str) {
    let mut rx = tx.subscribe();
    within(what, rx.wait_for(|v| *v >= n)).await.unwrap();
}

fn lock_dir_problem(result: Result<Arc<dyn Lock>, ConfigError>) -> String {
    match result {
        Err(ConfigError::LockDir { problem, .. }) => problem,
        other => panic!("expected a lock directory error, got {other:?}"),
    }
}

/// Captures warnings, also from the acquiring thread (it inherits the dispatcher).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }
}

/// A disk that stalls on demand: the named operations wait in [`pass`](Self::pass) until
/// [`free`](Self::free) (or, so that a runtime blocked by one cannot hang a test, until
/// `PATIENCE` is over).
pub(super) struct SlowDisk {
    /// The stalled operations, and how many calls wait in a stall now.
    stalled: Mutex<(Vec<&'static str>, usize)>,
    freed: std::sync::Condvar,
    /// Operations that reached a stall.
    stalls: watch::Sender<u64>,
}

impl SlowDisk {
    pub(super) fn new() -> Self {
        SlowDisk {
            stalled: Mutex::new((Vec::new(), 0)),
            freed: std::sync::Condvar::new(),
            stalls: watch::channel(0).0,
        }
    }

    pub(super) fn pass(&self, op: &'static str) {
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

/// State files that are damaged, too large or not files at all are reported as corrupt;
/// nothing larger than the maximum is read into memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbled_state_values_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "jobs");
    let dir = &a.inner.paths.state_dir;
    let corrupt = |r: Result<Option<Stored>, Error>| match r {
        Err(Error::Corrupt { what, problem, .. }) => format!("{what}: {problem}"),
        Err(other) => panic!("expected a corrupt-record error, got {other:?}"),
        Ok(v) => panic!(
            "expected a corrupt-record error, got a value of {:?} bytes",
            v.map(|s| s.value.len())
        ),
    };

    // A header that claims, and a (sparse) file that holds, far more than the maximum.
    let big = 4 * MAX_STATE_VALUE as u64;
    let mut header = format!("{STATE_MAGIC} 1 7 {big}\n").into_bytes();
    let f = File::create(dir.join("big")).unwrap();
    f.write_all_at(&header, 0).unwrap();
    f.set_len(header.len() as u64 + big).unwrap();
    let problem = corrupt(a.load("big").await);
    assert!(
        problem.contains("big") && problem.contains("larger"),
        "{problem}"
    );

    // An honest header, but more bytes than it says.
    header = format!("{STATE_MAGIC} 1 7 3\n").into_bytes();
    f.write_all_at(&header, 0).unwrap();
    let problem = corrupt(a.load("big").await);
    assert!(
        problem.contains("larger") || problem.contains("holds"),
        "{problem}"
    );

    for (key, bytes) in [
        (
            "garbled",
            &b"\x00\xff\xfe garbage without a header line"[..],
        ),
        ("no-magic", &b"something-else 1 7 1\nx"[..]),
        ("short", &b"tower-primary-state 1 7 99\nshort"[..]),
        ("bad-term", &b"tower-primary-state 1 -7 1\nx"[..]),
        ("empty", &b""[..]),
    ] {
        fs::write(dir.join(key), bytes).unwrap();
        let problem = corrupt(a.load(key).await);
        assert!(problem.contains(key), "{problem}");
    }

    // A FIFO would block a reader for ever; it is refused at once.
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let unblock = std::thread::spawn({
        let fifo = fifo.clone();
        move || {
            // Only a safety net for a reader stuck in open(2), so the test ends.
            std::thread::sleep(PATIENCE);
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(&fifo);
        }
    });
    let started = Instant::now();
    let problem = corrupt(a.load("fifo").await);
    assert!(started.elapsed() < PATIENCE, "the FIFO blocked the load");
    assert!(problem.contains("regular file"), "{problem}");
    drop(unblock);

    // A store of more than the maximum is refused with a typed error, and stores nothing.
    let lease = a.acquire(req("a")).await.unwrap();
    let value = vec![b'x'; MAX_STATE_VALUE + 1];
    match a.store("k", &value, lease.term()).await {
        Err(Error::ValueTooLarge { key, size, max, .. }) => {
            assert_eq!(
                (key.as_str(), size, max),
                ("k", value.len() as u64, MAX_STATE_VALUE as u64)
            );
        }
        other => panic!("expected ValueTooLarge, got {:?}", other.err()),
    }
    assert_eq!(a.load("k").await.unwrap(), None);
    let value = vec![b'y'; MAX_STATE_VALUE];
    a.store("k", &value, lease.term()).await.unwrap();
    assert_eq!(
        a.load("k").await.unwrap().unwrap().value.len(),
        MAX_STATE_VALUE
    );
    // A corrupt value is overwritten by the holder's next store.
    a.store("garbled", b"fixed", lease.term()).await.unwrap();
    assert_eq!(
        a.load("garbled").await.unwrap(),
        Some(Stored::new(b"fixed".to_vec(), lease.term()))
    );
    lease.release().await.unwrap();
}

/// A holder record that is damaged, too large or not a file is an error, not a holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbled_holder_records_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "jobs");
    let path = a.inner.paths.holder.clone();
    let corrupt = |r: Result<Option<Holder>, Error>| match r {
        Err(Error::Corrupt { what, problem, .. }) => format!("{what}: {problem}"),
        other => panic!("expected a corrupt-record error, got {other:?}"),
    };
    let f = File::create(&path).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    let problem = corrupt(a.holder().await);
    assert!(
        problem.contains("holder") && problem.contains("larger"),
        "{problem}"
    );

    fs::write(&path, b"{\"id\": \"x\", \"term\": ").unwrap();
    let problem = corrupt(a.holder().await);
    assert!(problem.contains("holder"), "{problem}");

    fs::remove_file(&path).unwrap();
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let problem = corrupt(within("holder() on a FIFO", a.holder()).await);
    assert!(problem.contains("regular file"), "{problem}");

    // The next holder replaces whatever is there, and its term rises.
    fs::remove_file(&path).unwrap();
    fs::write(&path, vec![b'{'; 100_000]).unwrap();
    let lease = a.acquire(req("a")).await.unwrap();
    assert_eq!(a.holder().await.unwrap().as_ref(), Some(lease.holder()));
    lease.release().await.unwrap();
}

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

#[tokio::test]
async fn corrupt_term_and_holder_files_are_reported_and_a_higher_term_comes_out() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "jobs");
    let paths = &a.inner.paths;

    // A stored term ahead of the wall clock is followed exactly.
    let ahead = wall_micros() + 1_000_000_000_000;
    fs::write(&paths.lock, format!("{ahead:020}\n")).unwrap();
    let lease = a.acquire(req("a")).await.unwrap();
    assert_eq!(lease.term(), ahead + 1);
    lease.release().await.unwrap();

    // Corrupt term: the holder record's term is used.
    fs::write(&paths.lock, b"garbage!").unwrap();
    let mut record = Holder::new(&NodeId::new("old"), ahead + 10);
    record.pid = 0;
    fs::write(&paths.holder, serde_json::to_vec(&record).unwrap()).unwrap();
    let lease = a.acquire(req("a")).await.unwrap();
    assert_eq!(lease.term(), ahead + 11);
    lease.release().await.unwrap();
    assert!(logs.text().contains("corrupt term"), "{}", logs.text());

    // Corrupt term and corrupt holder record: the state values' terms are used.
    fs::write(&paths.lock, b"\0\0\0\0").unwrap();
    fs::write(&paths.holder, b"{not json").unwrap();
    fs::write(paths.state_dir.join("k"), encode_state(b"v", ahead + 20)).unwrap();
    let lease = a.acquire(req("a")).await.unwrap();
    assert_eq!(lease.term(), ahead + 21);
    assert!(
        logs.text().contains("corrupt holder record"),
        "{}",
        logs.text()
    );

    // Terms never go back below what the lock file now holds.
    lease.release().await.unwrap();
    fs::remove_file(paths.state_dir.join("k")).unwrap();
    let lease = a.acquire(req("a")).await.unwrap();
    assert_eq!(lease.term(), ahead + 22);
    lease.release().await.unwrap();
}

#[tokio::test]
async fn holder_rewrites_a_damaged_holder_record() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "jobs");
    let mut lease = a.acquire(req("a")).await.unwrap();
    let mine = lease.holder().clone();
    let mut changes = a.watch_holder().await.unwrap();
    fs::write(&a.inner.paths.holder, b"{\"id\": tru").unwrap();
    let err = a.holder().await.unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { what, .. } if what.contains("holder record")),
        "a corrupt record is an error: {err}"
    );
    let repaired = async {
        loop {
            // Until the rewrite, the damaged record reads as an error.
            if a.holder().await.ok().flatten().as_ref() == Some(&mine) {
                break;
            }
            changes.changed().await.unwrap();
        }
    };
    tokio::select! {
        err = lease.lost() => panic!("lost: {err}"),
        res = tokio::time::timeout(PATIENCE, repaired) => res.expect("the record was not rewritten"),
    }
    let text = logs.text();
    assert!(text.contains("corrupt holder record"), "{text}");
    assert!(text.contains("rewriting"), "{text}");

    // Deleted: rewritten too.
    fs::remove_file(&a.inner.paths.holder).unwrap();
    let repaired = async {
        loop {
            // Until the rewrite, the damaged record reads as an error.
            if a.holder().await.ok().flatten().as_ref() == Some(&mine) {
                break;
            }
            changes.changed().await.unwrap();
        }
    };
    tokio::select! {
        err = lease.lost() => panic!("lost: {err}"),
        res = tokio::time::timeout(PATIENCE, repaired) => res.expect("the record was not rewritten"),
    }
    lease.release().await.unwrap();
}

#[tokio::test]
async fn stale_holder_records_are_not_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "jobs");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();

    let mut record = Holder::new(&NodeId::new("ghost"), 5);
    record.pid = dead;
    fs::write(&a.inner.paths.holder, serde_json::to_vec(&record).unwrap()).unwrap();
    assert_eq!(
        a.holder().await.unwrap(),
        None,
        "the holder process has exited"
    );

    // Our own, live pid, but nobody holds the lock: left over.
    record.pid = std::process::id();
    fs::write(&a.inner.paths.holder, serde_json::to_vec(&record).unwrap()).unwrap();
    assert_eq!(a.holder().await.unwrap(), None, "nobody holds the lock");

    // Held: reported.
    let b = open(tmp.path(), "jobs");
    let lease = b.acquire(req("b")).await.unwrap();
    assert_eq!(a.holder().await.unwrap().as_ref(), Some(lease.holder()));
    lease.release().await.unwrap();
}

#[tokio::test]
async fn a_holder_in_another_pid_namespace_is_reported_while_it_holds_the_lock() {
    let Some(me) = crate::process::ProcessIdentity::current() else {
        return; // no /proc: nothing to compare
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "jobs");
    let b = open(tmp.path(), "jobs");
    let lease = b.acquire(req("b")).await.unwrap();

    // A holder on this host name but in another PID namespace (another container on one
    // volume): its pid means nothing here, so only the lock file can tell whether it holds.
    let mut record = lease.holder().clone();
    record.pid = 4_000_000; // above any pid_max: no process here has it
    let mut elsewhere = me.clone();
    elsewhere.pid_ns = me.pid_ns.wrapping_add(1);
    elsewhere.pid = record.pid;
    record.process = Some(elsewhere);
    fs::write(&a.inner.paths.holder, serde_json::to_vec(&record).unwrap()).unwrap();
    assert_eq!(
        a.holder().await.unwrap().map(|h| h.term),
        Some(record.term),
        "a holder that cannot be checked from here is reported while the lock is held"
    );

    // The same record in this namespace, with a pid that has exited: not reported.
    record.process = Some(crate::process::ProcessIdentity {
        pid: record.pid,
        ..me
    });
    fs::write(&a.inner.paths.holder, serde_json::to_vec(&record).unwrap()).unwrap();
    assert_eq!(
        a.holder().await.unwrap(),
        None,
        "the holder process has exited"
    );
    lease.release().await.unwrap();
}

#[tokio::test]
async fn state_store_with_a_wrong_or_stale_term_is_refused() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (open(tmp.path(), "jobs"), open(tmp.path(), "jobs"));
    let stale = |r: Result<(), Error>| match r {
        Err(Error::StaleTerm { current, .. }) => current,
        other => panic!("expected StaleTerm, got {other:?}"),
    };

    assert_eq!(
        stale(a.store("k", b"0", 1).await),
        None,
        "nobody holds the lock"
    );
    let first = a.acquire(req("a")).await.unwrap();
    let ta = first.term();
    a.store("k", b"1", ta).await.unwrap();
    assert_eq!(
        a.load("k").await.unwrap(),
        Some(Stored::new(b"1".to_vec(), ta))
    );
    assert_eq!(
        b.load("k").await.unwrap(),
        Some(Stored::new(b"1".to_vec(), ta))
    );
    assert_eq!(stale(a.store("k", b"2", ta + 1).await), Some(ta));
    assert_eq!(stale(a.store("k", b"2", ta - 1).await), Some(ta));
    stale(b.store("k", b"2", ta).await);
    assert!(a.store("bad/key", b"", ta).await.is_err());
    first.release().await.unwrap();
    stale(a.store("k", b"2", ta).await);

    let mut watch = a.watch_key("k").await.unwrap();
    let second = b.acquire(req("b")).await.unwrap();
    let tb = second.term();
    assert!(tb > ta);
    b.store("k", b"3", tb).await.unwrap();
    within("a state change", watch.changed()).await.unwrap();
    assert_eq!(
        a.load("k").await.unwrap(),
        Some(Stored::new(b"3".to_vec(), tb))
    );

    // A newer term has written the key: refused, naming it.
    let paths = &b.inner.paths;
    fs::write(paths.state_dir.join("k2"), encode_state(b"n", tb + 1000)).unwrap();
    assert_eq!(stale(b.store("k2", b"x", tb).await), Some(tb + 1000));

    // A corrupt value is an error, and is repaired by the next store.
    fs::write(
        paths.state_dir.join("k3"),
        b"tower-primary-state 1 7 99\nshort",
    )
    .unwrap();
    let err = b.load("k3").await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(
        logs.text().contains("corrupt state value"),
        "{}",
        logs.text()
    );
    b.store("k3", b"fixed", tb).await.unwrap();
    assert_eq!(
        b.load("k3").await.unwrap(),
        Some(Stored::new(b"fixed".to_vec(), tb))
    );
    second.release().await.unwrap();
    stale(b.store("k3", b"late", tb).await);
}

#[tokio::test]
async fn holder_watch_wakes_on_change() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (open(tmp.path(), "jobs"), open(tmp.path(), "jobs"));
    let mut changes = b.watch_holder().await.unwrap();
    assert_eq!(b.holder().await.unwrap(), None);

    let lease = a.acquire(req("a")).await.unwrap();
    let mine = lease.holder().clone();
    within("b to see a", async {
        while b.holder().await.unwrap().as_ref() != Some(&mine) {
            changes.changed().await.unwrap();
        }
    })
    .await;

    lease.release().await.unwrap();
    within("b to see no holder", async {
        while b.holder().await.unwrap().is_some() {
            changes.changed().await.unwrap();
        }
    })
    .await;
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
