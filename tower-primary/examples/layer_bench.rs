//! What `PrimaryLayer` costs a request: self-contained, nothing to install.
//!
//! ```text
//! cargo run --release --example layer_bench
//! ```
//!
//! (a) An in-process micro-benchmark of one service call, on requests shaped as a route sees them
//!     inside an axum `Router` (the extensions map already in use), with and without the layer:
//!     the median over paired rounds of the difference, in ns per request. Then, each paired with
//!     the bare service the same way, the overhead of the layer with role headers, of the layer
//!     with the primary-only gate admitting the request, and of the layer on a request whose
//!     extensions map is still empty (the first insert allocates it).
//! (b) HTTP throughput of a hello-world axum server over loopback, driven by an in-process hyper
//!     client pool, without and with `PrimaryLayer`, in paired alternating rounds; then the same
//!     with `RequirePrimaryLayer` on the route, reported on its own line. Each round's ratio is
//!     with / without; the median and the spread over the rounds are reported.
//!
//! The last line is `layer_overhead_ns=<a> throughput_ratio=<median of with / without>`.
//!
//! Settings (environment): `LAYER_BENCH_ROUNDS` (default 12, at least 10 recommended),
//! `LAYER_BENCH_ROUND_MS` (default 1000), `LAYER_BENCH_CONCURRENCY` (default 16).

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, Service, service_fn};
use tower_primary::{
    AddRoleLayer, Elector, MemoryBackend, RequirePrimaryLayer, RoleHandle, RoleHeadersLayer,
};

