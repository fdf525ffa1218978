//! The HTTP side: everything a tower or axum service needs, reading the role only.
//!
//! - [`layer`]: [`PrimaryLayer`](layer::PrimaryLayer) owns an elector and puts its
//!   [`RoleHandle`](crate::RoleHandle) into every request (one extension insert; no lock, no I/O,
//!   no backend call); [`AddRoleLayer`](layer::AddRoleLayer) does the same with a handle you
//!   already have; [`RoleHeadersLayer`](layer::RoleHeadersLayer) shows the role on responses.
//! - [`require`]: [`RequirePrimaryLayer`](require::RequirePrimaryLayer), the gate that keeps a
//!   route to the primary (503 with `Retry-After`, 307 to the primary's advertised URL, or, with
//!   the `forward` feature, the request forwarded to the primary and its answer streamed back).
//! - [`extract`]: axum extractors for the role (`axum` feature).
//! - [`health`]: the `/health/role` and `/health/ready` handlers.
//! - [`header`]: the header names the layers and the gate set.
//!
//! The request path never touches a backend: these modules depend on [`role`](crate::role) and
//! nothing below it.

/// `get_ref`, `get_mut` and `into_inner` for a middleware service whose wrapped service is the
/// field `inner: S`, written once for every service of this module (as tower-http does).
macro_rules! define_inner_service_accessors {
    () => {
        /// The inner service.
        #[must_use]
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// The inner service, consuming this one.
        #[must_use]
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod extract;
pub mod header;
pub mod health;
pub mod layer;
pub mod require;
