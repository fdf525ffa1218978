//! axum extractors for the role (feature `axum`).
//!
//! Each is named for what it gives, and all of them read what [`PrimaryLayer`](crate::PrimaryLayer)
//! (or [`AddRoleLayer`](crate::AddRoleLayer)) put into the request:
//!
//! | extractor | gives | rejects with |
//! |---|---|---|
//! | [`TermContext`] | this node's term, only on the primary: put [`term`](TermContext::term) into downstream writes | `503` (with `Retry-After` and `x-primary-holder`) on other nodes, `500` when the layer is missing |
//! | [`Role`] | a snapshot of the role (and the term) when the request was extracted | `500` when the layer is missing |
//! | [`RoleHandle`] | the live handle: holder, node, lock name, liveness | `500` when the layer is missing |
//!
//! As `Option<…>` none of them rejects: `Option<Role>` and `Option<RoleHandle>` are `None`
//! without the layer, and `Option<TermContext>` is `None` on every node but the primary — for
//! handlers that serve everywhere but do a little more on the primary.
//!
//! Rejections carry the JSON [`Refusal`] body of the gate: the `500` says what is missing (*add
//! PrimaryLayer to the router*), and the `503` of [`TermContext`] is the same answer as the
//! [gate's](crate::RequirePrimaryLayer). Behind the gate [`TermContext`] is the term the gate
//! admitted the request under. An extracted [`TermContext`] counts as in flight while it (or a
//! clone of it) lives, so step-down and shutdown wait for the handler (up to the grace) before
//! they release the lock, also on routes without the gate; only the gate also waits for the
//! response body and aborts what is left after the grace.
//!
//! # Examples
//!
//! ```
//! use axum::{Router, body::Body, routing::{get, post}};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_primary::{AddRoleLayer, Role, RoleHandle, TermContext};
//!
//! async fn whoami(role: Role) -> String {
//!     format!("{} term={:?}", role.as_str(), role.term())
//! }
//!
//! async fn rebuild(term: TermContext) -> String {
//!     // Carry the term into the write: UPDATE … SET term = $term WHERE term <= $term
//!     format!("rebuilt under term {}", term.term())
//! }
//!
//! async fn status(primary: Option<TermContext>) -> &'static str {
//!     if primary.is_some() { "primary" } else { "standing by" }
//! }
//!
//! fn app(role: RoleHandle) -> Router {
//!     Router::new()
//!         .route("/whoami", get(whoami))
//!         .route("/rebuild", post(rebuild))
//!         .route("/status", get(status))
//!         .layer(AddRoleLayer::new(role))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // RoleHandle::fixed makes handler tests need no elector.
//! let secondary = app(RoleHandle::fixed(Role::Secondary { holder: None }));
//! let res = secondary.clone().oneshot(Request::post("/rebuild").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! let res = secondary.oneshot(Request::get("/status").body(Body::empty())?).await?;
//! assert_eq!(axum::body::to_bytes(res.into_body(), 64).await?, "standing by");
//!
//! let primary = app(RoleHandle::fixed(Role::primary(9)));
//! let res = primary.oneshot(Request::post("/rebuild").body(Body::empty())?).await?;
//! assert_eq!(axum::body::to_bytes(res.into_body(), 64).await?, "rebuilt under term 9");
//!
//! // Handlers can also be called directly.
//! let handle = RoleHandle::fixed(Role::primary(9));
//! assert_eq!(whoami(handle.role()).await, "primary term=Some(9)");
//! assert_eq!(rebuild(handle.term_context().unwrap()).await, "rebuilt under term 9");
//!
//! // Without the layer: a 500 that says what to add.
//! let res = Router::new().route("/whoami", get(whoami))
//!     .oneshot(Request::get("/whoami").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
//! let body = axum::body::to_bytes(res.into_body(), 1024).await?;
//! assert!(std::str::from_utf8(&body)?.contains("add PrimaryLayer"));
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::http::require::{MISSING_LAYER, Refusal, admit, hold, log_missing_layer, other_holder};
use crate::role::{Holder, Role, RoleHandle, TermContext};

