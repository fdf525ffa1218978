//! Per-request cost of `PrimaryLayer`, on requests shaped as a route sees them inside an axum
//! `Router` (the extensions map is already in use, as axum puts the matched path and the original
//! URI there before a route's layers run).
//!
//! Run with `cargo bench --bench layer`. The layer's cost is `with_layer - without_layer`
//! (target: < 50 ns); `gate_admits` adds the primary-only gate on top, for reference.

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Bytes;
use tower::{Layer, Service, service_fn};
use tower_primary::{AddRoleLayer, RequirePrimaryLayer, Role, RoleHandle, RoleHeadersLayer};

/// Stands in for what axum's router inserts before a route's layers run.
#[derive(Clone)]
struct MatchedRoute(#[allow(dead_code)] &'static str);

fn router_shaped_request() -> Request<()> {
    let mut req = Request::get("/admin/rebuild?x=1").body(()).unwrap();
    req.extensions_mut().insert(MatchedRoute("/admin/rebuild"));
    req
}

/// The innermost service: takes the request (dropping it, as a handler would) and answers.
fn inner()
-> impl Service<Request<()>, Response = Response<Empty<Bytes>>, Error = Infallible> + Clone {
    service_fn(|req: Request<()>| {
        drop(black_box(req));
        std::future::ready(Ok::<_, Infallible>(Response::new(Empty::new())))
    })
}

/// Calls `svc` per request; the response (and with the gate its in-flight count) is dropped
/// inside the measurement.
fn run<S, B>(c: &mut Criterion, name: &str, mut svc: S, make: fn() -> Request<()>)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
{
    c.bench_function(name, |b| {
        b.iter_batched(
            make,
            |req| svc.call(req).now_or_never().unwrap().unwrap(),
            BatchSize::SmallInput,
        );
    });
}

fn layer(c: &mut Criterion) {
    let role = RoleHandle::fixed(Role::primary(1));
    run(
        c,
        "router_shaped/without_layer",
        inner(),
        router_shaped_request,
    );
    run(
        c,
        "router_shaped/with_layer",
        AddRoleLayer::new(role.clone()).layer(inner()),
        router_shaped_request,
    );
    run(
        c,
        "router_shaped/with_layer_and_role_headers",
        AddRoleLayer::new(role.clone()).layer(RoleHeadersLayer::new().layer(inner())),
        router_shaped_request,
    );
    run(
        c,
        "router_shaped/gate_admits",
        AddRoleLayer::new(role.clone()).layer(RequirePrimaryLayer::new().layer(inner())),
        router_shaped_request,
    );
    // For reference: the first insert into an empty map allocates it.
    let empty = || Request::get("/").body(()).unwrap();
    run(c, "empty_extensions/without_layer", inner(), empty);
    run(
        c,
        "empty_extensions/with_layer",
        AddRoleLayer::new(role).layer(inner()),
        empty,
    );
}

criterion_group!(benches, layer);
criterion_main!(benches);
