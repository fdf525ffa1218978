//! One worker: the elector, the migration, the email sender, the report schedule and the HTTP
//! routes, served on the shared `--bind` address (`SO_REUSEPORT`) and on its own port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Query, State};
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
    BoxError, Elector, Error, FileBackend, HandOverRefusal, Lease, PrimaryLayer,
    RequirePrimaryLayer, Role, TermContext, terminate_signal,
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
    elector: Elector,
    /// Set once the registry shows this worker ready (see [`announce_ready`]).
    announced: Arc<AtomicBool>,
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
    let backend_name = backend.name().to_owned();
    let own_port = match (args.worker_ports, index) {
        (Some(base), index) => Some(
            base.checked_add(index.unwrap_or(0))
                .ok_or("--worker-ports: the port is out of range")?,
        ),
        (None, _) => None,
    };
    // Ready to be handed the lock only once it can serve (below): migrated and listening.
    let mut builder = Elector::builder(LOCK)
        .backend(backend)
        .grace(Duration::from_secs(5))
        .ready_at_spawn(false);
    // Without `--priority` the elector reads `TOWER_PRIMARY_PRIORITY` itself.
    if let Some(priority) = args.priority {
        builder = builder.priority(priority);
    }
    if args.never_lead {
        builder = builder.never_lead();
    }
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
        elector: elector.clone(),
        announced: Arc::new(AtomicBool::new(false)),
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
        .route("/admin/hand-over", post(hand_over))
        .route_layer(gate);
    let router = Router::new()
        .route("/", get(index_page))
        .route("/health/role", get(health::role))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(ready))
        .route("/metrics", prometheus::route(metrics))
        .route("/emails", post(email::queue))
        .merge(admin)
        .with_state(app.clone())
        .layer(primary);

    let shared = reuse_port_listener(args.bind)?;
    let own = match own_port {
        Some(port) => Some(reuse_port_listener(SocketAddr::new(args.bind.ip(), port))?),
        None => internal,
    };

    // Stop on a signal: drain first (a primary hands the lock to the best ready candidate, which
    // takes over at once), then shut the elector down (releasing the lock if nobody took it),
    // then stop serving.
    let stop = CancellationToken::new();
    let drain_timeout = args.drain_timeout;
    tokio::spawn({
        let (elector, stop) = (elector.clone(), stop.clone());
        async move {
            terminate_signal().await;
            let was_primary = elector.handle().is_primary();
            tracing::info!("worker stopping pid={pid} primary={was_primary}");
            let started = tokio::time::Instant::now();
            // A primary drains only towards a successor that exists now (a new instance started
            // before this one was stopped): with none (the whole service stopping, a backend
            // without a registry) it shuts down at once, and a failover follows as before.
            let successor = if was_primary {
                siblings_draining(&elector).await;
                has_successor(&elector)
            } else {
                false
            };
            let handed_over = if was_primary && !successor {
                false
            } else {
                let drained = tokio::time::timeout(drain_timeout, elector.drain()).await;
                was_primary && drained.is_ok()
            };
            let took_ms = started.elapsed().as_millis();
            tracing::info!(
                "worker drained pid={pid} was_primary={was_primary} successor={successor} \
                 handed_over={handed_over} took_ms={took_ms}"
            );
            elector.shutdown().await;
            stop.cancel();
        }
    });

    let started_as = log_startup(&elector, index, args, own_port.or(internal_port)).await;
    // Listening and (below) migrated: ready to be handed the lock.
    // In a host group (a server backend; the supervisor sets the folder) the registry lists one
    // entry per group, under the id of the member that campaigns for it.
    let grouped = std::env::var_os(tower_primary::HOST_DIR_ENV).is_some()
        && !matches!(backend_name.as_str(), "file" | "memory");
    tokio::spawn(announce_ready(
        elector.clone(),
        grouped,
        app_readiness.clone(),
        app.announced.clone(),
    ));
    tokio::spawn(log_role_changes(elector.clone(), migration, started_as));

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

