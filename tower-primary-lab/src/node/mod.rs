//! Real processes as election nodes: a child side that runs one [`Elector`] and reports what
//! happens on its stdout, and a parent side ([`Cluster`]) that spawns such nodes, signals them
//! and awaits what they report.
//!
//! Fault tests and failover benchmarks need real processes: `SIGKILL` only means something when
//! the kernel closes the dead process's descriptors and connections. A test binary (or an example)
//! **re-executes itself in node mode**: the parent spawns copies of its own executable with
//! [`NODE_ENV`] set, and the child calls [`run_node_from_env`] instead of doing its normal work.
//!
//! # Node mode
//!
//! [`run_node_from_env`] reads a [`NodeConfig`] from the environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `TOWER_PRIMARY_TEST_NODE=1` | run as a node ([`is_node_process`]) |
//! | `TOWER_PRIMARY_BACKEND` | the backend string, e.g. a directory for the file backend |
//! | `TOWER_PRIMARY_TEST_LOCK` | the lock name |
//! | `TOWER_PRIMARY_TEST_LEASE` | optional lease, e.g. `2s` (ignored by backends without a lease) |
//! | `TOWER_PRIMARY_TEST_GRACE` | optional grace, e.g. `500ms` |
//! | `TOWER_PRIMARY_TEST_TICK` | how often the singleton task ticks (default `100ms`) |
//! | `TOWER_PRIMARY_TEST_SPAWN` | optional command (split on whitespace) that the singleton task spawns with [`std::process::Command`] at the start of every term, e.g. `sleep 30` |
//! | `TOWER_PRIMARY_TEST_PARENT_PIPE=1` | exit when stdin reaches end-of-file (the parent died) |
//! | `TOWER_PRIMARY_TEST_WITNESS` | optional `host:port` of a [fenced witness](tower_primary_testing::witness) to write to while primary, as node `<pid>` (its [`reported_pid`]) |
//! | `TOWER_PRIMARY_TEST_WITNESS_EVERY` | how often to write to the witness (default `2ms`) |
//! | `TOWER_PRIMARY_TEST_NODE_ID` | optional pid to report instead of its own in events and witness writes ([`reported_pid`]; set for a node in a [simulated host](super::host)) |
//!
//! The node spawns an [`Elector`] on a current-thread runtime, registers a singleton task that
//! reports its start at once and then ticks, and prints one line per role change. On `SIGTERM` it
//! calls [`Elector::shutdown`] (graceful handover), prints `released` and exits with status 0.
//!
//! # Protocol
//!
//! One line per event on stdout, `EVENT <mono_ns> <pid> <what> [args]`, where `mono_ns` is
//! [`monotonic_nanos`] (`CLOCK_MONOTONIC`, comparable between processes of one host). Other lines
//! (a test harness's own output) are ignored by the parent.
//!
//! | line | [`EventKind`] | when |
//! |---|---|---|
//! | `started` | [`Started`](EventKind::Started) | the elector was spawned |
//! | `primary <term>` | [`Primary`](EventKind::Primary) | the role became primary |
//! | `secondary <holder term or -> <holder pid or ->` | [`Secondary`](EventKind::Secondary) | the role (or the known holder) changed to secondary |
//! | `task-start <term>` | [`TaskStart`](EventKind::TaskStart) | the singleton task started: the first tick of a term |
//! | `tick <term> <n>` | [`Tick`](EventKind::Tick) | the singleton task's `n`-th periodic tick |
//! | `task-cancelled <term>` | [`TaskCancelled`](EventKind::TaskCancelled) | the singleton task saw its term end |
//! | `child <pid>` | [`ChildSpawned`](EventKind::ChildSpawned) | the task spawned the `TOWER_PRIMARY_TEST_SPAWN` command |
//! | `sigterm` | [`SigTerm`](EventKind::SigTerm) | `SIGTERM` arrived; shutdown begins |
//! | `released` | [`Released`](EventKind::Released) | [`Elector::shutdown`] returned |
//! | `exit <code>` | [`Exit`](EventKind::Exit) | the process is about to exit |
//! | `error <message>` | [`Error`](EventKind::Error) | the node could not start |
//!
//! The parent adds its own events to the same log: [`Spawned`](EventKind::Spawned),
//! [`Signalled`](EventKind::Signalled) (timestamped just before `kill(2)`) and
//! [`Exited`](EventKind::Exited).
//!
//! `task-start` and `task-cancelled` bound what a node does as primary: the task starts only after
//! the backend granted the lock, and the elector waits for the task to end before it releases the
//! lock. [`history()`] builds the primary periods from them as a
//! [`History`].
//!
//! # Example
//!
//! A test binary whose `node_entry` test doubles as the node:
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_primary_lab::node::{self, Cluster, NodeCommand, NodeConfig, NodeSignal};
//!
//! #[test]
//! fn node_entry() {
//!     if node::is_node_process() {
//!         node::run_node_from_env();
//!     }
//! }
//!
//! #[tokio::test]
//! async fn secondary_takes_over() {
//!     let dir = tempfile::tempdir().unwrap();
//!     let config = NodeConfig::new(dir.path().to_str().unwrap(), "doc-lock");
//!     let mut cluster = Cluster::new(NodeCommand::test_entry("node_entry").unwrap(), config);
//!     cluster.spawn_nodes(3).unwrap();
//!     let t = Duration::from_secs(20);
//!     let (pid, term) = cluster.wait_settled(t).await.unwrap();
//!     cluster.signal(pid, NodeSignal::Kill).await.unwrap();
//!     let next = cluster.wait_primary_after(term, pid, t).await.unwrap();
//!     assert_ne!(next.pid, pid);
//!     cluster.history().assert_ok();
//! }
//! # fn main() {}
//! ```
//!
//! [`Elector`]: tower_primary::Elector
//! [`Elector::shutdown`]: tower_primary::Elector::shutdown
//! [`monotonic_nanos`]: tower_primary::clock::monotonic_nanos

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::host::SimulatedHost;
use crate::sync::lock;
use tower_primary::clock::monotonic_nanos;
use tower_primary::role::{Role, RoleHandle, TermContext};
use tower_primary::{Elector, Lease};
use tower_primary_testing::history::{History, Period};

/// Set to `1` in a node's environment: the process runs as a node ([`is_node_process`]).
pub const NODE_ENV: &str = "TOWER_PRIMARY_TEST_NODE";
/// The lock name a node competes for.
pub const LOCK_ENV: &str = "TOWER_PRIMARY_TEST_LOCK";
/// A node's lease (humantime, e.g. `2s`).
pub const LEASE_ENV: &str = "TOWER_PRIMARY_TEST_LEASE";
/// A node's grace (humantime, e.g. `500ms`).
pub const GRACE_ENV: &str = "TOWER_PRIMARY_TEST_GRACE";
/// How often a node's singleton task ticks (humantime, default `100ms`).
pub const TICK_ENV: &str = "TOWER_PRIMARY_TEST_TICK";
/// A command (split on whitespace) the singleton task spawns at the start of every term.
pub const SPAWN_ENV: &str = "TOWER_PRIMARY_TEST_SPAWN";
/// Set to `1`: the node exits when its stdin reaches end-of-file, so nodes never outlive a parent
/// that was killed. [`Cluster`] sets it and keeps the pipe open.
pub const PARENT_PIPE_ENV: &str = "TOWER_PRIMARY_TEST_PARENT_PIPE";
/// The address of a [fenced witness](tower_primary_testing::witness) the node writes to while primary.
pub const WITNESS_ENV: &str = "TOWER_PRIMARY_TEST_WITNESS";
/// How often the node writes to the witness (humantime, default `2ms`).
pub const WITNESS_EVERY_ENV: &str = "TOWER_PRIMARY_TEST_WITNESS_EVERY";

