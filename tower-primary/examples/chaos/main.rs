//! Chaos: randomized fault runs against real node processes on one lock, judged by a fenced
//! witness and the history checker. It shows, on any backend and with your settings, that there
//! was at most one primary at any instant and that no stale write reached the store.
//!
//! ```text
//! cargo run --release --example chaos -- --backend file --nodes 5 --duration 60s --seed 1
//! cargo run --release --features redis --example chaos -- --backend redis --duration 5m --seed 7
//! cargo run --release --features postgres --example chaos -- --backend postgres --duration 60s
//! cargo run --release --features etcd --example chaos -- --backend etcd --lease 3s
//! ```
//!
//! Flags:
//! - `--backend`: `file` (a fresh temporary directory); `redis`, `etcd` or `postgres` (a server of
//!   the tool's own on free ports, which the `restart` fault may kill: `redis-server`, `etcd` or
//!   the PostgreSQL server programs must be installed; a throwaway PostgreSQL cluster is made
//!   with `initdb`, through `runuser -u postgres` as root); or any backend string
//!   that `tower_primary::backend::from_url` takes
//!   (`/path/dir`, `redis://…`, `postgres://…`, `etcd://…`: your own server, e.g. the machine's
//!   `postgres://root@127.0.0.1:5432/test`; `restart` is then skipped), with the matching Cargo
//!   feature.
//! - `--nodes N` (default 5; with host groups `--hosts` × `--workers`), `--hosts N` (how many
//!   simulated hosts the nodes are spread over, slot `s` on host `s % N`, its replacements too:
//!   each a PID namespace of its own, see `tower_primary_lab::host`; needs root; default 2 for a
//!   server backend, 1 — this machine as it is — for the file backend), `--host-groups on|off`
//!   (default on for a server backend: each host's nodes share a host directory of their own,
//!   `TOWER_PRIMARY_HOST_DIR`, and campaign as one host group — one candidate per host talks to
//!   the server, the others follow it), `--workers W` (nodes per host with host groups, default
//!   3), `--duration D` (default `60s`), `--seed N`
//!   (default: from the clock, printed), `--lease D` (default 2 s on Redis and etcd; ignored by
//!   the file backend and PostgreSQL, which have no lease setting), `--faults LIST` (default:
//!   every kind, those that do not apply skipped), `--fault-every A..B` (default `1s..3s`),
//!   `--write-every D` (default `2ms`), `--bound D` (the documented longest time without a
//!   primary once a fault is over, printed beside the measured one; default per backend: 100 ms
//!   on the file backend (the holder's exit), the lease + 1 s on Redis (the restart guard), the
//!   lease + 1.5 s on etcd (its 500 ms expiry check, a restart), 6.5 s on PostgreSQL (a stopped
//!   holder is ended after the maximum fencing bound, 4 s, the waiters' 2 s check and a liveness
//!   check; a crash costs the 450 ms fencing bound at most)), `--out DIR` (default `target/chaos/<backend>-seed<N>`).
//!
//! The tool re-executes itself as `--nodes` election nodes (the node mode of
//! `tower_primary_lab::node`), each reaching the server through a TCP proxy of its own
//! (`tower_primary_lab::proxy`) where there is a server. Every node's singleton task writes
//! `(node, term, monotonic and wall time, deadline)` every `--write-every` to a **fenced
//! witness** (`tower_primary_testing::witness`) while it is primary, checking
//! `TermContext::is_valid()` before each write; the witness accepts a write only if its term is at
//! least the highest it has accepted, and logs both kinds.
//!
//! The nemesis, driven by the seed, injects one fault at a time after a pause drawn from
//! `--fault-every`, aimed at the current primary 80 % of the time (else at any node):
//! - `kill`: `SIGKILL`, and a replacement node in the same slot 0–500 ms later;
//! - `term`: `SIGTERM` (graceful handover), then a replacement;
//! - `stop`: `SIGSTOP` for 5–50 % of the lease or for 1–2.5 leases, then `SIGCONT` (the lease is
//!   `--lease`; 4 s, the keepalive detection time, on PostgreSQL; 2 s on the file backend);
//! - `cut`: through the node's proxy, a cut of both sides (the node sees its connections close), a
//!   stall of the same lengths as the pauses (then everything passes again), or a partition of
//!   those lengths (nothing passes; past the lease — 4 s, the server's dead-peer detection time,
//!   on PostgreSQL — the server side of the node's connections is closed, as a server that gives
//!   up on a silent client does; healing finds the node's side closed);
//! - `restart`: kill the server and start it again 0–1 s later (a Redis restart loses every key;
//!   etcd and PostgreSQL, stopped as by a crash, keep their data), only for a server the tool
//!   started itself;
//! - `drop`: the server side of the node's connections is closed at once while the node hears
//!   nothing for a pause's length — an asymmetric partition;
//! - `kill-conns` (PostgreSQL): `pg_terminate_backend` on every session of the node — its lock
//!   session and its second connection, found by the `application_name` each slot's backend
//!   string sets (`chaos<pid>-n<slot>`);
//! - `flush` (Redis, the tool's own server): `FLUSHALL`;
//! - `lease-change` (Redis, the tool's own server): with it in the mix every second node runs
//!   2.5 times the lease (a rolling lease change caught halfway); the fault restarts the server
//!   without data while the primary cannot reach it for its own lease;
//! - `stop-waiter`: `SIGSTOP` the secondary most likely next in line (the longest waiter),
//!   `SIGKILL` the primary and replace it, `SIGCONT` the secondary after a pause's length.
//! - `worker-kill` (host groups): `SIGKILL` a host candidate (the one node of its host whose
//!   proxy carries connections; the primary 80 % of the time) while its host lives, and a
//!   replacement on that host 0–500 ms later;
//! - `host-kill` (host groups, two hosts or more): `SIGKILL` every process of a host (the
//!   primary's 80 % of the time): its nodes, then its PID namespace's init; the host comes back
//!   as a fresh namespace on the same host directory, with its nodes, 0–500 ms later;
//! - `stop-candidate` (host groups): `SIGSTOP` a host candidate for a pause's length (half of
//!   them past the lease: its followers replace a hung candidate), then `SIGCONT`;
//! - `deploy`: drain a node (a primary hands the lock over to the best eligible candidate with a
//!   reservation), `SIGTERM` it, and start its replacement at a priority above every node's: it
//!   pulls the lock once it has been ready for the settle time (500 ms);
//! - `drain`: drain a node, `SIGKILL` it after a pause, start a replacement at its priority.
//!
//! Nodes start with mixed priorities (slot `s` has `1 + s % 3`), so the lock also moves to the
//! highest ready priority after every replacement: planned handovers run among the faults.
//!
//! Faults that do not apply are skipped and said so: `cut`, `drop` and `restart` on the file
//! backend, `restart`, `flush` and `lease-change` on a server the tool did not start, `cut`,
//! `drop` and `lease-change` on a TLS or multi-host URL, `kill-conns` but on PostgreSQL,
//! `flush` and `lease-change` but on Redis, `worker-kill`, `host-kill` and `stop-candidate`
//! without host groups, `host-kill` on one host. The seed fixes
//! the nemesis's choices (kinds, targets' primary-or-not, lengths, pauses), not the timing of
//! the processes, so two runs with one seed are alike, not identical.
//!
//! At the end the nodes get a last chance to elect a primary (a liveness check), are killed, and
//! the run is judged: the primary periods come from the nodes' events, with deadlines and
//! earliest writes from the witness (`witness::merge`); a period ends at its reported end or its
//! deadline, whichever comes first. Output: a summary table (failover time per fault kind, p50,
//! p99 and max; periods; overlaps; terms rising; the longest time without a primary; writes
//! accepted, stale writes rejected, unsafe writes; the documented bound beside the longest time
//! without a primary and beside the longest such time after a fault was over; **terms that ended
//! without a fault** — a primary period that ended although no fault touched its node or the
//! server from just before it to a lease (or detection time) + 1 s after it was over: goal 0),
//! the files `summary.txt`, `periods.txt` (every
//! period by term, every fault), `timeline.svg` (which node was primary when, where the faults
//! hit), `events.log` and `witness.log` in the output directory, and a last line
//! `faults=<n> failovers=<n> overlaps=<n> stale_writes=<accepted n> max_gap_ms=<v> bound_ms=<v>
//! ended_without_fault=<n>`.
//!
//! Exit status: 0 when the run is clean; 1 on any violation (overlapping primary periods, a term
//! that did not rise, a stale write the witness accepted, a write made while not primary) or when
//! no single primary emerged after the last fault; 2 on a usage error; 3 when the run could not
//! be set up.

