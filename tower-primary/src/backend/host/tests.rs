//! Unit tests of host groups, on the memory backend in lease mode (a flock is between open
//! files, so two groups' locks in one process meet as two processes would). Processes that
//! really die, hang and exit are the integration tests' (`tests/host_groups.rs`).

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::Duration;

use super::lock::Group;
use super::record::{Files, Heartbeat, HostRecord};
use super::*;
use crate::backend::{AcquireRequest, Candidate, memory::MemoryBackend};
use crate::clock::Clock;
use crate::process::ProcessIdentity;
use crate::role::NodeId;

const LEASE: Duration = Duration::from_secs(60);

fn host_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn request(node: &str) -> AcquireRequest {
    AcquireRequest::new(NodeId::new(node)).with_lease(Some(Lease::new(LEASE)))
}

fn group_lock(server: &MemoryBackend, dir: &tempfile::TempDir) -> Arc<dyn Lock> {
    HostGroup::new(server.clone(), dir.path())
        .lock("jobs")
        .unwrap()
}

/// A host directory, a lease server, and the locks of two processes of the group on it.
fn two_processes() -> (
    tempfile::TempDir,
    MemoryBackend,
    Arc<dyn Lock>,
    Arc<dyn Lock>,
) {
    let dir = host_dir();
    let server = MemoryBackend::new().with_lease();
    let a = group_lock(&server, &dir);
    let b = group_lock(&server, &dir);
    (dir, server, a, b)
}

/// A pid that no process has: a child that was reaped.
fn dead_process() -> ProcessIdentity {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let mut dead = ProcessIdentity::current().unwrap();
    dead.pid = pid;
    dead
}

/// The holder the server's own lock names (the inner backend, not the mirrors).
async fn inner_holder(server: &MemoryBackend) -> Option<crate::role::Holder> {
    server.lock("jobs").unwrap().holder().await.unwrap()
}

/// A group's shared state for the lock `jobs`, as a process of the group would have it.
fn group(server: &MemoryBackend, dir: &tempfile::TempDir) -> Group {
    Group::new(
        Files::new(dir.path(), "jobs"),
        server.address(),
        "memory",
        server.lock("jobs").unwrap(),
        FileBackend::host_candidate(dir.path())
            .lock("jobs")
            .unwrap(),
        dir.path().to_owned(),
    )
}

/// The `.host` record, which must be there.
fn host_record(files: &Files) -> HostRecord {
    let super::record::Read::Found(record) = files.read_host().unwrap() else {
        panic!("no host record");
    };
    record
}

/// Rewrites `.host` as `edit` says.
fn edit_host(dir: &tempfile::TempDir, edit: impl FnOnce(&mut HostRecord)) {
    let files = Files::new(dir.path(), "jobs");
    let mut record = host_record(&files);
    edit(&mut record);
    files.write_host(&record).unwrap();
}

/// Checks, then waits for the next change, until the check answers (at most 10 s).
async fn until<T>(
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
    mut changed: impl AsyncFnMut(),
) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            changed().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within 10 s"))
}

/// Wakes at changes of the announcements of waiting processes.
fn announcements(dir: &tempfile::TempDir) -> super::wake::Wake {
    super::wake::Wake::subscribe(dir.path(), "jobs.sibling.")
}

