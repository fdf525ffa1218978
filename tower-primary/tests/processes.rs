//! Real processes on the file backend: SIGKILL, SIGTERM, SIGSTOP, a child process of the primary,
//! a deleted lock file and a symlinked lock directory.
//!
//! # How the nodes run
//!
//! This test binary re-executes itself. The `node_entry` test returns at once unless
//! `TOWER_PRIMARY_TEST_NODE=1` is set; then it runs
//! [`run_node_from_env`](tower_primary_lab::node::run_node_from_env), which never returns.
//! The parent side starts nodes as `<this binary> node_entry --exact --nocapture --test-threads=1
//! --quiet` ([`NodeCommand::test_entry`]) and reads the `EVENT` lines they print (protocol:
//! `tower_primary_lab::node`). Node logs (`tracing`, `RUST_LOG`, default `info`) go to the
//! node's stderr, which the parent keeps and prints when a wait times out.
//!
//! The tests take a shared lock and so run one at a time even without `--test-threads=1`: they
//! start many processes and this machine has two cores. They assert order and the absence of
//! overlapping primary periods; times are printed (`--nocapture` shows them), never asserted
//! tightly.
//!
//! ```text
//! cargo test --test processes -- --test-threads=1 --nocapture
//! ```

mod common;

use common::ms;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::{Mutex, MutexGuard};
use tower_primary::{ConfigError, Elector, FileBackend};
use tower_primary_lab::node::{
    Cluster, EventKind, EventLog, NodeCommand, NodeConfig, NodeSignal, ObservedRole, Succession,
};
use tower_primary_testing::history::{History, Period};

/// Generous: elections take milliseconds; this only bounds a broken run.
const WAIT: Duration = Duration::from_secs(20);

static SERIAL: Mutex<()> = Mutex::const_new(());

/// The node side of this binary (see the module docs).
#[test]
fn node_entry() {
    common::node_entry();
}

struct Setup {
    cluster: Cluster,
    dir: PathBuf,
    lock: String,
    // Dropped last: the nodes are killed (the cluster's drop) before the directory goes.
    _tmp: TempDir,
    _serial: MutexGuard<'static, ()>,
}

