//! Scale: how many connections and idle requests one lock costs a server with H hosts × W
//! workers, with and without host groups, and how fast a killed primary worker or a killed
//! primary host is succeeded.
//!
//! ```text
//! # as root (simulated hosts are PID namespaces: unshare)
//! cargo run --release --all-features --example scale_bench -- --backend redis --hosts 2 --workers 4 --window 10s --kills 5
//! cargo run --release --all-features --example scale_bench -- --backend postgres --hosts 1 --workers 60
//! cargo run --release --all-features --example scale_bench -- --backend etcd --hosts 50 --workers 20 --host-groups off
//! ```
//!
//! The bench starts a server of its own (`redis-server`; `etcd`; a throwaway PostgreSQL cluster
//! with `initdb`, `max_connections` 300, the nodes in a database `bench` of their own, logged in
//! as a role that is not a superuser), then `--hosts` simulated hosts (`tower_primary_lab::host`:
//! each a PID namespace, every process of the host — replacements too — in it) with `--workers`
//! node processes each
//! (`tower_primary_lab::node`: each builds its elector from its environment and campaigns for
//! one lock). With `--host-groups on` (the default) every host has a host directory of its own,
//! given to its nodes as `TOWER_PRIMARY_HOST_DIR`: the processes of a host campaign as one group,
//! only the host candidate talking to the server for the lock; `off` leaves it out (every worker
//! campaigns itself). As root it first raises `fs.inotify.max_user_instances` to 8192 (every
//! follower watches its host directory) and prints the value; without root it says so and exits.
//!
//! Once one primary is settled it waits a second, then measures for `--window` (default 60 s):
//!
//! - **connections**: on the server (Redis `CLIENT LIST`, PostgreSQL `pg_stat_activity` of the
//!   nodes' database, etcd: the established TCP connections to its client port), and per host
//!   (each connection's owner from the kernel's socket table, `ss -tinp`);
//! - **idle requests per second**: the server's count over the window (Redis: the commands
//!   clients sent, seen with `MONITOR`, not those a script ran; PostgreSQL `pg_stat_database` transactions, etcd `/metrics`
//!   `grpc_server_msg_received_total`, which counts every message of the keepalive streams that
//!   `grpc_server_handled_total` counts only when a stream ends), shared out over the processes
//!   by the data segments each connection sent (`ss`): the holder process's own rate apart, the
//!   mean and the maximum per host of the rest;
//! - **idle CPU** of the node processes (`/proc/<pid>/stat`, user + system, in ms per second):
//!   the holder's, the others' mean and maximum;
//! - **refused**: Redis's `rejected_connections`, and the nodes' log lines with PostgreSQL's "too
//!   many clients" or Redis's "max number of clients".
//!
//! Then `--kills` (default 10) rounds of each failover: **worker kill** (`SIGKILL` the primary
//! worker while its host lives; a replacement starts on that host afterwards) and **host kill**
//! (`SIGKILL` every process of the primary's host; the host comes back as a fresh namespace with
//! its workers, on the same host directory). Each round starts once the cluster has settled
//! (the primary's task runs and every other node, the last round's replacements included, names
//! it as the holder), and its time runs from the `SIGKILL` to the successor's first confirmed
//! term (its `primary` event with a higher term; both clocks are `CLOCK_MONOTONIC`); the table
//! gives p50, p99 and max, and how often the successor ran on the killed primary's host.
//! `--lease` (default 2 s; Redis and etcd) sets the lease.
//!
//! Output: a Markdown table on stdout, the README's "Scale" table.

mod fleet;
#[path = "../support/node_process.rs"]
mod node_process;
mod server;
mod sockets;

use std::process::ExitCode;
use std::time::Duration;

use tower_primary_lab::node::{Cluster, NodeCommand, NodeConfig};
use tower_primary_lab::servers::TempDir;

use crate::fleet::{Failover, Fleet};
use crate::server::Server;

const USAGE: &str = "usage: scale_bench --backend redis|postgres|etcd [--hosts H] [--workers W] \
                     [--lease D] [--host-groups on|off] [--window D] [--kills N]";

/// What `fs.inotify.max_user_instances` is raised to, if lower.
const INOTIFY_INSTANCES: u64 = 8192;
const INOTIFY_PATH: &str = "/proc/sys/fs/inotify/max_user_instances";

