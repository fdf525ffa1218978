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
//! - it runs the **migration** (a run-once job: nothing left to do for the folders, which every
//!   process makes at start-up; the versioned tables with `--store`) before any of that; every
//!   worker's `/health/ready` answers 503 until it is done, and while its store cannot be used.
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
//! | `GET /health/ready` | every worker | 200 when the store answers, the migration is done and the registry lists this worker ready, else 503 |
//! | `GET /metrics` | every worker | this worker's metrics, Prometheus text (below) |
//! | `POST /emails` | every worker | `{"to","subject","body"}` → 202 `{"id"}`; bad JSON or address → 400; store down → 503 |
//! | `POST /admin/report-now` | the primary | queues a report run (its slot is now) → 202 |
//! | `GET /admin/status` | the primary | outbox, sent, last report slot, term, its registry entry and the candidates |
//! | `POST /admin/hand-over?node=<id>` | the primary | hands the lock to that candidate → 202; unknown node → 404; not ready, draining or the primary itself → 409; no node → 400; JSON `{"error","node","message"}` |
//!
//! On a secondary, admin routes are forwarded to the primary (`--admin-mode forward`, the
//! default: every worker also listens on an internal port of its own, `BASE + index` with
//! `--worker-ports BASE` or else a free loopback port, and advertises it), or answered 307 to the
//! primary's own port (`--admin-mode redirect`, with `--worker-ports`; `curl -L` follows it), or
//! 503 (`--admin-mode refuse`).
//!
//! `/metrics` shows what the library records with its `metrics` feature (the example requires
//! it), through the `metrics-exporter-prometheus` recorder each worker installs:
//! `tower_primary_is_primary{lock="scheduler"}` (1 on the primary, 0 elsewhere),
//! `tower_primary_term` (the term this worker knows: its own while primary, else the holder's),
//! `tower_primary_transitions_total{reason}`, the acquire and renew latencies, the singleton
//! task's and the report schedule's counters; and the example's own per-worker counters
//! `scheduler_emails_accepted_total`, `scheduler_emails_sent_total` and
//! `scheduler_reports_written_total`. Scrape every worker's own port (`--worker-ports`): the
//! shared port lands on any one of them.
//!
//! # Flags
//!
//! Parsed with clap (`--help` lists them with their docs; a mistake exits 2 naming the flag).
//! `--workers N` (default: number of CPUs; 1 runs in this process, without a supervisor),
//! `--bind ADDR` (default `127.0.0.1:8080`), `--state-dir DIR` (default `./state`),
//! `--backend STRING` (a backend string such as `redis://…`; default: the store's PostgreSQL with
//! `--store`, else the file backend in `<state-dir>/locks`), `--store postgres://…` (below), `--host-dir DIR` and `--no-host-group` (a server backend's host group,
//! below), `--lease DURATION` (lease backends), `--report-every DURATION`,
//! `--catch-up N` (default 24; 0 skips missed slots), `--smtp URL` (send instead of writing
//! `sent/`: `smtp://127.0.0.1:2525` in plain text, `smtp://user:pass@host:587?tls=required` with
//! STARTTLS, `smtps://user:pass@host` over TLS; rustls, no OpenSSL), `--worker-ports BASE`,
//! `--admin-mode refuse|redirect|forward` (default `forward`),
//! `--simulate-work DURATION` (each report and each email send also takes this long — for a
//! send, half before delivering and half between recording the delivery and removing the email
//! from the outbox, the window in which a crash makes it go out twice — to watch a failover land
//! mid-job), `--priority N` (default: `TOWER_PRIMARY_PRIORITY`, else 0), `--never-lead`,
//! `--drain-timeout DURATION` (default 10 s; below). Durations are humantime: `500ms`, `10s`,
//! `1m 30s`. Logs go to stdout (`RUST_LOG` filters them).
//!
//! # Rolling deploys
//!
//! Start the new release with a higher `--priority` (a build number, a deploy counter; or
//! `TOWER_PRIMARY_PRIORITY` in the environment, which the workers inherit). Each worker is a
//! candidate of the lock's registry, ready once it can serve: `/health/ready` answers 200 only
//! once the migration is done, it listens, and it reads its own entry back from the registry as
//! ready (at most 3 s after that: a backend without a registry lists nobody; in a host group a
//! member that is not the group's candidate waits for a ready entry of at least its priority).
//! The primary hands the lock to a ready higher-priority candidate once it has been ready for the
//! settle time (1 s): the primary moves once per deploy, to the new release. On SIGTERM a worker
//! drains (`Elector::drain`, bounded by `--drain-timeout`): it never leads again, and if it is
//! primary it first waits (at most 1 s) until the registry shows its sibling workers draining
//! too; then, if the registry lists another ready candidate, it hands the lock to the best one,
//! and shuts down as before (releasing the lock if nobody took it in time; with no candidate,
//! say when the whole service stops, at once). It logs `worker drained pid=… was_primary=…
//! successor=… handed_over=… took_ms=…`. `--never-lead` serves requests and never leads.
//! `POST /admin/hand-over?node=<id>` (ids: `node.id` in `/health/role`, `candidates` in
//! `/admin/status`) moves the lock by hand; the old primary then counts as having yielded and
//! is not handed the lock back for its priority until it leads again.
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
//! # Across hosts: `--store postgres://…`
//!
//! By default the outbox and the records are local folders (one host). With `--store
//! postgres://…[?schema=NAME]` they are tables of their own schema (default `scheduler`) that every
//! host shares: any worker of any host queues, the primary's sender wakes on `NOTIFY`, and every
//! write of the primary's jobs runs in a transaction that first advances a guard row with its
//! term (`UPDATE fence SET term = $1 WHERE term <= $1`; 0 rows: a newer primary has written, the
//! job stops and logs `fence refused …`). See `store/postgres.rs`. `--store` needs a server
//! backend (the file lock is per host): without `--backend` the lock lives in the same
//! PostgreSQL; `--backend` naming a file lock is refused (exit code 2).
//!
//! Test hook: with `SCHEDULER_TEST_PAUSE_IN_FENCE=<file>`, the primary's sender that finds
//! `<file>` removes it, logs `fence paused id=… term=… pid=…` inside its next fenced transaction
//! and waits there until its term ends (the tests stop it at that point).

