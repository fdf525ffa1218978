//! [`PrimaryLayer`]: puts the [`RoleHandle`] into every request's extensions.
//!
//! The layer is what the rest of the HTTP integration reads: the
//! [primary-only gate](crate::RequirePrimaryLayer), the [extractors](crate::http::extract) and the
//! [`/health/role`](crate::http::health) handler all find the role in the request. On the request path it
//! does one extension insert and nothing else: no lock, no I/O, no look at the backend. It is
//! generic over the request and response bodies, so it fits any tower HTTP stack (axum,
//! hyper-util, tonic).
//!
//! Build it from an elector's handle with [`PrimaryLayer::new`], or let the layer own the
//! elector: [`PrimaryLayer::file`] (and [`PrimaryLayer::from_builder`] for any backend) checks the
//! configuration at once and claims the lock when the layer first builds a service. axum calls
//! [`Layer::layer`] once per route; the claim happens once, and every clone of the layer shares the
//! one elector, which [`PrimaryLayer::elector`] hands out for singleton tasks and graceful shutdown.
//!
//! # Examples
//!
//! ```
//! use axum::{Extension, Router, body::Body, routing::get};
//! use http::Request;
//! use tower::ServiceExt;
//! use tower_primary::{Elector, MemoryBackend, PrimaryLayer, RoleHandle};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let elector = Elector::builder("web").backend(MemoryBackend::new()).spawn()?;
//! elector.handle().wait_primary().await;
//!
//! let app = Router::new()
//!     .route("/", get(|Extension(role): Extension<RoleHandle>| async move {
//!         format!("{} (term {:?})", role.role().as_str(), role.term())
//!     }))
//!     .layer(PrimaryLayer::new(elector.handle()).role_headers());
//!
//! let res = app.oneshot(Request::get("/").body(Body::empty())?).await?;
//! assert_eq!(res.headers()["x-primary-role"], "primary");
//! assert_eq!(res.headers()["x-primary-term"], elector.handle().term().unwrap().to_string());
//! # elector.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::elector::{Elector, ElectorBuilder, Prepared};
use crate::error::ConfigError;
use crate::http::header::{X_PRIMARY_ROLE, X_PRIMARY_TERM};
use crate::role::RoleHandle;

/// The lock name [`PrimaryLayer::file`] campaigns for.
pub const DEFAULT_LOCK: &str = "primary";

/// Puts the [`RoleHandle`] into every request's extensions. See the [module docs](self).
///
/// `H` says whether responses get role headers: [`NoRoleHeaders`] (the default) or
/// [`RoleHeaders`] (after [`role_headers`](PrimaryLayer::role_headers)). Without them the service
/// returns the inner service's own future.
#[derive(Clone, Debug)]
#[must_use]
pub struct PrimaryLayer<H = NoRoleHeaders> {
    source: Source,
    _headers: PhantomData<H>,
}

/// [`PrimaryLayer`] leaves responses as they are (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRoleHeaders;

/// [`PrimaryLayer`] adds `x-primary-role` and `x-primary-term` to every response; see
/// [`PrimaryLayer::role_headers`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RoleHeaders;

#[derive(Clone, Debug)]
enum Source {
    Handle(RoleHandle),
    Claim(Arc<Claim>),
}

const INTERRUPTED: &str = "tower-primary: an earlier attempt to claim the lock panicked";

/// A validated elector that is spawned by the first `layer()` (or `elector()`) call.
struct Claim {
    lock: String,
    state: Mutex<ClaimState>,
}

enum ClaimState {
    Pending(Box<Prepared>),
    Claimed(Elector),
    /// Spawning failed; the message is repeated to every later caller.
    Failed(String),
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &*lock(&self.state) {
            ClaimState::Pending(_) => "pending",
            ClaimState::Claimed(_) => "claimed",
            ClaimState::Failed(_) => "failed",
        };
        f.debug_struct("Claim")
            .field("lock", &self.lock)
            .field("state", &state)
            .finish()
    }
}

use crate::sync::lock;

