//! [`AddRoleLayer`] and [`AddRole`]: put a [`RoleHandle`] into every request's extensions.

use std::task::{Context, Poll};

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::role::RoleHandle;

/// Puts a [`RoleHandle`] you already have into every request: the handle of an
/// [`Elector`](crate::Elector) of your own, or [`RoleHandle::fixed`] in tests of a router. To let
/// the layer own the elector, use [`PrimaryLayer`](super::PrimaryLayer). See the
/// [module docs](super).
///
/// # Examples
///
/// ```
/// use axum::{Router, body::Body, routing::post};
/// use http::{Request, StatusCode};
/// use tower::ServiceExt;
/// use tower_primary::{AddRoleLayer, RequirePrimaryLayer, Role, RoleHandle};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // In tests of a router, a fixed role stands in for an elector.
/// let app = Router::new()
///     .route("/admin", post(|| async { "done" }).layer(RequirePrimaryLayer::new()))
///     .layer(AddRoleLayer::new(RoleHandle::fixed(Role::Starting)));
/// let res = app.oneshot(Request::post("/admin").body(Body::empty())?).await?;
/// assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct AddRoleLayer {
    handle: RoleHandle,
}

impl AddRoleLayer {
    /// A layer that puts `handle` (usually [`Elector::handle`](crate::Elector::handle)) into
    /// every request.
    pub fn new(handle: RoleHandle) -> Self {
        AddRoleLayer { handle }
    }

    /// The handle this layer puts into requests.
    #[must_use]
    pub fn handle(&self) -> &RoleHandle {
        &self.handle
    }
}

impl<S> Layer<S> for AddRoleLayer {
    type Service = AddRole<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AddRole::new(inner, self.handle.clone())
    }
}

/// Inserts a [`RoleHandle`] into every request's extensions and calls the inner service: the
/// service of [`AddRoleLayer`] and of [`PrimaryLayer`](super::PrimaryLayer).
#[derive(Clone, Debug)]
pub struct AddRole<S> {
    inner: S,
    handle: RoleHandle,
}

impl<S> AddRole<S> {
    /// Wraps `inner`, putting `handle` into every request.
    pub fn new(inner: S, handle: RoleHandle) -> Self {
        AddRole { inner, handle }
    }

    /// An [`AddRoleLayer`] for `handle`.
    pub fn layer(handle: RoleHandle) -> AddRoleLayer {
        AddRoleLayer::new(handle)
    }

    /// The role handle this service inserts.
    #[must_use]
    pub fn handle(&self) -> &RoleHandle {
        &self.handle
    }

    define_inner_service_accessors!();
}

impl<S, ReqBody> Service<Request<ReqBody>> for AddRole<S>
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
