//! The HTTP integration: `PrimaryLayer`, `AddRoleLayer`, `RoleHeadersLayer`, the primary-only gate,
//! the extractors and `/health/role`.
//!
//! - tower `oneshot` tests for every branch: primary, secondary, starting, missing layer, redirect
//!   with and without an advertised URL (valid, invalid, trusted or not), the JSON refusal body,
//!   requests and streaming response bodies in flight during step-down and after the grace (on
//!   tokio's paused clock, with the memory backend);
//! - a client over real HTTP that sees a body cut after the grace as truncated;
//! - real HTTP over 127.0.0.1 between two server processes that share a lock directory: this test
//!   binary re-executes itself in server-node mode (`server_node` below).

#[path = "common/child.rs"]
mod child;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::routing::{get, post};
use axum::{Extension, Router};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tower::{Layer, ServiceExt, service_fn};
use tower_primary::http::health::{self, RoleReport};
use tower_primary::http::require::{Origin, ResponseBody};
use tower_primary::{
    AddRoleLayer, Clock, Elector, Holder, MemoryBackend, NodeId, PrimaryLayer, RequirePrimaryLayer,
    Role, RoleHandle, RoleHeadersLayer, TermContext,
};

/// A bound on waits for events that are expected to happen, so a bug fails the test instead of
/// hanging it. Never used as synchronisation.
const EVENT_BOUND: Duration = Duration::from_secs(30);

fn holder(id: &str, term: u64, url: Option<&str>) -> Holder {
    Holder::new(&NodeId::new(id), term).with_url(url.map(str::to_owned))
}

fn secondary_of(h: Holder) -> RoleHandle {
    RoleHandle::fixed(Role::Secondary { holder: Some(h) })
}

async fn body_text(res: Response<Body>) -> String {
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn call_owned(app: Router, method: &str, uri: &str) -> Response<Body> {
    call(&app, method, uri).await
}

async fn call(app: &Router, method: &str, uri: &str) -> Response<Body> {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(req).await.unwrap()
}

/// An admin router: `/admin` gated with 503, `/admin/redirect` gated with 307, counting the
/// handler's runs.
fn admin_app(role: Option<RoleHandle>, runs: &Arc<AtomicUsize>) -> Router {
    let handler = {
        let runs = runs.clone();
        move |Extension(term): Extension<TermContext>| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                format!("served under term {}", term.term())
            }
        }
    };
    let app = Router::new()
        .route(
            "/admin",
            post(handler.clone()).layer(RequirePrimaryLayer::new()),
        )
        .route(
            "/admin/redirect",
            post(handler).layer(RequirePrimaryLayer::new().redirect()),
        );
    match role {
        Some(role) => app.layer(AddRoleLayer::new(role)),
        None => app,
    }
}

// ---------------------------------------------------------------------------------------------
// PrimaryLayer, AddRoleLayer, RoleHeadersLayer

#[tokio::test]
async fn layer_puts_the_handle_into_every_request_on_any_body_type() {
    // A plain tower stack, no axum: request body `String`, response body `Vec<u8>`.
    let inner = service_fn(|req: Request<String>| async move {
        let role = req.extensions().get::<RoleHandle>().map(RoleHandle::role);
        Ok::<_, Infallible>(Response::new(format!("{role:?}").into_bytes()))
    });
    let svc = AddRoleLayer::new(RoleHandle::fixed(Role::primary(4))).layer(inner);
    let res = svc.oneshot(Request::new(String::new())).await.unwrap();
    let text = String::from_utf8(res.into_body()).unwrap();
    assert!(text.starts_with("Some(Primary { term: 4"), "{text}");
}

fn res_has_role_headers<B>(res: &Response<B>) -> bool {
    res.headers().contains_key("x-primary-role") || res.headers().contains_key("x-primary-term")
}

#[tokio::test]
async fn role_headers_are_off_by_default_and_on_every_response_when_asked() {
    let route = || Router::new().route("/", get(|| async { "hi" }));

    let app = route().layer(AddRoleLayer::new(RoleHandle::fixed(Role::primary(11))));
    assert!(!res_has_role_headers(&call(&app, "GET", "/").await));

    let cases = [
        (RoleHandle::fixed(Role::primary(11)), "primary", Some("11")),
        (
            secondary_of(holder("web-1", 12, None)),
            "secondary",
            Some("12"),
        ),
        (RoleHandle::fixed(Role::Starting), "starting", None),
    ];
    for (role, want_role, want_term) in cases {
        let app = route()
            .layer(RoleHeadersLayer::new())
            .layer(AddRoleLayer::new(role));
        // Also on a 404 from the router's fallback.
        for path in ["/", "/missing"] {
            let res = call(&app, "GET", path).await;
            assert_eq!(res.headers()["x-primary-role"], want_role, "{path}");
            assert_eq!(
                res.headers()
                    .get("x-primary-term")
                    .map(|v| v.to_str().unwrap()),
                want_term,
                "{path}"
            );
        }
    }
}

#[test]
fn owned_elector_is_checked_at_once_and_needs_a_runtime_to_claim() {
    // No runtime here: building the layer only checks the configuration.
    let err = PrimaryLayer::new(Elector::builder("bad name")).unwrap_err();
    assert!(err.to_string().contains("invalid lock name"), "{err}");
    let err = PrimaryLayer::new(Elector::builder("no-backend")).unwrap_err();
    assert!(err.to_string().contains("no backend"), "{err}");

    let layer = PrimaryLayer::new(Elector::builder("no-rt").backend(MemoryBackend::new())).unwrap();
    let inner = service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| layer.layer(inner)))
        .expect_err("building the service outside a runtime must fail");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("tokio runtime"), "{msg}");
    assert!(!layer.is_claimed());

    // Inside a runtime the same layer claims.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let elector = layer.elector();
        assert!(layer.is_claimed());
        timeout(EVENT_BOUND, elector.handle().wait_primary())
            .await
            .unwrap();
        elector.shutdown().await;
    });
}