pub(crate) mod email;
mod prometheus;
mod report;
pub(crate) mod store;
mod supervisor;
mod worker;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::RangedU64ValueParser;
use clap::error::ErrorKind;
use clap::{CommandFactory as _, Parser};
use tower_primary::BoxError;

fn main() -> ExitCode {
    // A mistake exits 2 with clap's message; `--help` exits 0.
    let args = Args::from_command_line();
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

/// An email sender and a daily report that run once, however many workers serve the app.
///
/// A supervisor starts `--workers` copies of this program on one `--bind` address; the one that
/// holds the lock `scheduler` (the primary) sends the emails and writes the reports. Logs go to
/// stdout (`RUST_LOG` filters them). `GET /` on any worker lists the HTTP routes.
#[derive(Clone, Debug, Parser)]
#[command(name = "scheduler", version)]
pub(crate) struct Args {
    /// Worker processes; 1 runs in this process, without a supervisor [default: the number of
    /// CPUs]
    #[arg(
        long,
        value_name = "N",
        default_value_t = default_workers(),
        hide_default_value = true,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=u64::from(u16::MAX)),
        allow_negative_numbers = true
    )]
    workers: usize,
    /// The address every worker serves (SO_REUSEPORT)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// The state folder: outbox, sent emails, reports, logs, the file backend's locks
    #[arg(long, value_name = "DIR", default_value = "./state")]
    state_dir: PathBuf,
    /// A backend string such as `redis://…`, `postgres://…`, `etcd://…` [default: the file
    /// backend in `<state-dir>/locks`]
    #[arg(long, value_name = "STRING")]
    backend: Option<String>,
    /// The outbox, the deliveries and the report runs in PostgreSQL (`postgres://…`, shared by
    /// every host; `?schema=NAME`, default `scheduler`) [default: the folders in `--state-dir`]
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// The host group's folder, for a server backend [default: `<state-dir>/host`]
    #[arg(long, value_name = "DIR", conflicts_with = "no_host_group")]
    host_dir: Option<PathBuf>,
    /// No host group: every worker campaigns on the server itself
    #[arg(long)]
    no_host_group: bool,
    /// The lease, on lease backends (e.g. `5s`) [default: the backend's]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    lease: Option<Duration>,
    /// Write a report every DURATION (e.g. `1m`) [default: daily at 08:00 UTC]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    report_every: Option<Duration>,
    /// Missed report slots to catch up, oldest first; 0 skips them
    #[arg(
        long,
        value_name = "N",
        default_value_t = 24,
        allow_negative_numbers = true
    )]
    catch_up: usize,
    /// Send emails over SMTP instead of writing `sent/`: `smtp://127.0.0.1:2525` (plain text),
    /// `smtp://user:pass@host:587?tls=required` (STARTTLS), `smtps://user:pass@host` (TLS)
    #[arg(long, value_name = "URL")]
    smtp: Option<String>,
    /// Worker i also listens on BASE + i, advertised so secondaries redirect admin routes there
    #[arg(
        long,
        value_name = "BASE",
        value_parser = clap::value_parser!(u16).range(1..),
        allow_negative_numbers = true
    )]
    worker_ports: Option<u16>,
    /// What a secondary answers on the admin routes: 503, a 307 to the primary, or the request
    /// forwarded to the primary
    #[arg(long, value_name = "MODE", value_enum, default_value_t = AdminMode::Forward)]
    admin_mode: AdminMode,
    /// Each report and each email send also takes this long, to watch a failover land mid-job
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = parse_duration,
        default_value = "0s"
    )]
    simulate_work: Duration,
    /// This instance's priority: a ready candidate of a higher priority is handed the lock (a
    /// new release of a rolling deploy takes over from the old one) [default: the
    /// `TOWER_PRIMARY_PRIORITY` environment variable, else 0]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    priority: Option<u64>,
    /// Never become primary: serve requests and follow the primary only
    #[arg(long)]
    never_lead: bool,
    /// On SIGTERM, how long a primary waits to hand the lock to a ready candidate before it
    /// shuts down anyway (releasing the lock to whoever takes it)
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = parse_duration,
        default_value = "10s"
    )]
    drain_timeout: Duration,
}

