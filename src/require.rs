//! [`RequirePrimaryLayer`]: routes that only the primary may serve.
//!
//! Put it on the routes that must run on one node only (admin actions, migrations, anything
//! that writes shared state). On the primary the request goes through; on any other node the
//! inner service **never runs** and the gate answers itself, never with an `Err` (axum needs
//! infallible services):
//!
//! - by default `503 Service Unavailable` with `Retry-After` and, when the holder is known,
//!   `x-primary-holder` naming it;
//! - with [`redirect`](RequirePrimaryLayer::redirect), `307 Temporary Redirect` to the same path
//!   and query on the holder's advertised URL ([`ElectorBuilder::advertise`]); a 307 keeps the
//!   method and the body. When the holder advertised no URL (or is unknown, as while the
//!   election starts) the answer is the 503 above.
//!
//! An admitted request carries the [`TermContext`] of the term it was admitted under in its
//! extensions (`Extension<TermContext>`, or the [`PrimaryTerm`](crate::PrimaryTerm) extractor),
//! so the handler can put the term into downstream writes and check
//! [`is_valid`](TermContext::is_valid) before side effects. The gate also counts the request as
//! in flight until its response future completes: step-down and shutdown wait for it (up to the
//! grace) before they release the lock (DESIGN §3.5).
//!
//! The gate reads the role from the request's extensions, where [`PrimaryLayer`] puts it; without
//! that layer it answers `500` and logs why. Give it a handle with
//! [`with_handle`](RequirePrimaryLayer::with_handle) to use it alone.
//!
//! [`ElectorBuilder::advertise`]: crate::ElectorBuilder::advertise
//! [`PrimaryLayer`]: crate::PrimaryLayer
//!
//! # Examples
//!
//! ```
//! use axum::{Router, body::Body, routing::post};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_primary::{Holder, NodeId, PrimaryLayer, RequirePrimaryLayer, Role, RoleHandle};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // This node is a secondary; web-1 is primary and advertised its URL.
//! let primary = Holder::new(&NodeId::new("web-1"), 7).with_url(Some("http://10.0.0.7:8080".into()));
//! let role = RoleHandle::fixed(Role::Secondary { holder: Some(primary) });
//!
//! let app = Router::new()
//!     .route("/admin/rebuild", post(|| async { "rebuilt" }).layer(RequirePrimaryLayer::new()))
//!     .route("/admin/reindex", post(|| async { "reindexed" }).layer(RequirePrimaryLayer::new().redirect()))
//!     .layer(PrimaryLayer::new(role));
//!
//! let res = app.clone().oneshot(Request::post("/admin/rebuild").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(res.headers()["x-primary-holder"], "web-1");
//! assert_eq!(res.headers()["retry-after"], "1");
//!
//! let res = app.oneshot(Request::post("/admin/reindex?full=1").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
//! assert_eq!(res.headers()["location"], "http://10.0.0.7:8080/admin/reindex?full=1");
//! # Ok(())
//! # }
//! ```
//!
//! On the primary the handler runs with the term it was admitted under:
//!
//! ```
//! use axum::{Extension, Router, body::Body, routing::post};
//! use http::Request;
//! use tower::ServiceExt;
//! use tower_primary::{PrimaryLayer, RequirePrimaryLayer, Role, RoleHandle, TermContext};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = Router::new()
//!     .route(
//!         "/admin/rebuild",
//!         post(|Extension(term): Extension<TermContext>| async move {
//!             // e.g. UPDATE jobs SET … WHERE id = $1 AND term <= $term
//!             format!("rebuilt under term {}", term.term())
//!         })
//!         .layer(RequirePrimaryLayer::new()),
//!     )
//!     .layer(PrimaryLayer::new(RoleHandle::fixed(Role::primary(42))));
//!
//! let res = app.oneshot(Request::post("/admin/rebuild").body(Body::empty())?).await?;
//! let body = axum::body::to_bytes(res.into_body(), 1024).await?;
//! assert_eq!(body, "rebuilt under term 42");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{LOCATION, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::header::X_PRIMARY_HOLDER;
use crate::role::{Holder, InFlight, RoleHandle, TermContext};