#[tokio::test]
async fn owned_elector_is_claimed_once_for_all_routes_and_clones() {
    let store = MemoryBackend::new();
    let layer = PrimaryLayer::new(
        Elector::builder("claim-once")
            .backend(store.clone())
            .node(NodeId::new("web")),
    )
    .unwrap();
    assert!(!layer.is_claimed());
    let whoami = || get(|role: Role| async move { format!("{role:?}") });
    let app = Router::new()
        .route("/a", whoami())
        .route("/b", whoami())
        .route("/c", whoami())
        .layer(layer.clone());
    let other_clone = layer.clone();
    assert!(other_clone.is_claimed(), "clones share the claim");

    let elector = layer.elector();
    let term = timeout(EVENT_BOUND, elector.handle().wait_primary())
        .await
        .unwrap()
        .term();
    // One elector behind every route: had each route spawned its own, only one of them could
    // be primary.
    for path in ["/a", "/b", "/c"] {
        let text = body_text(call(&app, "GET", path).await).await;
        assert!(
            text.starts_with(&format!("Primary {{ term: {term},")),
            "{path}: {text}"
        );
    }
    // And another node of the same lock sees "web" as the only holder.
    let other = Elector::builder("claim-once")
        .backend(store.connection())
        .node(NodeId::new("other"))
        .spawn()
        .unwrap();
    let mut other_role = other.handle();
    let seen = timeout(EVENT_BOUND, async {
        loop {
            if let Some(h) = other_role.holder() {
                return h;
            }
            other_role.changed().await;
        }
    })
    .await
    .unwrap();
    assert_eq!((seen.id.as_str(), seen.term), ("web", term));
    assert!(!other.handle().is_primary());
    other.shutdown().await;
    elector.shutdown().await;
}

#[cfg(feature = "file")]
#[test]
fn file_layer_checks_the_directory_at_once_and_claims_in_a_runtime() {
    use tower_primary::FileBackend;
    let file_layer = |dir: &std::path::Path| {
        PrimaryLayer::new(Elector::builder("primary").backend(FileBackend::new(dir)))
    };
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("does-not-exist");
    let err = file_layer(&missing).unwrap_err();
    assert!(
        matches!(err, tower_primary::ConfigError::LockDir { .. }),
        "{err}"
    );
    // Checked here, outside a runtime; claimed inside one.
    let layer = file_layer(dir.path()).unwrap();
    assert!(!layer.is_claimed());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let elector = layer.elector();
        let ctx = timeout(EVENT_BOUND, elector.handle().wait_primary())
            .await
            .unwrap();
        assert_eq!(ctx.lock(), "primary");
        elector.shutdown().await;
    });
    assert!(dir.path().join("primary.lock").exists());
}

// ---------------------------------------------------------------------------------------------
// RequirePrimaryLayer