#[tokio::test]
async fn one_candidate_talks_to_the_server_and_followers_read_its_mirrors() {
    let dir = host_dir();
    let server = MemoryBackend::new().with_lease();
    let a = group_lock(&server, &dir);
    // The follower's connection fails every call: it must never need it.
    let offline = server.connection();
    offline.faults().set_failing(true);
    let b = group_lock(&offline, &dir);

    let term = a.acquire(request("a")).await.unwrap();
    assert_eq!(term.holder().id, "a");
    a.store("progress", b"1", term.term()).await.unwrap();

    let mut holders = b.watch_holder().await.unwrap();
    let holder = until(
        "the follower reads the holder",
        async || b.holder().await.unwrap().filter(|h| h.id == "a"),
        async || holders.changed().await.unwrap(),
    )
    .await;
    assert_eq!(holder.term, term.term());
    let mut changes = b.watch_key("progress").await.unwrap();
    let loaded = b.load("progress").await.unwrap().unwrap();
    assert_eq!(
        (loaded.value.as_slice(), loaded.term),
        (&b"1"[..], term.term())
    );
    a.store("progress", b"2", term.term()).await.unwrap();
    until(
        "the follower reads the new value",
        async || {
            b.load("progress")
                .await
                .unwrap()
                .filter(|s| s.value == b"2")
        },
        async || changes.changed().await.unwrap(),
    )
    .await;
    assert!(b.load("never-stored").await.unwrap().is_none());
    let long = "k".repeat(200);
    assert!(b.load(&long).await.is_err());

    // The follower waits for the candidate lock.
    let waiting = tokio::time::timeout(Duration::from_millis(100), b.acquire(request("b"))).await;
    assert!(waiting.is_err());
    term.release().await.unwrap();
}

#[tokio::test]
async fn a_dead_candidate_s_lease_is_resumed_at_once_with_a_higher_term() {
    let (dir, server, a, b) = two_processes();
    let first = a.acquire(request("a")).await.unwrap();
    let first_term = first.term();
    // The candidate "dies": its leadership stops renewing without a release, and its process
    // is certified gone.
    drop(first);
    edit_host(&dir, |r| r.candidate = Some(dead_process()));

    // Without a resume, this would wait for the 60 s lease.
    let second = tokio::time::timeout(Duration::from_secs(10), b.acquire(request("b")))
        .await
        .expect("resumed at once")
        .unwrap();
    assert!(second.term() > first_term);
    assert_eq!(second.holder().id, "b");
    assert_eq!(inner_holder(&server).await.unwrap().id, "b");
    let files = Files::new(dir.path(), "jobs");
    let record = host_record(&files);
    assert_eq!(record.term, Some(second.term()));
    assert_eq!(record.candidate, ProcessIdentity::current());
    assert!(!record.released);
    second.release().await.unwrap();
}

#[tokio::test]
async fn without_a_certificate_the_lease_is_not_resumed() {
    let (_dir, _server, a, b) = two_processes();
    // The record names this (live) process: no certificate, so b waits for the lease.
    drop(a.acquire(request("a")).await.unwrap());
    let waiting = tokio::time::timeout(Duration::from_millis(300), b.acquire(request("b"))).await;
    assert!(waiting.is_err());
}

#[tokio::test]
async fn the_host_record_decides_whether_to_resume() {
    let dir = host_dir();
    let server = MemoryBackend::new().with_lease();
    let a = group_lock(&server, &dir);
    drop(a.acquire(request("a")).await.unwrap());
    let group = group(&server, &dir);
    let req = request("b");
    let dead = dead_process();
    edit_host(&dir, |r| r.candidate = Some(dead.clone()));
    assert!(group.resumable(&req).await.is_some(), "a death certificate");

    for (what, edit) in [
        (
            "another address",
            Box::new(|r: &mut HostRecord| r.address = "redis://elsewhere".into())
                as Box<dyn Fn(&mut HostRecord)>,
        ),
        (
            "another lock",
            Box::new(|r: &mut HostRecord| r.lock = "other".into()),
        ),
        (
            "another lease",
            Box::new(|r: &mut HostRecord| r.lease_ms = Some(1)),
        ),
        (
            "an earlier boot",
            Box::new(|r: &mut HostRecord| r.boot_id = "earlier".into()),
        ),
        ("no token", Box::new(|r: &mut HostRecord| r.token = None)),
        (
            "a live candidate",
            Box::new(|r: &mut HostRecord| r.candidate = ProcessIdentity::current()),
        ),
    ] {
        edit_host(&dir, |r| {
            r.candidate = Some(dead.clone());
            edit(r);
        });
        assert!(group.resumable(&req).await.is_none(), "{what}");
        edit_host(&dir, |r| {
            *r = group.record(&request("a"), None, false);
            r.token = Some("1".into());
            r.candidate = Some(dead.clone());
        });
    }
    // A live candidate that passed its lease on at exit.
    edit_host(&dir, |r| {
        r.candidate = ProcessIdentity::current();
        r.released = true;
    });
    assert!(group.resumable(&req).await.is_some(), "a handover mark");
    fs::write(dir.path().join("jobs.host"), b"{not json").unwrap();
    assert!(group.resumable(&req).await.is_none(), "a corrupt record");
}

