//! The nemesis: one fault at a time, chosen by the seed, aimed mostly at the current primary.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;
use tower_primary::clock::monotonic_nanos;
use tower_primary_lab::host::SimulatedHost;
use tower_primary_lab::node::{Cluster, EventKind, NodeConfig, NodeSignal, ObservedRole, Order};

use crate::setup::Setup;

/// The kinds of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum FaultKind {
    /// `SIGKILL` a node, start a replacement.
    Kill,
    /// `SIGSTOP` a node for a while (sometimes beyond the lease), then `SIGCONT`.
    Stop,
    /// `SIGTERM` a node (graceful handover), start a replacement.
    Term,
    /// Cut, stall or partition a node's connection to the server through its proxy.
    Cut,
    /// Kill the server and start it again.
    Restart,
    /// The server ends the node's sessions at once while the node hears nothing (an asymmetric
    /// partition).
    Drop,
    /// PostgreSQL: `pg_terminate_backend` on every session of the node (its lock session and its
    /// second connection), as an administrator would.
    KillConns,
    /// Redis: `FLUSHALL` on the tool's own server.
    Flush,
    /// Redis: with every second node on another lease (a rolling lease change), restart the
    /// server without data while the primary cannot reach it.
    LeaseChange,
    /// `SIGSTOP` the secondary next in line, `SIGKILL` the primary, `SIGCONT` the secondary later.
    StopWaiter,
    /// Host groups: `SIGKILL` a host candidate (the one node of its host that talks to the
    /// server) while its host lives, start a replacement on that host.
    WorkerKill,
    /// Host groups: `SIGKILL` every process of a host; the host comes back (a fresh PID
    /// namespace, the same host directory) with its nodes.
    HostKill,
    /// Host groups: `SIGSTOP` a host candidate for a while (sometimes past the lease, when its
    /// followers replace it), then `SIGCONT`.
    StopCandidate,
    /// A deploy: drain a node (a primary hands over to the best eligible candidate, with a
    /// reservation), `SIGTERM` it, start its replacement at a priority above every node's, which
    /// then pulls the lock once it has settled.
    Deploy,
    /// Drain a node (a primary hands over), then `SIGKILL` it after a while and start a
    /// replacement at the same priority.
    Drain,
}

impl FaultKind {
    pub(crate) const ALL: [FaultKind; 15] = [
        FaultKind::Kill,
        FaultKind::Stop,
        FaultKind::Term,
        FaultKind::Cut,
        FaultKind::Restart,
        FaultKind::Drop,
        FaultKind::KillConns,
        FaultKind::Flush,
        FaultKind::LeaseChange,
        FaultKind::StopWaiter,
        FaultKind::WorkerKill,
        FaultKind::HostKill,
        FaultKind::StopCandidate,
        FaultKind::Deploy,
        FaultKind::Drain,
    ];

    /// The mix when `--faults` is not given: every kind (those that do not apply to the backend
    /// are skipped).
    pub(crate) const DEFAULT: [FaultKind; 15] = FaultKind::ALL;

