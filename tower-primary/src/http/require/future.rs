//! The response future of the gate.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::body::ResponseBody;
use super::refusal::Refusal;
use crate::role::{InFlight, TermContext};

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
        },
        Refused {
            response: Option<Response<ResponseBody<B>>>,
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
    ) -> Self {
        ResponseFuture {
            kind: Kind::Admitted {
                future,
                aborted: ctx.abort_token().clone().cancelled_owned(),
                term: (ctx, in_flight),
                retry_after,
            },
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
            KindProj::Done => panic!("{POLLED_AFTER_READY}"),
        };
        // Drops the handler's future (after the grace: unfinished).
        let KindReplace::Admitted {
            term: (ctx, in_flight),
            retry_after,
            ..
        } = kind.project_replace(Kind::Done)
        else {
            unreachable!("the other states returned above");
        };
        Poll::Ready(match handled {
            Some(Ok(res)) => {
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
