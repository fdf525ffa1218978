//! `/health/role`: who this node is, what role it has, and who is primary (DESIGN §6).
//!
//! ```json
//! {"role": "secondary", "term": 12, "lock": "report-scheduler",
//!  "node": {"id": "web-2:4242", "host": "web-2", "pid": 4242},
//!  "holder": {"id": "web-1:77", "host": "web-1", "pid": 77, "worker": null,
//!             "url": "http://10.0.0.7:8080", "term": 12, "since": "2026-11-30T08:00:00.000Z",
//!             "lease_ms": null},
//!  "since": "2026-11-30T08:00:00.000Z"}
//! ```
//!
//! `role` is `primary`, `secondary` or `starting`; `term` is the latest known term (this node's
//! while primary); `holder` is the holder record, this node's own while primary, `null` when
//! unknown; `since` is when the current primary period began (wall clock, for display).
//!
//! [`role`] answers `200` on every role: **leadership is not readiness**, and a readiness probe
//! that waits for the election takes secondaries out of the load balancer (or deadlocks a
//! rollout). For setups that route primary-only traffic by health check, [`role_primary_only`]
//! answers `503` (with the same body) on every node but the primary. Both read the role that
//! [`PrimaryLayer`](crate::PrimaryLayer) put into the request (feature `axum`); on other stacks,
//! serve [`RoleReport::new`] as JSON.
//!
//! # Examples
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_primary::health::{self, RoleReport};
//! use tower_primary::{Elector, MemoryBackend, PrimaryLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let elector = Elector::builder("report-scheduler").backend(MemoryBackend::new()).spawn()?;
//! let term = elector.handle().wait_primary().await.term();
//!
//! let app = Router::new()
//!     .route("/health/role", get(health::role))
//!     .route("/health/primary", get(health::role_primary_only))
//!     .layer(PrimaryLayer::new(elector.handle()));
//!
//! let res = app.clone().oneshot(Request::get("/health/role").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.headers()["content-type"], "application/json");
//! let body = axum::body::to_bytes(res.into_body(), 4096).await?;
//! let report: RoleReport = serde_json::from_slice(&body)?;
//! assert_eq!(report.role, "primary");
//! assert_eq!(report.term, Some(term));
//! assert_eq!(report.lock, "report-scheduler");
//! assert_eq!(report.holder.unwrap().id, report.node.id); // the primary holds the lock itself
//!
//! // After a handover this node is no longer primary: still 200 on /health/role.
//! elector.shutdown().await;
//! let res = app.clone().oneshot(Request::get("/health/role").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! let res = app.oneshot(Request::get("/health/primary").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! # Ok(())
//! # }
//! ```

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::role::{Holder, Role, RoleHandle};

/// The body of `/health/role` (DESIGN §6). Serialize it on any stack; deserialize it in clients
/// and tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RoleReport {
    /// `"primary"`, `"secondary"` or `"starting"`.
    pub role: String,
    /// The latest known term: this node's while primary, else the holder's.
    pub term: Option<u64>,
    /// The lock name.
    pub lock: String,
    /// This node.
    pub node: NodeReport,
    /// The holder record: this node's own while primary; `None` when unknown.
    pub holder: Option<Holder>,
    /// When the current primary period began (wall clock, RFC 3339, for display).
    #[serde(with = "opt_rfc3339")]
    pub since: Option<SystemTime>,
}

/// This node in a [`RoleReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeReport {
    /// The node id.
    pub id: String,
    /// The host name.
    pub host: String,
    /// The process id.
    pub pid: u32,
}

impl RoleReport {
    /// The report of `handle` now.
    ///
    /// ```
    /// use tower_primary::{Role, RoleHandle, health::RoleReport};
    ///
    /// let report = RoleReport::new(&RoleHandle::fixed(Role::Starting));
    /// let json = serde_json::to_value(&report).unwrap();
    /// assert_eq!(json["role"], "starting");
    /// assert!(json["term"].is_null() && json["holder"].is_null() && json["since"].is_null());
    /// assert_eq!(json["node"]["pid"], std::process::id());
    /// ```
    #[must_use]
    pub fn new(handle: &RoleHandle) -> Self {
        let role = handle.role();
        let holder = handle.holder();
        let since = match &role {
            Role::Primary { since, .. } => Some(*since),
            Role::Secondary { holder: Some(h) } => Some(h.since),
            Role::Secondary { holder: None } | Role::Starting => None,
        };
        let node = handle.node();
        RoleReport {
            role: role.as_str().to_owned(),
            term: role.term(),
            lock: handle.lock().to_owned(),
            node: NodeReport {
                id: node.id().to_owned(),
                host: node.host().to_owned(),
                pid: node.pid(),
            },
            holder,
            since,
        }
    }

    /// Whether the report says primary.
    #[must_use]
    pub fn is_primary(&self) -> bool {
        self.role == "primary"
    }
}

mod opt_rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&humantime::format_rfc3339_millis(*t)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        s.map(|s| humantime::parse_rfc3339_weak(&s).map_err(D::Error::custom))
            .transpose()
    }
}

#[cfg(feature = "axum")]
mod handlers {
    use axum_core::response::{IntoResponse, Response};
    use http::header::{CONTENT_TYPE, RETRY_AFTER};
    use http::{HeaderValue, StatusCode};

    use super::RoleReport;
    use crate::role::RoleHandle;

    impl RoleReport {
        fn respond(&self, status: StatusCode) -> Response {
            match serde_json::to_vec(self) {
                Ok(body) => {
                    let mut res = (status, body).into_response();
                    res.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    res
                }
                Err(err) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot serialize the role report: {err}"),
                )
                    .into_response(),
            }
        }
    }

    /// `200` with the report as JSON.
    impl IntoResponse for RoleReport {
        fn into_response(self) -> Response {
            self.respond(StatusCode::OK)
        }
    }

    /// The `/health/role` handler: `200` with the [`RoleReport`] on every role (feature `axum`).
    ///
    /// `get(tower_primary::health::role)`; reads the handle that
    /// [`PrimaryLayer`](crate::PrimaryLayer) put into the request (`500` without it).
    pub async fn role(handle: RoleHandle) -> Response {
        RoleReport::new(&handle).into_response()
    }

    /// Like [`role`], but `503` (with `Retry-After: 1` and the same body) on every node but the
    /// primary, for setups that route primary-only traffic by health check (feature `axum`).
    pub async fn role_primary_only(handle: RoleHandle) -> Response {
        let report = RoleReport::new(&handle);
        if report.is_primary() {
            return report.respond(StatusCode::OK);
        }
        let mut res = report.respond(StatusCode::SERVICE_UNAVAILABLE);
        res.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        res
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use handlers::{role, role_primary_only};
