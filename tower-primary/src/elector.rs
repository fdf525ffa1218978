//! The elector: one campaign loop per lock name per process.
//!
//! [`Elector::builder`] validates the configuration; [`ElectorBuilder::spawn`] starts the campaign
//! loop on the current tokio runtime and returns at once. The loop
//!
//! 1. waits in the backend's [`acquire`](crate::backend::Lock::acquire) while following the holder
//!    record, so [`RoleHandle::holder`] is current on secondaries;
//! 2. on a grant, publishes `Primary`, computes the term's deadline from the backend's confirmed
//!    renewals (lease backends), and starts the [singleton tasks](Elector::singleton_task);
//! 3. leaves the term when the backend reports a loss, the deadline passes (self-fencing), or the
//!    user asks for [`step_down`](Elector::step_down) or [`shutdown`](Elector::shutdown), in the
//!    shutdown order: stop admitting primary-only work, cancel the term, wait for tasks and
//!    in-flight gated requests up to the grace, abort the rest, release the lock;
//! 4. campaigns again (unless [`exit_on_loss`](ElectorBuilder::exit_on_loss) is set).
//!
//! Backend errors never make a node primary: they are logged and retried with backoff.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use tower_primary::{Elector, MemoryBackend};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_primary::Error> {
//! let backend = MemoryBackend::new();
//! let elector = Elector::builder("report-scheduler")
//!     .backend(backend.clone())
//!     .grace(Duration::from_secs(5))
//!     .spawn()?;
//!
//! elector.singleton_task("email-sender", |ctx| async move {
//!     // Runs only while this node is primary; stops when the term ends.
//!     ctx.cancelled().await;
//!     Ok::<_, std::io::Error>(())
//! });
//!
//! let mut role = elector.handle();
//! let term = role.wait_primary().await;
//! assert!(role.is_primary());
//! println!("primary with term {}", term.term());
//!
//! elector.shutdown().await;
//! assert!(!role.is_primary());
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{
    AcquireRequest, Backend, BoxFuture, Changes, Leadership, Lease, Lock, Stored,
};
use crate::backoff::Backoff;
use crate::clock::{Clock, Timestamp};
use crate::error::{BoxError, Chain, ConfigError, Error, at_most_a_day, validate_lock_name};
use crate::role::{Holder, NodeId, Role, RoleHandle, RoleState, Shared, TermContext};
use crate::task::{TaskSet, TaskSpec};
use crate::watchdog::Phase;

/// Configures and spawns an [`Elector`]. See [`Elector::builder`].
#[must_use = "an elector builder does nothing until spawn() is called"]
pub struct ElectorBuilder {
    lock: String,
    backend: Option<Arc<dyn Backend>>,
    node: Option<NodeId>,
    advertise: Option<String>,
    lease: Option<Lease>,
    grace: Duration,
    retry_min: Duration,
    retry_max: Duration,
    rejoin_delay: Duration,
    exit_on_loss: bool,
    clock: Option<Clock>,
    liveness_bound: Duration,
}

