//! The JSON body of every refusal of the gate and of the `TermContext` extractor.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::body::ResponseBody;
use crate::http::header::X_PRIMARY_HOLDER;
use crate::role::Holder;

/// What a `500` for a missing [`PrimaryLayer`](crate::PrimaryLayer) says.
pub(crate) const MISSING_LAYER: &str = "no RoleHandle in the request extensions: add PrimaryLayer \
     to the router, outside the routes that read the role, e.g. \
     `.layer(PrimaryLayer::new(Elector::builder(lock).backend(backend))?)`, or \
     `.layer(AddRoleLayer::new(elector.handle()))` (tower-primary)";

/// The JSON body of a refusal by the [primary-only gate](super::RequirePrimaryLayer) (`503`,
/// `307`, `500`) and by the [`TermContext`](crate::TermContext) extractor (`503`):
///
/// ```json
/// {"error": "not_primary", "holder": {"id": "web-1:77", "host": "web-1", "pid": 77, …},
///  "retry_after_ms": 1000,
///  "message": "not primary for lock \"jobs\"; the primary is web-1:77 (term 12)"}
/// ```
///
/// It names the holder (host, pid, advertised URL): serve gated routes to the clients that may
/// know that, not on public routes.
///
/// # Examples
///
/// ```
/// use axum::{Router, body::Body, routing::post};
/// use http::{Request, StatusCode};
/// use tower::ServiceExt;
/// use tower_primary::http::require::Refusal;
/// use tower_primary::{AddRoleLayer, RequirePrimaryLayer, Role, RoleHandle};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let app = Router::new()
///     .route("/admin", post(|| async { "done" }).layer(RequirePrimaryLayer::new()))
///     .layer(AddRoleLayer::new(RoleHandle::fixed(Role::Starting)));
/// let res = app.oneshot(Request::post("/admin").body(Body::empty())?).await?;
/// assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
/// let body = axum::body::to_bytes(res.into_body(), 4096).await?;
/// let refusal: Refusal = serde_json::from_slice(&body)?;
/// assert_eq!(refusal.error, "no_primary"); // the election has not settled yet
/// assert_eq!(refusal.retry_after_ms, Some(1000));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Refusal {
    /// Why:
    /// - `"not_primary"`: another node holds the lock (`holder` names it);
    /// - `"no_primary"`: no holder is known (the election is under way, or the holder just left);
    /// - `"aborted"`: the request was admitted, but the term ended and the grace ran out before
    ///   its handler returned;
    /// - `"missing_layer"`: [`PrimaryLayer`](crate::PrimaryLayer) is not on the router (`500`);
    /// - with [forwarding](crate::RequirePrimaryLayer::forward) (`forward` feature):
    ///   `"forward_secret"` (`403`: a forwarded request without the shared secret),
    ///   `"body_too_large"` (`413`), `"upgrade_not_forwarded"` (`501`), `"forward_failed"` (`502`),
    ///   `"forward_timeout"` (`504`), and `"not_primary"` / `"no_primary"` (`503`) when no holder
    ///   took the request within the wait.
    pub error: String,
    /// The node that holds the lock, when known.
    pub holder: Option<Holder>,
    /// When to try again (`Retry-After` in milliseconds); `None` on a `307` and a `500`.
    pub retry_after_ms: Option<u64>,
    /// The same in words, for people reading logs.
    pub message: String,
}

impl Refusal {
    pub(crate) fn not_primary(lock: &str, holder: Option<Holder>, retry_after: u64) -> Self {
        let message = match &holder {
            Some(h) => format!(
                "not primary for lock {lock:?}; the primary is {} (term {})",
                h.id, h.term
            ),
            None => format!("not primary for lock {lock:?}; the primary is not known yet"),
        };
        Refusal {
            error: if holder.is_some() {
                "not_primary"
            } else {
                "no_primary"
            }
            .to_owned(),
            holder,
            retry_after_ms: Some(retry_after.saturating_mul(1000)),
            message,
        }
    }

    pub(crate) fn aborted(lock: &str, term: u64, retry_after: u64) -> Self {
        Refusal {
            error: "aborted".to_owned(),
            holder: None,
            retry_after_ms: Some(retry_after.saturating_mul(1000)),
            message: format!(
                "term {term} of lock {lock:?} ended and its grace period ran out before the \
                 request finished; it was aborted"
            ),
        }
    }

    /// A refusal of the forwarder: `error` and `message` as given.
    #[cfg(feature = "forward")]
    pub(crate) fn forwarding(
        error: &str,
        holder: Option<Holder>,
        retry_after_ms: Option<u64>,
        message: String,
    ) -> Self {
        Refusal {
            error: error.to_owned(),
            holder,
            retry_after_ms,
            message,
        }
    }

    pub(crate) fn missing_layer(message: String) -> Self {
        Refusal {
            error: "missing_layer".to_owned(),
            holder: None,
            retry_after_ms: None,
            message,
        }
    }

    /// The JSON text.
    pub(crate) fn to_bytes(&self) -> Bytes {
        // A struct of strings, numbers and a `Holder` (itself serializable) cannot fail to
        // serialize; an empty body would still be a refusal.
        serde_json::to_vec(self)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    /// `status` with this body, `content-type`, and for a `503` `Retry-After` and
    /// `x-primary-holder`.
    pub(crate) fn response<B>(&self, status: StatusCode) -> Response<ResponseBody<B>> {
        self.response_with(status, ResponseBody::full)
    }

    /// The same response with the JSON text in a body of `body`'s making.
    pub(crate) fn response_with<T>(
        &self,
        status: StatusCode,
        body: impl FnOnce(Bytes) -> T,
    ) -> Response<T> {
        let mut res = Response::new(body(self.to_bytes()));
        *res.status_mut() = status;
        self.headers(res.headers_mut());
        res
    }

    /// `content-type`; `Retry-After` when there is one; `x-primary-holder` when the holder is
    /// known.
    pub(crate) fn headers(&self, headers: &mut HeaderMap) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(ms) = self.retry_after_ms {
            headers.insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
        }
        if let Some(id) = self
            .holder
            .as_ref()
            .and_then(|h| HeaderValue::try_from(h.id.as_str()).ok())
        {
            headers.insert(X_PRIMARY_HOLDER, id);
        }
    }
}
