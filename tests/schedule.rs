//! Schedules and run-once jobs on the memory backend, in real time with short intervals.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower_primary::schedule::{Missed, Run, Schedule};
use tower_primary::{Elector, MemoryBackend, NodeId};

const WAIT: Duration = Duration::from_secs(20);

fn elector(backend: &MemoryBackend, node: &str) -> Elector {
    Elector::builder("schedules")
        .backend(backend.clone())
        .node(NodeId::new(node))
        .grace(Duration::from_secs(2))
        .rejoin_delay(Duration::from_secs(30))
        .spawn()
        .unwrap()
}

#[derive(Debug, Clone)]
struct Seen {
    node: &'static str,
    slot: DateTime<Utc>,
    term: u64,
    manual: bool,
}

fn recording_job(
    node: &'static str,
    tx: mpsc::UnboundedSender<Seen>,
) -> impl Fn(Run) -> std::future::Ready<Result<(), std::io::Error>> + Send + Sync + 'static {
    move |run: Run| {
        tx.send(Seen {
            node,
            slot: run.slot(),
            term: run.term(),
            manual: run.is_manual(),
        })
        .ok();
        std::future::ready(Ok(()))
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    timeout(WAIT, rx.recv())
        .await
        .expect("no run in time")
        .unwrap()
}