impl fmt::Debug for ElectorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElectorBuilder")
            .field("lock", &self.lock)
            .field("backend", &self.backend)
            .field("node", &self.node)
            .field("advertise", &self.advertise)
            .field("lease", &self.lease)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl ElectorBuilder {
    /// The backend the lock lives in.
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// This node's identity. Default: [`NodeId::from_env`].
    pub fn node(mut self, node: NodeId) -> Self {
        self.node = Some(node);
        self
    }

    /// The URL this node advertises in its holder record, used by the primary-only gate to
    /// redirect (307) secondaries' requests to the primary: an absolute `http://` or `https://`
    /// URL with a host, an optional port and an optional path prefix (redirects append the
    /// request's path to it), without user information, query or fragment. Checked by
    /// [`spawn`](Self::spawn); the gate checks holders' URLs again before it redirects.
    ///
    /// The URL is shown to clients in redirects, refusals and `/health/role`.
    pub fn advertise(mut self, url: impl Into<String>) -> Self {
        self.advertise = Some(url.into());
        self
    }

    /// The lease, for backends that have one ([`Lease::DEFAULT`] otherwise). Ignored, with a
    /// warning, by backends without a lease.
    pub fn lease(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// How long step-down and shutdown wait for singleton tasks and gated requests of the ending
    /// term before aborting them and releasing the lock. Default 5 s; must not be zero.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The backoff between failed acquisition attempts: from `min`, doubling up to `max`, with
    /// jitter. Default 100 ms to 5 s.
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max;
        self
    }

    /// How long a node that [stepped down](Elector::step_down) stays out of the campaign, unless
    /// another node takes the lock first. Default 1 s.
    pub fn rejoin_delay(mut self, delay: Duration) -> Self {
        self.rejoin_delay = delay;
        self
    }

    /// Stop campaigning after losing the lock (by default a node rejoins). Watch
    /// [`Elector::stopped`] to exit the process.
    pub fn exit_on_loss(mut self, exit: bool) -> Self {
        self.exit_on_loss = exit;
        self
    }

    /// The clock deadlines are read on. Default [`Clock::system`]; use [`Clock::tokio`] in tests
    /// on tokio's paused clock.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// How long the campaign loop may go without progress before
    /// [`RoleHandle::liveness`] (and `/health/live`) reports this process stuck, so that an
    /// orchestrator restarts it. Default 10 s; must not be zero.
    ///
    /// The loop stamps a heartbeat on every iteration and at least every quarter of the bound. A
    /// step-down's wait for tasks and requests, and the wait for aborted tasks to stop, may each
    /// take the [grace](Self::grace) on top. What trips it: a runtime too starved to run the loop,
    /// a step-down or task abort that did not finish within the grace (a task blocking its thread
    /// cannot be aborted, and the lock is kept while it runs), or a release the backend does not
    /// answer within the bound (the elector itself gives up on a release after the grace).
    pub fn liveness_bound(mut self, bound: Duration) -> Self {
        self.liveness_bound = bound;
        self
    }

    /// Validates the configuration and starts the campaign on the current tokio runtime.
    ///
    /// Only the configuration is checked here: an unreachable backend leaves the node secondary,
    /// retrying with backoff (fail closed).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the setting and the rule it broke: an invalid lock name, no
    /// backend, an advertised URL that is not an `http`/`https` URL, a zero grace, a lease below
    /// the backend's minimum, a margin of zero or of a third of the lease or more, a duration
    /// setting (grace, retry backoff, rejoin delay, liveness bound, lease) over 1 day, an unusable
    /// lock directory, or no tokio runtime.
    pub fn spawn(self) -> Result<Elector, ConfigError> {
        self.prepare()?.spawn()
    }

    /// Checks the configuration and prepares the backend's lock without starting the campaign:
    /// [`PrimaryLayer::new`](crate::PrimaryLayer::new) checks at once and spawns
    /// when the layer is first used.
    pub(crate) fn prepare(self) -> Result<Prepared, ConfigError> {
        validate_lock_name(&self.lock)?;
        let backend = self.backend.clone().ok_or(ConfigError::NoBackend)?;
        if self.grace.is_zero() {
            return Err(ConfigError::InvalidTiming {
                setting: "grace",
                value: self.grace,
                rule: "must be longer than zero".to_owned(),
            });
        }
        if self.retry_min.is_zero() {
            return Err(ConfigError::InvalidTiming {
                setting: "retry backoff minimum",
                value: self.retry_min,
                rule: "must be longer than zero".to_owned(),
            });
        }
        if let Some(url) = &self.advertise {
            crate::http::require::check_advertised(url)?;
        }
        if self.liveness_bound.is_zero() {
            return Err(ConfigError::InvalidTiming {
                setting: "liveness bound",
                value: self.liveness_bound,
                rule: "must be longer than zero".to_owned(),
            });
        }
        at_most_a_day("grace", self.grace)?;
        at_most_a_day("retry backoff minimum", self.retry_min)?;
        at_most_a_day("retry backoff maximum", self.retry_max)?;
        at_most_a_day("rejoin delay", self.rejoin_delay)?;
        at_most_a_day("liveness bound", self.liveness_bound)?;
        let lease = match backend.min_lease() {
            Some(min) => {
                let lease = self.lease.unwrap_or_default();
                lease.validate(min)?;
                if let Some(max) = backend.max_lease().filter(|max| lease.ttl() > *max) {
                    return Err(ConfigError::InvalidTiming {
                        setting: "lease",
                        value: lease.ttl(),
                        rule: format!("must not exceed the backend's maximum lease {max:?}"),
                    });
                }
                Some(lease)
            }
            None => {
                if let Some(lease) = self.lease {
                    tracing::warn!(
                        lock = %self.lock,
                        backend = backend.name(),
                        ?lease,
                        "the backend has no lease; the lease setting is ignored"
                    );
                }
                None
            }
        };
        let lock = backend.lock(&self.lock)?;
        Ok(Prepared {
            backend_name: backend.name(),
            lock,
            lease,
            builder: self,
        })
    }
}

