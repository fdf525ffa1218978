//! The response future of the gate.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::body::{Forwarded, ResponseBody};
use super::refusal::Refusal;
use crate::http::header::X_PRIMARY_HOLDER;
use crate::role::{InFlight, TermContext};

/// The future of a forwarded request.
pub(crate) type ForwardFuture = Pin<Box<dyn Future<Output = Response<Forwarded>> + Send>>;

pin_project! {
    /// The response future of [`RequirePrimary`](super::RequirePrimary).
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[project_replace = KindReplace]
    enum Kind<F, B> {
        Admitted {
            #[pin]
            future: F,
            #[pin]
            aborted: WaitForCancellationFutureOwned,
            term: (TermContext, InFlight),
            retry_after: u64,
            answered_by: Option<HeaderValue>,
        },
        Refused {
            response: Option<Response<ResponseBody<B>>>,
        },
        // Constructed with the `forward` feature only.
        Forwarding {
            future: ForwardFuture,
        },
        Done,
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(super) fn admitted(
        future: F,
        ctx: TermContext,
        in_flight: InFlight,
        retry_after: u64,
        answered_by: Option<HeaderValue>,
    ) -> Self {
        ResponseFuture {
            kind: Kind::Admitted {
                future,
                aborted: ctx.abort_token().clone().cancelled_owned(),
                term: (ctx, in_flight),
                retry_after,
                answered_by,
            },
        }
    }

    #[cfg_attr(not(feature = "forward"), allow(dead_code))]
    pub(super) fn forwarding(future: ForwardFuture) -> Self {
        ResponseFuture {
            kind: Kind::Forwarding { future },
        }
    }

    pub(super) fn refused(response: Response<ResponseBody<B>>) -> Self {
        ResponseFuture {
            kind: Kind::Refused {
                response: Some(response),
            },
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Admitted { .. } => "admitted",
            Kind::Refused { .. } => "refused",
            Kind::Forwarding { .. } => "forwarding",
            Kind::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The Future contract forbids polling again after `Ready`.
        const POLLED_AFTER_READY: &str = "RequirePrimary's ResponseFuture polled after completion";
        let mut kind = self.project().kind;
        let handled = match kind.as_mut().project() {
            KindProj::Admitted {
                future,
                aborted,
                term: (ctx, _),
                ..
            } => {
                // Once the grace has run out the handler is not polled again.
                if ctx.abort_token().is_cancelled() {
                    None
                } else {
                    match future.poll(cx) {
                        Poll::Ready(out) => Some(out),
                        Poll::Pending => {
                            std::task::ready!(aborted.poll(cx));
                            None
                        }
                    }
                }
            }
            KindProj::Refused { response } => {
                return Poll::Ready(Ok(response.take().expect(POLLED_AFTER_READY)));
            }
            KindProj::Forwarding { future } => {
                let res = std::task::ready!(future.as_mut().poll(cx));
                kind.project_replace(Kind::Done);
                return Poll::Ready(Ok(res.map(ResponseBody::forwarded)));
            }
            KindProj::Done => panic!("{POLLED_AFTER_READY}"),
        };
        // Drops the handler's future (after the grace: unfinished).
        let KindReplace::Admitted {
            term: (ctx, in_flight),
            retry_after,
            answered_by,
            ..
        } = kind.project_replace(Kind::Done)
        else {
            unreachable!("the other states returned above");
        };
        Poll::Ready(match handled {
            Some(Ok(mut res)) => {
                if let Some(id) = answered_by {
                    res.headers_mut().insert(X_PRIMARY_HOLDER, id);
                }
                Ok(res
                    .map(|body| ResponseBody::admitted(body, ctx.abort_token().clone(), in_flight)))
            }
            // No response will be sent: the request is over.
            Some(Err(err)) => Err(err),
            None => Ok(Refusal::aborted(ctx.lock(), ctx.term(), retry_after)
                .response(StatusCode::SERVICE_UNAVAILABLE)),
        })
    }
}