const DEFAULT_TICK: Duration = Duration::from_millis(100);

// ------------------------------------------------------------------------------------------------
// Configuration

/// What a node runs: backend, lock name and optional behaviours. Passed to the child through the
/// environment ([`to_env`](Self::to_env), [`from_env`](Self::from_env)).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_primary_lab::node::NodeConfig;
///
/// let config = NodeConfig::new("/run/myapp", "jobs")
///     .lease(Duration::from_secs(2))
///     .spawn_when_primary(["sleep", "30"]);
/// let env = config.to_env();
/// assert!(env.contains(&("TOWER_PRIMARY_TEST_LOCK", "jobs".to_owned())));
/// assert!(env.contains(&("TOWER_PRIMARY_TEST_SPAWN", "sleep 30".to_owned())));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeConfig {
    /// The backend string.
    pub backend: String,
    /// The lock name.
    pub lock: String,
    /// The lease, for backends that have one.
    pub lease: Option<Duration>,
    /// The grace of shutdown and step-down (the elector's default when `None`).
    pub grace: Option<Duration>,
    /// How often the singleton task ticks.
    pub tick: Duration,
    /// A command (program and arguments) the singleton task spawns at the start of every term.
    pub spawn: Option<Vec<String>>,
    /// A fenced witness to write to while primary, and how often
    /// ([`witness::write_while_primary`](tower_primary_testing::witness::write_while_primary)).
    pub witness: Option<(std::net::SocketAddr, Duration)>,
}

impl NodeConfig {
    /// A node of `lock` on `backend`, with a 100 ms tick and the elector's defaults otherwise.
    #[must_use]
    pub fn new(backend: impl Into<String>, lock: impl Into<String>) -> Self {
        NodeConfig {
            backend: backend.into(),
            lock: lock.into(),
            lease: None,
            grace: None,
            tick: DEFAULT_TICK,
            spawn: None,
            witness: None,
        }
    }

    /// Makes the node write to the [fenced witness](tower_primary_testing::witness) at `addr` every
    /// `every` while primary, as node `<pid>`.
    #[must_use]
    pub fn witness(mut self, addr: std::net::SocketAddr, every: Duration) -> Self {
        self.witness = Some((addr, every));
        self
    }

    /// Sets the lease.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Sets the grace.
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Sets how often the singleton task ticks.
    #[must_use]
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// Makes the singleton task spawn `command` (no argument may contain whitespace) at the start
    /// of every term, with its stdio on `/dev/null`; its pid is reported as `child <pid>`.
    #[must_use]
    pub fn spawn_when_primary<I, S>(mut self, command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.spawn = Some(command.into_iter().map(Into::into).collect());
        self
    }

