//! [`BackendError`]: the backend misconfiguration an elector is stuck on, as
//! [`RoleHandle::backend_error`](crate::RoleHandle::backend_error) and `/health/role` show it.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Misconfiguration};

/// A permanent backend misconfiguration that keeps this node secondary: wrong credentials, a
/// database that does not exist, a TLS mismatch, an incompatible lease or version, no permission.
///
/// Reported by [`RoleHandle::backend_error`](crate::RoleHandle::backend_error) and in
/// `/health/role` from the first failed call until the step that failed answers again (see
/// [`RoleHandle::backend_error`](crate::RoleHandle::backend_error)). Transient errors
/// (an unreachable server, a timeout) are not reported here: they are logged and counted, and
/// retried.
///
/// # Examples
///
/// ```
/// use tower_primary::{Role, RoleHandle};
///
/// let handle = RoleHandle::fixed(Role::Starting);
/// assert!(handle.backend_error().is_none());
/// ```
///
/// In JSON: `{"kind": "authentication", "message": "…", "since": "2026-12-06T08:42:56.123Z"}`,
/// `kind` as [`Misconfiguration::as_str`] spells it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BackendError {
    /// What kind of misconfiguration.
    pub kind: Misconfiguration,
    /// What is wrong, naming the setting to fix (the backend's message, without its sources).
    pub message: String,
    /// When this node first met this cause (wall clock, RFC 3339, for display).
    #[serde(with = "crate::rfc3339")]
    pub since: SystemTime,
}

impl BackendError {
    /// The report of `err`, met now; `None` unless it is a misconfiguration.
    pub(crate) fn of(err: &Error) -> Option<Self> {
        match err {
            Error::Misconfigured { kind, message, .. } => Some(BackendError {
                kind: *kind,
                message: message.clone(),
                since: SystemTime::now(),
            }),
            _ => None,
        }
    }

    /// Whether `other` has the same cause (kind and message), whenever it was met.
    pub(crate) fn same_cause(&self, other: &BackendError) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json_with_the_kind_by_name() {
        for kind in [
            Misconfiguration::Authentication,
            Misconfiguration::MissingDatabase,
            Misconfiguration::Tls,
            Misconfiguration::IncompatibleLease,
            Misconfiguration::IncompatibleVersion,
            Misconfiguration::Permission,
        ] {
            let err = Error::misconfigured("memory", kind, "fix the setting", None);
            let report = BackendError::of(&err).unwrap();
            let json = serde_json::to_value(&report).unwrap();
            assert_eq!(json["kind"], kind.as_str());
            assert_eq!(json["message"], "fix the setting");
            assert!(json["since"].as_str().unwrap().ends_with('Z'));
            let back: BackendError = serde_json::from_value(json).unwrap();
            assert_eq!(back.kind, kind);
            assert!(back.same_cause(&report));
        }
        assert!(BackendError::of(&Error::backend_msg("memory", "down")).is_none());
        let unknown = serde_json::json!({"kind": "gremlins", "message": "", "since": "2026-12-06T08:42:56.123Z"});
        assert!(serde_json::from_value::<BackendError>(unknown).is_err());
    }
}