async fn setup(lock: &str, configure: impl FnOnce(NodeConfig) -> NodeConfig) -> Setup {
    let serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().to_path_buf();
    let config = configure(NodeConfig::new(path_str(&dir), lock));
    let command = NodeCommand::test_entry("node_entry").expect("the test binary's path");
    Setup {
        cluster: Cluster::new(command, config),
        dir,
        lock: lock.to_owned(),
        _tmp: tmp,
        _serial: serial,
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("a UTF-8 temporary path").to_owned()
}

/// (pid, term) of a period of [`Cluster::history`], whose node ids are pids.
fn holder(p: &Period) -> (u32, u64) {
    (p.node.parse().expect("a pid"), p.term)
}

#[tokio::test]
async fn eight_nodes_elect_exactly_one_primary() {
    let mut s = setup("eight-nodes", |c| c).await;
    s.cluster.spawn_nodes(8).unwrap();
    let (pid, term) = s.cluster.wait_settled(WAIT).await.unwrap();

    let history = s.cluster.history();
    let periods = history.periods();
    assert_eq!(periods.len(), 1, "{}", s.cluster.dump());
    assert_eq!(holder(&periods[0]), (pid, term));
    let states = s.cluster.states();
    assert_eq!(states.len(), 8);
    let secondaries = states
        .values()
        .filter(|st| {
            st.role
                == Some(ObservedRole::Secondary {
                    holder_term: Some(term),
                })
        })
        .count();
    assert_eq!(secondaries, 7, "{}", s.cluster.dump());
    s.cluster.assert_history_ok();
}

#[tokio::test]
async fn secondary_takes_over_with_a_higher_term_when_primary_is_killed() {
    let mut s = setup("sigkill", |c| c).await;
    s.cluster.spawn_nodes(3).unwrap();
    let failover = s.cluster.kill_primary(WAIT).await;
    let start = s
        .cluster
        .wait_task_start_after(failover.term, failover.old, WAIT)
        .await
        .unwrap();
    eprintln!(
        "SIGKILL → successor primary {:.3} ms, task start {:.3} ms",
        ms(failover.signalled_at, failover.next.at),
        ms(failover.signalled_at, start.at)
    );
}

#[tokio::test]
async fn terminated_primary_hands_over_before_it_exits() {
    let mut s = setup("sigterm", |c| c).await;
    s.cluster.spawn_nodes(3).unwrap();
    let handover = s.cluster.terminate_primary(WAIT).await;
    let Succession {
        old,
        term,
        signalled_at: sent_at,
        ref next,
        ..
    } = handover.succession;
    let (cancelled, released) = (handover.cancelled, handover.released);

    let at = |what: &str, pred: &dyn Fn(&EventKind) -> bool| {
        s.cluster
            .first_event(old, sent_at, pred)
            .unwrap_or_else(|| panic!("pid {old} logged no {what}\n{}", s.cluster.dump()))
            .at
    };
    let sigterm = at("sigterm", &|k| matches!(k, EventKind::SigTerm));
    let exit = at("exit 0", &|k| matches!(k, EventKind::Exit { code: 0 }));
    let successor_task = s
        .cluster
        .wait_task_start_after(term, old, WAIT)
        .await
        .unwrap();
    // The old node winds its term down and releases before anyone else acts as primary.
    assert!(
        sigterm <= cancelled && released <= exit,
        "{}",
        s.cluster.dump()
    );
    assert!(cancelled < successor_task.at, "{}", s.cluster.dump());
    eprintln!(
        "SIGTERM → old task cancelled {:.3} ms, successor primary {:.3} ms, successor task {:.3} \
         ms, old shutdown returned {:.3} ms",
        ms(sent_at, cancelled),
        ms(sent_at, next.at),
        ms(sent_at, successor_task.at),
        ms(sent_at, released)
    );
}

#[tokio::test]
async fn stopped_primary_keeps_the_file_lock_until_it_resumes() {
    let mut s = setup("sigstop", |c| c).await;
    s.cluster.spawn_nodes(3).unwrap();
    let (old, term) = s.cluster.wait_settled(WAIT).await.unwrap();

    s.cluster.signal(old, NodeSignal::Stop).await.unwrap();
    // The scenario itself: the primary stays frozen for 2 s. flock has no lease, so nobody may
    // take over while the frozen process lives.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = s.cluster.history();
    assert!(
        history
            .periods()
            .iter()
            .all(|p| holder(p) == (old, term) && p.end.is_none()),
        "{}",
        s.cluster.dump()
    );
    let states = s.cluster.states();
    assert_eq!(states[&old].role, Some(ObservedRole::Primary { term }));

    let resumed_at = s.cluster.signal(old, NodeSignal::Cont).await.unwrap();
    s.cluster
        .wait_event("a tick of the resumed primary", WAIT, |e| {
            e.pid == old
                && e.at > resumed_at
                && matches!(e.kind, EventKind::Tick { term: t, .. } if t == term)
        })
        .await
        .unwrap();
    assert_eq!(s.cluster.wait_settled(WAIT).await.unwrap(), (old, term));
    assert_eq!(
        s.cluster.history().periods().len(),
        1,
        "{}",
        s.cluster.dump()
    );
    s.cluster.assert_history_ok();
}

/// Kills the `sleep` children the nodes spawned, when the test ends (even on failure).
struct KillChildren(EventLog);

impl Drop for KillChildren {
    fn drop(&mut self) {
        for e in self.0.snapshot() {
            if let EventKind::ChildSpawned { pid } = e.kind
                && let Ok(raw) = i32::try_from(pid)
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Whether `pid` is a live (not zombie) process.
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state is the first field after the parenthesised command name.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[tokio::test]
async fn child_process_of_the_primary_does_not_keep_the_lock() {
    let mut s = setup("child-process", |c| c.spawn_when_primary(["sleep", "30"])).await;
    let _cleanup = KillChildren(s.cluster.log().clone());
    s.cluster.spawn_nodes(2).unwrap();
    let (old, term) = s.cluster.wait_settled(WAIT).await.unwrap();
    let child = s
        .cluster
        .wait_event("the primary's child process", WAIT, |e| {
            e.pid == old && matches!(e.kind, EventKind::ChildSpawned { .. })
        })
        .await
        .unwrap();
    let EventKind::ChildSpawned { pid: child } = child.kind else {
        unreachable!()
    };
    assert!(is_running(child));

    let killed_at = s.cluster.signal(old, NodeSignal::Kill).await.unwrap();
    let next = s.cluster.wait_primary_after(term, old, WAIT).await.unwrap();
    // The successor got the lock while the primary's child still runs: the child never had it.
    assert!(
        is_running(child),
        "the child exited before the successor took over"
    );
    let took = Duration::from_nanos(next.at - killed_at);
    assert!(
        took < Duration::from_secs(10),
        "{took:?}\n{}",
        s.cluster.dump()
    );
    s.cluster.assert_history_ok();
    eprintln!(
        "SIGKILL of a primary whose `sleep 30` child (pid {child}) lives on → successor {:.3} ms",
        ms(killed_at, next.at)
    );
}

/// Threads of this process whose name (`/proc/self/task/*/comm`, 15 bytes at most) starts with
/// `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.trim_end().starts_with(prefix))
        })
        .count()
}

#[tokio::test]
async fn cancelled_acquires_do_not_pile_up_waiting_threads() {
    use futures_util::FutureExt as _;
    use tower_primary::NodeId;
    use tower_primary::backend::{AcquireRequest, Backend as _};

    // Thread names are cut to 15 bytes by the kernel.
    const WAITER: &str = "tower-primary-f";
    const CANCELLED: usize = 20;
    let mut s = setup("cancelled-acquires", |c| c).await;
    s.cluster.spawn_node().unwrap();
    let (holder_pid, term) = s.cluster.wait_settled(WAIT).await.unwrap();

    // Another process holds the lock; acquires from this one wait, and are given up.
    let lock = FileBackend::new(&s.dir).lock(&s.lock).unwrap();
    let before = threads_named(WAITER);
    // All threads too: a thread is listed from its creation on, before it names itself.
    let all_before = threads_named("");
    for _ in 0..CANCELLED {
        let mut acquire = lock.acquire(AcquireRequest::new(NodeId::new("impatient")));
        assert!(
            (&mut acquire).now_or_never().is_none(),
            "got a lock that another process holds"
        );
    }
    let after = threads_named(WAITER);
    let all_after = threads_named("");
    eprintln!(
        "{CANCELLED} cancelled acquires while another process holds the lock: {} more waiting \
         threads, {} more threads in all",
        after.saturating_sub(before),
        all_after.saturating_sub(all_before)
    );
    assert!(
        all_after <= all_before + 2,
        "{CANCELLED} cancelled acquires left {} more threads",
        all_after - all_before
    );
    assert!(
        after <= before + 2,
        "{CANCELLED} cancelled acquires left {} threads waiting in flock",
        after - before
    );

    // The holder dies: the next acquire gets the lock, with a higher term.
    s.cluster
        .signal(holder_pid, NodeSignal::Kill)
        .await
        .unwrap();
    s.cluster.wait_exit(holder_pid, WAIT).await.unwrap();
    let leadership = tokio::time::timeout(
        WAIT,
        lock.acquire(AcquireRequest::new(NodeId::new("patient"))),
    )
    .await
    .expect("the lock after its holder died")
    .unwrap();
    assert!(leadership.term() > term);
    assert_eq!(leadership.holder().id, "patient");
    leadership.release().await.unwrap();
}

#[tokio::test]
async fn deleted_lock_file_makes_the_old_primary_step_down() {
    let mut s = setup("deleted-file", |c| c).await;
    s.cluster.spawn_nodes(2).unwrap();
    let (old, term) = s.cluster.wait_settled(WAIT).await.unwrap();
    let path = s.dir.join(format!("{}.lock", s.lock));
    assert!(path.exists(), "no lock file at {}", path.display());

    let deleted_at = tower_primary::clock::monotonic_nanos();
    std::fs::remove_file(&path).unwrap();
    let fresh = s.cluster.spawn_node().unwrap();

    let stepped_down = s
        .cluster
        .wait_event("the old primary to step down", WAIT, |e| {
            e.pid == old && matches!(e.kind, EventKind::TaskCancelled { term: t } if t == term)
        })
        .await
        .unwrap();
    let (now, now_term) = s.cluster.wait_settled(WAIT).await.unwrap();
    assert!(now_term > term);

    let history = s.cluster.history();
    let report = history.check();
    for o in &report.overlaps {
        eprintln!(
            "overlap: pid {} term {} and pid {} term {}: {:.3} ms",
            o.first.node,
            o.first.term,
            o.second.node,
            o.second.term,
            o.length.as_secs_f64() * 1e3
        );
    }
    let fresh_primary = s
        .cluster
        .first_event(fresh, 0, |k| matches!(k, EventKind::Primary { .. }));
    let longest = report.overlaps.iter().map(|o| o.length).max();
    eprintln!(
        "lock file deleted: old primary (pid {old}, term {term}) stepped down {:.3} ms later; \
         fresh node (pid {fresh}) {}; now primary: pid {now} term {now_term}; measured overlap: {}",
        ms(deleted_at, stepped_down.at),
        fresh_primary.map_or_else(
            || "stayed secondary".to_owned(),
            |e| format!(
                "became primary {:.3} ms after the deletion",
                ms(deleted_at, e.at)
            )
        ),
        longest.map_or_else(
            || "none".to_owned(),
            |d| format!("{:.3} ms", d.as_secs_f64() * 1e3)
        ),
    );
    if !report.overlaps.is_empty() {
        eprintln!("{}", s.cluster.dump());
    }
    // Only the old term may overlap a new one (the bounded window until it notices), and briefly.
    for o in &report.overlaps {
        assert!(
            holder(&o.first) == (old, term) || holder(&o.second) == (old, term),
            "an overlap without the old primary: a node on the deleted inode acted as primary\n{}",
            s.cluster.dump()
        );
        assert!(
            o.length < Duration::from_secs(5),
            "{:?}\n{}",
            o.length,
            s.cluster.dump()
        );
    }
    let mut others = History::new();
    for p in history
        .periods()
        .iter()
        .filter(|p| holder(p) != (old, term))
    {
        others.push(p.clone());
    }
    let report = others.check();
    assert!(report.is_ok(), "{report}\n{}", s.cluster.dump());
}

#[tokio::test]
async fn symlinked_lock_directory_is_refused() {
    let mut s = setup("symlinked-dir", |c| c).await;
    let real = s.dir.join("real");
    std::fs::create_dir(&real).unwrap();
    let link = s.dir.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();

    let err = Elector::builder("symlinked-dir")
        .backend(FileBackend::new(&link))
        .spawn()
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, ConfigError::LockDir { path, .. } if path == &link),
        "{err:?}"
    );
    assert!(message.contains(&path_str(&link)), "{message}");
    assert!(message.contains("symlink"), "{message}");

    // A node process given the link reports the same error and exits with status 2.
    let config = NodeConfig::new(path_str(&link), "symlinked-dir");
    let pid = s.cluster.spawn_node_with(&config).unwrap();
    let (code, _) = s.cluster.wait_exit(pid, WAIT).await.unwrap();
    assert_eq!(code, Some(2));
    let error = s
        .cluster
        .first_event(pid, 0, |k| matches!(k, EventKind::Error { .. }))
        .expect("an error line");
    assert!(error.to_string().contains("symlink"), "{error}");
    assert!(!real.join("symlinked-dir.lock").exists());
}

