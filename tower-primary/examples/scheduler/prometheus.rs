//! `GET /metrics`: every worker's metrics in the Prometheus text format.
//!
//! The library records its role, transition, latency, task and schedule metrics on the
//! [`metrics`] facade (its `metrics` feature); this module installs the Prometheus recorder of
//! `metrics-exporter-prometheus` in the worker process and renders it in an axum handler, on the
//! worker's own listeners (no second HTTP server). It also names the example's own counters.

use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::routing::{MethodRouter, get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_primary::BoxError;

/// `scheduler_emails_accepted_total`: emails this worker queued (`POST /emails` → 202).
pub(crate) const EMAILS_ACCEPTED: &str = "scheduler_emails_accepted_total";
/// `scheduler_emails_sent_total`: emails this worker delivered (as primary).
pub(crate) const EMAILS_SENT: &str = "scheduler_emails_sent_total";
/// `scheduler_reports_written_total`: reports this worker wrote (as primary).
pub(crate) const REPORTS_WRITTEN: &str = "scheduler_reports_written_total";

/// How often histograms are drained into their summaries.
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder for this process. Call it before the elector is built: the
/// library describes its metrics then.
pub(crate) fn install() -> Result<PrometheusHandle, BoxError> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    metrics::describe_counter!(EMAILS_ACCEPTED, "emails queued by this worker");
    metrics::describe_counter!(EMAILS_SENT, "emails delivered by this worker");
    metrics::describe_counter!(REPORTS_WRITTEN, "reports written by this worker");
    // The counters show from the start, at 0.
    for name in [EMAILS_ACCEPTED, EMAILS_SENT, REPORTS_WRITTEN] {
        metrics::counter!(name).absolute(0);
    }
    Ok(handle)
}

/// Runs the recorder's upkeep (draining histograms) until the runtime stops.
pub(crate) fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// The `GET /metrics` route.
pub(crate) fn route<S: Clone + Send + Sync + 'static>(handle: PrometheusHandle) -> MethodRouter<S> {
    get(move || {
        let text = handle.render();
        async move {
            (
                [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                text,
            )
        }
    })
}

/// Counts one more of `name`.
pub(crate) fn count(name: &'static str) {
    metrics::counter!(name).increment(1);
}