/// How long a primary worker that got SIGTERM waits for its sibling workers to show as draining.
const SIBLINGS_BOUND: Duration = Duration::from_secs(1);

/// The supervisor forwards SIGTERM to every worker at once, and each of them drains. A primary
/// worker first waits (at most [`SIBLINGS_BOUND`]) until the registry shows its sibling workers
/// (the other children of its supervisor) draining or gone, so that it does not hand the lock to
/// a process that is stopping with it: that one would not take it, and the lock would stay
/// reserved for it, with no primary, for the handover window. (With a host group the registry
/// lists one entry per host: none of it is a sibling's.)
async fn siblings_draining(elector: &Elector) {
    let Some(supervisor) = std::env::var(SUPERVISOR_ENV)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let handle = elector.handle();
    let me = handle.node().id().to_owned();
    let _ = tokio::time::timeout(
        SIBLINGS_BOUND,
        handle.wait_candidates(|list| {
            !list
                .iter()
                .any(|c| c.node != me && !c.draining && is_child_of(&c.node, supervisor))
        }),
    )
    .await;
}

/// Whether the registry lists another candidate that could take the lock now (ready, not
/// draining). A backend without a registry lists nobody, not even this node.
fn has_successor(elector: &Elector) -> bool {
    let handle = elector.handle();
    let me = handle.node().id().to_owned();
    handle
        .candidates()
        .iter()
        .any(|c| c.node != me && c.is_eligible())
}

/// Whether the process of node id `node` (`host:pid` or `host:pid:wN`, as
/// [`NodeId::from_env`](tower_primary::NodeId::from_env) makes it) is a child of `parent` on
/// this host.
fn is_child_of(node: &str, parent: u32) -> bool {
    let mut parts = node.split(':');
    let (Some(host), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    let this_host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok());
    if this_host.as_deref() != Some(host) {
        return false;
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    // `/proc/<pid>/stat`: `pid (comm) state ppid …`; comm may hold spaces and parentheses.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        })
        == Some(parent)
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

/// How long a worker waits to read its own ready entry back from the registry before it counts
/// as announced anyway (a backend without a registry lists nobody).
const ANNOUNCE_BOUND: Duration = Duration::from_secs(3);

/// Once the migration is done (and the listeners are bound, before this is spawned): marks the
/// elector ready, then waits until the registry, as this worker reads it back, shows its entry
/// ready, so that a deploy tool that waits for `/health/ready` before stopping an old instance
/// finds the new one already known to the primary as a handover target. In a host group
/// (`grouped`) the group's one entry carries the id of the member that campaigns for it and the
/// best priority of its ready members: a member that is not listed itself waits for a ready
/// entry of at least its priority (its group's, or a peer's as good).
async fn announce_ready(
    elector: Elector,
    grouped: bool,
    readiness: Readiness,
    announced: Arc<AtomicBool>,
) {
    let pid = std::process::id();
    readiness.wait().await;
    elector.ready();
    let handle = elector.handle();
    let me = handle.node().id().to_owned();
    let priority = handle.entry().priority;
    let seen = tokio::time::timeout(
        ANNOUNCE_BOUND,
        handle.wait_candidates(|list| {
            list.iter().any(|c| {
                c.ready && (c.node == me || (grouped && !c.draining && c.priority >= priority))
            })
        }),
    )
    .await
    .is_ok();
    announced.store(true, Ordering::Release);
    tracing::info!(
        "worker ready pid={pid} node={me} priority={} registry={}",
        handle.entry().priority,
        if seen { "listed" } else { "not-listed" }
    );
}

/// `GET /health/ready`: 200 when this worker can accept and serve — its store answers (the
/// database, this host's folders), the migration is done and the lock's registry lists it as
/// ready (a handover target) — else 503 with the reason.
async fn ready(State(app): State<App>) -> Response {
    if let Err(why) = app.store.check().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(json!({ "ready": false, "store": why, "jobs": app.readiness.report().jobs })),
        )
            .into_response();
    }
    let report = app.readiness.report();
    if report.ready && !app.announced.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(json!({ "ready": false, "registry": "not yet listed", "jobs": report.jobs })),
        )
            .into_response();
    }
    report.into_response()
}

