//! Forwarding primary-only requests to the primary (`forward` feature), over real HTTP on
//! 127.0.0.1:
//!
//! - in one process, servers whose electors share a memory backend (or a raw TCP listener as
//!   the target, where a test needs a primary that misbehaves): headers, never forwarding twice,
//!   retries only after a marked refusal or a failed connection, bodies buffered or streamed,
//!   limits, the shared secret, upgrades, `Expect: 100-continue`, trusted origins;
//! - https: a primary behind TLS (rustls), reached with a given root and refused without it;
//! - through failovers: server processes on one lock directory or one Redis (this test binary
//!   re-executes itself in server-node mode, `server_node` below), the primary killed with
//!   SIGKILL five times under a steady stream of requests, each executed at most once.

#[path = "common/child.rs"]
mod child;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::routing::{any, get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tower_primary::http::require::{Forward, Origin};
use tower_primary::{
    Elector, Holder, MemoryBackend, NodeId, PrimaryLayer, RequirePrimaryLayer, Role, RoleHandle,
    TermContext,
};

/// A bound on waits for events that are expected to happen, so a bug fails the test instead of
/// hanging it. Never used as synchronisation.
const EVENT_BOUND: Duration = Duration::from_secs(30);

type HttpClient = Client<HttpConnector, Body>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Settings every in-process node uses: the client's address from axum's `ConnectInfo`.
fn forward_settings() -> Forward {
    Forward::new().client_addr(|ext| {
        ext.get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip())
    })
}

/// What the admin handlers of a node saw.
#[derive(Default)]
struct Seen {
    /// Runs of any admin handler.
    runs: AtomicUsize,
    /// The last request's headers.
    headers: Mutex<Option<HeaderMap>>,
}

/// One in-process server node: an elector on the shared memory backend and an axum app whose
/// `/admin/*` routes are behind `gate`.
struct TestNode {
    elector: Elector,
    port: u16,
    seen: Arc<Seen>,
    server: tokio::task::JoinHandle<()>,
}

impl TestNode {
    async fn start(store: &MemoryBackend, lock: &str, id: &str, gate: RequirePrimaryLayer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let primary = PrimaryLayer::new(
            Elector::builder(lock)
                .backend(store.connection())
                .node(NodeId::new(id))
                .advertise(format!("http://127.0.0.1:{port}")),
        )
        .unwrap();
        let seen = Arc::new(Seen::default());
        let app = admin_routes(gate)
            .with_state(seen.clone())
            .layer(primary.clone());
        let server = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
        TestNode {
            elector: primary.elector(),
            port,
            seen,
            server,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn runs(&self) -> usize {
        self.seen.runs.load(Ordering::SeqCst)
    }
}

/// `/admin/echo` answers what it got; `/admin/busy` is an application's own `503`;
/// `/admin/stream` streams three chunks.
fn admin_routes(gate: RequirePrimaryLayer) -> Router<Arc<Seen>> {
    async fn echo(
        State(seen): State<Arc<Seen>>,
        Extension(term): Extension<TermContext>,
        headers: HeaderMap,
        req: Request<Body>,
    ) -> String {
        seen.runs.fetch_add(1, Ordering::SeqCst);
        *seen.headers.lock().unwrap() = Some(headers);
        let method = req.method().clone();
        let uri = req.uri().clone();
        let body = axum::body::to_bytes(req.into_body(), 64 << 20)
            .await
            .unwrap();
        format!(
            "{method} {uri} term {} body {}",
            term.term(),
            String::from_utf8_lossy(&body)
        )
    }
    async fn busy(State(seen): State<Arc<Seen>>) -> (StatusCode, &'static str) {
        seen.runs.fetch_add(1, Ordering::SeqCst);
        (StatusCode::SERVICE_UNAVAILABLE, "the application is busy")
    }
    async fn stream(State(seen): State<Arc<Seen>>) -> Body {
        seen.runs.fetch_add(1, Ordering::SeqCst);
        let chunks = ["one ", "two ", "three"]
            .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from_static(c.as_bytes()))));
        Body::new(StreamBody::new(futures_util::stream::iter(chunks)))
    }
    Router::new()
        .route("/admin/echo", any(echo).layer(gate.clone()))
        .route("/admin/busy", post(busy).layer(gate.clone()))
        .route("/admin/stream", get(stream).layer(gate))
}

