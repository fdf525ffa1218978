//! Schedules and run-once jobs on the memory backend, in real time with short intervals.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower_primary::backend::{
    AcquireRequest, Backend, BoxFuture, Changes, Leadership, Lock, Stored,
};
use tower_primary::schedule::{Missed, Run, RunNowError, Schedule};
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
    assert!(
        matches!(b_handle.run_now(), Err(RunNowError::NotPrimary { .. })),
        "a secondary queued a run"
    );

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

// ------------------------------------------------------------------------------------------------
// A run-once job whose change subscription is broken must back off, not spin.

/// The memory backend, except that every subscription to a state key fails at its first wait,
/// as a directory watch that the kernel refused does. Counts the subscriptions and the failures.
#[derive(Debug, Clone)]
struct BrokenKeyWatch {
    inner: MemoryBackend,
    subscribed: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct BrokenKeyWatchLock {
    inner: Arc<dyn Lock>,
    subscribed: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

/// Beyond this many failures the subscription stops failing (it waits for ever), so that code
/// that spins on the error is counted instead of hanging the test.
const SPIN_VALVE: usize = 10_000;

struct FailingChanges(Arc<AtomicUsize>);

impl Changes for FailingChanges {
    fn changed(&mut self) -> BoxFuture<'_, Result<(), tower_primary::Error>> {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if n >= SPIN_VALVE {
                std::future::pending::<()>().await;
            }
            Err(tower_primary::Error::backend_msg(
                "memory",
                "watch: injected failure (the watch is gone)",
            ))
        })
    }
}

impl Backend for BrokenKeyWatch {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn min_lease(&self) -> Option<Duration> {
        self.inner.min_lease()
    }
    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, tower_primary::ConfigError> {
        Ok(Arc::new(BrokenKeyWatchLock {
            inner: self.inner.lock(name)?,
            subscribed: self.subscribed.clone(),
            failed: self.failed.clone(),
        }))
    }
}