/// Logs `worker startup pid=… primary=…` once the first election round has settled (or after a
/// few seconds, if the backend cannot be reached); returns what it logged (primary, term).
async fn log_startup(
    elector: &Elector,
    index: Option<u16>,
    args: &Args,
    own: Option<u16>,
) -> (bool, Option<u64>) {
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
    let now = role.role();
    tracing::info!(
        "worker startup pid={} worker={worker} primary={} term={} bind={} port={own}",
        std::process::id(),
        now.is_primary(),
        now.term().unwrap_or(0),
        args.bind,
    );
    (now.is_primary(), now.term())
}

/// Logs every change of this worker's role (not every change of the holder) since `last`, the
/// role `worker startup` logged: every term this worker leads is logged once.
async fn log_role_changes(elector: Elector, migration: RunOnce, mut last: (bool, Option<u64>)) {
    let pid = std::process::id();
    let mut role = elector.handle();
    let mut now = role.role();
    loop {
        let seen = (now.is_primary(), now.term());
        if seen != last {
            log_role(pid, &now, &migration);
        }
        last = seen;
        now = role.changed().await;
    }
}

fn log_role(pid: u32, now: &Role, migration: &RunOnce) {
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
         GET  /admin/status         primary only: outbox, sent, last report, candidates\n\
         POST /admin/hand-over?node=ID  primary only: hand the lock to that candidate\n",
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
        "entry": app.elector.handle().entry(),
        "candidates": app.elector.handle().candidates(),
    }))
    .into_response()
}

/// The query of `POST /admin/hand-over`.
#[derive(serde::Deserialize)]
struct HandOverQuery {
    node: Option<String>,
}

/// `POST /admin/hand-over?node=<id>` (primary only): hands the lock to that node now (a
/// reservation, then a release). 202 once this worker has stopped being primary; 400 without a
/// node; 404 when no live candidate has that id; 409 when it is not ready, is draining, or is
/// this worker; 503 when this worker is no longer primary or the backend failed.
async fn hand_over(State(app): State<App>, Query(query): Query<HandOverQuery>) -> Response {
    let Some(node) = query.node.filter(|n| !n.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "missing_node", "message": "?node=<node id> is required" })),
        )
            .into_response();
    };
    // The handover waits for the term's gated requests, this one included, before it releases
    // the lock: so this handler does not wait for the release. It waits for the elector's
    // answer to a refusal, or for this worker to stop being primary (the first step of the
    // handover), whichever comes first.
    let mut handle = app.elector.handle();
    let elector = app.elector.clone();
    let target = node.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(elector.hand_over_to(target).await);
    });
    let was_primary = handle.is_primary();
    let result = tokio::select! {
        biased;
        res = rx => res.unwrap_or(Ok(())),
        () = async { while handle.is_primary() { handle.changed().await; } }, if was_primary => Ok(()),
    };
    match result {
        Ok(()) => {
            tracing::info!("handing over pid={} to={node}", app.pid);
            (
                StatusCode::ACCEPTED,
                Json(json!({ "handing_over_to": node })),
            )
                .into_response()
        }
        Err(Error::HandOver { refusal, .. }) => {
            let (status, code) = match refusal {
                HandOverRefusal::UnknownNode => (StatusCode::NOT_FOUND, "unknown_node"),
                HandOverRefusal::NotReady => (StatusCode::CONFLICT, "not_ready"),
                HandOverRefusal::Draining => (StatusCode::CONFLICT, "draining"),
                HandOverRefusal::AlreadyPrimary => (StatusCode::CONFLICT, "already_primary"),
                _ => (StatusCode::CONFLICT, "refused"),
            };
            (
                status,
                Json(json!({ "error": code, "node": node, "message": refusal.to_string() })),
            )
                .into_response()
        }
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(json!({ "error": "unavailable", "node": node, "message": err.to_string() })),
        )
            .into_response(),
    }
}