#[derive(Debug)]
struct Args {
    backend: String,
    hosts: usize,
    workers: usize,
    lease: Duration,
    host_groups: bool,
    window: Duration,
    kills: usize,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args {
            backend: String::new(),
            hosts: 2,
            workers: 4,
            lease: Duration::from_secs(2),
            host_groups: true,
            window: Duration::from_secs(60),
            kills: 10,
        };
        let duration = |name: &str, v: &str| {
            humantime::parse_duration(v.trim()).map_err(|e| format!("{name} {v:?}: {e}"))
        };
        while let Some(flag) = args.next() {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (flag.clone(), None),
            };
            let value = inline
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))?;
            let count = |v: &str| v.parse::<usize>().map_err(|e| format!("{name} {v:?}: {e}"));
            match name.as_str() {
                "--backend" => parsed.backend = value,
                "--hosts" => parsed.hosts = count(&value)?,
                "--workers" => parsed.workers = count(&value)?,
                "--kills" => parsed.kills = count(&value)?,
                "--lease" => parsed.lease = duration(&name, &value)?,
                "--window" => parsed.window = duration(&name, &value)?,
                "--host-groups" => {
                    parsed.host_groups = match value.as_str() {
                        "on" => true,
                        "off" => false,
                        other => return Err(format!("--host-groups {other:?}: on or off")),
                    };
                }
                _ => return Err(format!("unknown flag {name}")),
            }
        }
        if !matches!(parsed.backend.as_str(), "redis" | "postgres" | "etcd") {
            return Err("--backend: redis, postgres or etcd".to_owned());
        }
        if parsed.hosts == 0 || parsed.workers == 0 {
            return Err("--hosts and --workers must be at least 1".to_owned());
        }
        Ok(parsed)
    }
}