/// A checked configuration whose campaign has not started yet; see [`ElectorBuilder::prepare`].
pub(crate) struct Prepared {
    builder: ElectorBuilder,
    backend_name: &'static str,
    lock: Arc<dyn Lock>,
    lease: Option<Lease>,
}

impl Prepared {
    pub(crate) fn lock_name(&self) -> &str {
        &self.builder.lock
    }

    /// Starts the campaign on the current tokio runtime.
    pub(crate) fn spawn(self) -> Result<Elector, ConfigError> {
        let Prepared {
            builder,
            backend_name,
            lock,
            lease,
        } = self;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime {
                what: "Elector::spawn",
            })?;
        let node = builder.node.unwrap_or_else(NodeId::from_env);
        let clock = builder.clock.unwrap_or_default();
        let shared = Shared::new(builder.lock.clone(), node.clone(), clock, Role::Starting);
        shared
            .watchdog
            .supervise(builder.liveness_bound, builder.grace, clock.now());
        crate::metrics::describe();
        crate::metrics::role(&builder.lock, false, None);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (stopped_tx, stopped_rx) = watch::channel(false);
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let campaign = Campaign {
            shared: shared.clone(),
            lock: lock.clone(),
            backend_name,
            request: AcquireRequest::new(node)
                .with_lease(lease)
                .with_clock(clock)
                .with_url(builder.advertise),
            lease,
            grace: builder.grace,
            backoff: Backoff::new(builder.retry_min, builder.retry_max),
            rejoin_delay: builder.rejoin_delay,
            exit_on_loss: builder.exit_on_loss,
            tasks: tasks.clone(),
            cmd_rx,
            tick: (builder.liveness_bound / 4).max(Duration::from_millis(1)),
        };
        let watched = shared.clone();
        runtime.spawn(async move {
            campaign.run().await;
            watched.watchdog.stop();
            let _ = stopped_tx.send(true);
        });
        Ok(Elector {
            inner: Arc::new(Inner {
                handle: RoleHandle::new(shared),
                lock,
                cmd: cmd_tx,
                tasks,
                stopped: stopped_rx,
            }),
        })
    }
}

/// Leader election for one lock name. See the [module docs](self).
///
/// Cheap to clone; the campaign runs until [`shutdown`](Self::shutdown) or until every clone is
/// dropped (which releases the lock too, without waiting).
#[derive(Clone)]
pub struct Elector {
    inner: Arc<Inner>,
}

struct Inner {
    handle: RoleHandle,
    lock: Arc<dyn Lock>,
    cmd: mpsc::UnboundedSender<Command>,
    tasks: Arc<Mutex<Vec<Arc<TaskSpec>>>>,
    stopped: watch::Receiver<bool>,
}

impl fmt::Debug for Elector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Elector")
            .field("handle", &self.inner.handle)
            .field("lock", &self.inner.lock)
            .finish_non_exhaustive()
    }
}

enum Command {
    StepDown(oneshot::Sender<Result<(), Error>>),
    Shutdown(oneshot::Sender<()>),
    TaskAdded,
}

impl Elector {
    /// Starts configuring an elector for `lock`: 1 to 128 characters of `[A-Za-z0-9._-]`.
    pub fn builder(lock: impl Into<String>) -> ElectorBuilder {
        ElectorBuilder {
            lock: lock.into(),
            backend: None,
            node: None,
            advertise: None,
            lease: None,
            grace: Duration::from_secs(5),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            rejoin_delay: Duration::from_secs(1),
            exit_on_loss: false,
            clock: None,
            liveness_bound: Duration::from_secs(10),
        }
    }

    /// A handle to the role, for requests, tasks and health checks.
    #[must_use]
    pub fn handle(&self) -> RoleHandle {
        self.inner.handle.clone()
    }

    /// The state API of this lock: small values that only the current term may write.
    #[must_use]
    pub fn state(&self) -> StateStore {
        StateStore {
            lock: self.inner.lock.clone(),
        }
    }