/// The `Retry-After` of the extractor's `503`, in seconds (as the gate's default).
const RETRY_AFTER: u64 = 1;

/// Why a role extractor rejected a request.
#[derive(Debug)]
#[non_exhaustive]
pub enum RoleRejection {
    /// No [`RoleHandle`] in the request: [`PrimaryLayer`](crate::PrimaryLayer) is not on the
    /// router (or sits inside the route that extracts). Answers `500`.
    MissingLayer,
    /// This node is not primary. Answers `503` with `Retry-After` and, when the holder is known,
    /// `x-primary-holder`.
    NotPrimary {
        /// The lock name.
        lock: String,
        /// The node that holds the lock, when known.
        holder: Option<Box<Holder>>,
    },
}

impl fmt::Display for RoleRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoleRejection::MissingLayer => f.write_str(MISSING_LAYER),
            RoleRejection::NotPrimary { lock, holder } => {
                write!(f, "not primary for lock {lock:?}")?;
                match holder {
                    Some(h) => write!(f, "; the primary is {} (term {})", h.id, h.term),
                    None => f.write_str("; the primary is not known yet"),
                }
            }
        }
    }
}

impl std::error::Error for RoleRejection {}

impl RoleRejection {
    /// The status this rejection answers with.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            RoleRejection::MissingLayer => StatusCode::INTERNAL_SERVER_ERROR,
            RoleRejection::NotPrimary { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn not_primary(handle: &RoleHandle) -> Self {
        RoleRejection::NotPrimary {
            lock: handle.lock().to_owned(),
            holder: other_holder(handle).map(Box::new),
        }
    }
}

impl IntoResponse for RoleRejection {
    fn into_response(self) -> Response {
        let refusal = match &self {
            RoleRejection::MissingLayer => {
                log_missing_layer("a tower-primary extractor");
                Refusal::missing_layer(self.to_string())
            }
            RoleRejection::NotPrimary { lock, holder } => {
                Refusal::not_primary(lock, holder.as_deref().cloned(), RETRY_AFTER)
            }
        };
        let mut res = (self.status(), refusal.to_bytes()).into_response();
        refusal.headers(res.headers_mut());
        res
    }
}

fn handle_of(parts: &Parts) -> Option<&RoleHandle> {
    parts.extensions.get::<RoleHandle>()
}

impl<S: Send + Sync> FromRequestParts<S> for RoleHandle {
    type Rejection = RoleRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        handle_of(parts).cloned().ok_or(RoleRejection::MissingLayer)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for RoleHandle {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(handle_of(parts).cloned())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Role {
    type Rejection = RoleRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        handle_of(parts)
            .map(RoleHandle::role)
            .ok_or(RoleRejection::MissingLayer)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Role {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(handle_of(parts).map(RoleHandle::role))
    }
}

/// The former name of the [`TermContext`] extractor.
#[deprecated(note = "extract `TermContext` itself: it succeeds only on the primary")]
pub type PrimaryTerm = TermContext;

/// This node's term if it is primary, counted as in flight while the context lives.
fn extract_term(parts: &Parts) -> Result<TermContext, RoleRejection> {
    let handle = handle_of(parts).ok_or(RoleRejection::MissingLayer)?;
    // Behind the gate: the term the request was admitted under, if it still holds.
    let admitted = match parts.extensions.get::<TermContext>() {
        Some(ctx) => hold(ctx.clone()),
        None => admit(handle),
    };
    admitted
        .map(|(ctx, in_flight)| ctx.holding(in_flight))
        .ok_or_else(|| RoleRejection::not_primary(handle))
}

impl<S: Send + Sync> FromRequestParts<S> for TermContext {
    type Rejection = RoleRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        extract_term(parts)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for TermContext {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(extract_term(parts).ok())
    }
}
