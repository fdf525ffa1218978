//! Error types.
//!
//! [`ConfigError`] is what building an elector or a backend rejects (found at `spawn()`/`build()`
//! time, with a message naming the setting and the rule it broke). [`Error`] is everything that can
//! go wrong at run time: a backend that is unreachable, a stale term refused by the state API, an
//! elector that has shut down.

use std::path::PathBuf;
use std::time::Duration;

/// A boxed error, as kept in [`Error::Backend`]'s source and returned by singleton tasks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A configuration mistake, found when an elector, layer or backend is built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The lock name is empty, too long, or has characters that are unsafe in file names and keys.
    #[error("invalid lock name {name:?}: {rule}")]
    InvalidLockName {
        /// The name given.
        name: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A duration setting broke its rule (zero grace, a lease below the backend's minimum...).
    #[error("invalid {setting} {value:?}: {rule}")]
    InvalidTiming {
        /// The setting, e.g. `"grace"` or `"lease"`.
        setting: &'static str,
        /// The value given.
        value: Duration,
        /// The rule it broke.
        rule: String,
    },
    /// The lock directory of the file backend cannot be used.
    #[error("lock directory {path}: {problem}")]
    LockDir {
        /// The directory given.
        path: PathBuf,
        /// What is wrong with it: missing, a symlink, not a directory, not writable.
        problem: String,
    },
    /// The host directory of a host group cannot be used, or another process of the group
    /// campaigns with another backend.
    #[error("host directory {path}: {problem}")]
    HostDir {
        /// The directory given.
        path: PathBuf,
        /// What is wrong: missing, a symlink, not a directory, not private to the service user,
        /// on a network file system, or led by a candidate of another backend address.
        problem: String,
    },
    /// A backend string could not be parsed.
    #[error("invalid backend string {url:?}: {problem}")]
    InvalidBackendUrl {
        /// The string given (passwords are not repeated).
        url: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A URL setting is not what it must be: an advertised URL
    /// ([`ElectorBuilder::advertise`](crate::ElectorBuilder::advertise)) or a trusted
    /// [`Origin`](crate::http::require::Origin) that is not an absolute `http`/`https` URL, or that
    /// carries user information, a query or a fragment.
    #[error("invalid {setting} {url:?}: {rule}")]
    InvalidUrl {
        /// The setting, e.g. `"advertise"` or `"origin"`.
        setting: &'static str,
        /// The value given.
        url: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// The backend string names a backend whose Cargo feature is not enabled.
    #[error("backend {scheme:?} needs the `{feature}` feature of tower-primary")]
    FeatureDisabled {
        /// The URL scheme.
        scheme: String,
        /// The Cargo feature to enable.
        feature: &'static str,
    },
    /// No tokio runtime is running on this thread.
    #[error("{what} must be called from inside a tokio runtime")]
    NoRuntime {
        /// The call that needs a runtime.
        what: &'static str,
    },
    /// A state key is empty, too long, or has unsafe characters.
    #[error("invalid state key {key:?}: {rule}")]
    InvalidStateKey {
        /// The key given.
        key: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A schedule (cron expression or time zone) could not be parsed.
    #[error("invalid schedule {expr:?}: {problem}")]
    InvalidSchedule {
        /// The expression or zone given.
        expr: String,
        /// The parser's message.
        problem: String,
    },
    /// `TOWER_PRIMARY_PRIORITY` is not a decimal `u64`.
    #[error(
        "TOWER_PRIMARY_PRIORITY={value:?} is not a priority: it must be a whole number from 0 to 18446744073709551615"
    )]
    InvalidPriority {
        /// The value found.
        value: String,
    },
    /// No backend was configured on the builder.
    #[error("no backend configured: call .backend(...) on the builder")]
    NoBackend,
    /// The shared secret of forwarding nodes
    /// ([`Forward::secret`](crate::http::require::Forward::secret)) cannot be sent as a header
    /// value. The secret itself is not repeated.
    #[error("invalid forwarding secret: {rule}")]
    InvalidSecret {
        /// The rule it broke.
        rule: &'static str,
    },
}

/// The kind of a permanent backend misconfiguration ([`Error::Misconfigured`]). In JSON, the
/// name [`as_str`](Self::as_str) gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Misconfiguration {
    /// The server refused the credentials.
    Authentication,
    /// The database (or keyspace) named does not exist.
    MissingDatabase,
    /// The TLS handshake failed: TLS against a plain server, a plain connection to a TLS-only
    /// server, or a certificate that is not trusted.
    Tls,
    /// The lease given does not fit what the lock's other nodes or the server require.
    IncompatibleLease,
    /// The server, or the records on it, belong to a version this one cannot work with.
    IncompatibleVersion,
    /// The server or the file system refused an operation for lack of permission.
    Permission,
}

impl Misconfiguration {
    /// The snake-case name used in logs, metrics labels and `/health/role`:
    /// `"authentication"`, `"missing_database"`, `"tls"`, `"incompatible_lease"`,
    /// `"incompatible_version"`, `"permission"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Misconfiguration::Authentication => "authentication",
            Misconfiguration::MissingDatabase => "missing_database",
            Misconfiguration::Tls => "tls",
            Misconfiguration::IncompatibleLease => "incompatible_lease",
            Misconfiguration::IncompatibleVersion => "incompatible_version",
            Misconfiguration::Permission => "permission",
        }
    }
}

