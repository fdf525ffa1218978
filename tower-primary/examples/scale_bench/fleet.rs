//! The fleet: H simulated hosts (a PID namespace each) with W node processes each, every process
//! of a host — replacements included — in that host's namespace, each host with a host directory
//! of its own; and the two failovers the bench measures.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tower_primary::clock::monotonic_nanos;
use tower_primary_lab::host::SimulatedHost;
use tower_primary_lab::node::{Cluster, EventKind, NodeConfig, NodeSignal, ObservedRole};

type BoxError = Box<dyn std::error::Error>;

/// One simulated host and its nodes.
pub(crate) struct Host {
    pub(crate) sim: SimulatedHost,
    /// The nodes of this host as the cluster knows them (the pids of their `nsenter`).
    pub(crate) nodes: Vec<u32>,
    /// The configuration of its nodes (its backend string, its host directory).
    config: NodeConfig,
}

/// What one failover round measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Failover {
    /// From the `SIGKILL` to the successor's `primary` event with a higher term.
    pub(crate) took: Duration,
    /// Whether the successor runs on the host of the killed primary.
    pub(crate) same_host: bool,
}

pub(crate) struct Fleet {
    pub(crate) cluster: Cluster,
    pub(crate) hosts: Vec<Host>,
    /// How long to wait for a primary before giving up.
    pub(crate) patience: Duration,
}

impl Fleet {
    /// Starts `configs.len()` hosts with `workers` nodes each.
    pub(crate) async fn start(
        cluster: Cluster,
        configs: Vec<NodeConfig>,
        workers: usize,
        patience: Duration,
    ) -> Result<Fleet, BoxError> {
        let mut fleet = Fleet {
            cluster,
            hosts: Vec::new(),
            patience,
        };
        for (i, config) in configs.into_iter().enumerate() {
            let sim = SimulatedHost::start(format!("host-{}", i + 1))
                .await
                .map_err(|e| format!("cannot start simulated host {}: {e}", i + 1))?;
            fleet.hosts.push(Host {
                sim,
                nodes: Vec::new(),
                config,
            });
            for _ in 0..workers {
                fleet.spawn(i)?;
            }
        }
        Ok(fleet)
    }

    /// Starts one more node on host `host`.
    fn spawn(&mut self, host: usize) -> std::io::Result<u32> {
        let h = &mut self.hosts[host];
        let pid = self.cluster.spawn_node_on(&h.sim, &h.config)?;
        h.nodes.push(pid);
        Ok(pid)
    }

    /// The host a node (by its cluster pid) runs on.
    pub(crate) fn host_of(&self, pid: u32) -> Option<usize> {
        self.hosts.iter().position(|h| h.nodes.contains(&pid))
    }

    /// This machine's pid of every node process, and its host.
    pub(crate) fn machine_pids(&self) -> HashMap<u32, (usize, u32)> {
        let mut map = HashMap::new();
        for (i, h) in self.hosts.iter().enumerate() {
            for &pid in &h.nodes {
                if let Some(own) = SimulatedHost::node_pid(pid) {
                    map.insert(own, (i, pid));
                }
            }
        }
        map
    }

    /// Waits until one node is primary and every other one has reported a role; returns its
    /// pid and term.
    pub(crate) async fn settled(&self) -> Result<(u32, u64), BoxError> {
        Ok(self.cluster.wait_single_primary(self.patience).await?)
    }

    /// Waits until the primary's task runs and every other node names it as the holder: a
    /// round starts on a quiet host, not while the previous round's replacement is starting up
    /// (a process starting on two cores would time its own start, not the failover).
    async fn quiet(&self) -> Result<(u32, u64), BoxError> {
        Ok(self.cluster.wait_settled(self.patience).await?)
    }

    /// The one live primary, if exactly one node says it is.
    pub(crate) fn primary(&self) -> Option<(u32, u64)> {
        let primaries: Vec<(u32, u64)> = self
            .cluster
            .states()
            .values()
            .filter(|s| s.alive)
            .filter_map(|s| match s.role {
                Some(ObservedRole::Primary { term }) => Some((s.pid, term)),
                _ => None,
            })
            .collect();
        match primaries[..] {
            [one] => Some(one),
            _ => None,
        }
    }

