//! Observability: role metrics across a failover (a recording recorder, and the Prometheus
//! exporter), tracing spans, the stuck-primary watchdog behind `/health/live`, and the status
//! tool (`examples/status`) against the file backend and Redis.
//!
//! Timing logic runs on tokio's paused clock with the memory backend. One watchdog test needs a
//! task that blocks a thread, which only a multi-threaded runtime on the real clock can have.
#![cfg(all(feature = "file", feature = "axum"))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::{Router, routing::get};
use http::{Request, StatusCode};
use tokio::time::{Instant, advance, timeout};
use tower::ServiceExt;
use tower_primary::backend::{Backend, Lock};
use tower_primary::http::health::{self, Liveness};
use tower_primary::{
    AddRoleLayer, Clock, Elector, FileBackend, Lease, MemoryBackend, NodeId, RoleHandle,
};
use tower_primary_lab::servers::TempDir;

#[allow(dead_code)]
#[path = "../examples/status/probe.rs"]
mod probe;

/// Bounds a broken run only.
const WAIT: Duration = Duration::from_secs(30);

/// Lets spawned tasks run without moving the paused clock.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[cfg(feature = "metrics")]
async fn wait_role(
    handle: &mut RoleHandle,
    pred: impl Fn(&tower_primary::Role) -> bool,
) -> tower_primary::Role {
    timeout(WAIT, async {
        loop {
            let role = handle.role();
            if pred(&role) {
                return role;
            }
            handle.changed().await;
        }
    })
    .await
    .expect("the role did not change in time")
}

// ---------------------------------------------------------------------------------------------
// Metrics

#[cfg(feature = "metrics")]
mod recording {
    //! A recorder that logs every operation in order, with its labels.

    use std::sync::{Arc, Mutex};

    use metrics::{
        Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata,
        Recorder, SharedString, Unit,
    };
    use tokio::sync::watch;

    #[derive(Clone, Debug, PartialEq)]
    pub(crate) enum Op {
        Increment(u64),
        Set(f64),
        Record(f64),
    }

    #[derive(Clone, Debug)]
    pub(crate) struct Event {
        pub(crate) name: String,
        pub(crate) labels: Vec<(String, String)>,
        pub(crate) op: Op,
    }

    impl Event {
        fn matches(&self, name: &str, labels: &[(&str, &str)]) -> bool {
            self.name == name
                && labels
                    .iter()
                    .all(|(k, v)| self.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        }
    }

    #[derive(Clone)]
    pub(crate) struct Log {
        events: Arc<Mutex<Vec<Event>>>,
        len: Arc<watch::Sender<usize>>,
    }

    impl Default for Log {
        fn default() -> Self {
            Log {
                events: Arc::default(),
                len: Arc::new(watch::channel(0).0),
            }
        }
    }

    impl Log {
        fn push(&self, key: &Key, op: Op) {
            let mut events = self.events.lock().unwrap();
            events.push(Event {
                name: key.name().to_owned(),
                labels: key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
                op,
            });
            self.len.send_replace(events.len());
        }

        pub(crate) fn events(&self) -> Vec<Event> {
            self.events.lock().unwrap().clone()
        }

        /// The sum of a counter's increments.
        pub(crate) fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
            self.events()
                .iter()
                .filter(|e| e.matches(name, labels))
                .map(|e| match e.op {
                    Op::Increment(n) => n,
                    _ => 0,
                })
                .sum()
        }

        /// The values a gauge was set to, without consecutive repeats.
        pub(crate) fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
            let mut out: Vec<f64> = Vec::new();
            for e in self.events().iter().filter(|e| e.matches(name, labels)) {
                if let Op::Set(v) = e.op
                    && out.last() != Some(&v)
                {
                    out.push(v);
                }
            }
            out
        }

        /// A histogram's samples.
        pub(crate) fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
            self.events()
                .iter()
                .filter(|e| e.matches(name, labels))
                .filter_map(|e| match e.op {
                    Op::Record(v) => Some(v),
                    _ => None,
                })
                .collect()
        }

        /// Waits until `pred` holds for the log (checked at every new operation).
        pub(crate) async fn wait_for(&self, what: &str, pred: impl Fn(&Log) -> bool) {
            let mut rx = self.len.subscribe();
            let waited = tokio::time::timeout(super::WAIT, async {
                loop {
                    if pred(self) {
                        return;
                    }
                    let _ = rx.changed().await;
                }
            })
            .await;
            assert!(
                waited.is_ok(),
                "metrics never showed {what}: {:#?}",
                self.events()
            );
        }
    }

    struct Handle {
        log: Log,
        key: Key,
    }

    impl CounterFn for Handle {
        fn increment(&self, value: u64) {
            self.log.push(&self.key, Op::Increment(value));
        }
        fn absolute(&self, _value: u64) {
            panic!("tower-primary never sets a counter's absolute value");
        }
    }

    impl GaugeFn for Handle {
        fn increment(&self, _value: f64) {
            panic!("tower-primary only sets gauges");
        }
        fn decrement(&self, _value: f64) {
            panic!("tower-primary only sets gauges");
        }
        fn set(&self, value: f64) {
            self.log.push(&self.key, Op::Set(value));
        }
    }

    impl HistogramFn for Handle {
        fn record(&self, value: f64) {
            self.log.push(&self.key, Op::Record(value));
        }
    }

    impl Log {
        fn handle(&self, key: &Key) -> Arc<Handle> {
            Arc::new(Handle {
                log: self.clone(),
                key: key.clone(),
            })
        }
    }

    impl Recorder for Log {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.handle(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.handle(key))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(self.handle(key))
        }
    }
}