    /// Whether the fault acts on the server as a whole (every node's state there).
    pub(crate) fn hits_server(self) -> bool {
        matches!(
            self,
            FaultKind::Restart | FaultKind::Flush | FaultKind::LeaseChange
        )
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Stop => "stop",
            FaultKind::Term => "term",
            FaultKind::Cut => "cut",
            FaultKind::Restart => "restart",
            FaultKind::Drop => "drop",
            FaultKind::KillConns => "kill-conns",
            FaultKind::Flush => "flush",
            FaultKind::LeaseChange => "lease-change",
            FaultKind::StopWaiter => "stop-waiter",
            FaultKind::WorkerKill => "worker-kill",
            FaultKind::HostKill => "host-kill",
            FaultKind::StopCandidate => "stop-candidate",
            FaultKind::Deploy => "deploy",
            FaultKind::Drain => "drain",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One fault that was injected.
#[derive(Clone, Debug)]
pub(crate) struct Fault {
    pub(crate) kind: FaultKind,
    /// What exactly, e.g. `SIGSTOP for 2.41 s` or `stall 1.20 s`.
    pub(crate) detail: String,
    /// The node slot hit (`None` for a server restart).
    pub(crate) slot: Option<usize>,
    /// The process hit.
    pub(crate) pid: Option<u32>,
    /// A second process hit (`stop-waiter`: the stopped secondary).
    pub(crate) also: Option<u32>,
    /// When it began (`CLOCK_MONOTONIC` ns; for signals, just before `kill(2)`).
    pub(crate) at: u64,
    /// When it was over: the node resumed or replaced, the connection passing, the server up.
    pub(crate) until: u64,
    /// The primary's term when the fault hit the primary (for a restart: the primary's term at
    /// the time, if there was one); `None` when it hit a secondary.
    pub(crate) primary_term: Option<u64>,
}

/// How the nemesis behaves.
#[derive(Clone, Debug)]
pub(crate) struct NemesisConfig {
    /// The fault kinds to choose from (those that apply to the backend).
    pub(crate) kinds: Vec<FaultKind>,
    /// The pause between two faults, drawn uniformly from this range.
    pub(crate) pace: (Duration, Duration),
    /// The length that pauses and stalls are measured against, half of them longer: the lease,
    /// or the time the server takes to notice a dead peer (PostgreSQL); a partition longer than
    /// it ends the node's sessions on the server side at that point.
    pub(crate) lease_ref: Duration,
    /// How long a SIGTERM'd node may take to hand over and exit before it is killed.
    pub(crate) exit_timeout: Duration,
    /// How often a fault is aimed at the current primary (when there is one).
    pub(crate) aim: f64,
}

/// The fault injector, owning the node slots.
#[derive(Debug)]
pub(crate) struct Nemesis {
    pub(crate) cluster: Cluster,
    pub(crate) configs: Vec<NodeConfig>,
    /// The simulated hosts (none: every node in this process's own PID namespace); slot `s`
    /// lives on host `s % hosts.len()`, its replacements too.
    pub(crate) hosts: Vec<SimulatedHost>,
    /// The current pid of every slot.
    pub(crate) slots: Vec<u32>,
    /// Every pid that ran, and its slot.
    pub(crate) pid_slot: HashMap<u32, usize>,
    pub(crate) rng: fastrand::Rng,
    pub(crate) config: NemesisConfig,
    /// The faults injected, in order.
    pub(crate) log: Vec<Fault>,
    /// Nodes that exited without a fault, and how.
    pub(crate) unexpected_exits: Vec<String>,
    /// The highest priority given so far: a deploy's replacement gets the next one.
    pub(crate) deploys: u64,
}

type BoxError = Box<dyn std::error::Error>;

impl Nemesis {
    pub(crate) fn new(
        cluster: Cluster,
        configs: Vec<NodeConfig>,
        hosts: Vec<SimulatedHost>,
        seed: u64,
        config: NemesisConfig,
    ) -> Self {
        let configs_max_priority = configs.iter().filter_map(|c| c.priority).max().unwrap_or(0);
        Nemesis {
            cluster,
            configs,
            hosts,
            slots: Vec::new(),
            pid_slot: HashMap::new(),
            rng: fastrand::Rng::with_seed(seed),
            config,
            log: Vec::new(),
            unexpected_exits: Vec::new(),
            deploys: configs_max_priority,
        }
    }

    /// Starts one node per slot.
    pub(crate) fn spawn_all(&mut self) -> Result<(), BoxError> {
        for slot in 0..self.configs.len() {
            let pid = self.spawn(slot)?;
            self.slots.push(pid);
            self.pid_slot.insert(pid, slot);
        }
        Ok(())
    }

    /// Starts slot `slot`'s node, on its simulated host if there are some.
    fn spawn(&mut self, slot: usize) -> std::io::Result<u32> {
        let config = &self.configs[slot];
        if self.hosts.is_empty() {
            self.cluster.spawn_node_with(config)
        } else {
            let host = &self.hosts[slot % self.hosts.len()];
            self.cluster.spawn_node_on(host, config)
        }
    }

    pub(crate) fn respawn(&mut self, slot: usize) -> Result<(), BoxError> {
        let pid = self.spawn(slot)?;
        self.slots[slot] = pid;
        self.pid_slot.insert(pid, slot);
        Ok(())
    }

    /// The live, running secondary most likely next in line: the one started first (the
    /// longest waiter).
    fn next_in_line(&self, primary: u32) -> Option<(usize, u32)> {
        let states = self.cluster.states();
        let events = self.cluster.events();
        let started = |pid: u32| {
            events
                .iter()
                .find(|e| e.pid == pid && e.kind == EventKind::Spawned)
                .map_or(u64::MAX, |e| e.at)
        };
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, pid)| **pid != primary)
            .filter(|(_, pid)| {
                states.get(pid).is_some_and(|s| {
                    s.alive && !s.stopped && matches!(s.role, Some(ObservedRole::Secondary { .. }))
                })
            })
            .min_by_key(|(_, pid)| started(**pid))
            .map(|(slot, pid)| (slot, *pid))
    }

