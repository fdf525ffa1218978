//! The HTTP header names tower-primary sets.
//!
//! - [`X_PRIMARY_HOLDER`]: the id of the node that holds the lock, on refusals (503) and
//!   redirects (307) of the [primary-only gate](crate::RequirePrimaryLayer) when the holder is
//!   known;
//! - [`X_PRIMARY_ROLE`] and [`X_PRIMARY_TERM`]: this node's role and the latest known term, on every
//!   response when [`RoleHeadersLayer`](crate::RoleHeadersLayer) is used.
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