    /// Registers a task that runs only while this node is primary.
    ///
    /// On every promotion `factory` is called with the term's [`TermContext`] and the future it
    /// returns is run:
    /// - when the term ends (loss, step-down, shutdown) the context is cancelled at once; a task
    ///   still running after the grace is aborted;
    /// - `Err` or a panic restarts the task with backoff while the term lasts;
    /// - `Ok` means done for this term: it runs again on the next promotion.
    ///
    /// A task registered while this node is primary starts at once.
    ///
    /// # Examples
    ///
    /// ```
    /// # use tower_primary::{Elector, MemoryBackend};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_primary::Error> {
    /// let elector = Elector::builder("jobs").backend(MemoryBackend::new()).spawn()?;
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// elector.singleton_task("announce", move |ctx| {
    ///     let tx = tx.clone();
    ///     async move {
    ///         tx.send(ctx.term()).ok();
    ///         Ok::<_, std::convert::Infallible>(())
    ///     }
    /// });
    /// let term = rx.recv().await.unwrap();
    /// assert_eq!(Some(term), elector.handle().term());
    /// # elector.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn singleton_task<F, Fut, E>(&self, name: impl Into<String>, factory: F)
    where
        F: Fn(TermContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let spec = TaskSpec::new(name.into(), move |ctx| {
            let fut = factory(ctx);
            Box::pin(async move { fut.await.map_err(Into::into) }) as BoxFuture<'static, _>
        });
        crate::sync::lock(&self.inner.tasks).push(Arc::new(spec));
        let _ = self.inner.cmd.send(Command::TaskAdded);
    }

    /// Hands the lock over now (the shutdown order), then campaigns again after the
    /// [rejoin delay](ElectorBuilder::rejoin_delay) or as soon as it reads another node's holder
    /// record. A node that takes the lock and gives it back before this one reads the record
    /// does not end the hold-off: if every node steps down in such quick succession, the lock
    /// stays free for up to the rejoin delay.
    ///
    /// # Errors
    ///
    /// [`Error::NotPrimary`] when this node is not primary, [`Error::Shutdown`] after shutdown,
    /// or the backend's error from releasing.
    pub async fn step_down(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Command::StepDown(tx))
            .map_err(|_| self.shut_down_error())?;
        rx.await.map_err(|_| self.shut_down_error())?
    }

    /// Stops the campaign: if primary, hands over in the shutdown order (stop admitting
    /// primary-only work, cancel the term, wait for tasks and gated requests up to the grace,
    /// abort the rest, release the lock). Returns when that is done. Idempotent.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd.send(Command::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
        self.stopped().await;
    }

    /// A future for `axum::serve(..).with_graceful_shutdown(..)`: waits for `signal`, then
    /// [shuts the elector down](Self::shutdown), then resolves.
    ///
    /// The order is what makes handover fast and safe: when the signal arrives this node first
    /// stops admitting primary-only requests, winds its tasks down and releases the lock (a
    /// secondary takes over at once), and only then does the server stop accepting connections
    /// and drain the requests it has.
    ///
    /// ```no_run
    /// # async fn run(elector: tower_primary::Elector, app: axum::Router) -> std::io::Result<()> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(elector.shutdown_signal(tower_primary::terminate_signal()))
    ///     .await
    /// # }
    /// ```
    pub fn shutdown_signal<F>(&self, signal: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let elector = self.clone();
        async move {
            signal.await;
            elector.shutdown().await;
        }
    }

    /// Resolves when the campaign loop has ended (after [`shutdown`](Self::shutdown), or after a
    /// loss with [`exit_on_loss`](ElectorBuilder::exit_on_loss)).
    pub async fn stopped(&self) {
        let mut rx = self.inner.stopped.clone();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    /// A receiver that turns `true` when the campaign loop has ended.
    #[cfg(feature = "schedule")]
    pub(crate) fn clone_stopped(&self) -> watch::Receiver<bool> {
        self.inner.stopped.clone()
    }

    fn shut_down_error(&self) -> Error {
        Error::Shutdown {
            lock: self.inner.handle.lock().to_owned(),
        }
    }
}