fn main() -> ExitCode {
    node_process::run_if_node("warn");
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("scale_bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let root = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    };
    if !root {
        eprintln!(
            "scale_bench: simulated hosts are PID namespaces (unshare), which needs root; run it \
             as root"
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("scale_bench: cannot start a tokio runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error>;

/// Raises `fs.inotify.max_user_instances` to [`INOTIFY_INSTANCES`] if lower; returns the value
/// now and what it was.
fn raise_inotify_instances() -> Result<(u64, u64), String> {
    let read = || -> Result<u64, String> {
        let v =
            std::fs::read_to_string(INOTIFY_PATH).map_err(|e| format!("{INOTIFY_PATH}: {e}"))?;
        v.trim().parse().map_err(|e| format!("{INOTIFY_PATH}: {e}"))
    };
    let before = read()?;
    if before < INOTIFY_INSTANCES {
        std::fs::write(INOTIFY_PATH, INOTIFY_INSTANCES.to_string())
            .map_err(|e| format!("{INOTIFY_PATH}: {e}"))?;
    }
    Ok((read()?, before))
}

async fn run(args: Args) -> Result<(), BoxError> {
    match raise_inotify_instances() {
        Ok((now, before)) if now != before => {
            println!("fs.inotify.max_user_instances = {now} (raised from {before})");
        }
        Ok((now, _)) => println!("fs.inotify.max_user_instances = {now}"),
        Err(e) => println!("fs.inotify.max_user_instances: not raised: {e}"),
    }
    let server = Server::start(&args.backend).await?;
    let dirs = TempDir::new("scale-bench")?;
    let lock = format!("scale-{}", std::process::id());
    let mut configs = Vec::new();
    for i in 0..args.hosts {
        let mut config = NodeConfig::new(server.node_url(i + 1, args.lease), &lock)
            .lease(args.lease)
            .tick(Duration::from_secs(1));
        if args.host_groups {
            config = config.host_dir(fleet::host_dir(dirs.path(), i)?);
        }
        configs.push(config);
    }
    let nodes = args.hosts * args.workers;
    println!(
        "scale: {}; {} hosts × {} workers ({nodes} nodes), lease {}, host groups {}; window {}, \
         {} kills of each kind",
        server.describe(),
        args.hosts,
        args.workers,
        humantime::format_duration(args.lease),
        if args.host_groups {
            "on (a host directory per host)"
        } else {
            "off"
        },
        humantime::format_duration(args.window),
        args.kills
    );
    let cluster = Cluster::new(NodeCommand::current_exe()?, configs[0].clone());
    let patience = Duration::from_secs(60) + 3 * args.lease;
    let started = tokio::time::Instant::now();
    let mut fleet = Fleet::start(cluster, configs, args.workers, patience).await?;
    let settled = fleet.settled().await;
    if let Some(e) = fleet.start_errors() {
        return Err(e.into());
    }
    // Not settled (a server refusing connections, a machine overloaded): the idle window is
    // still measured on what runs, and the failovers are left out.
    let (holder, failovers) = match settled {
        Ok((holder, _)) => {
            println!(
                "settled: one primary, every node with a role, {:.1} s after the first start",
                started.elapsed().as_secs_f64()
            );
            (Some(holder), true)
        }
        Err(_) => {
            let primary = fleet.primary();
            println!(
                "NOT settled within {}: {}, {} nodes without a role; no failover rounds",
                humantime::format_duration(patience),
                primary.map_or_else(
                    || "no single primary".to_owned(),
                    |(pid, term)| format!("primary pid {pid} term {term}")
                ),
                fleet.without_role()
            );
            (primary.map(|(pid, _)| pid), false)
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let idle = measure_idle(&server, &fleet, holder, args.window).await?;
    println!(
        "idle: {} connections, {:.2} requests/s (the holder {:.2}), CPU ms/s per node: the holder \
         {:.1}, the others {:.1} (max {:.1})",
        idle.server_connections,
        idle.total_rate,
        idle.holder_rate,
        idle.holder_cpu,
        idle.others_cpu_mean,
        idle.others_cpu_max
    );
    // A round that fails (no single primary within the patience) ends its series, said so in
    // the table; the rest is still reported.
    let mut worker_kills = Rounds::default();
    let mut host_kills = Rounds::default();
    if failovers {
        for _ in 0..args.kills {
            match fleet.kill_worker().await {
                Ok(r) => worker_kills.done.push(r),
                Err(e) => {
                    worker_kills.failed = Some(first_line(&e));
                    break;
                }
            }
        }
        if args.hosts > 1 && worker_kills.failed.is_none() {
            for _ in 0..args.kills {
                match fleet.kill_host().await {
                    Ok(r) => host_kills.done.push(r),
                    Err(e) => {
                        host_kills.failed = Some(first_line(&e));
                        break;
                    }
                }
            }
        }
    }
    let refused_logs = fleet.refusals_in_logs();
    let refused_server = server.refused().await?;
    fleet.cluster.kill_all(Duration::from_secs(30)).await?;
    let history = fleet.cluster.history().check();

    let mut rows: Vec<(String, String)> = Vec::new();
    rows.push((
        "server connections, total".to_owned(),
        idle.server_connections.to_string(),
    ));
    rows.push((
        "connections per host: holder's host / others mean / others max".to_owned(),
        format!(
            "{} / {:.1} / {}",
            idle.holder_host_connections, idle.others_mean_connections, idle.others_max_connections
        ),
    ));
    rows.push((
        "idle requests/s, total".to_owned(),
        format!("{:.2}", idle.total_rate),
    ));
    rows.push((
        "idle requests/s, the holder process".to_owned(),
        format!("{:.2}", idle.holder_rate),
    ));
    rows.push((
        "idle requests/s per host, the holder apart: mean / max".to_owned(),
        format!("{:.2} / {:.2}", idle.host_mean_rate, idle.host_max_rate),
    ));
    rows.push((
        "idle CPU per node, ms/s: the holder / the others' mean / max".to_owned(),
        format!(
            "{:.1} / {:.1} / {:.1}",
            idle.holder_cpu, idle.others_cpu_mean, idle.others_cpu_max
        ),
    ));
    rows.push((
        "refused by the server".to_owned(),
        format!(
            "{}{refused_logs} lines in the nodes' logs (the last 200 of each)",
            refused_server.map_or_else(String::new, |n| format!("{n} rejected_connections, "))
        ),
    ));
    rows.push((
        "worker-kill failover: p50 / p99 / max (successor on the same host)".to_owned(),
        failover_stats(&worker_kills),
    ));
    rows.push((
        "host-kill failover: p50 / p99 / max".to_owned(),
        if args.hosts > 1 {
            failover_stats(&host_kills)
        } else {
            "(one host)".to_owned()
        },
    ));
    rows.push((
        "history: overlapping primaries, terms rising".to_owned(),
        if history.is_ok() {
            "0, yes".to_owned()
        } else {
            format!("VIOLATED: {history}")
        },
    ));
    println!();
    println!(
        "| {} {}×{}, host groups {} | value |",
        args.backend,
        args.hosts,
        args.workers,
        if args.host_groups { "on" } else { "off" }
    );
    println!("|---|---|");
    for (what, value) in &rows {
        println!("| {what} | {value} |");
    }
    println!();
    println!("requests: {}", server.requests_source());
    if !history.is_ok() {
        return Err("the history checker found a violation".into());
    }
    Ok(())
}

/// What the idle window measured.
struct Idle {
    server_connections: usize,
    holder_host_connections: usize,
    others_mean_connections: f64,
    others_max_connections: usize,
    total_rate: f64,
    holder_rate: f64,
    host_mean_rate: f64,
    host_max_rate: f64,
    /// CPU in ms per second of the window.
    holder_cpu: f64,
    others_cpu_mean: f64,
    others_cpu_max: f64,
}

async fn measure_idle(
    server: &Server,
    fleet: &Fleet,
    holder: Option<u32>,
    window: Duration,
) -> Result<Idle, BoxError> {
    let port = server.port();
    let hosts = fleet.hosts.len();
    // Without a primary, host 1 stands in for the holder's host.
    let holder_host = holder.and_then(|h| fleet.host_of(h)).unwrap_or(0);
    let pids = fleet.machine_pids();
    let cpu_before = fleet::cpu_seconds(pids.keys().copied());
    let before = sockets::client_sockets(port).await?;
    let requests_before = server.requests().await?;
    let started = tokio::time::Instant::now();
    tokio::time::sleep(window).await;
    let requests_after = server.requests().await?;
    let secs = started.elapsed().as_secs_f64();
    let after = sockets::client_sockets(port).await?;
    let cpu_after = fleet::cpu_seconds(pids.keys().copied());
    // CPU per node over the window, in ms per second: the holder's, and the others' mean and max.
    let mut holder_cpu = 0.0;
    let mut other_cpu = Vec::new();
    for (pid, after) in &cpu_after {
        let Some(before) = cpu_before.get(pid) else {
            continue;
        };
        let ms_per_s = (after - before) * 1e3 / secs;
        match pids.get(pid) {
            Some((_, node)) if Some(*node) == holder => holder_cpu = ms_per_s,
            _ => other_cpu.push(ms_per_s),
        }
    }

    // Connections per host, and the server's own count.
    let mut per_host = vec![0usize; hosts];
    let mut nodes_total = 0;
    for s in &after {
        if let Some((host, _)) = s.pid.and_then(|p| pids.get(&p)) {
            per_host[*host] += 1;
            nodes_total += 1;
        }
    }
    let server_connections = server.connections(nodes_total).await?;
    let others: Vec<usize> = (0..hosts)
        .filter(|h| *h != holder_host)
        .map(|h| per_host[h])
        .collect();

    // The server's requests, shared out by the segments each connection sent in the window.
    let start_segs = sockets::segments_by_port(&before);
    let mut host_segs = vec![0u64; hosts];
    let mut holder_segs = 0u64;
    for s in &after {
        let Some((host, node)) = s.pid.and_then(|p| pids.get(&p)) else {
            continue;
        };
        let sent = s
            .segs_out
            .saturating_sub(start_segs.get(&s.local_port).copied().unwrap_or(0));
        if Some(*node) == holder {
            holder_segs += sent;
        } else {
            host_segs[*host] += sent;
        }
    }
    let total_segs = holder_segs + host_segs.iter().sum::<u64>();
    let total_rate = (requests_after - requests_before) / secs;
    let share = |segs: u64| {
        if total_segs == 0 {
            0.0
        } else {
            total_rate * segs as f64 / total_segs as f64
        }
    };
    let host_rates: Vec<f64> = host_segs.iter().map(|s| share(*s)).collect();
    Ok(Idle {
        server_connections,
        holder_host_connections: per_host[holder_host],
        others_mean_connections: if others.is_empty() {
            0.0
        } else {
            others.iter().sum::<usize>() as f64 / others.len() as f64
        },
        others_max_connections: others.iter().copied().max().unwrap_or(0),
        total_rate,
        holder_rate: share(holder_segs),
        host_mean_rate: host_rates.iter().sum::<f64>() / hosts as f64,
        host_max_rate: host_rates.iter().copied().fold(0.0, f64::max),
        holder_cpu,
        others_cpu_mean: if other_cpu.is_empty() {
            0.0
        } else {
            other_cpu.iter().sum::<f64>() / other_cpu.len() as f64
        },
        others_cpu_max: other_cpu.iter().copied().fold(0.0, f64::max),
    })
}

/// The failover rounds of one kind, and why the series stopped early, if it did.
#[derive(Default)]
struct Rounds {
    done: Vec<Failover>,
    failed: Option<String>,
}

fn first_line(e: &BoxError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// `p50 / p99 / max (k of n on the same host)`, in ms; nearest-rank percentiles.
fn failover_stats(series: &Rounds) -> String {
    let rounds = &series.done;
    let failed = series.failed.as_ref().map_or_else(String::new, |e| {
        format!("; FAILED after {} rounds: {e}", rounds.len())
    });
    if rounds.is_empty() {
        return format!("(no rounds){failed}");
    }
    let mut ms: Vec<f64> = rounds.iter().map(|r| r.took.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    let same = rounds.iter().filter(|r| r.same_host).count();
    format!(
        "{:.1} / {:.1} / {:.1} ms ({same} of {} on the same host){failed}",
        rank(0.5),
        rank(0.99),
        ms[ms.len() - 1],
        rounds.len()
    )
}
