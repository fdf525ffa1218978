//! One worker: the elector, the migration, the email sender, the report schedule and the HTTP
//! routes, served on the shared `--bind` address (`SO_REUSEPORT`) and on its own port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_primary::backend::Backend;
use tower_primary::http::health::{self, Readiness};
use tower_primary::schedule::{Missed, RunNowError, RunOnce, Schedule, ScheduleHandle};
use tower_primary::{
    BoxError, Elector, FileBackend, Lease, PrimaryLayer, RequirePrimaryLayer, Role, TermContext,
    terminate_signal,
};

use super::store::Store;
use super::{AdminMode, Args, Dirs, email, prometheus, report};

/// The lock every worker campaigns for.
const LOCK: &str = "scheduler";
/// The report's schedule without `--report-every`: 08:00:00 UTC every day.
const DAILY: &str = "0 0 8 * * *";
/// Set by the supervisor in its workers: its pid.
pub(crate) const SUPERVISOR_ENV: &str = "SCHEDULER_SUPERVISOR_PID";

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) store: Store,
    pub(crate) readiness: Readiness,
    report: ScheduleHandle,
    pid: u32,
    worker: Option<u16>,
}

/// Runs a worker until SIGTERM/SIGINT (or its supervisor's death).
pub(crate) fn main(index: Option<u16>, args: &Args) -> Result<(), BoxError> {
    exit_with_supervisor()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(index, args))
}

/// A supervised worker asks the kernel for SIGTERM when the supervisor dies (even by SIGKILL),
/// so no worker outlives it.
fn exit_with_supervisor() -> Result<(), BoxError> {
    let Ok(parent) = std::env::var(SUPERVISOR_ENV) else {
        return Ok(());
    };
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
        // The supervisor may have died before the line above.
        if nix::unistd::getppid().to_string() != parent.trim() {
            return Err("the supervisor is gone".into());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = parent;
    Ok(())
}

async fn serve(index: Option<u16>, args: &Args) -> Result<(), BoxError> {
    let pid = std::process::id();
    // Before the elector: the library describes its metrics when it is built.
    let metrics = prometheus::install()?;
    prometheus::spawn_upkeep(metrics.clone());
    let dirs = Dirs::new(&args.state_dir);
    // This host's part of the store (its folders) is made by every process, at start-up.
    let store = Store::open(args, &dirs).await?;
    let backend: Box<dyn Backend> = match args.backend.as_ref().or(args.store.as_ref()) {
        Some(s) => tower_primary::backend::from_url(s)?,
        None => {
            std::fs::create_dir_all(dirs.locks())?;
            Box::new(FileBackend::new(dirs.locks()))
        }
    };
    let own_port = match (args.worker_ports, index) {
        (Some(base), index) => Some(
            base.checked_add(index.unwrap_or(0))
                .ok_or("--worker-ports: the port is out of range")?,
        ),
        (None, _) => None,
    };
    let mut builder = Elector::builder(LOCK)
        .backend(backend)
        .grace(Duration::from_secs(5));
    // Forwarding needs an address of this worker that the others reach: its own port, or else
    // an internal one on loopback.
    let internal = match (own_port, args.admin_mode) {
        (None, AdminMode::Forward) => Some(reuse_port_listener(reachable(args.bind.ip(), 0))?),
        _ => None,
    };
    let internal_port = internal
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?
        .map(|a| a.port());
    if let Some(port) = own_port.or(internal_port) {
        builder = builder.advertise(format!("http://{}", reachable(args.bind.ip(), port)));
    }
    if let Some(lease) = args.lease {
        builder = builder.lease(Lease::new(lease));
    }
    // Checks the configuration now; `elector()` claims the lock (the router shares the claim).
    let primary = PrimaryLayer::new(builder)?;
    let elector = primary.elector();

    let migration = elector.run_once("migrate", &store.migration_version(), {
        let store = store.clone();
        move |ctx| {
            let store = store.clone();
            async move { store.migrate(&ctx).await }
        }
    })?;
    let readiness = Readiness::new().require(migration.clone());
    let app_readiness = readiness.clone();

    let sender = email::Sender::new(
        store.clone(),
        dirs.clone(),
        args.smtp.as_deref(),
        args.simulate_work,
    )?;
    elector.singleton_task("email-sender", {
        let migration = migration.clone();
        move |ctx| sender.clone().run(ctx, migration.clone())
    });

    let schedule = match args.report_every {
        Some(every) => Schedule::every(every)?,
        None => Schedule::cron(DAILY)?,
    }
    .missed(match args.catch_up {
        0 => Missed::Skip,
        max => Missed::CatchUpAll { max },
    });
    let report = elector.schedule(
        "report",
        schedule,
        report::job(store.clone(), migration.clone(), args.simulate_work),
    )?;

    let app = App {
        store,
        readiness: readiness.clone(),
        report,
        pid,
        worker: index,
    };
    let gate = match args.admin_mode {
        AdminMode::Refuse => RequirePrimaryLayer::new(),
        AdminMode::Redirect => RequirePrimaryLayer::new().redirect(),
        AdminMode::Forward => RequirePrimaryLayer::new().forward(),
    };
    let admin = Router::new()
        .route("/admin/report-now", post(report_now))
        .route("/admin/status", get(status))
        .route_layer(gate);
    let router = Router::new()
        .route("/", get(index_page))
        .route("/health/role", get(health::role))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(ready))
        .route("/metrics", prometheus::route(metrics))
        .route("/emails", post(email::queue))
        .merge(admin)
        .with_state(app)
        .layer(primary);

    let shared = reuse_port_listener(args.bind)?;
    let own = match own_port {
        Some(port) => Some(reuse_port_listener(SocketAddr::new(args.bind.ip(), port))?),
        None => internal,
    };

    // Stop on a signal: hand the lock over first (a secondary takes over at once), then drain.
    let stop = CancellationToken::new();
    tokio::spawn({
        let (elector, stop) = (elector.clone(), stop.clone());
        async move {
            terminate_signal().await;
            tracing::info!("worker stopping pid={pid}");
            elector.shutdown().await;
            stop.cancel();
        }
    });

    log_startup(&elector, index, args, own_port.or(internal_port)).await;
    tokio::spawn({
        let readiness = app_readiness.clone();
        async move {
            readiness.wait().await;
            tracing::info!("worker ready pid={pid}");
        }
    });
    tokio::spawn(log_role_changes(elector.clone(), migration));

    let serve_on = |listener: tokio::net::TcpListener| {
        let stop = stop.clone();
        let router = router.clone();
        async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    };
    match own {
        Some(own) => {
            let (a, b) = tokio::join!(serve_on(shared), serve_on(own));
            a?;
            b?;
        }
        None => serve_on(shared).await?,
    }
    elector.shutdown().await;
    tracing::info!("worker stopped pid={pid}");
    Ok(())
}