/// A primary `a` and a secondary `b` of one lock, both with `gate`, `b` knowing `a` holds it.
async fn pair(gate: RequirePrimaryLayer) -> (TestNode, TestNode) {
    let store = MemoryBackend::new();
    let a = TestNode::start(&store, "fwd", "a", gate.clone()).await;
    a.elector.handle().wait_primary().await;
    let b = TestNode::start(&store, "fwd", "b", gate).await;
    wait_for_holder(&b.elector.handle(), "a").await;
    (a, b)
}

async fn wait_for_holder(handle: &RoleHandle, id: &str) -> Holder {
    let mut handle = handle.clone();
    timeout(EVENT_BOUND, async {
        loop {
            if let Some(h) = handle.holder().filter(|h| h.id == id) {
                return h;
            }
            handle.changed().await;
        }
    })
    .await
    .expect("holder not seen in time")
}

/// Sends `req` and reads the whole answer.
async fn send(client: &HttpClient, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let res = timeout(EVENT_BOUND, client.request(req))
        .await
        .expect("request timed out")
        .unwrap();
    let (parts, body) = res.into_parts();
    let body = timeout(EVENT_BOUND, body.collect())
        .await
        .expect("body timed out")
        .unwrap()
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn post_to(url: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(url).body(body.into()).unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A secondary whose role never changes and whose known holder advertised `url`.
fn fixed_secondary_app(url: &str, gate: RequirePrimaryLayer) -> Router {
    let holder = Holder::new(&NodeId::new("target"), 9).with_url(Some(url.to_owned()));
    let role = RoleHandle::fixed(Role::Secondary {
        holder: Some(holder),
    });
    admin_routes(gate)
        .with_state(Arc::new(Seen::default()))
        .layer(tower_primary::AddRoleLayer::new(role))
}

/// A secondary whose holder advertises the target at `port`, gated by `gate`, serving on a
/// port of its own (returned).
async fn secondary_before(port: u16, gate: RequirePrimaryLayer) -> u16 {
    serve(fixed_secondary_app(
        &format!("http://127.0.0.1:{port}"),
        gate,
    ))
    .await
}

/// `POST body` to `path` on the loopback `port`, with a client of its own.
async fn post_at(port: u16, path: &str, body: impl Into<Body>) -> (StatusCode, HeaderMap, String) {
    send(
        &client(),
        post_to(&format!("http://127.0.0.1:{port}{path}"), body),
    )
    .await
}

async fn serve(app: Router) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    port
}

// ---------------------------------------------------------------------------------------------
// The request and the answer

#[tokio::test]
async fn a_secondary_forwards_to_the_primary_and_streams_its_answer_back() {
    let (a, b) = pair(RequirePrimaryLayer::new().forward_with(forward_settings())).await;
    let client = client();

    let req = Request::post(b.url("/admin/echo?x=1&y=2"))
        .header("connection", "x-hop")
        .header("x-hop", "only for this connection")
        .header("keep-alive", "timeout=5")
        .header("x-custom", "kept")
        .header("host", "admin.example:8443")
        .body(Body::from("the body"))
        .unwrap();
    let (status, headers, text) = send(&client, req).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let term = a.elector.handle().term().unwrap();
    assert_eq!(
        text,
        format!("POST /admin/echo?x=1&y=2 term {term} body the body")
    );
    assert_eq!(headers["x-primary-holder"], "a", "the node that answered");
    assert_eq!((a.runs(), b.runs()), (1, 0));

    let seen = a.seen.headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(seen["x-primary-forwarded"], "b");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "admin.example:8443");
    for hop in ["x-hop", "keep-alive", "x-primary-forward-secret"] {
        assert!(!seen.contains_key(hop), "{hop} was forwarded: {seen:?}");
    }
    assert_ne!(seen["host"], "admin.example:8443", "the primary's own host");

    // A streamed answer comes through whole; the primary answers itself without forwarding.
    let (status, headers, text) = send(
        &client,
        Request::get(b.url("/admin/stream"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "one two three"));
    assert_eq!(headers["x-primary-holder"], "a");
    let (status, headers, _) = send(&client, post_to(&a.url("/admin/echo"), "direct")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!headers.contains_key("x-primary-holder"), "not forwarded");
    assert_eq!((a.runs(), b.runs()), (3, 0));
}

#[tokio::test]
async fn a_proxy_in_front_keeps_its_forwarded_headers_and_the_chain_grows() {
    let (a, b) = pair(RequirePrimaryLayer::new().forward_with(forward_settings())).await;
    let req = Request::post(b.url("/admin/echo"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "admin.example")
        .body(Body::empty())
        .unwrap();
    let (status, _, text) = send(&client(), req).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let seen = a.seen.headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-host"], "admin.example");
}

// ---------------------------------------------------------------------------------------------
// Never twice, never in a loop

#[tokio::test]
async fn a_forwarded_request_is_never_forwarded_again_but_refused_with_the_mark() {
    let (a, b) = pair(RequirePrimaryLayer::new().forward_with(forward_settings())).await;
    let req = Request::post(b.url("/admin/echo"))
        .header("x-primary-forwarded", "c")
        .body(Body::from("once"))
        .unwrap();
    let (status, headers, text) = send(&client(), req).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(headers["x-primary-refused"], "1");
    assert_eq!(headers["x-primary-holder"], "a");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(json(&text)["error"], "not_primary");
    assert_eq!(
        (a.runs(), b.runs()),
        (0, 0),
        "nobody ran it, the primary was not asked"
    );

    // The mark is the gate's alone: a plain refusal (no forwarding involved) has none.
    let plain = Router::new()
        .route(
            "/admin",
            post(|| async { "ran" }).layer(RequirePrimaryLayer::new()),
        )
        .layer(tower_primary::AddRoleLayer::new(RoleHandle::fixed(
            Role::Starting,
        )));
    let port = serve(plain).await;
    let (status, headers, _) = post_at(port, "/admin", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!headers.contains_key("x-primary-refused"));
}

#[tokio::test]
async fn an_applications_own_503_is_passed_on_and_never_retried() {
    let (a, b) = pair(RequirePrimaryLayer::new().forward_with(forward_settings())).await;
    let (status, headers, text) = send(&client(), post_to(&b.url("/admin/busy"), "job")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(text, "the application is busy");
    assert!(!headers.contains_key("x-primary-refused"));
    assert_eq!(a.runs(), 1, "run once, not retried");
}

/// A target that answers the gate's marked refusal `refusals` times, then `200` with the body
/// it got; it counts the requests it read and keeps their bodies.
async fn refusing_target(refusals: usize) -> (u16, Arc<Mutex<Vec<String>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new().route(
        "/admin/echo",
        post({
            let bodies = bodies.clone();
            move |body: Bytes| {
                let bodies = bodies.clone();
                async move {
                    let mut bodies = bodies.lock().unwrap();
                    bodies.push(String::from_utf8_lossy(&body).into_owned());
                    if bodies.len() <= refusals {
                        Response::builder()
                            .status(StatusCode::SERVICE_UNAVAILABLE)
                            .header("x-primary-refused", "1")
                            .body(Body::from("refused"))
                            .unwrap()
                    } else {
                        Response::new(Body::from(format!("ran {}", bodies.len())))
                    }
                }
            }
        }),
    );
    (serve(app).await, bodies)
}

#[tokio::test]
async fn a_marked_refusal_is_retried_with_the_whole_buffered_body() {
    let (port, bodies) = refusing_target(2).await;
    let gate = RequirePrimaryLayer::new().forward_with(forward_settings());
    let front = secondary_before(port, gate).await;
    let (status, headers, text) = post_at(front, "/admin/echo", "payload").await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "ran 3"));
    assert_eq!(headers["x-primary-holder"], "target");
    assert_eq!(*bodies.lock().unwrap(), ["payload", "payload", "payload"]);
}

#[tokio::test]
async fn the_answer_loses_its_hop_by_hop_headers_and_names_the_holder() {
    let app = Router::new().route(
        "/admin/echo",
        post(|| async {
            Response::builder()
                .header("connection", "x-hop")
                .header("x-hop", "for the first hop only")
                .header("x-app", "kept")
                .body(Body::from("ok"))
                .unwrap()
        }),
    );
    let port = serve(app).await;
    let gate = RequirePrimaryLayer::new().forward_with(forward_settings());
    let front = secondary_before(port, gate).await;
    let (status, headers, text) = post_at(front, "/admin/echo", "").await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(headers["x-app"], "kept");
    assert!(!headers.contains_key("x-hop"), "{headers:?}");
    // The target is no gate and did not name itself: the holder it was sent to.
    assert_eq!(headers["x-primary-holder"], "target");
}

#[tokio::test]
async fn a_marked_refusal_of_a_streamed_body_is_passed_on_not_retried() {
    let (port, bodies) = refusing_target(1).await;
    let gate = RequirePrimaryLayer::new().forward_with(forward_settings().buffer_limit(4));
    let front = secondary_before(port, gate).await;
    let (status, headers, _) = send(
        &client(),
        post_to(
            &format!("http://127.0.0.1:{front}/admin/echo"),
            "longer than four",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-primary-refused"], "1", "the refusal itself");
    assert_eq!(bodies.lock().unwrap().len(), 1);
}

/// A port nothing listens on (bound, then closed).
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn an_unreachable_holder_is_tried_again_until_it_answers() {
    let port = closed_port().await;
    let gate =
        RequirePrimaryLayer::new().forward_with(forward_settings().wait_for_holder(EVENT_BOUND));
    let front = secondary_before(port, gate).await;
    let request = tokio::spawn(async move { post_at(front, "/admin/echo", "late").await });
    // The request waits (connections refused) until the target listens.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!request.is_finished(), "answered before the target existed");
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/admin/echo",
        post({
            let runs = runs.clone();
            move |body: String| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                format!("ran {body}")
            }
        }),
    );
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (status, _, text) = request.await.unwrap();
    assert_eq!((status, text.as_str()), (StatusCode::OK, "ran late"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn with_no_reachable_holder_the_wait_is_bounded_then_503_with_retry_after() {
    let port = closed_port().await;
    let wait = Duration::from_millis(300);
    let gate = RequirePrimaryLayer::new()
        .retry_after(Duration::from_secs(2))
        .forward_with(forward_settings().wait_for_holder(wait));
    let front = secondary_before(port, gate).await;
    let started = Instant::now();
    let (status, headers, text) = post_at(front, "/admin/echo", "").await;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(headers["retry-after"], "2");
    assert!(!headers.contains_key("x-primary-refused"));
    let refusal = json(&text);
    assert_eq!(refusal["error"], "not_primary");
    assert_eq!(refusal["holder"]["id"], "target");
    assert!(
        waited >= wait,
        "answered after {waited:?}, before the wait of {wait:?}"
    );

    // No holder known at all: the same bound, `no_primary`.
    let app = admin_routes(
        RequirePrimaryLayer::new().forward_with(forward_settings().wait_for_holder(wait)),
    )
    .with_state(Arc::new(Seen::default()))
    .layer(tower_primary::AddRoleLayer::new(RoleHandle::fixed(
        Role::Starting,
    )));
    let front = serve(app).await;
    let (status, _, text) = post_at(front, "/admin/echo", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&text)["error"], "no_primary");
}

#[tokio::test]
async fn through_a_failover_the_request_waits_for_the_next_holder_and_runs_once() {
    let gate =
        RequirePrimaryLayer::new().forward_with(forward_settings().wait_for_holder(EVENT_BOUND));
    let store = MemoryBackend::new();
    let a = TestNode::start(&store, "fwd", "a", gate.clone()).await;
    a.elector.handle().wait_primary().await;
    let b = TestNode::start(&store, "fwd", "b", gate.clone()).await;
    let c = TestNode::start(&store, "fwd", "c", gate).await;
    wait_for_holder(&b.elector.handle(), "a").await;
    wait_for_holder(&c.elector.handle(), "a").await;

    // The primary stops answering HTTP but keeps the lock: the request waits.
    a.server.abort();
    let url = c.url("/admin/echo");
    let request = tokio::spawn(async move { send(&client(), post_to(&url, "through")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !request.is_finished(),
        "answered while no holder could take it"
    );

    // Then it lets go of the lock: b or c takes it and the waiting request runs there, once.
    a.elector.shutdown().await;
    let (status, headers, text) = request.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{text}");
    let runner = headers["x-primary-holder"].to_str().unwrap().to_owned();
    assert!(runner == "b" || runner == "c", "{runner}");
    let (b_runs, c_runs) = (b.runs(), c.runs());
    assert_eq!(
        (a.runs(), b_runs + c_runs),
        (0, 1),
        "run by exactly one node"
    );
    assert_eq!(
        if runner == "b" { b_runs } else { c_runs },
        1,
        "the node named ran it"
    );
}

// ---------------------------------------------------------------------------------------------
// A target that fails after the request went out

/// A raw TCP target: for each connection, reads `read` bytes (or up to the end of the head),
/// then closes it without answering. Counts connections.
async fn dropping_target(read: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while got.len() < read {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                drop(conn);
            });
        }
    });
    (port, accepted)
}

#[tokio::test]
async fn a_target_that_fails_after_the_request_went_out_gets_502_and_no_retry() {
    for (what, buffer_limit, body) in [
        ("buffered", 1 << 20, "short".repeat(10)),
        ("streamed", 8, "long enough to stream".repeat(100)),
    ] {
        let (port, accepted) = dropping_target(64).await;
        let gate = RequirePrimaryLayer::new().forward_with(
            forward_settings()
                .buffer_limit(buffer_limit)
                .wait_for_holder(EVENT_BOUND),
        );
        let front = secondary_before(port, gate).await;
        let (status, _, text) = post_at(front, "/admin/echo", body).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{what}: {text}");
        let refusal = json(&text);
        assert_eq!(refusal["error"], "forward_failed", "{what}");
        assert!(
            refusal["message"]
                .as_str()
                .unwrap()
                .contains("may or may not have run"),
            "{what}: {text}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "{what}: sent once");
    }
}

#[tokio::test]
async fn a_target_that_sends_no_response_head_in_time_gets_504() {
    let (port, accepted) = dropping_target(usize::MAX).await;
    let gate = RequirePrimaryLayer::new().forward_with(
        forward_settings()
            .response_timeout(Duration::from_millis(200))
            .wait_for_holder(EVENT_BOUND),
    );
    let front = secondary_before(port, gate).await;
    let (status, _, text) = post_at(front, "/admin/echo", "x").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{text}");
    assert_eq!(json(&text)["error"], "forward_timeout");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Limits, trust, upgrades, 100-continue

#[tokio::test]
async fn a_body_over_the_maximum_gets_413_without_contacting_the_primary() {
    let (a, b) = pair(
        RequirePrimaryLayer::new().forward_with(forward_settings().max_body(10).buffer_limit(4)),
    )
    .await;
    let client = client();
    // Known from content-length.
    let (status, _, text) = send(&client, post_to(&b.url("/admin/echo"), "x".repeat(11))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert_eq!(json(&text)["error"], "body_too_large");
    // Chunked, no content-length: found while the body is read.
    let chunks = ["xxxxxx", "xxxxxx"]
        .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from_static(c.as_bytes()))));
    let body = Body::new(StreamBody::new(futures_util::stream::iter(chunks)));
    let (status, _, _) = send(&client, post_to(&b.url("/admin/echo"), body)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.runs(), 0, "the primary never ran it");
    // At the maximum: forwarded.
    let (status, _, _) = send(&client, post_to(&b.url("/admin/echo"), "x".repeat(10))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(a.runs(), 1);
}

#[tokio::test]
async fn with_a_secret_a_forged_forwarded_header_gets_403() {
    let settings = forward_settings().secret("n0des-0nly").unwrap();
    let (a, b) = pair(RequirePrimaryLayer::new().forward_with(settings)).await;
    let client = client();

    // Straight to the primary, pretending to be a forwarding node.
    let forged = Request::post(a.url("/admin/echo"))
        .header("x-primary-forwarded", "b")
        .body(Body::empty())
        .unwrap();
    let (status, _, text) = send(&client, forged).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(json(&text)["error"], "forward_secret");
    let wrong = Request::post(a.url("/admin/echo"))
        .header("x-primary-forwarded", "b")
        .header("x-primary-forward-secret", "guess")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&client, wrong).await.0, StatusCode::FORBIDDEN);
    // On a secondary too, before its role is looked at.
    let forged = Request::post(b.url("/admin/echo"))
        .header("x-primary-forwarded", "a")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&client, forged).await.0, StatusCode::FORBIDDEN);
    assert_eq!((a.runs(), b.runs()), (0, 0));

    // Through the secondary: the secret travels, the handler does not see it.
    let (status, _, text) = send(&client, post_to(&b.url("/admin/echo"), "real")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let seen = a.seen.headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-primary-forwarded"], "b");
    assert!(!seen.contains_key("x-primary-forward-secret"));
    assert_eq!(a.runs(), 1);
}

