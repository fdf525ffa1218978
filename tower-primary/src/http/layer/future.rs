//! The response future of [`RoleHeaders`](super::RoleHeaders).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use crate::http::header::{X_PRIMARY_ROLE, X_PRIMARY_TERM};
use crate::role::RoleHandle;

pin_project! {
    /// The response future of [`RoleHeaders`](super::RoleHeaders): adds the role headers once the
    /// inner service has answered.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // `None` when the request carried no handle, and once the headers are set.
        handle: Option<RoleHandle>,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, handle: Option<RoleHandle>) -> Self {
        ResponseFuture { inner, handle }
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
        if let Some(handle) = this.handle.take() {
            // The role when the response was produced, not when the request arrived.
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
