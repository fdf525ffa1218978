//! A rolling deploy of the example service (`examples/scheduler`), measured on every backend.
//!
//! ```text
//! cargo run --release --all-features --example deploy_bench
//! cargo run --release --all-features --example deploy_bench -- --backends file,redis --instances 4 --workers 2
//! ```
//!
//! For each backend — the file backend (one lock folder shared by the instances), Redis,
//! PostgreSQL and etcd (each a server of its own that the lab starts: `redis-server`, a
//! throwaway PostgreSQL cluster, `etcd`) — it starts `--instances` instances of the service with
//! priority 1, each with `--workers` workers and a state folder of its own (a host of its own: on
//! a server backend its workers are one host group), then deploys a new release with surge 1:
//! starts a new instance with priority 2, waits until all its workers answer `/health/ready`,
//! SIGTERMs the oldest old instance (which drains: a primary hands the lock over before it
//! stops) and waits for it to exit; `--instances` times. The baseline row does the same with
//! priority 1 for the new release too.
//!
//! Primary changes are counted from the workers' log lines (`worker startup … primary=true` and
//! `role changed … role=primary`: every term is logged once, by the worker that leads it), from
//! the primary when the deploy starts on. `total` runs from the first new instance's start to
//! the moment a new instance's worker logs its term after the last old instance exited;
//! `handover max` is the longest time from a primary's `handing the lock over` log line to the
//! next `became primary` line (the log lines' timestamps: one host, one clock).
//!
//! The bench re-executes itself as the service (`DEPLOY_BENCH_SERVICE_ARGS`), so one build has
//! everything. A server that cannot be started is reported and its rows skipped.

#[path = "../scheduler/main.rs"]
#[allow(dead_code)]
mod scheduler;
#[path = "../../tests/common/service.rs"]
mod service;

use std::process::ExitCode;

use tower_primary_lab::servers::{EtcdServer, PostgresServer, RedisServer};

use self::service::{Deploy, Launcher, rolling_deploy};

/// Set in the service processes: the service's flags.
const ARGS_ENV: &str = "DEPLOY_BENCH_SERVICE_ARGS";

const USAGE: &str = "usage: deploy_bench [--backends file,redis,postgres,etcd] [--instances N] \
                     [--workers N] [--no-baseline]";

struct Args {
    backends: Vec<String>,
    instances: usize,
    workers: u16,
    baseline: bool,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        backends: ["file", "redis", "postgres", "etcd"]
            .map(str::to_owned)
            .to_vec(),
        instances: 4,
        workers: 2,
        baseline: true,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--backends" => {
                parsed.backends = value()?.split(',').map(str::to_owned).collect();
                if let Some(b) = parsed
                    .backends
                    .iter()
                    .find(|b| !["file", "redis", "postgres", "etcd"].contains(&b.as_str()))
                {
                    return Err(format!("unknown backend {b:?}"));
                }
            }
            "--instances" => {
                parsed.instances = value()?
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or("--instances: a count of 1 or more")?;
            }
            "--workers" => {
                parsed.workers = value()?
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or("--workers: a count of 1 or more")?;
            }
            "--no-baseline" => parsed.baseline = false,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    if let Ok(flags) = std::env::var(ARGS_ENV) {
        let args = scheduler::Args::try_from_flags(flags.split_whitespace())
            .unwrap_or_else(|err| err.exit());
        return match scheduler::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(problem) => {
            eprintln!("deploy_bench: {problem}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(bench(&args))
}

/// A server of the bench's own, kept running while its rows are measured.
enum Server {
    None(tempfile::TempDir),
    Redis(RedisServer),
    Postgres(PostgresServer),
    Etcd(EtcdServer),
}

impl Server {
    async fn start(backend: &str) -> Result<Server, String> {
        Ok(match backend {
            "file" => Server::None(tempfile::tempdir().map_err(|e| e.to_string())?),
            "redis" => Server::Redis(RedisServer::start().await?),
            "postgres" => Server::Postgres(PostgresServer::start().await?),
            "etcd" => Server::Etcd(EtcdServer::start().await?),
            other => return Err(format!("unknown backend {other}")),
        })
    }

    /// The service's backend flags.
    fn flags(&self) -> String {
        match self {
            Server::None(dir) => format!("--backend {}", dir.path().display()),
            // A fresh server makes the first candidate wait the maximum lease (the restart
            // guard): keep it at the lease.
            Server::Redis(s) => format!("--backend {}?max_lease=2000ms --lease 2s", s.url()),
            Server::Postgres(s) => format!("--backend {} --lease 2s", s.url()),
            Server::Etcd(s) => format!("--backend {} --lease 2s", s.url()),
        }
    }
}

fn launcher() -> Box<Launcher> {
    Box::new(|flags: &str| {
        let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
        cmd.env(ARGS_ENV, flags);
        cmd
    })
}

async fn bench(args: &Args) -> ExitCode {
    println!(
        "rolling deploy, surge 1: {} instances x {} workers, each its own state folder (host); \
         old priority 1",
        args.instances, args.workers
    );
    println!("moves counted from the workers' log lines (one line per term led)\n");
    println!(
        "{:<9} {:<9} {:>5} {:>6} {:>6} {:>9} {:>12}  {:<6}  terms (instance:term)",
        "backend", "new prio", "moves", "to new", "to old", "total", "handover max", "final"
    );
    let launch = launcher();
    let mut failed = false;
    for backend in &args.backends {
        let server = match Server::start(backend).await {
            Ok(s) => s,
            Err(e) => {
                println!("{backend:<9} SKIPPED: cannot start the server: {e}");
                failed = true;
                continue;
            }
        };
        let mut rows = vec![2];
        if args.baseline {
            rows.push(1);
        }
        for new in rows {
            let flags = server.flags();
            let d = rolling_deploy(&*launch, &flags, args.instances, args.workers, 1, new).await;
            print_row(backend, new, &d);
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_row(backend: &str, new: u64, d: &Deploy) {
    let terms: Vec<String> = d
        .terms
        .iter()
        .filter(|t| t.0 >= d.first.0)
        .map(|(term, name, _)| format!("{name}:{term}"))
        .collect();
    let gap = d.gaps.iter().max().map_or_else(
        || "-".to_owned(),
        |g| format!("{:.1} ms", g.as_secs_f64() * 1e3),
    );
    println!(
        "{backend:<9} {:<9} {:>5} {:>6} {:>6} {:>9} {gap:>12}  {:<6}  {}",
        format!("1 -> {new}"),
        d.moves,
        d.to_new,
        d.to_old,
        format!("{:.2} s", d.total.as_secs_f64()),
        d.last.1,
        terms.join(" ")
    );
    if std::env::var_os("DEPLOY_BENCH_EVENTS").is_some() {
        for e in &d.events {
            println!("    {e}");
        }
    }
}