mod host_faults;
mod nemesis;
#[path = "../support/node_process.rs"]
mod node_process;
mod report;
mod setup;
mod svg;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tower_primary::clock::monotonic_nanos;
use tower_primary_lab::host::SimulatedHost;
use tower_primary_lab::node::{Cluster, NodeCommand, NodeConfig};
use tower_primary_lab::servers::TempDir;
use tower_primary_testing::witness::Witness;

use crate::nemesis::{FaultKind, Nemesis, NemesisConfig};
use crate::report::RunData;
use crate::setup::Setup;

const USAGE: &str = "usage: chaos [--backend file|redis|postgres|etcd|<backend string>] \
                     [--nodes N | --workers W] [--hosts N] [--host-groups on|off] [--duration D] \
                     [--seed N] [--lease D] [--faults kill,stop,term,cut,restart,drop,kill-conns,\
                     flush,lease-change,stop-waiter,worker-kill,host-kill,stop-candidate,deploy,\
                     drain] \
                     [--fault-every A..B] [--write-every D] [--bound D] [--out DIR]";

#[derive(Debug)]
struct Args {
    backend: String,
    /// `--nodes`, when given.
    nodes: Option<usize>,
    /// `--workers`: nodes per host with host groups.
    workers: usize,
    hosts: Option<usize>,
    host_groups: bool,
    bound: Option<Duration>,
    duration: Duration,
    seed: Option<u64>,
    lease: Option<Duration>,
    faults: Vec<FaultKind>,
    pace: (Duration, Duration),
    write_every: Duration,
    out: Option<PathBuf>,
}