#[tokio::test]
async fn gate_admits_on_the_primary_and_gives_the_handler_its_term() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = admin_app(Some(RoleHandle::fixed(Role::primary(21))), &runs);
    let res = call(&app, "POST", "/admin").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body_text(res).await, "served under term 21");
    let res = call(&app, "POST", "/admin/redirect").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn gate_refuses_on_a_secondary_with_503_and_never_runs_the_handler() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = admin_app(
        Some(secondary_of(holder("web-1", 7, Some("http://127.0.0.1:9")))),
        &runs,
    );
    let res = call(&app, "POST", "/admin?x=1").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["x-primary-holder"], "web-1");
    assert!(!res.headers().contains_key("location"));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn gate_refuses_while_starting_without_naming_a_holder() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = admin_app(Some(RoleHandle::fixed(Role::Starting)), &runs);
    for path in ["/admin", "/admin/redirect"] {
        let res = call(&app, "POST", path).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(res.headers()["retry-after"], "1");
        assert!(!res.headers().contains_key("x-primary-holder"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn gate_without_the_layer_answers_500_and_never_runs_the_handler() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = admin_app(None, &runs);
    for path in ["/admin", "/admin/redirect"] {
        let res = call(&app, "POST", path).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR, "{path}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn gate_redirects_to_the_advertised_url_keeping_path_and_query() {
    let runs = Arc::new(AtomicUsize::new(0));
    for (base, want) in [
        (
            "http://10.0.0.7:8080",
            "http://10.0.0.7:8080/admin/redirect?a=1&b=%20",
        ),
        (
            "http://10.0.0.7:8080/",
            "http://10.0.0.7:8080/admin/redirect?a=1&b=%20",
        ),
        (
            "https://p.example/app",
            "https://p.example/app/admin/redirect?a=1&b=%20",
        ),
    ] {
        let app = admin_app(Some(secondary_of(holder("web-1", 7, Some(base)))), &runs);
        let res = call(&app, "POST", "/admin/redirect?a=1&b=%20").await;
        assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT, "{base}");
        assert_eq!(res.headers()["location"], want);
        assert_eq!(res.headers()["x-primary-holder"], "web-1");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn gate_redirect_without_an_advertised_url_answers_503() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = admin_app(Some(secondary_of(holder("web-1", 7, None))), &runs);
    let res = call(&app, "POST", "/admin/redirect").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["x-primary-holder"], "web-1");
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn gate_never_redirects_to_this_node_itself() {
    // A stale holder record naming this node (RoleHandle::fixed's node is "fixed").
    let runs = Arc::new(AtomicUsize::new(0));
    let app = admin_app(
        Some(secondary_of(holder("fixed", 7, Some("http://127.0.0.1:1")))),
        &runs,
    );
    let res = call(&app, "POST", "/admin/redirect").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!res.headers().contains_key("x-primary-holder"));
}

#[tokio::test]
async fn gate_retry_after_is_rounded_up_to_seconds_and_a_handle_replaces_the_layer() {
    let runs = Arc::new(AtomicUsize::new(0));
    let count = {
        let runs = runs.clone();
        move || {
            runs.fetch_add(1, Ordering::SeqCst);
            async { "ok" }
        }
    };
    let gate = RequirePrimaryLayer::new()
        .retry_after(Duration::from_millis(2500))
        .with_handle(RoleHandle::fixed(Role::Starting));
    let app = Router::new().route("/admin", post(count.clone()).layer(gate));
    let res = call(&app, "POST", "/admin").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "3");

    let gate = RequirePrimaryLayer::new().with_handle(RoleHandle::fixed(Role::primary(2)));
    let app = Router::new().route("/admin", post(count).layer(gate));
    assert_eq!(call(&app, "POST", "/admin").await.status(), StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn refusal_of(res: Response<Body>) -> serde_json::Value {
    assert_eq!(res.headers()["content-type"], "application/json");
    serde_json::from_str(&body_text(res).await).expect("a JSON refusal body")
}

#[tokio::test]
async fn every_gate_refusal_carries_a_json_body() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = admin_app(Some(secondary_of(holder("web-1", 7, None))), &runs);
    let refusal = refusal_of(call(&app, "POST", "/admin").await).await;
    assert_eq!(refusal["error"], "not_primary");
    assert_eq!(refusal["holder"]["id"], "web-1");
    assert_eq!(refusal["holder"]["term"], 7);
    assert_eq!(refusal["retry_after_ms"], 1000);

    let app = admin_app(Some(RoleHandle::fixed(Role::Starting)), &runs);
    for path in ["/admin", "/admin/redirect"] {
        let refusal = refusal_of(call(&app, "POST", path).await).await;
        assert_eq!(refusal["error"], "no_primary", "{path}");
        assert!(refusal["holder"].is_null());
        assert_eq!(refusal["retry_after_ms"], 1000);
    }

    let app = admin_app(
        Some(secondary_of(holder(
            "web-1",
            7,
            Some("http://10.0.0.7:8080"),
        ))),
        &runs,
    );
    let res = call(&app, "POST", "/admin/redirect").await;
    assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
    let refusal = refusal_of(res).await;
    assert_eq!(refusal["error"], "not_primary");
    assert_eq!(refusal["holder"]["url"], "http://10.0.0.7:8080");

    let res = call(&admin_app(None, &runs), "POST", "/admin").await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let refusal = refusal_of(res).await;
    assert_eq!(refusal["error"], "missing_layer");
    assert!(
        refusal["message"]
            .as_str()
            .unwrap()
            .contains("add PrimaryLayer")
    );

    // The extractor's 503 is the same answer.
    let app = extractor_app().layer(AddRoleLayer::new(secondary_of(holder("web-9", 8, None))));
    let refusal = refusal_of(call(&app, "POST", "/term").await).await;
    assert_eq!(refusal["error"], "not_primary");
    assert_eq!(refusal["holder"]["id"], "web-9");
    assert_eq!(refusal["retry_after_ms"], 1000);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// The refusal body is exactly `{"error", "holder": Holder | null, "retry_after_ms", "message"}`,
/// with `content-type: application/json` and a `Retry-After` that agrees with `retry_after_ms`.
#[tokio::test]
async fn a_503_refusal_body_is_the_documented_json() {
    let h = holder("web-1", 7, Some("http://10.0.0.7:8080"));
    let cases = [
        (
            secondary_of(h.clone()),
            "not_primary",
            serde_json::to_value(&h).unwrap(),
        ),
        (
            RoleHandle::fixed(Role::Starting),
            "no_primary",
            serde_json::Value::Null,
        ),
        (
            RoleHandle::fixed(Role::Secondary { holder: None }),
            "no_primary",
            serde_json::Value::Null,
        ),
    ];
    for (role, error, want_holder) in cases {
        let gate = RequirePrimaryLayer::new().retry_after(Duration::from_millis(2500));
        let app = Router::new()
            .route("/admin", post(|| async { "ran" }).layer(gate))
            .route(
                "/term",
                post(|term: TermContext| async move { term.term().to_string() }),
            )
            .layer(AddRoleLayer::new(role));
        // The gate (Retry-After rounded up to 3 s) and the extractor (1 s) answer alike.
        for (path, retry_after) in [("/admin", 3), ("/term", 1)] {
            let res = call(&app, "POST", path).await;
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert_eq!(
                res.headers()["retry-after"],
                retry_after.to_string(),
                "{path}"
            );
            let body = refusal_of(res).await;
            let mut keys: Vec<&str> = body
                .as_object()
                .expect("a JSON object")
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                ["error", "holder", "message", "retry_after_ms"],
                "{path}: {body}"
            );
            assert_eq!(body["error"], error, "{path}");
            assert_eq!(body["holder"], want_holder, "{path}");
            assert_eq!(body["retry_after_ms"], retry_after * 1000, "{path}");
            assert!(
                body["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("not primary for lock")
            );
            // And it reads back as the public type.
            let refusal: tower_primary::http::require::Refusal =
                serde_json::from_value(body).unwrap();
            assert_eq!(serde_json::to_value(&refusal.holder).unwrap(), want_holder);
        }
    }
}

#[tokio::test]
async fn gate_never_redirects_to_a_holder_url_that_is_not_an_http_origin() {
    let runs = Arc::new(AtomicUsize::new(0));
    for url in [
        "javascript:alert(1)",
        "//evil.example",
        "/admin",
        "ftp://10.0.0.7",
        "http://user:secret@10.0.0.7:8080",
        "http://evil.example@10.0.0.7",
        "http://10.0.0.7:8080/app?next=http://evil.example",
        "http://10.0.0.7:8080/#x",
        "http://",
        "10.0.0.7:8080",
        "http://10.0.0.7:8080\r\nSet-Cookie: a=b",
    ] {
        let app = admin_app(Some(secondary_of(holder("web-1", 7, Some(url)))), &runs);
        let res = call(&app, "POST", "/admin/redirect").await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{url:?}");
        assert!(!res.headers().contains_key("location"), "{url:?}");
        assert_eq!(res.headers()["x-primary-holder"], "web-1");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn advertise_accepts_only_http_origins_and_names_the_setting() {
    for url in [
        "ftp://10.0.0.7",
        "http://user:secret@10.0.0.7:8080",
        "10.0.0.7:8080",
        "/relative",
        "http://10.0.0.7:8080/?a=1",
        "http://10.0.0.7:8080/#top",
        "http://10.0.0.7:99999",
        "",
    ] {
        let err = Elector::builder("advertise")
            .backend(MemoryBackend::new())
            .advertise(url)
            .spawn()
            .expect_err(url);
        let text = err.to_string();
        assert!(text.contains("advertise"), "{url:?}: {text}");
        assert!(
            PrimaryLayer::new(
                Elector::builder("advertise")
                    .backend(MemoryBackend::new())
                    .advertise(url)
            )
            .is_err(),
            "{url:?}"
        );
    }
    for url in [
        "http://10.0.0.7:8080",
        "https://primary.example/",
        "http://[::1]:8080",
        "https://p.example/app",
    ] {
        let elector = Elector::builder("advertise")
            .backend(MemoryBackend::new())
            .advertise(url)
            .spawn()
            .unwrap_or_else(|err| panic!("{url:?}: {err}"));
        elector.shutdown().await;
    }
}

/// A gated tower service whose handler reports its term, waits for the term to end, and then
/// for the test's go-ahead.
struct InFlightProbe {
    started: oneshot::Receiver<TermContext>,
    saw_cancel: oneshot::Receiver<()>,
    finish: oneshot::Sender<()>,
}

fn gated_probe(
    role: RoleHandle,
) -> (
    impl std::future::Future<Output = Result<Response<ResponseBody<String>>, Infallible>>,
    InFlightProbe,
) {
    let (started_tx, started) = oneshot::channel();
    let (cancel_tx, saw_cancel) = oneshot::channel();
    let (finish, finish_rx) = oneshot::channel::<()>();
    let mut slot = Some((started_tx, cancel_tx, finish_rx));
    // An empty body rather than `()`: with the `forward` feature the gate's request body must
    // be an `http_body::Body`.
    let handler = service_fn(move |req: Request<Empty<Bytes>>| {
        let taken = slot.take();
        async move {
            let (started_tx, cancel_tx, finish_rx) = taken.expect("called once");
            let ctx = req.extensions().get::<TermContext>().cloned().unwrap();
            started_tx.send(ctx.clone()).unwrap();
            ctx.cancelled().await;
            cancel_tx.send(()).unwrap();
            let _ = finish_rx.await;
            Ok::<_, Infallible>(Response::new(format!("finished term {}", ctx.term())))
        }
    });
    let svc = AddRoleLayer::new(role).layer(RequirePrimaryLayer::new().layer(handler));
    (
        svc.oneshot(Request::new(Empty::new())),
        InFlightProbe {
            started,
            saw_cancel,
            finish,
        },
    )
}

fn paused_node(store: &MemoryBackend, lock: &str, node: &str, grace: Duration) -> Elector {
    Elector::builder(lock)
        .backend(store.connection())
        .node(NodeId::new(node))
        .grace(grace)
        .clock(Clock::tokio())
        .spawn()
        .unwrap()
}

async fn wait_holder(handle: &mut RoleHandle, id: &str) -> Holder {
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

#[tokio::test(start_paused = true)]
async fn step_down_waits_for_a_gated_request_in_flight_before_releasing() {
    let store = MemoryBackend::new();
    let grace = Duration::from_secs(60);
    let a = paused_node(&store, "in-flight", "a", grace);
    let term_a = a.handle().wait_primary().await.term();
    let b = paused_node(&store, "in-flight", "b", grace);
    wait_holder(&mut b.handle(), "a").await;

    let (request, probe) = gated_probe(a.handle());
    let request = tokio::spawn(request);
    let admitted = probe.started.await.unwrap();
    assert_eq!(admitted.term(), term_a, "admitted under the current term");

    let stepping = tokio::spawn({
        let a = a.clone();
        async move { a.step_down().await }
    });
    // The handler sees its term end (step 2 of the handover)...
    probe.saw_cancel.await.unwrap();
    assert!(!admitted.is_valid());
    assert!(!a.handle().is_primary(), "no longer admitting");
    // ... and new gated requests are refused from then on.
    let refused = AddRoleLayer::new(a.handle())
        .layer(
            RequirePrimaryLayer::new().layer(service_fn(|_: Request<Empty<Bytes>>| async {
                Ok::<_, Infallible>(Response::new(String::from("must not run")))
            })),
        )
        .oneshot(Request::new(Empty::new()))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);

    // While the request is in flight the lock is not released: b stays secondary for as long
    // as we care to wait below the grace (paused clock: 30 virtual seconds).
    let mut b_role = b.handle();
    assert!(
        timeout(Duration::from_secs(30), b_role.wait_primary())
            .await
            .is_err(),
        "b became primary while a's gated request was in flight"
    );
    assert!(!stepping.is_finished());

    // The request finishes: the step-down completes and b takes over with a higher term.
    probe.finish.send(()).unwrap();
    let res = request.await.unwrap().unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, format!("finished term {term_a}"));
    stepping.await.unwrap().unwrap();
    let term_b = timeout(EVENT_BOUND, b_role.wait_primary())
        .await
        .unwrap()
        .term();
    assert!(term_b > term_a);
    a.shutdown().await;
    b.shutdown().await;
}

/// An extracted `TermContext` counts as in flight while it lives, also on a route without the
/// gate: step-down waits for the handler before it releases the lock.
#[tokio::test(start_paused = true)]
async fn step_down_waits_for_an_extracted_term_context_without_the_gate() {
    let store = MemoryBackend::new();
    let grace = Duration::from_secs(60);
    let a = paused_node(&store, "extracted-term", "a", grace);
    let term_a = a.handle().wait_primary().await.term();
    let b = paused_node(&store, "extracted-term", "b", grace);
    wait_holder(&mut b.handle(), "a").await;

    let (started_tx, started_rx) = oneshot::channel::<u64>();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let channels = Arc::new(std::sync::Mutex::new(Some((started_tx, finish_rx))));
    let app = Router::new()
        .route(
            "/work",
            post(move |term: TermContext| {
                let channels = channels.lock().unwrap().take();
                async move {
                    let (started, finish) = channels.expect("one request");
                    started.send(term.term()).unwrap();
                    finish.await.unwrap();
                    format!("finished term {}", term.term())
                }
            }),
        )
        .layer(AddRoleLayer::new(a.handle()));
    let request = tokio::spawn(call_owned(app, "POST", "/work"));
    assert_eq!(started_rx.await.unwrap(), term_a);

    let stepping = tokio::spawn({
        let a = a.clone();
        async move { a.step_down().await }
    });
    let mut b_role = b.handle();
    assert!(
        timeout(Duration::from_secs(30), b_role.wait_primary())
            .await
            .is_err(),
        "b became primary while a's handler held its term"
    );
    assert!(!stepping.is_finished());

    finish_tx.send(()).unwrap();
    let res = request.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body_text(res).await, format!("finished term {term_a}"));
    stepping.await.unwrap().unwrap();
    let term_b = timeout(EVENT_BOUND, b_role.wait_primary())
        .await
        .unwrap()
        .term();
    assert!(term_b > term_a);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_that_outlives_the_grace_does_not_hold_the_lock() {
    let store = MemoryBackend::new();
    let grace = Duration::from_secs(5);
    let a = paused_node(&store, "in-flight-grace", "a", grace);
    a.handle().wait_primary().await;
    let b = paused_node(&store, "in-flight-grace", "b", grace);
    wait_holder(&mut b.handle(), "a").await;

    let (request, probe) = gated_probe(a.handle());
    let request = tokio::spawn(request);
    probe.started.await.unwrap();
    let began = tokio::time::Instant::now();
    // The handler ignores the end of its term and never finishes on its own.
    a.step_down().await.unwrap();
    assert!(
        began.elapsed() >= grace,
        "released before the grace ran out"
    );
    timeout(EVENT_BOUND, b.handle().wait_primary())
        .await
        .unwrap();
    // After the grace the handler is aborted (its future dropped) and the client gets a 503.
    let res = timeout(EVENT_BOUND, request)
        .await
        .expect("the handler was not aborted after the grace")
        .unwrap()
        .unwrap();
    assert!(
        probe.finish.send(()).is_err(),
        "the handler future still lives"
    );
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let refusal: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(refusal["error"], "aborted");
    a.shutdown().await;
    b.shutdown().await;
}

/// A router whose gated `/stream` answers with a body that streams `body`'s chunks.
fn streaming_app<S>(role: RoleHandle, body: S) -> Router
where
    S: futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let body = Arc::new(std::sync::Mutex::new(Some(body)));
    let handler = move || {
        let body = body.lock().unwrap().take().expect("called once");
        async move { Body::from_stream(body) }
    };
    Router::new()
        .route("/stream", get(handler).layer(RequirePrimaryLayer::new()))
        .layer(AddRoleLayer::new(role))
}

/// The next data frame of `body`, as text.
async fn next_chunk(body: &mut Body) -> String {
    let frame = timeout(EVENT_BOUND, body.frame())
        .await
        .expect("no frame in time")
        .expect("the body ended")
        .expect("the body failed");
    String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn step_down_waits_while_a_gated_response_body_streams() {
    let store = MemoryBackend::new();
    let grace = Duration::from_secs(60);
    let a = paused_node(&store, "streaming", "a", grace);
    let term_a = a.handle().wait_primary().await.term();
    let b = paused_node(&store, "streaming", "b", grace);
    wait_holder(&mut b.handle(), "a").await;

    let (chunks, rx) = mpsc::channel::<Bytes>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok(chunk), rx))
    });
    let app = streaming_app(a.handle(), stream);
    // The handler has returned; the body is still streaming.
    let res = call(&app, "GET", "/stream").await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    chunks.send(Bytes::from("one")).await.unwrap();
    assert_eq!(next_chunk(&mut body).await, "one");

    let stepping = tokio::spawn({
        let a = a.clone();
        async move { a.step_down().await }
    });
    // While the body streams the lock is not released: b stays secondary for as long as we care
    // to wait below the grace (paused clock: 30 virtual seconds).
    let mut b_role = b.handle();
    assert!(
        timeout(Duration::from_secs(30), b_role.wait_primary())
            .await
            .is_err(),
        "b became primary while a's gated response body was streaming"
    );
    assert!(!stepping.is_finished());
    chunks.send(Bytes::from("two")).await.unwrap();
    assert_eq!(next_chunk(&mut body).await, "two");

    // The body ends: the step-down completes and b takes over.
    drop(chunks);
    assert!(body.frame().await.is_none(), "a clean end of the body");
    timeout(EVENT_BOUND, stepping)
        .await
        .expect("the step-down did not complete once the body ended")
        .unwrap()
        .unwrap();
    let term_b = timeout(EVENT_BOUND, b_role.wait_primary())
        .await
        .unwrap()
        .term();
    assert!(term_b > term_a);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_streaming_body_that_outlives_the_grace_is_cut_and_the_lock_released() {
    let store = MemoryBackend::new();
    let grace = Duration::from_secs(5);
    let a = paused_node(&store, "streaming-grace", "a", grace);
    a.handle().wait_primary().await;
    let b = paused_node(&store, "streaming-grace", "b", grace);
    wait_holder(&mut b.handle(), "a").await;

    // A body that never ends on its own: a chunk every (virtual) second.
    let stream = futures_util::stream::unfold(0u64, |n| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some((Ok(Bytes::from(format!("chunk {n}\n"))), n + 1))
    });
    let res = call(&streaming_app(a.handle(), stream), "GET", "/stream").await;
    let mut body = res.into_body();
    assert_eq!(next_chunk(&mut body).await, "chunk 0\n");

    let began = tokio::time::Instant::now();
    let stepping = tokio::spawn({
        let a = a.clone();
        async move { a.step_down().await }
    });
    // The body streams on through the grace, then is cut with an error (not a clean end, so the
    // client sees a truncated response).
    let mut chunks = 1;
    let end = timeout(EVENT_BOUND, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => chunks += 1,
                Some(Err(err)) => return Err(err),
                None => return Ok(()),
            }
        }
    })
    .await
    .expect("the body was not cut after the grace");
    assert!(end.is_err(), "the body ended cleanly instead of being cut");
    assert!(began.elapsed() >= grace, "cut before the grace ran out");
    assert!(chunks >= 4, "only {chunks} chunks before the cut");
    timeout(EVENT_BOUND, stepping)
        .await
        .expect("the step-down did not complete after the grace")
        .unwrap()
        .unwrap();
    timeout(EVENT_BOUND, b.handle().wait_primary())
        .await
        .expect("the lock was not released after the grace");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn an_http_client_sees_a_body_cut_after_the_grace_as_truncated() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let elector = Elector::builder("streaming-http")
        .backend(MemoryBackend::new())
        .grace(Duration::from_millis(300))
        .spawn()
        .unwrap();
    elector.handle().wait_primary().await;
    // One chunk, then a body that never ends on its own.
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::iter([Ok(Bytes::from("first"))]),
        futures_util::stream::pending(),
    );
    let app = streaming_app(elector.handle(), stream);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<Bytes>>();
    let res = client
        .get(format!("http://{addr}/stream").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = timeout(EVENT_BOUND, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first");

    timeout(EVENT_BOUND, elector.step_down())
        .await
        .expect("the step-down did not end after the grace")
        .unwrap();
    let end = timeout(EVENT_BOUND, body.frame())
        .await
        .expect("the client saw neither an end nor an error");
    assert!(
        matches!(end, Some(Err(_))),
        "the client did not see the response cut: {end:?}"
    );
    elector.shutdown().await;
}

#[tokio::test]
async fn gate_redirects_only_to_trusted_origins() {
    let runs = Arc::new(AtomicUsize::new(0));
    let trusted: Vec<Origin> = ["http://10.0.0.7:8080", "https://primary.example"]
        .into_iter()
        .map(|o| o.parse().unwrap())
        .collect();
    let gate = RequirePrimaryLayer::new()
        .redirect()
        .trusted_origins(trusted);
    for (url, redirected) in [
        ("http://10.0.0.7:8080", true),
        ("http://10.0.0.7:8080/app", true),
        ("https://Primary.Example:443/", true),
        ("http://10.0.0.7:8081", false),
        ("https://10.0.0.7:8080", false),
        ("http://primary.example", false),
        ("http://203.0.113.9", false),
    ] {
        let counted = runs.clone();
        let app = Router::new()
            .route(
                "/admin",
                post(move || {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { "ran" }
                })
                .layer(gate.clone()),
            )
            .layer(AddRoleLayer::new(secondary_of(holder(
                "web-1",
                7,
                Some(url),
            ))));
        let res = call(&app, "POST", "/admin").await;
        let want = if redirected {
            StatusCode::TEMPORARY_REDIRECT
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        assert_eq!(res.status(), want, "{url}");
        assert_eq!(res.headers().contains_key("location"), redirected, "{url}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert!("http://10.0.0.7:8080/app".parse::<Origin>().is_err());
}

// ---------------------------------------------------------------------------------------------
// Extractors

async fn describe(role: Role, handle: RoleHandle) -> String {
    format!(
        "{} {:?} {:?}",
        role.as_str(),
        role.term(),
        handle.holder().map(|h| h.id)
    )
}

fn extractor_app() -> Router {
    Router::new()
        .route("/describe", get(describe))
        .route(
            "/term",
            post(|term: TermContext| async move { format!("term {}", term.term()) }),
        )
        .route(
            "/maybe-term",
            get(|term: Option<TermContext>| async move { format!("{:?}", term.map(|t| t.term())) }),
        )
        .route(
            "/maybe-role",
            get(|role: Option<Role>| async move { format!("{}", role.is_some()) }),
        )
        .route(
            "/maybe-handle",
            get(|role: Option<RoleHandle>| async move { format!("{}", role.is_some()) }),
        )
        .route(
            "/handle",
            get(|role: RoleHandle| async move { role.lock().to_owned() }),
        )
}

#[tokio::test]
async fn extractors_read_a_snapshot_of_the_role() {
    let app = extractor_app().layer(AddRoleLayer::new(RoleHandle::fixed(Role::primary(5))));
    assert_eq!(
        body_text(call(&app, "GET", "/describe").await).await,
        "primary Some(5) Some(\"fixed\")"
    );
    assert_eq!(body_text(call(&app, "POST", "/term").await).await, "term 5");
    assert_eq!(
        body_text(call(&app, "GET", "/maybe-term").await).await,
        "Some(5)"
    );
    assert_eq!(body_text(call(&app, "GET", "/handle").await).await, "fixed");

    let app = extractor_app().layer(AddRoleLayer::new(secondary_of(holder("web-9", 8, None))));
    assert_eq!(
        body_text(call(&app, "GET", "/describe").await).await,
        "secondary Some(8) Some(\"web-9\")"
    );
    assert_eq!(
        body_text(call(&app, "GET", "/maybe-term").await).await,
        "None"
    );
}

#[tokio::test]
async fn primary_term_extractor_rejects_with_503_on_other_nodes() {
    let app = extractor_app().layer(AddRoleLayer::new(secondary_of(holder("web-9", 8, None))));
    let res = call(&app, "POST", "/term").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["x-primary-holder"], "web-9");
    assert!(body_text(res).await.contains("the primary is web-9"));

    let app = extractor_app().layer(AddRoleLayer::new(RoleHandle::fixed(Role::Starting)));
    let res = call(&app, "POST", "/term").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!res.headers().contains_key("x-primary-holder"));
}

#[tokio::test]
async fn missing_layer_gives_a_500_that_says_to_add_primary_layer() {
    let app = extractor_app();
    for (method, path) in [("GET", "/describe"), ("POST", "/term"), ("GET", "/handle")] {
        let res = call(&app, method, path).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        let text = body_text(res).await;
        assert!(text.contains("add PrimaryLayer"), "{path}: {text}");
    }
    let app = Router::new()
        .route("/health/role", get(health::role))
        .route("/health/primary", get(health::role_primary_only));
    for path in ["/health/role", "/health/primary"] {
        let res = call(&app, "GET", path).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        assert!(body_text(res).await.contains("add PrimaryLayer"));
    }
}

#[tokio::test]
async fn optional_extractors_work_without_the_layer() {
    let app = extractor_app();
    for path in ["/maybe-role", "/maybe-handle"] {
        let res = call(&app, "GET", path).await;
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        assert_eq!(body_text(res).await, "false");
    }
    let res = call(&app, "GET", "/maybe-term").await;
    assert_eq!(body_text(res).await, "None");

    let app = extractor_app().layer(AddRoleLayer::new(RoleHandle::fixed(Role::Starting)));
    for path in ["/maybe-role", "/maybe-handle"] {
        assert_eq!(body_text(call(&app, "GET", path).await).await, "true");
    }
}

#[tokio::test]
async fn primary_term_behind_the_gate_is_the_term_the_gate_admitted() {
    let store = MemoryBackend::new();
    let a = Elector::builder("admitted-term")
        .backend(store.clone())
        .node(NodeId::new("a"))
        .spawn()
        .unwrap();
    let ctx = timeout(EVENT_BOUND, a.handle().wait_primary())
        .await
        .unwrap();
    let app = Router::new()
        .route(
            "/admin",
            post(
                |term: TermContext, Extension(gate): Extension<TermContext>| async move {
                    assert_eq!(term.term(), gate.term());
                    format!("{}", term.term())
                },
            )
            .layer(RequirePrimaryLayer::new()),
        )
        .layer(AddRoleLayer::new(a.handle()));
    let res = call(&app, "POST", "/admin").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body_text(res).await, ctx.term().to_string());
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// /health/role

async fn report(app: &Router, path: &str) -> (StatusCode, RoleReport) {
    let res = call(app, "GET", path).await;
    let status = res.status();
    assert_eq!(res.headers()["content-type"], "application/json");
    let text = body_text(res).await;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in [
        "role",
        "term",
        "lock",
        "node",
        "holder",
        "since",
        "backend_error",
    ] {
        assert!(json.get(key).is_some(), "missing {key} in {text}");
    }
    for key in ["id", "host", "pid"] {
        assert!(
            json["node"].get(key).is_some(),
            "missing node.{key} in {text}"
        );
    }
    (status, serde_json::from_str(&text).unwrap())
}

fn health_app(role: RoleHandle) -> Router {
    Router::new()
        .route("/health/role", get(health::role))
        .route("/health/primary", get(health::role_primary_only))
        .layer(AddRoleLayer::new(role))
}

#[tokio::test]
async fn health_role_is_200_on_every_role_and_primary_only_is_503_elsewhere() {
    let app = health_app(RoleHandle::fixed(Role::primary(3)));
    for path in ["/health/role", "/health/primary"] {
        let (status, r) = report(&app, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!((r.role.as_str(), r.term), ("primary", Some(3)));
        let holder = r.holder.expect("the primary holds the lock itself");
        assert_eq!(holder.id, r.node.id);
        assert_eq!(r.since, Some(holder.since));
        assert_eq!(r.node.pid, std::process::id());
    }

    let h = holder("web-1", 9, Some("http://10.0.0.7:8080"));
    let app = health_app(secondary_of(h.clone()));
    let (status, r) = report(&app, "/health/role").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((r.role.as_str(), r.term), ("secondary", Some(9)));
    let shown = r.holder.expect("the holder is shown");
    assert_eq!((shown.id, shown.term, shown.url), (h.id, h.term, h.url));
    // Wall-clock times are shown to the millisecond.
    let ms =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    assert_eq!(ms(shown.since), ms(h.since));
    assert_eq!(r.since.map(ms), Some(ms(h.since)));
    let (status, r) = report(&app, "/health/primary").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.role, "secondary");

    let app = health_app(RoleHandle::fixed(Role::Starting));
    let (status, r) = report(&app, "/health/role").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (r.role.as_str(), r.term, r.holder, r.since),
        ("starting", None, None, None)
    );
    let res = call(&app, "GET", "/health/primary").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
}

/// A misconfigured backend is shown in `/health/role` until the backend answers again.
#[tokio::test(start_paused = true)]
async fn health_role_shows_a_backend_misconfiguration_until_it_is_fixed() {
    use tower_primary::Misconfiguration;

    let backend = MemoryBackend::new();
    backend.faults().misconfigure(
        Misconfiguration::Tls,
        "the server requires TLS: use rediss://",
    );
    let elector = Elector::builder("health-misconfigured")
        .backend(backend.clone())
        .clock(Clock::tokio())
        .spawn()
        .unwrap();
    let app = health_app(elector.handle());
    // The failed acquisition publishes `Secondary` after recording the misconfiguration.
    let mut role = elector.handle();
    timeout(EVENT_BOUND, async {
        while !matches!(role.role(), Role::Secondary { .. }) {
            role.changed().await;
        }
    })
    .await
    .unwrap();
    let text = body_text(call(&app, "GET", "/health/role").await).await;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["role"], "secondary");
    let shown = &json["backend_error"];
    assert_eq!(shown["kind"], "tls");
    assert_eq!(shown["message"], "the server requires TLS: use rediss://");
    let since = shown["since"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(since).is_ok(), "{since}");
    assert_eq!(
        shown.as_object().unwrap().len(),
        3,
        "kind, message and since: {shown}"
    );
    let (status, r) = report(&app, "/health/role").await;
    assert_eq!(status, StatusCode::OK);
    let parsed = r.backend_error.expect("read back by clients");
    assert_eq!(parsed.kind, Misconfiguration::Tls);

    backend.faults().clear_misconfiguration();
    timeout(EVENT_BOUND, elector.handle().wait_primary())
        .await
        .unwrap();
    let (_, r) = report(&app, "/health/role").await;
    assert_eq!(r.role, "primary");
    assert!(r.backend_error.is_none());
    elector.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Two server processes over real HTTP

#[cfg(feature = "file")]
mod processes {
    use std::process::Stdio;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use axum::extract::State;
    use axum::routing::{get, post};
    use axum::{Extension, Router};
    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::{AsyncBufReadExt, BufReader, Lines};
    use tokio::process::{Child, ChildStdout, Command};
    use tokio::time::timeout;
    use tower_primary::http::health::{self, RoleReport};
    use tower_primary::{
        Elector, FileBackend, PrimaryLayer, RequirePrimaryLayer, RoleHandle, RoleHeadersLayer,
        TermContext, terminate_signal,
    };

    use super::EVENT_BOUND;

    /// Set in a child process: the lock directory it serves with.
    const SERVER_DIR_ENV: &str = "TOWER_PRIMARY_HTTP_TEST_DIR";
    const LOCK: &str = "http-admin";

    #[derive(Default)]
    struct Counts {
        /// Runs of the admin handler.
        served: AtomicUsize,
        /// Runs of the admin handler while this node was not primary (must stay 0).
        served_while_not_primary: AtomicUsize,
    }

    async fn admin(
        State(counts): State<Arc<Counts>>,
        Extension(role): Extension<RoleHandle>,
        Extension(term): Extension<TermContext>,
    ) -> String {
        counts.served.fetch_add(1, Ordering::SeqCst);
        if !term.is_valid() || !role.is_primary() {
            counts
                .served_while_not_primary
                .fetch_add(1, Ordering::SeqCst);
        }
        format!("served by {} term {}", std::process::id(), term.term())
    }

    async fn report_counts(State(counts): State<Arc<Counts>>) -> String {
        format!(
            "{} {}",
            counts.served.load(Ordering::SeqCst),
            counts.served_while_not_primary.load(Ordering::SeqCst)
        )
    }

    /// Server-node mode: when this binary is re-executed by the test below with
    /// `TOWER_PRIMARY_HTTP_TEST_DIR` set, serve HTTP until killed or until stdin closes.
    /// In a normal test run (variable unset) it returns at once.
    #[test]
    fn server_node() {
        let Ok(dir) = std::env::var(SERVER_DIR_ENV) else {
            return;
        };
        crate::child::serve_until_stdin_closes(serve(dir));
    }

    async fn serve(dir: String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let primary = PrimaryLayer::new(
            Elector::builder(LOCK)
                .backend(FileBackend::new(dir))
                .advertise(format!("http://127.0.0.1:{port}"))
                .grace(Duration::from_secs(2)),
        )
        .unwrap();
        let counts = Arc::new(Counts::default());
        let app = Router::new()
            .route("/admin", post(admin).layer(RequirePrimaryLayer::new()))
            .route(
                "/admin/redirect",
                get(admin).layer(RequirePrimaryLayer::new().redirect()),
            )
            .route("/counts", get(report_counts))
            .route("/health/role", get(health::role))
            .with_state(counts)
            .layer(RoleHeadersLayer::new())
            .layer(primary.clone());
        let elector = primary.elector();
        let mut role = elector.handle();
        println!("EVENT listening {port} {}", role.node().id());
        tokio::spawn(async move {
            loop {
                let r = role.role();
                let holder = role.holder().map_or_else(|| "-".to_owned(), |h| h.id);
                println!(
                    "EVENT role {} {holder} {}",
                    r.as_str(),
                    r.term().unwrap_or(0)
                );
                role.changed().await;
            }
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(elector.shutdown_signal(terminate_signal()))
            .await
            .unwrap();
    }

    /// A server process started by the test.
    struct Node {
        child: Child,
        lines: Lines<BufReader<ChildStdout>>,
        port: u16,
        id: String,
    }

    impl Node {
        async fn spawn(dir: &std::path::Path) -> Node {
            let exe = std::env::current_exe().unwrap();
            let mut child = Command::new(exe)
                .args([
                    "processes::server_node",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(SERVER_DIR_ENV, dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let mut node = Node {
                child,
                lines,
                port: 0,
                id: String::new(),
            };
            let ev = node.event(|e| e[0] == "listening").await;
            node.port = ev[1].parse().unwrap();
            node.id.clone_from(&ev[2]);
            node
        }

        /// Waits for the next event line whose words match `pred`, skipping others.
        async fn event(&mut self, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
            timeout(EVENT_BOUND, async {
                loop {
                    let line = self
                        .lines
                        .next_line()
                        .await
                        .unwrap()
                        .expect("the server node exited");
                    // libtest may print its own text before ours on the same line.
                    let Some(at) = line.find("EVENT ") else {
                        continue;
                    };
                    let rest = &line[at + "EVENT ".len()..];
                    let words: Vec<String> = rest.split(' ').map(str::to_owned).collect();
                    if pred(&words) {
                        return words;
                    }
                }
            })
            .await
            .expect("event not seen in time")
        }

        fn url(&self, path: &str) -> String {
            format!("http://127.0.0.1:{}{path}", self.port)
        }
    }

    type HttpClient = Client<HttpConnector, Empty<Bytes>>;

    async fn send(
        client: &HttpClient,
        method: &str,
        url: &str,
    ) -> (StatusCode, http::HeaderMap, String) {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .body(Empty::new())
            .unwrap();
        let res = timeout(EVENT_BOUND, client.request(req))
            .await
            .expect("request timed out")
            .unwrap();
        let (parts, body) = res.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    async fn counts_of(client: &HttpClient, node: &Node) -> (usize, usize) {
        let (status, _, text) = send(client, "GET", &node.url("/counts")).await;
        assert_eq!(status, StatusCode::OK);
        let mut it = text.split(' ').map(|n| n.parse().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admin_route_runs_only_on_the_primary_across_two_server_processes() {
        let dir = tempfile::tempdir().unwrap();
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

        let mut a = Node::spawn(dir.path()).await;
        let ev = a.event(|e| e[0] == "role" && e[1] == "primary").await;
        let term_a: u64 = ev[3].parse().unwrap();
        let mut b = Node::spawn(dir.path()).await;
        let a_id = a.id.clone();
        b.event(|e| e[0] == "role" && e[1] == "secondary" && e[2] == a_id)
            .await;

        // Refused on the secondary, naming the primary.
        let (status, headers, _) = send(&client, "POST", &b.url("/admin")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["x-primary-holder"], a.id.as_str());
        assert_eq!(headers["x-primary-role"], "secondary");
        assert!(headers.contains_key("retry-after"));

        // Redirected by the secondary; following the redirect reaches the primary, which serves.
        let (status, headers, _) = send(&client, "GET", &b.url("/admin/redirect?from=b&n=1")).await;
        assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
        let location = headers["location"].to_str().unwrap().to_owned();
        assert_eq!(location, a.url("/admin/redirect?from=b&n=1"));
        let (status, headers, text) = send(&client, "GET", &location).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-primary-role"], "primary");
        assert_eq!(
            text,
            format!("served by {} term {term_a}", a.child.id().unwrap())
        );

        let (status, _, _) = send(&client, "POST", &a.url("/admin")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(counts_of(&client, &a).await, (2, 0));
        assert_eq!(
            counts_of(&client, &b).await,
            (0, 0),
            "the secondary never ran it"
        );

        // The primary dies: the former secondary takes over and serves.
        a.child.kill().await.unwrap();
        let ev = b.event(|e| e[0] == "role" && e[1] == "primary").await;
        let term_b: u64 = ev[3].parse().unwrap();
        assert!(term_b > term_a, "term {term_b} after {term_a}");
        let (status, headers, text) = send(&client, "POST", &b.url("/admin")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-primary-term"], term_b.to_string().as_str());
        assert_eq!(
            text,
            format!("served by {} term {term_b}", b.child.id().unwrap())
        );
        assert_eq!(counts_of(&client, &b).await, (1, 0));

        let (status, _, text) = send(&client, "GET", &b.url("/health/role")).await;
        assert_eq!(status, StatusCode::OK);
        let report: RoleReport = serde_json::from_str(&text).unwrap();
        assert_eq!(report.role, "primary");
        assert_eq!(report.holder.map(|h| h.id), Some(b.id.clone()));
        b.child.kill().await.unwrap();
    }
}