impl Lock for BrokenKeyWatchLock {
    fn acquire(
        &self,
        req: AcquireRequest,
    ) -> BoxFuture<'_, Result<Box<dyn Leadership>, tower_primary::Error>> {
        self.inner.acquire(req)
    }
    fn holder(&self) -> BoxFuture<'_, Result<Option<tower_primary::Holder>, tower_primary::Error>> {
        self.inner.holder()
    }
    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, tower_primary::Error>> {
        self.inner.watch_holder()
    }
    fn load<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Stored>, tower_primary::Error>> {
        self.inner.load(key)
    }
    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), tower_primary::Error>> {
        self.inner.store(key, value, term)
    }
    fn watch_key<'a>(
        &'a self,
        _key: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Changes>, tower_primary::Error>> {
        self.subscribed.fetch_add(1, Ordering::SeqCst);
        let failed = self.failed.clone();
        Box::pin(async move { Ok(Box::new(FailingChanges(failed)) as Box<dyn Changes>) })
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn run_once_whose_change_watch_keeps_failing_resubscribes_with_backoff() {
    let backend = BrokenKeyWatch {
        inner: MemoryBackend::new(),
        subscribed: Arc::new(AtomicUsize::new(0)),
        failed: Arc::new(AtomicUsize::new(0)),
    };
    let e = Elector::builder("broken-watch")
        .backend(backend.clone())
        .node(NodeId::new("a"))
        .clock(tower_primary::Clock::tokio())
        .spawn()
        .unwrap();
    // The job never completes, so every node keeps following the record.
    let once = e
        .run_once(
            "migrate",
            "v1",
            |ctx: tower_primary::TermContext| async move {
                ctx.cancelled().await;
                Ok::<_, std::io::Error>(())
            },
        )
        .unwrap();
    // A minute on the paused clock: it only moves when the runtime is idle, so a loop that
    // spins on the error freezes it (until the valve stops the failures).
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (subscribed, failed) = (
        backend.subscribed.load(Ordering::SeqCst),
        backend.failed.load(Ordering::SeqCst),
    );
    assert!(!once.is_done());
    assert!(
        failed < 100,
        "{failed} failed waits in a minute ({subscribed} subscriptions): the watcher spins"
    );
    // Backoff, not giving up: it kept re-subscribing, every attempt waiting longer.
    assert!(subscribed >= 5, "{subscribed} subscriptions in a minute");
    e.shutdown().await;
}

// ------------------------------------------------------------------------------------------------
// The first slot, and slots whose completion could not be recorded at once.

#[tokio::test]
async fn first_slot_cut_short_by_the_end_of_its_term_runs_on_the_next_primary() {
    let backend = MemoryBackend::new();
    let every = Schedule::every(Duration::from_millis(200))
        .unwrap()
        .missed(Missed::CatchUpAll { max: 100 });
    let registered = Utc::now();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let a = elector(&backend, "a");
    a.schedule("first", every.clone(), move |run: Run| {
        let started_tx = started_tx.clone();
        async move {
            started_tx.send(run.slot()).ok();
            // Cut short: the run outlasts its term, so its completion is never recorded.
            run.ctx().cancelled().await;
            Ok::<_, std::io::Error>(())
        }
    })
    .unwrap();
    let first = timeout(WAIT, started.recv()).await.unwrap().unwrap();
    assert!(first > registered, "a slot from before registration ran");
    a.shutdown().await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let b = elector(&backend.connection(), "b");
    b.schedule("first", every, recording_job("b", tx)).unwrap();
    let rerun = next(&mut rx).await;
    assert_eq!(
        rerun.slot, first,
        "the first slot, cut short, was skipped by the next primary"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn slot_whose_completion_fails_to_store_once_is_not_run_again_by_its_term() {
    let backend = MemoryBackend::new();
    let faults = backend.faults().clone();
    let every = Schedule::every(Duration::from_secs(1)).unwrap();
    let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = elector(&backend, "a");
    a.schedule("flaky-store", every, {
        let runs = runs.clone();
        move |run: Run| {
            let (runs, faults, tx) = (runs.clone(), faults.clone(), tx.clone());
            async move {
                let n = {
                    let mut runs = runs.lock().unwrap();
                    runs.push(run.slot());
                    runs.len()
                };
                if n == 2 {
                    // The backend fails for a moment, just as the run records its completion.
                    faults.set_failing(true);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        faults.set_failing(false);
                    });
                }
                tx.send(()).ok();
                Ok::<_, std::io::Error>(())
            }
        }
    })
    .unwrap();
    for _ in 0..4 {
        timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    }
    let runs = runs.lock().unwrap().clone();
    let mut unique = runs.clone();
    unique.dedup();
    assert_eq!(unique, runs, "a completed slot ran again in its term");
    a.shutdown().await;
}

// ------------------------------------------------------------------------------------------------
// Cron across daylight-saving transitions, and long outages.

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn berlin(expr: &str) -> Schedule {
    Schedule::cron(expr)
        .unwrap()
        .timezone("Europe/Berlin")
        .unwrap()
}

/// Every slot from `from` (exclusive) up to `to`, by repeated `next_after`.
fn slots_between(s: &Schedule, from: &str, to: &str) -> Vec<DateTime<Utc>> {
    let (mut t, to) = (at(from), at(to));
    let mut out = Vec::new();
    while let Some(next) = s.next_after(t).filter(|n| *n <= to) {
        out.push(next);
        t = next;
    }
    out
}

#[test]
fn fixed_local_time_in_the_spring_gap_runs_at_the_first_instant_after_it() {
    // Berlin, 2026-03-29: 02:00 CET (01:00Z) jumps to 03:00 CEST; 02:30 does not exist that day.
    let daily = berlin("0 30 2 * * *");
    assert_eq!(
        slots_between(&daily, "2026-03-27T12:00:00Z", "2026-03-31T12:00:00Z"),
        [
            at("2026-03-28T01:30:00Z"), // 02:30 CET
            at("2026-03-29T01:00:00Z"), // 03:00 CEST, the first instant after the gap
            at("2026-03-30T00:30:00Z"), // 02:30 CEST
            at("2026-03-31T00:30:00Z"),
        ]
    );
    // Two fixed times in the gap run once, at its end; one after it runs as usual.
    let two = berlin("0 0,30 2,3 * * *");
    assert_eq!(
        slots_between(&two, "2026-03-29T00:00:00Z", "2026-03-29T02:00:00Z"),
        [at("2026-03-29T01:00:00Z"), at("2026-03-29T01:30:00Z")]
    );
}

#[test]
fn fixed_local_time_in_the_repeated_autumn_hour_runs_once_at_its_first_occurrence() {
    // Berlin, 2026-10-25: 03:00 CEST (01:00Z) falls back to 02:00 CET; 02:30 happens twice.
    let daily = berlin("0 30 2 * * *");
    assert_eq!(
        slots_between(&daily, "2026-10-23T12:00:00Z", "2026-10-26T12:00:00Z"),
        [
            at("2026-10-24T00:30:00Z"), // 02:30 CEST
            at("2026-10-25T00:30:00Z"), // 02:30 CEST, the first of the two
            at("2026-10-26T01:30:00Z"), // 02:30 CET
        ]
    );
    // Caught up after an outage over the transition: still once.
    let all = daily.missed(Missed::CatchUpAll { max: 10 });
    assert_eq!(
        all.missed_slots(Some(at("2026-10-24T00:30:00Z")), at("2026-10-25T06:00:00Z")),
        [at("2026-10-25T00:30:00Z")]
    );
}

#[test]
fn minute_patterns_follow_real_time_through_both_transitions() {
    let quarter = berlin("0 */15 * * * *");
    // Spring: 01:45 CET is followed by 03:00 CEST, 15 minutes later.
    assert_eq!(
        slots_between(&quarter, "2026-03-29T00:40:00Z", "2026-03-29T01:20:00Z"),
        [
            at("2026-03-29T00:45:00Z"),
            at("2026-03-29T01:00:00Z"),
            at("2026-03-29T01:15:00Z"),
        ]
    );
    // Autumn: the repeated hour runs too, every 15 minutes of real time.
    let expected: Vec<_> = (0..=8)
        .map(|i| at("2026-10-25T00:00:00Z") + chrono::TimeDelta::minutes(15 * i))
        .collect();
    assert_eq!(
        slots_between(&quarter, "2026-10-24T23:50:00Z", "2026-10-25T02:00:00Z"),
        expected
    );
    let all = quarter.missed(Missed::CatchUpAll { max: 100 });
    assert_eq!(
        all.missed_slots(Some(at("2026-10-24T23:50:00Z")), at("2026-10-25T02:05:00Z")),
        expected
    );
    // Hourly: both 02:00s of the autumn night.
    let hourly = berlin("0 0 * * * *");
    assert_eq!(
        slots_between(&hourly, "2026-10-24T23:30:00Z", "2026-10-25T02:00:00Z"),
        [
            at("2026-10-25T00:00:00Z"),
            at("2026-10-25T01:00:00Z"),
            at("2026-10-25T02:00:00Z"),
        ]
    );
}

#[test]
fn catch_up_after_a_long_outage_runs_the_latest_slots() {
    let now = at("2026-12-06T05:30:10.500Z");
    let last = Some(now - chrono::TimeDelta::days(30));
    let every_second = Schedule::cron("* * * * * *").unwrap();
    assert_eq!(
        every_second.missed_slots(last, now),
        [at("2026-12-06T05:30:10Z")]
    );
    assert_eq!(
        every_second
            .missed(Missed::CatchUpAll { max: 3 })
            .missed_slots(last, now),
        [
            at("2026-12-06T05:30:08Z"),
            at("2026-12-06T05:30:09Z"),
            at("2026-12-06T05:30:10Z"),
        ]
    );
    // A cron schedule that never matches again, and one far in the past: no slot, no hang.
    let never = Schedule::cron("0 0 0 30 2 *").unwrap();
    assert_eq!(never.next_after(now), None);
    assert!(
        never
            .missed_slots(Some(at("1971-01-01T00:00:00Z")), now)
            .is_empty()
    );
}

#[test]
fn interval_catch_up_is_capped() {
    let now = at("2026-12-06T05:30:00Z");
    let minute = Schedule::every(Duration::from_secs(60))
        .unwrap()
        .missed(Missed::CatchUpAll { max: usize::MAX });
    let missed = minute.missed_slots(Some(now - chrono::TimeDelta::days(3650)), now);
    assert!(
        missed.len() <= 10_000,
        "{} slots caught up at once",
        missed.len()
    );
    assert_eq!(missed.last(), Some(&now));
}

// ------------------------------------------------------------------------------------------------
// Bounds.

#[tokio::test]
async fn run_now_queue_is_bounded_and_says_when_it_is_full() {
    let backend = MemoryBackend::new();
    let a = elector(&backend, "a");
    a.handle().wait_primary().await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let hourly = Schedule::every(Duration::from_secs(3600)).unwrap();
    assert_eq!(hourly.queue_capacity(), 64);
    let handle = a
        .schedule("busy", hourly.queue(8), move |run: Run| {
            let (started_tx, mut release) = (started_tx.clone(), release.clone());
            async move {
                started_tx.send(run.slot()).ok();
                // Busy until the test lets go: requests pile up meanwhile.
                let _ = release.wait_for(|r| *r).await;
                Ok::<_, std::io::Error>(())
            }
        })
        .unwrap();
    let first = handle.run_now().unwrap();
    assert_eq!(timeout(WAIT, started.recv()).await.unwrap(), Some(first));
    let mut queued = 0;
    let err = loop {
        match handle.run_now() {
            Ok(_) => queued += 1,
            Err(err) => break err,
        }
        assert!(queued <= 8, "more runs queued than the queue holds");
    };
    assert_eq!(queued, 8);
    assert!(
        matches!(&err, RunNowError::Full { capacity: 8, job } if job == "busy"),
        "{err:?}"
    );
    assert!(err.to_string().contains("try again later"), "{err}");
    // The queue drains: once the run ends the waiting ones run, and there is room again.
    release_tx.send_replace(true);
    for _ in 0..8 {
        timeout(WAIT, started.recv()).await.unwrap().unwrap();
    }
    handle.run_now().expect("room again once the queue drained");
    a.shutdown().await;
}

#[tokio::test]
async fn catch_up_and_queue_settings_beyond_their_bounds_are_refused() {
    let e = elector(&MemoryBackend::new(), "x");
    let every = Schedule::every(Duration::from_secs(1)).unwrap();
    let job = |_run: Run| async { Ok::<_, std::io::Error>(()) };
    let err = e
        .schedule(
            "too-many",
            every.clone().missed(Missed::CatchUpAll {
                max: Missed::MAX_CATCH_UP + 1,
            }),
            job,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 10000"), "{err}");
    for bad in [0, 1 << 20] {
        let err = e
            .schedule("queue", every.clone().queue(bad), job)
            .unwrap_err()
            .to_string();
        assert!(err.contains("run-now queue must hold"), "{err}");
    }
    e.shutdown().await;
}