fn duration(name: &str, v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v.trim()).map_err(|e| format!("{name} {v:?}: {e}"))
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args {
            backend: "file".to_owned(),
            nodes: None,
            workers: 3,
            hosts: None,
            host_groups: true,
            bound: None,
            duration: Duration::from_secs(60),
            seed: None,
            lease: None,
            faults: FaultKind::DEFAULT.to_vec(),
            pace: (Duration::from_secs(1), Duration::from_secs(3)),
            write_every: Duration::from_millis(2),
            out: None,
        };
        while let Some(flag) = args.next() {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (flag.clone(), None),
            };
            let value = inline
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?;
            match name.as_str() {
                "--backend" => parsed.backend = value,
                "--nodes" => {
                    parsed.nodes = Some(
                        value
                            .parse()
                            .map_err(|e| format!("--nodes {value:?}: {e}"))?,
                    );
                }
                "--workers" => {
                    parsed.workers = value
                        .parse()
                        .map_err(|e| format!("--workers {value:?}: {e}"))?;
                    if parsed.workers == 0 {
                        return Err("--workers must be at least 1".to_owned());
                    }
                }
                "--host-groups" => {
                    parsed.host_groups = match value.as_str() {
                        "on" => true,
                        "off" => false,
                        other => return Err(format!("--host-groups {other:?}: on or off")),
                    };
                }
                "--hosts" => {
                    let n: usize = value
                        .parse()
                        .map_err(|e| format!("--hosts {value:?}: {e}"))?;
                    if n == 0 {
                        return Err("--hosts must be at least 1".to_owned());
                    }
                    parsed.hosts = Some(n);
                }
                "--bound" => parsed.bound = Some(duration(&name, &value)?),
                "--duration" => parsed.duration = duration(&name, &value)?,
                "--seed" => {
                    parsed.seed = Some(
                        value
                            .parse()
                            .map_err(|e| format!("--seed {value:?}: {e}"))?,
                    );
                }
                "--lease" => parsed.lease = Some(duration(&name, &value)?),
                "--faults" => {
                    parsed.faults = value
                        .split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(|s| {
                            FaultKind::parse(s.trim()).ok_or_else(|| {
                                format!(
                                    "--faults: unknown fault {s:?} (kill, stop, term, cut, \
                                     restart, drop, kill-conns, flush, lease-change, \
                                     stop-waiter, worker-kill, host-kill, stop-candidate, \
                                     deploy, drain)"
                                )
                            })
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--fault-every" => {
                    let (a, b) = value.split_once("..").unwrap_or((&value, &value));
                    let (a, b) = (duration(&name, a)?, duration(&name, b)?);
                    if a > b {
                        return Err(format!("--fault-every {value:?}: the range is reversed"));
                    }
                    parsed.pace = (a, b);
                }
                "--write-every" => parsed.write_every = duration(&name, &value)?,
                "--out" => parsed.out = Some(PathBuf::from(value)),
                _ => return Err(format!("unknown flag {name}\n{USAGE}")),
            }
        }
        if parsed.nodes.is_some_and(|n| n < 2) {
            return Err("--nodes must be at least 2".to_owned());
        }
        if parsed.write_every.is_zero() {
            return Err("--write-every must be longer than zero".to_owned());
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
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: cannot start a tokio runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: {e}");
            ExitCode::from(3)
        }
    }
}