#[tokio::test]
async fn scheduled_job_runs_only_on_the_primary_and_the_successor_never_repeats_a_completed_slot() {
    let backend = MemoryBackend::new();
    let every = Schedule::every(Duration::from_millis(100)).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = elector(&backend, "a");
    a.schedule("tick", every.clone(), recording_job("a", tx.clone()))
        .unwrap();
    a.handle().wait_primary().await;
    let b = elector(&backend.connection(), "b");
    b.schedule("tick", every, recording_job("b", tx)).unwrap();

    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(next(&mut rx).await);
    }
    assert!(runs.iter().all(|r| r.node == "a"), "{runs:?}");
    a.shutdown().await;
    // Runs that were in flight at shutdown are already in the channel; b follows.
    loop {
        let r = next(&mut rx).await;
        runs.push(r.clone());
        if r.node == "b" {
            break;
        }
    }
    for _ in 0..3 {
        runs.push(next(&mut rx).await);
    }
    assert!(runs.iter().all(|r| !r.manual));
    let slots: Vec<_> = runs.iter().map(|r| r.slot).collect();
    let mut sorted = slots.clone();
    sorted.dedup();
    assert_eq!(sorted, slots, "a slot ran twice or out of order: {runs:?}");
    let a_term = runs[0].term;
    assert!(
        runs.iter()
            .filter(|r| r.node == "b")
            .all(|r| r.term > a_term)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn new_primary_catches_up_missed_slots_oldest_first_within_the_bound() {
    let backend = MemoryBackend::new();
    // A first primary records a completed slot 5 s ago, then goes away.
    let first = elector(&backend, "first");
    let ctx = first.handle().wait_primary().await;
    let start = Utc::now();
    let last = (start - chrono::TimeDelta::seconds(5)).timestamp() * 1000;
    first
        .state()
        .store("schedule:catch-up", last.to_string().as_bytes(), &ctx)
        .await
        .unwrap();
    first.shutdown().await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let second = elector(&backend.connection(), "second");
    let schedule = Schedule::every(Duration::from_secs(1))
        .unwrap()
        .missed(Missed::CatchUpAll { max: 3 });
    second
        .schedule("catch-up", schedule, recording_job("second", tx))
        .unwrap();
    let runs = [
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
    ];
    let slots: Vec<i64> = runs.iter().map(|r| r.slot.timestamp()).collect();
    assert!(
        runs.iter().all(|r| r.slot <= start),
        "not missed slots: {runs:?}"
    );
    assert_eq!(slots[1], slots[0] + 1);
    assert_eq!(slots[2], slots[1] + 1);
    assert!(
        slots[0] > last / 1000 + 1,
        "more than `max` slots caught up: {slots:?}"
    );
    // Then the schedule goes on with new slots.
    let fourth = next(&mut rx).await;
    assert!(fourth.slot.timestamp() > slots[2]);
    second.shutdown().await;
}

#[tokio::test]
async fn run_now_queues_a_manual_run_on_the_primary_only() {
    let backend = MemoryBackend::new();
    let hourly = Schedule::every(Duration::from_secs(3600)).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = elector(&backend, "a");
    let handle = a
        .schedule("report", hourly.clone(), recording_job("a", tx.clone()))
        .unwrap();
    a.handle().wait_primary().await;
    let b = elector(&backend.connection(), "b");
    let b_handle = b
        .schedule("report", hourly, recording_job("b", tx))
        .unwrap();
    assert!(b_handle.run_now().is_none(), "a secondary queued a run");

    // The singleton task may not have taken its queue yet; a queued request waits for it.
    let slot = handle.run_now().expect("the primary refused a run");
    let run = next(&mut rx).await;
    assert_eq!((run.node, run.manual, run.slot), ("a", true, slot));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn run_once_job_runs_once_across_nodes_and_every_node_sees_it_done() {
    let backend = MemoryBackend::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let job = |runs: Arc<AtomicUsize>| {
        move |_ctx| {
            let runs = runs.clone();
            async move {
                // Fails once, then succeeds: restarted with backoff within the term.
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(std::io::Error::other("first attempt fails"));
                }
                Ok(())
            }
        }
    };
    let a = elector(&backend, "a");
    let a_once = a.run_once("migrate", "v1", job(runs.clone())).unwrap();
    a.handle().wait_primary().await;
    let b = elector(&backend.connection(), "b");
    let b_once = b.run_once("migrate", "v1", job(runs.clone())).unwrap();
    timeout(WAIT, a_once.wait()).await.unwrap();
    timeout(WAIT, b_once.wait()).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // The next primary does not run a completed version again.
    a.shutdown().await;
    b.handle().wait_primary().await;
    let c = elector(&backend.connection(), "c");
    let c_once = c.run_once("migrate", "v1", job(runs.clone())).unwrap();
    timeout(WAIT, c_once.wait()).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test]
async fn run_once_job_interrupted_by_a_lost_term_runs_again_on_the_next_primary() {
    let backend = MemoryBackend::new();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let job = move |ctx: tower_primary::TermContext| {
        let started_tx = started_tx.clone();
        async move {
            started_tx.send(ctx.term()).ok();
            // Long enough that the test stops the term in the middle.
            ctx.cancelled().await;
            Ok::<_, std::io::Error>(())
        }
    };
    let a = elector(&backend, "a");
    let once = a.run_once("seed", "v7", job).unwrap();
    let first_term = timeout(WAIT, started.recv()).await.unwrap().unwrap();
    a.shutdown().await;
    assert!(!once.is_done(), "a job cut short was recorded as done");

    let (ran_tx, mut ran) = mpsc::unbounded_channel();
    let b = elector(&backend.connection(), "b");
    let again = b
        .run_once("seed", "v7", move |ctx: tower_primary::TermContext| {
            let ran_tx = ran_tx.clone();
            async move {
                ran_tx.send(ctx.term()).ok();
                Ok::<_, std::io::Error>(())
            }
        })
        .unwrap();
    let second_term = timeout(WAIT, ran.recv()).await.unwrap().unwrap();
    assert!(second_term > first_term);
    timeout(WAIT, again.wait()).await.unwrap();
    b.shutdown().await;
}

#[test]
fn bad_schedules_and_job_names_are_refused() {
    assert!(
        Schedule::cron("0 0 8 * *").is_err(),
        "5 fields need seconds"
    );
    assert!(Schedule::cron("0 0 25 * * *").is_err());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let e = elector(&MemoryBackend::new(), "x");
        let every = Schedule::every(Duration::from_secs(1)).unwrap();
        let err = e
            .schedule("bad name", every, |_run| async {
                Ok::<_, std::io::Error>(())
            })
            .unwrap_err();
        assert!(err.to_string().contains("invalid state key"), "{err}");
        let err = e
            .run_once("ok", "", |_ctx| async { Ok::<_, std::io::Error>(()) })
            .unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        e.shutdown().await;
    });
}

