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
//! The report shows host names, process ids and the advertised URLs of this node and the holder:
//! serve it to your orchestrator, load balancer and operators (an internal listener or network),
//! not on public routes. The same goes for the gate's [refusal bodies](crate::require::Refusal).
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

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::role::{Holder, Role, RoleHandle};
use crate::schedule::RunOnce;

/// The `/health/ready` check: ready once every required [`RunOnce`] job is done.
///
/// Cheap to clone. Serve it with `route_service("/health/ready", readiness)` (it is a tower
/// [`Service`](tower_service::Service) with feature `axum`), or build the answer yourself from
/// [`report`](Self::report). `503` (with `Retry-After: 1`) while a job is not done, `200` after;
/// both with the [`ReadinessReport`] as JSON:
///
/// ```json
/// {"ready": false, "jobs": [{"name": "migrate", "version": "v3", "done": false}]}
/// ```
///
/// Readiness is not leadership (that is `/health/role`): a job is done when *some* node
/// completed it, so every node turns ready together. A job runs only on a primary that
/// registered it: in a rolling deploy whose new nodes wait for readiness while old nodes (which
/// do not know the new job) keep the lock, the job waits until a new node is primary — let old
/// nodes [step down](crate::Elector::step_down) or hand over on shutdown as usual.
///
/// # Examples
///
/// ```
/// use axum::{Router, body::Body};
/// use http::{Request, StatusCode};
/// use tower::ServiceExt;
/// use tower_primary::health::{Readiness, ReadinessReport};
/// use tower_primary::{Elector, MemoryBackend};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let elector = Elector::builder("app").backend(MemoryBackend::new()).spawn()?;
/// let (go, wait) = tokio::sync::oneshot::channel::<()>();
/// let wait = std::sync::Mutex::new(Some(wait));
/// let migrate = elector.run_once("migrate", "v3", move |_ctx| {
///     let wait = wait.lock().unwrap().take();
///     async move {
///         if let Some(wait) = wait {
///             let _ = wait.await; // the migration runs until `go` is sent
///         }
///         Ok::<_, std::io::Error>(())
///     }
/// })?;
/// let readiness = Readiness::new().require(migrate);
/// let app = Router::new().route_service("/health/ready", readiness.clone());
///
/// let res = app.clone().oneshot(Request::get("/health/ready").body(Body::empty())?).await?;
/// assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
/// assert_eq!(res.headers()["retry-after"], "1");
/// let body = axum::body::to_bytes(res.into_body(), 4096).await?;
/// let report: ReadinessReport = serde_json::from_slice(&body)?;
/// assert!(!report.ready);
/// assert_eq!((report.jobs[0].name.as_str(), report.jobs[0].done), ("migrate", false));
///
/// go.send(()).unwrap();
/// readiness.wait().await;
/// let res = app.oneshot(Request::get("/health/ready").body(Body::empty())?).await?;
/// assert_eq!(res.status(), StatusCode::OK);
/// # elector.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct Readiness {
    jobs: Vec<RunOnce>,
}

impl Readiness {
    /// Ready at once: no job required yet.
    pub fn new() -> Self {
        Readiness::default()
    }

    /// Also requires `job` to be done.
    pub fn require(mut self, job: RunOnce) -> Self {
        self.jobs.push(job);
        self
    }

    /// Whether every required job is done.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.jobs.iter().all(RunOnce::is_done)
    }

    /// Waits until every required job is done.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe.
    pub async fn wait(&self) {
        for job in &self.jobs {
            job.wait().await;
        }
    }

    /// The report now.
    #[must_use]
    pub fn report(&self) -> ReadinessReport {
        let jobs: Vec<JobReport> = self
            .jobs
            .iter()
            .map(|j| JobReport {
                name: j.name().to_owned(),
                version: j.version().to_owned(),
                done: j.is_done(),
            })
            .collect();
        ReadinessReport {
            ready: jobs.iter().all(|j| j.done),
            jobs,
        }
    }
}

/// The body of `/health/ready`: see [`Readiness`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReadinessReport {
    /// Whether every required job is done.
    pub ready: bool,
    /// The required jobs, in the order they were required.
    pub jobs: Vec<JobReport>,
}

/// One run-once job in a [`ReadinessReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobReport {
    /// The job's name.
    pub name: String,
    /// The version required.
    pub version: String,
    /// Whether that version has been completed (by any node).
    pub done: bool,
}

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
    use std::convert::Infallible;
    use std::task::{Context, Poll};

    use axum_core::response::{IntoResponse, Response};
    use http::header::{CONTENT_TYPE, RETRY_AFTER};
    use http::{HeaderValue, Request, StatusCode};
    use serde::Serialize;

    use super::{Readiness, ReadinessReport, RoleReport};
    use crate::role::RoleHandle;

    /// `value` as a JSON response with `status`.
    pub(super) fn json(status: StatusCode, value: &impl Serialize) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => {
                let mut res = (status, body).into_response();
                res.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                res
            }
            Err(err) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot serialize the health report: {err}"),
            )
                .into_response(),
        }
    }

    impl RoleReport {
        fn respond(&self, status: StatusCode) -> Response {
            json(status, self)
        }
    }

    /// `200` when ready, else `503` with `Retry-After: 1`; the report as JSON.
    impl IntoResponse for ReadinessReport {
        fn into_response(self) -> Response {
            if self.ready {
                return json(StatusCode::OK, &self);
            }
            let mut res = json(StatusCode::SERVICE_UNAVAILABLE, &self);
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            res
        }
    }

    /// Answers every request with the [`ReadinessReport`] (feature `axum`): for
    /// `Router::route_service("/health/ready", readiness)`. Reads the jobs' watches; no I/O.
    impl<B> tower_service::Service<Request<B>> for Readiness {
        type Response = Response;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response, Infallible>>;

        #[inline]
        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<B>) -> Self::Future {
            std::future::ready(Ok(self.report().into_response()))
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

// `/health/live`: the stuck-primary watchdog.

pub use crate::watchdog::Liveness;

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
            super::handlers::json(status, &self)
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
    /// `get(tower_primary::health::live)`; reads the handle that
    /// [`PrimaryLayer`](crate::PrimaryLayer) put into the request (`500` without it). With several
    /// electors, check each [`RoleHandle::liveness`] in a handler of your own.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::{Router, body::Body, routing::get};
    /// use http::{Request, StatusCode};
    /// use tower::ServiceExt;
    /// use tower_primary::health::{self, Liveness};
    /// use tower_primary::{Elector, MemoryBackend, PrimaryLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let elector = Elector::builder("report-scheduler").backend(MemoryBackend::new()).spawn()?;
    /// let app = Router::new()
    ///     .route("/health/live", get(health::live))
    ///     .layer(PrimaryLayer::new(elector.handle()));
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