    /// How many live nodes have not reported a role yet.
    pub(crate) fn without_role(&self) -> usize {
        self.cluster
            .states()
            .values()
            .filter(|s| s.alive && s.role.is_none())
            .count()
    }

    /// `SIGKILL` the primary worker while its host lives; a replacement starts on the same host
    /// once the successor is primary.
    pub(crate) async fn kill_worker(&mut self) -> Result<Failover, BoxError> {
        let (pid, term) = self.quiet().await?;
        let host = self.host_of(pid).ok_or("the primary is on no host")?;
        let at = self.cluster.signal(pid, NodeSignal::Kill).await?;
        let next = self
            .cluster
            .wait_primary_after(term, pid, self.patience)
            .await?;
        self.cluster.wait_exit(pid, self.patience).await?;
        self.hosts[host].nodes.retain(|p| *p != pid);
        self.spawn(host)?;
        Ok(Failover {
            took: Duration::from_nanos(next.at.saturating_sub(at)),
            same_host: self.host_of(next.pid) == Some(host),
        })
    }

    /// `SIGKILL` every process of the primary's host (its nodes, then its PID namespace's
    /// init); the host comes back as a fresh namespace with as many nodes, on the same host
    /// directory, once the successor is primary.
    pub(crate) async fn kill_host(&mut self) -> Result<Failover, BoxError> {
        let (pid, term) = self.quiet().await?;
        let host = self.host_of(pid).ok_or("the primary is on no host")?;
        let mut nodes = self.hosts[host].nodes.clone();
        nodes.sort_by_key(|p| *p != pid); // the primary first: the clock starts there
        let mut at = None;
        for p in &nodes {
            if let Ok(t) = self.cluster.signal(*p, NodeSignal::Kill).await {
                at.get_or_insert(t);
            }
        }
        let at = at.unwrap_or_else(monotonic_nanos);
        let name = self.hosts[host].sim.name().to_owned();
        let sim = SimulatedHost::start(name).await?;
        // Dropping the old one kills its init, and with it whatever was left in the namespace.
        drop(std::mem::replace(&mut self.hosts[host].sim, sim));
        let next = self
            .cluster
            .wait_primary_after(term, pid, self.patience)
            .await?;
        for p in &nodes {
            self.cluster.wait_exit(*p, self.patience).await?;
        }
        let workers = nodes.len();
        self.hosts[host].nodes.clear();
        for _ in 0..workers {
            self.spawn(host)?;
        }
        Ok(Failover {
            took: Duration::from_nanos(next.at.saturating_sub(at)),
            same_host: self.host_of(next.pid) == Some(host),
        })
    }

    /// Lines of the nodes' logs (their stderr, the last lines of each) where the server refused
    /// a connection: PostgreSQL's "too many clients", Redis's "max number of clients".
    pub(crate) fn refusals_in_logs(&self) -> usize {
        let dump = self.cluster.dump();
        dump.lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("too many clients")
                    || l.contains("remaining connection slots")
                    || l.contains("max number of clients")
            })
            .count()
    }

    /// Nodes that could not start (an `error` event), with the first message.
    pub(crate) fn start_errors(&self) -> Option<String> {
        let events = self.cluster.events();
        let errors: Vec<&str> = events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Error { message } => Some(message.as_str()),
                _ => None,
            })
            .collect();
        errors
            .first()
            .map(|m| format!("{} nodes reported an error, e.g. {m}", errors.len()))
    }
}

/// CPU time (user + system) every node process has used so far, by this machine's pid, in
/// seconds (`/proc/<pid>/stat`).
pub(crate) fn cpu_seconds(pids: impl Iterator<Item = u32>) -> HashMap<u32, f64> {
    // `/proc` counts in USER_HZ, 100 a second on Linux whatever the kernel's own tick.
    let ticks = 100.0;
    pids.filter_map(|pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the command name (which may hold spaces), from `state` on.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((pid, (utime + stime) / ticks))
    })
    .collect()
}

/// The host directory of host `i` under `root`, created with mode 0700.
pub(crate) fn host_dir(root: &std::path::Path, i: usize) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let dir = root.join(format!("host-{}", i + 1));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    Ok(dir)
}