type BoxError = Box<dyn std::error::Error>;

/// Whether `backend` names the file backend (`file`, a path, `file://…`).
fn is_file_backend(backend: &str) -> bool {
    match backend {
        "redis" | "postgres" | "etcd" => false,
        other => other.starts_with("file://") || !other.contains("://"),
    }
}

/// The documented longest time without a primary once a fault is over, per backend, and what
/// it is made of.
fn default_bound(setup: &Setup) -> (Duration, String) {
    let lease = setup.max_lease().unwrap_or(setup::DEFAULT_LEASE);
    let l = humantime::format_duration(lease);
    match setup.kind {
        "file" => (
            Duration::from_millis(100),
            "file: the holder's exit, plus scheduling".to_owned(),
        ),
        "redis" => (
            lease + Duration::from_secs(1),
            format!("redis: the lease; after a flush or a restart the maximum lease {l} + 1 s"),
        ),
        "etcd" => (
            lease + Duration::from_millis(1500),
            format!("etcd: the lease {l} + the 500 ms expiry check, + 1 s after a restart"),
        ),
        _ => (
            Duration::from_millis(6500),
            "postgres: 450 ms (the fencing bound) after a crash or a dropped connection; a \
             stopped holder or waiter is ended after the maximum bound 4 s + the waiters' 2 s \
             check + a liveness check"
                .to_owned(),
        ),
    }
}

