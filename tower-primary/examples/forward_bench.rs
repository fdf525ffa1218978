//! What forwarding a primary-only request costs: through a secondary versus straight to the
//! primary, over loopback. Self-contained, nothing to install.
//!
//! ```text
//! cargo run --release --features forward --example forward_bench
//! ```
//!
//! Two nodes of one lock in this process (electors on the memory backend, each with its own
//! axum server on 127.0.0.1): `a` is primary, `b` secondary; both put
//! `RequirePrimaryLayer::new().forward()` on `GET /admin/status` and `POST /admin/report`
//! (a 4 KiB body). A client with a connection pool sends one request at a time. Each round sends
//! a batch straight to `a` and a batch through `b` (which forwards to `a`), the order alternating
//! between rounds; the table gives, per route, the latency quantiles of each path over all
//! rounds, and the overhead (through `b` minus straight to `a`) as the median over rounds of each
//! round's p50 and p99 differences.
//!
//! The last line is `forward_overhead_p50_us=<GET> forward_overhead_p99_us=<GET>`.
//!
//! Settings (environment): `FORWARD_BENCH_ROUNDS` (default 10), `FORWARD_BENCH_BATCH` (requests
//! per path and round, default 500).

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower_primary::{Elector, MemoryBackend, NodeId, PrimaryLayer, RequirePrimaryLayer};

type HttpClient = Client<HttpConnector, Body>;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Starts a node of lock `bench` on the shared store; returns its elector and port.
async fn node(store: &MemoryBackend, id: &str) -> (Elector, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let primary = PrimaryLayer::new(
        Elector::builder("bench")
            .backend(store.connection())
            .node(NodeId::new(id))
            .advertise(format!("http://127.0.0.1:{port}")),
    )
    .unwrap();
    let gate = RequirePrimaryLayer::new().forward();
    let app = Router::new()
        .route(
            "/admin/status",
            get(|| async { "status: ok" }).layer(gate.clone()),
        )
        .route(
            "/admin/report",
            post(|body: Bytes| async move { format!("accepted {} bytes", body.len()) }).layer(gate),
        )
        .layer(primary.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (primary.elector(), port)
}

#[derive(Clone, Copy)]
enum Route {
    Status,
    Report,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Status => "GET /admin/status",
            Route::Report => "POST /admin/report (4 KiB)",
        }
    }

    fn request(self, port: u16) -> Request<Body> {
        match self {
            Route::Status => Request::get(format!("http://127.0.0.1:{port}/admin/status"))
                .body(Body::empty())
                .unwrap(),
            Route::Report => Request::post(format!("http://127.0.0.1:{port}/admin/report"))
                .body(Body::from(vec![b'x'; 4096]))
                .unwrap(),
        }
    }
}

/// Latencies in µs of `batch` requests, one at a time.
async fn batch(client: &HttpClient, route: Route, port: u16, n: u64) -> Vec<f64> {
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let req = route.request(port);
        let start = Instant::now();
        let res = client.request(req).await.unwrap();
        let status = res.status();
        let _ = res.into_body().collect().await.unwrap();
        out.push(start.elapsed().as_secs_f64() * 1e6);
        assert_eq!(status, StatusCode::OK);
    }
    out
}

struct Measured {
    direct: Vec<f64>,
    forwarded: Vec<f64>,
    p50_diffs: Vec<f64>,
    p99_diffs: Vec<f64>,
}

async fn measure(
    client: &HttpClient,
    route: Route,
    a: u16,
    b: u16,
    rounds: u64,
    n: u64,
) -> Measured {
    // Warm-up: connections in both pools, code paths hot.
    batch(client, route, a, n / 5 + 1).await;
    batch(client, route, b, n / 5 + 1).await;
    let mut m = Measured {
        direct: Vec::new(),
        forwarded: Vec::new(),
        p50_diffs: Vec::new(),
        p99_diffs: Vec::new(),
    };
    for round in 0..rounds {
        let (direct, forwarded) = if round % 2 == 0 {
            let d = batch(client, route, a, n).await;
            (d, batch(client, route, b, n).await)
        } else {
            let f = batch(client, route, b, n).await;
            (batch(client, route, a, n).await, f)
        };
        let (d, f) = (sorted(direct), sorted(forwarded));
        m.p50_diffs.push(quantile(&f, 0.5) - quantile(&d, 0.5));
        m.p99_diffs.push(quantile(&f, 0.99) - quantile(&d, 0.99));
        m.direct.extend(d);
        m.forwarded.extend(f);
    }
    m
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = env_or("FORWARD_BENCH_ROUNDS", 10).max(2);
    let n = env_or("FORWARD_BENCH_BATCH", 500).max(100);
    let store = MemoryBackend::new();
    let (a, a_port) = node(&store, "a").await;
    a.handle().wait_primary().await;
    let (b, b_port) = node(&store, "b").await;
    let mut role = b.handle();
    tokio::time::timeout(Duration::from_secs(30), async {
        while role.holder().is_none_or(|h| h.id != "a") {
            role.changed().await;
        }
    })
    .await
    .expect("b never learned that a holds the lock");

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    // Tails move with the machine's load (other processes on the same cores): say what it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned());
    println!(
        "forwarding overhead over loopback: {rounds} paired rounds of {n} sequential requests \
         per path, build {}, load average {load} on {} CPUs",
        if cfg!(debug_assertions) {
            "debug (use --release to measure)"
        } else {
            "release"
        },
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!();
    println!(
        "| route | path | p50 µs | p90 µs | p99 µs | overhead p50 µs (median of rounds) | overhead p99 µs (median of rounds) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut status_overhead = (0.0, 0.0);
    for route in [Route::Status, Route::Report] {
        let m = measure(&client, route, a_port, b_port, rounds, n).await;
        let (d, f) = (sorted(m.direct), sorted(m.forwarded));
        let p50 = quantile(&sorted(m.p50_diffs), 0.5);
        let p99 = quantile(&sorted(m.p99_diffs), 0.5);
        println!(
            "| {} | straight to the primary | {:.0} | {:.0} | {:.0} | | |",
            route.name(),
            quantile(&d, 0.5),
            quantile(&d, 0.9),
            quantile(&d, 0.99)
        );
        println!(
            "| {} | through a secondary | {:.0} | {:.0} | {:.0} | {p50:.0} | {p99:.0} |",
            route.name(),
            quantile(&f, 0.5),
            quantile(&f, 0.9),
            quantile(&f, 0.99)
        );
        if matches!(route, Route::Status) {
            status_overhead = (p50, p99);
        }
    }
    println!();
    println!("targets: overhead p50 <= 200 µs, p99 <= 1000 µs");
    println!(
        "forward_overhead_p50_us={:.0} forward_overhead_p99_us={:.0}",
        status_overhead.0, status_overhead.1
    );
    b.shutdown().await;
    a.shutdown().await;
}