    /// The environment variables that carry this configuration (without [`NODE_ENV`]).
    #[must_use]
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (tower_primary::backend::BACKEND_ENV, self.backend.clone()),
            (LOCK_ENV, self.lock.clone()),
            (TICK_ENV, humantime::format_duration(self.tick).to_string()),
        ];
        if let Some(lease) = self.lease {
            env.push((LEASE_ENV, humantime::format_duration(lease).to_string()));
        }
        if let Some(grace) = self.grace {
            env.push((GRACE_ENV, humantime::format_duration(grace).to_string()));
        }
        if let Some(spawn) = &self.spawn {
            env.push((SPAWN_ENV, spawn.join(" ")));
        }
        if let Some((addr, every)) = self.witness {
            env.push((WITNESS_ENV, addr.to_string()));
            env.push((
                WITNESS_EVERY_ENV,
                humantime::format_duration(every).to_string(),
            ));
        }
        env
    }

    /// Reads the configuration from this process's environment.
    ///
    /// # Errors
    ///
    /// A message naming the variable that is missing or malformed.
    pub fn from_env() -> Result<Self, String> {
        fn var(name: &str) -> Option<String> {
            std::env::var(name).ok().filter(|v| !v.trim().is_empty())
        }
        fn duration(name: &str) -> Result<Option<Duration>, String> {
            var(name)
                .map(|v| {
                    humantime::parse_duration(v.trim()).map_err(|e| format!("{name}={v:?}: {e}"))
                })
                .transpose()
        }
        let backend = var(tower_primary::backend::BACKEND_ENV)
            .ok_or_else(|| format!("{} is not set", tower_primary::backend::BACKEND_ENV))?;
        let lock = var(LOCK_ENV).ok_or_else(|| format!("{LOCK_ENV} is not set"))?;
        let spawn = var(SPAWN_ENV).map(|s| s.split_whitespace().map(str::to_owned).collect());
        let witness = match var(WITNESS_ENV) {
            Some(v) => Some((
                v.trim()
                    .parse()
                    .map_err(|e| format!("{WITNESS_ENV}={v:?}: {e}"))?,
                duration(WITNESS_EVERY_ENV)?.unwrap_or(Duration::from_millis(2)),
            )),
            None => None,
        };
        Ok(NodeConfig {
            backend: backend.trim().to_owned(),
            lock: lock.trim().to_owned(),
            lease: duration(LEASE_ENV)?,
            grace: duration(GRACE_ENV)?,
            tick: duration(TICK_ENV)?.unwrap_or(DEFAULT_TICK),
            spawn,
            witness,
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Events

/// A signal the parent sends to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NodeSignal {
    /// `SIGKILL`: the process dies at once; the kernel closes its descriptors.
    Kill,
    /// `SIGTERM`: the node shuts its elector down (graceful handover), then exits.
    Term,
    /// `SIGINT`.
    Int,
    /// `SIGSTOP`: the process is frozen.
    Stop,
    /// `SIGCONT`: a frozen process resumes.
    Cont,
}

impl NodeSignal {
    /// The signal's name, e.g. `"SIGKILL"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            NodeSignal::Kill => "SIGKILL",
            NodeSignal::Term => "SIGTERM",
            NodeSignal::Int => "SIGINT",
            NodeSignal::Stop => "SIGSTOP",
            NodeSignal::Cont => "SIGCONT",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            NodeSignal::Kill,
            NodeSignal::Term,
            NodeSignal::Int,
            NodeSignal::Stop,
            NodeSignal::Cont,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    fn to_nix(self) -> nix::sys::signal::Signal {
        use nix::sys::signal::Signal;
        match self {
            NodeSignal::Kill => Signal::SIGKILL,
            NodeSignal::Term => Signal::SIGTERM,
            NodeSignal::Int => Signal::SIGINT,
            NodeSignal::Stop => Signal::SIGSTOP,
            NodeSignal::Cont => Signal::SIGCONT,
        }
    }
}

impl fmt::Display for NodeSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened; see the [protocol](self#protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// The node spawned its elector.
    Started,
    /// The node's role became primary.
    Primary {
        /// The term.
        term: u64,
    },
    /// The node's role became secondary, or the holder it knows changed.
    Secondary {
        /// The term of the holder the node knows of.
        holder_term: Option<u64>,
        /// The pid of the holder the node knows of.
        holder_pid: Option<u32>,
    },
    /// The singleton task started (the first tick of the term).
    TaskStart {
        /// The term.
        term: u64,
    },
    /// A periodic tick of the singleton task.
    Tick {
        /// The term.
        term: u64,
        /// 1 for the first periodic tick after the start, then 2, 3…
        n: u64,
    },
    /// The singleton task saw its term end.
    TaskCancelled {
        /// The term.
        term: u64,
    },
    /// The singleton task spawned the configured command.
    ChildSpawned {
        /// The pid of the spawned process.
        pid: u32,
    },
    /// `SIGTERM` arrived; the node is shutting its elector down.
    SigTerm,
    /// [`Elector::shutdown`](tower_primary::Elector::shutdown) returned: the lock is released.
    Released,
    /// The node is about to exit with `code`.
    Exit {
        /// The exit status.
        code: i32,
    },
    /// The node could not start (bad configuration, a configuration error from `spawn()`).
    Error {
        /// What went wrong.
        message: String,
    },
    /// Recorded by the parent: the process was spawned.
    Spawned,
    /// Recorded by the parent, timestamped just before `kill(2)`.
    Signalled {
        /// The signal sent.
        signal: NodeSignal,
    },
    /// Recorded by the parent: the process exited and was reaped.
    Exited {
        /// The exit code, when it exited normally.
        code: Option<i32>,
        /// The signal that ended it, if any.
        signal: Option<i32>,
    },
}

/// One line of the [protocol](self#protocol): when, which process, what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC` in nanoseconds.
    pub at: u64,
    /// The node's process id.
    pub pid: u32,
    /// What happened.
    pub kind: EventKind,
}

impl Event {
    /// An event of this process, now.
    #[must_use]
    pub fn now(kind: EventKind) -> Self {
        Event {
            at: monotonic_nanos(),
            pid: reported_pid(),
            kind,
        }
    }

    /// The term the event is about, if any.
    #[must_use]
    pub fn term(&self) -> Option<u64> {
        match self.kind {
            EventKind::Primary { term }
            | EventKind::TaskStart { term }
            | EventKind::Tick { term, .. }
            | EventKind::TaskCancelled { term } => Some(term),
            EventKind::Secondary { holder_term, .. } => holder_term,
            _ => None,
        }
    }

    /// Parses a protocol line; `None` for any other line.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_primary_lab::node::{Event, EventKind};
    ///
    /// let e = Event::parse("EVENT 123456 42 primary 7").unwrap();
    /// assert_eq!((e.at, e.pid, e.kind.clone()), (123456, 42, EventKind::Primary { term: 7 }));
    /// assert_eq!(e.to_string(), "EVENT 123456 42 primary 7");
    /// assert!(Event::parse("running 1 test").is_none());
    /// ```
    #[must_use]
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.trim_end().split(' ');
        if words.next()? != "EVENT" {
            return None;
        }
        let at = words.next()?.parse().ok()?;
        let pid = words.next()?.parse().ok()?;
        let what = words.next()?;
        let mut num = || words.next()?.parse::<u64>().ok();
        let kind = match what {
            "started" => EventKind::Started,
            "primary" => EventKind::Primary { term: num()? },
            "secondary" => {
                let opt = |w: Option<&str>| -> Option<Option<u64>> {
                    match w? {
                        "-" => Some(None),
                        n => n.parse().ok().map(Some),
                    }
                };
                let holder_term = opt(words.next())?;
                let holder_pid = match opt(words.next())? {
                    None => None,
                    Some(p) => Some(u32::try_from(p).ok()?),
                };
                EventKind::Secondary {
                    holder_term,
                    holder_pid,
                }
            }
            "task-start" => EventKind::TaskStart { term: num()? },
            "tick" => EventKind::Tick {
                term: num()?,
                n: num()?,
            },
            "task-cancelled" => EventKind::TaskCancelled { term: num()? },
            "child" => EventKind::ChildSpawned {
                pid: u32::try_from(num()?).ok()?,
            },
            "sigterm" => EventKind::SigTerm,
            "released" => EventKind::Released,
            "exit" => EventKind::Exit {
                code: words.next()?.parse().ok()?,
            },
            "error" => EventKind::Error {
                message: words.collect::<Vec<_>>().join(" "),
            },
            "spawned" => EventKind::Spawned,
            "signal" => EventKind::Signalled {
                signal: NodeSignal::from_name(words.next()?)?,
            },
            "exited" => {
                let opt = |w: Option<&str>| -> Option<Option<i32>> {
                    match w? {
                        "-" => Some(None),
                        n => n.parse().ok().map(Some),
                    }
                };
                EventKind::Exited {
                    code: opt(words.next())?,
                    signal: opt(words.next())?,
                }
            }
            _ => return None,
        };
        Some(Event { at, pid, kind })
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn opt<T: fmt::Display>(v: Option<T>) -> String {
            v.map_or_else(|| "-".to_owned(), |v| v.to_string())
        }
        write!(f, "EVENT {} {} ", self.at, self.pid)?;
        match &self.kind {
            EventKind::Started => f.write_str("started"),
            EventKind::Primary { term } => write!(f, "primary {term}"),
            EventKind::Secondary {
                holder_term,
                holder_pid,
            } => write!(f, "secondary {} {}", opt(*holder_term), opt(*holder_pid)),
            EventKind::TaskStart { term } => write!(f, "task-start {term}"),
            EventKind::Tick { term, n } => write!(f, "tick {term} {n}"),
            EventKind::TaskCancelled { term } => write!(f, "task-cancelled {term}"),
            EventKind::ChildSpawned { pid } => write!(f, "child {pid}"),
            EventKind::SigTerm => f.write_str("sigterm"),
            EventKind::Released => f.write_str("released"),
            EventKind::Exit { code } => write!(f, "exit {code}"),
            EventKind::Error { message } => {
                write!(
                    f,
                    "error {}",
                    message.split_whitespace().collect::<Vec<_>>().join(" ")
                )
            }
            EventKind::Spawned => f.write_str("spawned"),
            EventKind::Signalled { signal } => write!(f, "signal {signal}"),
            EventKind::Exited { code, signal } => {
                write!(f, "exited {} {}", opt(*code), opt(*signal))
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The child side

/// Whether this process was started as a node (`TOWER_PRIMARY_TEST_NODE=1`).
#[must_use]
pub fn is_node_process() -> bool {
    std::env::var(NODE_ENV).is_ok_and(|v| v.trim() == "1")
}

/// The pid this process reports itself as: [`NODE_ID_ENV`](super::host::NODE_ID_ENV) when set
/// (a node in a [simulated host](super::host), whose own pid is one of its namespace), else its
/// own pid.
#[must_use]
pub fn reported_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(|| {
        std::env::var(super::host::NODE_ID_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(std::process::id)
    })
}

/// Prints `kind` as a protocol line of this process, now, and flushes stdout.
pub fn emit(kind: EventKind) {
    let line = Event::now(kind).to_string();
    let mut out = std::io::stdout().lock();
    // A parent that went away is not this node's problem: it exits on stdin EOF.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs this process as a node configured by the environment (see the [module docs](self)), and
/// exits: status 0 after a `SIGTERM` handover, 1 if the elector stopped by itself, 2 on a
/// configuration error, 3 when the parent's pipe closed.
///
/// Builds its own current-thread tokio runtime, so call it from plain synchronous code (a `#[test]`
/// function or `main` before any runtime exists). The process exits without dropping the runtime.
pub fn run_node_from_env() -> ! {
    let config = match NodeConfig::from_env() {
        Ok(c) => c,
        Err(message) => exit_node(2, Some(message)),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => exit_node(2, Some(format!("cannot build a tokio runtime: {e}"))),
    };
    let code = runtime.block_on(run_node(config));
    exit_node(code, None)
}

fn exit_node(code: i32, error: Option<String>) -> ! {
    if let Some(message) = error {
        emit(EventKind::Error { message });
    }
    emit(EventKind::Exit { code });
    std::process::exit(code)
}

/// Runs a node on the current runtime until `SIGTERM` (returns 0 after the handover) or until the
/// elector stops by itself (returns 1). Configuration errors are reported as an `error` line and
/// return 2. See [`run_node_from_env`], which also exits the process.
pub async fn run_node(config: NodeConfig) -> i32 {
    use tokio::signal::unix::{SignalKind, signal};

    // Before anything can make this node primary: a SIGTERM must always mean a handover.
    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            emit(EventKind::Error {
                message: format!("cannot install a SIGTERM handler: {e}"),
            });
            return 2;
        }
    };
    if std::env::var(PARENT_PIPE_ENV).is_ok_and(|v| v.trim() == "1") {
        std::thread::spawn(exit_when_parent_is_gone);
    }
    let backend = match tower_primary::backend::from_url(&config.backend) {
        Ok(b) => b,
        Err(e) => {
            emit(EventKind::Error {
                message: e.to_string(),
            });
            return 2;
        }
    };
    let mut builder = Elector::builder(config.lock.clone()).backend(backend);
    if let Some(lease) = config.lease {
        builder = builder.lease(Lease::new(lease));
    }
    if let Some(grace) = config.grace {
        builder = builder.grace(grace);
    }
    let elector = match builder.spawn() {
        Ok(e) => e,
        Err(e) => {
            emit(EventKind::Error {
                message: e.to_string(),
            });
            return 2;
        }
    };
    emit(EventKind::Started);
    tokio::spawn(report_roles(elector.handle()));
    let tick = config.tick.max(Duration::from_millis(1));
    let spawn = Arc::new(config.spawn);
    elector.singleton_task("node-tick", move |ctx: TermContext| {
        let spawn = spawn.clone();
        async move {
            tick_while_primary(ctx, tick, spawn.as_deref()).await;
            Ok::<(), std::convert::Infallible>(())
        }
    });
    if let Some((addr, every)) = config.witness {
        let node = reported_pid().to_string();
        tower_primary_testing::witness::write_while_primary(&elector, addr, node, every);
    }
    tokio::select! {
        _ = sigterm.recv() => {
            emit(EventKind::SigTerm);
            elector.shutdown().await;
            emit(EventKind::Released);
            0
        }
        () = elector.stopped() => 1,
    }
}

async fn tick_while_primary(ctx: TermContext, tick: Duration, spawn: Option<&[String]>) {
    let term = ctx.term();
    // First, so that the line's timestamp is as close to the promotion as it can be.
    emit(EventKind::TaskStart { term });
    if let Some([program, args @ ..]) = spawn {
        // std's Command: the lock's descriptor is O_CLOEXEC, so the child must not keep the lock.
        match std::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => emit(EventKind::ChildSpawned { pid: child.id() }),
            Err(e) => emit(EventKind::Error {
                message: format!("cannot spawn {program}: {e}"),
            }),
        }
    }
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    let mut n = 0;
    loop {
        tokio::select! {
            biased;
            () = ctx.cancelled() => {
                emit(EventKind::TaskCancelled { term });
                return;
            }
            _ = ticks.tick() => {
                // A step runs only under a live term: a node resumed past its deadline (SIGSTOP)
                // sees it ended before the elector has run.
                if !ctx.is_valid() {
                    ctx.cancelled().await;
                    emit(EventKind::TaskCancelled { term });
                    return;
                }
                n += 1;
                emit(EventKind::Tick { term, n });
            }
        }
    }
}

async fn report_roles(mut handle: RoleHandle) {
    let mut last: Option<EventKind> = None;
    loop {
        let kind = match handle.role() {
            Role::Starting => None,
            Role::Primary { term, .. } => Some(EventKind::Primary { term }),
            Role::Secondary { holder } => Some(EventKind::Secondary {
                holder_term: holder.as_ref().map(|h| h.term),
                holder_pid: holder.as_ref().map(|h| h.pid),
            }),
        };
        if let Some(kind) = kind
            && last.as_ref() != Some(&kind)
        {
            emit(kind.clone());
            last = Some(kind);
        }
        handle.changed().await;
    }
}

fn exit_when_parent_is_gone() {
    use std::io::Read as _;
    // A plain thread: it blocks in read(2) until the parent's end of the pipe closes.
    let mut stdin = std::io::stdin();
    let mut buf = [0_u8; 64];
    while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
    exit_node(3, Some("the parent's pipe closed".to_owned()));
}

// ------------------------------------------------------------------------------------------------
// The parent side

/// How to start a node process: a program, its arguments and extra environment. The node's
/// [`NodeConfig`] and [`NODE_ENV`] are added by [`Cluster`].
#[derive(Clone, Debug)]
pub struct NodeCommand {
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl NodeCommand {
    /// Runs `program`.
    #[must_use]
    pub fn new(program: impl Into<PathBuf>) -> Self {
        NodeCommand {
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// This executable, without arguments: for a binary or an example whose `main` starts with
    /// `if is_node_process() { run_node_from_env() }`.
    ///
    /// # Errors
    ///
    /// When the path of the current executable cannot be found.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(NodeCommand::new(std::env::current_exe()?))
    }

    /// This test binary, running only the test `name` (`<exe> <name> --exact --nocapture
    /// --test-threads=1 --quiet`): for an integration test whose `name` test calls
    /// [`run_node_from_env`] when [`is_node_process`]. `--nocapture` matters: the harness would
    /// otherwise capture the protocol lines.
    ///
    /// # Errors
    ///
    /// When the path of the current executable cannot be found.
    pub fn test_entry(name: &str) -> std::io::Result<Self> {
        Ok(NodeCommand::current_exe()?
            .arg(name)
            .arg("--exact")
            .arg("--nocapture")
            .arg("--test-threads=1")
            .arg("--quiet"))
    }

    /// Adds an argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds an environment variable.
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }
}

/// The shared, append-only log of events of every node of a [`Cluster`], in arrival order.
///
/// Events of one node arrive in the order the node printed them; between nodes, compare
/// [`Event::at`].
#[derive(Clone, Debug)]
pub struct EventLog {
    inner: Arc<LogInner>,
}

#[derive(Debug)]
struct LogInner {
    events: Mutex<Vec<Event>>,
    version: watch::Sender<u64>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new()
    }
}

impl EventLog {
    /// An empty log.
    #[must_use]
    pub fn new() -> Self {
        EventLog {
            inner: Arc::new(LogInner {
                events: Mutex::new(Vec::new()),
                version: watch::channel(0).0,
            }),
        }
    }

    /// Appends an event and wakes the waiters.
    pub fn push(&self, event: Event) {
        lock(&self.inner.events).push(event);
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// A copy of the events so far.
    #[must_use]
    pub fn snapshot(&self) -> Vec<Event> {
        lock(&self.inner.events).clone()
    }

    /// Calls `check` on the events so far, then again after every new event, until it returns
    /// `Some`, or `timeout` passes (`None`).
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&[Event]) -> Option<T>,
    ) -> Option<T> {
        let mut version = self.inner.version.subscribe();
        let waiting = async {
            loop {
                version.borrow_and_update();
                if let Some(found) = check(&lock(&self.inner.events)) {
                    return found;
                }
                // The sender lives in `self`: `changed` cannot fail while we wait.
                let _ = version.changed().await;
            }
        };
        tokio::time::timeout(timeout, waiting).await.ok()
    }
}

/// The role a node last reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ObservedRole {
    /// `primary <term>`.
    Primary {
        /// The term.
        term: u64,
    },
    /// `secondary`, knowing a holder of this term (or none).
    Secondary {
        /// The term of the holder it knows of.
        holder_term: Option<u64>,
    },
}