/// Resolves on `SIGINT` (Ctrl-C) or `SIGTERM`; pass it to [`Elector::shutdown_signal`].
///
/// # Panics
///
/// Panics if the signal handlers cannot be installed (outside a tokio runtime).
pub async fn terminate_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The state API of one lock, from [`Elector::state`]: small values kept by the backend, which
/// only the term holding the lock may write.
///
/// # Examples
///
/// ```
/// # use tower_primary::{Elector, MemoryBackend};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_primary::Error> {
/// let elector = Elector::builder("jobs").backend(MemoryBackend::new()).spawn()?;
/// let ctx = elector.handle().wait_primary().await;
/// let state = elector.state();
/// state.store("last-run", b"2026-11-30", &ctx).await?;
/// let stored = state.load("last-run").await?.unwrap();
/// assert_eq!(stored.value, b"2026-11-30");
/// assert_eq!(stored.term, ctx.term());
/// # elector.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StateStore {
    lock: Arc<dyn Lock>,
}

impl StateStore {
    /// Loads a value and the term that wrote it.
    ///
    /// # Errors
    ///
    /// An invalid key, or the backend's error.
    pub async fn load(&self, key: &str) -> Result<Option<Stored>, Error> {
        crate::backend::validate_key(key)?;
        self.lock.load(key).await
    }

    /// Stores a value under the term of `ctx`.
    ///
    /// # Errors
    ///
    /// [`Error::StaleTerm`] if the term has ended or a newer term wrote the key; an invalid key;
    /// the backend's error.
    pub async fn store(&self, key: &str, value: &[u8], ctx: &TermContext) -> Result<(), Error> {
        crate::backend::validate_key(key)?;
        if !ctx.is_valid() {
            return Err(Error::StaleTerm {
                lock: ctx.lock().to_owned(),
                term: ctx.term(),
                current: None,
            });
        }
        self.lock.store(key, value, ctx.term()).await
    }

    /// A subscription to changes of `key`.
    ///
    /// # Errors
    ///
    /// An invalid key, or the backend's error.
    pub async fn watch(&self, key: &str) -> Result<Box<dyn Changes>, Error> {
        crate::backend::validate_key(key)?;
        self.lock.watch_key(key).await
    }
}

/// Why a term ended.
enum Leave {
    Lost(Error),
    Fenced,
    StepDown(oneshot::Sender<Result<(), Error>>),
    Shutdown(Option<oneshot::Sender<()>>),
}

impl Leave {
    fn reason(&self) -> &'static str {
        match self {
            Leave::Lost(_) => "lost",
            Leave::Fenced => "fenced",
            Leave::StepDown(_) => "stepped-down",
            Leave::Shutdown(_) => "shutdown",
        }
    }
}

/// What the campaign loop owns.
struct Campaign {
    shared: Arc<Shared>,
    lock: Arc<dyn Lock>,
    backend_name: &'static str,
    request: AcquireRequest,
    lease: Option<Lease>,
    grace: Duration,
    backoff: Backoff,
    rejoin_delay: Duration,
    exit_on_loss: bool,
    tasks: Arc<Mutex<Vec<Arc<TaskSpec>>>>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    /// How often an idle loop stamps its heartbeat: a quarter of the liveness bound.
    tick: Duration,
}

