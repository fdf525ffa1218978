//! Deploy-aware leadership with the example service (`examples/scheduler`) as real processes:
//! a rolling deploy (surge 1) of 4 instances of 2 workers each, from priority 1 to priority 2,
//! moves the primary exactly once, to a new instance, on the file backend (one lock folder
//! shared by the instances) and on each server backend (a server the lab starts; every instance
//! is a host of its own: its own state folder, its own host group). A directed handover through
//! `POST /admin/hand-over` answers 202 and the named node leads; 409 for a draining node or the
//! primary itself, 404 for an unknown node, 400 without a node. The status tool lists the
//! registry.
//!
//! Like `tests/scheduler.rs`, this binary compiles the example (`#[path]`) and re-executes
//! itself as the service (`deploy_entry`). The primary changes are counted from the workers' log
//! lines (`worker startup … primary=true`, `role changed … role=primary`): every term is logged
//! once by the worker that leads it.
//!
//! ```text
//! TOWER_PRIMARY_REQUIRE_BACKENDS=1 cargo test -p tower-primary --all-features --test deploy -- --nocapture
//! ```

#[path = "../examples/status/probe.rs"]
#[allow(dead_code)]
mod probe;
#[path = "../examples/scheduler/main.rs"]
#[allow(dead_code)]
mod scheduler;
#[path = "common/service.rs"]
mod service;

use http::StatusCode;
use tower_primary::http::health::RoleReport;
use tower_primary_lab::servers::{self, EtcdServer, PostgresServer, RedisServer};

use self::service::{Deploy, HttpClient, Instance, Launcher, client, request, rolling_deploy};

const ARGS_ENV: &str = "TOWER_PRIMARY_DEPLOY_TEST_ARGS";

/// Every test starts many processes on a small machine: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The service side of this binary.
#[test]
fn deploy_entry() {
    let Ok(args) = std::env::var(ARGS_ENV) else {
        return;
    };
    let args = scheduler::Args::try_from_flags(args.split_whitespace()).expect("valid flags");
    std::process::exit(i32::from(scheduler::run(&args).is_err()));
}

fn launcher() -> Box<Launcher> {
    Box::new(|args: &str| {
        let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "deploy_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env(ARGS_ENV, args);
        cmd
    })
}

