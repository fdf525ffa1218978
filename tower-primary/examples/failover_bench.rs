//! Failover benchmark: from a signal to the primary until the successor's singleton task runs.
//!
//! ```text
//! cargo run --release --example failover_bench -- --backend file --rounds 100 [--nodes 3] [--lease 2s]
//! cargo run --release --features postgres --example failover_bench -- \
//!     --backend 'postgres://root@127.0.0.1:5432/test?namespace=bench' --successor-host both
//! ```
//!
//! `--backend` is `file` (locks in a fresh temporary directory) or any backend string
//! that `tower_primary::backend::from_url` takes
//! (`/path/dir`, `redis://…`, `postgres://…`, `etcd://…`, with the matching Cargo feature).
//! `--rounds` is per series (default 100), `--nodes` how many nodes run (default 3), `--lease` the
//! lease of lease backends (ignored by the file backend).
//!
//! `--successor-host same|other|both` (default `same`) says where the successor runs: `same` runs
//! every node on this machine as it is (one host); `other` gives every node a [simulated
//! host](tower_primary_lab::host) of its own (a PID namespace; needs root), and a
//! replacement the host of the node it replaces, so every successor runs on another host than
//! the node it succeeds: a backend cannot see that its predecessor's process is gone and must
//! wait whatever it waits for a predecessor it cannot see; `both` runs the two one after the
//! other and prints their series side by side.
//!
//! The program re-executes itself as `--nodes` election nodes (node mode of
//! `tower_primary_lab::node`: each node runs an elector with a singleton task and prints
//! `CLOCK_MONOTONIC`-stamped events). Each round waits until the nodes have settled (one primary,
//! known to every secondary), waits a random 50–150 ms so the signal lands at a random moment, then
//! signals the primary. The time measured runs from `CLOCK_MONOTONIC` taken just before `kill(2)`
//! to the successor's first singleton-task line (its own `CLOCK_MONOTONIC`). A replacement node is
//! started once the new primary is seen, so every round has the same number of nodes.
//!
//! Two series: `failover` (`SIGKILL`: the kernel frees the lock with the process) and `handover`
//! (`SIGTERM`: the node shuts its elector down and releases the lock). The output is a table of
//! min/p50/p90/p99/max in milliseconds (nearest-rank percentiles), the three slowest rounds of
//! each series with where their time went (the successor's `primary` line; when the old node was
//! reaped or printed `released`), the load average (other work on the machine shows in the
//! tail), the history check of every primary period (no overlap, rising terms; the program fails
//! otherwise), and two final lines `failover_p99_ms=<v>` and `handover_p99_ms=<v>`.

#[path = "support/node_process.rs"]
mod node_process;

use std::process::ExitCode;
use std::time::Duration;

use tower_primary::clock::monotonic_nanos;
use tower_primary_lab::host::SimulatedHost;
use tower_primary_lab::node::{Cluster, Event, EventKind, NodeCommand, NodeConfig, NodeSignal};
use tower_primary_testing::history::Report as HistoryReport;

struct Args {
    backend: String,
    rounds: usize,
    nodes: usize,
    lease: Option<Duration>,
    placements: Vec<Placement>,
}

/// Where the successor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// Every node on this machine's own host.
    Same,
    /// Every node on a simulated host of its own.
    Other,
}

impl Placement {
    fn label(self) -> &'static str {
        match self {
            Placement::Same => "same host",
            Placement::Other => "other host",
        }
    }
}

