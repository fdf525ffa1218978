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
//!   election starts) the answer is the 503 above;
//! - with [`forward`](RequirePrimaryLayer::forward) (`forward` feature), the request is
//!   **forwarded** to the holder's advertised URL and the primary's response streamed back, so
//!   that clients behind a load balancer reach the primary through any node. A forwarded
//!   request is never forwarded again: a node that is not primary answers it `503` with the
//!   mark `x-primary-refused: 1`, and only such a refusal or a failed connection makes the
//!   forwarder try the next holder. See [`forward_with`](RequirePrimaryLayer::forward_with)
//!   for the rules and [`Forward`] for the settings.
//!
//! Every refusal carries a JSON [`Refusal`] body (`{"error": "not_primary" | "no_primary" | …,
//! "holder": …, "retry_after_ms": …, "message": …}`, `content-type: application/json`).
//!
//! # In flight
//!
//! An admitted request carries the [`TermContext`] of the term it was admitted under in its
//! extensions (the [`TermContext` extractor](crate::http::extract) returns it), so the handler
//! can put the term into downstream writes and check
//! [`is_valid`](TermContext::is_valid) before side effects. The gate counts the request as in
//! flight **until its response body has ended** (or been dropped, as when the client goes
//! away), not only until the handler returns: a streamed body is part of the request. Step-down
//! and shutdown wait for it, up to the [grace](crate::ElectorBuilder::grace), before they
//! release the lock. The order is: stop admitting, cancel the term, wait for tasks and requests
//! in flight up to the grace, abort what is left, release the lock.
//!
//! When the grace runs out, what is left of a gated request is aborted, before the lock is
//! released:
//!
//! - a handler that has not returned is dropped (its future is not polled again) and the client
//!   gets a `503` with the [`Refusal`] `"aborted"`;
//! - a response body still streaming ends with an [`Aborted`] error instead of its next frame; the
//!   inner body is dropped unpolled, and the client sees the response cut short (hyper closes
//!   the HTTP/1.1 connection or resets the HTTP/2 stream), never a clean end.
//!
//! No code of an aborted request runs after its current poll returns, so a handler that stops at
//! `.await` points cannot act after the lock is released. Side effects already made stay made:
//! carry the term into downstream writes. Routes without the gate that use the
//! [`TermContext` extractor](crate::http::extract) are waited for until the handler returns, and are
//! not aborted.
//!
//! # Where to redirect, and what refusals show
//!
//! A holder's advertised URL is checked when it is set ([`ElectorBuilder::advertise`]: an
//! absolute `http`/`https` URL with a host, an optional port and an optional path prefix; no
//! user information, query or fragment) and again before every redirect, since it is read from
//! the backend: a URL that fails the check is never a redirect target (the answer is the 503,
//! and the gate logs a warning). With [`trusted_origins`](RequirePrimaryLayer::trusted_origins)
//! only the listed [`Origin`]s are redirect targets.
//!
//! A refusal body names the holder (host, pid, advertised URL): put gated routes where the
//! clients that see them may know the cluster's layout — an admin listener or an internal
//! network — and keep them, like `/health/role`, off public routes.
//!
//! The gate reads the role from the request's extensions, where [`PrimaryLayer`] puts it; without
//! that layer it answers `500` (with a [`Refusal`] `"missing_layer"`) and logs why. Give it a
//! handle with [`with_handle`](RequirePrimaryLayer::with_handle) to use it alone.
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
//! use tower_primary::{AddRoleLayer, Holder, NodeId, RequirePrimaryLayer, Role, RoleHandle};
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
//!     .layer(AddRoleLayer::new(role));
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
//! use axum::{Router, body::Body, routing::post};
//! use http::Request;
//! use tower::ServiceExt;
//! use tower_primary::{AddRoleLayer, RequirePrimaryLayer, Role, RoleHandle, TermContext};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = Router::new()
//!     .route(
//!         "/admin/rebuild",
//!         post(|term: TermContext| async move {
//!             // e.g. UPDATE jobs SET … WHERE id = $1 AND term <= $term
//!             format!("rebuilt under term {}", term.term())
//!         })
//!         .layer(RequirePrimaryLayer::new()),
//!     )
//!     .layer(AddRoleLayer::new(RoleHandle::fixed(Role::primary(42))));
//!
//! let res = app.oneshot(Request::post("/admin/rebuild").body(Body::empty())?).await?;
//! let body = axum::body::to_bytes(res.into_body(), 1024).await?;
//! assert_eq!(body, "rebuilt under term 42");
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::error::BoxError;
use http::header::LOCATION;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

