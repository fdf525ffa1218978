//! What the forwarder answers: the primary's response, streamed, or its own refusal.

use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::request::remove_hop_by_hop;
use crate::error::BoxError;
use crate::http::header::X_PRIMARY_HOLDER;
use crate::http::require::Refusal;
use crate::http::require::body::{Forwarded, StreamBody};
use crate::role::Holder;

/// The primary's response, to pass on: hop-by-hop headers removed, and `x-primary-holder`
/// naming the node that answered (the primary's gate sets it; the holder the request was sent
/// to when it did not).
pub(super) fn pass_on(res: Response<Incoming>, holder: &Holder) -> Response<Forwarded> {
    let (mut parts, body) = res.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(X_PRIMARY_HOLDER)
        && let Ok(id) = HeaderValue::from_str(&holder.id)
    {
        parts.headers.insert(X_PRIMARY_HOLDER, id);
    }
    let body: StreamBody = Box::pin(body.map_err(BoxError::from));
    Response::from_parts(parts, Forwarded::Stream(body))
}

/// A refusal of the forwarder: `status` with the JSON [`Refusal`] body.
pub(super) fn refuse(status: StatusCode, refusal: &Refusal) -> Response<Forwarded> {
    refusal.response_with(status, Forwarded::Full)
}