/// Binds with `SO_REUSEPORT`, so every worker can bind the same address and the kernel spreads
/// connections over them.
fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = reuse_port_socket(addr)?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

fn reuse_port_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
    Ok(socket)
}

/// Checks that the workers will be able to bind their addresses (a port held by another program
/// would make every worker fail at start, over and over).
pub(crate) fn check_addresses(args: &Args) -> std::io::Result<()> {
    reuse_port_socket(args.bind)?;
    if let Some(base) = args.worker_ports {
        for i in 0..args.workers {
            let port = u16::try_from(i)
                .ok()
                .and_then(|i| base.checked_add(i))
                .ok_or_else(|| std::io::Error::other("--worker-ports: out of range"))?;
            reuse_port_socket(SocketAddr::new(args.bind.ip(), port))?;
        }
    }
    Ok(())
}

/// The address other workers can reach `port` of this host on.
fn reachable(ip: IpAddr, port: u16) -> SocketAddr {
    let ip = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, port)
}

/// `GET /health/ready`: 200 when this worker can accept and serve — its store answers (the
/// database, this host's folders) and the migration is done — else 503 with the reason.
async fn ready(State(app): State<App>) -> Response {
    if let Err(why) = app.store.check().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(json!({ "ready": false, "store": why, "jobs": app.readiness.report().jobs })),
        )
            .into_response();
    }
    app.readiness.report().into_response()
}

