//! The harness every check runs in: the lock, the recorder, nodes and bounded waits.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::thread_node::{ThreadNode, run_thread_node};
use super::{Connection, Fixture};
use crate::history::{History, Period, Recorder};
use tower_primary::backend::{Backend, Lock};
use tower_primary::clock::{Clock, monotonic_nanos};
use tower_primary::role::{NodeId, RoleHandle, TermContext};
use tower_primary::{Elector, ElectorBuilder};

/// One check's context: the fixture, the lock, the recorder and the bounds.
pub(super) struct Harness<'f, F: ?Sized> {
    fixture: &'f F,
    check: &'static str,
    lock: String,
    pub(super) recorder: Recorder,
    pub(super) clock: Clock,
    bound: Duration,
    backend: OnceLock<&'static str>,
}

impl<'f, F: Fixture + ?Sized> Harness<'f, F> {
    pub(super) fn new(fixture: &'f F, check: &'static str) -> Self {
        Harness {
            fixture,
            check,
            lock: fixture.lock_name(check),
            recorder: Recorder::new(),
            clock: Clock::system(),
            bound: fixture.timeout(),
            backend: OnceLock::new(),
        }
    }

    pub(super) fn connect(&self) -> Connection {
        let conn = self.fixture.connect();
        let _ = self.backend.set(conn.backend().name());
        conn
    }

    pub(super) fn lock(&self, conn: &Connection) -> Arc<dyn Lock> {
        match conn.backend().lock(&self.lock) {
            Ok(lock) => lock,
            Err(err) => self.fail(format!("Backend::lock({:?}) failed: {err}", self.lock)),
        }
    }

    fn builder(&self, id: &str, conn: &Connection) -> ElectorBuilder {
        let builder = Elector::builder(self.lock.clone())
            .backend(conn.backend().clone())
            .node(NodeId::new(id))
            .clock(self.clock)
            .grace(Duration::from_secs(5))
            // Long: a node that stepped down rejoins as soon as another node holds the lock, and
            // must not race the waiting node for it meanwhile.
            .rejoin_delay(Duration::from_secs(2))
            .retry_backoff(Duration::from_millis(20), Duration::from_millis(200));
        match self.fixture.lease() {
            Some(lease) => builder.lease(lease),
            None => builder,
        }
    }

    /// An elector on a new connection, on the current runtime, tracked by the recorder.
    pub(super) fn spawn(&self, id: &str) -> Node {
        self.spawn_on(id, self.connect(), |b| b)
    }

    /// Like [`spawn`](Self::spawn), then waits until the new node reads `holder` (with `term`)
    /// as the holder: it campaigns as a secondary from then on.
    pub(super) async fn follower(&self, id: &str, holder: &str, term: u64) -> Node {
        let node = self.spawn(id);
        self.within(
            &format!("{id} to see {holder} as the holder"),
            holder_is(&node.handle, holder, Some(term)),
        )
        .await;
        node
    }

    /// Primary `a` on a thread of its own (it can be paused), its task running and reporting to
    /// the returned receiver, and `b` following it.
    pub(super) async fn pausable_primary_and_follower(
        &self,
    ) -> (
        ThreadNode,
        TermContext,
        mpsc::UnboundedReceiver<TaskEvent>,
        Node,
    ) {
        let (tx, mut events) = mpsc::unbounded_channel();
        let a = self.thread_node("a", move |e| watch_task(e, tx)).await;
        let ctx_a = self.within("a to become primary", a.primary()).await;
        self.expect_event(
            "a's task to start",
            &mut events,
            TaskEvent::Started(ctx_a.term()),
        )
        .await;
        let b = self.follower("b", "a", ctx_a.term()).await;
        (a, ctx_a, events, b)
    }

    /// Node `b`, whose singleton task logs `b started` to `log` and sends its term, once it has
    /// read `a` as the holder.
    pub(super) async fn logging_successor(
        &self,
        log: &Log,
    ) -> (Node, mpsc::UnboundedReceiver<u64>) {
        let b = self.spawn("b");
        let (tx, started) = mpsc::unbounded_channel();
        let log = log.clone();
        b.elector
            .singleton_task("conformance-successor", move |ctx| {
                log.push("b started");
                let _ = tx.send(ctx.term());
                async { Ok::<(), Infallible>(()) }
            });
        self.within("b to see a as the holder", holder_is(&b.handle, "a", None))
            .await;
        (b, started)
    }

