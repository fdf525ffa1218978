//! The supervisor: starts the workers (this program again, with `TOWER_PRIMARY_WORKER=<index>`),
//! restarts any that dies, and on SIGTERM/SIGINT forwards the signal and waits for them all.
//!
//! No sockets are passed: every worker binds `--bind` itself with `SO_REUSEPORT`. The supervisor
//! takes no part in the election.
//!
//! With a server backend it makes its workers one **host group**: each gets
//! `TOWER_PRIMARY_HOST_DIR` ([`HOST_DIR_ENV`]) set to `--host-dir`, by default
//! `<state-dir>/host`, which it creates with mode 0700 (the folder holds the host candidate's
//! resume token). One worker then campaigns on the server for the whole host and the others follow
//! it there. `--no-host-group` leaves the variable out of the workers' environment (removing one
//! the supervisor inherited): every worker campaigns itself. The file backend gets none of it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tower_primary::{BoxError, HOST_DIR_ENV};

use super::Args;
use super::worker::SUPERVISOR_ENV;

/// A worker that lived at least this long is restarted at once; one that died sooner waits a
/// growing delay (a crash loop must not spin).
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);

/// The host group's folder for the workers: `None` for the file backend or with
/// `--no-host-group`; else `--host-dir` or `<state-dir>/host`, created (mode 0700) if missing.
fn host_dir(args: &Args, server_backend: bool) -> std::io::Result<Option<PathBuf>> {
    if !server_backend || args.no_host_group {
        return Ok(None);
    }
    let dir = args
        .host_dir
        .clone()
        .unwrap_or_else(|| args.state_dir.join("host"));
    create_private_dir(&dir)?;
    Ok(Some(dir))
}

/// Creates `dir` readable by this user only (its parents as usual), unless it exists.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

pub(crate) fn main(args: &Args) -> Result<(), BoxError> {
    // One thread: the workers' parent-death signal follows the thread that started them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(supervise(args))
}

struct Worker {
    child: Child,
    pid: u32,
    started: Instant,
    delay: Duration,
}

async fn supervise(args: &Args) -> Result<(), BoxError> {
    let me = std::process::id();
    // Mistakes every worker would make are reported once, here.
    super::worker::check_addresses(args)?;
    let server_backend = if let Some(backend) = args.backend.as_ref().or(args.store.as_ref()) {
        !matches!(
            tower_primary::backend::from_url(backend)?.name(),
            "file" | "memory"
        )
    } else {
        std::fs::create_dir_all(args.state_dir.join("locks"))?;
        false
    };
    let host_dir = host_dir(args, server_backend)?;
    let exe = std::env::current_exe()?;
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let start = |index: usize, delay: Duration| -> std::io::Result<Worker> {
        let mut cmd = Command::new(&exe);
        cmd.args(&argv)
            .env(tower_primary::role::WORKER_ENV, index.to_string())
            .env(SUPERVISOR_ENV, me.to_string())
            .stdin(Stdio::null());
        match &host_dir {
            Some(dir) => cmd.env(HOST_DIR_ENV, dir),
            None if args.no_host_group => cmd.env_remove(HOST_DIR_ENV),
            None => &mut cmd,
        };
        let child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        tracing::info!("worker started worker={index} pid={pid}");
        Ok(Worker {
            child,
            pid,
            started: Instant::now(),
            delay,
        })
    };
    tracing::info!(
        "supervisor started pid={me} workers={} bind={} state_dir={} host_group={}",
        args.workers,
        args.bind,
        args.state_dir.display(),
        host_dir
            .as_ref()
            .map_or_else(|| "off".to_owned(), |d| d.display().to_string())
    );
    let mut workers = (0..args.workers)
        .map(|i| start(i, Duration::ZERO))
        .collect::<Result<Vec<_>, _>>()?;

    let signal = loop {
        let (index, status) = tokio::select! {
            // Signals first: a worker that exits because it got the same signal (systemd, `kill
            // -- -<pgid>`) must not be restarted.
            biased;
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            exited = any_exit(&mut workers) => exited,
        };
        let old = &workers[index];
        let delay = if old.started.elapsed() >= HEALTHY_AFTER {
            Duration::ZERO
        } else {
            (old.delay * 2).clamp(Duration::from_millis(100), MAX_RESTART_DELAY)
        };
        tracing::warn!(
            "worker exited worker={index} pid={} status={}; restarting it{}",
            old.pid,
            describe(&status),
            if delay.is_zero() {
                String::new()
            } else {
                format!(" in {delay:?}")
            }
        );
        if !delay.is_zero() {
            tokio::select! {
                biased;
                _ = sigterm.recv() => break "SIGTERM",
                _ = sigint.recv() => break "SIGINT",
                () = tokio::time::sleep(delay) => {}
            }
        }
        workers[index] = start(index, delay)?;
    };

    tracing::info!(
        "supervisor stopping pid={me} signal={signal}: forwarding SIGTERM to the workers"
    );
    for w in &workers {
        send(&w.child, Signal::SIGTERM);
    }
    // Wait for all of them; a second signal kills what is left. Nothing is restarted any more.
    let mut left: Vec<&mut Worker> = workers.iter_mut().collect();
    let mut killed = false;
    while !left.is_empty() {
        let exited = {
            let waits = left
                .iter_mut()
                .enumerate()
                .map(|(i, w)| Box::pin(async move { (i, w.child.wait().await) }));
            tokio::select! {
                ((i, status), _, _) = futures_util::future::select_all(waits) => Some((i, status)),
                _ = sigterm.recv(), if !killed => None,
                _ = sigint.recv(), if !killed => None,
            }
        };
        match exited {
            Some((i, status)) => {
                let w = left.remove(i);
                tracing::info!("worker stopped pid={} status={}", w.pid, describe(&status));
            }
            None => {
                killed = true;
                tracing::warn!("second signal: killing the workers still running");
                for w in &left {
                    send(&w.child, Signal::SIGKILL);
                }
            }
        }
    }
    tracing::info!("supervisor stopped pid={me}");
    Ok(())
}

/// Waits for any worker to exit; returns its index and status.
async fn any_exit(workers: &mut [Worker]) -> (usize, std::io::Result<ExitStatus>) {
    let waits = workers
        .iter_mut()
        .enumerate()
        .map(|(i, w)| Box::pin(async move { (i, w.child.wait().await) }));
    futures_util::future::select_all(waits).await.0
}

/// Signals a worker that has not been reaped yet (a reaped one's pid may be reused).
fn send(child: &Child, signal: Signal) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit-{code}"),
            (None, Some(sig)) => Signal::try_from(sig)
                .map_or_else(|_| format!("signal-{sig}"), |s| s.as_str().to_owned()),
            (None, None) => "unknown".to_owned(),
        },
        Err(e) => format!("unknown({e})"),
    }
}