/// `--admin-mode`: 503, 307 to the primary, or the request forwarded to the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum AdminMode {
    /// 503 with `Retry-After` and the holder
    Refuse,
    /// 307 to the primary's advertised URL
    Redirect,
    /// The request forwarded to the primary, its answer streamed back
    Forward,
}

impl Args {
    /// Parses this process's command line; on a mistake prints clap's message and exits 2 (0
    /// for `--help` and `--version`).
    pub(crate) fn from_command_line() -> Self {
        Self::try_from_flags(std::env::args_os().skip(1)).unwrap_or_else(|err| err.exit())
    }

    /// Parses `flags` (without the program name).
    pub(crate) fn try_from_flags<I, T>(flags: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv =
            std::iter::once(OsString::from("scheduler")).chain(flags.into_iter().map(Into::into));
        Self::try_parse_from(argv)?.checked()
    }

    /// The checks that span flags.
    fn checked(self) -> Result<Self, clap::Error> {
        store::check_flags(self.store.as_deref(), self.backend.as_deref())
            .map_err(|why| Self::command().error(ErrorKind::ArgumentConflict, why))?;
        if let Some(base) = self.worker_ports {
            let last = usize::from(base) + self.workers - 1;
            if last > usize::from(u16::MAX) {
                return Err(Self::command().error(
                    ErrorKind::ValueValidation,
                    format!(
                        "--worker-ports {base} with --workers {}: ports {base}..={last} are not \
                         all valid ports",
                        self.workers
                    ),
                ));
            }
        }
        Ok(self)
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// A humantime duration: `500ms`, `10s`, `1m 30s`.
fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
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
    use std::path::Path;
    use std::time::Duration;

    use clap::CommandFactory;
    use clap::error::ErrorKind;

    use super::Args;

    fn parse(s: &str) -> Result<Args, clap::Error> {
        Args::try_from_flags(s.split_whitespace())
    }

    /// The error of a bad command line: its kind, and its message names `flag`.
    fn mistake(s: &str, flag: &str) -> ErrorKind {
        let err = parse(s).expect_err(s);
        let message = err.to_string();
        assert!(message.contains(flag), "{s:?} → {message}");
        // `main` exits with clap's code for it: 2 for every mistake.
        assert_eq!(err.exit_code(), 2, "{s:?} → {message}");
        err.kind()
    }

    #[test]
    fn the_command_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn flags_parse_with_their_defaults() {
        let a = parse("").unwrap();
        assert!(a.workers >= 1);
        assert_eq!(a.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(a.state_dir, Path::new("./state"));
        assert_eq!(
            (a.backend, a.host_dir, a.no_host_group),
            (None, None, false)
        );
        assert_eq!((a.lease, a.report_every), (None, None));
        assert_eq!(a.catch_up, 24);
        assert_eq!((a.smtp, a.worker_ports), (None, None));
        assert_eq!(a.simulate_work, Duration::ZERO);
        assert_eq!(a.store, None);
        assert_eq!((a.priority, a.never_lead), (None, false));
        assert_eq!(a.drain_timeout, Duration::from_secs(10));
        let a = parse("--priority 4187 --never-lead --drain-timeout 1m").unwrap();
        assert_eq!((a.priority, a.never_lead), (Some(4187), true));
        assert_eq!(a.drain_timeout, Duration::from_secs(60));

        let a = parse(
            "--workers 4 --bind=127.0.0.1:9000 --report-every 1s --worker-ports 9100 \
             --state-dir /tmp/s --backend redis://127.0.0.1/ --lease 2s --catch-up 0 \
             --smtp smtp://127.0.0.1:2525 --simulate-work 10ms",
        )
        .unwrap();
        assert_eq!(a.workers, 4);
        assert_eq!(a.bind.port(), 9000);
        assert_eq!(a.report_every, Some(Duration::from_secs(1)));
        assert_eq!(a.worker_ports, Some(9100));
        assert_eq!(a.state_dir, Path::new("/tmp/s"));
        assert_eq!(a.backend.as_deref(), Some("redis://127.0.0.1/"));
        assert_eq!(a.lease, Some(Duration::from_secs(2)));
        assert_eq!(a.catch_up, 0);
        assert_eq!(a.smtp.as_deref(), Some("smtp://127.0.0.1:2525"));
        assert_eq!(a.simulate_work, Duration::from_millis(10));

        let a = parse("--host-dir /run/app/host").unwrap();
        assert_eq!(a.host_dir.as_deref(), Some(Path::new("/run/app/host")));
        assert!(parse("--no-host-group").unwrap().no_host_group);
        // The largest range that fits.
        assert_eq!(a.admin_mode, super::AdminMode::Forward, "the default");
        let mode = |s| parse(s).unwrap().admin_mode;
        assert_eq!(mode("--admin-mode redirect"), super::AdminMode::Redirect);
        assert_eq!(mode("--admin-mode=refuse"), super::AdminMode::Refuse);
        assert_eq!(
            parse("--worker-ports 65534 --workers 2")
                .unwrap()
                .worker_ports,
            Some(65534)
        );
    }

    #[test]
    fn help_names_every_flag() {
        let err = parse("--help").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DisplayHelp);
        assert_eq!(err.exit_code(), 0);
        let help = err.to_string();
        for flag in [
            "--workers",
            "--bind",
            "--state-dir",
            "--backend",
            "--host-dir",
            "--no-host-group",
            "--lease",
            "--report-every",
            "--catch-up",
            "--smtp",
            "--worker-ports",
            "--simulate-work",
            "--store",
            "--admin-mode",
            "--priority",
            "--never-lead",
            "--drain-timeout",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
        }
        // Every flag has its doc.
        for arg in Args::command().get_arguments() {
            assert!(arg.get_help().is_some(), "{} has no doc", arg.get_id());
        }
    }

    #[test]
    fn mistakes_are_named() {
        // A bad value of each kind: a count, an address, a duration, a port.
        assert_eq!(
            mistake("--workers 0", "--workers"),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            mistake("--workers many", "--workers"),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            mistake("--workers -1", "--workers"),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            mistake("--catch-up -1", "--catch-up"),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            mistake("--catch-up lots", "--catch-up"),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            mistake("--bind localhost", "--bind"),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            mistake("--bind 127.0.0.1", "--bind"),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            mistake("--priority -1", "--priority"),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            mistake("--priority high", "--priority"),
            ErrorKind::ValueValidation
        );
        for flag in [
            "--lease",
            "--report-every",
            "--simulate-work",
            "--drain-timeout",
        ] {
            assert_eq!(
                mistake(&format!("{flag} soon"), flag),
                ErrorKind::ValueValidation
            );
            assert_eq!(
                mistake(&format!("{flag} 5"), flag),
                ErrorKind::ValueValidation
            );
        }
        assert_eq!(
            mistake("--worker-ports 0", "--worker-ports"),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            mistake("--worker-ports 65536", "--worker-ports"),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            mistake("--worker-ports 65535 --workers 2", "--worker-ports"),
            ErrorKind::ValueValidation
        );
        // A flag without its value, an unknown flag, a stray word, flags that exclude each other.
        assert_eq!(mistake("--bind", "--bind"), ErrorKind::InvalidValue);
        assert_eq!(
            mistake("--frobnicate", "--frobnicate"),
            ErrorKind::UnknownArgument
        );
        assert_eq!(mistake("now", "now"), ErrorKind::UnknownArgument);
        assert_eq!(
            mistake("--no-host-group --host-dir /x", "--host-dir"),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            mistake("--smtp a --smtp b", "--smtp"),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            mistake("--admin-mode proxy", "--admin-mode"),
            ErrorKind::InvalidValue
        );
        // A store that is not PostgreSQL, and a store with the per-host file lock.
        assert_eq!(
            mistake("--store redis://127.0.0.1/", "--store"),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            mistake(
                "--store postgres://root@127.0.0.1/test --backend /tmp/locks",
                "--store needs a server backend"
            ),
            ErrorKind::ArgumentConflict
        );
    }
}