    /// Injects faults until `end`, one at a time, a paced pause before each.
    pub(crate) async fn run(&mut self, setup: &mut Setup, end: Instant) -> Result<(), BoxError> {
        if self.config.kinds.is_empty() {
            tokio::time::sleep_until(end).await;
            return Ok(());
        }
        loop {
            let (lo, hi) = self.config.pace;
            let pause = lo + (hi.saturating_sub(lo)).mul_f64(self.rng.f64());
            if Instant::now() + pause >= end {
                tokio::time::sleep_until(end).await;
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            self.replace_dead()?;
            let kind = self.config.kinds[self.rng.usize(..self.config.kinds.len())];
            if let Some(fault) = self.inject(kind, setup).await? {
                self.log.push(fault);
            }
        }
    }

    /// Replaces nodes that exited on their own (recorded); fails on a node that could not start.
    pub(crate) fn replace_dead(&mut self) -> Result<(), BoxError> {
        let states = self.cluster.states();
        for slot in 0..self.slots.len() {
            let pid = self.slots[slot];
            if states.get(&pid).is_some_and(|s| s.alive) {
                continue;
            }
            let events = self.cluster.events();
            let last = events.iter().rev().find(|e| e.pid == pid);
            let exit = last.map(ToString::to_string).unwrap_or_default();
            let config_error = events.iter().any(|e| {
                e.pid == pid
                    && matches!(
                        e.kind,
                        EventKind::Exit { code: 2 } | EventKind::Exited { code: Some(2), .. }
                    )
            });
            if config_error {
                return Err(format!(
                    "node {pid} could not start (exit code 2):\n{}",
                    self.cluster.dump()
                )
                .into());
            }
            self.unexpected_exits
                .push(format!("slot {} pid {pid}: {exit}", slot + 1));
            self.respawn(slot)?;
        }
        Ok(())
    }

    /// The current primary: slot, pid, term.
    pub(crate) fn primary(&self) -> Option<(usize, u32, u64)> {
        let states = self.cluster.states();
        self.slots.iter().enumerate().find_map(|(slot, pid)| {
            let s = states.get(pid)?;
            match s.role {
                Some(ObservedRole::Primary { term }) if s.alive && !s.stopped => {
                    Some((slot, *pid, term))
                }
                _ => None,
            }
        })
    }

    /// A target node: the primary most of the time, else any slot.
    fn target(&mut self) -> (usize, u32, Option<u64>) {
        let primary = self.primary();
        if let Some((slot, pid, term)) = primary
            && self.rng.f64() < self.config.aim
        {
            return (slot, pid, Some(term));
        }
        let slot = self.rng.usize(..self.slots.len());
        let pid = self.slots[slot];
        let term = primary.and_then(|(_, p, t)| (p == pid).then_some(t));
        (slot, pid, term)
    }

    /// A pause or stall length: half of them short (5–50 % of the lease), half long (1–2.5
    /// leases).
    pub(crate) fn hold(&mut self) -> Duration {
        let l = self.config.lease_ref;
        if self.rng.bool() {
            l.mul_f64(0.05 + 0.45 * self.rng.f64())
        } else {
            l.mul_f64(1.0 + 1.5 * self.rng.f64())
        }
    }

    pub(crate) async fn inject(
        &mut self,
        kind: FaultKind,
        setup: &mut Setup,
    ) -> Result<Option<Fault>, BoxError> {
        let mut fault = Fault {
            kind,
            detail: String::new(),
            slot: None,
            pid: None,
            also: None,
            at: 0,
            until: 0,
            primary_term: None,
        };
        match kind {
            FaultKind::Kill | FaultKind::Term => {
                let (slot, pid, term) = self.target();
                let signal = if kind == FaultKind::Kill {
                    NodeSignal::Kill
                } else {
                    NodeSignal::Term
                };
                let Ok(at) = self.cluster.signal(pid, signal).await else {
                    return Ok(None); // it died on its own; replace_dead will see it
                };
                let timeout = if kind == FaultKind::Kill {
                    Duration::from_secs(10)
                } else {
                    self.config.exit_timeout
                };
                let mut detail = signal.as_str().to_owned();
                if self.cluster.wait_exit(pid, timeout).await.is_err() {
                    detail.push_str(&format!(", no exit within {timeout:?}: SIGKILL"));
                    let _ = self.cluster.signal(pid, NodeSignal::Kill).await;
                    self.cluster.wait_exit(pid, Duration::from_secs(10)).await?;
                }
                let wait = Duration::from_millis(self.rng.u64(0..=500));
                tokio::time::sleep(wait).await;
                self.respawn(slot)?;
                fault.detail = format!("{detail}, replaced after {} ms", wait.as_millis());
                (fault.slot, fault.pid, fault.at, fault.primary_term) =
                    (Some(slot), Some(pid), at, term);
            }
            FaultKind::Stop => {
                let (slot, pid, term) = self.target();
                let hold = self.hold();
                let Ok(at) = self.cluster.signal(pid, NodeSignal::Stop).await else {
                    return Ok(None);
                };
                tokio::time::sleep(hold).await;
                let _ = self.cluster.signal(pid, NodeSignal::Cont).await;
                fault.detail = format!("SIGSTOP for {}", secs(hold));
                (fault.slot, fault.pid, fault.at, fault.primary_term) =
                    (Some(slot), Some(pid), at, term);
            }
            FaultKind::Cut | FaultKind::Drop => {
                let (slot, pid, term) = self.target();
                let variant = if kind == FaultKind::Drop {
                    3
                } else {
                    self.rng.u8(0..3)
                };
                let hold = if variant == 0 {
                    Duration::ZERO
                } else {
                    self.hold()
                };
                let detect = self.config.lease_ref;
                let Some(proxy) = setup.proxy_of(slot) else {
                    return Ok(None);
                };
                let at = monotonic_nanos();
                match variant {
                    0 => {
                        proxy.cut();
                        fault.detail = "cut (both sides closed)".to_owned();
                    }
                    1 => {
                        proxy.stall();
                        tokio::time::sleep(hold).await;
                        proxy.resume();
                        fault.detail = format!("stall for {}", secs(hold));
                    }
                    2 => {
                        // A partition: nothing passes; a server that notices the dead peer
                        // (after `detect`) ends the sessions; healing finds them closed, and new
                        // connections pass.
                        proxy.stall();
                        if hold > detect {
                            tokio::time::sleep(detect).await;
                            proxy.cut_upstream();
                            tokio::time::sleep(hold - detect).await;
                            proxy.cut();
                            proxy.resume();
                            fault.detail = format!(
                                "partition for {}, the server ending the sessions after {}",
                                secs(hold),
                                secs(detect)
                            );
                        } else {
                            tokio::time::sleep(hold).await;
                            proxy.cut();
                            proxy.resume();
                            fault.detail = format!("partition for {}", secs(hold));
                        }
                    }
                    _ => {
                        proxy.cut_upstream();
                        tokio::time::sleep(hold).await;
                        proxy.cut();
                        fault.detail = format!(
                            "server side closed at once, node hearing nothing for {}",
                            secs(hold)
                        );
                    }
                }
                (fault.slot, fault.pid, fault.at, fault.primary_term) =
                    (Some(slot), Some(pid), at, term);
            }
            FaultKind::KillConns => {
                let (slot, pid, term) = self.target();
                let at = monotonic_nanos();
                fault.detail = match setup.terminate_sessions(slot).await {
                    Ok(n) => format!("pg_terminate_backend on {n} sessions of the node"),
                    Err(e) => format!("failed: {e}"),
                };
                (fault.slot, fault.pid, fault.at, fault.primary_term) =
                    (Some(slot), Some(pid), at, term);
            }
            FaultKind::Flush => {
                let Some(server) = setup.server.as_ref() else {
                    return Ok(None);
                };
                fault.primary_term = self.primary().map(|(_, _, t)| t);
                fault.at = monotonic_nanos();
                fault.detail = match server.flush().await {
                    Ok(()) => "FLUSHALL".to_owned(),
                    Err(e) => format!("failed: {e}"),
                };
            }
            FaultKind::LeaseChange => {
                let start = Instant::now();
                fault.at = monotonic_nanos();
                // The hazard needs a primary on the longer lease and waiters on the shorter one.
                // If the primary runs the shorter lease, pause the other nodes on it and hand
                // over (SIGTERM), so that a node on the longer lease takes over, as the last
                // node on the old lease does in a rolling change back to a shorter lease.
                let longest = setup.max_lease();
                let mut handover = String::new();
                if let Some((slot, pid, term)) = self.primary()
                    && setup.node_leases.get(slot).copied().flatten() != longest
                {
                    let states = self.cluster.states();
                    let paused: Vec<u32> = (0..self.slots.len())
                        .filter(|s| *s != slot)
                        .filter(|s| setup.node_leases.get(*s).copied().flatten() != longest)
                        .map(|s| self.slots[s])
                        .filter(|p| states.get(p).is_some_and(|st| st.alive && !st.stopped))
                        .collect();
                    for p in &paused {
                        let _ = self.cluster.signal(*p, NodeSignal::Stop).await;
                    }
                    if self.cluster.signal(pid, NodeSignal::Term).await.is_ok() {
                        if self
                            .cluster
                            .wait_exit(pid, self.config.exit_timeout)
                            .await
                            .is_err()
                        {
                            let _ = self.cluster.signal(pid, NodeSignal::Kill).await;
                            self.cluster.wait_exit(pid, Duration::from_secs(10)).await?;
                        }
                        let wait =
                            3 * longest.unwrap_or(self.config.lease_ref) + Duration::from_secs(6);
                        let took_over = self.cluster.wait_primary_after(term, pid, wait).await;
                        self.respawn(slot)?;
                        handover = format!(
                            "{} paused, the primary on the shorter lease handed over{}; ",
                            paused.len(),
                            if took_over.is_ok() {
                                ""
                            } else {
                                " (no one took over)"
                            }
                        );
                    }
                    for p in &paused {
                        let _ = self.cluster.signal(*p, NodeSignal::Cont).await;
                    }
                }
                let Some((slot, pid, term)) = self.primary() else {
                    return Ok(None);
                };
                let lease = setup.node_leases.get(slot).copied().flatten();
                let (Some(server), Some(proxy), Some(lease)) = (
                    setup.server.as_mut(),
                    setup.proxies.get(slot % setup.proxies.len().max(1)),
                    lease,
                ) else {
                    return Ok(None);
                };
                // The primary cannot reach the server from now until its own lease has passed:
                // it learns of the lost key no sooner than its deadline.
                let partitioned = Instant::now();
                proxy.stall();
                server.kill();
                let down = Duration::from_millis(self.rng.u64(0..=1000));
                tokio::time::sleep(down).await;
                let restarted = server.restart().await;
                tokio::time::sleep_until(partitioned + lease).await;
                proxy.cut();
                proxy.resume();
                restarted?;
                fault.detail = format!(
                    "{handover}server restarted without data after {} ms (at {} into the fault), \
                     the primary (lease {}) partitioned for its lease",
                    down.as_millis(),
                    secs(partitioned - start),
                    humantime::format_duration(lease)
                );
                (fault.slot, fault.pid, fault.primary_term) = (Some(slot), Some(pid), Some(term));
            }
            FaultKind::StopWaiter => {
                let Some((slot, pid, term)) = self.primary() else {
                    return Ok(None);
                };
                let Some((wslot, waiter)) = self.next_in_line(pid) else {
                    return Ok(None);
                };
                let hold = self.hold();
                let Ok(stopped_at) = self.cluster.signal(waiter, NodeSignal::Stop).await else {
                    return Ok(None);
                };
                let Ok(at) = self.cluster.signal(pid, NodeSignal::Kill).await else {
                    let _ = self.cluster.signal(waiter, NodeSignal::Cont).await;
                    return Ok(None);
                };
                self.cluster.wait_exit(pid, Duration::from_secs(10)).await?;
                let wait = Duration::from_millis(self.rng.u64(0..=500));
                tokio::time::sleep(wait).await;
                self.respawn(slot)?;
                let resume = Duration::from_nanos(stopped_at) + hold;
                let now = Duration::from_nanos(monotonic_nanos());
                tokio::time::sleep(resume.saturating_sub(now)).await;
                let _ = self.cluster.signal(waiter, NodeSignal::Cont).await;
                fault.detail = format!(
                    "SIGSTOP node {} (next in line) for {}, SIGKILL the primary, replaced after {} ms",
                    wslot + 1,
                    secs(hold),
                    wait.as_millis()
                );
                (
                    fault.slot,
                    fault.pid,
                    fault.also,
                    fault.at,
                    fault.primary_term,
                ) = (Some(slot), Some(pid), Some(waiter), at, Some(term));
            }
            FaultKind::Deploy | FaultKind::Drain => {
                let (slot, pid, term) = self.target();
                let Ok(at) = self.cluster.order(pid, Order::Drain).await else {
                    return Ok(None);
                };
                // A primary hands over once an eligible successor exists; bounded here.
                let bound = self.config.lease_ref * 2 + Duration::from_secs(2);
                let drained = self
                    .cluster
                    .wait_event("the drain", bound, |e| {
                        e.pid == pid && e.at >= at && matches!(e.kind, EventKind::Drained)
                    })
                    .await
                    .map(|e| e.at);
                let mut detail = match drained {
                    Ok(done) => format!(
                        "drain done in {:.1} ms",
                        done.saturating_sub(at) as f64 / 1e6
                    ),
                    Err(_) => format!("drain not done within {}", secs(bound)),
                };
                let signal = if kind == FaultKind::Deploy {
                    NodeSignal::Term
                } else {
                    tokio::time::sleep(self.hold()).await;
                    NodeSignal::Kill
                };
                if self.cluster.signal(pid, signal).await.is_ok()
                    && self
                        .cluster
                        .wait_exit(pid, self.config.exit_timeout)
                        .await
                        .is_err()
                {
                    detail.push_str(", no exit: SIGKILL");
                    let _ = self.cluster.signal(pid, NodeSignal::Kill).await;
                    self.cluster.wait_exit(pid, Duration::from_secs(10)).await?;
                }
                if kind == FaultKind::Deploy {
                    self.deploys += 1;
                    let priority = self.deploys;
                    let config = self.configs[slot].clone().priority(priority);
                    self.configs[slot] = config;
                    detail.push_str(&format!(", {signal}, replaced at priority {priority}"));
                } else {
                    detail.push_str(&format!(", {signal}, replaced"));
                }
                self.respawn(slot)?;
                fault.detail = detail;
                (fault.slot, fault.pid, fault.at, fault.primary_term) =
                    (Some(slot), Some(pid), at, term);
            }
            FaultKind::WorkerKill | FaultKind::HostKill | FaultKind::StopCandidate => {
                if !self.inject_host_fault(kind, setup, &mut fault).await? {
                    return Ok(None);
                }
            }
            FaultKind::Restart => {
                let Some(server) = setup.server.as_mut() else {
                    return Ok(None);
                };
                fault.primary_term = self.primary().map(|(_, _, t)| t);
                fault.at = monotonic_nanos();
                server.kill();
                let down = Duration::from_millis(self.rng.u64(0..=1000));
                tokio::time::sleep(down).await;
                server.restart().await?;
                fault.detail = format!("server down for {} ms", down.as_millis());
            }
        }
        fault.until = monotonic_nanos();
        Ok(Some(fault))
    }
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
