//! [`RoleHeadersLayer`] and [`RoleHeaders`]: `x-primary-role` and `x-primary-term` on every
//! response.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use crate::role::RoleHandle;

/// Adds `x-primary-role` and `x-primary-term` to every response: the role of this node when the
/// response was produced, and the latest known term (none while starting). See the
/// [module docs](super).
///
/// It reads the [`RoleHandle`] that [`PrimaryLayer`](super::PrimaryLayer) or
/// [`AddRoleLayer`](super::AddRoleLayer) put into the request, so it goes inside that layer (in
/// axum, `.layer(RoleHeadersLayer::new())` before `.layer(primary)`); give it a handle with
/// [`with_handle`](Self::with_handle) to use it alone. A response to a request without a handle
/// is left as it is.
///
/// # Examples
///
/// ```
/// use axum::{Router, body::Body, routing::get};
/// use http::Request;
/// use tower::ServiceExt;
/// use tower_primary::{AddRoleLayer, Role, RoleHandle, RoleHeadersLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let app = Router::new()
///     .route("/", get(|| async { "hi" }))
///     .layer(RoleHeadersLayer::new())
///     .layer(AddRoleLayer::new(RoleHandle::fixed(Role::primary(7))));
/// let res = app.oneshot(Request::get("/").body(Body::empty())?).await?;
/// assert_eq!(res.headers()["x-primary-role"], "primary");
/// assert_eq!(res.headers()["x-primary-term"], "7");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct RoleHeadersLayer {
    handle: Option<RoleHandle>,
}

impl RoleHeadersLayer {
    /// A layer that reads the role from the request's extensions.
    pub fn new() -> Self {
        RoleHeadersLayer { handle: None }
    }

    /// Reads the role from `handle` instead of the request, for use without
    /// [`PrimaryLayer`](super::PrimaryLayer).
    pub fn with_handle(self, handle: RoleHandle) -> Self {
        RoleHeadersLayer {
            handle: Some(handle),
        }
    }
}

impl<S> Layer<S> for RoleHeadersLayer {
    type Service = RoleHeaders<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RoleHeaders {
            inner,
            handle: self.handle.clone(),
        }
    }
}

/// The service of [`RoleHeadersLayer`]: adds the role headers to the inner service's responses.
#[derive(Clone, Debug)]
pub struct RoleHeaders<S> {
    inner: S,
    handle: Option<RoleHandle>,
}

impl<S> RoleHeaders<S> {
    /// Wraps `inner`, reading the role from each request's extensions.
    pub fn new(inner: S) -> Self {
        RoleHeaders {
            inner,
            handle: None,
        }
    }

    /// A [`RoleHeadersLayer`].
    pub fn layer() -> RoleHeadersLayer {
        RoleHeadersLayer::new()
    }

    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RoleHeaders<S>
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

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let handle = self
            .handle
            .clone()
            .or_else(|| req.extensions().get::<RoleHandle>().cloned());
        ResponseFuture::new(self.inner.call(req), handle)
    }
}
