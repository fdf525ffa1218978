//! Who is primary, at a glance: prints a lock's holder, term and since, checks that the holder's
//! process is alive when it runs on this host, lists the lock's candidate registry (node,
//! priority, ready, draining, yielded; the holder's entry marked `*`), and follows changes of
//! the holder and of the registry with `--watch`.
//!
//! ```text
//! cargo run --example status -- --backend /run/myapp --lock report-scheduler
//! cargo run --example status --features redis -- --backend redis://127.0.0.1:6379 --lock jobs --watch
//! ```
//!
//! `--backend` takes a backend string (a directory, `file:///dir`, `redis://…`,
//! `postgres://…`, `etcd://…`, with the backend's feature on); without it,
//! `TOWER_PRIMARY_BACKEND`. It reads the holder record and the registry only: it never takes the
//! lock and never registers.

mod probe;

use std::process::ExitCode;
use std::time::Duration;

use tower_primary::backend;

const USAGE: &str = "usage: status --backend <backend string> --lock <name> [--watch]";

struct Args {
    backend: String,
    lock: String,
    watch: bool,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut backend = std::env::var(backend::BACKEND_ENV).ok();
    let mut lock = None;
    let mut watch = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => backend = Some(args.next().ok_or("--backend needs a value")?),
            "--lock" => lock = Some(args.next().ok_or("--lock needs a value")?),
            "--watch" => watch = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        backend: backend.ok_or("--backend (or TOWER_PRIMARY_BACKEND) is required")?,
        lock: lock.ok_or("--lock is required")?,
        watch,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(problem) => {
            if !problem.is_empty() {
                eprintln!("status: {problem}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let lock = match backend::from_url(&args.backend).and_then(|b| b.lock(&args.lock)) {
        Ok(lock) => lock,
        Err(err) => {
            eprintln!("status: {err}");
            return ExitCode::from(2);
        }
    };
    let res = if args.watch {
        let follow = probe::follow(&*lock, &args.lock, Duration::from_secs(1), |status| {
            println!(
                "--- {}",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            );
            print!("{status}");
            true
        });
        tokio::select! {
            res = follow => res,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    } else {
        probe::probe(&*lock, &args.lock)
            .await
            .map(|status| print!("{status}"))
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("status: {err}");
            ExitCode::FAILURE
        }
    }
}
