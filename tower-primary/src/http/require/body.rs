//! The response body of the gate: counts an admitted request as in flight until its body ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::error::BoxError;
use crate::role::InFlight;

pin_project! {
    /// The response body of [`RequirePrimary`](super::RequirePrimary).
    ///
    /// On an admitted request it is the handler's body, counted as in flight in its term until
    /// it ends (or is dropped): step-down and shutdown wait for it up to the grace. When the
    /// grace runs out first, the body ends with an [`Aborted`] error instead of its next frame,
    /// and the inner body is dropped unpolled. On a refusal it is the
    /// [JSON refusal](super::Refusal). On a request [forwarded](super::RequirePrimaryLayer::forward)
    /// to the primary (`forward` feature) it is the primary's body as it streams in; an error
    /// of the connection to the primary ends it with that error, and the client sees the
    /// response cut short.
    ///
    /// It is not `Unpin` (it waits on the term's abort signal in place): hyper and axum pin it;
    /// to poll it by hand, pin it first (`std::pin::pin!`, `Box::pin`).
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[project_replace = KindReplace]
    enum Kind<B> {
        Admitted {
            #[pin]
            body: B,
            #[pin]
            aborted: WaitForCancellationFutureOwned,
            abort: CancellationToken,
            in_flight: InFlight,
        },
        Full {
            data: Option<Bytes>,
        },
        // Constructed with the `forward` feature only.
        Forwarded {
            body: StreamBody,
        },
        Ended,
    }
}

/// The body of a response from the primary, type-erased so that the gate's response body stays
/// one nameable type.
pub(crate) type StreamBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send + Sync>>;

/// The body of what the forwarder answers.
#[cfg_attr(not(feature = "forward"), allow(dead_code))]
pub(crate) enum Forwarded {
    /// A refusal of the forwarder itself (JSON).
    Full(Bytes),
    /// The primary's body, as it streams in.
    Stream(StreamBody),
}

impl<B> ResponseBody<B> {
    /// An admitted body, counted by `in_flight` until it ends; cut when `abort` fires.
    pub(crate) fn admitted(body: B, abort: CancellationToken, in_flight: InFlight) -> Self
    where
        B: Body,
    {
        if body.is_end_stream() {
            // Nothing to stream (e.g. an empty body): the request is done now.
            return ResponseBody { kind: Kind::Ended };
        }
        ResponseBody {
            kind: Kind::Admitted {
                body,
                aborted: abort.clone().cancelled_owned(),
                abort,
                in_flight,
            },
        }
    }

    /// What the forwarder answered: the primary's body, or the forwarder's refusal.
    pub(crate) fn forwarded(body: Forwarded) -> Self {
        match body {
            Forwarded::Full(data) => ResponseBody::full(data),
            Forwarded::Stream(body) => ResponseBody {
                kind: Kind::Forwarded { body },
            },
        }
    }

