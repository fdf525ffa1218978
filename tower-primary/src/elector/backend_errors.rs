//! What the campaign does with a backend error: count it, log it, and publish a
//! misconfiguration.
//!
//! A transient error (unreachable, timed out...) is logged at WARN on every retry, by the step
//! that met it. A [misconfiguration](crate::Error::Misconfigured) is logged at ERROR once per
//! cause (kind and message) and published as [`RoleHandle::backend_error`](crate::RoleHandle::backend_error)
//! until the step that met it answers again, which is logged at INFO; its repeats go to DEBUG.
//! Either way the node stays secondary and retries.
//!
//! Which step answers matters: a lease the others' disagree with, or a permission only taking
//! the lock needs, fails every acquisition while the holder watch answers. Such a
//! misconfiguration ends when an acquisition succeeds, or when a retried one has been under way
//! for [`ACQUISITION_SETTLED`] without an error (it waits for the lock like any secondary); an
//! answer of the holder watch does not end it (it did, and the ERROR came back at every holder
//! change).

use std::sync::Arc;
use std::time::Duration;

use super::TARGET;
use crate::error::{Chain, Error};
use crate::role::{BackendError, Shared};

/// How long a retried acquisition must be under way without an error to end a
/// misconfiguration an acquisition met: a refusal comes back within a round trip.
pub(super) const ACQUISITION_SETTLED: Duration = Duration::from_secs(2);

/// The steps of the campaign that call the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Taking the lock.
    Acquire,
    /// Following the holder record (subscribe, watch, read).
    Follow,
}

/// The misconfiguration the campaign is stuck on, if any.
pub(super) struct BackendErrors {
    shared: Arc<Shared>,
    backend: &'static str,
    /// The step that met the misconfiguration published.
    met_by: Option<Step>,
}

impl BackendErrors {
    pub(super) fn new(shared: Arc<Shared>, backend: &'static str) -> Self {
        BackendErrors {
            shared,
            backend,
            met_by: None,
        }
    }

    /// Whether the misconfiguration published was met by an acquisition.
    pub(super) fn met_by_acquisition(&self) -> bool {
        self.met_by == Some(Step::Acquire) && self.shared.backend_error().is_some()
    }

    /// Counts and classifies a failed call of `op`. Returns whether the caller should log it as
    /// a transient error (a misconfiguration is logged here).
    pub(super) fn failed(&mut self, step: Step, op: &'static str, err: &Error) -> bool {
        crate::metrics::backend_error_kind(&self.shared.lock, op, err.misconfiguration());
        let Some(report) = BackendError::of(err) else {
            return true;
        };
        if self
            .shared
            .backend_error()
            .is_some_and(|c| c.same_cause(&report))
        {
            tracing::debug!(
                target: TARGET,
                lock = %self.shared.lock,
                backend = self.backend,
                op,
                error = %Chain(err),
                "backend still misconfigured; staying secondary"
            );
            return false;
        }
        tracing::error!(
            target: TARGET,
            lock = %self.shared.lock,
            node = %self.shared.node,
            backend = self.backend,
            op,
            kind = report.kind.as_str(),
            error = %Chain(err),
            "backend misconfigured; staying secondary and retrying until it is fixed"
        );
        self.shared.set_backend_error(Some(report));
        self.met_by = Some(step);
        false
    }

    /// `step` called the backend and it answered: a misconfiguration that step met is over (an
    /// acquisition's answer ends any: the lock was taken).
    pub(super) fn answered(&mut self, step: Step) {
        if step == Step::Follow && self.met_by == Some(Step::Acquire) {
            return;
        }
        self.met_by = None;
        if let Some(was) = self.shared.set_backend_error(None) {
            tracing::info!(
                target: TARGET,
                lock = %self.shared.lock,
                node = %self.shared.node,
                backend = self.backend,
                kind = was.kind.as_str(),
                "backend answers again; the misconfiguration is resolved"
            );
        }
    }
}