#[cfg(feature = "forward")]
use crate::http::header::X_PRIMARY_FORWARD_SECRET;
use crate::http::header::X_PRIMARY_FORWARDED;
use crate::http::header::X_PRIMARY_REFUSED;
use crate::role::{Holder, InFlight, RoleHandle, TermContext};

mod body;
#[cfg(feature = "forward")]
mod forward;
mod future;
mod refusal;

pub use self::body::{Aborted, ResponseBody};
#[cfg(feature = "forward")]
#[cfg_attr(docsrs, doc(cfg(feature = "forward")))]
pub use self::forward::Forward;
#[cfg(feature = "forward")]
use self::forward::Forwarder;
pub use self::future::ResponseFuture;
pub(crate) use self::refusal::MISSING_LAYER;
pub use self::refusal::Refusal;
use crate::origin::AdvertisedUrl;
pub use crate::origin::Origin;

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
    /// `None`: any valid advertised URL is a redirect target.
    trusted: Option<Arc<[Origin]>>,
    /// Set: forward instead of refusing (takes precedence over `redirect`).
    #[cfg(feature = "forward")]
    forward: Option<Arc<Forwarder>>,
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
                trusted: None,
                #[cfg(feature = "forward")]
                forward: None,
            },
        }
    }

    /// Answers `307 Temporary Redirect` to the holder's advertised URL instead, keeping the path
    /// and the query, when the holder advertised one (a valid one, from a
    /// [trusted origin](Self::trusted_origins) if a list is set); `503` otherwise.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::{Router, body::Body, routing::get};
    /// use http::{Request, StatusCode};
    /// use tower::ServiceExt;
    /// use tower_primary::{AddRoleLayer, Holder, NodeId, RequirePrimaryLayer, Role, RoleHandle};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // The holder advertised no URL: nothing to redirect to.
    /// let holder = Holder::new(&NodeId::new("web-2"), 3);
    /// let app = Router::new()
    ///     .route("/admin", get(|| async { "ok" }).layer(RequirePrimaryLayer::new().redirect()))
    ///     .layer(AddRoleLayer::new(RoleHandle::fixed(Role::Secondary { holder: Some(holder) })));
    /// let res = app.oneshot(Request::get("/admin").body(Body::empty())?).await?;
    /// assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    /// assert_eq!(res.headers()["x-primary-holder"], "web-2");
    /// # Ok(())
    /// # }
    /// ```
    pub fn redirect(mut self) -> Self {
        self.config.redirect = true;
        #[cfg(feature = "forward")]
        {
            self.config.forward = None;
        }
        self
    }

    /// Forwards the request to the holder's advertised URL instead and streams its response
    /// back, with the default [`Forward`] settings. See [`forward_with`](Self::forward_with).
    #[cfg(feature = "forward")]
    #[cfg_attr(docsrs, doc(cfg(feature = "forward")))]
    pub fn forward(self) -> Self {
        self.forward_with(Forward::new())
    }

    /// Forwards the request to the holder's advertised URL and streams its response back, so
    /// that a client behind a load balancer reaches the primary through any node.
    ///
    /// The layer owns one pooled HTTP client (HTTP/1.1; TLS with rustls for `https://`),
    /// shared by its clones and the routes it is put on; make the layer once and clone it. No
    /// tokio runtime is needed to make it.
    ///
    /// - **Where**: only to an advertised URL that passes the same checks as a redirect
    ///   target (an absolute `http`/`https` URL, and one of the
    ///   [trusted origins](Self::trusted_origins) when a list is set), checked before every use.
    /// - **Headers**: hop-by-hop headers (`connection` and those it names, `keep-alive`, `te`,
    ///   `transfer-encoding`, `upgrade`, …) are removed; `x-forwarded-for` gets the client's
    ///   address ([`Forward::client_addr`]), `x-forwarded-proto` and `x-forwarded-host` are set
    ///   unless a proxy in front set them, and `x-primary-forwarded` names this node. The
    ///   response carries `x-primary-holder`: the node that answered.
    /// - **Never twice, never in a loop**: a request that carries `x-primary-forwarded` is
    ///   never forwarded again; a gate that is not on the primary answers it `503` with the
    ///   mark `x-primary-refused: 1`, which no handler's response carries. The forwarder tries
    ///   the request again (on the next holder, or the same one once it has taken the lock) only
    ///   after such a marked refusal or a failed connection, neither of which ran anything, and
    ///   never after an application's own `503`. Bodies up to [`Forward::buffer_limit`]
    ///   (1 MiB) are read first so that they can be sent again; longer ones are streamed and
    ///   sent once: if the exchange fails after the request went out the answer is `502`, and
    ///   the body says the request may have run. A request is executed by at most one
    ///   primary.
    /// - **Through a failover**: with no holder known, none reachable, or one that refused, the
    ///   request waits for the next holder up to [`Forward::wait_for_holder`] (about one
    ///   failover), then gets the `503` with `Retry-After`.
    /// - **Limits**: a body over [`Forward::max_body`] gets `413`, without contacting the
    ///   primary when `content-length` or the buffering shows it; a primary that sends no
    ///   response head within [`Forward::response_timeout`] gets `504`.
    /// - **`Expect: 100-continue`** is answered only once a connection to the primary has been
    ///   made and the request head sent (the body is then streamed, not buffered); the primary
    ///   itself does not see the expectation. **Upgrades** (WebSocket) and `CONNECT` are not
    ///   forwarded: `501` with a body that says so.
    /// - **Trust**: with [`Forward::secret`], a request that says it was forwarded must carry
    ///   the secret, or the gate answers `403`, whatever the node's role.
    ///
    /// The forwarder's own answers carry the JSON [`Refusal`] body.
    ///
    /// With the `forward` feature the gate's request body must be `Send + 'static` (axum's and
    /// hyper's are).
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::{Router, routing::post};
    /// use tower_primary::{Elector, FileBackend, PrimaryLayer, RequirePrimaryLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let dir = dir.path();
    /// let port = 8080;
    /// let primary = PrimaryLayer::new(
    ///     Elector::builder("admin")
    ///         .backend(FileBackend::new(dir))
    ///         // Where the other nodes forward to: this node's own address.
    ///         .advertise(format!("http://127.0.0.1:{port}")),
    /// )?;
    /// // One forwarder (one connection pool) for all the admin routes.
    /// let gate = RequirePrimaryLayer::new().forward();
    /// let app: Router = Router::new()
    ///     .route("/admin/report-now", post(|| async { "accepted" }).layer(gate.clone()))
    ///     .route("/admin/rebuild", post(|| async { "rebuilt" }).layer(gate))
    ///     .layer(primary);
    /// # drop(app);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// What a secondary does with a request, over real HTTP on loopback:
    ///
    /// ```
    /// use axum::{Router, body::Body, routing::post};
    /// use http::{Request, StatusCode};
    /// use tower::ServiceExt;
    /// use tower_primary::{AddRoleLayer, Holder, NodeId, RequirePrimaryLayer, Role, RoleHandle};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = RequirePrimaryLayer::new().forward();
    /// let app = |role| {
    ///     Router::new()
    ///         .route("/admin/rebuild", post(|| async { "rebuilt" }).layer(gate.clone()))
    ///         .layer(AddRoleLayer::new(role))
    /// };
    ///
    /// // The primary, listening on loopback.
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let url = format!("http://{}", listener.local_addr()?);
    /// let primary = app(RoleHandle::fixed(Role::primary(7)));
    /// tokio::spawn(async move { axum::serve(listener, primary).await });
    ///
    /// // A secondary that knows the holder and its advertised URL forwards to it.
    /// let holder = Holder::new(&NodeId::new("web-1"), 7).with_url(Some(url));
    /// let secondary = app(RoleHandle::fixed(Role::Secondary { holder: Some(holder) }));
    /// let res = secondary.oneshot(Request::post("/admin/rebuild").body(Body::empty())?).await?;
    /// assert_eq!(res.status(), StatusCode::OK);
    /// assert_eq!(res.headers()["x-primary-holder"], "fixed"); // the node that answered
    /// let body = axum::body::to_bytes(res.into_body(), 1024).await?;
    /// assert_eq!(body, "rebuilt");
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "forward")]
    #[cfg_attr(docsrs, doc(cfg(feature = "forward")))]
    pub fn forward_with(mut self, settings: Forward) -> Self {
        self.config.redirect = false;
        self.config.forward = Some(Arc::new(Forwarder::new(settings)));
        self
    }

    /// Redirects only to holders whose advertised URL has one of these origins (scheme, host and
    /// port); a holder elsewhere gets the `503`, and a warning is logged. Without this list any
    /// valid advertised URL is a target. Use it when the backend's records could be written by
    /// someone other than your nodes.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::{Router, body::Body, routing::post};
    /// use http::{Request, StatusCode};
    /// use tower::ServiceExt;
    /// use tower_primary::http::require::Origin;
    /// use tower_primary::{AddRoleLayer, Holder, NodeId, RequirePrimaryLayer, Role, RoleHandle};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let gate = RequirePrimaryLayer::new()
    ///     .redirect()
    ///     .trusted_origins([
    ///         "http://10.0.0.7:8080".parse::<Origin>()?,
    ///         "http://10.0.0.8:8080".parse()?,
    ///     ]);
    /// let app = |url: &str| {
    ///     let holder = Holder::new(&NodeId::new("web-1"), 7).with_url(Some(url.to_owned()));
    ///     let role = RoleHandle::fixed(Role::Secondary { holder: Some(holder) });
    ///     Router::new()
    ///         .route("/admin", post(|| async { "done" }).layer(gate.clone()))
    ///         .layer(AddRoleLayer::new(role))
    /// };
    /// let req = || Request::post("/admin").body(Body::empty());
    ///
    /// let res = app("http://10.0.0.8:8080").oneshot(req()?).await?;
    /// assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
    /// let res = app("http://203.0.113.9").oneshot(req()?).await?;
    /// assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    /// # Ok(())
    /// # }
    /// ```
    pub fn trusted_origins(mut self, origins: impl IntoIterator<Item = Origin>) -> Self {
        self.config.trusted = Some(origins.into_iter().collect());
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
///
/// Its response body is a [`ResponseBody`] around the inner service's: the inner body on an
/// admitted request, a JSON [`Refusal`] otherwise.
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

    define_inner_service_accessors!();
}

