//! Health endpoints: `/health/role` (who this node is, what role it has, and who is primary)
//! and `/health/ready` ([`Readiness`]: are the run-once jobs this node needs done).
//!
//! # `/health/role`
//!
//! ```json
//! {"role": "secondary", "term": 12, "lock": "report-scheduler",
//!  "node": {"id": "web-2:4242", "host": "web-2", "pid": 4242},
//!  "holder": {"id": "web-1:77", "host": "web-1", "pid": 77, "worker": null,
//!             "url": "http://10.0.0.7:8080", "term": 12, "since": "2026-11-30T08:00:00.000Z",
//!             "lease_ms": null},
//!  "since": "2026-11-30T08:00:00.000Z",
//!  "backend_error": null,
//!  "entry": {"node": "web-2:4242", "priority": 41, "ready": true, "draining": false,
//!            "yielded": false},
//!  "candidates": [
//!    {"node": "web-2:4242", "priority": 41, "ready": true, "draining": false, "yielded": false},
//!    {"node": "web-1:77", "priority": 40, "ready": true, "draining": false, "yielded": false}]}
//! ```
//!
//! `role` is `primary`, `secondary` or `starting`; `term` is the latest known term (this node's
//! while primary); `holder` is the holder record, this node's own while primary, `null` when
//! unknown; `since` is when the current primary period began (wall clock, for display);
//! `backend_error` is the backend misconfiguration that keeps this node secondary
//! ([`BackendError`](crate::BackendError): `{"kind": "authentication", "message": "…", "since":
//! "…"}`), `null` when there is none; `entry` is this node's own entry in the lock's
//! candidate registry and `candidates` the registry as this node last read it, highest priority
//! first (see [`Candidate`](crate::Candidate): with a higher-priority candidate ready, the
//! primary hands the lock over to it).
//!
//! [`role`] answers `200` on every role: **leadership is not readiness**, and a readiness probe
//! that waits for the election takes secondaries out of the load balancer (or deadlocks a
//! rollout). For setups that route primary-only traffic by health check, [`role_primary_only`]
//! answers `503` (with the same body) on every node but the primary. Both read the role that
//! [`PrimaryLayer`](crate::PrimaryLayer) put into the request (feature `axum`); on other stacks,
//! serve [`RoleReport::new`] as JSON.
//!
//! The report shows host names, process ids and the advertised URLs of this node and the holder:
//! serve it to your orchestrator, load balancer and operators (an internal listener or network),
//! not on public routes. The same goes for the gate's [refusal bodies](crate::http::require::Refusal).
//!
//! # Examples
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_primary::http::health::{self, RoleReport};
//! use tower_primary::{AddRoleLayer, Elector, MemoryBackend};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let elector = Elector::builder("report-scheduler").backend(MemoryBackend::new()).spawn()?;
//! let term = elector.handle().wait_primary().await.term();
//!
//! let app = Router::new()
//!     .route("/health/role", get(health::role))
//!     .route("/health/primary", get(health::role_primary_only))
//!     .layer(AddRoleLayer::new(elector.handle()));
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
//!
//! # `/health/ready`
//!
//! [`Readiness`] answers `503` until the [run-once jobs](crate::Elector::run_once) it requires
//! (migrations, say) have been completed — by whichever node is primary — and `200` after, with
//! a JSON [`ReadinessReport`]. It does not wait for this node to win anything: secondaries are
//! ready as soon as the primary has run the jobs. See [`Readiness`] for an example.
//!
//! # `/health/live`
//!
//! [`live`] answers `503` when the elector's campaign loop is stuck (its heartbeat is older than
//! the [liveness bound](crate::ElectorBuilder::liveness_bound), or a step-down or task abort did
//! not finish within the grace), so that an orchestrator restarts the process; `200` otherwise,
//! whatever the role. The JSON body is a [`Liveness`].

#[cfg(feature = "schedule")]
mod ready;
mod role_report;

#[cfg(feature = "schedule")]
#[cfg_attr(docsrs, doc(cfg(feature = "schedule")))]
pub use ready::{JobReport, Readiness, ReadinessReport};
pub use role_report::{NodeReport, RoleReport};
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use role_report::{role, role_primary_only};

pub use crate::watchdog::Liveness;

/// `value` as a JSON response with `status`.
#[cfg(feature = "axum")]
fn json(status: http::StatusCode, value: &impl serde::Serialize) -> axum_core::response::Response {
    use axum_core::response::IntoResponse;
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut res = (status, body).into_response();
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            res
        }
        Err(err) => (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot serialize the health report: {err}"),
        )
            .into_response(),
    }
}

// `/health/live`: the stuck-primary watchdog.

#[cfg(feature = "axum")]
mod live_handler {
    use axum_core::response::{IntoResponse, Response};
    use http::StatusCode;

    use super::Liveness;
    use crate::role::RoleHandle;

    /// `200` when live, `503` when not; the report as JSON either way.
    impl IntoResponse for Liveness {
        fn into_response(self) -> Response {
            let status = if self.live {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            super::json(status, &self)
        }
    }

    /// The `/health/live` handler (feature `axum`): `200` while the elector's campaign loop makes
    /// progress, `503` when it is stuck, with the [`Liveness`] report as JSON.
    ///
    /// For a liveness probe: a stuck process holds its lock without acting on it (on backends
    /// without a lease, until it exits), so the orchestrator should restart it. What counts as
    /// stuck: [`ElectorBuilder::liveness_bound`](crate::ElectorBuilder::liveness_bound). The
    /// role plays no part (a secondary is as live as the primary), nor does readiness.
    ///
    /// `get(tower_primary::http::health::live)`; reads the handle that
    /// [`PrimaryLayer`](crate::PrimaryLayer) put into the request (`500` without it). With several
    /// electors, check each [`RoleHandle::liveness`] in a handler of your own.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::{Router, body::Body, routing::get};
    /// use http::{Request, StatusCode};
    /// use tower::ServiceExt;
    /// use tower_primary::http::health::{self, Liveness};
    /// use tower_primary::{AddRoleLayer, Elector, MemoryBackend};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let elector = Elector::builder("report-scheduler").backend(MemoryBackend::new()).spawn()?;
    /// let app = Router::new()
    ///     .route("/health/live", get(health::live))
    ///     .layer(AddRoleLayer::new(elector.handle()));
    ///
    /// let res = app.oneshot(Request::get("/health/live").body(Body::empty())?).await?;
    /// assert_eq!(res.status(), StatusCode::OK);
    /// let body = axum::body::to_bytes(res.into_body(), 4096).await?;
    /// let live: Liveness = serde_json::from_slice(&body)?;
    /// assert!(live.is_live());
    /// assert_eq!(live.bound_ms, Some(10_000)); // the default bound
    /// # elector.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn live(handle: RoleHandle) -> Response {
        handle.liveness().into_response()
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use live_handler::live;