#[tokio::test]
async fn exit_passes_the_lease_to_a_waiting_sibling() {
    let (dir, server, a, b) = two_processes();
    let first = a.acquire(request("a")).await.unwrap();
    let first_term = first.term();
    let mut announced = announcements(&dir);
    let waiting = tokio::spawn(async move { b.acquire(request("b")).await });
    // b announces itself while it waits.
    until(
        "the sibling announces itself",
        async || {
            Files::new(dir.path(), "jobs")
                .live_sibling(ProcessIdentity::current().as_ref())
                .then_some(())
        },
        async || announced.changed().await,
    )
    .await;
    first.release_for(Release::Exit).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the sibling took the lease over")
        .unwrap()
        .unwrap();
    assert!(second.term() > first_term);
    assert_eq!(inner_holder(&server).await.unwrap().id, "b");
    second.release().await.unwrap();
    assert!(inner_holder(&server).await.is_none());
}

#[tokio::test]
async fn exit_without_a_taker_releases_to_the_backend() {
    let dir = host_dir();
    let server = MemoryBackend::new().with_lease();
    let a = group_lock(&server, &dir);
    // Alone: released at once.
    let first = a.acquire(request("a")).await.unwrap();
    first.release_for(Release::Exit).await.unwrap();
    assert!(inner_holder(&server).await.is_none());

    // A sibling that announces itself but never takes the lock: after the bound, the exiting
    // candidate takes the candidate lock back and releases the lease.
    let second = a.acquire(request("a")).await.unwrap();
    let files = Files::new(dir.path(), "jobs");
    let _never = files.announce(ProcessIdentity::current().as_ref()).unwrap();
    second.release_for(Release::Exit).await.unwrap();
    assert!(inner_holder(&server).await.is_none());
    let record = host_record(&files);
    assert!(!record.released && record.token.is_none(), "{record:?}");
}

#[tokio::test]
async fn step_down_releases_to_the_backend_and_the_next_candidate_campaigns() {
    let (_dir, _server, a, b) = two_processes();
    let first = a.acquire(request("a")).await.unwrap();
    let waiting = tokio::spawn(async move { b.acquire(request("b")).await });
    first.release_for(Release::StepDown).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.holder().id, "b");
    second.release().await.unwrap();
}

/// The heartbeat logic on tokio's paused clock: a candidate whose heartbeat is older than its
/// lease and a half, and which still holds the candidate lock, gets its candidate file replaced.
#[tokio::test(start_paused = true)]
async fn a_hung_candidate_s_file_is_replaced_once_its_heartbeat_is_stale() {
    let dir = host_dir();
    let server = MemoryBackend::new().with_lease();
    let _prepare = group_lock(&server, &dir);
    let group = group(&server, &dir);
    let clock = Clock::tokio();
    let req = request("b").with_clock(clock);
    // The "hung" candidate holds the candidate lock.
    let held = fs::File::open(dir.path().join("jobs.candidate")).unwrap();
    held.lock().unwrap();
    let before = group.candidate_inode();

    // A heartbeat from the future is never stale.
    let beat = |at_ns| Heartbeat {
        candidate: ProcessIdentity::current(),
        at_ns,
    };
    group.files.write_heartbeat(&beat(u64::MAX / 2)).unwrap();
    let well = tokio::time::timeout(LEASE * 10, group.watch_hung(before, &req)).await;
    assert!(well.is_err(), "a well candidate is left alone");
    assert_eq!(group.candidate_inode(), before);

    // A heartbeat that stopped now: stale after the lease and a half.
    group
        .files
        .write_heartbeat(&beat(clock.now().as_nanos()))
        .unwrap();
    let started = tokio::time::Instant::now();
    assert!(group.watch_hung(before, &req).await);
    let waited = started.elapsed();
    assert!(
        waited > LEASE + LEASE / 2 && waited <= LEASE * 2,
        "{waited:?}"
    );
    assert_ne!(group.candidate_inode(), before);
    // Another waiter sees the new file and moves to it, without replacing it again.
    let after = group.candidate_inode();
    assert!(!group.watch_hung(before, &req).await);
    assert_eq!(group.candidate_inode(), after);
}