impl Claim {
    /// Spawns the elector the first time; returns the same one every time after.
    fn elector(&self, caller: &'static str) -> Elector {
        let mut state = lock(&self.state);
        if let ClaimState::Claimed(elector) = &*state {
            return elector.clone();
        }
        if let ClaimState::Failed(msg) = &*state {
            panic!("{msg}");
        }
        if tokio::runtime::Handle::try_current().is_err() {
            // Checked before the prepared elector is consumed, so a later call inside a runtime
            // can still claim.
            let err = ConfigError::NoRuntime { what: caller };
            panic!(
                "tower-primary: {err}: the layer claims the lock {:?} when it first builds a \
                 service; build the router inside the runtime (e.g. in `#[tokio::main]`)",
                self.lock
            );
        }
        let ClaimState::Pending(prepared) =
            std::mem::replace(&mut *state, ClaimState::Failed(INTERRUPTED.to_owned()))
        else {
            unreachable!("claimed and failed states returned above");
        };
        match prepared.spawn() {
            Ok(elector) => {
                *state = ClaimState::Claimed(elector.clone());
                elector
            }
            Err(err) => {
                let msg = format!(
                    "tower-primary: cannot claim the lock {:?}: {err}",
                    self.lock
                );
                *state = ClaimState::Failed(msg.clone());
                drop(state);
                panic!("{msg}");
            }
        }
    }
}

impl PrimaryLayer {
    /// A layer that puts `handle` (usually [`Elector::handle`]) into every request.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_primary::{PrimaryLayer, Role, RoleHandle};
    ///
    /// // In tests of a router, a fixed role stands in for an elector.
    /// let layer = PrimaryLayer::new(RoleHandle::fixed(Role::Starting));
    /// assert!(layer.elector().is_none());
    /// ```
    pub fn new(handle: RoleHandle) -> Self {
        PrimaryLayer {
            source: Source::Handle(handle),
            _headers: PhantomData,
        }
    }

    /// A layer that owns an elector for the lock [`DEFAULT_LOCK`] in the directory `dir`
    /// ([`FileLock`](crate::FileLock)): the zero-setup choice for the workers of one host.
    ///
    /// The directory is checked now. The lock is claimed (the elector spawned) when the layer
    /// first builds a service, once for all clones. Use [`from_builder`](Self::from_builder) for
    /// another lock name, an advertised URL (for 307 redirects) or other settings.
    ///
    /// # Errors
    ///
    /// [`ConfigError::LockDir`] when the directory cannot be used.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use tower_primary::PrimaryLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let primary = PrimaryLayer::file(dir.path())?;
    /// let app: Router = Router::new()
    ///     .route("/health/role", get(tower_primary::http::health::role))
    ///     .layer(primary.clone()); // claims the lock
    /// let elector = primary.elector().expect("a file layer owns its elector");
    /// elector.handle().wait_primary().await; // the only node here
    /// # elector.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "file")]
    #[cfg_attr(docsrs, doc(cfg(feature = "file")))]
    pub fn file(dir: impl Into<std::path::PathBuf>) -> Result<Self, ConfigError> {
        Self::from_builder(Elector::builder(DEFAULT_LOCK).backend(crate::FileLock::new(dir)))
    }

    /// A layer that owns the elector `builder` describes. The configuration is checked now (as
    /// [`ElectorBuilder::spawn`] checks it); the elector is spawned when the layer first builds a
    /// service, or when [`elector`](Self::elector) is first called, once for all clones.
    ///
    /// # Errors
    ///
    /// The [`ConfigError`] that [`ElectorBuilder::spawn`] would return, except
    /// [`ConfigError::NoRuntime`]: no runtime is needed until the first service is built.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_primary::{Elector, MemoryBackend, PrimaryLayer};
    ///
    /// // Outside a runtime: only the configuration is checked.
    /// let layer = PrimaryLayer::from_builder(
    ///     Elector::builder("jobs")
    ///         .backend(MemoryBackend::new())
    ///         .advertise("http://10.0.0.7:8080"),
    /// )?;
    /// assert!(!layer.is_claimed());
    ///
    /// let err = PrimaryLayer::from_builder(Elector::builder("no/slashes")).unwrap_err();
    /// assert!(err.to_string().starts_with("invalid lock name"));
    /// # Ok::<_, tower_primary::ConfigError>(())
    /// ```
    pub fn from_builder(builder: ElectorBuilder) -> Result<Self, ConfigError> {
        let prepared = builder.prepare()?;
        Ok(PrimaryLayer {
            source: Source::Claim(Arc::new(Claim {
                lock: prepared.lock_name().to_owned(),
                state: Mutex::new(ClaimState::Pending(Box::new(prepared))),
            })),
            _headers: PhantomData,
        })
    }

