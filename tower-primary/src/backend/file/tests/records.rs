//! Damaged, oversized and stale records (state values, terms, holder records), stores with a
//! wrong term, and the holder watch.

use super::*;

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
