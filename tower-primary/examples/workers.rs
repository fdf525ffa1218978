//! N worker processes, one primary: the smallest service that shows what tower-primary does.
//!
//! ```text
//! cargo run --example workers -- --workers 4 --state-dir ./state
//! cargo run --features redis --example workers -- --workers 4 --backend redis://127.0.0.1:6379 --lease 2s
//! ```
//!
//! The supervisor starts `--workers` copies of itself. Every worker campaigns for the lock
//! `ticker` in `<state-dir>/locks` (the file backend: no server needed); the primary runs a
//! singleton task that prints a tick every second with its term. Kill the primary (`kill -9 <pid>`
//! of the worker that ticks) and another worker ticks within milliseconds, with a higher term; the
//! supervisor restarts the dead worker as a secondary. Ctrl-C (or SIGTERM to the supervisor) stops
//! every worker gracefully: the primary hands over before it exits.
//!
//! `--backend` takes any backend string (`redis://…`, `postgres://…`, `etcd://…` with
//! the matching Cargo feature) instead of the file backend, and `--lease` the lease of lease
//! backends; with a lease backend a killed primary is succeeded after its lease runs out.
//!
//! With a server backend the workers are one **host group**: the supervisor sets
//! `TOWER_PRIMARY_HOST_DIR=<state-dir>/host` (created with mode 0700) in their environment, so
//! one worker campaigns on the server for all of them and the others follow it through that
//! folder; when that worker is killed, the next one resumes its lease at once instead of waiting
//! for it to run out. `--host-dir DIR` chooses the folder, `--no-host-group` turns it off (every
//! worker then campaigns on the server). The file backend needs no host group.
//!
//! ```text
//! cargo run --features redis --example workers -- --workers 4 --backend redis://127.0.0.1:6379 --no-host-group
//! ```

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tower_primary::backend::Backend;
use tower_primary::{Elector, FileBackend, HOST_DIR_ENV, Lease, NodeId, Role, terminate_signal};

const WORKER_FLAG: &str = "--worker";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse()?;
    match args.worker {
        Some(index) => worker(index, &args).await,
        None => supervise(&args).await,
    }
}

struct Args {
    workers: usize,
    state_dir: PathBuf,
    backend: Option<String>,
    lease: Option<Duration>,
    host_dir: Option<PathBuf>,
    no_host_group: bool,
    worker: Option<u32>,
}

