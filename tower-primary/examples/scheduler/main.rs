//! An email sender and a daily report that run **once**, however many workers serve the app.
//!
//! ```text
//! cargo run --release --example scheduler -- --workers 4 --bind 127.0.0.1:8080 --state-dir ./state
//! ```
//!
//! A small supervisor starts `--workers` copies of this program (re-executing itself with
//! `TOWER_PRIMARY_WORKER=<index>`), restarts any that dies, and on SIGTERM/Ctrl-C forwards the
//! signal and waits for all of them (a second signal kills them). Every worker binds `--bind`
//! itself with `SO_REUSEPORT`, so the kernel spreads connections over the workers (any process
//! of the same user can join the port that way: a second copy started by mistake shares the
//! traffic; with the same `--state-dir` it only adds workers to the election), and every
//! worker campaigns for the lock `scheduler` (by default the file backend in
//! `<state-dir>/locks`: no server to install). The one that holds it is the **primary**:
//!
//! - it runs the **email sender**: every email queued into `<state-dir>/outbox/` (by any worker)
//!   is built with lettre, with a Message-ID derived from its id and an `X-Primary-Term` header,
//!   written atomically to `<state-dir>/sent/<id>.eml` (or sent with `--smtp`), recorded in
//!   `<state-dir>/deliveries.log` as `<id> term=<t> pid=<p> message-id=<…>`, then removed from
//!   the outbox;
//! - it runs the **daily report** (cron `0 0 8 * * *` UTC, or `--report-every 1m`): it writes
//!   `<state-dir>/reports/<slot>.txt` and appends `report <slot> term=<t> pid=<p> start=<ns>
//!   end=<ns>` to `<state-dir>/runs.log`. Slots missed while no primary ran (a failover, all
//!   workers down) are caught up oldest first, up to `--catch-up` of them;
//! - it runs the **migration** (a run-once job that prepares the state folders) before any of
//!   that; every worker's `/health/ready` answers 503 until it is done.
//!
//! Neither job is exactly-once: a primary killed mid-job leaves it half done and the next one
//! runs it again. The report is idempotent (a slot already in `runs.log` is not written again);
//! an email interrupted after delivery and before leaving the outbox is delivered again, with the
//! same Message-ID, so the receiving side can drop the copy.
//!
//! # HTTP
//!
//! | route | on | what |
//! |---|---|---|
//! | `GET /` | every worker | this worker, its role, the routes |
//! | `GET /health/role` | every worker | role, term and holder as JSON (always 200) |
//! | `GET /health/live` | every worker | 503 when the elector's loop is stuck (a liveness probe) |
//! | `GET /health/ready` | every worker | 503 until the migration is done, then 200 |
//! | `POST /emails` | every worker | `{"to","subject","body"}` → 202 `{"id"}`; bad JSON or address → 400 |
//! | `POST /admin/report-now` | the primary | queues a report run (its slot is now) → 202 |
//! | `GET /admin/status` | the primary | outbox, sent, last report slot, term |
//!
//! On a secondary, admin routes are forwarded to the primary (`--admin-mode forward`, the
//! default: every worker also listens on an internal port of its own, `BASE + index` with
//! `--worker-ports BASE` or else a free loopback port, and advertises it), or answered 307 to the
//! primary's own port (`--admin-mode redirect`, with `--worker-ports`; `curl -L` follows it), or
//! 503 (`--admin-mode refuse`).
//!
//! # Flags
//!
//! `--workers N` (default: number of CPUs; 1 runs in this process, without a supervisor),
//! `--bind ADDR` (default `127.0.0.1:8080`), `--state-dir DIR` (default `./state`),
//! `--backend STRING` (a backend string such as `redis://…`; default: the file backend in
//! `<state-dir>/locks`), `--host-dir DIR` and `--no-host-group` (a server backend's host group,
//! below), `--lease DURATION` (lease backends), `--report-every DURATION`,
//! `--catch-up N` (default 24; 0 skips missed slots), `--smtp URL` (send instead of writing
//! `sent/`: `smtp://127.0.0.1:2525` in plain text, `smtp://user:pass@host:587?tls=required` with
//! STARTTLS, `smtps://user:pass@host` over TLS; rustls, no OpenSSL), `--worker-ports BASE`,
//! `--admin-mode refuse|redirect|forward` (default `forward`),
//! `--simulate-work DURATION` (each report and each email send also takes this long — for a
//! send, half before delivering and half between recording the delivery and removing the email
//! from the outbox, the window in which a crash makes it go out twice — to watch a failover land
//! mid-job). Logs go to stdout (`RUST_LOG` filters them).
//!
//! # Watch it fail over
//!
//! `curl -s 127.0.0.1:8080/health/role` names the primary's pid; `kill -9` it. Another worker
//! logs `role changed … role=primary` within milliseconds with a higher term, carries on with the
//! outbox and the report, and the supervisor restarts the killed worker as a secondary.
//!
//! # One candidate per host
//!
//! With a server backend (`--backend redis://…`, `postgres://…`, `etcd://…`) the supervisor
//! gives its workers `TOWER_PRIMARY_HOST_DIR=<state-dir>/host` (created with mode 0700), so
//! that they campaign as one **host group**: one worker, the host candidate, talks to the server
//! for the lock; the others follow it through that folder and make no backend calls for the
//! lock, and when the candidate dies the next one takes over its lease. `--host-dir DIR` chooses
//! another folder (every process of the host that shares it joins the group), `--no-host-group`
//! turns it off (every worker campaigns on the server itself). The file backend needs none of it:
//! its lock already lives on this host.
//!
//! This example is **single-host**: the outbox and the file lock are local folders (a shared
//! volume works for the outbox; use `--backend redis://…` or another server backend to spread the
//! lock over hosts).