/// What the log says about one node now.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeState {
    /// The process id.
    pub pid: u32,
    /// Neither reaped nor sent `SIGKILL`.
    pub alive: bool,
    /// Sent `SIGSTOP` and not `SIGCONT` since.
    pub stopped: bool,
    /// Sent `SIGTERM` (or `SIGINT`).
    pub terminating: bool,
    /// The role the node last reported, if any.
    pub role: Option<ObservedRole>,
}

/// The state of every node that appears in `events` (see [`NodeState`]), by pid.
#[must_use]
pub fn node_states(events: &[Event]) -> BTreeMap<u32, NodeState> {
    let mut states: BTreeMap<u32, NodeState> = BTreeMap::new();
    for e in events {
        let s = states.entry(e.pid).or_insert(NodeState {
            pid: e.pid,
            alive: true,
            stopped: false,
            terminating: false,
            role: None,
        });
        match e.kind {
            EventKind::Primary { term } => s.role = Some(ObservedRole::Primary { term }),
            EventKind::Secondary { holder_term, .. } => {
                s.role = Some(ObservedRole::Secondary { holder_term });
            }
            EventKind::Released => s.role = Some(ObservedRole::Secondary { holder_term: None }),
            EventKind::Exit { .. } | EventKind::Exited { .. } => {
                s.alive = false;
                s.role = None;
            }
            EventKind::Signalled { signal } => match signal {
                NodeSignal::Kill => {
                    s.alive = false;
                    s.role = None;
                }
                NodeSignal::Stop => s.stopped = true,
                NodeSignal::Cont => s.stopped = false,
                NodeSignal::Term | NodeSignal::Int => s.terminating = true,
            },
            _ => {}
        }
    }
    states
}

