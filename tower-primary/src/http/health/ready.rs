//! `/health/ready`: ready once the required run-once jobs are done.

use serde::{Deserialize, Serialize};

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
/// use tower_primary::http::health::{Readiness, ReadinessReport};
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

#[cfg(feature = "axum")]
mod handlers {
    use std::convert::Infallible;
    use std::task::{Context, Poll};

    use axum_core::response::{IntoResponse, Response};
    use http::header::RETRY_AFTER;
    use http::{HeaderValue, Request, StatusCode};

    use super::{Readiness, ReadinessReport};
    use crate::http::health::json;

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
}