    /// Adds `x-primary-role` and `x-primary-term` to every response (off by default): the role of
    /// this node when the response was produced, and the latest known term (none while
    /// starting).
    pub fn role_headers(self) -> PrimaryLayer<RoleHeaders> {
        PrimaryLayer {
            source: self.source,
            _headers: PhantomData,
        }
    }
}

impl<H> PrimaryLayer<H> {
    /// The elector this layer owns ([`file`](Self::file), [`from_builder`](Self::from_builder)),
    /// spawned now if no service has been built yet; `None` for a layer built from a handle.
    ///
    /// Use it to add [singleton tasks](Elector::singleton_task) and to wire graceful shutdown
    /// ([`Elector::shutdown_signal`]).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, when the elector has not been spawned yet; or if spawning it
    /// failed (e.g. the lock directory was removed after the layer was built).
    #[must_use]
    pub fn elector(&self) -> Option<Elector> {
        match &self.source {
            Source::Handle(_) => None,
            Source::Claim(claim) => Some(claim.elector("PrimaryLayer::elector")),
        }
    }

    /// Whether the lock has been claimed: always for a layer built from a handle, and once a
    /// service has been built (or [`elector`](Self::elector) called) for one that owns its
    /// elector.
    #[must_use]
    pub fn is_claimed(&self) -> bool {
        match &self.source {
            Source::Handle(_) => true,
            Source::Claim(claim) => matches!(*lock(&claim.state), ClaimState::Claimed(_)),
        }
    }

    fn handle(&self) -> RoleHandle {
        match &self.source {
            Source::Handle(handle) => handle.clone(),
            Source::Claim(claim) => claim.elector("PrimaryLayer::layer").handle(),
        }
    }
}

impl<S, H> Layer<S> for PrimaryLayer<H> {
    type Service = Primary<S, H>;

    /// # Panics
    ///
    /// For a layer that owns its elector: outside a tokio runtime when the lock has not been
    /// claimed yet, with a message that says so.
    fn layer(&self, inner: S) -> Self::Service {
        Primary {
            inner,
            handle: self.handle(),
            _headers: PhantomData,
        }
    }
}

/// The service of [`PrimaryLayer`]: inserts the [`RoleHandle`] into the request's extensions and
/// calls the inner service.
#[derive(Clone, Debug)]
pub struct Primary<S, H = NoRoleHeaders> {
    inner: S,
    handle: RoleHandle,
    _headers: PhantomData<H>,
}

impl<S> Primary<S> {
    /// Wraps `inner`, putting `handle` into every request.
    pub fn new(inner: S, handle: RoleHandle) -> Self {
        Primary {
            inner,
            handle,
            _headers: PhantomData,
        }
    }
}

impl<S, H> Primary<S, H> {
    /// The role handle this service inserts.
    #[must_use]
    pub fn handle(&self) -> &RoleHandle {
        &self.handle
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

impl<S, ReqBody> Service<Request<ReqBody>> for Primary<S, NoRoleHeaders>
where
    S: Service<Request<ReqBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        req.extensions_mut().insert(self.handle.clone());
        self.inner.call(req)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Primary<S, RoleHeaders>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        req.extensions_mut().insert(self.handle.clone());
        ResponseFuture {
            inner: self.inner.call(req),
            role_headers: Some(self.handle.clone()),
        }
    }
}

pin_project! {
    /// The response future of [`Primary`] with [`RoleHeaders`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        role_headers: Option<RoleHandle>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if let Some(handle) = this.role_headers.take() {
            let role = handle.role();
            let headers = res.headers_mut();
            headers.insert(X_PRIMARY_ROLE, HeaderValue::from_static(role.as_str()));
            if let Some(term) = role.term() {
                headers.insert(X_PRIMARY_TERM, HeaderValue::from(term));
            }
        }
        Poll::Ready(Ok(res))
    }
}