#[tokio::test]
async fn a_newcomer_on_another_backend_is_refused_while_the_candidate_lives() {
    let dir = host_dir();
    let server = MemoryBackend::new().with_lease();
    let a = group_lock(&server, &dir);
    let term = a.acquire(request("a")).await.unwrap();
    edit_host(&dir, |r| r.address = "redis://127.0.0.1:6379/0".into());
    let err = HostGroup::new(server.clone(), dir.path())
        .lock("jobs")
        .unwrap_err();
    assert!(matches!(err, ConfigError::HostDir { .. }), "{err}");
    assert!(err.to_string().contains("campaigns on redis://"), "{err}");
    // Once that candidate is gone, the newcomer starts afresh.
    edit_host(&dir, |r| r.candidate = Some(dead_process()));
    HostGroup::new(server.clone(), dir.path())
        .lock("jobs")
        .unwrap();
    term.release().await.unwrap();
}

#[test]
fn the_builder_wraps_server_backends_only() {
    let dir = host_dir();
    let memory: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let kept = wrap(memory, Some(dir.path().to_owned()), "jobs");
    assert!(format!("{kept:?}").starts_with("MemoryBackend"), "{kept:?}");
    let grouped: Arc<dyn Backend> = Arc::new(HostGroup::new(MemoryBackend::new(), dir.path()));
    let once = wrap(grouped, Some(dir.path().to_owned()), "jobs");
    assert!(
        format!("{once:?}").starts_with("HostGroup { inner: MemoryBackend"),
        "{once:?}"
    );
}

/// Through the elector: the follower is secondary and names the candidate as the holder; the
/// candidate's shutdown passes the lease to it (the elector releases with `Release::Exit`).
#[tokio::test]
async fn electors_follow_the_candidate_and_its_shutdown_hands_over() {
    let dir = host_dir();
    let server = MemoryBackend::new().with_lease();
    let elector = |node: &str, backend: MemoryBackend| {
        crate::Elector::builder("jobs")
            .backend(HostGroup::new(backend, dir.path()))
            .node(NodeId::new(node))
            .lease(Lease::new(LEASE))
            .spawn()
            .unwrap()
    };
    let a = elector("a", server.connection());
    let first = a.handle().wait_primary().await.term();
    let offline = server.connection();
    offline.faults().set_failing(true);
    let b = elector("b", offline.clone());
    let follower = b.handle();
    let mut roles = b.handle();
    until(
        "the follower names the candidate",
        async || follower.holder().filter(|h| h.id == "a"),
        async || {
            roles.changed().await;
        },
    )
    .await;
    assert!(!follower.is_primary());

    offline.faults().set_failing(false);
    a.shutdown().await;
    let second = tokio::time::timeout(Duration::from_secs(10), b.handle().wait_primary())
        .await
        .expect("handed over well before the 60 s lease ran out")
        .term();
    assert!(second > first);
    b.shutdown().await;
    assert!(inner_holder(&server).await.is_none());
}

