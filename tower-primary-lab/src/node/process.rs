//! One node process: how it is started, and the tasks that read its output and deliver signals.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Event, EventKind, EventLog, NodeSignal, Order};
use crate::host::SimulatedHost;
use crate::sync::lock;
use tower_primary::clock::monotonic_nanos;

/// How to start a node process: a program, its arguments and extra environment. The node's
/// [`NodeConfig`](super::NodeConfig) and [`NODE_ENV`](super::NODE_ENV) are added by [`Cluster`](super::Cluster).
#[derive(Clone, Debug)]
pub struct NodeCommand {
    pub(super) program: PathBuf,
    pub(super) args: Vec<OsString>,
    pub(super) envs: Vec<(OsString, OsString)>,
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
    /// [`run_node_from_env`](super::run_node_from_env) when [`is_node_process`](super::is_node_process). `--nocapture` matters: the harness would
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

type SignalRequest = (NodeSignal, oneshot::Sender<std::io::Result<u64>>);
pub(super) type OrderRequest = (Order, oneshot::Sender<std::io::Result<u64>>);

#[derive(Debug)]
pub(super) struct NodeProcess {
    pub(super) pid: u32,
    pub(super) signals: mpsc::UnboundedSender<SignalRequest>,
    pub(super) orders: mpsc::UnboundedSender<OrderRequest>,
    pub(super) supervisor: JoinHandle<()>,
    pub(super) stderr: Arc<Mutex<VecDeque<String>>>,
}

const STDERR_LINES: usize = 200;

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

pub(super) async fn read_events(
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

pub(super) async fn read_stderr(
    err: impl AsyncRead + Unpin,
    lines_kept: Arc<Mutex<VecDeque<String>>>,
) {
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

pub(super) async fn supervise(
    mut child: tokio::process::Child,
    pid: u32,
    hosted: bool,
    log: EventLog,
    mut signals: mpsc::UnboundedReceiver<SignalRequest>,
    mut orders: mpsc::UnboundedReceiver<OrderRequest>,
) {
    use tokio::io::AsyncWriteExt as _;
    // Held open for the node's life: the node exits when it closes (the parent is gone). Orders
    // travel on it, one a line.
    let mut stdin = child.stdin.take();
    // A hosted node's own process, the child of `nsenter` (found at the first signal).
    let mut node_pid: Option<u32> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some((order, reply)) = orders.recv() => {
                let at = monotonic_nanos();
                let result = match stdin.as_mut() {
                    Some(pipe) => pipe.write_all(format!("{order}\n").as_bytes()).await.map(|()| at),
                    None => Err(std::io::Error::other("the node's stdin is closed")),
                };
                let _ = reply.send(result);
            }
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
