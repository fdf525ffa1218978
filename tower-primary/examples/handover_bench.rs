//! Handover benchmark: a deploy's preferred handover, from the old primary's decision to the
//! successor's first singleton-task line.
//!
//! ```text
//! cargo run --release --all-features --example handover_bench -- [--backends file,redis,postgres,etcd] [--rounds 20]
//! ```
//!
//! For every backend (`file`: locks in a fresh temporary directory; `redis`, `postgres`, `etcd`:
//! a server of the program's own, started by `tower_primary_lab::servers`), the program
//! re-executes itself as election nodes (`tower_primary_lab::node`). A round: the cluster has
//! settled on a primary of priority `p`; a node of priority `p + 1` starts (settle time
//! `--settle`, default 100 ms; handover window 2 s); once it has been ready for the settle time,
//! the primary reserves the lock for it and hands over. Measured: from the old primary's
//! `handing-over` line (the elector's "handing the lock over" log, right after the reservation,
//! on its own `CLOCK_MONOTONIC`) to the successor's `task-start` line. The old node is then
//! stopped (`SIGTERM`), so every round starts with one node.
//!
//! The output is a table per backend of min/p50/p99/max in milliseconds (nearest rank), the time
//! from the new node's start to the decision (its settle time plus registry propagation), the
//! history check of every primary period (no overlap, rising terms; the program fails otherwise)
//! and a final line `handover_p99_ms.<backend>=<v>` per backend. Targets: p99 ≤ 50 ms (etcd
//! ≤ 100 ms).

#[path = "support/node_process.rs"]
mod node_process;

use std::process::ExitCode;
use std::time::Duration;

use tower_primary_lab::node::{Cluster, EventKind, NodeCommand, NodeConfig, NodeSignal};
use tower_primary_lab::servers::{EtcdServer, PostgresServer, RedisServer, TempDir};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: handover_bench [--backends file,redis,postgres,etcd] [--rounds N] \
                     [--settle DURATION] [--lease DURATION]";

/// Bounds a broken round only.
const WAIT: Duration = Duration::from_secs(30);

struct Args {
    backends: Vec<String>,
    rounds: usize,
    settle: Duration,
    lease: Duration,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args {
            backends: ["file", "redis", "postgres", "etcd"]
                .map(str::to_owned)
                .to_vec(),
            rounds: 20,
            settle: Duration::from_millis(100),
            lease: Duration::from_secs(2),
        };
        while let Some(flag) = args.next() {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (flag.clone(), None),
            };
            let value = inline
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?;
            let duration =
                |v: &str| humantime::parse_duration(v).map_err(|e| format!("{name} {v:?}: {e}"));
            match name.as_str() {
                "--backends" => {
                    parsed.backends = value.split(',').map(str::to_owned).collect();
                    if let Some(b) = parsed
                        .backends
                        .iter()
                        .find(|b| !["file", "redis", "postgres", "etcd"].contains(&b.as_str()))
                    {
                        return Err(format!("unknown backend {b:?}\n{USAGE}"));
                    }
                }
                "--rounds" => {
                    parsed.rounds = value
                        .parse()
                        .map_err(|e| format!("--rounds {value:?}: {e}"))?;
                }
                "--settle" => parsed.settle = duration(&value)?,
                "--lease" => parsed.lease = duration(&value)?,
                _ => return Err(format!("unknown flag {name}\n{USAGE}")),
            }
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
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handover_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A backend's server (or directory), kept for the series.
enum Server {
    File(TempDir),
    Redis(RedisServer),
    Postgres(PostgresServer),
    Etcd(EtcdServer),
}

impl Server {
    async fn start(backend: &str) -> Result<Server, BoxError> {
        Ok(match backend {
            "file" => Server::File(TempDir::new("handover-bench")?),
            "redis" => Server::Redis(RedisServer::start().await?),
            "postgres" => Server::Postgres(PostgresServer::start().await?),
            _ => Server::Etcd(EtcdServer::start().await?),
        })
    }

