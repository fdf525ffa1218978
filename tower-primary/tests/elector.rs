//! The elector's timing logic on tokio's paused clock, with the memory backend and its faults:
//! self-fencing, task cancellation, abort after the grace, restart with backoff, fail-closed,
//! step-down and shutdown order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, advance, timeout};
use tower_primary::{
    Clock, ConfigError, Elector, ElectorBuilder, Error, Lease, MemoryBackend, Misconfiguration,
    NodeId, Role, RoleHandle,
};

const LEASE: Duration = Duration::from_secs(3);

fn elector(backend: &MemoryBackend, node: &str) -> Elector {
    Elector::builder("paused")
        .backend(backend.clone())
        .node(NodeId::new(node))
        .lease(Lease::new(LEASE))
        .grace(Duration::from_secs(2))
        .rejoin_delay(Duration::from_secs(1))
        .clock(Clock::tokio())
        .spawn()
        .unwrap()
}

/// Lets spawned tasks run without moving the paused clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

async fn wait_role(handle: &mut RoleHandle, pred: impl Fn(&Role) -> bool) -> Role {
    timeout(Duration::from_secs(60), async {
        loop {
            let role = handle.role();
            if pred(&role) {
                return role;
            }
            handle.changed().await;
        }
    })
    .await
    .expect("role did not change in time")
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Ev {
    Start(u64),
    Cancelled(u64),
}

/// A singleton task that reports its start and its cancellation.
fn reporting_task(elector: &Elector) -> mpsc::UnboundedReceiver<Ev> {
    let (tx, rx) = mpsc::unbounded_channel();
    elector.singleton_task("reporter", move |ctx| {
        let tx = tx.clone();
        async move {
            tx.send(Ev::Start(ctx.term())).ok();
            ctx.cancelled().await;
            tx.send(Ev::Cancelled(ctx.term())).ok();
            Ok::<_, std::io::Error>(())
        }
    });
    rx
}

#[tokio::test(start_paused = true)]
async fn primary_fences_itself_when_renewals_stop() {
    let backend = MemoryBackend::new().with_lease();
    let a = elector(&backend, "a");
    let mut events = reporting_task(&a);
    let ctx = a.handle().wait_primary().await;
    assert_eq!(events.recv().await, Some(Ev::Start(ctx.term())));

    backend.faults().stop_renewals(true);
    // Renewals confirmed so far were sent at most `ttl / 3` ago; the deadline is at most
    // `ttl - margin` after the last one.
    let started = Instant::now();
    let handle = a.handle();
    while handle.is_primary() {
        advance(Duration::from_millis(10)).await;
        assert!(
            started.elapsed() <= LEASE,
            "still primary a whole lease after renewals stopped"
        );
    }
    assert!(
        !ctx.is_valid(),
        "the term's context must be invalid past the deadline"
    );
    let fenced_after = started.elapsed();
    assert!(
        fenced_after >= LEASE - LEASE / 10 - LEASE / 3,
        "{fenced_after:?}"
    );
    settle().await;
    assert_eq!(events.recv().await, Some(Ev::Cancelled(ctx.term())));
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn no_other_node_is_primary_before_the_fenced_primarys_deadline() {
    let backend = MemoryBackend::new().with_lease();
    let a = elector(&backend, "a");
    let a_handle = a.handle();
    a_handle.clone().wait_primary().await;
    let b_backend = backend.connection();
    let b = elector(&b_backend, "b");
    let mut b_handle = b.handle();

    // A partition: a can neither renew nor reach the backend at all.
    backend.faults().stop_renewals(true);
    backend.faults().set_failing(true);
    let mut overlap = false;
    let deadline = Instant::now() + LEASE * 4;
    while !b_handle.is_primary() {
        assert!(Instant::now() < deadline, "b never took over");
        advance(Duration::from_millis(5)).await;
        settle().await;
        if b_handle.is_primary() && a_handle.is_primary() {
            overlap = true;
        }
    }
    assert!(!overlap, "two primaries at once");
    assert!(!a_handle.is_primary());
    let b_term = b_handle.wait_primary().await.term();
    assert!(b_term > 1);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn task_is_cancelled_at_once_when_the_lock_is_lost_and_the_node_rejoins() {
    let backend = MemoryBackend::new();
    let a = elector(&backend, "a");
    let mut events = reporting_task(&a);
    let mut handle = a.handle();
    let first = handle.wait_primary().await;
    assert_eq!(events.recv().await, Some(Ev::Start(first.term())));

    backend.faults().lose_locks(&backend);
    // No time passes: cancellation is immediate.
    settle().await;
    assert_eq!(
        events.try_recv().ok(),
        Some(Ev::Cancelled(first.term())),
        "cancellation was not immediate"
    );

    // It campaigns again and gets a higher term; the task restarts.
    let second = handle.wait_primary().await;
    assert!(second.term() > first.term());
    assert_eq!(events.recv().await, Some(Ev::Start(second.term())));
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn task_that_ignores_cancellation_is_aborted_after_the_grace_before_release() {
    struct Dropped(mpsc::UnboundedSender<Instant>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.send(Instant::now()).ok();
        }
    }
    let backend = MemoryBackend::new();
    let a = elector(&backend, "a");
    let (tx, mut dropped) = mpsc::unbounded_channel();
    a.singleton_task("stubborn", move |_ctx| {
        let guard = Dropped(tx.clone());
        async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok::<_, std::io::Error>(())
        }
    });
    a.handle().wait_primary().await;
    settle().await;
    let b = elector(&backend.connection(), "b");
    let mut b_handle = b.handle();

    let asked = Instant::now();
    let stepping = tokio::spawn({
        let a = a.clone();
        async move { a.step_down().await }
    });
    let aborted_at = dropped.recv().await.unwrap();
    assert_eq!(
        aborted_at - asked,
        Duration::from_secs(2),
        "aborted at the end of the grace"
    );
    b_handle.wait_primary().await;
    assert!(
        Instant::now() >= aborted_at,
        "lock released before the task was aborted"
    );
    stepping.await.unwrap().unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn failing_task_restarts_with_growing_backoff_and_ok_ends_it_for_the_term() {
    let backend = MemoryBackend::new();
    let a = elector(&backend, "a");
    let runs = Arc::new(AtomicUsize::new(0));
    let (tx, mut starts) = mpsc::unbounded_channel();
    a.singleton_task("flaky", {
        let runs = runs.clone();
        move |_ctx| {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            tx.send(Instant::now()).ok();
            async move {
                match n {
                    0 | 1 => Err(std::io::Error::other("boom")),
                    2 => panic!("task panicked on purpose"),
                    _ => Ok(()),
                }
            }
        }
    });
    a.handle().wait_primary().await;
    let mut at = Vec::new();
    for _ in 0..4 {
        at.push(
            timeout(Duration::from_secs(60), starts.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let gaps: Vec<_> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g > Duration::ZERO), "{gaps:?}");
    assert!(gaps[2] > gaps[0], "backoff does not grow: {gaps:?}");
    // Ok: done for this term, no fifth run.
    advance(Duration::from_secs(120)).await;
    settle().await;
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    assert!(starts.try_recv().is_err());

    // It runs again on the next promotion.
    a.step_down().await.unwrap();
    a.handle().wait_primary().await;
    assert!(
        timeout(Duration::from_secs(10), starts.recv())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 5);
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn backend_errors_keep_the_node_secondary_until_they_clear() {
    let backend = MemoryBackend::new();
    backend.faults().set_failing(true);
    let a = elector(&backend, "a");
    let mut handle = a.handle();
    wait_role(&mut handle, |r| matches!(r, Role::Secondary { .. })).await;
    for _ in 0..50 {
        advance(Duration::from_millis(200)).await;
        settle().await;
        assert!(
            !handle.is_primary(),
            "a failing backend made the node primary"
        );
    }
    backend.faults().set_failing(false);
    let ctx = handle.wait_primary().await;
    assert_eq!(ctx.term(), 1);
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_even_while_the_backend_hangs() {
    let backend = MemoryBackend::new();
    backend.faults().set_hung(true);
    let a = elector(&backend, "a");
    settle().await;
    assert_eq!(a.handle().role(), Role::Starting);
    timeout(Duration::from_secs(1), a.shutdown())
        .await
        .expect("shutdown hung on a hung backend");
    assert!(!a.handle().is_primary());
}

#[tokio::test(start_paused = true)]
async fn task_registered_while_primary_starts_at_once() {
    let backend = MemoryBackend::new();
    let a = elector(&backend, "a");
    let ctx = a.handle().wait_primary().await;
    let mut events = reporting_task(&a);
    settle().await;
    assert_eq!(
        events.try_recv().ok(),
        Some(Ev::Start(ctx.term())),
        "task did not start at once"
    );
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn step_down_hands_over_with_a_higher_term_and_secondaries_cannot_step_down() {
    let backend = MemoryBackend::new();
    let a = elector(&backend, "a");
    let first = a.handle().wait_primary().await.term();
    let b = elector(&backend.connection(), "b");
    let mut b_handle = b.handle();
    let holder = wait_role(&mut b_handle, |r| {
        matches!(r, Role::Secondary { holder: Some(_) })
    })
    .await;
    assert_eq!(holder.term(), Some(first));
    match b.step_down().await {
        Err(Error::NotPrimary { .. }) => {}
        other => panic!("expected NotPrimary, got {other:?}"),
    }
    a.step_down().await.unwrap();
    let second = b_handle.wait_primary().await.term();
    assert!(second > first);
    // a rejoins as a secondary that knows the new holder.
    let mut a_handle = a.handle();
    let role = wait_role(
        &mut a_handle,
        |r| matches!(r, Role::Secondary { holder: Some(h) } if h.id == "b"),
    )
    .await;
    assert_eq!(role.term(), Some(second));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_admitting_then_cancels_then_waits_for_in_flight_work_then_releases() {
    let backend = MemoryBackend::new();
    let a = elector(&backend, "a");
    let mut events = reporting_task(&a);
    let handle = a.handle();
    let ctx = handle.clone().wait_primary().await;
    assert_eq!(events.recv().await, Some(Ev::Start(ctx.term())));
    let request = ctx.in_flight();
    let b = elector(&backend.connection(), "b");
    let mut b_handle = b.handle();

    let shutting = tokio::spawn({
        let a = a.clone();
        async move { a.shutdown().await }
    });
    settle().await;
    // Stopped admitting, term cancelled, task told, but the lock is still held for the request.
    assert!(!handle.is_primary());
    assert!(!ctx.is_valid());
    assert_eq!(events.recv().await, Some(Ev::Cancelled(ctx.term())));
    assert!(!b_handle.is_primary());
    advance(Duration::from_millis(500)).await;
    settle().await;
    assert!(
        !b_handle.is_primary(),
        "released while a request was in flight"
    );
    assert!(!shutting.is_finished());
    drop(request);
    shutting.await.unwrap();
    b_handle.wait_primary().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn exit_on_loss_stops_the_campaign() {
    let backend = MemoryBackend::new();
    let a = Elector::builder("paused")
        .backend(backend.clone())
        .exit_on_loss(true)
        .clock(Clock::tokio())
        .spawn()
        .unwrap();
    a.handle().wait_primary().await;
    backend.faults().lose_locks(&backend);
    timeout(Duration::from_secs(10), a.stopped()).await.unwrap();
    settle().await;
    assert!(!a.handle().is_primary());
    // Nobody campaigns for it any more.
    let b = elector(&backend.connection(), "b");
    assert_eq!(b.handle().wait_primary().await.term(), 2);
    b.shutdown().await;
}

#[tokio::test]
async fn invalid_configuration_is_refused_with_the_rule_it_broke() {
    let lease_backend = MemoryBackend::new().with_lease();
    let cases: Vec<(Result<Elector, ConfigError>, &str)> = vec![
        (
            Elector::builder("x")
                .backend(MemoryBackend::new())
                .grace(Duration::ZERO)
                .spawn(),
            "invalid grace",
        ),
        (
            Elector::builder("x")
                .backend(lease_backend.clone())
                .lease(Lease::new(Duration::from_millis(1)))
                .spawn(),
            "invalid lease",
        ),
        (
            Elector::builder("x")
                .backend(lease_backend)
                .lease(Lease::new(Duration::from_secs(3)).with_margin(Duration::from_secs(1)))
                .spawn(),
            "invalid lease margin",
        ),
        (
            Elector::builder("../etc")
                .backend(MemoryBackend::new())
                .spawn(),
            "invalid lock name",
        ),
        (Elector::builder("x").spawn(), "no backend configured"),
    ];
    for (res, expect) in cases {
        let err = res.unwrap_err().to_string();
        assert!(
            err.starts_with(expect),
            "{err:?} should start with {expect:?}"
        );
    }
}

#[test]
fn spawn_outside_a_runtime_says_so() {
    let err = Elector::builder("x")
        .backend(MemoryBackend::new())
        .spawn()
        .unwrap_err();
    assert!(matches!(err, ConfigError::NoRuntime { .. }), "{err}");
    assert!(err.to_string().contains("inside a tokio runtime"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn renewal_confirmed_after_the_deadline_extends_nothing() {
    let backend = MemoryBackend::new().with_lease();
    let a = elector(&backend, "a");
    let mut handle = a.handle();
    let ctx = handle.wait_primary().await;
    // Renewals are sent but their replies are held back past the deadline, then delivered.
    backend.faults().set_hung(true);
    advance(LEASE).await;
    backend.faults().set_hung(false);
    settle().await;
    assert!(!ctx.is_valid(), "a late renewal revived an expired term");
    let role = handle.role();
    assert!(
        role.term() != Some(ctx.term()) || !role.is_primary(),
        "still primary in term {} after its deadline: {role:?}",
        ctx.term()
    );
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_node_whose_renewals_keep_failing_does_not_starve_a_healthy_waiter() {
    let backend = MemoryBackend::new().with_lease();
    let a = elector(&backend, "a");
    let first = a.handle().wait_primary().await.term();
    let b = elector(&backend.connection(), "b");
    let mut b_handle = b.handle();
    // a can still acquire, but its renewals never land: it fences itself every term.
    backend.faults().stop_renewals(true);
    let ctx = timeout(LEASE * 3, b_handle.wait_primary())
        .await
        .expect("the healthy node never became primary");
    assert!(ctx.term() > first);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn huge_or_zero_settings_are_refused_at_spawn_with_the_rule_they_broke() {
    let huge = Duration::MAX;
    let base = || {
        Elector::builder("x")
            .backend(MemoryBackend::new().with_lease())
            .clock(Clock::tokio())
    };
    let cases: Vec<(ElectorBuilder, &str)> = vec![
        (base().grace(huge), "invalid grace"),
        (base().retry_backoff(huge, huge), "invalid retry backoff"),
        (
            base().retry_backoff(Duration::from_millis(100), huge),
            "invalid retry backoff maximum",
        ),
        (base().rejoin_delay(huge), "invalid rejoin delay"),
        (base().liveness_bound(huge), "invalid liveness bound"),
        (base().lease(Lease::new(huge)), "invalid lease"),
        (
            base().lease(Lease::new(Duration::from_secs(3)).with_margin(Duration::ZERO)),
            "invalid lease margin",
        ),
    ];
    for (builder, expect) in cases {
        let err = builder
            .spawn()
            .map(|e| drop(tokio::spawn(async move { e.shutdown().await })))
            .expect_err(expect)
            .to_string();
        assert!(
            err.starts_with(expect) && err.contains("must"),
            "{err:?} should start with {expect:?} and say the rule"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn largest_accepted_settings_do_not_panic_when_backoff_and_delays_grow() {
    let backend = MemoryBackend::new().with_lease();
    let day = Duration::from_secs(86_400);
    let e = Elector::builder("x")
        .backend(backend.clone())
        .lease(Lease::new(day))
        .grace(day)
        .retry_backoff(day, day)
        .rejoin_delay(day)
        .liveness_bound(day)
        .clock(Clock::tokio())
        .spawn()
        .unwrap();
    e.handle().wait_primary().await;
    // A failing backend makes the backoff grow, a loss starts the rejoin delay.
    backend.faults().set_failing(true);
    backend.faults().lose_locks(&backend);
    let mut role = e.handle();
    wait_role(&mut role, |r| !matches!(r, Role::Primary { .. })).await;
    advance(day * 3).await;
    settle().await;
    backend.faults().set_failing(false);
    advance(day * 3).await;
    let ctx = timeout(day * 10, role.wait_primary())
        .await
        .expect("primary again: the campaign loop survived");
    assert!(ctx.term() > 1);
    e.shutdown().await;
}

// ------------------------------------------------------------------------------------------------
// A singleton task never starts for a term that has ended.

mod start_race {
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    use tokio::sync::mpsc;
    use tower_primary::TermContext;
    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::Context;

    pub(super) const LOCK: &str = "start-race";
    pub(super) const TASK: &str = "late-starter";

    /// What the hook needs from the test: the term to wait for, and where to say it is waiting.
    pub(super) struct Hook {
        pub(super) term: OnceLock<TermContext>,
        pub(super) entered: Mutex<Option<mpsc::UnboundedSender<()>>>,
    }

    pub(super) static HOOK: Hook = Hook {
        term: OnceLock::new(),
        entered: Mutex::new(None),
    };

    #[derive(Default)]
    struct Fields {
        message: String,
        lock: String,
        task: String,
    }

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            let v = format!("{value:?}");
            match field.name() {
                "message" => self.message = v,
                "lock" => self.lock = v,
                "task" => self.task = v.trim_matches('"').to_owned(),
                _ => {}
            }
        }
    }

    /// Stops the thread that is starting the task, at the elector's "starting" event, until the
    /// term has been cancelled: the widest possible race between the start and the end of a term.
    pub(super) struct Layer;

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Layer {
        fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
            let mut f = Fields::default();
            event.record(&mut f);
            if f.lock != LOCK || f.task != TASK || !f.message.contains("starting") {
                return;
            }
            let Some(entered) = HOOK.entered.lock().unwrap().take() else {
                return;
            };
            entered.send(()).ok();
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if HOOK.term.get().is_some_and(|t| t.token().is_cancelled()) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    pub(super) fn install() {
        super::install_subscriber();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_is_never_started_for_a_term_that_ended_while_it_was_being_started() {
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    *start_race::HOOK.entered.lock().unwrap() = Some(entered_tx);
    start_race::install();
    let e = Elector::builder(start_race::LOCK)
        .backend(MemoryBackend::new())
        .grace(Duration::from_secs(20))
        .spawn()
        .unwrap();
    let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
    e.singleton_task(start_race::TASK, {
        let starts = starts.clone();
        move |ctx: tower_primary::TermContext| {
            // What the factory sees when it is called: was the term already over?
            starts.lock().unwrap().push(ctx.token().is_cancelled());
            async move {
                ctx.cancelled().await;
                Ok::<_, std::io::Error>(())
            }
        }
    });
    let ctx = e.handle().wait_primary().await;
    start_race::HOOK.term.set(ctx).ok();
    // The supervisor has passed its own checks and is about to start the task: end the term.
    timeout(Duration::from_secs(20), entered.recv())
        .await
        .expect("the task's start was reached")
        .unwrap();
    e.shutdown().await;
    let starts = starts.lock().unwrap().clone();
    assert!(
        starts.iter().all(|cancelled| !cancelled),
        "a task was started for a cancelled term: {starts:?}"
    );
}

// ------------------------------------------------------------------------------------------------
// A misconfigured backend: reported once per cause, visible on the handle, fail closed.

/// The one subscriber of this test binary (the global default: a thread's own default can miss
/// callsites that other tests' threads registered first, as tracing caches interest per
/// callsite): the start-race hook and the log capture.
fn install_subscriber() {
    use tracing_subscriber::layer::SubscriberExt;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::registry()
            .with(start_race::Layer)
            .with(logs::Layer);
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    });
}

mod logs {
    //! A subscriber layer that records the elector's events, by lock.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::Context;

    #[derive(Clone, Debug)]
    pub(super) struct Event {
        pub(super) level: tracing::Level,
        pub(super) message: String,
        pub(super) fields: String,
    }

    #[derive(Default)]
    struct Fields {
        message: String,
        lock: String,
        all: String,
    }

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            let v = format!("{value:?}");
            self.all.push_str(&format!("{}={v} ", field.name()));
            match field.name() {
                "message" => self.message = v,
                "lock" => self.lock = v.trim_matches('"').to_owned(),
                _ => {}
            }
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "lock" {
                self.lock = value.to_owned();
            }
            self.all.push_str(&format!("{}={value} ", field.name()));
        }
    }

    type Sink = Arc<Mutex<Vec<Event>>>;

    /// The sinks of the locks being captured.
    static SINKS: Mutex<Option<HashMap<&'static str, Sink>>> = Mutex::new(None);

    pub(super) struct Layer;

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Layer {
        fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
            let mut f = Fields::default();
            event.record(&mut f);
            let sink = SINKS
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|sinks| sinks.get(f.lock.as_str()).cloned());
            if let Some(sink) = sink {
                sink.lock().unwrap().push(Event {
                    level: *event.metadata().level(),
                    message: f.message,
                    fields: f.all,
                });
            }
        }
    }

    #[derive(Clone)]
    pub(super) struct Events(Sink);

    impl Events {
        /// Records the events of `lock` from now on.
        pub(super) fn capture(lock: &'static str) -> Self {
            super::install_subscriber();
            let sink = Sink::default();
            SINKS
                .lock()
                .unwrap()
                .get_or_insert_with(HashMap::new)
                .insert(lock, sink.clone());
            Events(sink)
        }

        /// The events at `level` whose message contains `text`.
        pub(super) fn count(&self, level: tracing::Level, text: &str) -> usize {
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.level == level && e.message.contains(text))
                .count()
        }

        pub(super) fn at(&self, level: tracing::Level) -> Vec<Event> {
            let events = self.0.lock().unwrap();
            events
                .iter()
                .filter(|e| e.level == level)
                .cloned()
                .collect()
        }
    }
}

/// Moves the paused clock by `total` in steps, letting the elector run at each.
async fn run_for(total: Duration) {
    let step = Duration::from_millis(100);
    let mut gone = Duration::ZERO;
    while gone < total {
        advance(step).await;
        settle().await;
        gone += step;
    }
}

fn misconfigured_elector(lock: &str, backend: &MemoryBackend) -> ElectorBuilder {
    Elector::builder(lock)
        .backend(backend.clone())
        .node(NodeId::new("a"))
        .clock(Clock::tokio())
}

#[tokio::test(start_paused = true)]
async fn a_misconfiguration_is_logged_at_error_once_per_cause_and_its_end_at_info() {
    use tracing::Level;
    const LOCK: &str = "misconfigured-logs";
    let events = logs::Events::capture(LOCK);
    let backend = MemoryBackend::new();
    backend
        .faults()
        .misconfigure(Misconfiguration::Authentication, "wrong password");
    let a = misconfigured_elector(LOCK, &backend).spawn().unwrap();
    let handle = a.handle();

    // A minute of retries (the backoff reaches its 5 s maximum): one ERROR, no WARN.
    run_for(Duration::from_secs(60)).await;
    assert!(
        !handle.is_primary(),
        "a misconfigured backend made the node primary"
    );
    assert!(matches!(handle.role(), Role::Secondary { holder: None }));
    let errors = events.at(Level::ERROR);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].message.contains("misconfigured"), "{errors:?}");
    assert!(errors[0].fields.contains("authentication"), "{errors:?}");
    assert!(errors[0].fields.contains("wrong password"), "{errors:?}");
    assert_eq!(
        events.at(Level::WARN).len(),
        0,
        "{:?}",
        events.at(Level::WARN)
    );
    // Still retrying: the repeats go to DEBUG.
    assert!(events.count(Level::DEBUG, "still misconfigured") >= 10);

    // The same kind with another message is another cause: logged again, once.
    backend.faults().misconfigure(
        Misconfiguration::Authentication,
        "user \"app\" does not exist",
    );
    run_for(Duration::from_secs(30)).await;
    assert_eq!(events.at(Level::ERROR).len(), 2);
    // So is another kind.
    backend
        .faults()
        .misconfigure(Misconfiguration::Tls, "the server wants TLS");
    run_for(Duration::from_secs(30)).await;
    let errors = events.at(Level::ERROR);
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[2].fields.contains("tls"), "{errors:?}");
    assert_eq!(events.count(Level::INFO, "resolved"), 0);

    // Fixed: the backend answers, the end is logged once, and the node becomes primary.
    backend.faults().clear_misconfiguration();
    let mut role = a.handle();
    timeout(Duration::from_secs(10), role.wait_primary())
        .await
        .expect("primary once the backend is fixed");
    assert_eq!(
        events.count(Level::INFO, "resolved"),
        1,
        "{:?}",
        events.at(Level::INFO)
    );
    assert_eq!(events.at(Level::ERROR).len(), 3);
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn transient_errors_stay_warnings_on_every_retry() {
    use tracing::Level;
    const LOCK: &str = "transient-logs";
    let events = logs::Events::capture(LOCK);
    let backend = MemoryBackend::new();
    backend.faults().set_failing(true);
    let a = misconfigured_elector(LOCK, &backend).spawn().unwrap();
    run_for(Duration::from_secs(10)).await;
    assert!(events.count(Level::WARN, "acquire failed") >= 3);
    assert_eq!(events.at(Level::ERROR).len(), 0);
    assert!(a.handle().backend_error().is_none());
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn backend_error_shows_the_misconfiguration_until_the_backend_answers_again() {
    let backend = MemoryBackend::new();
    let b = elector(&backend, "b");
    b.handle().wait_primary().await;
    // A second node whose backend refuses it, while b holds the lock.
    let mine = backend.connection();
    mine.faults().misconfigure(
        Misconfiguration::IncompatibleLease,
        "lease 3s, others use 10s",
    );
    let a = elector(&mine, "a");
    let handle = a.handle();
    assert!(handle.backend_error().is_none());
    run_for(Duration::from_secs(1)).await;
    let shown = handle
        .backend_error()
        .expect("the misconfiguration is shown");
    assert_eq!(shown.kind, Misconfiguration::IncompatibleLease);
    assert_eq!(shown.message, "lease 3s, others use 10s");
    assert!(!handle.is_primary());

    // Repeats of the same cause keep the first time it was met.
    run_for(Duration::from_secs(20)).await;
    assert_eq!(handle.backend_error(), Some(shown.clone()));

    // Answers again (b still holds the lock): cleared, and a follows b as secondary. The bound:
    // the retry under way starts within the retry backoff's maximum (5 s) and must then wait 2 s
    // without an error.
    mine.faults().clear_misconfiguration();
    run_for(Duration::from_secs(8)).await;
    assert!(handle.backend_error().is_none());
    match handle.role() {
        Role::Secondary { holder: Some(h) } => assert_eq!(h.id, "b"),
        other => panic!("a should follow b: {other:?}"),
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A misconfiguration met by the acquisition is not ended by the holder watch answering; it
/// ends when a retried acquisition has waited for the lock without an error for a while (2 s).
#[tokio::test(start_paused = true)]
async fn an_acquisitions_misconfiguration_ends_when_a_retry_waits_without_error() {
    use tracing::Level;
    const LOCK: &str = "misconfigured-acquire";
    let events = logs::Events::capture(LOCK);
    let backend = MemoryBackend::new();
    let holder = Elector::builder(LOCK)
        .backend(backend.clone())
        .node(NodeId::new("b"))
        .clock(Clock::tokio())
        .spawn()
        .unwrap();
    holder.handle().wait_primary().await;
    let mine = backend.connection();
    mine.faults()
        .misconfigure(Misconfiguration::Permission, "may not take the lock");
    let a = misconfigured_elector(LOCK, &mine).spawn().unwrap();
    run_for(Duration::from_secs(1)).await;
    let errors = events.at(Level::ERROR);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].fields.contains("op=acquire"), "{errors:?}");

    // Fixed: the next retry waits for b's lock like any secondary's. The holder watch answers
    // at once; the report ends only once the retry has waited 2 s without an error.
    mine.faults().clear_misconfiguration();
    let fixed = Instant::now();
    let handle = a.handle();
    // No event announces the report's end (it is read with the role): step the paused clock.
    while handle.backend_error().is_some() {
        assert!(
            fixed.elapsed() < Duration::from_secs(30),
            "the misconfiguration never ended"
        );
        run_for(Duration::from_millis(100)).await;
    }
    assert!(
        fixed.elapsed() >= Duration::from_secs(2),
        "ended by the holder watch after {:?}",
        fixed.elapsed()
    );
    assert_eq!(events.count(Level::INFO, "resolved"), 1);
    assert_eq!(events.at(Level::ERROR).len(), 1);
    match a.handle().role() {
        Role::Secondary { holder: Some(h) } => assert_eq!(h.id, "b"),
        other => panic!("a should follow b: {other:?}"),
    }
    a.shutdown().await;
    holder.shutdown().await;
}

// ------------------------------------------------------------------------------------------------
// spawn_checked

#[tokio::test(start_paused = true)]
async fn spawn_checked_returns_a_misconfiguration_at_once_and_leaves_nothing_running() {
    let store = MemoryBackend::new();
    let broken = store.connection();
    broken.faults().misconfigure(
        Misconfiguration::MissingDatabase,
        "database \"jobs\" does not exist",
    );
    let started = Instant::now();
    let err = misconfigured_elector("checked", &broken)
        .spawn_checked()
        .await
        .unwrap_err();
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "returned at the first error"
    );
    assert_eq!(
        err.misconfiguration(),
        Some(Misconfiguration::MissingDatabase)
    );
    assert!(
        err.to_string().contains("database \"jobs\" does not exist"),
        "{err}"
    );
    // Nothing took the lock, nothing campaigns: the next node gets the first term.
    broken.faults().clear_misconfiguration();
    let other = elector(&store, "b");
    assert_eq!(other.handle().wait_primary().await.term(), 1);
    run_for(Duration::from_secs(10)).await;
    assert!(other.handle().is_primary());
    other.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn spawn_checked_is_ok_once_the_backend_answered_as_primary_or_secondary() {
    let store = MemoryBackend::new();
    let a = misconfigured_elector("checked-ok", &store)
        .spawn_checked()
        .await
        .unwrap();
    assert!(a.handle().is_primary());
    let b = Elector::builder("checked-ok")
        .backend(store.connection())
        .node(NodeId::new("b"))
        .clock(Clock::tokio())
        .spawn_checked()
        .await
        .unwrap();
    match b.handle().role() {
        Role::Secondary { holder: Some(h) } => assert_eq!(h.id, "a"),
        other => panic!("b should know a holds the lock: {other:?}"),
    }
    // Still campaigning: b takes over when a steps down.
    a.step_down().await.unwrap();
    assert_eq!(b.handle().wait_primary().await.term(), 2);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn spawn_checked_retries_transient_errors_up_to_the_check_timeout() {
    let backend = MemoryBackend::new();
    backend.faults().set_failing(true);
    let started = Instant::now();
    let err = misconfigured_elector("checked-transient", &backend)
        .check_timeout(Duration::from_secs(5))
        .spawn_checked()
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(err.misconfiguration(), None);

    // A backend that does not answer at all.
    let hung = MemoryBackend::new();
    hung.faults().set_hung(true);
    let err = misconfigured_elector("checked-hung", &hung)
        .check_timeout(Duration::from_secs(2))
        .spawn_checked()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no answer within 2s"), "{err}");

    // Errors that clear within the timeout: Ok.
    let flaky = MemoryBackend::new();
    flaky.faults().set_failing(true);
    let check = tokio::spawn(misconfigured_elector("checked-flaky", &flaky).spawn_checked());
    advance(Duration::from_secs(3)).await;
    settle().await;
    flaky.faults().set_failing(false);
    let e = check
        .await
        .unwrap()
        .expect("answered within the check timeout");
    assert!(e.handle().is_primary());
    e.shutdown().await;

    // The check timeout is a checked setting.
    let err = misconfigured_elector("x", &flaky)
        .check_timeout(Duration::ZERO)
        .spawn_checked()
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("invalid check timeout"),
        "{err}"
    );
}

/// A call that cannot start creates nothing: the lock directory stays empty.
#[cfg(feature = "file")]
#[test]
fn spawn_outside_a_runtime_creates_nothing_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let err = Elector::builder("x")
        .backend(tower_primary::FileBackend::new(dir.path()))
        .spawn()
        .unwrap_err();
    assert!(matches!(err, ConfigError::NoRuntime { .. }), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "created before the runtime check: {left:?}"
    );
    // Neither does an invalid setting inside a runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let err = Elector::builder("x")
            .backend(tower_primary::FileBackend::new(dir.path()))
            .grace(Duration::ZERO)
            .spawn_checked()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
    });
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "created before the settings were checked: {left:?}"
    );
}

/// On a multi-threaded runtime too, the role is published by the time `spawn_checked` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_checked_returns_with_the_role_published() {
    let store = MemoryBackend::new();
    for _ in 0..20 {
        let a = Elector::builder("checked-published")
            .backend(store.clone())
            .node(NodeId::new("a"))
            .spawn_checked()
            .await
            .unwrap();
        assert!(a.handle().is_primary());
        let b = Elector::builder("checked-published")
            .backend(store.connection())
            .node(NodeId::new("b"))
            .spawn_checked()
            .await
            .unwrap();
        match b.handle().role() {
            Role::Secondary { holder: Some(h) } => assert_eq!(h.id, "a"),
            other => panic!("b should know a holds the lock: {other:?}"),
        }
        b.shutdown().await;
        a.shutdown().await;
    }
}
