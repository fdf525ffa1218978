//! The cluster: node processes started, signalled and killed together.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::process::{NodeProcess, read_events, read_stderr, supervise};
use super::{
    Event, EventKind, EventLog, NODE_ENV, NodeCommand, NodeConfig, NodeSignal, NodeState, Order,
    PARENT_PIPE_ENV, history, node_states,
};
use crate::host::SimulatedHost;
use crate::sync::lock;
use tower_primary::clock::monotonic_nanos;
use tower_primary_testing::history::History;

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
    pub(super) log: EventLog,
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
        let (orders, orders_rx) = mpsc::unbounded_channel();
        let supervisor = tokio::spawn(supervise(
            child,
            pid,
            hosted,
            self.log.clone(),
            rx,
            orders_rx,
        ));
        self.nodes.push(NodeProcess {
            pid,
            signals: tx,
            orders,
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
        self.ask(pid, |node| &node.signals, signal).await
    }

    /// Gives node `pid` an [`Order`] through its stdin; returns the `CLOCK_MONOTONIC` ns taken
    /// just before the write. The node reports [`EventKind::Obeyed`] or [`EventKind::Refused`]
    /// (a drain: `Obeyed` when it begins, [`EventKind::Drained`] when it resolved). A node of
    /// the previous release ignores orders.
    ///
    /// # Errors
    ///
    /// An unknown pid, a node already reaped, or the write's error.
    pub async fn order(&self, pid: u32, order: Order) -> std::io::Result<u64> {
        self.ask(pid, |node| &node.orders, order).await
    }

    /// Sends `what` to node `pid` on the channel `to` picks, and waits for the node's answer (the
    /// `CLOCK_MONOTONIC` ns taken just before it acted).
    async fn ask<T>(
        &self,
        pid: u32,
        to: impl FnOnce(
            &NodeProcess,
        ) -> &mpsc::UnboundedSender<(T, oneshot::Sender<std::io::Result<u64>>)>,
        what: T,
    ) -> std::io::Result<u64> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.pid == pid)
            .ok_or_else(|| std::io::Error::other(format!("no node with pid {pid}")))?;
        let (tx, rx) = oneshot::channel();
        let gone = || std::io::Error::other(format!("node {pid} has exited"));
        to(node).send((what, tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// The node id of node `pid` in the lock's registry (its [`EventKind::Node`] line), once
    /// it has reported it.
    #[must_use]
    pub fn node_id(&self, pid: u32) -> Option<String> {
        self.log.snapshot().into_iter().find_map(|e| match e.kind {
            EventKind::Node { id } if e.pid == pid => Some(id),
            _ => None,
        })
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
