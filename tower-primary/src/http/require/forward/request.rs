//! The forwarded request, prepared once for every attempt: its headers rewritten, its body
//! buffered (retryable) or kept for streaming (retryable only until its first byte is taken).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, EXPECT, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::Forward;
use crate::error::BoxError;
use crate::http::header::{X_PRIMARY_FORWARD_SECRET, X_PRIMARY_FORWARDED};

/// A request body, type-erased.
pub(super) type BoxBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

/// The headers that describe one connection, not the request (RFC 9110, 7.6.1), besides those
/// the `connection` header names.
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
];

/// Removes the hop-by-hop headers: those the `connection` header names, then the fixed list,
/// and `upgrade`.
pub(super) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(UPGRADE);
}

/// Whether the request asks for a protocol upgrade (WebSocket) or a tunnel, which the forwarder
/// does not carry.
pub(super) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT || req.headers().contains_key(UPGRADE)
}

/// Rewrites the headers of a request to forward: hop-by-hop headers removed; `x-forwarded-for`
/// extended with the client's address, `x-forwarded-proto` and `x-forwarded-host` set unless
/// a proxy in front set them; `x-primary-forwarded` set to this node; the secret set (or an
/// incoming one removed).
pub(super) fn rewrite_headers(parts: &mut Parts, settings: &Forward, node: &HeaderValue) {
    let client = (settings.client_addr)(&parts.extensions);
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    // `Expect: 100-continue` is answered on this hop (see `prepare`).
    headers.remove(EXPECT);
    let host = headers.remove(HOST).or_else(|| {
        let authority = parts.uri.authority()?;
        HeaderValue::from_str(authority.as_str()).ok()
    });

    const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    if let Some(ip) = client {
        let earlier: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let chain = if earlier.is_empty() {
            ip.to_string()
        } else {
            format!("{}, {ip}", earlier.join(", "))
        };
        if let Ok(value) = HeaderValue::from_str(&chain) {
            headers.insert(&X_FORWARDED_FOR, value);
        }
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        let proto = parts.uri.scheme_str().unwrap_or("http");
        if let Ok(value) = HeaderValue::from_str(proto) {
            headers.insert(&X_FORWARDED_PROTO, value);
        }
    }
    if !headers.contains_key(&X_FORWARDED_HOST)
        && let Some(host) = host
    {
        headers.insert(&X_FORWARDED_HOST, host);
    }
    headers.insert(X_PRIMARY_FORWARDED, node.clone());
    match &settings.secret {
        Some(secret) => headers.insert(X_PRIMARY_FORWARD_SECRET, secret.clone()),
        None => headers.remove(X_PRIMARY_FORWARD_SECRET),
    };
}

/// What is wrong with a body before anything was sent.
#[derive(Debug)]
pub(super) enum BodyProblem {
    /// Over [`Forward::max_body`].
    TooLarge,
    /// The client's body failed while it was read.
    Unreadable(BoxError),
}

/// The body of the forwarded request, shared by its attempts.
pub(super) enum Outgoing {
    /// Read whole: sent again on every attempt.
    Buffered(Bytes),
    /// Streamed: the first attempt whose connection takes a byte of it owns it.
    Streamed(Arc<Slot>),
}

impl Outgoing {
    /// Whether another attempt may still send the whole body: a buffered body always, a
    /// streamed one until its first byte was taken.
    pub(super) fn retryable(&self) -> bool {
        match self {
            Outgoing::Buffered(_) => true,
            Outgoing::Streamed(slot) => !slot.taken.load(Ordering::Acquire),
        }
    }

    /// Whether a streamed body went past the maximum while it was sent.
    pub(super) fn too_large(&self) -> bool {
        match self {
            Outgoing::Buffered(_) => false,
            Outgoing::Streamed(slot) => slot.too_large.load(Ordering::Acquire),
        }
    }

    /// The body of one attempt.
    pub(super) fn body(&self) -> OutBody {
        match self {
            Outgoing::Buffered(data) => OutBody::Full((!data.is_empty()).then(|| data.clone())),
            Outgoing::Streamed(slot) => OutBody::Streamed {
                slot: slot.clone(),
                body: None,
            },
        }
    }
}