/// The primary periods in `events` as a [`History`], one node per pid (the node id is the pid in
/// decimal), times in `CLOCK_MONOTONIC` ns; check it with [`History::check`].
///
/// A period starts at a node's first `primary <t>` or `task-start <t>` (both come after the
/// backend's grant) and ends at the first of: `task-cancelled` (the elector waits for the task
/// before it releases the lock), `secondary`, `released`, `exit`, a `primary` of another term, the
/// parent's `SIGKILL` (timestamped before `kill(2)`) or the reaping. A `SIGSTOP`ped node's period
/// goes on: on the file backend a frozen process still holds its lock (lease backends bound it
/// with their deadline, which these events do not carry).
///
/// # Examples
///
/// ```
/// use tower_primary_lab::node::{Event, history};
///
/// let events: Vec<Event> = [
///     "EVENT 100 7 task-start 1",
///     "EVENT 101 7 primary 1",
///     "EVENT 200 7 signal SIGKILL",
///     "EVENT 250 8 primary 2",
/// ]
/// .iter()
/// .map(|l| Event::parse(l).unwrap())
/// .collect();
/// let h = history(&events);
/// assert_eq!(h.periods().len(), 2);
/// assert_eq!(h.periods()[0].end, Some(200));
/// h.assert_ok();
/// ```
#[must_use]
pub fn history(events: &[Event]) -> History {
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| e.at);
    let mut open: HashMap<u32, Period> = HashMap::new();
    let mut done: Vec<Period> = Vec::new();
    for e in sorted {
        let start_of = match e.kind {
            EventKind::Primary { term } | EventKind::TaskStart { term } => Some(term),
            _ => None,
        };
        let ends = match e.kind {
            EventKind::Secondary { .. }
            | EventKind::TaskCancelled { .. }
            | EventKind::Released
            | EventKind::Exit { .. }
            | EventKind::Exited { .. }
            | EventKind::Signalled {
                signal: NodeSignal::Kill,
            } => true,
            EventKind::Primary { term } | EventKind::TaskStart { term } => {
                open.get(&e.pid).is_some_and(|p| p.term != term)
            }
            _ => false,
        };
        if ends && let Some(p) = open.remove(&e.pid) {
            done.push(p.with_end(e.at));
        }
        if let Some(term) = start_of {
            // A late line of a term that already ended (its `primary` printed after its
            // `task-cancelled`) starts nothing.
            let node = e.pid.to_string();
            let seen = done.iter().any(|p| p.node == node && p.term == term);
            if !seen && !open.contains_key(&e.pid) {
                open.insert(e.pid, Period::new(node, term, e.at));
            }
        }
    }
    done.extend(open.into_values());
    done.sort_by_key(|p| p.start);
    let mut history = History::new();
    for p in done {
        history.push(p);
    }
    history
}

/// A wait on a [`Cluster`] that timed out. Its `Display` (and `Debug`) lists every event and the
/// last stderr lines of every node, so a failed test shows what happened.
pub struct WaitError {
    what: String,
    timeout: Duration,
    dump: String,
}

impl WaitError {
    /// What was awaited.
    #[must_use]
    pub fn what(&self) -> &str {
        &self.what
    }
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}\n{}",
            self.timeout, self.what, self.dump
        )
    }
}

impl fmt::Debug for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for WaitError {}

type SignalRequest = (NodeSignal, oneshot::Sender<std::io::Result<u64>>);

#[derive(Debug)]
struct NodeProcess {
    pid: u32,
    signals: mpsc::UnboundedSender<SignalRequest>,
    supervisor: JoinHandle<()>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

const STDERR_LINES: usize = 200;

/// A primary's end and its successor, from [`Cluster::kill_primary`] or
/// [`Cluster::terminate_primary`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Succession {
    /// The old primary's pid.
    pub old: u32,
    /// The old primary's term.
    pub term: u64,
    /// When the signal was sent (`CLOCK_MONOTONIC` ns).
    pub signalled_at: u64,
    /// The successor's `primary` event: its pid, its term (above [`term`](Self::term)) and
    /// when it became primary.
    pub next: Event,
}

/// A graceful handover, from [`Cluster::terminate_primary`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Handover {
    /// Who handed over to whom.
    pub succession: Succession,
    /// When the old primary's task saw its term end (`CLOCK_MONOTONIC` ns).
    pub cancelled: u64,
    /// When the old primary's shutdown returned, the lock released (`CLOCK_MONOTONIC` ns).
    pub released: u64,
}

/// A set of node processes and the log of their events.
///
/// Each node runs `command` with the cluster's [`NodeConfig`] (or one given per node) in its
/// environment; its stdout is parsed into the shared [`EventLog`], its stderr kept (the last 200
/// lines) for failure reports. Dropping the cluster kills every node it started (`SIGKILL`).
///
/// Must be used inside a tokio runtime (it spawns a few tasks per node).
#[derive(Debug)]
pub struct Cluster {
    command: NodeCommand,
    config: NodeConfig,
    log: EventLog,
    nodes: Vec<NodeProcess>,
    origin: u64,
}

impl Cluster {
    /// A cluster of nodes that run `command` with `config`. Starts no process yet.
    #[must_use]
    pub fn new(command: NodeCommand, config: NodeConfig) -> Self {
        Cluster {
            command,
            config,
            log: EventLog::new(),
            nodes: Vec::new(),
            origin: monotonic_nanos(),
        }
    }

    /// The cluster's node configuration.
    #[must_use]
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The event log.
    #[must_use]
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// A copy of every event so far, in arrival order.
    #[must_use]
    pub fn events(&self) -> Vec<Event> {
        self.log.snapshot()
    }

