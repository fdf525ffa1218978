//! The PostgreSQL backend: session advisory locks, with liveness checks, blocking waiters and
//! terms from a sequence.
//!
//! For services that already have PostgreSQL and run on several hosts. Enable the `postgres`
//! feature; pick it with [`PostgresBackend::new`] or a `postgres://…` / `postgresql://…` string.
//!
//! # How it works
//!
//! Each elector (one lock name in one process) keeps **two unpooled connections**:
//!
//! - the **lock session**, opened for each acquisition and closed when the term ends. It blocks in
//!   `SELECT pg_advisory_lock(key)`: the server queues the waiters and grants the lock the moment
//!   the holder unlocks or its session ends, so a successor takes over within milliseconds of a
//!   holder's crash, without polling. A node that gives up waiting (shutdown, a dropped
//!   `acquire`) cancels the statement with a cancel request; a grant that raced the cancel is
//!   given back;
//! - the **second connection**, for `LISTEN`, the holder record and the state API (a session
//!   blocked in a lock wait receives no notification). It reconnects by itself and wakes every
//!   watcher when it does, since notifications may have been missed.
//!
//! Both appear in `pg_stat_activity` as `<application_name> lock <lock name>` and
//! `<application_name> aux <lock name>` (`application_name` defaults to `tower-primary`).
//!
//! **The key.** The bigint advisory key is the FNV-1a 64-bit hash of
//! `"tower-primary\0" + namespace + "\0" + lock name` ([`advisory_key`]); the namespace (default
//! `default`) separates deployments that share a database. The holder row stores the namespace
//! and lock name next to the key: a node that acquires a key whose row names another lock
//! refuses it and reports the collision, so two lock names are never silently shared.
//!
//! **After acquiring**, before becoming primary, the node checks that it really holds the lock on
//! a dedicated server session: the session held no lock on the key before it asked, the lock was
//! taken by the server process the session started on (and not the one of the second connection),
//! and `pg_locks` shows that process holding the key. A connection pooler in transaction or
//! statement mode (PgBouncer `pool_mode=transaction`) fails these checks, and the node refuses
//! the lock with an error that says so: behind such a pooler two clients can both "win" the same
//! advisory lock. Connect directly, or through `pool_mode=session`.
//!
//! **The previous holder steps down first.** A holder keeps a second advisory lock, the
//! *step-down lock* (the two-int form of the same key bits, `objsubid = 2` in `pg_locks`), in
//! shared mode on its second connection for as long as its term lasts — until the elector has
//! stepped down, wound the term's tasks down and released. A node that was granted the key waits
//! until no one holds the step-down lock before it draws a term. The server frees the key the
//! moment a holder's lock session ends, also when an administrator ends it
//! (`pg_terminate_backend`) while the holder's process lives on and learns of it a moment later:
//! the successor waits for that holder to step down, so their periods never overlap. A holder
//! whose process died loses both connections at once, and the wait costs nothing.
//!
//! **Death certificates and the fencing bound.** The step-down lock lives on a connection of its
//! own, which the server can close too: an administrator may end both of a holder's sessions, or
//! the server may give up on a holder that hears nothing from it (an asymmetric partition). So a
//! node granted the key then reads its predecessor's holder record, and starts at once only with
//! proof that the predecessor can no longer act:
//!
//! - the record is marked `released`: the predecessor wrote that itself, for its own term only,
//!   after it had stepped down (a clean release, or after a loss once its elector let go);
//! - the record's [`ProcessIdentity`](crate::process::ProcessIdentity) is on this host (same boot
//!   id and PID namespace) and that process is gone (waited for up to the bound: a killed process
//!   closes its sockets a moment before it has exited).
//!
//! Otherwise it waits the predecessor's **fencing bound** ([`PostgresBackend::fencing_bound`],
//! recorded as `lease_ms`; at most [`PostgresBackend::max_fencing_bound`], which is also what a
//! record without one gets), counted from its grant, in a server-side `pg_sleep` on its lock
//! session. Every good liveness check renews the holder's term for its bound, less a tenth: the
//! last one came before the server freed the key, so the holder has stopped acting before its
//! successor starts.
//!
//! **Stopped nodes.** A node stopped while it holds the key (`SIGSTOP`, a frozen VM) keeps its
//! sessions: its kernel answers keepalives. While they wait, nodes look every 2 s for a lock
//! session of the key that the server shows idle for longer than the maximum fencing bound plus
//! one liveness interval — a healthy holder's checks and a successor's sleep keep theirs active —
//! and end it with `pg_terminate_backend`, together with that holder's second connection. That
//! needs the holder's role, or `pg_signal_backend` and `pg_read_all_stats`; without them a
//! warning says so, and a stopped holder keeps the lock until it resumes (it then reads as not
//! primary at once and steps down).
//!
//! **Terms** come from a sequence (`nextval` at each acquisition), which never goes backwards,
//! also across server restarts. The term and the [`Holder`](crate::Holder) record are written to
//! the holder row, and a `NOTIFY` tells the secondaries. The holder row's commit does not wait for
//! the disk (`synchronous_commit = off` for that statement; the term's own commit does): a server
//! crash ends every session, and with it every term, anyway.
//!
//! **Liveness.** The holder checks its lock session every 150 ms ([`PostgresBackend::liveness`];
//! about 7 queries a second, on the holder only): a query, answered within 200 ms, that its
//! server process still holds the key in `pg_locks`. On a
//! failure, a timeout or the end of the connection it reports the loss at once and the elector
//! steps down. (An answer that arrived while the process was not running — stopped, frozen — is
//! still read: a timed-out check waits 100 ms more before it judges.) Both connections set the
//! server's TCP keepalives (`tcp_keepalives_idle`, `_interval`, `_count`, `tcp_user_timeout`;
//! default 2 s, 1 s, 2), so that a server that can no longer reach a partitioned holder ends its
//! sessions and frees its locks a few seconds later —
//! after the holder stepped down: `2 × interval + timeout + 100 ms` must be shorter than the
//! server's detection time, which [`Backend::lock`] checks. Server-wide `statement_timeout`,
//! `lock_timeout` and `idle_session_timeout` are switched off on both.
//!
//! **Handover**: the holder record is marked `released`, the step-down lock is given back, then an
//! explicit `pg_advisory_unlock` (closing
//! the connection frees the lock only when the server gets to it), then `NOTIFY`, then the session
//! is closed.
//!
//! **Tables** (created if missing, in the schema `tower_primary` unless configured):
//! `holders (key, namespace, lock_name, term, backend_pid, holder jsonb, acquired_at, aux_pid,
//! aux_term)`,
//! `state (namespace, lock_name, state_key, value bytea, term, updated_at)`,
//! `candidates (namespace, lock_name, node, entry jsonb, registration, backend_pid,
//! backend_start, updated_at)`, `reservations (key, namespace, lock_name, node, until, term)`
//! and the sequence `terms`. [`Lock::holder`] reports a holder only while `pg_locks` shows its session holding the
//! key. A state write is accepted only while the writing term's session holds the key (the holder
//! row is locked `FOR SHARE`, so a successor's acquisition waits for the write) and never over a
//! newer term's value.
//!
//! **Candidate registry** ([`Lock::register`]): a node's entry is a `candidates` row written on
//! its second connection and naming that session (`pg_backend_pid()` and its `backend_start`);
//! readers list only rows whose session `pg_stat_activity` still shows, so a dead node's entry is
//! gone as soon as the server has ended its session (at once when its socket closes), and delete
//! such rows once they are 10 s old. After a reconnection the node writes its entries again.
//! Writes and withdrawals `NOTIFY` the lock's channel; a death is seen at the next read. A role
//! that may not see other roles' `backend_start` (without `pg_read_all_stats`) compares the
//! process id only: a dead entry whose process id the server has reused for another session
//! is listed until that session ends.
//!
//! **Reservations** ([`Leadership::reserve`](crate::backend::Leadership::reserve)): a
//! `reservations` row (one per lock) with `until = now() + window` on the server's clock,
//! written in a statement that checks, like a state write, that the term's session still holds
//! the key. A node granted the key reads it first, on its lock session: while a live reservation
//! names another node it unlocks the key at once and waits off the queue, for the rest of the
//! window as the server computed it or a `NOTIFY` that the reservation changed, then queues
//! again. The reserved node's grant deletes the row and goes on as any acquisition (the
//! predecessor's step-down, a term from the sequence). The holder releases as usual, so the
//! reserved node, already queued, is granted the key at once.
//!
//! # Guarantees
//!
//! At most one primary per lock name: one session holds the advisory lock, a successor waits for
//! its predecessor's step-down, then for its fencing bound unless it holds a death certificate.
//! Failover takes milliseconds after a clean release or a death certified on the same host, and
//! the fencing bound (450 ms by default) otherwise. The full statement, the bounds without a
//! primary, the assumptions and where they stop (replica failover, poolers, privileges to end a
//! stopped holder) are in GUARANTEES.md at the root of the repository. Each waiting node occupies
//! one server connection, plus one for its second connection.
//!
//! # Connection strings
//!
//! `postgres://user:password@host:port/db?namespace=…&schema=…&sslmode=…&sslrootcert=…` plus
//! any parameter tokio-postgres understands (`connect_timeout`, `application_name`,
//! `target_session_attrs`…). `namespace` and `schema` are the crate's; `sslmode` is read as libpq
//! does: `disable`; `prefer` (the default) and `require` encrypt with TLS (rustls) without
//! verifying the server's certificate, unless `sslrootcert` names a CA file; `verify-ca` and
//! `verify-full` verify it against the system's roots and `sslrootcert` (both check the host
//! name). Errors never repeat the password, and name the bad part of a malformed string (a port,
//! a host, the database name, an unknown parameter, a bad `sslmode`).
//!
//! # Errors
//!
//! What retrying cannot fix is an [`Error::Misconfigured`](crate::Error::Misconfigured): the
//! server refused the credentials (SQLSTATE 28P01, 28000), the database does not exist (3D000),
//! the role lacks a right it needs (42501), or the TLS handshake failed (`sslmode=require` against
//! a server without TLS, an untrusted certificate). An unreachable server or a timeout is an
//! [`Error::Backend`](crate::Error::Backend), retried.
//!
//! # Examples
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_primary::Elector;
//! use tower_primary::backend::postgres::PostgresBackend;
//!
//! # #[tokio::main] async fn main() -> Result<(), tower_primary::Error> {
//! let backend = PostgresBackend::new("postgres://app@db.internal/app")?
//!     .namespace("billing")
//!     .liveness(Duration::from_millis(500), Duration::from_secs(1));
//! let elector = Elector::builder("invoice-run").backend(backend).spawn()?;
//! elector.handle().wait_primary().await;
//! # Ok(()) }
//! ```