/// Runs the whole thing; `Ok(false)` when the run found a violation.
async fn run(args: Args) -> Result<bool, BoxError> {
    let seed = args
        .seed
        .unwrap_or_else(|| monotonic_nanos() ^ u64::from(std::process::id()));
    // The file backend is one host by definition; a server backend's nodes are spread over two
    // simulated hosts unless told otherwise, `--workers` of them per host in a host group.
    let server = !is_file_backend(&args.backend);
    let wanted_hosts = args.hosts.unwrap_or(if server { 2 } else { 1 });
    let groups = server && args.host_groups;
    let nodes = match args.nodes {
        Some(n) => n,
        None if groups => (wanted_hosts * args.workers).max(2),
        None => 5,
    };
    let host_count = wanted_hosts.min(nodes);
    // The processes of a host group must name one server address: one proxy per host then.
    let proxy_count = if groups { host_count } else { nodes };
    let mut setup = Setup::new(&args.backend, nodes, proxy_count, args.lease, &args.faults).await?;
    let mut hosts = Vec::new();
    if host_count > 1 {
        for i in 0..host_count {
            let host = SimulatedHost::start(format!("host-{}", i + 1))
                .await
                .map_err(|e| format!("cannot start simulated host {}: {e}", i + 1))?;
            hosts.push(host);
        }
    }
    // One host directory per host: its nodes campaign as one host group.
    let host_dirs: Vec<TempDir> = if groups {
        (0..host_count)
            .map(|i| TempDir::new(&format!("chaos-host-{}", i + 1)))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    setup.skip_host_faults(groups, hosts.len());
    let (bound, bound_what) = match args.bound {
        Some(b) => (b, "set with --bound".to_owned()),
        None => default_bound(&setup),
    };
    let kinds: Vec<FaultKind> = args
        .faults
        .iter()
        .copied()
        .filter(|k| setup.applies(*k))
        .collect();
    let lease_ref = setup.lease.unwrap_or(match setup.kind {
        "postgres" => Duration::from_secs(4),
        _ => Duration::from_secs(2),
    });
    let pace = format!(
        "{}..{}",
        humantime::format_duration(args.pace.0),
        humantime::format_duration(args.pace.1)
    );
    println!(
        "chaos: {}; {} nodes on {}{}; {}; seed {seed}; faults {} every {pace}; witness writes \
         every {}",
        setup.description,
        nodes,
        if hosts.is_empty() {
            "this host".to_owned()
        } else {
            format!("{} simulated hosts (a PID namespace each)", hosts.len())
        },
        if groups {
            ", each host's nodes one host group (a host directory per host)"
        } else {
            ""
        },
        humantime::format_duration(args.duration),
        kinds
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(","),
        humantime::format_duration(args.write_every),
    );
    for (kind, why) in &setup.skipped {
        if args.faults.contains(kind) {
            println!("skipped: {kind}: {why}");
        }
    }

    let witness = Witness::start().await?;
    let lock = format!("chaos-{}", std::process::id());
    let configs: Vec<NodeConfig> = setup
        .node_backends
        .iter()
        .zip(&setup.node_leases)
        .enumerate()
        .map(|(slot, (backend, lease))| {
            // Mixed priorities (1 to 3): the highest ready one leads once it has settled; a
            // `deploy` fault starts a replacement above every node.
            let mut c = NodeConfig::new(backend, &lock)
                .tick(Duration::from_secs(1))
                .witness(witness.addr(), args.write_every)
                .priority(1 + slot as u64 % 3)
                .settle(Duration::from_millis(500));
            if let Some(lease) = lease {
                c = c.lease(*lease);
            }
            // Slot `s` lives on host `s % hosts`, its replacements too.
            if let Some(dir) = host_dirs.get(slot % host_dirs.len().max(1)) {
                c = c.host_dir(dir.path());
            }
            c
        })
        .collect();
    let cluster = Cluster::new(NodeCommand::current_exe()?, configs[0].clone());
    let mut nemesis = Nemesis::new(
        cluster,
        configs,
        hosts,
        seed,
        NemesisConfig {
            kinds,
            pace: args.pace,
            lease_ref,
            exit_timeout: Duration::from_secs(30),
            aim: 0.8,
        },
    );

    let origin = monotonic_nanos();
    nemesis.spawn_all()?;
    nemesis
        .cluster
        .wait_single_primary(Duration::from_secs(60))
        .await?;
    let end = tokio::time::Instant::now() + args.duration;
    tokio::select! {
        r = nemesis.run(&mut setup, end) => r?,
        _ = tokio::signal::ctrl_c() => return Err("interrupted".into()),
    }
    let faults_end = monotonic_nanos();
    for proxy in &setup.proxies {
        proxy.resume(); // every fault heals itself; this only makes sure
    }

    // Liveness: with the faults over, one primary must emerge.
    nemesis.replace_dead()?;
    let recover = Duration::from_secs(30) + 3 * lease_ref;
    let recovered = nemesis
        .cluster
        .wait_single_primary(recover)
        .await
        .map(|(_, term)| (term, (monotonic_nanos() - faults_end) as f64 / 1e9));
    if let Ok((term, _)) = recovered {
        // Let the last primary write, so the run ends with the witness path working.
        let wrote =
            witness.wait_for(|r| r.iter().any(|w| w.term == term && w.verdict.is_accepted()));
        let _ = tokio::time::timeout(Duration::from_secs(5), wrote).await;
    }
    nemesis.cluster.kill_all(Duration::from_secs(10)).await?;
    let end = monotonic_nanos();

    let data = RunData {
        events: nemesis.cluster.events(),
        records: witness.records(),
        faults: nemesis.log.clone(),
        origin,
        end,
        lease: setup.max_lease(),
        faults_end,
        slack: setup.max_lease().unwrap_or(lease_ref) + Duration::from_secs(1),
        bound,
        bound_what,
    };
    let analysis = report::analyse(&data);
    let slot_of_pid: HashMap<String, usize> = nemesis
        .pid_slot
        .iter()
        .map(|(pid, slot)| (pid.to_string(), *slot))
        .collect();
    let slot_name = |pid: &str| {
        slot_of_pid
            .get(pid)
            .map_or_else(|| "?".to_owned(), |s| format!("node {}", s + 1))
    };

    let mut text = report::summary(&data, &analysis);
    match &recovered {
        Ok((_, s)) => text.push_str(&format!(
            "{:<54} yes, {s:.2} s after the last fault\n",
            "one primary after the faults"
        )),
        Err(_) => text.push_str(&format!(
            "{:<54} NO, none within {recover:?} (see liveness.txt)\n",
            "one primary after the faults"
        )),
    }
    for exit in &nemesis.unexpected_exits {
        text.push_str(&format!("unexpected exit (replaced): {exit}\n"));
    }

    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("target")
            .join("chaos")
            .join(format!("{}-seed{seed}", setup.kind))
    });
    std::fs::create_dir_all(&out)?;
    if let Err(e) = &recovered {
        // The wait's report: every event and the last stderr lines of every node.
        std::fs::write(out.join("liveness.txt"), e.to_string())?;
    }
    let mut events = data.events.clone();
    events.sort_by_key(|e| e.at);
    let events: String = events.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(out.join("events.log"), events)?;
    let witness_log: String = data.records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(
        out.join("witness.log"),
        format!(
            "# received_at verdict term checked_at wall_ns deadline node (CLOCK_MONOTONIC ns)\n\
             {witness_log}"
        ),
    )?;
    std::fs::write(
        out.join("periods.txt"),
        report::periods_table(&data, &analysis, &slot_name),
    )?;
    let last = report::last_line(&data, &analysis);
    let title = format!("{} | seed {seed} | {last}", setup.description);
    let svg = out.join("timeline.svg");
    if let Err(e) = svg::draw(&svg, &title, &data, &analysis, nodes, &slot_of_pid) {
        text.push_str(&format!("timeline not drawn: {e}\n"));
    }
    std::fs::write(out.join("summary.txt"), format!("{text}{last}\n"))?;

    println!();
    print!("{text}");
    println!(
        "files: {} (summary.txt, periods.txt, timeline.svg, events.log, witness.log)",
        out.display()
    );
    println!("{last}");
    Ok(!analysis.violated() && recovered.is_ok())
}