#[tokio::test]
async fn a_waiting_process_is_announced_only_while_it_waits() {
    let (dir, _server, a, b) = two_processes();
    let files = Files::new(dir.path(), "jobs");
    let me = ProcessIdentity::current();
    let term = a.acquire(request("a")).await.unwrap();
    assert!(
        !files.live_sibling(me.as_ref()),
        "the candidate does not announce itself"
    );
    let mut announced = announcements(&dir);
    let waiting = tokio::spawn(async move { b.acquire(request("b")).await });
    until(
        "the waiting process announces itself",
        async || files.live_sibling(me.as_ref()).then_some(()),
        async || announced.changed().await,
    )
    .await;
    // A process that stops waiting (its elector shuts down) is no sibling any more.
    waiting.abort();
    let _ = waiting.await;
    assert!(!files.live_sibling(me.as_ref()));
    // The announcement of a process that is gone is no sibling either, and is cleaned up.
    let stale = dir.path().join("jobs.sibling.1.0");
    fs::write(&stale, serde_json::to_vec(&Some(dead_process())).unwrap()).unwrap();
    assert!(!files.live_sibling(me.as_ref()));
    assert!(!stale.exists());
    term.release().await.unwrap();
}

/// What a stopped candidate finds when it runs again after a follower replaced its candidate
/// file: its term reads as lost, its release leaves `.host` alone, and the waiting processes
/// move to the new file.
#[tokio::test]
async fn a_replaced_candidate_loses_its_term_and_the_waiters_move_to_the_new_file() {
    let (dir, _server, a, b) = two_processes();
    let short = |node: &str| {
        AcquireRequest::new(NodeId::new(node)).with_lease(Some(Lease::new(Duration::from_secs(3))))
    };
    let mut first = a.acquire(short("a")).await.unwrap();
    let waiting = tokio::spawn(async move { b.acquire(short("b")).await });
    let files = Files::new(dir.path(), "jobs");
    crate::backend::file::write_atomic(dir.path(), &files.candidate_name, b"", true).unwrap();
    let lost = tokio::time::timeout(Duration::from_secs(10), first.lost())
        .await
        .expect("the replaced candidate notices");
    assert!(matches!(lost, crate::Error::Lost { .. }), "{lost}");
    let before = fs::read(&files.host).unwrap();
    first.release().await.unwrap();
    // The waiter may already lead on the new file (and write .host); the replaced candidate
    // never does.
    let after = fs::read(&files.host).unwrap();
    let record: HostRecord = serde_json::from_slice(&after).unwrap();
    assert!(
        after == before || record.node == "b",
        "a replaced candidate never writes .host"
    );
    let second = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter moved to the new candidate file")
        .unwrap()
        .unwrap();
    assert_eq!(second.holder().id, "b");
    second.release().await.unwrap();
}

#[tokio::test]
async fn a_late_write_of_a_replaced_candidate_is_written_over() {
    let (dir, _server, a, b) = two_processes();
    let term = a.acquire(request("a")).await.unwrap();
    let mut holders = b.watch_holder().await.unwrap();
    until(
        "the follower reads the candidate's holder",
        async || b.holder().await.unwrap().filter(|h| h.id == "a"),
        async || holders.changed().await.unwrap(),
    )
    .await;
    // A candidate stopped between its check and its write, replaced meanwhile, finishes the
    // write when it runs again: an older holder under an older candidate term.
    let mut stale = term.holder().clone();
    stale.id = "replaced".to_owned();
    stale.term = term.term() - 1;
    let bytes = crate::backend::file::encode_state(&serde_json::to_vec(&Some(stale)).unwrap(), 1);
    crate::backend::file::write_atomic(
        &dir.path().join("jobs.mirror"),
        std::ffi::OsStr::new(super::candidacy::holder_key()),
        &bytes,
        false,
    )
    .unwrap();
    until(
        "the candidate writes its holder back over the late write",
        async || b.holder().await.unwrap().filter(|h| h.id == "a"),
        async || holders.changed().await.unwrap(),
    )
    .await;
    term.release().await.unwrap();
}