const USAGE: &str = "usage: failover_bench [--backend file|<backend string>] [--rounds N] \
                     [--nodes N] [--lease DURATION] [--successor-host same|other|both]";

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args {
            backend: "file".to_owned(),
            rounds: 100,
            nodes: 3,
            lease: None,
            placements: vec![Placement::Same],
        };
        while let Some(flag) = args.next() {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (flag.clone(), None),
            };
            let value = inline
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?;
            let number = |v: &str| v.parse::<usize>().map_err(|e| format!("{name} {v:?}: {e}"));
            match name.as_str() {
                "--backend" => parsed.backend = value,
                "--rounds" => parsed.rounds = number(&value)?,
                "--nodes" => parsed.nodes = number(&value)?,
                "--lease" => {
                    parsed.lease = Some(
                        humantime::parse_duration(&value)
                            .map_err(|e| format!("--lease {value:?}: {e}"))?,
                    );
                }
                "--successor-host" => {
                    parsed.placements = match value.as_str() {
                        "same" => vec![Placement::Same],
                        "other" => vec![Placement::Other],
                        "both" => vec![Placement::Same, Placement::Other],
                        v => {
                            return Err(format!(
                                "--successor-host {v:?}: one of same, other, both"
                            ));
                        }
                    };
                }
                _ => return Err(format!("unknown flag {name}\n{USAGE}")),
            }
        }
        if parsed.backend.starts_with("memory://") {
            return Err(
                "memory:// lives inside one process; the nodes are separate processes".into(),
            );
        }
        if parsed.nodes < 2 {
            return Err("--nodes must be at least 2".to_owned());
        }
        if parsed.rounds == 0 {
            return Err("--rounds must be at least 1".to_owned());
        }
        Ok(parsed)
    }
}

