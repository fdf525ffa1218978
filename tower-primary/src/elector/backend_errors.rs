//! What the campaign does with a backend error: count it, log it, and publish a
//! misconfiguration.
//!
//! A transient error (unreachable, timed out...) is logged at WARN on every retry, by the step
//! that met it. A [misconfiguration](crate::Error::Misconfigured) is logged at ERROR once per
//! cause (kind and message) and published as [`RoleHandle::backend_error`](crate::RoleHandle::backend_error)
//! until the backend answers again, which is logged at INFO; its repeats go to DEBUG. Either way
//! the node stays secondary and retries.

use std::sync::Arc;

use super::TARGET;
use crate::error::{Chain, Error};
use crate::role::{BackendError, Shared};

/// The misconfiguration the campaign is stuck on, if any.
pub(super) struct BackendErrors {
    shared: Arc<Shared>,
    backend: &'static str,
}

impl BackendErrors {
    pub(super) fn new(shared: Arc<Shared>, backend: &'static str) -> Self {
        BackendErrors { shared, backend }
    }

    /// Counts and classifies a failed call of `op`. Returns whether the caller should log it as
    /// a transient error (a misconfiguration is logged here).
    pub(super) fn failed(&mut self, op: &'static str, err: &Error) -> bool {
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
        false
    }

    /// The backend answered: a misconfiguration reported is over.
    pub(super) fn answered(&mut self) {
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