impl std::fmt::Display for Misconfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Misconfiguration::Authentication => "authentication failed",
            Misconfiguration::MissingDatabase => "database does not exist",
            Misconfiguration::Tls => "TLS handshake failed",
            Misconfiguration::IncompatibleLease => "incompatible lease",
            Misconfiguration::IncompatibleVersion => "incompatible version",
            Misconfiguration::Permission => "permission denied",
        })
    }
}

/// Why a directed handover was refused; see [`Error::HandOver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandOverRefusal {
    /// No live candidate of the lock has that node id.
    #[error("no live candidate has that node id")]
    UnknownNode,
    /// The candidate is not ready (it has not called `ready()`, or only just).
    #[error("the candidate is not ready")]
    NotReady,
    /// The candidate is draining (or must never lead).
    #[error("the candidate is draining")]
    Draining,
    /// The node asked for is this node, the primary.
    #[error("it is the primary already")]
    AlreadyPrimary,
}

/// A run-time error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The backend failed (unreachable, timed out, refused, I/O error...). The node stays or
    /// becomes secondary; the elector retries with backoff.
    #[error("{backend} backend: {message}")]
    Backend {
        /// The backend's name (`"file"`, `"memory"`, `"redis"`...).
        backend: &'static str,
        /// What was being done.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend refused for a reason retrying will not fix: a permanent misconfiguration
    /// (wrong credentials, a database that does not exist, a TLS mismatch, an incompatible lease
    /// or version, no permission). The node stays secondary (fail closed); the elector keeps
    /// retrying, slowly, so that a fixed configuration is picked up, and reports it (logs,
    /// metrics, `/health/role`).
    #[error("{backend} backend: {kind}: {message}")]
    Misconfigured {
        /// The backend's name.
        backend: &'static str,
        /// What kind of misconfiguration.
        kind: Misconfiguration,
        /// What is wrong, naming the setting to fix.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// A record kept by the backend (holder, term or state) could not be read.
    #[error("{backend} backend: corrupt {what}: {problem}")]
    Corrupt {
        /// The backend's name.
        backend: &'static str,
        /// Which record.
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A state write carried a term that no longer holds the lock, or that is older than the
    /// term of the value stored.
    #[error("stale term {term} for lock {lock:?}{}", current.map(|c| format!(" (current term {c})")).unwrap_or_default())]
    StaleTerm {
        /// The lock name.
        lock: String,
        /// The term the write carried.
        term: u64,
        /// The newer term, when known.
        current: Option<u64>,
    },
    /// The leadership was lost (expired, replaced, or the backend said so).
    #[error("leadership of lock {lock:?} lost: {reason}")]
    Lost {
        /// The lock name.
        lock: String,
        /// Why.
        reason: String,
    },
    /// The backend cannot do what was asked (a third-party backend without a registry, say).
    #[error("the backend does not support {what}")]
    Unsupported {
        /// What was asked.
        what: &'static str,
    },
    /// A directed handover ([`Elector::hand_over_to`](crate::Elector::hand_over_to)) was
    /// refused; nothing moved.
    #[error("cannot hand lock {lock:?} over to {node:?}: {refusal}")]
    HandOver {
        /// The lock name.
        lock: String,
        /// The node asked for.
        node: String,
        /// Why not.
        refusal: HandOverRefusal,
    },
    /// This node is not primary.
    #[error("not primary for lock {lock:?}")]
    NotPrimary {
        /// The lock name.
        lock: String,
    },
    /// The elector has shut down.
    #[error("the elector of lock {lock:?} has shut down")]
    Shutdown {
        /// The lock name.
        lock: String,
    },
    /// A state value is larger than the backend keeps; nothing was stored. The file backend keeps
    /// up to 16 MiB (`backend::file::MAX_STATE_VALUE`).
    #[error(
        "state value {key:?} of {size} bytes is larger than the {max} bytes the {backend} backend keeps"
    )]
    ValueTooLarge {
        /// The backend's name.
        backend: &'static str,
        /// The state key.
        key: String,
        /// The size of the value given.
        size: u64,
        /// The largest value the backend keeps.
        max: u64,
    },
}