/// A streamed body, until an attempt takes it.
pub(super) struct Slot {
    body: Mutex<Option<BoxBody>>,
    taken: AtomicBool,
    too_large: AtomicBool,
    max: Option<u64>,
}

/// Reads the body of a request to forward: whole when it fits in the buffer (and the client
/// did not ask for `100-continue`, which is answered only once a connection to the primary
/// takes the body), else kept for streaming with what was read so far. Over the maximum:
/// [`BodyProblem::TooLarge`], before anything is sent.
pub(super) async fn prepare<B>(
    parts: &Parts,
    body: B,
    settings: &Forward,
) -> Result<Outgoing, BodyProblem>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(max), Some(length)) = (settings.max_body, length)
        && length > max
    {
        return Err(BodyProblem::TooLarge);
    }
    let expect_continue = parts
        .headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let limit = settings.buffer_limit as u64;
    let mut body: BoxBody = Box::pin(
        body.map_frame(|frame| frame.map_data(|mut d| d.copy_to_bytes(d.remaining())))
            .map_err(Into::into),
    );
    if expect_continue || length.is_some_and(|l| l > limit) {
        return Ok(streamed(VecDeque::new(), body, settings));
    }
    let mut read = VecDeque::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyProblem::Unreadable)?;
        // Trailers are not forwarded (hyper's client sends none on HTTP/1.1 bodies it frames).
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if settings.max_body.is_some_and(|max| total > max) {
            return Err(BodyProblem::TooLarge);
        }
        read.push_back(data);
        if total > limit {
            return Ok(streamed(read, body, settings));
        }
    }
    Ok(Outgoing::Buffered(concat(read, total)))
}

fn concat(mut chunks: VecDeque<Bytes>, total: u64) -> Bytes {
    if chunks.len() <= 1 {
        return chunks.pop_front().unwrap_or_default();
    }
    let mut all = BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
    for chunk in chunks {
        all.extend_from_slice(&chunk);
    }
    all.freeze()
}

fn streamed(read: VecDeque<Bytes>, rest: BoxBody, settings: &Forward) -> Outgoing {
    let body: BoxBody = Box::pin(Prefixed { read, rest });
    Outgoing::Streamed(Arc::new(Slot {
        body: Mutex::new(Some(body)),
        taken: AtomicBool::new(false),
        too_large: AtomicBool::new(false),
        max: settings.max_body,
    }))
}

/// The chunks read while trying to buffer, then the rest of the client's body.
struct Prefixed {
    read: VecDeque<Bytes>,
    rest: BoxBody,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        self.rest.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }
}

/// The body the client sends to the primary.
pub(crate) enum OutBody {
    /// A buffered body (`None`: empty).
    Full(Option<Bytes>),
    /// A streamed body, taken from its slot on the first poll.
    Streamed {
        slot: Arc<Slot>,
        body: Option<(BoxBody, u64)>,
    },
}

/// The error of a streamed body past [`Forward::max_body`].
#[derive(Debug)]
struct TooLarge;

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body is longer than the forwarder's maximum")
    }
}

impl std::error::Error for TooLarge {}

impl Body for OutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            OutBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            OutBody::Streamed { slot, body } => {
                if body.is_none() {
                    let taken = crate::sync::lock(&slot.body).take();
                    let Some(taken) = taken else {
                        // Another attempt took it: this one cannot send the body.
                        return Poll::Ready(Some(Err(
                            "the request body was already sent to another node".into(),
                        )));
                    };
                    slot.taken.store(true, Ordering::Release);
                    *body = Some((taken, 0));
                }
                let Some((inner, sent)) = body.as_mut() else {
                    unreachable!("set above");
                };
                let frame = std::task::ready!(inner.as_mut().poll_frame(cx));
                if let Some(Ok(frame)) = &frame
                    && let Some(data) = frame.data_ref()
                {
                    *sent += data.len() as u64;
                    if slot.max.is_some_and(|max| *sent > max) {
                        slot.too_large.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(TooLarge.into())));
                    }
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full(data) => data.is_none(),
            OutBody::Streamed { body, .. } => body.as_ref().is_some_and(|(b, _)| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            OutBody::Streamed { .. } => SizeHint::default(),
        }
    }
}