/// Nodes on two simulated hosts (a PID namespace each, as root): each reports the pid the parent
/// knows it by, runs with pids of its own namespace, and the parent's signals reach it — a
/// stopped primary keeps the file lock, a killed one is succeeded by the node on the other host.
#[tokio::test]
async fn nodes_on_simulated_hosts_are_signalled_through_their_namespace() {
    use std::os::unix::fs::MetadataExt as _;
    use tower_primary_lab::host::SimulatedHost;
    use tower_primary_lab::servers::require;

    let mut s = setup("simulated-hosts", |c| c).await;
    let Some(a) = require("a simulated host (root)", SimulatedHost::start("a").await) else {
        return;
    };
    let b = SimulatedHost::start("b").await.unwrap();
    assert_ne!(a.pid_namespace().unwrap(), b.pid_namespace().unwrap());
    let own_ns = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
    assert_ne!(a.pid_namespace().unwrap(), own_ns);

    let config = s.cluster.config().clone();
    let on_a = s.cluster.spawn_node_on(&a, &config).unwrap();
    let on_b = s.cluster.spawn_node_on(&b, &config).unwrap();
    let (primary, term) = s.cluster.wait_settled(WAIT).await.unwrap();
    assert!(primary == on_a || primary == on_b, "{}", s.cluster.dump());
    for (pid, host) in [(on_a, &a), (on_b, &b)] {
        // The node's own process lives in its host's namespace, under another pid there.
        let node = SimulatedHost::node_pid(pid).expect("the node under nsenter");
        let ns = std::fs::metadata(format!("/proc/{node}/ns/pid"))
            .unwrap()
            .ino();
        assert_eq!(ns, host.pid_namespace().unwrap());
        let status = std::fs::read_to_string(format!("/proc/{node}/status")).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert_eq!(nspid.split_whitespace().count(), 3, "{nspid}");
    }
    // The node on the other host (another PID namespace, where the holder's pid means nothing)
    // still reports the holder: the lock file, not a pid check, decides.
    let other = if primary == on_a { on_b } else { on_a };
    s.cluster
        .wait_for(
            "the other host's node to report the holder",
            WAIT,
            |events| {
                let last = events.iter().rev().find(|e| {
                    e.pid == other
                        && matches!(e.kind, EventKind::Secondary { .. } | EventKind::Started)
                })?;
                match last.kind {
                    EventKind::Secondary {
                        holder_term: Some(t),
                        ..
                    } if t == term => Some(()),
                    _ => None,
                }
            },
        )
        .await
        .unwrap();

    // SIGSTOP reaches the primary: it stays primary (its kernel keeps the flock) and resumes.
    s.cluster.signal(primary, NodeSignal::Stop).await.unwrap();
    let node = SimulatedHost::node_pid(primary).unwrap();
    let stopped = || {
        let stat = std::fs::read_to_string(format!("/proc/{node}/stat")).unwrap();
        stat.rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('T')
    };
    let until = tokio::time::Instant::now() + WAIT;
    while !stopped() {
        assert!(
            tokio::time::Instant::now() < until,
            "the node never stopped"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.cluster.wait_settled(WAIT).await.unwrap(), (primary, term));
    s.cluster.signal(primary, NodeSignal::Cont).await.unwrap();
    let resumed = s.cluster.events().len();
    s.cluster
        .wait_for("a tick after SIGCONT", WAIT, |events| {
            events[resumed..]
                .iter()
                .find(|e| e.pid == primary && matches!(e.kind, EventKind::Tick { .. }))
                .map(|_| ())
        })
        .await
        .unwrap();

    // SIGKILL reaches it too: the node on the other host takes over with a higher term.
    s.cluster.signal(primary, NodeSignal::Kill).await.unwrap();
    let next = s
        .cluster
        .wait_primary_after(term, primary, WAIT)
        .await
        .unwrap();
    assert_eq!(next.pid, if primary == on_a { on_b } else { on_a });
    s.cluster.wait_exit(primary, WAIT).await.unwrap();
    s.cluster.assert_history_ok();
}