    pub(super) fn spawn_on(
        &self,
        id: &str,
        conn: Connection,
        configure: impl FnOnce(ElectorBuilder) -> ElectorBuilder,
    ) -> Node {
        let elector = match configure(self.builder(id, &conn)).spawn() {
            Ok(elector) => elector,
            Err(err) => self.fail(format!("spawning elector {id} failed: {err}")),
        };
        self.recorder.track(&elector);
        Node {
            id: id.to_owned(),
            recorder: self.recorder.clone(),
            handle: elector.handle(),
            conn,
            elector,
        }
    }

    /// An elector on its own current-thread runtime in its own thread, which can be paused,
    /// resumed, killed or shut down. `setup` runs on the new elector before it campaigns.
    pub(super) async fn thread_node(
        &self,
        id: &str,
        setup: impl FnOnce(&Elector) + Send + 'static,
    ) -> ThreadNode {
        let conn = self.connect();
        let builder = self.builder(id, &conn);
        let recorder = self.recorder.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let spawned = std::thread::Builder::new()
            .name(format!("conformance-{id}"))
            .spawn(move || run_thread_node(builder, recorder, setup, ready_tx, cmd_rx));
        if let Err(err) = spawned {
            self.fail(format!("cannot start a thread for node {id}: {err}"));
        }
        let handle = match self.within("the node thread to start", ready_rx).await {
            Ok(Ok(handle)) => handle,
            Ok(Err(err)) => self.fail(format!(
                "starting node {id} on its own runtime failed: {err}"
            )),
            Err(_) => self.fail(format!("the thread of node {id} died while starting")),
        };
        ThreadNode {
            id: id.to_owned(),
            recorder: self.recorder.clone(),
            handle,
            commands: cmd_tx,
        }
    }

    /// Checks that `node`'s period with `term` started at or after `at`.
    pub(super) fn started_after(&self, node: &str, term: u64, what: &str, at: u64) {
        let history = self.recorder.history();
        let Some(p) = period(&history, node, term) else {
            self.fail(format!("no period of {node} with term {term} was recorded"));
        };
        self.ensure(p.start >= at, || {
            format!(
                "{node} became primary (term {term}) {:?} before {what}",
                Duration::from_nanos(at - p.start)
            )
        });
    }

    /// On lease backends, a handover must not have waited for the lease to expire.
    pub(super) fn fast_handover(&self, took: Duration, how: &str) {
        if let Some(lease) = self.fixture.lease() {
            let limit = lease.ttl() / 2;
            self.ensure(took < limit, || {
                format!(
                    "the handover after {how} took {took:?}, as long as waiting for the lease \
                     ({:?}) to expire: release() must free the lock at once",
                    lease.ttl()
                )
            });
        }
    }

    /// Receives the next task event, which must be `expected`.
    pub(super) async fn expect_event(
        &self,
        what: &str,
        events: &mut mpsc::UnboundedReceiver<TaskEvent>,
        expected: TaskEvent,
    ) {
        let got = self.within(what, events.recv()).await;
        self.ensure(got.as_ref() == Some(&expected), || {
            format!("{what}: expected {expected:?}, got {got:?}")
        });
    }

    pub(super) async fn within<T>(&self, what: &str, fut: impl Future<Output = T>) -> T {
        match tokio::time::timeout(self.bound, fut).await {
            Ok(value) => value,
            Err(_) => self.fail(format!(
                "timed out after {:?} waiting for {what}",
                self.bound
            )),
        }
    }

    pub(super) fn ok<T, E: fmt::Display>(&self, what: &str, res: Result<T, E>) -> T {
        match res {
            Ok(value) => value,
            Err(err) => self.fail(format!("{what} failed: {err}")),
        }
    }

    pub(super) fn ensure(&self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond {
            self.fail(msg());
        }
    }

    #[track_caller]
    pub(super) fn fail(&self, msg: String) -> ! {
        panic!(
            "conformance check `{}` failed on the {} backend (lock {}): {msg}\n{}",
            self.check,
            self.backend.get().copied().unwrap_or("?"),
            self.lock,
            self.recorder.history()
        );
    }

    pub(super) fn skip(&self, why: &str) {
        println!(
            "conformance check `{}` on the {} backend: skipped: {why}",
            self.check,
            self.backend
                .get()
                .copied()
                .unwrap_or_else(|| self.fixture.connect().backend().name())
        );
    }