pub(crate) mod email;
mod report;
mod supervisor;
mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tower_primary::BoxError;

const USAGE: &str = "usage: scheduler [--workers N] [--bind ADDR] [--state-dir DIR] \
    [--backend STRING] [--host-dir DIR | --no-host-group] [--lease DURATION] \
    [--report-every DURATION] [--catch-up N] [--smtp URL] [--worker-ports BASE] \
    [--admin-mode refuse|redirect|forward] [--simulate-work DURATION]";

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("scheduler: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Runs this process's part: a worker when `TOWER_PRIMARY_WORKER` is set (the supervisor sets
/// it; so can another process manager) or with `--workers 1`, else the supervisor.
pub(crate) fn run(args: &Args) -> Result<(), BoxError> {
    init_logs();
    let worker = std::env::var(tower_primary::role::WORKER_ENV)
        .ok()
        .and_then(|w| w.trim().parse::<u16>().ok());
    let result = match worker {
        Some(index) => worker::main(Some(index), args),
        None if args.workers == 1 => worker::main(None, args),
        None => supervisor::main(args),
    };
    if let Err(err) = &result {
        tracing::error!("exiting pid={} error={err}", std::process::id());
    }
    result
}

fn init_logs() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal())
        .try_init();
}

/// The command line.
#[derive(Clone, Debug)]
pub(crate) struct Args {
    workers: usize,
    bind: SocketAddr,
    state_dir: PathBuf,
    backend: Option<String>,
    /// `--host-dir`: the host group's folder (server backends; default `<state-dir>/host`).
    host_dir: Option<PathBuf>,
    /// `--no-host-group`: every worker campaigns on the server itself.
    no_host_group: bool,
    lease: Option<Duration>,
    report_every: Option<Duration>,
    catch_up: usize,
    smtp: Option<String>,
    worker_ports: Option<u16>,
    /// `--admin-mode`: what a secondary answers on the admin routes.
    admin_mode: AdminMode,
    simulate_work: Duration,
}

/// `--admin-mode`: 503, 307 to the primary, or the request forwarded to the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AdminMode {
    Refuse,
    Redirect,
    Forward,
}

impl Args {
    /// Parses flags (`--flag value` or `--flag=value`); `Ok(None)` for `--help`.
    pub(crate) fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>, String> {
        let mut parsed = Args {
            workers: std::thread::available_parallelism().map_or(2, usize::from),
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            state_dir: PathBuf::from("./state"),
            backend: None,
            host_dir: None,
            no_host_group: false,
            lease: None,
            report_every: None,
            catch_up: 24,
            smtp: None,
            worker_ports: None,
            admin_mode: AdminMode::Forward,
            simulate_work: Duration::ZERO,
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg, None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            let duration =
                |v: String| humantime::parse_duration(&v).map_err(|e| format!("{flag} {v:?}: {e}"));
            match flag.as_str() {
                "--workers" => {
                    parsed.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?;
                }
                "--bind" => {
                    let v = value()?;
                    parsed.bind = v.parse().map_err(|e| format!("--bind {v:?}: {e}"))?;
                }
                "--state-dir" => parsed.state_dir = PathBuf::from(value()?),
                "--backend" => parsed.backend = Some(value()?),
                "--host-dir" => parsed.host_dir = Some(PathBuf::from(value()?)),
                "--no-host-group" => parsed.no_host_group = true,
                "--lease" => parsed.lease = Some(duration(value()?)?),
                "--report-every" => parsed.report_every = Some(duration(value()?)?),
                "--catch-up" => {
                    parsed.catch_up = value()?.parse().map_err(|e| format!("--catch-up: {e}"))?;
                }
                "--smtp" => parsed.smtp = Some(value()?),
                "--worker-ports" => {
                    parsed.worker_ports = Some(
                        value()?
                            .parse()
                            .map_err(|e| format!("--worker-ports: {e}"))?,
                    );
                }
                "--admin-mode" => {
                    parsed.admin_mode = match value()?.as_str() {
                        "refuse" => AdminMode::Refuse,
                        "redirect" => AdminMode::Redirect,
                        "forward" => AdminMode::Forward,
                        other => {
                            return Err(format!(
                                "--admin-mode {other:?}: refuse, redirect or forward"
                            ));
                        }
                    };
                }
                "--simulate-work" => parsed.simulate_work = duration(value()?)?,
                "-h" | "--help" => return Ok(None),
                other => return Err(format!("unknown flag {other}")),
            }
        }
        if parsed.workers == 0 {
            return Err("--workers must be at least 1".to_owned());
        }
        if parsed.no_host_group && parsed.host_dir.is_some() {
            return Err("--host-dir and --no-host-group exclude each other".to_owned());
        }
        if let Some(base) = parsed.worker_ports {
            let last = usize::from(base) + parsed.workers - 1;
            if base == 0 || last > usize::from(u16::MAX) {
                return Err(format!(
                    "--worker-ports {base}: ports {base}..={last} are not all valid ports"
                ));
            }
        }
        Ok(Some(parsed))
    }
}