/// The request body must be an [`http_body::Body`] that is `Send + 'static` (axum's and hyper's
/// are), with or without the `forward` feature, which sends it on: a feature never changes
/// what compiles elsewhere in a build.
impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequirePrimary<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match self.config.decide(&mut req) {
            Decision::Admit(admitted) => self.admitted(req, admitted),
            Decision::Refuse(response) => ResponseFuture::refused(response),
            #[cfg(feature = "forward")]
            Decision::Forward(forwarder, job) => {
                ResponseFuture::forwarding(forwarder.forward(job, req))
            }
        }
    }
}

impl<S> RequirePrimary<S> {
    fn admitted<ReqBody, ResBody>(
        &mut self,
        mut req: Request<ReqBody>,
        admitted: Admitted,
    ) -> ResponseFuture<S::Future, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        let Admitted {
            ctx,
            in_flight,
            answered_by,
        } = admitted;
        req.extensions_mut().insert(ctx.clone());
        ResponseFuture::admitted(
            self.inner.call(req),
            ctx,
            in_flight,
            self.config.retry_after,
            answered_by,
        )
    }
}

/// What the gate does with a request.
enum Decision<B> {
    Admit(Admitted),
    Refuse(Response<ResponseBody<B>>),
    #[cfg(feature = "forward")]
    Forward(Arc<Forwarder>, forward::Job),
}