#[tokio::test]
async fn upgrades_are_not_forwarded_501() {
    let (a, b) = pair(RequirePrimaryLayer::new().forward_with(forward_settings())).await;
    let req = Request::get(b.url("/admin/echo"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Body::empty())
        .unwrap();
    let (status, _, text) = send(&client(), req).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    let refusal = json(&text);
    assert_eq!(refusal["error"], "upgrade_not_forwarded");
    assert!(refusal["message"].as_str().unwrap().contains("WebSocket"));
    assert_eq!(a.runs(), 0);
}

#[tokio::test]
async fn only_trusted_origins_are_forwarded_to() {
    let gate = RequirePrimaryLayer::new()
        .trusted_origins(["http://10.0.0.7:8080".parse::<Origin>().unwrap()])
        .forward_with(forward_settings().wait_for_holder(Duration::from_millis(100)));
    let (a, b) = pair(gate).await;
    let (status, _, text) = send(&client(), post_to(&b.url("/admin/echo"), "")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&text)["error"], "no_primary", "{text}");
    assert_eq!(a.runs(), 0);
}

/// Writes a request head with `Expect: 100-continue` and returns the connection and the
/// first bytes it reads back.
async fn expect_continue(port: u16, body_len: usize) -> (TcpStream, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "POST /admin/echo HTTP/1.1\r\nhost: x\r\ncontent-length: {body_len}\r\n\
         expect: 100-continue\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = timeout(EVENT_BOUND, conn.read(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    (conn, String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test]
async fn expect_100_continue_is_answered_only_once_the_primary_takes_the_body() {
    // No reachable primary: the final 503, never a 100 first.
    let port = closed_port().await;
    let gate = RequirePrimaryLayer::new()
        .forward_with(forward_settings().wait_for_holder(Duration::from_millis(200)));
    let front = secondary_before(port, gate).await;
    let (_conn, first) = expect_continue(front, 5).await;
    assert!(first.starts_with("HTTP/1.1 503"), "{first}");

    // A primary: 100 Continue, then the answer to the body.
    let (a, b) = pair(RequirePrimaryLayer::new().forward_with(forward_settings())).await;
    let (mut conn, first) = expect_continue(b.port, 5).await;
    assert!(first.starts_with("HTTP/1.1 100"), "{first}");
    conn.write_all(b"hello").await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("body hello") {
        let n = timeout(EVENT_BOUND, conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(n, 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert_eq!(a.runs(), 1);
    let seen = a.seen.headers.lock().unwrap().clone().unwrap();
    assert!(
        !seen.contains_key("expect"),
        "answered on the forwarding hop"
    );
}

// ---------------------------------------------------------------------------------------------
// https

/// A TLS listener for `axum::serve`: a handshake failure drops that connection only.
struct TlsListener {
    tcp: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.tls.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

#[tokio::test]
async fn an_https_primary_is_reached_over_tls_with_its_certificate_checked() {
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = made.cert.der().clone();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(made.key_pair.serialize_der());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/admin/echo",
        post({
            let runs = runs.clone();
            move |body: String| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                format!("over tls: {body}")
            }
        }),
    );
    let listener = TlsListener {
        tcp: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
    };
    let port = listener.tcp.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("https://127.0.0.1:{port}");

    // Trusting the primary's certificate: forwarded over TLS.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let gate = RequirePrimaryLayer::new().forward_with(forward_settings().tls_config(client_tls));
    let front = serve(fixed_secondary_app(&url, gate)).await;
    let (status, _, text) = post_at(front, "/admin/echo", "sealed").await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::OK, "over tls: sealed")
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // With the system's roots the self-signed certificate is refused: nothing is sent.
    let gate = RequirePrimaryLayer::new()
        .forward_with(forward_settings().wait_for_holder(Duration::from_millis(200)));
    let front = serve(fixed_secondary_app(&url, gate)).await;
    let (status, _, text) = post_at(front, "/admin/echo", "sealed").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the untrusted primary got nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// Through failovers, with real processes

mod processes {
    use std::collections::HashMap;
    use std::io::Write as _;
    use std::process::Stdio;
    use std::sync::atomic::AtomicBool;

    use axum::extract::Query;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::process::{Child, Command};
    use tokio::sync::mpsc;
    use tower_primary::{FileBackend, terminate_signal};

    use super::*;

    /// Set in a child process: the lock directory it serves with (runs are logged there too).
    const DIR_ENV: &str = "TOWER_PRIMARY_FORWARD_TEST_DIR";
    /// Set in a child process to campaign on a server backend instead of the lock directory.
    const BACKEND_ENV: &str = "TOWER_PRIMARY_FORWARD_TEST_BACKEND";
    const LOCK: &str = "forward-failover";
    /// The forwarders' wait for a holder.
    const WAIT: Duration = Duration::from_secs(3);

    /// Server-node mode: when this binary is re-executed by the test below with the directory
    /// set, serve HTTP until killed or until stdin closes. In a normal test run it returns.
    #[test]
    fn server_node() {
        let Ok(dir) = std::env::var(DIR_ENV) else {
            return;
        };
        crate::child::serve_until_stdin_closes(serve_node(dir));
    }

    #[derive(serde::Deserialize)]
    struct Run {
        id: u64,
    }

    async fn serve_node(dir: String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let backend: Box<dyn tower_primary::backend::Backend> = match std::env::var(BACKEND_ENV) {
            Ok(url) => tower_primary::backend::from_url(&url).unwrap(),
            Err(_) => Box::new(FileBackend::new(&dir)),
        };
        let primary = PrimaryLayer::new(
            Elector::builder(LOCK)
                .backend(backend)
                .advertise(format!("http://127.0.0.1:{port}")),
        )
        .unwrap();
        let log = std::path::Path::new(&dir).join(format!("runs-{}", std::process::id()));
        let run = move |Extension(term): Extension<TermContext>, Query(run): Query<Run>| {
            let log = log.clone();
            async move {
                // One line per execution, written before the answer.
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap();
                writeln!(file, "{}", run.id).unwrap();
                format!("ran {} term {}", run.id, term.term())
            }
        };
        let gate = RequirePrimaryLayer::new().forward_with(Forward::new().wait_for_holder(WAIT));
        let app = Router::new()
            .route("/admin/run", post(run).layer(gate))
            .layer(primary.clone());
        let elector = primary.elector();
        let mut role = elector.handle();
        println!("EVENT listening {port} {}", role.node().id());
        tokio::spawn(async move {
            loop {
                println!("EVENT role {}", role.role().as_str());
                role.changed().await;
            }
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(elector.shutdown_signal(terminate_signal()))
            .await
            .unwrap();
    }

    /// A server process, and its role events on a channel shared by all nodes.
    struct Node {
        child: Child,
        port: u16,
    }

    async fn spawn_node(
        dir: &std::path::Path,
        backend: Option<&str>,
        roles: mpsc::UnboundedSender<(u16, String)>,
    ) -> Node {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .envs(backend.map(|url| (BACKEND_ENV, url)))
            .args([
                "processes::server_node",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = timeout(EVENT_BOUND, async {
            loop {
                let line = lines.next_line().await.unwrap().expect("the node exited");
                if let Some(at) = line.find("EVENT listening ") {
                    let rest = &line[at + "EVENT listening ".len()..];
                    return rest.split(' ').next().unwrap().parse::<u16>().unwrap();
                }
            }
        })
        .await
        .expect("the node did not listen in time");
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(at) = line.find("EVENT role ") {
                    let role = line[at + "EVENT role ".len()..].trim().to_owned();
                    if roles.send((port, role)).is_err() {
                        return;
                    }
                }
            }
        });
        Node { child, port }
    }

    /// What one request of the stream got: its status, or `None` when the node it was sent to
    /// could not be reached (it had just been killed: the load balancer's affair).
    struct Outcome {
        id: u64,
        status: Option<StatusCode>,
        took: Duration,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn five_primary_kills_under_a_steady_stream_run_no_request_twice() {
        let by_status = kill_primaries_under_a_stream(None).await;
        assert!(
            by_status.get(&Some(200)).copied().unwrap_or(0) >= 100,
            "{by_status:?}"
        );
    }

    /// On a lease backend the lock outlives a killed primary by its lease (5 s), longer than the
    /// forwarders' wait (3 s): requests in the gap are refused with 503 after the bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn five_primary_kills_on_redis_refuse_in_the_gap_and_run_no_request_twice() {
        use tower_primary_lab::servers::{self, RedisServer};
        let Some(redis) = servers::require("redis-server", RedisServer::start().await) else {
            return;
        };
        let url = format!("{}?max_lease=5s", redis.url());
        let by_status = kill_primaries_under_a_stream(Some(&url)).await;
        assert!(
            by_status.get(&Some(200)).copied().unwrap_or(0) >= 50,
            "{by_status:?}"
        );
        assert!(
            by_status.contains_key(&Some(503)),
            "no request met the gap: {by_status:?}"
        );
    }

    /// Five SIGKILLs of the primary among three server processes (replaced as they die) under a
    /// stream of requests; checks every request and returns the count of each answer (`None`:
    /// sent to a node that had just been killed).
    async fn kill_primaries_under_a_stream(backend: Option<&str>) -> HashMap<Option<u16>, usize> {
        let dir = tempfile::tempdir().unwrap();
        let (roles_tx, mut roles) = mpsc::unbounded_channel();
        let mut nodes: Vec<Node> = Vec::new();
        for _ in 0..3 {
            nodes.push(spawn_node(dir.path(), backend, roles_tx.clone()).await);
        }
        let ports: Arc<Mutex<Vec<u16>>> =
            Arc::new(Mutex::new(nodes.iter().map(|n| n.port).collect()));
        // How many requests of the stream have been answered, watched by the failover loop.
        let (answered, mut answers) = tokio::sync::watch::channel(0usize);
        let stop = Arc::new(AtomicBool::new(false));

        // The stream: one request after the other, round robin over the live nodes, as a load
        // balancer would send them.
        let stream = tokio::spawn({
            let (ports, stop) = (ports.clone(), stop.clone());
            async move {
                let client = client();
                let mut outcomes = Vec::new();
                let mut id = 0;
                while !stop.load(Ordering::SeqCst) {
                    id += 1;
                    let port = {
                        let ports = ports.lock().unwrap();
                        ports[id as usize % ports.len()]
                    };
                    let url = format!("http://127.0.0.1:{port}/admin/run?id={id}");
                    let started = Instant::now();
                    let res = timeout(EVENT_BOUND, client.request(post_to(&url, ""))).await;
                    let status = match res.expect("a request hung") {
                        Ok(res) => {
                            let status = res.status();
                            let _ = res.into_body().collect().await;
                            Some(status)
                        }
                        Err(_) => None,
                    };
                    outcomes.push(Outcome {
                        id,
                        status,
                        took: started.elapsed(),
                    });
                    answered.send_modify(|n| *n += 1);
                }
                outcomes
            }
        });

        let mut primary: Option<u16> = None;
        for _ in 0..5 {
            // Wait for a live primary, let requests flow through it, then kill it.
            let killed = timeout(EVENT_BOUND, async {
                loop {
                    let live = ports.lock().unwrap().clone();
                    if let Some(p) = primary.filter(|p| live.contains(p)) {
                        return p;
                    }
                    let (port, role) = roles.recv().await.unwrap();
                    if role == "primary" {
                        primary = Some(port);
                    }
                }
            })
            .await
            .expect("no primary in time");
            let before = *answers.borrow();
            timeout(EVENT_BOUND, answers.wait_for(|n| *n >= before + 30))
                .await
                .expect("the stream stalled")
                .unwrap();
            let at = nodes.iter().position(|n| n.port == killed).unwrap();
            let mut node = nodes.remove(at);
            node.child.start_kill().unwrap(); // SIGKILL
            node.child.wait().await.unwrap();
            ports.lock().unwrap().retain(|p| *p != killed);
            let fresh = spawn_node(dir.path(), backend, roles_tx.clone()).await;
            ports.lock().unwrap().push(fresh.port);
            nodes.push(fresh);
        }
        // Requests after the last failover.
        let before = *answers.borrow();
        timeout(EVENT_BOUND, answers.wait_for(|n| *n >= before + 30))
            .await
            .expect("the stream stalled after the failovers")
            .unwrap();
        stop.store(true, Ordering::SeqCst);
        let outcomes = stream.await.unwrap();

        // Every execution, from every node's log.
        let mut runs: HashMap<u64, usize> = HashMap::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("runs-")
            {
                for line in std::fs::read_to_string(&path).unwrap().lines() {
                    *runs.entry(line.parse().unwrap()).or_default() += 1;
                }
            }
        }
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "executed more than once: {twice:?}");
        let mut by_status: HashMap<Option<u16>, usize> = HashMap::new();
        for o in &outcomes {
            *by_status.entry(o.status.map(|s| s.as_u16())).or_default() += 1;
            match o.status {
                Some(StatusCode::OK) => assert_eq!(runs.get(&o.id), Some(&1), "request {}", o.id),
                Some(StatusCode::SERVICE_UNAVAILABLE) => {
                    assert_eq!(runs.get(&o.id), None, "request {} refused yet run", o.id);
                }
                Some(StatusCode::BAD_GATEWAY) | None => {}
                Some(other) => panic!("request {} got {other}", o.id),
            }
            // Generous: the wait for a holder plus a connection and an answer.
            let bound = WAIT + Duration::from_secs(3);
            assert!(o.took < bound, "request {} took {:?}", o.id, o.took);
        }
        eprintln!(
            "{} requests through 5 SIGKILLs ({}): {by_status:?}",
            outcomes.len(),
            backend.unwrap_or("file")
        );
        by_status
    }
}