mod config;
mod conn;
mod hold;
mod lock;
mod predecessor;
mod registry;
mod second_connection;
mod sql;
mod term;
mod url;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use self::config::Settings;
use super::{Backend, Lock};
use crate::error::{ConfigError, validate_lock_name};

const NAME: &str = "postgres";

/// The PostgreSQL backend. See the [module docs](self).
///
/// Cheap to clone. Every elector built on it opens its own two connections; nothing is pooled.
#[derive(Clone)]
pub struct PostgresBackend {
    settings: Arc<Settings>,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        f.debug_struct("PostgresBackend")
            .field("url", &s.url)
            .field("namespace", &s.namespace)
            .field("schema", &s.schema)
            .field("sslmode", &s.ssl_mode)
            .field("liveness_every", &s.liveness_every)
            .field("liveness_timeout", &s.liveness_timeout)
            .field("fencing_bound", &s.fencing_bound)
            .field("max_fencing_bound", &s.max_fencing_bound())
            .finish_non_exhaustive()
    }
}

impl PostgresBackend {
    /// A backend on the server of `url` (`postgres://…` or `postgresql://…`; see the
    /// [module docs](self#connection-strings)). No connection is made here.
    ///
    /// ```
    /// use tower_primary::backend::postgres::PostgresBackend;
    ///
    /// let backend = PostgresBackend::new("postgres://app@db/app?namespace=billing").unwrap();
    /// assert!(PostgresBackend::new("postgres://app@db/app?namespace=no/slash").is_err());
    /// # let _ = backend;
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidBackendUrl`] for a malformed URL, an invalid `namespace` or `schema`,
    /// an unknown `sslmode`, or an unreadable `sslrootcert`.
    pub fn new(url: &str) -> Result<Self, ConfigError> {
        Ok(PostgresBackend {
            // The driver's messages may quote parts of the URL; none may show a password.
            settings: Arc::new(
                Settings::from_url(url).map_err(|e| super::without_passwords(url, e))?,
            ),
        })
    }

    fn edit(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(Arc::make_mut(&mut self.settings));
        self
    }

    /// The namespace: part of every advisory key and of every row, so that deployments sharing a
    /// database do not share locks. 1 to 64 bytes of `[A-Za-z0-9._-]`; default `default`.
    /// Checked when an elector is spawned.
    #[must_use]
    pub fn namespace(self, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        self.edit(|s| s.namespace = namespace)
    }

    /// The schema of the tables and the sequence, created if missing: a lower-case identifier
    /// (`[a-z_][a-z0-9_]*`); default `tower_primary`. Checked when an elector is spawned.
    ///
    /// The advisory key does not depend on the schema: nodes configured with different schemas
    /// but the same namespace still exclude each other.
    #[must_use]
    pub fn schema(self, schema: impl Into<String>) -> Self {
        let schema = schema.into();
        self.edit(|s| s.schema = schema)
    }

    /// How often the holder checks its lock session, and how long it waits for the answer
    /// before it steps down. Default 150 ms and 200 ms (about 7 queries a second, on the holder
    /// only). `2 × every + timeout` must be shorter than the
    /// [server's dead-peer detection](Self::server_keepalive), and `every + timeout` plus a
    /// tenth of the [fencing bound](Self::fencing_bound) plus 50 ms shorter than that bound.
    #[must_use]
    pub fn liveness(self, every: Duration, timeout: Duration) -> Self {
        self.edit(|s| {
            s.liveness_every = every;
            s.liveness_timeout = timeout;
        })
    }

    /// This node's **fencing bound**: when it holds the lock, how long a successor that has no
    /// proof that it stepped down (a clean release, or its process gone on the successor's
    /// host) waits after the server granted it the lock. Every confirmed liveness check renews
    /// the holder's term for this long (less a tenth as margin), so the holder stops acting
    /// before a successor starts, also when the server closed its sessions without it hearing
    /// of it. Recorded in the holder record as `lease_ms`. Default 450 ms; it must exceed what a
    /// healthy holder needs between two checks (see [`liveness`](Self::liveness)).
    #[must_use]
    pub fn fencing_bound(self, bound: Duration) -> Self {
        self.edit(|s| s.fencing_bound = bound)
    }

    /// The longest a successor waits for a predecessor without proof that it stepped down: the
    /// cap on a recorded fencing bound, and the wait for a record without one (written by an
    /// older version). Default: the larger of the
    /// [server's dead-peer detection](Self::server_keepalive) (4 s by default; older versions
    /// fenced their terms by it) and [`fencing_bound`](Self::fencing_bound). A lock session
    /// that the server shows idle for longer than this plus one liveness interval belongs to a
    /// stopped node, and waiting nodes end it.
    #[must_use]
    pub fn max_fencing_bound(self, max: Duration) -> Self {
        self.edit(|s| s.max_fencing_bound = Some(max))
    }

    /// The TCP keepalive the lock session asks the server (and its own socket) to use:
    /// first probe after `idle` without traffic, then every `interval`, giving up after `count`
    /// unanswered probes (`tcp_user_timeout` is set to the same total). Whole seconds; default
    /// 2 s, 1 s, 2. A server that cannot reach a partitioned holder frees its lock after about
    /// `idle + interval × count`.
    #[must_use]
    pub fn server_keepalive(self, idle: Duration, interval: Duration, count: u32) -> Self {
        self.edit(|s| {
            s.keepalive_idle = idle;
            s.keepalive_interval = interval;
            s.keepalive_count = count;
        })
    }

    /// How long connecting (socket, TLS, start-up) may take. Default: the URL's
    /// `connect_timeout`, else 5 s.
    #[must_use]
    pub fn connect_timeout(self, timeout: Duration) -> Self {
        self.edit(|s| s.connect_timeout = timeout)
    }

    /// How long a holder-record or state request, and the release, may take. Default 5 s.
    #[must_use]
    pub fn request_timeout(self, timeout: Duration) -> Self {
        self.edit(|s| s.request_timeout = timeout)
    }

    /// The advisory key of `lock` in this backend's namespace (see [`advisory_key`]).
    #[must_use]
    pub fn key(&self, lock: &str) -> i64 {
        advisory_key(&self.settings.namespace, lock)
    }
}

/// The bigint advisory key of a lock name: FNV-1a (64-bit) of
/// `"tower-primary\0" + namespace + "\0" + lock`, read as a signed integer. Stable across
/// versions, so operators can find a lock in `pg_locks`
/// (`classid = key >> 32`, `objid = key & 0xffffffff`, `objsubid = 1`).
///
/// ```
/// use tower_primary::backend::postgres::advisory_key;
///
/// assert_eq!(advisory_key("default", "jobs"), advisory_key("default", "jobs"));
/// assert_ne!(advisory_key("default", "jobs"), advisory_key("other", "jobs"));
/// ```
#[must_use]
pub fn advisory_key(namespace: &str, lock: &str) -> i64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for part in [
        b"tower-primary\0".as_slice(),
        namespace.as_bytes(),
        b"\0",
        lock.as_bytes(),
    ] {
        for byte in part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

impl Backend for PostgresBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn address(&self) -> String {
        self.settings.address()
    }

    fn min_lease(&self) -> Option<Duration> {
        None
    }

    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        validate_lock_name(name)?;
        self.settings.validate()?;
        Ok(Arc::new(lock::PgLock::new(self.settings.clone(), name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_fnv1a_of_namespace_and_name() {
        // FNV-1a 64 of "tower-primary\0default\0jobs", computed independently.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in b"tower-primary\0default\0jobs" {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        assert_eq!(advisory_key("default", "jobs"), h.cast_signed());
        // Pinned, so that a change of the hash (which would split running deployments) fails.
        assert_eq!(
            advisory_key("", ""),
            0xc645_ae46_9c80_dd39_u64.cast_signed()
        );
        assert_ne!(advisory_key("a", "bc"), advisory_key("ab", "c"));
    }

    #[test]
    fn builder_settings_are_checked_at_lock_time() {
        let b = PostgresBackend::new("postgres://root@127.0.0.1/test").unwrap();
        assert!(b.lock("jobs").is_ok());
        assert!(b.lock("bad/name").is_err());
        let err = b
            .clone()
            .namespace("")
            .lock("jobs")
            .unwrap_err()
            .to_string();
        assert!(err.contains("namespace"), "{err}");
        let err = b
            .clone()
            .schema("Public")
            .lock("jobs")
            .unwrap_err()
            .to_string();
        assert!(err.contains("schema"), "{err}");
        let err = b
            .clone()
            .liveness(Duration::from_secs(2), Duration::from_secs(2))
            .lock("jobs")
            .unwrap_err()
            .to_string();
        assert!(err.contains("dead-peer"), "{err}");
        let err = b
            .clone()
            .fencing_bound(Duration::from_millis(300))
            .lock("jobs")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fencing bound"), "{err}");
        assert!(
            b.server_keepalive(Duration::from_secs(10), Duration::from_secs(2), 3)
                .liveness(Duration::from_secs(2), Duration::from_secs(2))
                .fencing_bound(Duration::from_secs(5))
                .lock("jobs")
                .is_ok()
        );
    }

    #[test]
    fn debug_never_shows_the_password() {
        let b = PostgresBackend::new("postgres://u:hunter2@h/db").unwrap();
        let s = format!("{b:?}");
        assert!(!s.contains("hunter2"), "{s}");
    }
}
