//! [`ElectorBuilder`]: the settings, their validation, and the start of the campaign.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::backend_errors::BackendErrors;
use super::campaign::Campaign;
use super::check::{self, FirstAnswer};
use super::registry::Registry;
use super::{Elector, Inner, TARGET};
use crate::backend::{AcquireRequest, Backend, Lease, Lock};
use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::error::{ConfigError, Error, at_most_a_day, validate_lock_name};
use crate::role::{NodeId, Role, RoleHandle, Shared};

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
    check_timeout: Duration,
    /// `None`: from the environment; `Some(None)`: off.
    #[cfg_attr(not(feature = "file"), allow(dead_code))]
    host_dir: Option<Option<std::path::PathBuf>>,
    /// `None`: from the environment, else 0.
    priority: Option<u64>,
    never_lead: bool,
    ready_at_spawn: bool,
    settle: Duration,
    window: Duration,
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
    pub(super) fn new(lock: String) -> Self {
        ElectorBuilder {
            lock,
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
            check_timeout: Duration::from_secs(30),
            host_dir: None,
            priority: None,
            never_lead: false,
            ready_at_spawn: true,
            settle: Duration::from_secs(1),
            window: Duration::from_secs(2),
        }
    }

    /// This node's priority in the lock's candidate registry (default: the environment
    /// variable [`TOWER_PRIMARY_PRIORITY`](PRIORITY_ENV) read at spawn, else 0). When a ready
    /// candidate with a strictly higher priority than the primary's has been ready for the
    /// [settle time](Self::settle_time), the primary hands the lock over to it: give each
    /// deploy a higher number (a build number, a timestamp) and a rolling deploy moves the
    /// primary once, to a new instance. Equal priorities never move the lock.
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
    /// let old = Elector::builder("jobs").backend(backend.clone()).priority(1).spawn()?;
    /// old.handle().wait_primary().await;
    ///
    /// // A new version starts: once it has been ready for the settle time, it leads.
    /// let new = Elector::builder("jobs")
    ///     .backend(backend.connection())
    ///     .node(NodeId::new("v2"))
    ///     .priority(2)
    ///     .settle_time(Duration::from_millis(10))
    ///     .spawn()?;
    /// new.handle().wait_primary().await;
    /// assert_eq!(new.handle().holder().unwrap().id, "v2");
    /// # old.shutdown().await; new.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn priority(mut self, priority: u64) -> Self {
        self.priority = Some(priority);
        self
    }

    /// This node never becomes primary (it is draining from spawn): a node that serves requests
    /// but must not run the singleton work, say. It still follows the holder, and
    /// [`candidates`](crate::RoleHandle::candidates) lists it as draining.
    pub fn never_lead(mut self) -> Self {
        self.never_lead = true;
        self
    }

    /// Whether the node is ready to be handed the lock from spawn (the default, `true`). With
    /// `false` it becomes a handover target only once the application calls
    /// [`Elector::ready`] (after its caches are warm, say). Readiness decides only who the lock
    /// is handed *to*: an unready node still takes a free lock in a failover.
    pub fn ready_at_spawn(mut self, ready: bool) -> Self {
        self.ready_at_spawn = ready;
        self
    }

    /// How long a higher-priority candidate must have been ready (as the primary reads the
    /// registry, on the primary's clock) before the lock is handed over to it; default 1 s. A
    /// new instance that crashes right after start-up then never pulls the lock.
    pub fn settle_time(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// How long a handover reserves the lock for its target (timed by the backend's server;
    /// etcd rounds it up to 2 s); default 2 s. If the target does not take the lock within it,
    /// any waiting node may: a target that died costs this window plus one failover.
    pub fn handover_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Campaigns as one [host group](crate::backend::host) with the other processes of this host
    /// that use the same directory: one process per host (the candidate) talks to the backend,
    /// the others follow it. Without this call, the environment variable
    /// [`TOWER_PRIMARY_HOST_DIR`](crate::HOST_DIR_ENV) turns it on, read at spawn. Ignored, with a
    /// debug log, for the file and memory backends (a file lock is already per host; a memory
    /// backend lives in one process).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_primary::{Elector, MemoryBackend};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// // With a server backend (redis://, postgres://, etcd://) the processes of this host meet
    /// // in `dir`; the memory backend ignores it.
    /// let elector = Elector::builder("jobs")
    ///     .backend(MemoryBackend::new())
    ///     .host_dir(dir.path())
    ///     .spawn()?;
    /// elector.handle().wait_primary().await;
    /// # elector.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "file")]
    #[cfg_attr(docsrs, doc(cfg(feature = "file")))]
    pub fn host_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.host_dir = Some(Some(dir.into()));
        self
    }

    /// Campaigns alone, whatever [`TOWER_PRIMARY_HOST_DIR`](crate::HOST_DIR_ENV) says: undoes
    /// [`host_dir`](Self::host_dir).
    #[cfg(feature = "file")]
    #[cfg_attr(docsrs, doc(cfg(feature = "file")))]
    pub fn no_host_dir(mut self) -> Self {
        self.host_dir = Some(None);
        self
    }

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

    /// How long [`spawn_checked`](Self::spawn_checked) waits for the backend to answer, retrying
    /// transient errors, before it gives up. Default 30 s; must not be zero.
    pub fn check_timeout(mut self, timeout: Duration) -> Self {
        self.check_timeout = timeout;
        self
    }

    /// Validates the configuration and starts the campaign on the current tokio runtime.
    ///
    /// Only the configuration is checked here: an unreachable or misconfigured backend leaves the
    /// node secondary, retrying with backoff (fail closed). To find a misconfigured backend at
    /// start-up, use [`spawn_checked`](Self::spawn_checked).
    ///
    /// Nothing is created (no lock file, no connection) unless the configuration is valid and a
    /// runtime is running.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the setting and the rule it broke: an invalid lock name, no
    /// backend, an advertised URL that is not an `http`/`https` URL, a zero grace, a lease below
    /// the backend's minimum, a margin of zero or of a third of the lease or more, a duration
    /// setting (grace, retry backoff, rejoin delay, liveness bound, check timeout, lease) over 1
    /// day, an unusable lock directory, or no tokio runtime.
    pub fn spawn(self) -> Result<Elector, ConfigError> {
        let checked = self.validate()?;
        let runtime = current_runtime()?;
        checked.prepare()?.spawn_on(&runtime, None)
    }

    /// Like [`spawn`](Self::spawn), then waits until the backend has answered: returns the
    /// elector once this node has become primary or has read another node's holder record (its
    /// [handle](Elector::handle) shows the role), and the backend's error if it is
    /// [misconfigured](Error::Misconfigured), instead of retrying for ever.
    ///
    /// Transient errors (an unreachable server, a timeout) are retried with the
    /// [retry backoff](Self::retry_backoff), as the campaign always does, for up to the
    /// [check timeout](Self::check_timeout) (30 s by default); if the backend has not answered by
    /// then, the last transient error is returned (or, if there was none, an
    /// [`Error::Backend`] saying that it did not answer in time). A misconfiguration is returned
    /// at its first occurrence. On every error the campaign is [shut down](Elector::shutdown)
    /// before this returns: the node never became primary and nothing keeps running.
    ///
    /// # Cancellation safety
    ///
    /// Nothing is left behind: if the future is dropped before it completes, the elector it has
    /// started is dropped with it, so its campaign stops (as when every clone of an [`Elector`]
    /// is dropped) and a lock it took is released. The builder is consumed either way. To wait
    /// for less than the check timeout, set a shorter one rather than wrapping this in
    /// [`tokio::time::timeout`], which would lose the last transient error.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] as [`spawn`](Self::spawn) (before anything is created);
    /// [`Error::Misconfigured`]; the last transient error, or [`Error::Backend`], when the backend
    /// has not answered within the check timeout.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_primary::{Elector, MemoryBackend, Misconfiguration};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_primary::Error> {
    /// let backend = MemoryBackend::new();
    /// let elector = Elector::builder("jobs").backend(backend.clone()).spawn_checked().await?;
    /// assert!(elector.handle().is_primary());
    /// # elector.shutdown().await;
    ///
    /// let broken = backend.connection();
    /// broken.faults().misconfigure(Misconfiguration::Authentication, "wrong password");
    /// let err = Elector::builder("jobs").backend(broken).spawn_checked().await.unwrap_err();
    /// assert_eq!(err.misconfiguration(), Some(Misconfiguration::Authentication));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn spawn_checked(self) -> Result<Elector, Error> {
        let timeout = self.check_timeout;
        let checked = self.validate()?;
        let runtime = current_runtime()?;
        let prepared = checked.prepare()?;
        let backend = prepared.backend_name;
        let (first_answer, answers) = check::first_answer();
        let elector = prepared.spawn_on(&runtime, Some(first_answer))?;
        check::wait(elector, answers, backend, timeout).await
    }

    /// Checks the configuration and prepares the backend's lock without starting the campaign:
    /// [`PrimaryLayer::new`](crate::PrimaryLayer::new) checks at once and spawns
    /// when the layer is first used.
    pub(crate) fn prepare(self) -> Result<Prepared, ConfigError> {
        self.validate()?.prepare()
    }

    /// Checks every setting, without any backend I/O.
    fn validate(mut self) -> Result<Checked, ConfigError> {
        validate_lock_name(&self.lock)?;
        let backend = self.backend.clone().ok_or(ConfigError::NoBackend)?;
        #[cfg(feature = "file")]
        let backend = crate::backend::host::wrap(
            backend,
            self.host_dir
                .clone()
                .unwrap_or_else(crate::backend::host::dir_from_env),
            &self.lock,
        );
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
            crate::origin::check_advertised(url)?;
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
        if self.check_timeout.is_zero() {
            return Err(ConfigError::InvalidTiming {
                setting: "check timeout",
                value: self.check_timeout,
                rule: "must be longer than zero".to_owned(),
            });
        }
        at_most_a_day("check timeout", self.check_timeout)?;
        at_most_a_day("settle time", self.settle)?;
        if self.window.is_zero() {
            return Err(ConfigError::InvalidTiming {
                setting: "handover window",
                value: self.window,
                rule: "must be longer than zero".to_owned(),
            });
        }
        at_most_a_day("handover window", self.window)?;
        if self.priority.is_none() {
            self.priority = Some(priority_from_env()?);
        }
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
                    tracing::warn!(target: TARGET,
                        lock = %self.lock,
                        backend = backend.name(),
                        ?lease,
                        "the backend has no lease; the lease setting is ignored"
                    );
                }
                None
            }
        };
        Ok(Checked {
            backend,
            lease,
            builder: self,
        })
    }
}