/// The instant `d` from now; for a delay past tokio's range, a year from now (saturating rather
/// than overflowing).
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// Polls an optional future; pends forever when there is none.
async fn maybe<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl Campaign {
    async fn run(mut self) {
        let mut hold_off = None;
        loop {
            let leadership = match self.campaign(hold_off.take()).await {
                Ok(l) => l,
                Err(reply) => {
                    self.publish_secondary(None);
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    tracing::info!(lock = %self.shared.lock, node = %self.shared.node, "elector stopped");
                    return;
                }
            };
            let leave = self.lead(leadership).await;
            match leave {
                Leave::Shutdown(reply) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    tracing::info!(lock = %self.shared.lock, node = %self.shared.node, "elector stopped");
                    return;
                }
                Leave::StepDown(_) => {
                    hold_off = Some(after(self.rejoin_delay));
                }
                Leave::Lost(_) | Leave::Fenced if self.exit_on_loss => {
                    tracing::info!(
                        lock = %self.shared.lock,
                        node = %self.shared.node,
                        "elector stopped after losing the lock (exit_on_loss)"
                    );
                    return;
                }
                Leave::Lost(_) | Leave::Fenced => {
                    // Rejoin after a short, growing pause, unless another node takes the lock
                    // first: a node whose renewals keep failing must not re-take the lock
                    // ahead of the waiters its release has just woken.
                    hold_off = Some(after(self.backoff.next_delay()));
                }
            }
        }
    }

    /// Campaigns until acquired. `Err` on shutdown, with the reply to send when stopped.
    async fn campaign(
        &mut self,
        mut hold_off: Option<Instant>,
    ) -> Result<Box<dyn Leadership>, Option<oneshot::Sender<()>>> {
        let lock = self.lock.clone();
        let lock = &*lock;
        let mut acquire: Option<BoxFuture<'_, Result<Box<dyn Leadership>, Error>>> = None;
        let mut attempt_at = hold_off.unwrap_or_else(Instant::now);
        let mut watch: Option<Box<dyn Changes>> = None;
        let mut watch_fut: Option<BoxFuture<'_, Result<Box<dyn Changes>, Error>>> =
            Some(lock.watch_holder());
        let mut watch_retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut watch_at: Option<Instant> = None;
        let mut holder_fut: Option<BoxFuture<'_, Result<Option<Holder>, Error>>> = None;
        let mut holder_again = false;
        let mut last_holder: Option<Holder> = None;
        let mut acquire_span = tracing::Span::none();
        let mut acquire_started = Instant::now();
        loop {
            self.shared.watchdog.beat(self.shared.clock.now());
            if acquire.is_none() && Instant::now() >= attempt_at {
                acquire_span = tracing::info_span!(
                    "acquire",
                    lock = %self.shared.lock,
                    node = %self.shared.node,
                    term = tracing::field::Empty,
                );
                acquire_started = Instant::now();
                acquire = Some(Box::pin(
                    lock.acquire(self.request.clone())
                        .instrument(acquire_span.clone()),
                ));
            }
            let sleep_until = match (&acquire, watch_at) {
                (None, Some(w)) => attempt_at.min(w),
                (None, None) => attempt_at,
                (Some(_), Some(w)) => w,
                (Some(_), None) => after(Duration::from_secs(86_400)),
            }
            // An idle loop still stamps its heartbeat.
            .min(after(self.tick));
            tokio::select! {
                biased;
                cmd = self.cmd_rx.recv() => match cmd {
                    None => return Err(None),
                    Some(Command::Shutdown(reply)) => return Err(Some(reply)),
                    Some(Command::StepDown(reply)) => {
                        let _ = reply.send(Err(Error::NotPrimary { lock: self.shared.lock.clone() }));
                    }
                    Some(Command::TaskAdded) => {}
                },
                res = maybe(&mut acquire) => {
                    acquire = None;
                    match res {
                        Ok(l) => {
                            self.backoff.reset();
                            acquire_span.record("term", l.term());
                            crate::metrics::acquired(&self.shared.lock, acquire_started.elapsed());
                            return Ok(l);
                        }
                        Err(err) => {
                            crate::metrics::backend_error(&self.shared.lock, "acquire");
                            let delay = self.backoff.next_delay();
                            tracing::warn!(
                                lock = %self.shared.lock,
                                node = %self.shared.node,
                                backend = self.backend_name,
                                error = %Chain(&err),
                                retry_in = ?delay,
                                "acquire failed; staying secondary"
                            );
                            attempt_at = after(delay);
                            self.publish_secondary(last_holder.clone());
                        }
                    }
                },
                res = maybe(&mut watch_fut) => {
                    watch_fut = None;
                    match res {
                        Ok(w) => {
                            watch = Some(w);
                            watch_retry.reset();
                            holder_again = true;
                        }
                        Err(err) => {
                            crate::metrics::backend_error(&self.shared.lock, "watch");
                            let delay = watch_retry.next_delay();
                            tracing::warn!(lock = %self.shared.lock, error = %Chain(&err), "cannot watch the holder record; retrying");
                            watch_at = Some(after(delay));
                        }
                    }
                },
                res = async { match watch.as_mut() { Some(w) => w.changed().await, None => std::future::pending().await } } => {
                    match res {
                        Ok(()) => holder_again = true,
                        Err(err) => {
                            crate::metrics::backend_error(&self.shared.lock, "watch");
                            tracing::warn!(lock = %self.shared.lock, error = %Chain(&err), "holder watch failed; re-subscribing");
                            watch = None;
                            watch_at = Some(after(watch_retry.next_delay()));
                        }
                    }
                },
                res = maybe(&mut holder_fut) => {
                    holder_fut = None;
                    match res {
                        Ok(holder) => {
                            if hold_off.is_some()
                                && holder.as_ref().is_some_and(|h| h.id != self.shared.node.id())
                            {
                                // Another node took over after our step-down: rejoin now.
                                hold_off = None;
                                attempt_at = Instant::now();
                            }
                            last_holder.clone_from(&holder);
                            // Nobody holds it and our first attempt is under way: stay
                            // `Starting` rather than flash `Secondary` before `Primary`.
                            let starting = matches!(self.shared.state.borrow().role, Role::Starting);
                            if holder.is_some() || !starting || acquire.is_none() {
                                self.publish_secondary(holder);
                            }
                        }
                        Err(err) => {
                            crate::metrics::backend_error(&self.shared.lock, "holder");
                            tracing::warn!(lock = %self.shared.lock, error = %Chain(&err), "cannot read the holder record");
                            self.publish_secondary(None);
                        }
                    }
                },
                () = tokio::time::sleep_until(sleep_until) => {
                    if watch_at.is_some_and(|w| Instant::now() >= w) {
                        watch_at = None;
                        watch_fut = Some(lock.watch_holder());
                    }
                },
            }
            if holder_again && holder_fut.is_none() {
                holder_again = false;
                holder_fut = Some(lock.holder());
            }
        }
    }

    /// Holds one term until it ends, then leaves it in the shutdown order.
    async fn lead(&mut self, mut leadership: Box<dyn Leadership>) -> Leave {
        let term = leadership.term();
        let holder = leadership.holder().clone();
        let clock = self.shared.clock;
        let mut renewals = leadership.renewals();
        let lease = self.lease.or_else(|| leadership.implied_lease());
        let mut deadline = match (&renewals, lease) {
            (Some(r), Some(lease)) => lease.deadline_after(r.latest()),
            _ => Timestamp::NEVER,
        };
        let token = CancellationToken::new();
        let ctx = TermContext::new(term, self.shared.clone(), token.clone());
        let since = holder.since;
        // The deadline first: a waiter woken by the new state must find it valid.
        self.shared.set_deadline(deadline);
        self.shared.state.send_replace(RoleState {
            role: Role::Primary { term, since },
            holder: Some(holder),
            term: Some(ctx.clone()),
        });
        tracing::info!(
            lock = %self.shared.lock,
            node = %self.shared.node,
            term,
            reason = "acquired",
            "became primary"
        );
        crate::metrics::role(&self.shared.lock, true, Some(term));
        crate::metrics::transition(&self.shared.lock, "acquired");
        let mut tasks = TaskSet::new();
        tasks.sync(&crate::sync::lock(&self.tasks), &ctx);

        let leave = loop {
            self.shared.watchdog.beat(clock.now());
            if clock.now() >= deadline {
                break Leave::Fenced;
            }
            tokio::select! {
                biased;
                cmd = self.cmd_rx.recv() => match cmd {
                    None => break Leave::Shutdown(None),
                    Some(Command::Shutdown(reply)) => break Leave::Shutdown(Some(reply)),
                    Some(Command::StepDown(reply)) => break Leave::StepDown(reply),
                    Some(Command::TaskAdded) => tasks.sync(&crate::sync::lock(&self.tasks), &ctx),
                },
                err = leadership.lost() => break Leave::Lost(err),
                // Wakes at the deadline, and at least every tick to stamp the heartbeat.
                () = tokio::time::sleep_until(clock.to_tokio_instant(deadline).min(after(self.tick))) => {}
                sent = async { match renewals.as_mut() { Some(r) => r.changed().await, None => std::future::pending().await } } => {
                    // Renewals run inside the backend; this is where the elector sees one confirmed.
                    let took = clock.now().saturating_duration_since(sent);
                    let _span = tracing::debug_span!(
                        "renew",
                        lock = %self.shared.lock,
                        term,
                        took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                    )
                    .entered();
                    crate::metrics::renewed(&self.shared.lock, took);
                    tracing::trace!("renewal confirmed");
                    if let Some(lease) = lease {
                        // A renewal confirmed after the deadline extends nothing: the term is over.
                        if clock.now() < deadline {
                            deadline = deadline.max(lease.deadline_after(sent));
                            self.shared.set_deadline(deadline);
                        }
                    }
                },
            }
        };
        self.leave(leadership, ctx, tasks, leave).await
    }

    async fn leave(
        &mut self,
        leadership: Box<dyn Leadership>,
        ctx: TermContext,
        mut tasks: TaskSet,
        leave: Leave,
    ) -> Leave {
        let term = ctx.term();
        let lock = self.shared.lock.clone();
        let node = self.shared.node.id().to_owned();
        // 1. Stop admitting primary-only requests and work.
        self.shared.set_deadline(Timestamp::ZERO);
        self.publish_secondary(None);
        match &leave {
            Leave::Lost(err) => {
                tracing::warn!(%lock, %node, term, reason = "lost", error = %Chain(&err), "lost the lock");
            }
            Leave::Fenced => tracing::warn!(
                %lock, %node, term, reason = "fenced",
                "lease deadline passed without a confirmed renewal; stepping down"
            ),
            other => tracing::info!(%lock, %node, term, reason = other.reason(), "stepping down"),
        }
        crate::metrics::transition(&lock, leave.reason());
        // 2. Cancel the term (ordered with task starts: none starts after this).
        tasks.end_term(&ctx);
        // 3. Wait for tasks and in-flight gated requests, up to the grace; 4. abort the rest.
        let clock = self.shared.clock;
        self.shared
            .watchdog
            .wait_within_grace(Phase::SteppingDown, clock.now());
        ctx.tracker().close();
        let drained = tokio::time::timeout(self.grace, async {
            tasks.join().await;
            ctx.tracker().wait().await;
        })
        .await;
        // Gated requests still in flight are cut: handlers dropped, response bodies ended with an
        // error. No code of theirs runs after their current poll.
        ctx.abort_token().cancel();
        if drained.is_err() {
            let names = tasks.running();
            let requests = ctx.tracker().len();
            tracing::warn!(%lock, %node, term, grace = ?self.grace, tasks = ?names, requests, "grace period over; aborting what is left");
            for name in &names {
                crate::metrics::task_aborted(&lock, name);
            }
            // Unbounded on purpose: the lock is not released while a task of the term still runs
            // (one that blocks its thread cannot be aborted). The watchdog reports it instead.
            self.shared
                .watchdog
                .wait_within_grace(Phase::AbortingTasks, clock.now());
            tasks.abort().await;
        }
        // 5. Release the lock, which wakes the waiters.
        self.shared
            .watchdog
            .wait_on_backend(Phase::Releasing, clock.now());
        let release = leadership.release().instrument(tracing::info_span!(
            "release",
            lock = %lock,
            term,
            reason = leave.reason(),
        ));
        let released = match tokio::time::timeout(self.grace, release).await {
            Ok(r) => r,
            Err(_) => Err(Error::backend_msg(
                self.backend_name,
                format!("release timed out after {:?}", self.grace),
            )),
        };
        self.shared.watchdog.beat(clock.now());
        if let Err(err) = &released {
            crate::metrics::backend_error(&lock, "release");
            tracing::warn!(%lock, %node, term, backend = self.backend_name, error = %Chain(&err), "release failed");
        } else {
            if !matches!(leave, Leave::Lost(_)) {
                // After a loss there was nothing left to give back.
                crate::metrics::transition(&lock, "released");
            }
            tracing::info!(%lock, %node, term, reason = leave.reason(), "released the lock");
        }
        match leave {
            Leave::StepDown(reply) => {
                let _ = reply.send(released);
                Leave::StepDown(oneshot::channel().0)
            }
            other => other,
        }
    }

    fn publish_secondary(&self, holder: Option<Holder>) {
        self.shared.state.send_if_modified(|state| {
            let role = Role::Secondary {
                holder: holder.clone(),
            };
            if state.role == role && state.term.is_none() {
                return false;
            }
            if !matches!(state.role, Role::Secondary { .. }) {
                tracing::info!(
                    lock = %self.shared.lock,
                    node = %self.shared.node,
                    term = holder.as_ref().map(|h| h.term),
                    holder = holder.as_ref().map(|h| h.id.as_str()),
                    "secondary"
                );
            }
            crate::metrics::role(&self.shared.lock, false, holder.as_ref().map(|h| h.term));
            state.role = role;
            state.holder.clone_from(&holder);
            state.term = None;
            true
        });
    }
}
