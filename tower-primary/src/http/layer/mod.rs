//! The layers that put the role into requests, and the one that shows it on responses.
//!
//! | layer | service | what |
//! |---|---|---|
//! | [`PrimaryLayer`] | [`AddRole`] | owns an [`Elector`](crate::Elector): checks its configuration when built, claims the lock when it first builds a service, and puts the elector's [`RoleHandle`](crate::RoleHandle) into every request |
//! | [`AddRoleLayer`] | [`AddRole`] | puts a handle you already have into every request: the handle of an elector of your own, or [`RoleHandle::fixed`](crate::RoleHandle::fixed) in tests |
//! | [`RoleHeadersLayer`] | [`RoleHeaders`] | adds `x-primary-role` and `x-primary-term` to every response |
//!
//! The role in the request is what the rest of the HTTP integration reads: the
//! [primary-only gate](crate::RequirePrimaryLayer), the [extractors](crate::http::extract), the
//! [`/health/role`](crate::http::health) handler and [`RoleHeadersLayer`]. On the request path
//! [`AddRole`] does one extension insert and nothing else: no lock, no I/O, no look at the
//! backend. Every layer here is generic over the request and response bodies, so it fits any
//! tower HTTP stack (axum, hyper-util, tonic).
//!
//! # Examples
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use http::Request;
//! use tower::ServiceExt;
//! use tower_primary::{Elector, MemoryBackend, PrimaryLayer, Role, RoleHeadersLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Checks the configuration now; claims the lock when the router is built.
//! let primary = PrimaryLayer::new(Elector::builder("web").backend(MemoryBackend::new()))?;
//!
//! let app = Router::new()
//!     .route("/", get(|role: Role| async move {
//!         format!("{} (term {:?})", role.as_str(), role.term())
//!     }))
//!     .layer(RoleHeadersLayer::new()) // inside the layer that puts the role in
//!     .layer(primary.clone());
//!
//! let elector = primary.elector();
//! elector.handle().wait_primary().await;
//! let res = app.oneshot(Request::get("/").body(Body::empty())?).await?;
//! assert_eq!(res.headers()["x-primary-role"], "primary");
//! assert_eq!(res.headers()["x-primary-term"], elector.handle().term().unwrap().to_string());
//! # elector.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod add_role;
mod future;
mod primary;
mod role_headers;

pub use self::add_role::{AddRole, AddRoleLayer};
pub use self::future::ResponseFuture;
pub use self::primary::PrimaryLayer;
pub use self::role_headers::{RoleHeaders, RoleHeadersLayer};