impl Error {
    /// A backend error with a source.
    pub fn backend(
        backend: &'static str,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Backend {
            backend,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A backend error without a source.
    pub fn backend_msg(backend: &'static str, message: impl Into<String>) -> Self {
        Error::Backend {
            backend,
            message: message.into(),
            source: None,
        }
    }

    /// A permanent misconfiguration of `kind`, found by `backend`.
    pub fn misconfigured(
        backend: &'static str,
        kind: Misconfiguration,
        message: impl Into<String>,
        source: Option<BoxError>,
    ) -> Self {
        Error::Misconfigured {
            backend,
            kind,
            message: message.into(),
            source,
        }
    }

    /// The kind of misconfiguration, when this error is one that retrying will not fix.
    #[must_use]
    pub fn misconfiguration(&self) -> Option<Misconfiguration> {
        match self {
            Error::Misconfigured { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// An error and its sources, `": "`-separated, for logs (`Display` of most errors leaves the
/// sources out). A source whose text is already shown is skipped: a backend's message carries
/// its causes' words (loggers often print only the top error), and they are its sources too.
pub(crate) struct Chain<'a>(pub(crate) &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        let mut source = self.0.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !text.is_empty() && !shown.contains(&text) {
                shown.push_str(": ");
                shown.push_str(&text);
            }
            source = s.source();
        }
        f.write_str(&shown)
    }
}

/// Checks a lock name: 1 to 128 characters of `[A-Za-z0-9._-]`, not starting with a dot.
///
/// Lock names become file names and key parts, so anything else is refused.
pub(crate) fn validate_lock_name(name: &str) -> Result<(), ConfigError> {
    let bad = |rule| {
        Err(ConfigError::InvalidLockName {
            name: name.to_owned(),
            rule,
        })
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > 128 {
        return bad("must be at most 128 bytes");
    }
    if name.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("may only hold ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// The longest any duration setting of the elector may be. Longer ones are mistakes (a unit
/// mix-up) and would overflow timer arithmetic.
pub(crate) const MAX_SETTING: Duration = Duration::from_secs(86_400);

/// Refuses a duration setting over [`MAX_SETTING`].
pub(crate) fn at_most_a_day(setting: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value > MAX_SETTING {
        return Err(ConfigError::InvalidTiming {
            setting,
            value,
            rule: "must be at most 1 day (86400 s)".to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_are_checked() {
        assert!(validate_lock_name("report-scheduler").is_ok());
        assert!(validate_lock_name("a.b_c-1").is_ok());
        for bad in ["", ".hidden", "a/b", "../x", "a b", "ä", &"x".repeat(129)] {
            let err = validate_lock_name(bad).unwrap_err();
            assert!(err.to_string().starts_with("invalid lock name"), "{err}");
        }
    }

    #[test]
    fn chains_show_the_sources() {
        let e = Error::backend("file", "cannot lock", std::io::Error::other("disk on fire"));
        assert_eq!(
            Chain(&e).to_string(),
            "file backend: cannot lock: disk on fire"
        );
    }

    /// A driver that prints its cause and returns it as the source too does not double it.
    #[test]
    fn chains_show_each_cause_once() {
        #[derive(Debug)]
        struct Driver(std::io::Error);
        impl std::fmt::Display for Driver {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "error connecting to server: {}", self.0)
            }
        }
        impl std::error::Error for Driver {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::backend(
            "postgres",
            "connect to postgres://h/db: error connecting to server: refused",
            Driver(refused()),
        );
        assert_eq!(
            Chain(&e).to_string(),
            "postgres backend: connect to postgres://h/db: error connecting to server: refused"
        );
        let e = Error::backend("postgres", "connect to postgres://h/db", Driver(refused()));
        assert_eq!(
            Chain(&e).to_string(),
            "postgres backend: connect to postgres://h/db: error connecting to server: refused"
        );
    }

    #[test]
    fn stale_term_message_names_both_terms() {
        let e = Error::StaleTerm {
            lock: "l".into(),
            term: 3,
            current: Some(4),
        };
        assert_eq!(
            e.to_string(),
            "stale term 3 for lock \"l\" (current term 4)"
        );
    }
}