#[tokio::test(flavor = "current_thread")]
async fn run_now_right_after_promotion_is_not_dropped_by_the_starting_loop() {
    let backend = MemoryBackend::new();
    let a = elector(&backend, "a");
    a.handle().wait_primary().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hourly = Schedule::every(Duration::from_secs(3600)).unwrap();
    let handle = a
        .schedule("report", hourly, recording_job("a", tx))
        .unwrap();
    // On this single-threaded runtime the schedule's loop cannot have started yet: the request
    // is queued before it drains the queue, and must survive that.
    let slot = handle.run_now().expect("the primary refused a run");
    let run = next(&mut rx).await;
    assert_eq!((run.manual, run.slot), (true, slot));
    a.shutdown().await;
}

#[tokio::test]
async fn manual_runs_have_their_own_idempotency_keys() {
    let backend = MemoryBackend::new();
    let a = elector(&backend, "a");
    a.handle().wait_primary().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hourly = Schedule::every(Duration::from_secs(3600)).unwrap();
    let handle = a
        .schedule("report", hourly, move |run: Run| {
            tx.send((run.idempotency_key(), run.slot())).ok();
            async { Ok::<_, std::io::Error>(()) }
        })
        .unwrap();
    let slot = handle.run_now().unwrap();
    let (key, seen) = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(seen, slot);
    assert_eq!(key, format!("report:manual:{}", slot.timestamp_millis()));
    // Manual runs are not recorded as completed slots.
    assert_eq!(handle.last_completed().await.unwrap(), None);
    a.shutdown().await;
}

#[tokio::test]
async fn slots_that_pass_during_a_long_run_follow_the_missed_policy() {
    let backend = MemoryBackend::new();
    let a = elector(&backend, "a");
    a.handle().wait_primary().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Every 100 ms, but each run takes 350 ms: with `Skip` the next run is the next slot after
    // the long run ends, not the three slots that passed meanwhile, one after the other.
    let every = Schedule::every(Duration::from_millis(100))
        .unwrap()
        .missed(Missed::Skip);
    let handle = a
        .schedule("slow", every, move |run: Run| {
            let tx = tx.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(350)).await;
                tx.send((run.slot(), Utc::now())).ok();
                Ok::<_, std::io::Error>(())
            }
        })
        .unwrap();
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(timeout(WAIT, rx.recv()).await.unwrap().unwrap());
    }
    for pair in runs.windows(2) {
        let ((_, ended), (slot, _)) = (pair[0], pair[1]);
        assert!(
            slot >= ended,
            "a slot that passed during the previous run ran: {runs:?}"
        );
    }
    let last = handle.last_completed().await.unwrap().unwrap();
    assert!(last >= runs[2].0);
    a.shutdown().await;
}

#[tokio::test]
async fn run_once_runs_each_version_once_even_when_versions_mix() {
    let backend = MemoryBackend::new();
    let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let job = |version: &'static str| {
        let runs = runs.clone();
        move |_ctx| {
            runs.lock().unwrap().push(version);
            async { Ok::<_, std::io::Error>(()) }
        }
    };
    let a = elector(&backend, "a");
    timeout(WAIT, a.run_once("migrate", "v1", job("v1")).unwrap().wait())
        .await
        .unwrap();
    timeout(WAIT, a.run_once("migrate", "v2", job("v2")).unwrap().wait())
        .await
        .unwrap();
    a.shutdown().await;
    // A node still running the old code (a rolling deploy) becomes primary: v1 is done already.
    let old = elector(&backend.connection(), "old");
    let v1 = old.run_once("migrate", "v1", job("v1")).unwrap();
    timeout(WAIT, v1.wait()).await.unwrap();
    let v2 = old.run_once("migrate", "v2", job("v2")).unwrap();
    timeout(WAIT, v2.wait()).await.unwrap();
    assert_eq!(*runs.lock().unwrap(), ["v1", "v2"]);
    let stored = old.state().load("once:migrate").await.unwrap().unwrap();
    assert_eq!(stored.value, b"v1\nv2");
    old.shutdown().await;
}