/// Runs the rolling deploy with `flags` and checks it moved the primary once, to a new instance.
async fn deploy_moves_once(backend: &str, flags: &str) -> Deploy {
    let deploy = rolling_deploy(&*launcher(), flags, 4, 2, 1, 2).await;
    eprintln!(
        "{backend}: moves={} to_new={} to_old={} total={:?} first={:?} last={:?}\nterms={:?}",
        deploy.moves,
        deploy.to_new,
        deploy.to_old,
        deploy.total,
        deploy.first,
        deploy.last,
        deploy.terms
    );
    assert_eq!(
        (deploy.moves, deploy.to_new, deploy.to_old),
        (1, 1, 0),
        "{backend}: {deploy:?}"
    );
    assert!(deploy.ends_on_new(), "{backend}: {deploy:?}");
    deploy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_on_the_file_backend_moves_the_primary_once() {
    let _serial = SERIAL.lock().await;
    let locks = tempfile::tempdir().unwrap();
    deploy_moves_once("file", &format!("--backend {}", locks.path().display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_on_redis_moves_the_primary_once() {
    let _serial = SERIAL.lock().await;
    let Some(server) = servers::require("redis-server", RedisServer::start().await) else {
        return;
    };
    // A fresh server makes the first candidate wait the maximum lease (the restart guard).
    let flags = format!("--backend {}?max_lease=2000ms --lease 2s", server.url());
    deploy_moves_once("redis", &flags).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_on_postgres_moves_the_primary_once() {
    let _serial = SERIAL.lock().await;
    let Some(server) = servers::require("a PostgreSQL cluster", PostgresServer::start().await)
    else {
        return;
    };
    deploy_moves_once(
        "postgres",
        &format!("--backend {} --lease 2s", server.url()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_on_etcd_moves_the_primary_once() {
    let _serial = SERIAL.lock().await;
    let Some(server) = servers::require("etcd", EtcdServer::start().await) else {
        return;
    };
    deploy_moves_once("etcd", &format!("--backend {} --lease 2s", server.url())).await;
}

async fn role_of(client: &HttpClient, url: &str) -> RoleReport {
    let (status, _, text) = request(client, "GET", url, "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// `POST /admin/hand-over?node=…` on `at` (forwarded to the primary when `at` is a secondary's
/// URL): status and JSON body.
async fn hand_over(client: &HttpClient, at: &str, node: &str) -> (StatusCode, serde_json::Value) {
    let url = format!("{at}/admin/hand-over?node={node}");
    let (status, _, text) = request(client, "POST", &url, "").await;
    let body = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!(text));
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directed_handover_through_the_admin_route() {
    let _serial = SERIAL.lock().await;
    let locks = tempfile::tempdir().unwrap();
    let backend = format!("--backend {}", locks.path().display());
    let launch = launcher();
    let client = client();
    // Equal priorities: nothing moves by itself. `c` never leads.
    let mut a = Instance::start(&*launch, "a", 1, &format!("{backend} --priority 1"));
    a.wait_ready(&client).await;
    let mut b = Instance::start(&*launch, "b", 1, &format!("{backend} --priority 1"));
    b.wait_ready(&client).await;
    let mut c = Instance::start(&*launch, "c", 1, &format!("{backend} --never-lead"));
    c.wait_ready(&client).await;
    let (a_url, b_url, c_url) = (
        a.worker_url(0, ""),
        b.worker_url(0, ""),
        c.worker_url(0, ""),
    );
    let role_a = role_of(&client, &format!("{a_url}/health/role")).await;
    assert_eq!(role_a.role, "primary", "{role_a:?}");
    let id = |r: &RoleReport| r.node.id.clone();
    let role_b = role_of(&client, &format!("{b_url}/health/role")).await;
    let role_c = role_of(&client, &format!("{c_url}/health/role")).await;
    let (a_id, b_id, c_id) = (id(&role_a), id(&role_b), id(&role_c));
    // Every node's entry is in the registry, as the primary reads it.
    let listed: Vec<_> = role_a.candidates.iter().map(|c| c.node.clone()).collect();
    for node in [&a_id, &b_id, &c_id] {
        assert!(listed.contains(node), "{node} not in {listed:?}");
    }

    // The status tool lists the registry and marks the holder.
    let lock = tower_primary::backend::from_url(&locks.path().display().to_string())
        .unwrap()
        .lock("scheduler")
        .unwrap();
    let status = probe::probe(&*lock, "scheduler").await.unwrap();
    let printed = status.to_string();
    assert_eq!(status.candidates.len(), 3, "{printed}");
    assert!(
        printed
            .lines()
            .any(|l| l.trim_start().starts_with('*') && l.contains(&a_id)),
        "{printed}"
    );
    assert!(
        printed
            .lines()
            .any(|l| l.contains(&c_id) && l.split_whitespace().nth(3) == Some("yes")),
        "c is draining:\n{printed}"
    );

    // Refusals: nothing moves.
    let (status, body) = hand_over(&client, &a_url, "nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "unknown_node", "{body}");
    let (status, body) = hand_over(&client, &a_url, &c_id).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "draining", "{body}");
    let (status, body) = hand_over(&client, &a_url, &a_id).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "already_primary", "{body}");
    let (status, body) = hand_over(&client, &a_url, "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // A refusal through a secondary: forwarded to the primary.
    let (status, body) = hand_over(&client, &c_url, "nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(a.primary_terms().len(), 1, "{}", a.log.dump());
    assert!(b.primary_terms().is_empty(), "{}", b.log.dump());

    // The handover, asked on a secondary (forwarded): 202, then b leads with a higher term.
    let before = role_a.term.unwrap();
    let (status, body) = hand_over(&client, &b_url, &b_id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["handing_over_to"], b_id.as_str(), "{body}");
    let (_, line) = b
        .log
        .wait(0, "b leading", |l| {
            l.contains("role changed ") && l.contains("role=primary")
        })
        .await;
    let term: u64 = service::num(&line, "term");
    assert!(term > before, "{term} after {before}");
    let role_b = role_of(&client, &format!("{b_url}/health/role")).await;
    assert_eq!(
        (role_b.role.as_str(), role_b.term),
        ("primary", Some(term)),
        "{role_b:?}"
    );
    // a handed the lock away on request: it does not take it back, and says so in the registry.
    let entry_a = role_of(&client, &format!("{a_url}/health/role"))
        .await
        .entry
        .unwrap();
    assert!(entry_a.yielded && !entry_a.draining, "{entry_a:?}");
    assert_eq!(a.primary_terms().len(), 1, "{}", a.log.dump());

    // SIGTERM on the primary: it drains, handing over to the one ready candidate (a), which is
    // not draining; c never leads.
    b.stop().await;
    let (_, line) = a
        .log
        .wait(0, "a leading again", |l| {
            l.contains("role changed ") && l.contains("role=primary")
        })
        .await;
    assert!(service::num::<u64>(&line, "term") > term, "{line}");
    assert!(
        b.log
            .snapshot()
            .iter()
            .any(|l| l.contains("worker drained ") && l.contains("handed_over=true")),
        "{}",
        b.log.dump()
    );
    assert!(c.primary_terms().is_empty(), "{}", c.log.dump());
    c.stop().await;
    a.stop().await;
}

/// `Elector::hand_over_to` resolves once the lock is reserved and the term is being left, not
/// after the release (which waits for the term's primary-only requests): awaited inside such a
/// request (behind `RequirePrimaryLayer`), it answers at once instead of waiting for itself
/// until the grace runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_over_to_awaited_inside_a_gated_request_answers_before_the_grace() {
    use std::time::Duration;

    use tower::ServiceExt as _;
    use tower_primary::{Elector, MemoryBackend, NodeId, PrimaryLayer, RequirePrimaryLayer};

    let backend = MemoryBackend::new();
    let primary = PrimaryLayer::new(
        Elector::builder("gated")
            .backend(backend.clone())
            .node(NodeId::new("a"))
            .grace(Duration::from_secs(3)),
    )
    .unwrap();
    let a = primary.elector();
    a.handle().wait_primary().await;
    let b = Elector::builder("gated")
        .backend(backend.connection())
        .node(NodeId::new("b"))
        .spawn()
        .unwrap();
    a.handle()
        .wait_candidates(|c| c.iter().any(|c| c.node == "b" && c.ready))
        .await;
    let app = axum::Router::new()
        .route(
            "/hand-over",
            axum::routing::post({
                let a = a.clone();
                move || {
                    let a = a.clone();
                    async move {
                        a.hand_over_to("b")
                            .await
                            .map(|()| "handed over")
                            .map_err(|e| e.to_string())
                    }
                }
            }),
        )
        .route_layer(RequirePrimaryLayer::new())
        .layer(primary);
    let started = tokio::time::Instant::now();
    let req = http::Request::post("/hand-over")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), app.oneshot(req)).await;
    let took = started.elapsed();
    let status = res
        .as_ref()
        .ok()
        .and_then(|r| r.as_ref().ok())
        .map(http::Response::status);
    b.handle().wait_primary().await;
    assert!(
        took < Duration::from_secs(1) && status == Some(StatusCode::OK),
        "the request took {took:?} and answered {status:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A directed handover to a node of a lower priority than another live candidate stays where
/// the operator put it: while the node that handed over (`yielded`) lives, no primary hands the
/// lock on by preference, here to `a2`, as high as `a`.
#[tokio::test(start_paused = true)]
async fn a_directed_handover_to_a_lower_priority_node_stays_there() {
    use std::time::Duration;

    use tower_primary::{Clock, Elector, MemoryBackend, NodeId};

    let backend = MemoryBackend::new();
    let node = |id: &str, priority: u64| {
        Elector::builder("directed")
            .backend(backend.connection())
            .node(NodeId::new(id))
            .priority(priority)
            .clock(Clock::tokio())
            .settle_time(Duration::from_millis(100))
            .spawn()
            .unwrap()
    };
    let a = node("a", 2);
    a.handle().wait_primary().await;
    let a2 = node("a2", 2);
    let b = node("b", 1);
    a.handle()
        .wait_candidates(|c| c.len() == 3 && c.iter().all(|c| c.ready))
        .await;
    a.hand_over_to("b").await.unwrap();
    b.handle().wait_primary().await;
    // Well past the settle time (the paused clock advances at once).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let holder = b.handle().holder().map(|h| h.id);
    for e in [&a, &a2, &b] {
        e.shutdown().await;
    }
    assert_eq!(holder.as_deref(), Some("b"));
}