fn main() -> ExitCode {
    // Warnings only: a log line between the grant and the task start would be measured.
    node_process::run_if_node("warn");
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failover_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error>;

async fn run(args: Args) -> Result<(), BoxError> {
    let tmp;
    let backend = if args.backend == "file" {
        tmp = tempfile::tempdir()?;
        tmp.path()
            .to_str()
            .ok_or("the temporary directory's path is not UTF-8")?
            .to_owned()
    } else {
        args.backend.clone()
    };
    let lock = format!("failover-bench-{}", std::process::id());
    let mut config = NodeConfig::new(&backend, &lock).tick(Duration::from_secs(1));
    if let Some(lease) = args.lease {
        config = config.lease(lease);
    }
    // Lease backends fail over after the lease: leave room for several.
    let timeout = args.lease.map_or(Duration::from_secs(10), |l| {
        Duration::from_secs(10).max(l * 5)
    });

    println!(
        "backend {} ({backend}), lock {lock}, {} nodes, {} rounds per series, lease {}, \
         successor on: {}",
        args.backend,
        args.nodes,
        args.rounds,
        args.lease.map_or_else(
            || "default".to_owned(),
            |l| humantime::format_duration(l).to_string()
        ),
        args.placements
            .iter()
            .map(|p| p.label())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Other work on the machine shows up in the tail: say how busy it was.
    println!("load average at start: {}", load_average());
    let mut results = Vec::new();
    let mut reports = Vec::new();
    for placement in args.placements.clone() {
        let (series, report) = run_placement(&args, config.clone(), timeout, placement).await?;
        results.extend(series);
        reports.push((placement, report));
    }

    println!();
    println!(
        "{:<24} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "series", "n", "min", "p50", "p90", "p99", "max"
    );
    let mut p99s = Vec::new();
    for (series, times, _) in &mut results {
        times.sort_unstable();
        let p = |q: f64| ms(percentile(times, q));
        println!(
            "{:<24} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            series,
            times.len(),
            ms(times[0]),
            p(50.0),
            p(90.0),
            p(99.0),
            ms(times[times.len() - 1])
        );
        p99s.push((series.clone(), p(99.0)));
    }
    println!("(ms, from the signal to the successor's first singleton-task line)");
    for (series, _, rounds) in &mut results {
        rounds.sort_by_key(|r| std::cmp::Reverse(r.task));
        println!("slowest {series} rounds (ms after the signal):");
        for r in rounds.iter().take(3) {
            println!(
                "  round {:>3}: task start {:.3}, successor's primary line {}, old node {}",
                r.round,
                ms(r.task),
                r.primary
                    .map_or_else(|| "-".to_owned(), |t| format!("{:.3}", ms(t))),
                r.old_gone.map_or_else(
                    || "-".to_owned(),
                    |(what, t)| format!("{what} {:.3}", ms(t))
                ),
            );
        }
    }
    println!("load average at the end: {}", load_average());
    for (placement, report) in &reports {
        println!(
            "{}: primary periods: {}, overlapping pairs: {}, terms not rising: {}",
            placement.label(),
            report.periods,
            report.overlaps.len(),
            report.term_regressions.len()
        );
    }
    for (series, p99) in p99s {
        // `failover_p99_ms` on this machine's host (as before), `failover_other_host_p99_ms`.
        let key = series
            .replace(", same host", "")
            .replace(", other host", "_other_host");
        println!("{key}_p99_ms={p99:.3}");
    }
    for (_, report) in &reports {
        if !report.is_ok() {
            return Err(format!("the history check failed:\n{report}").into());
        }
    }
    Ok(())
}

type Series = (String, Vec<u64>, Vec<Round>);

/// Runs the two series (failover, handover) with the successor placed as `placement`.
async fn run_placement(
    args: &Args,
    config: NodeConfig,
    timeout: Duration,
    placement: Placement,
) -> Result<(Vec<Series>, HistoryReport), BoxError> {
    // `other`: a simulated host per node; a replacement takes the host of the node it replaces.
    let mut hosts = Vec::new();
    if placement == Placement::Other {
        for i in 0..args.nodes {
            hosts.push(SimulatedHost::start(format!("bench-host-{}", i + 1)).await?);
        }
    }
    let mut host_of: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    let mut cluster = Cluster::new(NodeCommand::current_exe()?, config.clone());
    let started = monotonic_nanos();
    for i in 0..args.nodes {
        if hosts.is_empty() {
            cluster.spawn_node()?;
        } else {
            let pid = cluster.spawn_node_on(&hosts[i], &config)?;
            host_of.insert(pid, i);
        }
    }
    let (mut primary, mut term) = cluster.wait_settled(timeout).await?;
    println!(
        "{}: first election: {:.1} ms from spawning the nodes to a settled cluster",
        placement.label(),
        ms(monotonic_nanos() - started)
    );

    let mut rng = Rng::new();
    let mut results = Vec::new();
    for (series, signal) in [
        ("failover", NodeSignal::Kill),
        ("handover", NodeSignal::Term),
    ] {
        let mut times = Vec::with_capacity(args.rounds);
        let mut slow = Vec::with_capacity(args.rounds);
        for round in 0..args.rounds {
            let settle = Duration::from_millis(50 + rng.below(101));
            tokio::time::sleep(settle).await;
            let sent = cluster.signal(primary, signal).await?;
            let next = cluster
                .wait_task_start_after(term, primary, timeout)
                .await?;
            times.push(next.at.saturating_sub(sent));
            cluster.wait_exit(primary, timeout).await?;
            slow.push(breakdown(&cluster.events(), round, sent, primary, &next));
            match host_of.get(&primary).copied() {
                Some(h) => {
                    let pid = cluster.spawn_node_on(&hosts[h], &config)?;
                    host_of.insert(pid, h);
                }
                None => {
                    cluster.spawn_node()?;
                }
            }
            let settled = cluster.wait_settled(timeout).await?;
            if settled.0 != next.pid {
                return Err(format!(
                    "{series} round {round}: pid {} started its task but pid {} is primary",
                    next.pid, settled.0
                )
                .into());
            }
            (primary, term) = settled;
        }
        results.push((format!("{series}, {}", placement.label()), times, slow));
    }
    let report = cluster.history().check();
    cluster.kill_all(timeout).await?;
    Ok((results, report))
}

/// Where the time of one round went, in ns after the signal.
struct Round {
    round: usize,
    task: u64,
    primary: Option<u64>,
    old_gone: Option<(&'static str, u64)>,
}

fn breakdown(events: &[Event], round: usize, sent: u64, old: u32, next: &Event) -> Round {
    let after = |at: u64| at.saturating_sub(sent);
    let primary = events.iter().find_map(|e| match e.kind {
        EventKind::Primary { term } if e.pid == next.pid && Some(term) == next.term() => {
            Some(after(e.at))
        }
        _ => None,
    });
    // SIGTERM: the old node's `released` line; SIGKILL: when the parent reaped it.
    let old_gone = events
        .iter()
        .filter(|e| e.pid == old)
        .find_map(|e| match e.kind {
            EventKind::Released => Some(("released", after(e.at))),
            EventKind::Exited { .. } => Some(("reaped", after(e.at))),
            _ => None,
        });
    Round {
        round,
        task: after(next.at),
        primary,
        old_gone,
    }
}

/// The first three fields of `/proc/loadavg`, or `unknown`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

/// Nearest rank: the smallest value with at least `q` percent of the values at or below it.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// xorshift64*: enough to spread the signals over the tick cycle, without a dependency.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Rng(monotonic_nanos() ^ (u64::from(std::process::id()) << 32) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}
