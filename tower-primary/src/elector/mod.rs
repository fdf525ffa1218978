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
//! Backend errors never make a node primary: they are logged and retried with backoff. A
//! [misconfiguration](crate::Error::Misconfigured) (wrong credentials, TLS, an incompatible
//! lease...) is logged at ERROR once per cause and shown by [`RoleHandle::backend_error`] and
//! `/health/role`; [`ElectorBuilder::spawn_checked`] returns it instead of retrying.
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

use tokio::sync::{mpsc, oneshot, watch};

use crate::backend::{BoxFuture, Lock};
use crate::error::{BoxError, Error};
use crate::role::{RoleHandle, TermContext};
use crate::task::TaskSpec;

mod backend_errors;
mod builder;
mod campaign;
mod check;
mod follow;
mod registry;
mod state;
mod term;

pub(crate) use self::builder::Prepared;
pub use self::builder::{ElectorBuilder, PRIORITY_ENV};
pub use self::state::StateStore;

/// The target of the elector's events and spans, whichever of its files they come from.
const TARGET: &str = "tower_primary::elector";

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
    HandOver(String, oneshot::Sender<Result<(), Error>>),
    Shutdown(oneshot::Sender<()>),
    TaskAdded,
}

impl Elector {
    /// Starts configuring an elector for `lock`: 1 to 128 characters of `[A-Za-z0-9._-]`.
    pub fn builder(lock: impl Into<String>) -> ElectorBuilder {
        ElectorBuilder::new(lock.into())
    }

    /// A handle to the role, for requests, tasks and health checks.
    #[must_use]
    pub fn handle(&self) -> RoleHandle {
        self.inner.handle.clone()
    }

    /// The state API of this lock: small values that only the current term may write.
    #[must_use]
    pub fn state(&self) -> StateStore {
        StateStore::new(self.inner.lock.clone())
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

    /// Marks this node ready to lead: from now on (after the
    /// [settle time](ElectorBuilder::settle_time)) it may be the target of a preferred handover.
    /// Only needed with [`ready_at_spawn(false)`](ElectorBuilder::ready_at_spawn): a node is
    /// ready from spawn otherwise. Idempotent.
    ///
    /// Readiness decides only who the lock is handed *to*: an unready node still takes the lock
    /// when it is free (a failover never waits for readiness).
    pub fn ready(&self) {
        self.inner
            .handle
            .shared()
            .entry
            .send_if_modified(|e| !std::mem::replace(&mut e.ready, true));
    }

    /// Drains this node: it never becomes primary again, and if it is primary it hands the lock
    /// over (a planned handover with a reservation) as soon as an eligible successor exists —
    /// the best ready, non-draining candidate, settled or not — and keeps leading until then.
    /// Resolves once this node is not primary: bound it with [`tokio::time::timeout`] before a
    /// [`shutdown`](Self::shutdown), which releases the lock in any case.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_primary::{Elector, MemoryBackend, NodeId};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_primary::Error> {
    /// let backend = MemoryBackend::new();
    /// let old = Elector::builder("jobs").backend(backend.clone()).node(NodeId::new("old")).spawn()?;
    /// old.handle().wait_primary().await;
    /// let new = Elector::builder("jobs").backend(backend.connection()).node(NodeId::new("new")).spawn()?;
    ///
    /// // SIGTERM: hand over to the new node, then stop.
    /// let _ = tokio::time::timeout(Duration::from_secs(10), old.drain()).await;
    /// old.shutdown().await;
    /// new.handle().wait_primary().await;
    /// assert_eq!(new.handle().holder().unwrap().id, "new");
    /// # new.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn drain(&self) {
        let mut handle = self.handle();
        handle
            .shared()
            .entry
            .send_if_modified(|e| !std::mem::replace(&mut e.draining, true));
        while handle.is_primary() {
            handle.changed().await;
        }
    }

    /// Hands the lock over to `node` now, on an operator's request: a planned handover that
    /// reserves the lock for that node. Resolves once the lock is reserved for `node` and this
    /// node has begun to leave its term (in the shutdown order, then the release): so it can be
    /// awaited inside a primary-only request, whose end the release waits for.
    ///
    /// This node then counts as having *yielded*: while it lives and does not lead again, no
    /// primary hands the lock over by preference, so the lock stays where the operator put it
    /// (a draining primary still hands over, and a failover is a failover).
    ///
    /// # Errors
    ///
    /// [`Error::HandOver`] when `node` is not a live candidate of the lock, is not ready, is
    /// draining, or is this node ([`HandOverRefusal`](crate::HandOverRefusal)); nothing moves.
    /// [`Error::NotPrimary`] when this node is not primary, [`Error::Shutdown`] after shutdown,
    /// or the backend's error from reserving the lock (nothing moves either).
    pub async fn hand_over_to(&self, node: impl Into<String>) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Command::HandOver(node.into(), tx))
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