    /// The recorded history must show no overlap and rising terms.
    pub(super) fn finish(&self) {
        let history = self.recorder.history();
        let report = history.check();
        self.ensure(report.is_ok(), || format!("{report}"));
    }
}

/// An elector on the test's runtime.
pub(super) struct Node {
    pub(super) id: String,
    recorder: Recorder,
    pub(super) conn: Connection,
    pub(super) elector: Elector,
    pub(super) handle: RoleHandle,
}

impl Node {
    /// Waits until this node is primary and its tracker has recorded the period.
    pub(super) async fn primary(&self) -> TermContext {
        primary_recorded(&self.id, &self.handle, &self.recorder).await
    }
}

/// Waits until `handle` is primary and `recorder` holds the period: a term that ended before its
/// tracker ran would be missing from the history.
pub(super) async fn primary_recorded(
    id: &str,
    handle: &RoleHandle,
    recorder: &Recorder,
) -> TermContext {
    let ctx = handle.clone().wait_primary().await;
    recorder
        .wait_for(|h| period(h, id, ctx.term()).is_some())
        .await;
    ctx
}

pub(super) async fn shutdown_all(nodes: &[Node]) {
    futures_util::future::join_all(nodes.iter().map(|n| n.elector.shutdown())).await;
}

/// The first of `nodes` to be primary, and its term.
pub(super) async fn any_primary(nodes: &[Node]) -> (usize, TermContext) {
    let waits = nodes.iter().map(|n| Box::pin(n.primary()));
    let (ctx, i, _) = futures_util::future::select_all(waits).await;
    (i, ctx)
}

/// Waits until `handle` names `id` (with `term`, if given) as the holder.
pub(super) async fn holder_is(handle: &RoleHandle, id: &str, term: Option<u64>) {
    let mut handle = handle.clone();
    loop {
        let holder = handle.holder();
        if holder
            .as_ref()
            .is_some_and(|h| h.id == id && term.is_none_or(|t| h.term == t))
        {
            return;
        }
        handle.changed().await;
    }
}

pub(super) fn period<'h>(history: &'h History, node: &str, term: u64) -> Option<&'h Period> {
    history
        .periods()
        .iter()
        .find(|p| p.node == node && p.term == term)
}

/// A duration in `[0, max)`, different from call to call.
pub(super) fn jitter(max: Duration) -> Duration {
    let max = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(monotonic_nanos().wrapping_mul(0x9E37_79B9_7F4A_7C15) % max)
}

/// What a watched singleton task saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum TaskEvent {
    Started(u64),
    Cancelled {
        term: u64,
        primary: bool,
        valid: bool,
    },
}

/// Registers a task that reports its start and the end of its term.
pub(super) fn watch_task(elector: &Elector, tx: mpsc::UnboundedSender<TaskEvent>) {
    let handle = elector.handle();
    elector.singleton_task("conformance-watch", move |ctx| {
        let tx = tx.clone();
        let handle = handle.clone();
        async move {
            let _ = tx.send(TaskEvent::Started(ctx.term()));
            ctx.cancelled().await;
            let _ = tx.send(TaskEvent::Cancelled {
                term: ctx.term(),
                primary: handle.is_primary(),
                valid: ctx.is_valid(),
            });
            Ok::<(), Infallible>(())
        }
    });
}

/// An ordered log shared by tasks of several nodes.
#[derive(Clone, Default)]
pub(super) struct Log {
    entries: Arc<Mutex<Vec<String>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Log {
    pub(super) fn push(&self, entry: &str) {
        self.lock().push(entry.to_owned());
        self.changed.notify_waiters();
    }

    pub(super) fn entries(&self) -> Vec<String> {
        self.lock().clone()
    }

    pub(super) async fn wait_for(&self, entry: &str) {
        loop {
            let notified = self.changed.notified();
            if self.lock().iter().any(|e| e == entry) {
                return;
            }
            notified.await;
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        crate::sync::lock(&self.entries)
    }
}

/// Logs an entry when dropped (a task aborted).
pub(super) struct LogOnDrop(pub(super) Log, pub(super) &'static str);

impl Drop for LogOnDrop {
    fn drop(&mut self) {
        self.0.push(self.1);
    }
}