/// One elector (this process's node "a") across a failover to and from node "b", which uses the
/// lock directly (another process, as far as these metrics know): secondary, acquired after
/// waiting 5 s, a renewal confirmed 200 ms late, singleton tasks failing, panicking and ignoring
/// their cancellation, a step-down, fencing, a loss and backend errors.
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn metrics_follow_a_failover_with_values_and_lock_labels() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tower_primary::backend::AcquireRequest;
    use tower_primary::metrics as m;

    let log = recording::Log::default();
    let _recorder = metrics::set_default_local_recorder(&log);
    let name = "metrics-failover";
    let lock = [("lock", name)];
    let lease = Lease::new(Duration::from_secs(3));
    let store = MemoryBackend::new().with_lease();
    let mine = store.connection();
    let theirs = store.connection().lock(name).unwrap();
    let b_request = AcquireRequest::new(NodeId::new("b"))
        .with_lease(Some(lease))
        .with_clock(Clock::tokio());

    // b holds the lock first.
    let b1 = theirs.acquire(b_request.clone()).await.unwrap();
    let b1_term = b1.term();
    let start = Instant::now();
    let elector = Elector::builder(name)
        .backend(mine.clone())
        .node(NodeId::new("a"))
        .lease(lease)
        .grace(Duration::from_secs(2))
        .clock(Clock::tokio())
        .spawn()
        .unwrap();
    let flaky_failed = Arc::new(AtomicBool::new(false));
    elector.singleton_task("flaky", move |ctx| {
        let fail = !flaky_failed.swap(true, Ordering::SeqCst);
        async move {
            if fail {
                return Err("first run fails");
            }
            ctx.cancelled().await;
            Ok(())
        }
    });
    let panicked = Arc::new(AtomicBool::new(false));
    elector.singleton_task("panicky", move |ctx| {
        let panic = !panicked.swap(true, Ordering::SeqCst);
        async move {
            assert!(!panic, "first run panics (on purpose)");
            ctx.cancelled().await;
            Ok::<_, std::io::Error>(())
        }
    });
    let stubborn_runs = Arc::new(AtomicUsize::new(0));
    let runs = stubborn_runs.clone();
    elector.singleton_task("stubborn", move |_ctx| {
        runs.fetch_add(1, Ordering::SeqCst);
        // Ignores the end of its term: aborted after the grace.
        std::future::pending::<Result<(), std::io::Error>>()
    });
    let mut role = elector.handle();

    // Secondary, following b.
    wait_role(&mut role, |r| r.term() == Some(b1.term())).await;
    assert_eq!(log.gauge(m::IS_PRIMARY, &lock), vec![0.0]);
    assert_eq!(log.gauge(m::TERM, &lock), vec![b1.term() as f64]);

    // b hands over 5 s after a started campaigning: a waited exactly that long.
    let granted_at = start + Duration::from_secs(5);
    tokio::time::sleep_until(granted_at).await;
    b1.release().await.unwrap();
    let a1 = timeout(WAIT, role.wait_primary()).await.unwrap().term();
    assert!(a1 > b1_term);
    assert_eq!(log.histogram(m::ACQUIRE_SECONDS, &lock), vec![5.0]);
    assert_eq!(log.gauge(m::IS_PRIMARY, &lock), vec![0.0, 1.0]);
    assert_eq!(log.gauge(m::TERM, &lock), vec![b1_term as f64, a1 as f64]);
    assert_eq!(log.counter(m::TRANSITIONS, &[("reason", "acquired")]), 1);

    // The flaky task fails once and is restarted; the panicky one panics once.
    log.wait_for("a restart of each failing task", |log| {
        log.counter(m::TASK_RESTARTS, &[("task", "flaky")]) == 1
            && log.counter(m::TASK_RESTARTS, &[("task", "panicky")]) == 1
    })
    .await;
    for task in ["flaky", "panicky"] {
        assert_eq!(log.counter(m::TASK_STARTS, &[("task", task)]), 2, "{task}");
    }
    assert_eq!(
        log.counter(m::TASK_FAILURES, &[("task", "flaky"), ("kind", "error")]),
        1
    );
    assert_eq!(
        log.counter(m::TASK_FAILURES, &[("task", "panicky"), ("kind", "panic")]),
        1
    );
    assert_eq!(log.counter(m::TASK_STARTS, &[("task", "stubborn")]), 1);
    assert_eq!(log.counter(m::TASK_RESTARTS, &[("task", "stubborn")]), 0);

    // A renewal whose confirmation is held up 200 ms by a hung backend call: the first renewal
    // is sent a third of the lease after the grant, and hangs.
    let renewed_before = log.histogram(m::RENEW_SECONDS, &lock).len();
    assert_eq!(renewed_before, 0);
    mine.faults().set_hung(true);
    tokio::time::sleep_until(granted_at + lease.renew_every() + Duration::from_millis(200)).await;
    mine.faults().set_hung(false);
    log.wait_for("the late renewal", |log| {
        log.histogram(m::RENEW_SECONDS, &lock).len() > renewed_before
    })
    .await;
    let late = log.histogram(m::RENEW_SECONDS, &lock);
    assert!(
        late.iter().any(|s| (s - 0.2).abs() < 1e-9),
        "renewal latencies: {late:?}"
    );
    assert!(
        late.iter().all(|s| (0.0..=0.2 + 1e-9).contains(s)),
        "{late:?}"
    );
    assert!(role.is_primary());

    // Step-down: the stubborn task is aborted after the grace, then the lock is released and b
    // takes it.
    let b_waits = tokio::spawn({
        let theirs = theirs.clone();
        let req = b_request.clone();
        async move { theirs.acquire(req).await.unwrap() }
    });
    elector.step_down().await.unwrap();
    let b2 = b_waits.await.unwrap();
    let b2_term = b2.term();
    assert_eq!(
        log.counter(m::TRANSITIONS, &[("reason", "stepped-down")]),
        1
    );
    assert_eq!(log.counter(m::TRANSITIONS, &[("reason", "released")]), 1);
    assert_eq!(log.counter(m::TASK_ABORTS, &[("task", "stubborn")]), 1);
    assert_eq!(log.counter(m::TASK_ABORTS, &[("task", "flaky")]), 0);
    wait_role(&mut role, |r| r.term() == Some(b2_term)).await;
    assert_eq!(*log.gauge(m::IS_PRIMARY, &lock).last().unwrap(), 0.0);
    assert_eq!(*log.gauge(m::TERM, &lock).last().unwrap(), b2_term as f64);

    // b hands back; a's renewals stop: fenced at its deadline, and the lock given back.
    b2.release().await.unwrap();
    let a2 = timeout(WAIT, role.wait_primary()).await.unwrap().term();
    assert!(a2 > b2_term);
    mine.faults().stop_renewals(true);
    log.wait_for("fencing", |log| {
        log.counter(m::TRANSITIONS, &[("reason", "fenced")]) == 1
    })
    .await;
    mine.faults().stop_renewals(false);
    log.wait_for("the release after fencing", |log| {
        log.counter(m::TRANSITIONS, &[("reason", "released")]) == 2
    })
    .await;

    // a campaigns again and wins; then the backend takes the lock away: lost, nothing released.
    let a3 = timeout(WAIT, role.wait_primary()).await.unwrap().term();
    assert!(a3 > a2);
    mine.faults().lose_locks(&mine);
    log.wait_for("the loss", |log| {
        log.counter(m::TRANSITIONS, &[("reason", "lost")]) == 1
    })
    .await;
    wait_role(&mut role, |r| !r.is_primary()).await;

    // Backend errors while campaigning: counted by operation, and the node stays secondary.
    mine.faults().set_failing(true);
    log.wait_for("failed acquisitions", |log| {
        log.counter(m::BACKEND_ERRORS, &[("op", "acquire")]) >= 2
    })
    .await;
    assert!(!role.is_primary());
    mine.faults().set_failing(false);
    let a4 = timeout(WAIT, role.wait_primary()).await.unwrap().term();
    assert!(a4 > a3);

    assert_eq!(log.counter(m::TRANSITIONS, &[("reason", "acquired")]), 4);
    assert_eq!(
        log.counter(m::TRANSITIONS, &[("reason", "stepped-down")]),
        1
    );
    assert_eq!(log.counter(m::TRANSITIONS, &[("reason", "fenced")]), 1);
    assert_eq!(log.counter(m::TRANSITIONS, &[("reason", "lost")]), 1);
    assert_eq!(log.counter(m::TRANSITIONS, &[("reason", "released")]), 2);
    assert_eq!(log.counter(m::TRANSITIONS, &[("reason", "shutdown")]), 0);
    assert_eq!(
        log.gauge(m::IS_PRIMARY, &lock),
        vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    );
    let terms = log.gauge(m::TERM, &lock);
    for t in [b1_term, a1, b2_term, a2, a3, a4] {
        assert!(
            terms.contains(&(t as f64)),
            "term {t} missing from {terms:?}"
        );
    }
    assert_eq!(*terms.last().unwrap(), a4 as f64);
    assert!(
        terms.windows(2).all(|w| w[0] < w[1]),
        "terms rise: {terms:?}"
    );
    assert_eq!(log.histogram(m::ACQUIRE_SECONDS, &lock).len(), 4);
    // The stubborn task ignored every term's end: aborted after each (step-down, fence, loss).
    assert_eq!(log.counter(m::TASK_ABORTS, &[("task", "stubborn")]), 3);

    // Every operation carries the lock label, and only tower-primary's names appear.
    for e in log.events() {
        assert!(
            e.labels.contains(&("lock".to_owned(), name.to_owned())),
            "{e:?}"
        );
        assert!(e.name.starts_with("tower_primary_"), "{e:?}");
    }

    elector.shutdown().await;
    assert_eq!(log.counter(m::TRANSITIONS, &[("reason", "shutdown")]), 1);
    assert_eq!(log.counter(m::TRANSITIONS, &[("reason", "released")]), 3);
    assert_eq!(log.counter(m::TASK_ABORTS, &[("task", "stubborn")]), 4);
    assert_eq!(stubborn_runs.load(Ordering::SeqCst), 4);
    assert_eq!(*log.gauge(m::IS_PRIMARY, &lock).last().unwrap(), 0.0);
}