/// A request admitted on the primary.
struct Admitted {
    ctx: TermContext,
    in_flight: InFlight,
    /// This node's id, for `x-primary-holder` on the response to a forwarded request.
    answered_by: Option<HeaderValue>,
}

impl Config {
    fn decide<R, B>(&self, req: &mut Request<R>) -> Decision<B> {
        let forwarded = req.headers().contains_key(X_PRIMARY_FORWARDED);
        #[cfg(feature = "forward")]
        if forwarded {
            if let Some(forwarder) = &self.forward
                && !forwarder.secret_ok(req.headers())
            {
                return Decision::Refuse(forward_secret_refusal());
            }
            req.headers_mut().remove(X_PRIMARY_FORWARD_SECRET);
        }
        let handle = match &self.handle {
            Some(handle) => Some(handle),
            None => req.extensions().get::<RoleHandle>(),
        };
        let Some(handle) = handle else {
            return Decision::Refuse(missing_layer());
        };
        if let Some((ctx, in_flight)) = admit(handle) {
            let answered_by = forwarded
                .then(|| HeaderValue::from_str(handle.node().id()).ok())
                .flatten();
            return Decision::Admit(Admitted {
                ctx,
                in_flight,
                answered_by,
            });
        }
        if forwarded {
            // Never forwarded twice: refused, with the mark that lets the forwarding node try
            // the next holder.
            let refusal =
                Refusal::not_primary(handle.lock(), other_holder(handle), self.retry_after);
            let mut res = refusal.response(StatusCode::SERVICE_UNAVAILABLE);
            res.headers_mut()
                .insert(X_PRIMARY_REFUSED, HeaderValue::from_static("1"));
            return Decision::Refuse(res);
        }
        #[cfg(feature = "forward")]
        if let Some(forwarder) = &self.forward {
            let job = forward::Job {
                handle: handle.clone(),
                trusted: self.trusted.clone(),
                retry_after: self.retry_after,
            };
            return Decision::Forward(forwarder.clone(), job);
        }
        Decision::Refuse(self.refuse(handle, req.uri()))
    }
}