    /// The pids of every node started, in start order.
    #[must_use]
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.pid).collect()
    }

    /// Starts one node with the cluster's configuration; returns its pid.
    ///
    /// # Errors
    ///
    /// When the process cannot be spawned.
    pub fn spawn_node(&mut self) -> std::io::Result<u32> {
        let config = self.config.clone();
        self.spawn_node_with(&config)
    }

    /// Starts `n` nodes; returns their pids.
    ///
    /// # Errors
    ///
    /// When a process cannot be spawned.
    pub fn spawn_nodes(&mut self, n: usize) -> std::io::Result<Vec<u32>> {
        (0..n).map(|_| self.spawn_node()).collect()
    }

    /// Starts one node with its own configuration; returns its pid.
    ///
    /// # Errors
    ///
    /// When the process cannot be spawned.
    pub fn spawn_node_with(&mut self, config: &NodeConfig) -> std::io::Result<u32> {
        let command = self.command.clone();
        self.spawn_node_running(&command, config)
    }

    /// Starts one node that runs `command` instead of the cluster's, with `config`; returns its
    /// pid. Mixed-version tests run an older build's node beside the current one this way
    /// ([`old_version`](crate::old_version)): both speak the same protocol.
    ///
    /// # Errors
    ///
    /// When the process cannot be spawned.
    pub fn spawn_node_running(
        &mut self,
        command: &NodeCommand,
        config: &NodeConfig,
    ) -> std::io::Result<u32> {
        let mut cmd = tokio::process::Command::new(&command.program);
        cmd.args(&command.args);
        self.spawn_command(cmd, &command.envs, config, false)
    }

    /// Starts one node with its own configuration inside a [`SimulatedHost`] (its own PID
    /// namespace); returns the pid the node reports itself as, which [`signal`](Self::signal)
    /// and every other method take like any node's pid. Signals reach the node's process itself
    /// (its pid on this machine, found through the host); a `SIGCONT` also resumes the `nsenter`
    /// process that waits for it (which stops itself when its child stops).
    ///
    /// # Errors
    ///
    /// When the process cannot be spawned.
    pub fn spawn_node_on(
        &mut self,
        host: &SimulatedHost,
        config: &NodeConfig,
    ) -> std::io::Result<u32> {
        let cmd = host.command(&self.command.program, &self.command.args);
        let envs = self.command.envs.clone();
        self.spawn_command(cmd, &envs, config, true)
    }

    fn spawn_command(
        &mut self,
        mut cmd: tokio::process::Command,
        envs: &[(OsString, OsString)],
        config: &NodeConfig,
        hosted: bool,
    ) -> std::io::Result<u32> {
        cmd.envs(envs.iter().map(|(k, v)| (k, v)))
            .envs(config.to_env())
            .env(NODE_ENV, "1")
            .env(PARENT_PIPE_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the node exited at once"))?;
        self.log.push(Event {
            at: monotonic_nanos(),
            pid,
            kind: EventKind::Spawned,
        });
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(read_events(out, self.log.clone(), stderr.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(read_stderr(err, stderr.clone()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let supervisor = tokio::spawn(supervise(child, pid, hosted, self.log.clone(), rx));
        self.nodes.push(NodeProcess {
            pid,
            signals: tx,
            supervisor,
            stderr,
        });
        Ok(pid)
    }

    /// Sends `signal` to node `pid`; returns the `CLOCK_MONOTONIC` ns taken just before `kill(2)`
    /// (also logged as [`EventKind::Signalled`]).
    ///
    /// # Errors
    ///
    /// An unknown pid, a node already reaped, or `kill(2)`'s error.
    pub async fn signal(&self, pid: u32, signal: NodeSignal) -> std::io::Result<u64> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.pid == pid)
            .ok_or_else(|| std::io::Error::other(format!("no node with pid {pid}")))?;
        let (tx, rx) = oneshot::channel();
        let gone = || std::io::Error::other(format!("node {pid} has exited"));
        node.signals.send((signal, tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// What the log says about every node now.
    #[must_use]
    pub fn states(&self) -> BTreeMap<u32, NodeState> {
        node_states(&self.log.snapshot())
    }

    /// The primary periods so far, as a [`History`] (see [`history`]).
    #[must_use]
    pub fn history(&self) -> History {
        history(&self.log.snapshot())
    }

    /// Panics, with the checker's report and [`dump`](Self::dump), unless the primary periods so
    /// far do not overlap and their terms rise.
    ///
    /// # Panics
    ///
    /// When the history breaks either rule.
    pub fn assert_history_ok(&self) {
        let report = self.history().check();
        assert!(report.is_ok(), "{report}\n{}", self.dump());
    }

    /// Waits until `check` returns `Some` on the events (re-checked after every new event).
    ///
    /// # Errors
    ///
    /// [`WaitError`] naming `what`, with a dump of the events, after `timeout`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut(&[Event]) -> Option<T>,
    ) -> Result<T, WaitError> {
        match self.log.wait_for(timeout, check).await {
            Some(found) => Ok(found),
            None => Err(WaitError {
                what: what.to_owned(),
                timeout,
                dump: self.dump(),
            }),
        }
    }

    /// Waits for the first event (in arrival order) that matches `pred`.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event, WaitError> {
        self.wait_for(what, timeout, |events| {
            events.iter().find(|e| pred(e)).cloned()
        })
        .await
    }

    /// Waits until exactly one live node reports primary and every other live, running node has
    /// reported a role; returns the primary's pid and term.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_single_primary(&self, timeout: Duration) -> Result<(u32, u64), WaitError> {
        self.wait_for("exactly one primary", timeout, |events| {
            single_primary(events, false)
        })
        .await
    }

    /// Like [`wait_single_primary`](Self::wait_single_primary), and every other live, running
    /// node reports secondary with the primary's term as its holder's, and the primary's
    /// singleton task has started its term: the cluster has settled, and a fault injected now
    /// hits a running task.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_settled(&self, timeout: Duration) -> Result<(u32, u64), WaitError> {
        self.wait_for(
            "exactly one primary, known to every secondary, its task started",
            timeout,
            |events| {
                single_primary(events, true).filter(|&(pid, term)| {
                    events.iter().any(|e| {
                        e.pid == pid
                            && matches!(e.kind, EventKind::TaskStart { term: t } if t == term)
                    })
                })
            },
        )
        .await
    }

    /// Waits for a `primary` event with a term above `term` from a node other than `except`.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_primary_after(
        &self,
        term: u64,
        except: u32,
        timeout: Duration,
    ) -> Result<Event, WaitError> {
        self.wait_event(
            &format!("a primary with a term above {term} other than pid {except}"),
            timeout,
            |e| e.pid != except && matches!(e.kind, EventKind::Primary { term: t } if t > term),
        )
        .await
    }

    /// Waits for a `task-start` event with a term above `term` from a node other than `except`:
    /// the first moment the successor's singleton work runs.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_task_start_after(
        &self,
        term: u64,
        except: u32,
        timeout: Duration,
    ) -> Result<Event, WaitError> {
        self.wait_event(
            &format!("a task start with a term above {term} other than pid {except}"),
            timeout,
            |e| e.pid != except && matches!(e.kind, EventKind::TaskStart { term: t } if t > term),
        )
        .await
    }

    /// Waits until node `pid` has been reaped; returns its exit code and the signal that ended
    /// it, if any.
    ///
    /// # Errors
    ///
    /// [`WaitError`] after `timeout`.
    pub async fn wait_exit(
        &self,
        pid: u32,
        timeout: Duration,
    ) -> Result<(Option<i32>, Option<i32>), WaitError> {
        self.wait_for(&format!("pid {pid} to exit"), timeout, |events| {
            events.iter().find_map(|e| match e.kind {
                EventKind::Exited { code, signal } if e.pid == pid => Some((code, signal)),
                _ => None,
            })
        })
        .await
    }

    /// Kills (`SIGKILL`) every node still alive and waits until they are reaped.
    ///
    /// # Errors
    ///
    /// [`WaitError`] when a node was not reaped within `timeout`.
    pub async fn kill_all(&self, timeout: Duration) -> Result<(), WaitError> {
        let alive: Vec<u32> = self
            .states()
            .values()
            .filter(|s| s.alive)
            .map(|s| s.pid)
            .collect();
        for pid in &alive {
            let _ = self.signal(*pid, NodeSignal::Kill).await;
        }
        for pid in alive {
            self.wait_exit(pid, timeout).await?;
        }
        Ok(())
    }

    /// The first event of node `pid` at or after `after` (`CLOCK_MONOTONIC` ns) whose kind
    /// matches `pred`.
    #[must_use]
    pub fn first_event(
        &self,
        pid: u32,
        after: u64,
        pred: impl Fn(&EventKind) -> bool,
    ) -> Option<Event> {
        self.log
            .snapshot()
            .into_iter()
            .find(|e| e.pid == pid && e.at >= after && pred(&e.kind))
    }

    /// A scenario every backend's process tests share: in a [settled](Self::wait_settled)
    /// cluster, `SIGKILL` the primary. Exactly one other node succeeds it with a higher term —
    /// the history holds the old period and the new one, without overlap — and the cluster
    /// settles on it.
    ///
    /// # Panics
    ///
    /// When a step does not happen within `timeout` or a check fails, with [`dump`](Self::dump).
    pub async fn kill_primary(&self, timeout: Duration) -> Succession {
        let s = self.succession(NodeSignal::Kill, timeout).await;
        let exit = self.wait_exit(s.old, timeout).await;
        self.ensure(matches!(exit, Ok((None, Some(9)))), || {
            format!("pid {} did not die of SIGKILL: {exit:?}", s.old)
        });
        let holders: Vec<(String, u64)> = self
            .history()
            .periods()
            .iter()
            .filter(|p| p.term >= s.term)
            .map(|p| (p.node.clone(), p.term))
            .collect();
        let successor = (s.next.pid.to_string(), s.next.term().unwrap_or_default());
        self.ensure(holders == [(s.old.to_string(), s.term), successor], || {
            format!("expected the killed primary's period, then one successor's: {holders:?}")
        });
        self.assert_history_ok();
        s
    }

    /// A scenario every backend's process tests share: in a [settled](Self::wait_settled)
    /// cluster, `SIGTERM` the primary. It winds its term down (its task sees the term end after
    /// the signal and before anyone else is primary), releases, and exits with 0; one other
    /// node succeeds it with a higher term, the cluster settles on it, and no periods overlap.
    ///
    /// # Panics
    ///
    /// When a step does not happen within `timeout` or a check fails, with [`dump`](Self::dump).
    pub async fn terminate_primary(&self, timeout: Duration) -> Handover {
        let succession = self.succession(NodeSignal::Term, timeout).await;
        let (old, term) = (succession.old, succession.term);
        let exit = self.wait_exit(old, timeout).await;
        self.ensure(matches!(exit, Ok((Some(0), None))), || {
            format!("pid {old} did not exit with 0 after SIGTERM: {exit:?}")
        });
        let at = |what: &str, pred: &dyn Fn(&EventKind) -> bool| match self.first_event(
            old,
            succession.signalled_at,
            pred,
        ) {
            Some(e) => e.at,
            None => panic!("pid {old} logged no {what} after SIGTERM\n{}", self.dump()),
        };
        let cancelled = at(
            "task-cancelled",
            &|k| matches!(k, EventKind::TaskCancelled { term: t } if *t == term),
        );
        let released = at("released", &|k| matches!(k, EventKind::Released));
        self.ensure(
            cancelled < succession.next.at && cancelled <= released,
            || {
                "the old primary's task did not end before its successor became primary and it \
             released"
                    .to_owned()
            },
        );
        self.assert_history_ok();
        Handover {
            succession,
            cancelled,
            released,
        }
    }

    /// Signals the primary of the settled cluster, waits for a successor with a higher term and
    /// for the cluster to settle on it.
    async fn succession(&self, signal: NodeSignal, timeout: Duration) -> Succession {
        let (old, term) = self
            .wait_settled(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let signalled_at = self
            .signal(old, signal)
            .await
            .unwrap_or_else(|e| panic!("cannot signal pid {old}: {e}\n{}", self.dump()));
        let next = self
            .wait_primary_after(term, old, timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (new, new_term) = self
            .wait_settled(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.ensure(
            (new, Some(new_term)) == (next.pid, next.term())
                && new_term > term
                && next.at > signalled_at,
            || format!("settled on pid {new} term {new_term}, after {next} replaced term {term}"),
        );
        Succession {
            old,
            term,
            signalled_at,
            next,
        }
    }

    fn ensure(&self, cond: bool, what: impl FnOnce() -> String) {
        assert!(cond, "{}\n{}", what(), self.dump());
    }

    /// Every event, with times in ms since the cluster was created, the node states, the primary
    /// periods and the last stderr lines of every node: for failure messages.
    #[must_use]
    pub fn dump(&self) -> String {
        use fmt::Write as _;
        let events = self.log.snapshot();
        let mut out = String::new();
        let ms = |at: u64| at.saturating_sub(self.origin) as f64 / 1e6;
        let _ = writeln!(out, "events (ms since the cluster was created):");
        for e in &events {
            let line = e.to_string();
            let rest = line.splitn(4, ' ').nth(3).unwrap_or_default();
            let _ = writeln!(out, "  {:>10.3} pid {:>7} {rest}", ms(e.at), e.pid);
        }
        let _ = writeln!(out, "states:");
        for s in node_states(&events).values() {
            let _ = writeln!(out, "  {s:?}");
        }
        let _ = writeln!(out, "primary periods (ms since the cluster was created):");
        for p in history(&events).periods() {
            let _ = writeln!(
                out,
                "  pid {} term {}: {:.3} .. {}",
                p.node,
                p.term,
                ms(p.start),
                p.end
                    .map_or_else(|| "open".to_owned(), |e| format!("{:.3}", ms(e)))
            );
        }
        for n in &self.nodes {
            let lines = lock(&n.stderr);
            if !lines.is_empty() {
                let _ = writeln!(out, "stderr of pid {} (last {} lines):", n.pid, lines.len());
                for l in lines.iter() {
                    let _ = writeln!(out, "  {l}");
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Dropping the supervisor drops the tokio Child, whose kill_on_drop sends SIGKILL; the
        // runtime reaps it in the background.
        for n in &self.nodes {
            n.supervisor.abort();
        }
    }
}

fn single_primary(events: &[Event], settled: bool) -> Option<(u32, u64)> {
    let states = node_states(events);
    let live: Vec<&NodeState> = states.values().filter(|s| s.alive).collect();
    let primaries: Vec<(u32, u64)> = live
        .iter()
        .filter_map(|s| match s.role {
            Some(ObservedRole::Primary { term }) => Some((s.pid, term)),
            _ => None,
        })
        .collect();
    let [(pid, term)] = primaries[..] else {
        return None;
    };
    let others_ok = live
        .iter()
        .filter(|s| s.pid != pid && !s.stopped)
        .all(|s| match s.role {
            Some(ObservedRole::Secondary { holder_term }) => !settled || holder_term == Some(term),
            None | Some(ObservedRole::Primary { .. }) => false,
        });
    others_ok.then_some((pid, term))
}

/// The node process that `nsenter` process `nsenter` started: waits up to 2 s for it to appear.
async fn hosted_node_pid(nsenter: u32) -> Option<u32> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(pid) = SimulatedHost::node_pid(nsenter) {
            return Some(pid);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn read_events(
    out: impl AsyncRead + Unpin,
    log: EventLog,
    other: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match Event::parse(&line) {
            Some(e) => log.push(e),
            None if line.trim().is_empty() => {}
            None => keep_line(&other, format!("(stdout) {line}")),
        }
    }
}

async fn read_stderr(err: impl AsyncRead + Unpin, lines_kept: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(err).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        keep_line(&lines_kept, line);
    }
}

fn keep_line(lines: &Mutex<VecDeque<String>>, line: String) {
    let mut lines = lock(lines);
    if lines.len() == STDERR_LINES {
        lines.pop_front();
    }
    lines.push_back(line);
}

async fn supervise(
    mut child: tokio::process::Child,
    pid: u32,
    hosted: bool,
    log: EventLog,
    mut signals: mpsc::UnboundedReceiver<SignalRequest>,
) {
    // Held open for the node's life: the node exits when it closes (the parent is gone).
    let _stdin = child.stdin.take();
    // A hosted node's own process, the child of `nsenter` (found at the first signal).
    let mut node_pid: Option<u32> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some((signal, reply)) = signals.recv() => {
                // `child.id()` is `None` once reaped, so a recycled pid is never signalled.
                let target = match child.id() {
                    Some(id) if hosted => match node_pid {
                        Some(n) => Some((n, Some(id))),
                        None => {
                            node_pid = hosted_node_pid(id).await;
                            node_pid.map(|n| (n, Some(id)))
                        }
                    },
                    Some(id) => Some((id, None)),
                    None => None,
                };
                let result = match target {
                    Some((id, nsenter)) => {
                        let at = monotonic_nanos();
                        let raw = |id: u32| nix::unistd::Pid::from_raw(i32::try_from(id).unwrap_or(i32::MAX));
                        match nix::sys::signal::kill(raw(id), signal.to_nix()) {
                            Ok(()) => {
                                if let (NodeSignal::Cont, Some(n)) = (signal, nsenter) {
                                    let _ = nix::sys::signal::kill(raw(n), signal.to_nix());
                                }
                                log.push(Event { at, pid, kind: EventKind::Signalled { signal } });
                                Ok(at)
                            }
                            Err(errno) => Err(std::io::Error::from(errno)),
                        }
                    }
                    None => Err(std::io::Error::other(format!("node {pid} has exited"))),
                };
                let _ = reply.send(result);
            }
        }
    };
    let at = monotonic_nanos();
    let (code, signal) = match &status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt as _;
            (s.code(), s.signal())
        }
        Err(_) => (None, None),
    };
    log.push(Event {
        at,
        pid,
        kind: EventKind::Exited { code, signal },
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: u64, pid: u32, kind: EventKind) -> Event {
        Event { at, pid, kind }
    }

    #[test]
    fn every_event_round_trips_through_its_line() {
        let kinds = [
            EventKind::Started,
            EventKind::Primary { term: 9 },
            EventKind::Secondary {
                holder_term: Some(9),
                holder_pid: Some(77),
            },
            EventKind::Secondary {
                holder_term: None,
                holder_pid: None,
            },
            EventKind::TaskStart { term: 9 },
            EventKind::Tick { term: 9, n: 3 },
            EventKind::TaskCancelled { term: 9 },
            EventKind::ChildSpawned { pid: 5 },
            EventKind::SigTerm,
            EventKind::Released,
            EventKind::Exit { code: 0 },
            EventKind::Error {
                message: "lock directory /x: is a symlink".to_owned(),
            },
            EventKind::Spawned,
            EventKind::Signalled {
                signal: NodeSignal::Stop,
            },
            EventKind::Exited {
                code: None,
                signal: Some(9),
            },
        ];
        for kind in kinds {
            let e = ev(12_345, 42, kind);
            assert_eq!(Event::parse(&e.to_string()).as_ref(), Some(&e), "{e}");
        }
        assert!(Event::parse("EVENT 1 2 primary").is_none());
        assert!(Event::parse("test node_entry ... ok").is_none());
    }

    #[test]
    fn periods_end_at_cancel_kill_or_exit_and_overlaps_are_found() {
        let events = [
            ev(1, 10, EventKind::Spawned),
            ev(2, 11, EventKind::Spawned),
            ev(5, 10, EventKind::TaskStart { term: 1 }),
            ev(6, 10, EventKind::Primary { term: 1 }),
            ev(
                8,
                10,
                EventKind::Signalled {
                    signal: NodeSignal::Stop,
                },
            ),
            ev(
                20,
                10,
                EventKind::Signalled {
                    signal: NodeSignal::Kill,
                },
            ),
            ev(21, 11, EventKind::Primary { term: 2 }),
            ev(30, 11, EventKind::TaskCancelled { term: 2 }),
            ev(
                31,
                11,
                EventKind::Secondary {
                    holder_term: None,
                    holder_pid: None,
                },
            ),
            ev(29, 12, EventKind::Primary { term: 3 }),
        ];
        let history = history(&events);
        let periods: Vec<_> = history
            .periods()
            .iter()
            .map(|p| (p.node.as_str(), p.term, p.start, p.end))
            .collect();
        assert_eq!(
            periods,
            [
                ("10", 1, 5, Some(20)),
                ("11", 2, 21, Some(30)),
                ("12", 3, 29, None),
            ]
        );
        let report = history.check();
        assert_eq!(report.overlaps.len(), 1);
        assert_eq!(report.overlaps[0].length, Duration::from_nanos(1));

        let states = node_states(&events);
        assert!(!states[&10].alive);
        assert_eq!(
            states[&11].role,
            Some(ObservedRole::Secondary { holder_term: None })
        );
        assert_eq!(single_primary(&events, false), Some((12, 3)));
    }

    #[test]
    fn a_late_primary_line_of_an_ended_term_starts_nothing() {
        let events = [
            ev(5, 10, EventKind::TaskStart { term: 1 }),
            ev(6, 10, EventKind::TaskCancelled { term: 1 }),
            ev(7, 10, EventKind::Primary { term: 1 }),
            ev(
                8,
                10,
                EventKind::Secondary {
                    holder_term: None,
                    holder_pid: None,
                },
            ),
            ev(9, 11, EventKind::Primary { term: 2 }),
        ];
        let history = history(&events);
        assert_eq!(history.periods().len(), 2);
        history.assert_ok();
    }

    #[test]
    fn config_survives_the_environment() {
        let config = NodeConfig::new("/tmp/x", "lock-a")
            .lease(Duration::from_millis(2500))
            .grace(Duration::from_secs(1))
            .tick(Duration::from_millis(50))
            .spawn_when_primary(["sleep", "30"]);
        let env: HashMap<_, _> = config.to_env().into_iter().collect();
        assert_eq!(env[LEASE_ENV], "2s 500ms");
        assert_eq!(
            humantime::parse_duration(&env[TICK_ENV]).unwrap(),
            Duration::from_millis(50)
        );
        assert_eq!(env[SPAWN_ENV], "sleep 30");
    }

    #[test]
    fn node_mode_carries_the_witness_in_its_environment() {
        use super::{NodeConfig, WITNESS_ENV, WITNESS_EVERY_ENV};
        use std::net::SocketAddr;
        use std::time::Duration;

        let addr: SocketAddr = "127.0.0.1:4567".parse().unwrap();
        let env = NodeConfig::new("/tmp/x", "l")
            .witness(addr, Duration::from_millis(3))
            .to_env();
        assert!(
            env.contains(&(WITNESS_ENV, "127.0.0.1:4567".to_owned())),
            "{env:?}"
        );
        assert!(
            env.contains(&(WITNESS_EVERY_ENV, "3ms".to_owned())),
            "{env:?}"
        );
        let env = NodeConfig::new("/tmp/x", "l").to_env();
        assert!(env.iter().all(|(k, _)| *k != WITNESS_ENV));
    }
}