/// Stands in for what axum's router inserts before a route's layers run.
#[derive(Clone)]
struct MatchedRoute(#[allow(dead_code)] &'static str);

fn router_shaped_request() -> Request<Empty<Bytes>> {
    let mut req = Request::get("/admin/rebuild?x=1")
        .body(Empty::new())
        .unwrap();
    req.extensions_mut().insert(MatchedRoute("/admin/rebuild"));
    req
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// "median M (IQR a–b, min c, max d)".
fn spread(values: &[f64], digits: usize) -> (f64, String) {
    let s = sorted(values.to_vec());
    let median = quantile(&s, 0.5);
    let text = format!(
        "median {median:.digits$} (IQR {:.digits$}–{:.digits$}, min {:.digits$}, max {:.digits$}, n={})",
        quantile(&s, 0.25),
        quantile(&s, 0.75),
        s[0],
        s[s.len() - 1],
        s.len()
    );
    (median, text)
}

/// Nanoseconds spent calling `svc` on `batch` router-shaped requests, built before the clock
/// starts (a small batch, so the requests are in cache as a server's would be).
fn time_batch<S, B>(svc: &mut S, batch: usize, make: fn() -> Request<Empty<Bytes>>) -> u128
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
{
    let reqs: Vec<_> = (0..batch).map(|_| make()).collect();
    let start = Instant::now();
    for req in reqs {
        black_box(svc.call(req).now_or_never());
    }
    start.elapsed().as_nanos()
}

fn empty_request() -> Request<Empty<Bytes>> {
    Request::get("/").body(Empty::new()).unwrap()
}

/// The innermost service: takes the request (dropping it, as a handler would) and answers with
/// an empty body (zero-sized, and a body the gate can wrap).
fn inner()
-> impl Service<Request<Empty<Bytes>>, Response = Response<Empty<Bytes>>, Error = Infallible> + Clone
{
    service_fn(|req: Request<Empty<Bytes>>| {
        drop(black_box(req));
        std::future::ready(Ok::<_, Infallible>(Response::new(Empty::new())))
    })
}

/// ns/req without and with, and their difference, per measured round: one warm-up round, then
/// the measured ones; batches alternate which variant goes first.
fn paired<S, B>(with: &mut S, make: fn() -> Request<Empty<Bytes>>, rounds: usize) -> [Vec<f64>; 3]
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
{
    let mut without = inner();
    let (mut a, mut b, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=rounds.max(10) {
        let (mut x, mut y) = (0, 0);
        for i in 0..BATCHES {
            if i % 2 == 0 {
                x += time_batch(&mut without, BATCH, make);
                y += time_batch(with, BATCH, make);
            } else {
                y += time_batch(with, BATCH, make);
                x += time_batch(&mut without, BATCH, make);
            }
        }
        if round == 0 {
            continue;
        }
        let n = (BATCH * BATCHES) as f64;
        let (x, y) = (x as f64 / n, y as f64 / n);
        a.push(x);
        b.push(y);
        diff.push(y - x);
    }
    [a, b, diff]
}

const BATCH: usize = 256;
const BATCHES: usize = 400;

fn micro(role: &RoleHandle, rounds: usize) -> f64 {
    let mut with = AddRoleLayer::new(role.clone()).layer(inner());
    let [a, b, diff] = paired(&mut with, router_shaped_request, rounds);
    let (_, without_text) = spread(&a, 1);
    let (_, with_text) = spread(&b, 1);
    let (overhead, diff_text) = spread(&diff, 1);
    println!(
        "(a) per request, router-shaped, in process ({} calls per variant per round, batches of {BATCH}):",
        BATCH * BATCHES
    );
    println!("    without layer  ns/req {without_text}");
    println!("    with layer     ns/req {with_text}");
    println!("    layer overhead ns/req {diff_text}");

    let mut headers = AddRoleLayer::new(role.clone()).layer(RoleHeadersLayer::new().layer(inner()));
    let [.., diff] = paired(&mut headers, router_shaped_request, rounds);
    println!(
        "    overhead with role headers       ns/req {}",
        spread(&diff, 1).1
    );
    let mut gate = AddRoleLayer::new(role.clone()).layer(RequirePrimaryLayer::new().layer(inner()));
    let [.., diff] = paired(&mut gate, router_shaped_request, rounds);
    println!(
        "    overhead with the gate admitting ns/req {}",
        spread(&diff, 1).1
    );
    let mut empty = AddRoleLayer::new(role.clone()).layer(inner());
    let [.., diff] = paired(&mut empty, empty_request, rounds);
    println!(
        "    overhead, empty extensions map   ns/req {}",
        spread(&diff, 1).1
    );
    overhead
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Requests per second against `addr` for `dur`, from `concurrency` client tasks.
async fn drive(client: &HttpClient, addr: SocketAddr, dur: Duration, concurrency: u64) -> f64 {
    /// A bound on the count, besides the time bound.
    const MAX_PER_TASK: u64 = 5_000_000;
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let uri: http::Uri = format!("http://{addr}/").parse().unwrap();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, done, uri) = (client.clone(), done.clone(), uri.clone());
            tokio::spawn(async move {
                for _ in 0..MAX_PER_TASK {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let req = Request::get(uri.clone()).body(Empty::new()).unwrap();
                    let res = client.request(req).await.expect("request failed");
                    assert_eq!(res.status(), StatusCode::OK);
                    res.into_body().collect().await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = env_or("LAYER_BENCH_ROUNDS", 12) as usize;
    let round = Duration::from_millis(env_or("LAYER_BENCH_ROUND_MS", 1000));
    let concurrency = env_or("LAYER_BENCH_CONCURRENCY", 16);

    let elector = Elector::builder("layer-bench")
        .backend(MemoryBackend::new())
        .spawn()
        .unwrap();
    let role = elector.handle();
    role.clone().wait_primary().await;

    let overhead = micro(&role, rounds);

    let hello = || get(|| async { "hello, world" });
    let plain = serve(Router::new().route("/", hello())).await;
    let layered = serve(
        Router::new()
            .route("/", hello())
            .layer(AddRoleLayer::new(role.clone())),
    )
    .await;
    let gated = serve(
        Router::new()
            .route("/", hello().layer(RequirePrimaryLayer::new()))
            .layer(AddRoleLayer::new(role.clone())),
    )
    .await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for addr in [plain, layered, gated] {
        drive(&client, addr, round / 3, concurrency).await;
    }

    let (mut base, mut with, mut gate) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ratio, mut gate_ratio) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // Rotate the order, so drift within a round does not favour one variant.
        let mut results = [0.0; 3];
        for k in 0..3 {
            let v = (r + k) % 3;
            let addr = [plain, layered, gated][v];
            results[v] = drive(&client, addr, round, concurrency).await;
        }
        base.push(results[0]);
        with.push(results[1]);
        gate.push(results[2]);
        ratio.push(results[1] / results[0]);
        gate_ratio.push(results[2] / results[0]);
    }
    let (_, base_text) = spread(&base, 0);
    let (_, with_text) = spread(&with, 0);
    let (_, gate_text) = spread(&gate, 0);
    let (median_ratio, ratio_text) = spread(&ratio, 3);
    let (_, gate_ratio_text) = spread(&gate_ratio, 3);
    println!(
        "(b) HTTP hello-world over loopback, {concurrency} client tasks, {} ms rounds:",
        round.as_millis()
    );
    println!("    without layer                      req/s {base_text}");
    println!("    with PrimaryLayer                  req/s {with_text}");
    println!("    with PrimaryLayer + gate on route  req/s {gate_text}");
    println!("    ratio with PrimaryLayer / without        {ratio_text}");
    println!("    ratio with PrimaryLayer + gate / without {gate_ratio_text}");
    elector.shutdown().await;
    println!("layer_overhead_ns={overhead:.1} throughput_ratio={median_ratio:.3}");
}