    /// A complete body (a refusal).
    pub(crate) fn full(data: Bytes) -> Self {
        let data = (!data.is_empty()).then_some(data);
        ResponseBody {
            kind: Kind::Full { data },
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Admitted { .. } => "admitted",
            Kind::Full { .. } => "refusal",
            Kind::Forwarded { .. } => "forwarded",
            Kind::Ended => "ended",
        };
        f.debug_struct("ResponseBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut kind = self.project().kind;
        let (frame, end) = match kind.as_mut().project() {
            KindProj::Admitted {
                mut body,
                aborted,
                abort,
                ..
            } => {
                if abort.is_cancelled() {
                    (Some(Err(Aborted::new().into())), true)
                } else {
                    match body.as_mut().poll_frame(cx) {
                        Poll::Ready(None) => (None, true),
                        Poll::Ready(Some(Err(err))) => (Some(Err(err.into())), true),
                        Poll::Ready(Some(Ok(frame))) => (Some(Ok(frame)), body.is_end_stream()),
                        Poll::Pending => {
                            // Registered only when the body waits: a ready body pays an atomic
                            // read per frame, not the token's lock.
                            ready!(aborted.poll(cx));
                            (Some(Err(Aborted::new().into())), true)
                        }
                    }
                }
            }
            KindProj::Full { data } => {
                let frame = data.take().map(|d| Ok(Frame::data(d.into())));
                (frame, true)
            }
            KindProj::Forwarded { body } => match std::task::ready!(body.as_mut().poll_frame(cx)) {
                None => (None, true),
                Some(Err(err)) => (Some(Err(err)), true),
                Some(Ok(frame)) => (Some(Ok(frame.map_data(Into::into))), body.is_end_stream()),
            },
            KindProj::Ended => (None, false),
        };
        if end {
            // Drops the inner body and the in-flight count: the request is over.
            kind.project_replace(Kind::Ended);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Admitted { body, .. } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
            Kind::Forwarded { body } => body.is_end_stream(),
            Kind::Ended => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Admitted { body, .. } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Forwarded { body } => body.size_hint(),
            Kind::Ended => SizeHint::with_exact(0),
        }
    }
}

/// The error a gated response body ends with when the grace after the end of its term ran out
/// before the body did: the response was cut, and the client sees it truncated (hyper closes
/// the connection, or resets the HTTP/2 stream).
#[derive(Debug)]
#[non_exhaustive]
pub struct Aborted {}

impl Aborted {
    fn new() -> Self {
        Aborted {}
    }
}

impl fmt::Display for Aborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the primary's term ended and its grace period ran out before the response body did",
        )
    }
}

impl std::error::Error for Aborted {}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use futures_util::future::poll_fn;
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;
    use crate::role::{Role, RoleHandle, TermContext};

    fn term() -> TermContext {
        RoleHandle::fixed(Role::primary(1)).term_context().unwrap()
    }

    fn admitted<B: Body>(ctx: &TermContext, body: B) -> ResponseBody<B> {
        ResponseBody::admitted(body, ctx.abort_token().clone(), ctx.in_flight())
    }

    #[tokio::test]
    async fn a_full_body_keeps_its_size_and_is_counted_until_its_last_frame() {
        let ctx = term();
        // Not `Unpin` (it holds the abort's wait future), as hyper and axum's `Body::new` allow.
        let mut body = pin!(admitted(&ctx, Full::new(Bytes::from("hello"))));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        assert_eq!(ctx.tracker().len(), 1);
        let frame = body.as_mut().frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        // The inner body said it has ended: the request is no longer in flight.
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert_eq!(ctx.tracker().len(), 0);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn an_empty_body_is_not_in_flight_at_all() {
        let ctx = term();
        let body = admitted(&ctx, Full::new(Bytes::new()));
        assert!(body.is_end_stream());
        assert_eq!(ctx.tracker().len(), 0);
    }

    #[tokio::test]
    async fn a_dropped_body_is_no_longer_in_flight() {
        let ctx = term();
        let stream = futures_util::stream::pending::<Result<Frame<Bytes>, std::io::Error>>();
        let body = admitted(&ctx, StreamBody::new(stream));
        assert!(!body.is_end_stream());
        assert_eq!(ctx.tracker().len(), 1);
        drop(body);
        assert_eq!(ctx.tracker().len(), 0);
    }

    #[tokio::test]
    async fn a_waiting_body_is_cut_when_the_abort_fires() {
        let ctx = term();
        let stream = futures_util::stream::pending::<Result<Frame<Bytes>, std::io::Error>>();
        let mut body = pin!(admitted(&ctx, StreamBody::new(stream)));
        let pending = poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx).is_pending())).await;
        assert!(pending);
        ctx.abort_token().cancel();
        let err = body.as_mut().frame().await.unwrap().unwrap_err();
        assert!(err.is::<Aborted>(), "{err}");
        assert_eq!(ctx.tracker().len(), 0);
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_refusal_is_one_frame_of_known_size() {
        let mut body = pin!(ResponseBody::<Full<Bytes>>::full(Bytes::from("{}")));
        assert_eq!(body.size_hint().exact(), Some(2));
        assert!(!body.is_end_stream());
        assert_eq!(
            body.as_mut()
                .frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap(),
            "{}"
        );
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }
}