/// Backend errors are counted by kind: a misconfiguration under its own name, anything else as
/// `transient`, on every retry.
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn backend_errors_are_counted_by_kind() {
    use tower_primary::Misconfiguration;
    use tower_primary::metrics as m;

    let log = recording::Log::default();
    let _recorder = metrics::set_default_local_recorder(&log);
    let name = "metrics-misconfigured";
    let backend = MemoryBackend::new();
    backend.faults().misconfigure(
        Misconfiguration::Permission,
        "cannot write the lock directory",
    );
    let elector = Elector::builder(name)
        .backend(backend.clone())
        .clock(Clock::tokio())
        .spawn()
        .unwrap();
    let permission = [("lock", name), ("kind", "permission")];
    log.wait_for("misconfigured acquisitions", |log| {
        log.counter(
            m::BACKEND_ERRORS,
            &[("op", "acquire"), ("kind", "permission")],
        ) >= 3
    })
    .await;
    // The holder record cannot be followed either: counted under its own operation.
    assert!(
        log.counter(
            m::BACKEND_ERRORS,
            &[("op", "watch"), ("kind", "permission")]
        ) >= 1
    );
    assert_eq!(log.counter(m::BACKEND_ERRORS, &[("kind", "transient")]), 0);
    let misconfigured = log.counter(m::BACKEND_ERRORS, &permission);
    assert!(!elector.handle().is_primary());
    assert_eq!(
        elector.handle().backend_error().map(|e| e.kind),
        Some(Misconfiguration::Permission)
    );

    // Now merely unreachable: transient.
    backend.faults().clear_misconfiguration();
    backend.faults().set_failing(true);
    log.wait_for("transient errors", |log| {
        log.counter(
            m::BACKEND_ERRORS,
            &[("op", "acquire"), ("kind", "transient")],
        ) >= 2
    })
    .await;
    assert_eq!(log.counter(m::BACKEND_ERRORS, &permission), misconfigured);
    backend.faults().set_failing(false);
    timeout(WAIT, elector.handle().wait_primary())
        .await
        .unwrap();
    assert!(elector.handle().backend_error().is_none());
    for e in log.events().iter().filter(|e| e.name == m::BACKEND_ERRORS) {
        assert!(
            e.labels.iter().any(|(k, _)| k == "kind") && e.labels.iter().any(|(k, _)| k == "op"),
            "{e:?}"
        );
    }
    elector.shutdown().await;
}