/// The files under `--state-dir`.
#[derive(Clone, Debug)]
pub(crate) struct Dirs {
    root: PathBuf,
}

impl Dirs {
    pub(crate) fn new(root: &Path) -> Self {
        Dirs {
            root: root.to_owned(),
        }
    }
    /// The file backend's lock directory (unless `--backend` says otherwise).
    pub(crate) fn locks(&self) -> PathBuf {
        self.root.join("locks")
    }
    /// Queued emails, `<id>.json`.
    pub(crate) fn outbox(&self) -> PathBuf {
        self.root.join("outbox")
    }
    /// Delivered emails, `<id>.eml`.
    pub(crate) fn sent(&self) -> PathBuf {
        self.root.join("sent")
    }
    /// Emails the SMTP server refused for good, or that could not be read.
    pub(crate) fn failed(&self) -> PathBuf {
        self.root.join("failed")
    }
    /// Reports, `<slot>.txt`.
    pub(crate) fn reports(&self) -> PathBuf {
        self.root.join("reports")
    }
    /// One line per delivery.
    pub(crate) fn deliveries_log(&self) -> PathBuf {
        self.root.join("deliveries.log")
    }
    /// One line per completed report run.
    pub(crate) fn runs_log(&self) -> PathBuf {
        self.root.join("runs.log")
    }
}

/// Writes `contents` to `path` atomically: readers see the old file or the whole new one, and a
/// process killed mid-write leaves only a `.tmp-` file behind.
async fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other("a file name"))?;
    let tmp = path.with_file_name(format!(".tmp-{}-{name}", std::process::id()));
    tokio::fs::write(&tmp, contents).await?;
    tokio::fs::rename(&tmp, path).await
}

/// Removes the `.tmp-` files a killed writer left in `dir`. Call it only where this process is
/// the folder's one writer (the primary, for `sent/` and `reports/`).
async fn remove_stale_tmp(dir: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(e)) = entries.next_entry().await {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
    }
}

/// Appends one line with one `write`, so a killed process leaves whole lines only.
async fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    file.write_all(format!("{line}\n").as_bytes()).await
}

/// Nanoseconds since the Unix epoch (wall clock; comparable between the workers of one host).
fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::Args;

    fn parse(s: &str) -> Result<Option<Args>, String> {
        Args::parse(s.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn flags_parse_and_mistakes_are_named() {
        let a = parse("--workers 4 --bind=127.0.0.1:9000 --report-every 1s --worker-ports 9100")
            .unwrap()
            .unwrap();
        assert_eq!(a.workers, 4);
        assert_eq!(a.bind.port(), 9000);
        assert_eq!(a.report_every, Some(std::time::Duration::from_secs(1)));
        assert_eq!(a.worker_ports, Some(9100));
        assert!(parse("--help").unwrap().is_none());
        assert!(parse("--workers 0").unwrap_err().contains("at least 1"));
        assert!(parse("--lease soon").unwrap_err().contains("--lease"));
        assert!(parse("--worker-ports 65535 --workers 2").is_err());
        assert!(parse("--frobnicate").unwrap_err().contains("--frobnicate"));
        assert_eq!(a.admin_mode, super::AdminMode::Forward, "the default");
        let mode = |s| parse(s).unwrap().unwrap().admin_mode;
        assert_eq!(mode("--admin-mode redirect"), super::AdminMode::Redirect);
        assert_eq!(mode("--admin-mode=refuse"), super::AdminMode::Refuse);
        assert!(
            parse("--admin-mode proxy")
                .unwrap_err()
                .contains("--admin-mode")
        );
        let a = parse("--host-dir /run/app/host").unwrap().unwrap();
        assert_eq!(
            a.host_dir.as_deref(),
            Some(std::path::Path::new("/run/app/host"))
        );
        assert!(parse("--no-host-group").unwrap().unwrap().no_host_group);
        assert!(
            parse("--no-host-group --host-dir /x")
                .unwrap_err()
                .contains("exclude")
        );
    }
}