/// The default `Retry-After` of a refusal, in seconds.
const DEFAULT_RETRY_AFTER: u64 = 1;

/// Gates a route to the primary. See the [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct RequirePrimaryLayer {
    config: Config,
}

#[derive(Clone, Debug)]
struct Config {
    redirect: bool,
    retry_after: u64,
    handle: Option<RoleHandle>,
}

impl Default for RequirePrimaryLayer {
    fn default() -> Self {
        RequirePrimaryLayer::new()
    }
}

impl RequirePrimaryLayer {
    /// A gate that answers `503` with `Retry-After: 1` and `x-primary-holder` on every node but
    /// the primary.
    pub fn new() -> Self {
        RequirePrimaryLayer {
            config: Config {
                redirect: false,
                retry_after: DEFAULT_RETRY_AFTER,
                handle: None,
            },
        }
    }

    /// Answers `307 Temporary Redirect` to the holder's advertised URL instead, keeping the path
    /// and the query, when the holder advertised one; `503` otherwise.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::{Router, body::Body, routing::get};
    /// use http::{Request, StatusCode};
    /// use tower::ServiceExt;
    /// use tower_primary::{Holder, NodeId, PrimaryLayer, RequirePrimaryLayer, Role, RoleHandle};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // The holder advertised no URL: nothing to redirect to.
    /// let holder = Holder::new(&NodeId::new("web-2"), 3);
    /// let app = Router::new()
    ///     .route("/admin", get(|| async { "ok" }).layer(RequirePrimaryLayer::new().redirect()))
    ///     .layer(PrimaryLayer::new(RoleHandle::fixed(Role::Secondary { holder: Some(holder) })));
    /// let res = app.oneshot(Request::get("/admin").body(Body::empty())?).await?;
    /// assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    /// assert_eq!(res.headers()["x-primary-holder"], "web-2");
    /// # Ok(())
    /// # }
    /// ```
    pub fn redirect(mut self) -> Self {
        self.config.redirect = true;
        self
    }

    /// The `Retry-After` of a `503`, rounded up to whole seconds. Default 1 s.
    pub fn retry_after(mut self, after: Duration) -> Self {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        self.config.retry_after = secs;
        self
    }

    /// Reads the role from `handle` instead of the request's extensions, for stacks without a
    /// [`PrimaryLayer`](crate::PrimaryLayer).
    pub fn with_handle(mut self, handle: RoleHandle) -> Self {
        self.config.handle = Some(handle);
        self
    }
}