/// A configuration whose settings are checked; the backend has not been touched yet.
struct Checked {
    builder: ElectorBuilder,
    backend: Arc<dyn Backend>,
    lease: Option<Lease>,
}

impl Checked {
    /// Prepares the backend's lock: the first backend I/O (the file backend creates its files).
    fn prepare(self) -> Result<Prepared, ConfigError> {
        let lock = self.backend.lock(&self.builder.lock)?;
        Ok(Prepared {
            backend_name: self.backend.name(),
            lock,
            lease: self.lease,
            builder: self.builder,
        })
    }
}

/// The environment variable with this node's priority, read at spawn when
/// [`ElectorBuilder::priority`] was not called: a decimal `u64`.
pub const PRIORITY_ENV: &str = "TOWER_PRIMARY_PRIORITY";

/// The priority from [`PRIORITY_ENV`]: 0 when unset or empty.
fn priority_from_env() -> Result<u64, ConfigError> {
    parse_priority(std::env::var(PRIORITY_ENV).ok().as_deref())
}

fn parse_priority(value: Option<&str>) -> Result<u64, ConfigError> {
    match value.map(str::trim) {
        Some(v) if !v.is_empty() => v.parse().map_err(|_| ConfigError::InvalidPriority {
            value: value.unwrap_or_default().to_owned(),
        }),
        _ => Ok(0),
    }
}

