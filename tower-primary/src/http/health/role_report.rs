//! `/health/role`: the role report and its handlers.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::role::{BackendError, Candidate, Holder, Role, RoleHandle};

/// The body of `/health/role`. Serialize it on any stack; deserialize it in clients and tests.
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
    #[serde(with = "crate::rfc3339::option")]
    pub since: Option<SystemTime>,
    /// The backend misconfiguration that keeps this node secondary, if any
    /// ([`RoleHandle::backend_error`]); `null` otherwise (and in reports of older versions).
    #[serde(default)]
    pub backend_error: Option<BackendError>,
    /// This node's own entry in the candidate registry: priority, ready, draining, yielded
    /// ([`RoleHandle::entry`]). `null` in reports of older versions.
    #[serde(default)]
    pub entry: Option<Candidate>,
    /// The lock's candidate registry as this node last read it, highest priority first
    /// ([`RoleHandle::candidates`]); empty on a backend without a registry and in reports of
    /// older versions.
    #[serde(default)]
    pub candidates: Vec<Candidate>,
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
    /// use tower_primary::{Role, RoleHandle, http::health::RoleReport};
    ///
    /// let report = RoleReport::new(&RoleHandle::fixed(Role::Starting));
    /// let json = serde_json::to_value(&report).unwrap();
    /// assert_eq!(json["role"], "starting");
    /// assert!(json["term"].is_null() && json["holder"].is_null() && json["since"].is_null());
    /// assert!(json["backend_error"].is_null());
    /// assert_eq!(json["entry"]["priority"], 0);
    /// assert_eq!(json["candidates"], serde_json::json!([]));
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
            backend_error: handle.backend_error(),
            entry: Some(handle.entry()),
            candidates: handle.candidates(),
        }
    }

    /// Whether the report says primary.
    #[must_use]
    pub fn is_primary(&self) -> bool {
        self.role == "primary"
    }
}

#[cfg(feature = "axum")]
mod handlers {
    use axum_core::response::{IntoResponse, Response};
    use http::header::RETRY_AFTER;
    use http::{HeaderValue, StatusCode};

    use super::RoleReport;
    use crate::http::health::json;
    use crate::role::RoleHandle;

    impl RoleReport {
        fn respond(&self, status: StatusCode) -> Response {
            json(status, self)
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
    /// `get(tower_primary::http::health::role)`; reads the handle that
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
