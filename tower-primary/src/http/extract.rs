//! axum extractors for the role (feature `axum`).
//!
//! All of them read what [`PrimaryLayer`](crate::PrimaryLayer) put into the request:
//!
//! | extractor | gives | rejects with |
//! |---|---|---|
//! | [`RoleHandle`] | the live handle | `500` when the layer is missing |
//! | [`CurrentRole`] | a read-only snapshot: role, term, holder | `500` when the layer is missing |
//! | [`PrimaryTerm`] | the [`TermContext`] of this node's term, only on the primary | `503` (with `Retry-After` and `x-primary-holder`) on other nodes, `500` when the layer is missing |
//!
//! As `Option<…>` none of them rejects: `Option<RoleHandle>` and `Option<CurrentRole>` are `None`
//! without the layer, and `Option<PrimaryTerm>` is `None` on every node but the primary — for
//! handlers that serve everywhere but do a little more on the primary.
//!
//! Rejections carry the JSON [`Refusal`] body of the gate: the `500` says what is missing (*add
//! PrimaryLayer to the router*), and the `503` of [`PrimaryTerm`] is the same answer as the
//! [gate's](crate::RequirePrimaryLayer). Behind the gate [`PrimaryTerm`] returns the term the gate
//! admitted the request under. A [`PrimaryTerm`] counts as in flight
//! while it lives, so step-down and shutdown wait for the handler (up to the grace) before they
//! release the lock, also on routes without the gate; only the gate also waits for the response
//! body and aborts what is left after the grace.
//!
//! # Examples
//!
//! ```
//! use axum::{Router, body::Body, routing::{get, post}};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_primary::{CurrentRole, PrimaryLayer, PrimaryTerm, Role, RoleHandle};
//!
//! async fn whoami(role: CurrentRole) -> String {
//!     format!("{} term={:?}", role.role().as_str(), role.term())
//! }
//!
//! async fn rebuild(term: PrimaryTerm) -> String {
//!     // Carry the term into the write: UPDATE … SET term = $term WHERE term <= $term
//!     format!("rebuilt under term {}", term.term())
//! }
//!
//! async fn status(primary: Option<PrimaryTerm>) -> &'static str {
//!     if primary.is_some() { "primary" } else { "standing by" }
//! }
//!
//! fn app(role: RoleHandle) -> Router {
//!     Router::new()
//!         .route("/whoami", get(whoami))
//!         .route("/rebuild", post(rebuild))
//!         .route("/status", get(status))
//!         .layer(PrimaryLayer::new(role))
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
//! let role = CurrentRole::from_handle(&RoleHandle::fixed(Role::primary(9)));
//! assert_eq!(whoami(role).await, "primary term=Some(9)");
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
use std::ops::Deref;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::http::require::{MISSING_LAYER, Refusal, admit, hold, log_missing_layer, other_holder};
use crate::role::{Holder, InFlight, Role, RoleHandle, TermContext};

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

/// A read-only snapshot of the role, taken when the request was extracted. See the
/// [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentRole {
    role: Role,
    holder: Option<Holder>,
}

impl CurrentRole {
    /// A snapshot of `handle` now (for calling handlers in tests).
    #[must_use]
    pub fn from_handle(handle: &RoleHandle) -> Self {
        CurrentRole {
            role: handle.role(),
            holder: handle.holder(),
        }
    }

    /// The role.
    #[must_use]
    pub fn role(&self) -> &Role {
        &self.role
    }

    /// Whether this node was primary.
    #[must_use]
    pub fn is_primary(&self) -> bool {
        self.role.is_primary()
    }

    /// The latest known term: this node's while primary, else the holder's.
    #[must_use]
    pub fn term(&self) -> Option<u64> {
        self.role.term()
    }

    /// The holder as known: this node's own record while primary.
    #[must_use]
    pub fn holder(&self) -> Option<&Holder> {
        self.holder.as_ref()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for CurrentRole {
    type Rejection = RoleRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        handle_of(parts)
            .map(CurrentRole::from_handle)
            .ok_or(RoleRejection::MissingLayer)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for CurrentRole {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(handle_of(parts).map(CurrentRole::from_handle))
    }
}

/// This node's term, extracted only on the primary; rejects with `503` elsewhere. See the
/// [module docs](self).
///
/// Dereferences to the [`TermContext`]: put [`term`](TermContext::term) into downstream writes,
/// check [`is_valid`](TermContext::is_valid) before side effects. While a `PrimaryTerm` lives,
/// step-down and shutdown wait for it (up to the grace) before they release the lock.
#[derive(Debug)]
pub struct PrimaryTerm {
    ctx: TermContext,
    _in_flight: InFlight,
}

impl PrimaryTerm {
    /// The current term of `handle`, if this node is primary (for calling handlers in tests).
    ///
    /// ```
    /// use tower_primary::{PrimaryTerm, Role, RoleHandle};
    ///
    /// let term = PrimaryTerm::from_handle(&RoleHandle::fixed(Role::primary(5))).unwrap();
    /// assert_eq!(term.term(), 5);
    /// assert!(PrimaryTerm::from_handle(&RoleHandle::fixed(Role::Starting)).is_none());
    /// ```
    #[must_use]
    pub fn from_handle(handle: &RoleHandle) -> Option<Self> {
        admit(handle).map(|(ctx, in_flight)| PrimaryTerm {
            ctx,
            _in_flight: in_flight,
        })
    }

    /// The term's context.
    #[must_use]
    pub fn context(&self) -> &TermContext {
        &self.ctx
    }

    /// The term's context, ending this value's in-flight count.
    #[must_use]
    pub fn into_context(self) -> TermContext {
        self.ctx
    }

    fn extract(parts: &Parts) -> Result<Self, RoleRejection> {
        let handle = handle_of(parts).ok_or(RoleRejection::MissingLayer)?;
        // Behind the gate: the term the request was admitted under, if it still holds.
        let admitted = match parts.extensions.get::<TermContext>() {
            Some(ctx) => hold(ctx.clone()),
            None => admit(handle),
        };
        admitted
            .map(|(ctx, in_flight)| PrimaryTerm {
                ctx,
                _in_flight: in_flight,
            })
            .ok_or_else(|| RoleRejection::not_primary(handle))
    }
}

impl Deref for PrimaryTerm {
    type Target = TermContext;

    fn deref(&self) -> &TermContext {
        &self.ctx
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PrimaryTerm {
    type Rejection = RoleRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        PrimaryTerm::extract(parts)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for PrimaryTerm {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(PrimaryTerm::extract(parts).ok())
    }
}