    /// The backend string; on Redis with `max_lease` = the lease, so that a fresh server's
    /// restart guard waits one lease, not the default maximum.
    fn url(&self, lease: Duration) -> String {
        match self {
            Server::File(dir) => dir.path().display().to_string(),
            Server::Redis(s) => format!("{}?max_lease={}ms", s.url(), lease.as_millis()),
            Server::Postgres(s) => format!("{}?namespace=handover", s.url()),
            Server::Etcd(s) => s.url(),
        }
    }
}

struct Series {
    backend: String,
    /// Decision → the successor's task start, ms.
    handover: Vec<f64>,
    /// The new node's spawn → the decision, ms.
    to_decision: Vec<f64>,
    overlaps: usize,
}

async fn run(args: Args) -> Result<(), BoxError> {
    let mut all = Vec::new();
    for backend in &args.backends {
        all.push(run_backend(&args, backend).await?);
    }
    println!();
    println!(
        "handover: decision (old primary's handing-over line) -> successor's first task line, ms; \
         {} rounds per backend, settle {}",
        args.rounds,
        humantime::format_duration(args.settle)
    );
    println!(
        "{:<9} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>16} {:>8}",
        "backend", "rounds", "min", "p50", "p99", "max", "start->decision", "overlaps"
    );
    for s in &all {
        println!(
            "{:<9} {:>7} {:>7.2} {:>7.2} {:>7.2} {:>7.2} | {:>16.1} {:>8}",
            s.backend,
            s.handover.len(),
            pct(&s.handover, 0.0),
            pct(&s.handover, 0.5),
            pct(&s.handover, 0.99),
            pct(&s.handover, 1.0),
            pct(&s.to_decision, 0.5),
            s.overlaps
        );
    }
    println!("load average: {}", load_average());
    for s in &all {
        println!(
            "handover_p99_ms.{}={:.2}",
            s.backend,
            pct(&s.handover, 0.99)
        );
    }
    if all.iter().any(|s| s.overlaps > 0) {
        return Err("the history of primary periods has overlaps".into());
    }
    Ok(())
}

async fn run_backend(args: &Args, backend: &str) -> Result<Series, BoxError> {
    let server = Server::start(backend).await?;
    let lock = format!("handover-bench-{}", std::process::id());
    let config = NodeConfig::new(server.url(args.lease), lock)
        .lease(args.lease)
        .settle(args.settle)
        .handover_window(Duration::from_secs(2));
    let mut cluster = Cluster::new(NodeCommand::current_exe()?, config.clone());
    let mut priority = 1;
    let mut old = cluster.spawn_node_with(&config.clone().priority(priority))?;
    let mut series = Series {
        backend: backend.to_owned(),
        handover: Vec::new(),
        to_decision: Vec::new(),
        overlaps: 0,
    };
    eprint!("{backend}: ");
    for round in 0..args.rounds {
        let (primary, term) = cluster.wait_settled(WAIT).await?;
        if primary != old {
            return Err(format!("round {round}: pid {primary} leads, not pid {old}").into());
        }
        priority += 1;
        let new = cluster.spawn_node_with(&config.clone().priority(priority))?;
        let spawned = cluster
            .wait_event("the new node spawned", WAIT, |e| {
                e.pid == new && matches!(e.kind, EventKind::Spawned)
            })
            .await?
            .at;
        let decided = cluster
            .wait_event("the old primary's decision", WAIT, |e| {
                e.pid == old
                    && matches!(e.kind, EventKind::HandingOver { term: t, .. } if t == term)
            })
            .await?;
        let started = cluster.wait_task_start_after(term, old, WAIT).await?;
        if started.pid != new {
            return Err(format!(
                "round {round}: pid {} took over, not the new node {new}\n{}",
                started.pid,
                cluster.dump()
            )
            .into());
        }
        series.handover.push(ms(decided.at, started.at));
        series.to_decision.push(ms(spawned, decided.at));
        cluster.signal(old, NodeSignal::Term).await?;
        cluster.wait_exit(old, WAIT).await?;
        old = new;
        eprint!(".");
    }
    eprintln!();
    series.overlaps = cluster.history().check().overlaps.len();
    cluster.kill_all(WAIT).await?;
    drop(server);
    Ok(series)
}

#[allow(clippy::cast_precision_loss)]
fn ms(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}

/// The nearest-rank percentile `q` (0 = min, 1 = max) of `values`.
fn pct(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}