/// The group is one entry in the server's registry, kept by the candidate: its node, the
/// highest priority among the ready members, ready while any member is; followers read the
/// server's registry (the group's entry and other nodes') from the candidate's mirror.
#[tokio::test]
async fn a_group_is_one_entry_in_the_registry_and_followers_read_it() {
    let (_dir, server, a, b) = two_processes();
    let server_lock = server.lock("jobs").unwrap();
    let mut server_changes = server_lock.watch_candidates().await.unwrap();
    let _w1 = a
        .register(Candidate::new("w1").with_priority(3), None)
        .await
        .unwrap();
    let w2 = b
        .register(Candidate::new("w2").with_priority(9), None)
        .await
        .unwrap();
    let _hidden = b
        .register(
            Candidate::new("w3").with_priority(50).with_ready(false),
            None,
        )
        .await
        .unwrap();
    // Nobody is the candidate yet: the members are not in the server's registry.
    assert!(server_lock.candidates().await.unwrap().is_empty());

    let term = a.acquire(request("w1")).await.unwrap();
    let server_entry = |priority: u64| vec![Candidate::new("w1").with_priority(priority)];
    until(
        "the group's entry with the best ready member's priority",
        async || (server_lock.candidates().await.unwrap() == server_entry(9)).then_some(()),
        async || server_changes.changed().await.unwrap(),
    )
    .await;

    // A member update changes the one entry.
    w2.update(Candidate::new("w2").with_priority(9).with_draining(true))
        .await
        .unwrap();
    until(
        "the entry without the draining member",
        async || (server_lock.candidates().await.unwrap() == server_entry(3)).then_some(()),
        async || server_changes.changed().await.unwrap(),
    )
    .await;

    // Another node registers on the server; the follower reads both from the mirror.
    let _other = server_lock
        .register(Candidate::new("elsewhere").with_priority(1), None)
        .await
        .unwrap();
    let mut follower_changes = b.watch_candidates().await.unwrap();
    let expected = vec![
        Candidate::new("elsewhere").with_priority(1),
        Candidate::new("w1").with_priority(3),
    ];
    until(
        "the follower to read the server's registry",
        async || {
            let mut read = b.candidates().await.unwrap();
            read.sort_by(|x, y| x.node.cmp(&y.node));
            (read == expected).then_some(())
        },
        async || follower_changes.changed().await.unwrap(),
    )
    .await;
    // On the candidate: the server's registry itself.
    assert_eq!(a.candidates().await.unwrap().len(), 2);

    // The candidacy ends with the term: the group's entry is withdrawn.
    term.release().await.unwrap();
    until(
        "the group's entry to be withdrawn",
        async || {
            let read = server_lock.candidates().await.unwrap();
            (read == vec![Candidate::new("elsewhere").with_priority(1)]).then_some(())
        },
        async || server_changes.changed().await.unwrap(),
    )
    .await;
}

/// `reserve` passes to the server's lock: after the group's release, only the reserved node
/// takes the lock, with a higher term.
#[tokio::test]
async fn reserve_passes_to_the_inner_leadership() {
    let (_dir, server, a, _b) = two_processes();
    let mut term = a.acquire(request("w1")).await.unwrap();
    let first = term.term();
    term.reserve("chosen", Duration::from_secs(30))
        .await
        .unwrap();
    term.release().await.unwrap();

    let (other, chosen) = (server.lock("jobs").unwrap(), server.lock("jobs").unwrap());
    let mut other_acquire = other.acquire(request("other"));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut other_acquire)
            .await
            .is_err(),
        "a node the lock is not reserved for took it"
    );
    let taken = tokio::time::timeout(Duration::from_secs(5), chosen.acquire(request("chosen")))
        .await
        .expect("the reserved node waited")
        .unwrap();
    assert!(taken.term() > first);
    assert_eq!(taken.holder().id, "chosen");
}