#[cfg(feature = "forward")]
fn forward_secret_refusal<B>() -> Response<ResponseBody<B>> {
    Refusal::forwarding(
        "forward_secret",
        None,
        None,
        "the request says it was forwarded by another node (x-primary-forwarded) but does not \
         carry the nodes' shared secret"
            .to_owned(),
    )
    .response(StatusCode::FORBIDDEN)
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

impl Config {
    fn refuse<B>(&self, handle: &RoleHandle, uri: &Uri) -> Response<ResponseBody<B>> {
        let refusal = Refusal::not_primary(handle.lock(), other_holder(handle), self.retry_after);
        if self.redirect
            && let Some(location) = refusal
                .holder
                .as_ref()
                .and_then(|h| self.redirect_location(h, uri))
        {
            let refusal = Refusal {
                retry_after_ms: None,
                ..refusal
            };
            let mut res = refusal.response(StatusCode::TEMPORARY_REDIRECT);
            res.headers_mut().insert(LOCATION, location);
            return res;
        }
        refusal.response(StatusCode::SERVICE_UNAVAILABLE)
    }

    /// The holder's advertised URL with the request's path and query, if it is a valid
    /// redirect target.
    fn redirect_location(&self, holder: &Holder, uri: &Uri) -> Option<HeaderValue> {
        let advertised = usable_url(holder, self.trusted.as_deref(), "redirect")?;
        let path = uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .filter(|p| p.starts_with('/'))
            .unwrap_or("/");
        HeaderValue::try_from(advertised.join(path)).ok()
    }
}

/// The holder's advertised URL, if it may be sent clients (`what`: `"redirect"` or
/// `"forward"`): a valid advertised URL, of a trusted origin when `trusted` is set. Checked
/// again on every use, since it is read from the backend.
pub(crate) fn usable_url(
    holder: &Holder,
    trusted: Option<&[Origin]>,
    what: &'static str,
) -> Option<AdvertisedUrl> {
    let url = holder.url.as_deref()?;
    let advertised = match AdvertisedUrl::parse(url) {
        Ok(advertised) => advertised,
        Err(rule) => {
            warn_unusable_url(holder, url, rule, what);
            return None;
        }
    };
    if let Some(trusted) = trusted
        && !trusted.contains(&advertised.origin)
    {
        warn_unusable_url(
            holder,
            url,
            "its origin is not one of the gate's trusted origins",
            what,
        );
        return None;
    }
    Some(advertised)
}

/// Logs that a holder's URL cannot be a redirect or forwarding target: once per URL in a row,
/// since every request would repeat it while that holder keeps the lock.
fn warn_unusable_url(holder: &Holder, url: &str, why: &str, what: &'static str) {
    static LAST: Mutex<Option<String>> = Mutex::new(None);
    let mut last = crate::sync::lock(&LAST);
    if last.as_deref() == Some(url) {
        tracing::debug!(holder = %holder.id, url, why, what, "not using the holder's URL");
        return;
    }
    *last = Some(url.to_owned());
    tracing::warn!(
        holder = %holder.id,
        term = holder.term,
        url,
        why,
        what,
        "the holder's advertised URL is not a valid target; answering 503"
    );
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

fn missing_layer<B>() -> Response<ResponseBody<B>> {
    log_missing_layer("RequirePrimaryLayer (without with_handle)");
    Refusal::missing_layer(MISSING_LAYER.to_owned()).response(StatusCode::INTERNAL_SERVER_ERROR)
}
