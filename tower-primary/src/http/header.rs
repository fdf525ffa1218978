//! The HTTP header names tower-primary sets.
//!
//! - [`X_PRIMARY_HOLDER`]: the id of the node that holds the lock, on refusals (503) and
//!   redirects (307) of the [primary-only gate](crate::RequirePrimaryLayer) when the holder is
//!   known;
//! - [`X_PRIMARY_ROLE`] and [`X_PRIMARY_TERM`]: this node's role and the latest known term, on every
//!   response when [`RoleHeadersLayer`](crate::RoleHeadersLayer) is used;
//! - [`X_PRIMARY_FORWARDED`], [`X_PRIMARY_FORWARD_SECRET`] and [`X_PRIMARY_REFUSED`]: a request
//!   [forwarded](crate::RequirePrimaryLayer::forward) by another node, its shared secret, and the
//!   gate's mark on a refusal of such a request.
//!
//! Refusals also carry the standard `Retry-After` ([`http::header::RETRY_AFTER`]).
//!
//! # Examples
//!
//! ```
//! use tower_primary::http::header::{X_PRIMARY_HOLDER, X_PRIMARY_ROLE, X_PRIMARY_TERM};
//!
//! assert_eq!(X_PRIMARY_HOLDER.as_str(), "x-primary-holder");
//! assert_eq!(X_PRIMARY_ROLE.as_str(), "x-primary-role");
//! assert_eq!(X_PRIMARY_TERM.as_str(), "x-primary-term");
//! ```

use http::HeaderName;

/// `x-primary-holder`: the id of the node that holds the lock.
pub const X_PRIMARY_HOLDER: HeaderName = HeaderName::from_static("x-primary-holder");

/// `x-primary-role`: `primary`, `secondary` or `starting`.
pub const X_PRIMARY_ROLE: HeaderName = HeaderName::from_static("x-primary-role");

/// `x-primary-term`: the latest known term of the lock (this node's while primary).
pub const X_PRIMARY_TERM: HeaderName = HeaderName::from_static("x-primary-term");

/// `x-primary-forwarded`: set by a node that forwards a request to the primary, to its own node
/// id. A request that carries it is never forwarded again: a gate that is not on the primary
/// answers it `503` with [`X_PRIMARY_REFUSED`].
pub const X_PRIMARY_FORWARDED: HeaderName = HeaderName::from_static("x-primary-forwarded");

/// `x-primary-forward-secret`: the shared secret of the forwarding nodes, when one is set
/// ([`Forward::secret`](crate::http::require::Forward::secret)); the gate answers `403` to a
/// request that carries [`X_PRIMARY_FORWARDED`] without it. Removed before the handler runs.
pub const X_PRIMARY_FORWARD_SECRET: HeaderName =
    HeaderName::from_static("x-primary-forward-secret");

/// `x-primary-refused: 1`: on a `503` of the gate to a request that carries
/// [`X_PRIMARY_FORWARDED`] — the request was refused before any handler ran, so the forwarding
/// node may send it to the next holder. No application response carries it.
pub const X_PRIMARY_REFUSED: HeaderName = HeaderName::from_static("x-primary-refused");