/// What the example service's `/metrics` shows: the Prometheus exporter renders the role
/// gauges and transitions with their help text and lock label.
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn prometheus_exporter_renders_the_role_of_each_lock() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _recorder = metrics::set_default_local_recorder(&recorder);
    let elector = Elector::builder("prom-jobs")
        .backend(MemoryBackend::new())
        .clock(Clock::tokio())
        .spawn()
        .unwrap();
    elector.handle().wait_primary().await;
    elector.singleton_task("noop", |_ctx| async { Ok::<_, std::io::Error>(()) });
    settle().await;

    let text = prometheus.render();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.contains(&r#"tower_primary_transitions_total{lock="prom-jobs",reason="acquired"} 1"#),
        "{text}"
    );
    assert!(
        lines.contains(&r#"tower_primary_task_starts_total{lock="prom-jobs",task="noop"} 1"#),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("# HELP tower_primary_is_primary ")),
        "{text}"
    );
    let term = elector.handle().term().unwrap();
    // The exporter prints large floats in exponent form; compare the value.
    let rendered_term = lines
        .iter()
        .find_map(|l| l.strip_prefix(r#"tower_primary_term{lock="prom-jobs"} "#))
        .expect("a term gauge");
    assert_eq!(rendered_term.parse::<f64>().unwrap(), term as f64, "{text}");
    elector.step_down().await.unwrap();
    let text = prometheus.render();
    assert!(
        text.lines()
            .any(|l| l == r#"tower_primary_is_primary{lock="prom-jobs"} 0"#),
        "{text}"
    );
    elector.shutdown().await;
}

/// Schedules count their runs by outcome, and a new primary counts the slots that passed while
/// nobody was primary, whatever its policy does with them (here: skip them). Schedules follow the
/// wall clock, so this runs on the real clock; the pause without a primary is the scenario itself.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn schedule_runs_and_slots_missed_without_a_primary_are_counted() {
    use tower_primary::metrics as m;
    use tower_primary::schedule::{Missed, Schedule};

    let log = recording::Log::default();
    let _recorder = metrics::set_default_local_recorder(&log);
    let name = "schedule-metrics";
    let every = Duration::from_millis(50);
    let store = MemoryBackend::new();
    let node = |id: &str, missed: Missed| {
        let elector = Elector::builder(name)
            .backend(store.connection())
            .node(NodeId::new(id))
            .spawn()
            .unwrap();
        let schedule = Schedule::every(every).unwrap().missed(missed);
        elector
            .schedule("tick", schedule, |_run| async {
                Ok::<_, std::io::Error>(())
            })
            .unwrap();
        elector
    };
    let first = node("first", Missed::default());
    first
        .schedule("failing", Schedule::every(every).unwrap(), |_run| async {
            Err::<(), _>("always fails")
        })
        .unwrap();
    log.wait_for("ok and failed runs", |log| {
        log.counter(m::SCHEDULE_RUNS, &[("job", "tick"), ("outcome", "ok")]) >= 2
            && log.counter(
                m::SCHEDULE_RUNS,
                &[("job", "failing"), ("outcome", "error")],
            ) >= 1
    })
    .await;
    assert_eq!(
        log.counter(m::SCHEDULE_RUNS, &[("job", "tick"), ("outcome", "error")]),
        0
    );
    assert!(
        log.counter(
            m::TASK_FAILURES,
            &[("task", "schedule:failing"), ("kind", "error")]
        ) >= 1
    );
    let stopped_at = std::time::Instant::now();
    first.shutdown().await;
    let missed_before = log.counter(m::SCHEDULE_MISSED, &[("job", "tick")]);

    // Ten slots pass without a primary.
    tokio::time::sleep(every * 10).await;
    let second = node("second", Missed::Skip);
    log.wait_for("the missed slots", |log| {
        log.counter(m::SCHEDULE_MISSED, &[("job", "tick")]) > missed_before
    })
    .await;
    let missed = log.counter(m::SCHEDULE_MISSED, &[("job", "tick")]) - missed_before;
    // At most the slots since the first node's last run, just before it stopped.
    let most = u64::try_from(stopped_at.elapsed().as_millis() / every.as_millis()).unwrap() + 2;
    assert!(
        (9..=most).contains(&missed),
        "missed {missed} slots (at most {most})"
    );
    for e in log.events() {
        assert!(
            e.labels.contains(&("lock".to_owned(), name.to_owned())),
            "{e:?}"
        );
    }
    second.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Tracing spans

mod spans {
    //! A subscriber layer that records spans with their fields.

    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Metadata, Subscriber};
    use tracing_subscriber::layer::{Context, Layer};
    use tracing_subscriber::registry::LookupSpan;

    #[derive(Clone, Debug, Default)]
    pub(crate) struct Span {
        pub(crate) name: &'static str,
        pub(crate) fields: Vec<(String, String)>,
    }

    impl Span {
        pub(crate) fn field(&self, name: &str) -> Option<&str> {
            self.fields
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
    }

    #[derive(Clone, Default)]
    pub(crate) struct Spans(pub(crate) Arc<Mutex<Vec<(u64, Span)>>>);

    struct Fields<'a>(&'a mut Vec<(String, String)>);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push((field.name().to_owned(), format!("{value:?}")));
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.push((field.name().to_owned(), value.to_owned()));
        }
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
        fn enabled(&self, _: &Metadata<'_>, _: Context<'_, S>) -> bool {
            true
        }
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
            if attrs.metadata().target() != "tower_primary::elector" {
                return;
            }
            let mut span = Span {
                name: attrs.metadata().name(),
                fields: Vec::new(),
            };
            attrs.record(&mut Fields(&mut span.fields));
            // Other tests' electors run in this process too.
            if span.field("lock") == Some(super::TRACED) {
                self.0.lock().unwrap().push((id.into_u64(), span));
            }
        }
        fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
            let mut spans = self.0.lock().unwrap();
            if let Some((_, span)) = spans.iter_mut().rev().find(|(i, _)| *i == id.into_u64()) {
                values.record(&mut Fields(&mut span.fields));
            }
        }
    }

    impl Spans {
        pub(crate) fn named(&self, name: &str) -> Vec<Span> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, s)| s.name == name)
                .map(|(_, s)| s.clone())
                .collect()
        }
    }
}