impl Args {
    fn parse() -> Result<Self, String> {
        let mut args = Args {
            workers: std::thread::available_parallelism().map_or(2, usize::from),
            state_dir: PathBuf::from("./state"),
            backend: None,
            lease: None,
            host_dir: None,
            no_host_group: false,
            worker: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or(format!("{flag} needs a value"));
            match flag.as_str() {
                "--workers" => {
                    args.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?;
                }
                "--state-dir" => args.state_dir = PathBuf::from(value()?),
                "--backend" => args.backend = Some(value()?),
                "--host-dir" => args.host_dir = Some(PathBuf::from(value()?)),
                "--no-host-group" => args.no_host_group = true,
                "--lease" => {
                    let v = value()?;
                    let lease =
                        humantime::parse_duration(&v).map_err(|e| format!("--lease: {e}"))?;
                    args.lease = Some(lease);
                }
                WORKER_FLAG => {
                    args.worker = Some(value()?.parse().map_err(|e| format!("--worker: {e}"))?);
                }
                "-h" | "--help" => {
                    println!(
                        "usage: workers [--workers N] [--state-dir DIR] [--backend STRING] \
                         [--host-dir DIR | --no-host-group] [--lease DURATION]"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown flag {other}")),
            }
        }
        if args.workers == 0 {
            return Err("--workers must be at least 1".to_owned());
        }
        if args.no_host_group && args.host_dir.is_some() {
            return Err("--host-dir and --no-host-group exclude each other".to_owned());
        }
        Ok(args)
    }
}

async fn supervise(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let locks = args.state_dir.join("locks");
    if args.backend.is_none() {
        std::fs::create_dir_all(&locks)?;
    }
    // A server backend's workers campaign as one host group, unless told not to.
    let host_dir = match &args.backend {
        Some(s) if !args.no_host_group => {
            let server = !matches!(
                tower_primary::backend::from_url(s)?.name(),
                "file" | "memory"
            );
            let dir = args
                .host_dir
                .clone()
                .unwrap_or_else(|| args.state_dir.join("host"));
            if server {
                // The folder readable by this user only (its parents as usual).
                use std::os::unix::fs::DirBuilderExt as _;
                if let Some(parent) = dir.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    other => other?,
                }
            }
            server.then_some(dir)
        }
        _ => None,
    };
    let exe = std::env::current_exe()?;
    let spawn = |index: usize| -> std::io::Result<Child> {
        let mut cmd = Command::new(&exe);
        cmd.arg("--state-dir").arg(&args.state_dir);
        if let Some(backend) = &args.backend {
            cmd.arg("--backend").arg(backend);
        }
        if let Some(lease) = args.lease {
            cmd.arg("--lease")
                .arg(humantime::format_duration(lease).to_string());
        }
        match &host_dir {
            Some(dir) => cmd.env(HOST_DIR_ENV, dir),
            None if args.no_host_group => cmd.env_remove(HOST_DIR_ENV),
            None => &mut cmd,
        };
        cmd.arg(WORKER_FLAG)
            .arg(index.to_string())
            .env(tower_primary::role::WORKER_ENV, index.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
    };
    let mut children = (0..args.workers)
        .map(spawn)
        .collect::<Result<Vec<_>, _>>()?;
    tracing::info!(
        workers = args.workers,
        locks = %locks.display(),
        host_group = %host_dir.as_ref().map_or_else(|| "off".to_owned(), |d| d.display().to_string()),
        "supervisor started"
    );
    let stop = terminate_signal();
    tokio::pin!(stop);
    loop {
        let exited = any_exit(&mut children);
        tokio::select! {
            () = &mut stop => break,
            (index, status) = exited => {
                tracing::warn!(worker = index, ?status, "worker exited; restarting it");
                children[index] = spawn(index)?;
            }
        }
    }
    tracing::info!("stopping workers");
    for child in &children {
        if let Some(pid) = child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
    for child in &mut children {
        let _ = child.wait().await;
    }
    Ok(())
}

/// Waits for any child to exit; returns its index and status.
async fn any_exit(children: &mut [Child]) -> (usize, std::io::Result<std::process::ExitStatus>) {
    let waits = children
        .iter_mut()
        .enumerate()
        .map(|(i, c)| Box::pin(async move { (i, c.wait().await) }));
    futures_util::future::select_all(waits).await.0
}

async fn worker(index: u32, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let backend: Box<dyn Backend> = match &args.backend {
        Some(s) => tower_primary::backend::from_url(s)?,
        None => Box::new(FileBackend::new(args.state_dir.join("locks"))),
    };
    let mut builder = Elector::builder("ticker")
        .backend(backend)
        .node(NodeId::from_env())
        .grace(Duration::from_secs(2));
    if let Some(lease) = args.lease {
        builder = builder.lease(Lease::new(lease));
    }
    let elector = builder.spawn()?;
    let pid = std::process::id();
    elector.singleton_task("tick", move |ctx| async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        while ctx.is_valid() {
            tokio::select! {
                _ = every.tick() => println!("tick from worker {index} (pid {pid}) in term {}", ctx.term()),
                () = ctx.cancelled() => break,
            }
        }
        Ok::<_, std::convert::Infallible>(())
    });
    let mut role = elector.handle();
    tokio::spawn(async move {
        loop {
            match role.changed().await {
                Role::Primary { term, .. } => tracing::info!(worker = index, pid, term, "primary"),
                Role::Secondary { holder } => tracing::info!(
                    worker = index,
                    pid,
                    holder = holder.as_ref().map(|h| h.id.as_str()),
                    "secondary"
                ),
                Role::Starting => {}
            }
        }
    });
    elector.shutdown_signal(terminate_signal()).await;
    tracing::info!(worker = index, pid, "worker stopped");
    Ok(())
}