/// Logs `worker startup pid=… primary=…` once the first election round has settled (or after a
/// few seconds, if the backend cannot be reached).
async fn log_startup(elector: &Elector, index: Option<u16>, args: &Args, own: Option<u16>) {
    let mut role = elector.handle();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        // Settled: primary, or secondary with a known holder.
        while !matches!(
            role.role(),
            Role::Primary { .. } | Role::Secondary { holder: Some(_) }
        ) {
            role.changed().await;
        }
    })
    .await;
    let worker = index.map_or_else(|| "-".to_owned(), |i| i.to_string());
    let own = own.map_or_else(|| "-".to_owned(), |p| p.to_string());
    tracing::info!(
        "worker startup pid={} worker={worker} primary={} term={} bind={} port={own}",
        std::process::id(),
        role.is_primary(),
        role.term().unwrap_or(0),
        args.bind,
    );
}

/// Logs every change of this worker's role (not every change of the holder).
async fn log_role_changes(elector: Elector, migration: RunOnce) {
    let pid = std::process::id();
    let mut role = elector.handle();
    let mut last = (role.is_primary(), role.term());
    loop {
        let now = role.changed().await;
        let seen = (now.is_primary(), now.term());
        if seen == last {
            continue;
        }
        last = seen;
        match now {
            Role::Primary { term, .. } => tracing::info!(
                "role changed pid={pid} role=primary term={term} migration_done={}",
                migration.is_done()
            ),
            Role::Secondary { holder } => tracing::info!(
                "role changed pid={pid} role=secondary term={} holder={}",
                holder.as_ref().map_or(0, |h| h.term),
                holder.as_ref().map_or("-", |h| h.id.as_str())
            ),
            Role::Starting => {}
        }
    }
}

async fn index_page(State(app): State<App>, role: Role) -> String {
    let worker = app.worker.map_or_else(|| "-".to_owned(), |i| i.to_string());
    format!(
        "tower-primary scheduler example\n\
         worker={worker} pid={} role={} term={} ready={}\n\n\
         GET  /health/role          role, term and holder (JSON)\n\
         GET  /health/live          503 if the elector is stuck\n\
         GET  /health/ready         503 until the store answers and the migration is done\n\
         GET  /metrics              Prometheus metrics of this worker\n\
         POST /emails               {{\"to\",\"subject\",\"body\"}} -> 202 {{\"id\"}}\n\
         POST /admin/report-now     primary only: queue a report run\n\
         GET  /admin/status         primary only: outbox, sent, last report\n",
        app.pid,
        role.as_str(),
        role.term()
            .map_or_else(|| "-".to_owned(), |t| t.to_string()),
        app.readiness.is_ready(),
    )
}

/// `POST /admin/report-now` (primary only): queues a run through the report's own schedule, so
/// it never overlaps a scheduled run. 429 when the queue of runs asked for is full.
async fn report_now(State(app): State<App>) -> Response {
    match app.report.run_now() {
        Ok(slot) => {
            let slot = report::slot_name(slot);
            tracing::info!("report queued slot={slot} pid={}", app.pid);
            (StatusCode::ACCEPTED, Json(json!({ "slot": slot }))).into_response()
        }
        Err(RunNowError::Full { capacity, .. }) => (
            StatusCode::TOO_MANY_REQUESTS,
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(json!({
                "error": "queue_full",
                "message": format!("{capacity} report runs are already waiting; try again later"),
            })),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "this worker stopped being primary; try again" })),
        )
            .into_response(),
    }
}

/// `GET /admin/status` (primary only): `term` is the term the gate admitted the request under.
async fn status(State(app): State<App>, term: TermContext) -> Response {
    let counts = match app.store.counts().await {
        Ok(c) => c,
        Err(err) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": format!("the store: {err}") })),
            )
                .into_response();
        }
    };
    let last_report = match app.report.last_completed().await {
        Ok(slot) => json!(slot.map(report::slot_name)),
        Err(err) => json!(format!("unknown: {err}")),
    };
    Json(json!({
        "pid": app.pid,
        "worker": app.worker,
        "term": term.term(),
        "ready": app.readiness.is_ready(),
        "outbox": counts.queued,
        "sent": counts.sent,
        "failed": counts.failed,
        "last_report": last_report,
    }))
    .into_response()
}