const TRACED: &str = "traced";

/// Acquisitions, renewals and releases each get a span with the lock and the term.
#[tokio::test(start_paused = true)]
async fn acquire_renew_and_release_are_traced_with_lock_and_term() {
    use tracing_subscriber::layer::SubscriberExt;

    let spans = spans::Spans::default();
    // The global default: a thread's own default can miss callsites that other tests' threads
    // registered first (tracing caches interest per callsite).
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .expect("the only test that installs a subscriber");
    let lease = Lease::new(Duration::from_secs(3));
    let elector = Elector::builder(TRACED)
        .backend(MemoryBackend::new().with_lease())
        .lease(lease)
        .clock(Clock::tokio())
        .spawn()
        .unwrap();
    let term = elector.handle().wait_primary().await.term().to_string();
    tokio::time::sleep(lease.renew_every() * 2 + Duration::from_millis(1)).await;
    elector.step_down().await.unwrap();

    let acquire = spans.named("acquire");
    assert!(!acquire.is_empty());
    let granted = acquire.last().unwrap();
    assert_eq!(granted.field("lock"), Some("traced"));
    assert_eq!(granted.field("term"), Some(term.as_str()));
    assert!(granted.field("node").is_some());
    let renew = spans.named("renew");
    assert_eq!(renew.len(), 2, "{renew:?}");
    for r in &renew {
        assert_eq!(r.field("lock"), Some("traced"));
        assert_eq!(r.field("term"), Some(term.as_str()));
        assert_eq!(r.field("took_ms"), Some("0"));
    }
    let release = spans.named("release");
    assert_eq!(release.len(), 1);
    assert_eq!(release[0].field("lock"), Some("traced"));
    assert_eq!(release[0].field("term"), Some(term.as_str()));
    assert_eq!(release[0].field("reason"), Some("stepped-down"));
    elector.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// /health/live

fn live_app(elector: &Elector) -> Router {
    Router::new()
        .route("/health/live", get(health::live))
        .layer(AddRoleLayer::new(elector.handle()))
}

async fn get_live(app: &Router) -> (StatusCode, Liveness) {
    let res = app
        .clone()
        .oneshot(Request::get("/health/live").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    assert_eq!(res.headers()["content-type"], "application/json");
    let body = axum::body::to_bytes(res.into_body(), 4096).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

/// Waits, without moving the paused clock, until the elector's loop is in `phase`.
async fn wait_phase(handle: &RoleHandle, phase: &str) {
    for _ in 0..10_000 {
        if handle.liveness().phase == phase {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never reached {phase}: {:?}", handle.liveness());
}

/// The memory backend hangs while the primary steps down: its loop waits on the release, and
/// `/health/live` turns 503 just past the bound, then 200 again once the elector gives up on the
/// release at the grace.
#[tokio::test(start_paused = true)]
async fn live_turns_unhealthy_within_its_bound_when_a_release_hangs() {
    let bound = Duration::from_secs(1);
    let grace = Duration::from_secs(10);
    let backend = MemoryBackend::new();
    let elector = Elector::builder("hung-release")
        .backend(backend.clone())
        .grace(grace)
        .liveness_bound(bound)
        .clock(Clock::tokio())
        .spawn()
        .unwrap();
    let app = live_app(&elector);
    let handle = elector.handle();
    handle.clone().wait_primary().await;
    let (status, live) = get_live(&app).await;
    assert_eq!(status, StatusCode::OK);
    assert!(live.live);
    assert_eq!(
        (live.phase.as_str(), live.bound_ms, live.lock.as_str()),
        ("running", Some(1_000), "hung-release")
    );

    // An idle, healthy loop stays fresh: it stamps its heartbeat every quarter of the bound.
    advance(Duration::from_secs(600)).await;
    settle().await;
    let (status, live) = get_live(&app).await;
    assert_eq!(status, StatusCode::OK, "{live:?}");
    assert!(live.since_progress_ms <= 250, "{live:?}");

    backend.faults().set_hung(true);
    let step_down = tokio::spawn({
        let elector = elector.clone();
        async move { elector.step_down().await }
    });
    wait_phase(&handle, "releasing").await;
    assert!(!handle.is_primary());
    advance(bound).await;
    let (status, live) = get_live(&app).await;
    assert_eq!(status, StatusCode::OK, "{live:?}");
    advance(Duration::from_millis(1)).await;
    let (status, live) = get_live(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!live.live);
    assert_eq!(live.phase, "releasing");
    assert_eq!(live.since_progress_ms, 1_001);
    assert!(live.reason.unwrap().contains("release"));

    // The elector gives up on the release after the grace and campaigns again: live.
    let res = timeout(grace, step_down).await.unwrap().unwrap();
    assert!(res.unwrap_err().to_string().contains("timed out"));
    let (status, live) = get_live(&app).await;
    assert_eq!(status, StatusCode::OK, "{live:?}");
    assert_eq!(live.phase, "running");

    backend.faults().set_hung(false);
    elector.shutdown().await;
    // A loop that ended on purpose is not stuck, however long ago that was.
    advance(Duration::from_secs(3600)).await;
    let (status, live) = get_live(&app).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(live.phase, "stopped");
}

/// A step-down that waits for a slow task up to the grace is a planned wait: live all along,
/// although the grace is far longer than the bound.
#[tokio::test(start_paused = true)]
async fn a_step_down_waiting_out_its_grace_stays_live() {
    let bound = Duration::from_secs(1);
    let grace = Duration::from_secs(30);
    let elector = Elector::builder("slow-task")
        .backend(MemoryBackend::new())
        .grace(grace)
        .liveness_bound(bound)
        .clock(Clock::tokio())
        .spawn()
        .unwrap();
    elector.singleton_task("slow", |_ctx| {
        std::future::pending::<Result<(), std::io::Error>>()
    });
    let handle = elector.handle();
    handle.clone().wait_primary().await;
    let step_down = tokio::spawn({
        let elector = elector.clone();
        async move { elector.step_down().await }
    });
    wait_phase(&handle, "stepping-down").await;
    let started = Instant::now();
    while started.elapsed() < grace {
        let live = handle.liveness();
        assert!(live.live, "at {:?}: {live:?}", started.elapsed());
        assert_eq!(live.since_progress_ms, 0);
        advance(Duration::from_secs(1)).await;
    }
    step_down.await.unwrap().unwrap();
    let live = handle.liveness();
    assert!(live.live, "{live:?}");
    assert_eq!(live.phase, "running");
    elector.shutdown().await;
}

/// A singleton task that ignores its cancellation and blocks its thread cannot be aborted; the
/// elector keeps the lock (it never releases while a task of the term runs) and `/health/live`
/// turns 503 once the abort is overdue by the bound, so an orchestrator restarts the process.
/// Needs real threads, so it runs on the real clock; the waits poll a state that only time
/// changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_turns_unhealthy_when_an_aborted_task_blocks_its_thread() {
    let bound = Duration::from_millis(200);
    let grace = Duration::from_millis(100);
    let dir = TempDir::new("wedged").unwrap();
    let elector = Elector::builder("wedged")
        .backend(FileBackend::new(dir.path()))
        .grace(grace)
        .liveness_bound(bound)
        .spawn()
        .unwrap();
    let (unblock, blocked) = std::sync::mpsc::channel::<()>();
    let blocked = Arc::new(Mutex::new(blocked));
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    elector.singleton_task("wedge", move |ctx| {
        let blocked = blocked.clone();
        let started_tx = started_tx.clone();
        async move {
            let _ = started_tx.send(());
            ctx.cancelled().await;
            // A shutdown hook that blocks the thread: no await, so no abort either.
            let _ = blocked.lock().unwrap().recv();
            Ok::<_, std::io::Error>(())
        }
    });
    let app = live_app(&elector);
    let handle = elector.handle();
    let node = handle.node().id().to_owned();
    handle.clone().wait_primary().await;
    timeout(WAIT, started.recv()).await.unwrap().unwrap();
    assert_eq!(get_live(&app).await.0, StatusCode::OK);

    let step_down = tokio::spawn({
        let elector = elector.clone();
        async move { elector.step_down().await }
    });
    let began = std::time::Instant::now();
    let stuck = timeout(WAIT, async {
        loop {
            let (status, live) = get_live(&app).await;
            if status == StatusCode::SERVICE_UNAVAILABLE {
                return live;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("/health/live never turned unhealthy");
    assert!(!stuck.live);
    assert_eq!(stuck.phase, "aborting-tasks", "{stuck:?}");
    assert!(stuck.reason.unwrap().contains("aborted singleton tasks"));
    // Unhealthy no earlier than the grace twice (drain, then the abort) plus the bound.
    assert!(
        began.elapsed() >= grace * 2 + bound,
        "{:?}",
        began.elapsed()
    );
    assert!(!handle.is_primary());
    // The lock is kept while the task runs.
    let holder = FileBackend::new(dir.path())
        .lock("wedged")
        .unwrap()
        .holder()
        .await
        .unwrap();
    assert_eq!(holder.map(|h| h.id), Some(node));
    assert!(!step_down.is_finished());

    // The task lets go: the abort completes, the lock is released, the loop is live again.
    unblock.send(()).unwrap();
    timeout(WAIT, step_down).await.unwrap().unwrap().unwrap();
    let (status, live) = get_live(&app).await;
    assert_eq!(status, StatusCode::OK, "{live:?}");
    elector.shutdown().await;
}

#[test]
fn a_zero_liveness_bound_is_a_configuration_error() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let err = Elector::builder("zero")
        .backend(MemoryBackend::new())
        .liveness_bound(Duration::ZERO)
        .spawn()
        .unwrap_err();
    assert!(err.to_string().contains("liveness bound"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The status tool

/// Runs `probe::follow` in the background and hands each status it prints to a channel.
fn follow(lock: Arc<dyn Lock>, name: &str) -> tokio::sync::mpsc::UnboundedReceiver<probe::Status> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let name = name.to_owned();
    tokio::spawn(async move {
        probe::follow(&*lock, &name, Duration::from_secs(3600), |status| {
            tx.send(status.clone()).is_ok()
        })
        .await
        .unwrap();
    });
    rx
}

async fn next_status(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<probe::Status>,
) -> probe::Status {
    timeout(WAIT, rx.recv()).await.unwrap().unwrap()
}

/// The checks every backend shares: the status of a primary, then `--watch` across a handover
/// from `a` to `b` and `b`'s shutdown.
async fn status_follows_a_handover(
    name: &str,
    status_lock: Arc<dyn Lock>,
    a: Elector,
    b: impl FnOnce() -> Elector,
    lease_ms: Option<u64>,
) {
    let ta = timeout(WAIT, a.handle().wait_primary())
        .await
        .expect("a became primary")
        .term();
    let status = probe::probe(&*status_lock, name).await.unwrap();
    let holder = status.holder.clone().expect("a holder");
    assert_eq!(holder.id, a.handle().node().id());
    assert_eq!((holder.term, holder.pid), (ta, std::process::id()));
    assert_eq!(holder.lease_ms, lease_ms);
    assert_eq!(status.process, Some(probe::Process::Alive));
    let text = status.to_string();
    assert!(text.contains(&format!("lock     {name}\n")), "{text}");
    assert!(
        text.contains(&format!("holder   {} (host ", holder.id)),
        "{text}"
    );
    assert!(text.contains(&format!("term     {ta}\n")), "{text}");
    assert!(text.contains("since    "), "{text}");
    assert!(text.contains("process  alive (same host)"), "{text}");

    let mut watch = follow(status_lock.clone(), name);
    let first = next_status(&mut watch).await;
    assert_eq!(first.holder.map(|h| (h.id, h.term)), Some((holder.id, ta)));
    let b = b();
    a.step_down().await.unwrap();
    let tb = timeout(WAIT, b.handle().wait_primary())
        .await
        .expect("b took over")
        .term();
    assert!(tb > ta);
    // Followed through every change: possibly "no holder" during the handover and the
    // registry's changes (b registering), then b.
    let mut seen = next_status(&mut watch).await;
    while seen.holder.as_ref().is_none_or(|h| h.term != tb) {
        seen = next_status(&mut watch).await;
    }
    let h = seen.holder.unwrap();
    assert_eq!((h.id.as_str(), h.term), (b.handle().node().id(), tb));
    // a first: a campaigning a would take the lock when b lets go.
    a.shutdown().await;
    b.shutdown().await;
    // (After the registry's changes: a and b withdrawing.)
    let mut gone = next_status(&mut watch).await;
    while gone.holder.is_some() {
        gone = next_status(&mut watch).await;
    }
    assert!(gone.holder.is_none(), "{gone:?}");
    assert!(gone.to_string().contains("holder   none"));
}

#[tokio::test]
async fn status_reports_and_follows_the_file_backend_holder() {
    let dir = TempDir::new("status").unwrap();
    let name = "status-file";
    let node = |id: &str| {
        Elector::builder(name)
            .backend(FileBackend::new(dir.path()))
            .node(NodeId::new(id))
            .spawn()
            .unwrap()
    };
    // The tool's own way in: a backend string.
    let url = format!("file://{}", dir.path().display());
    let status_lock = tower_primary::backend::from_url(&url)
        .unwrap()
        .lock(name)
        .unwrap();
    let a = node("status-a");
    status_follows_a_handover(name, status_lock, a, || node("status-b"), None).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn status_reports_and_follows_the_redis_holder() {
    use tower_primary_lab::servers::{self, RedisServer};

    let Some(server) = servers::require("redis-server", RedisServer::start().await) else {
        return;
    };
    let name = "status-redis";
    let lease = Lease::new(Duration::from_secs(1));
    // The maximum lease bounds the wait of a fresh server (default 30 s).
    let url = format!("{}?prefix=status-test&max_lease=1s", server.url());
    let node = |id: &str| {
        Elector::builder(name)
            .backend(tower_primary::backend::from_url(&url).unwrap())
            .node(NodeId::new(id))
            .lease(lease)
            .spawn()
            .unwrap()
    };
    let status_lock = tower_primary::backend::from_url(&url)
        .unwrap()
        .lock(name)
        .unwrap();
    let a = node("status-a");
    status_follows_a_handover(name, status_lock, a, || node("status-b"), Some(1_000)).await;
}

/// The process check: alive for this process, gone for one that exited, not checked on another
/// host.
#[test]
fn status_checks_the_holder_process_on_this_host() {
    let mut holder = tower_primary::Holder::new(&NodeId::new("me"), 7);
    assert_eq!(holder.host, probe::this_host());
    assert_eq!(probe::process_of(&holder), probe::Process::Alive);

    let mut child = std::process::Command::new("true").spawn().unwrap();
    holder.pid = child.id();
    child.wait().unwrap();
    assert_eq!(probe::process_of(&holder), probe::Process::Gone);
    let text = probe::Status {
        lock: "l".to_owned(),
        holder: Some(holder.clone()),
        process: Some(probe::process_of(&holder)),
        candidates: Vec::new(),
    }
    .to_string();
    assert!(text.contains("GONE"), "{text}");

    holder.host = format!("not-{}", holder.host);
    assert_eq!(probe::process_of(&holder), probe::Process::OtherHost);
}