/// The current tokio runtime, or the error that says there is none.
fn current_runtime() -> Result<tokio::runtime::Handle, ConfigError> {
    tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime {
        what: "Elector::spawn",
    })
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
        let runtime = current_runtime()?;
        self.spawn_on(&runtime, None)
    }

    /// Starts the campaign on `runtime`; `first_answer` hears about its first answer.
    fn spawn_on(
        self,
        runtime: &tokio::runtime::Handle,
        first_answer: Option<FirstAnswer>,
    ) -> Result<Elector, ConfigError> {
        let Prepared {
            builder,
            backend_name,
            lock,
            lease,
        } = self;
        let node = builder.node.unwrap_or_else(NodeId::from_env);
        let clock = builder.clock.unwrap_or_default();
        let shared = Shared::new(builder.lock.clone(), node.clone(), clock, Role::Starting);
        shared.entry.send_modify(|e| {
            e.priority = builder.priority.unwrap_or(0);
            e.ready = builder.ready_at_spawn;
            e.draining = builder.never_lead;
        });
        shared
            .watchdog
            .supervise(builder.liveness_bound, builder.grace, clock.now());
        crate::metrics::describe();
        crate::metrics::role(&builder.lock, false, None);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (stopped_tx, stopped_rx) = watch::channel(false);
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let campaign = Campaign {
            errors: BackendErrors::new(shared.clone(), backend_name),
            first_answer,
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
            registry: Registry::spawn(
                runtime,
                lock.clone(),
                shared.clone(),
                lease,
                lease.map_or(Duration::from_secs(5), |l| l.ttl()),
            ),
            settle: builder.settle,
            window: builder.window,
            handed_to: None,
            shunned: std::collections::HashMap::new(),
            last_holder: None,
            suspects: std::collections::HashMap::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_from_the_environment_are_whole_numbers() {
        assert_eq!(parse_priority(None).unwrap(), 0);
        assert_eq!(parse_priority(Some(" ")).unwrap(), 0);
        assert_eq!(parse_priority(Some("4187\n")).unwrap(), 4187);
        for bad in ["-1", "1.5", "v2", "18446744073709551616"] {
            let err = parse_priority(Some(bad)).unwrap_err();
            assert!(matches!(err, ConfigError::InvalidPriority { .. }), "{bad}");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn a_zero_handover_window_is_refused() {
        let err = Elector::builder("jobs")
            .backend(crate::MemoryBackend::new())
            .handover_window(Duration::ZERO)
            .validate()
            .err()
            .unwrap();
        assert!(err.to_string().contains("handover window"), "{err}");
    }
}