impl<S> Layer<S> for RequirePrimaryLayer {
    type Service = RequirePrimary<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequirePrimary {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service of [`RequirePrimaryLayer`]: calls the inner service only on the primary.
#[derive(Clone, Debug)]
pub struct RequirePrimary<S> {
    inner: S,
    config: Config,
}

impl<S> RequirePrimary<S> {
    /// Gates `inner` with the default settings of [`RequirePrimaryLayer::new`].
    pub fn new(inner: S) -> Self {
        RequirePrimaryLayer::new().layer(inner)
    }

    /// The inner service.
    #[must_use]
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming this one.
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequirePrimary<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let handle = match &self.config.handle {
            Some(handle) => Some(handle),
            None => req.extensions().get::<RoleHandle>(),
        };
        let decision = match handle {
            None => Err(missing_layer()),
            Some(handle) => admit(handle).ok_or_else(|| self.config.refuse(handle, req.uri())),
        };
        match decision {
            Ok((ctx, in_flight)) => {
                req.extensions_mut().insert(ctx);
                ResponseFuture {
                    kind: Kind::Admitted {
                        future: self.inner.call(req),
                        in_flight: Some(in_flight),
                    },
                }
            }
            Err(response) => ResponseFuture {
                kind: Kind::Refused {
                    response: Some(response),
                },
            },
        }
    }
}

/// Admits work under the current term: its context and an in-flight guard, or `None` when this
/// node is not primary.
///
/// The guard is taken before the final validity check: a step-down that begins after the check
/// sees the guard and waits for it (up to the grace); one that began before it makes the check
/// fail. Either way no admitted request escapes the wait.
pub(crate) fn admit(handle: &RoleHandle) -> Option<(TermContext, InFlight)> {
    hold(handle.term_context()?)
}

/// Counts work as in flight in `ctx`'s term, if the term still holds (see [`admit`]).
pub(crate) fn hold(ctx: TermContext) -> Option<(TermContext, InFlight)> {
    let in_flight = ctx.in_flight();
    // The count and the tracker's closed flag share one atomic. If our increment lands after the
    // step-down closed the tracker, this fence makes the step-down's earlier writes (deadline
    // cleared, token cancelled) visible to the check below; if before, the step-down waits.
    std::sync::atomic::fence(Ordering::SeqCst);
    ctx.is_valid().then_some((ctx, in_flight))
}

/// The holder to name in a refusal: a record naming this node itself is stale (it just stepped
/// down), so it is not shown.
pub(crate) fn other_holder(handle: &RoleHandle) -> Option<Holder> {
    handle.holder().filter(|h| h.id != handle.node().id())
}

/// `Retry-After` and, when known, `x-primary-holder`.
pub(crate) fn refusal_headers(headers: &mut HeaderMap, holder: Option<&Holder>, retry_after: u64) {
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after));
    if let Some(id) = holder.and_then(|h| HeaderValue::try_from(h.id.as_str()).ok()) {
        headers.insert(X_PRIMARY_HOLDER, id);
    }
}

impl Config {
    fn refuse<B: Default>(&self, handle: &RoleHandle, uri: &Uri) -> Response<B> {
        let holder = other_holder(handle);
        let mut res = Response::new(B::default());
        if self.redirect
            && let Some(location) = holder.as_ref().and_then(|h| redirect_location(h, uri))
        {
            *res.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            res.headers_mut().insert(LOCATION, location);
            if let Some(id) = holder.and_then(|h| HeaderValue::try_from(h.id).ok()) {
                res.headers_mut().insert(X_PRIMARY_HOLDER, id);
            }
            return res;
        }
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        refusal_headers(res.headers_mut(), holder.as_ref(), self.retry_after);
        res
    }
}

/// The holder's advertised URL with the request's path and query.
fn redirect_location(holder: &Holder, uri: &Uri) -> Option<HeaderValue> {
    let base = holder.url.as_deref()?.trim_end_matches('/');
    if base.is_empty() {
        return None;
    }
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    HeaderValue::try_from(format!("{base}{path}")).ok()
}

/// Logs, once per process, that a request reached `what` without the role in its extensions:
/// a wiring mistake that every request would otherwise repeat.
pub(crate) fn log_missing_layer(what: &'static str) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::error!(
            "{what} found no RoleHandle in the request extensions: add PrimaryLayer to the \
             router, outside the routes that read the role; answering 500"
        );
    }
}

fn missing_layer<B: Default>() -> Response<B> {
    log_missing_layer("RequirePrimaryLayer (without with_handle)");
    let mut res = Response::new(B::default());
    *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    res
}

pin_project! {
    /// The response future of [`RequirePrimary`].
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Admitted {
            #[pin]
            future: F,
            in_flight: Option<InFlight>,
        },
        Refused {
            response: Option<Response<B>>,
        },
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Admitted { .. } => "admitted",
            Kind::Refused { .. } => "refused",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Admitted { future, in_flight } => {
                let out = std::task::ready!(future.poll(cx));
                // The request is no longer in flight once the handler has produced its response.
                in_flight.take();
                Poll::Ready(out)
            }
            // The Future contract forbids polling again after `Ready`.
            KindProj::Refused { response } => Poll::Ready(Ok(response
                .take()
                .expect("RequirePrimary's ResponseFuture polled after completion"))),
        }
    }
}
