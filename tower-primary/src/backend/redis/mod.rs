//! The Redis backend: leases with fencing terms, self-fencing and instant handover, for services
//! that run on many hosts.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_primary::{Elector, Lease};
//! use tower_primary::backend::redis::RedisBackend;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = RedisBackend::new("redis://:secret@10.0.0.5:6379/2?prefix=myapp")?;
//! let elector = Elector::builder("report-scheduler")
//!     .backend(backend)
//!     .lease(Lease::new(Duration::from_secs(5)))
//!     .spawn()?;
//! # Ok(())
//! # }
//! ```
//!
//! # How it works
//!
//! For the lock `name` under the key prefix `p` (default `tower-primary`) the backend keeps, all
//! in one cluster slot thanks to the hash tag `{p:name}`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `{p:name}:lock` | string, `PX lease` | a random 128-bit token of the holder |
//! | `{p:name}:holder` | hash, same expiry | `token`, `term`, `lease_ms`, `record` (the [`Holder`](crate::Holder) as JSON) |
//! | `{p:name}:term` | string, no expiry | the last term issued |
//! | `{p:name}:lease` | hash, no expiry | `until`: server time (ms) until which the last holder may act; `max_ms`: the largest maximum lease of the lock's nodes |
//! | `{p:name}:abandoned:<token>` | string, 10 min expiry | an acquisition that gave up; a late request with that token is refused |
//! | `{p:name}:state:<key>` | hash | `value`, `term` of a state value |
//! | `{p:name}:events` | channel | `acquired <term>`, `released <term>`, `state <key>` |
//! | `{p:name}:reserved` | string, `PX window` | the node the lock is reserved for |
//! | `{p:name}:candidates` | hash, expires 2-3 leases after its last write | node → `<until ms> <registration id> <entry JSON>` |
//! | `{p:name}:registry` | channel | `candidates`, at every change of the registry |
//!
//! - **Acquire** is one Lua script: `SET lock token NX PX lease`; on success the term becomes
//!   `max(last term + 1, server TIME in µs)`, the holder hash is written and `acquired` is
//!   published. Terms therefore rise even when Redis restarts empty (a plain `INCR` would start at
//!   1 again), as long as the Redis host's wall clock does not step back and fewer than a million
//!   terms are issued per second.
//! - **No overlap when the lock key is lost.** Every grant and renewal records, in the lease
//!   record that never expires, `until` = server `TIME` + the holder's lease; an acquisition waits
//!   while `TIME < until`, so a lock key that was deleted (`DEL`) or evicted costs its holder's
//!   lease, not an overlap (the holder itself steps down at its next renewal). A clean release
//!   sets `until` to the server's time, after its token check, so handover stays in
//!   milliseconds. When the record itself is gone (a fresh lock, `FLUSHALL`, a restart without
//!   data, an upgrade from a version without it), the first acquisition re-creates it with
//!   `until` = now + the **maximum lease** and waits that long once. And after a restart, nothing
//!   is granted while the server's uptime is below the maximum lease + 1 s (a restart that loads
//!   an old RDB or AOF file brings back an old `until`). A holder whose key vanished has, by
//!   then, passed its own deadline and fenced itself. The maximum lease (default 30 s) is a
//!   setting of the backend ([`RedisBackend::with_max_lease`], `max_lease=` in the backend
//!   string); a node with a longer lease does not spawn, and the largest maximum of the lock's
//!   nodes is kept in the record. A node whose lease differs from the current holder's still
//!   refuses to acquire, with an error naming both (nodes of older versions rely on it).
//! - **Evicting servers are refused.** A `maxmemory-policy` other than `noeviction` (read from
//!   `INFO memory`, as `CONFIG` is often disabled) makes acquisitions fail with an error naming
//!   it, unless allowed with [`RedisBackend::allow_eviction`].
//! - **Renewal** runs inside the backend every `lease / 3`, on a connection of its own, as an
//!   owner-checked script (`PEXPIRE` only if the token is still ours). Each confirmed renewal is
//!   reported with its send time, from which the elector computes the deadline. Transient errors
//!   (the first command after a Redis restart fails) are retried quickly until the deadline; a
//!   refusal (the key is gone or someone else's) ends the term at once.
//! - **Release** is an owner-checked script that deletes the keys and publishes `released`.
//!   An acquisition that fails in a way its request may still reach the server (a timeout, a
//!   broken connection) is abandoned: the release, on a new connection, also leaves a tombstone
//!   for the acquisition's token, so that the old request, should it arrive later, grants
//!   nothing. A grant that arrives after its acquisition was dropped is released at once.
//! - **Waiters wake at once on a release** (pub/sub). After a crash they wake when the holder's key
//!   runs out: each waiter sleeps for the key's remaining `PTTL` and tries again at once, so a crash
//!   costs the lease, not the lease plus a poll interval. Key-expiry notifications are used as
//!   well when the server already publishes them, or when enabled with
//!   [`KeyEvents::Enable`]; a slow poll stays as a safety net. Secondaries refresh the holder
//!   record from the same messages.
//! - **State values** are written by an owner-checked script: the writing term must hold the lock
//!   key and no newer term may have written the value.
//! - **Owner checks compare the term as well as the token.** Renewal, release and state writes
//!   act only while the lock key holds the request's token *and* the holder record its term.
//! - **Candidate registry** ([`Lock::register`]): one hash per lock; a node's field carries its
//!   [`Candidate`](crate::Candidate) entry and `until`, the server's `TIME` + the node's lease,
//!   written by a script and refreshed by the registration's task every third of the lease
//!   (keeping the stored entry; an update replaces it). Reading is a script that returns the
//!   entries whose `until` has not passed and deletes the others, so a dead node's entry is gone
//!   one lease after its last refresh, timed by the server alone. Adds, updates, withdrawals (on
//!   drop, best effort) and deaths a reader found are published on the registry's channel, which
//!   [`Lock::watch_candidates`] follows (a death is reported when some node next reads: the
//!   elector reads at least once a lease). A registration whose entry is gone while it lives
//!   (Redis restarted or flushed, the node cut off for longer than its lease) enters it again
//!   at its next refresh. One hash rather than a key per node: reading is one script on a
//!   declared key, with no index to keep in step with expiring keys.
//! - **Reservations** ([`Leadership::reserve`](super::Leadership::reserve)): an owner-checked
//!   script (token and term, as for a state write) sets `{p:name}:reserved` to the node, `PX`
//!   the window. The acquire script grants nothing to another node while that key lives: it
//!   answers with the key's `PTTL`, and the waiter sleeps that long or until a message on the
//!   lock's channel (the reserved node's grant). The reserved node's acquisition deletes the key
//!   in the script that grants it the lock, with the usual term. A resumption ignores it.
//! - **Resuming a lease** ([`Lock::resume`], for the next process of a host group): a
//!   leadership's [`resume_token`](super::Leadership::resume_token) is
//!   `{"token":"<lock token>","term":<term>}`. The resume script, only while the lock key holds
//!   that token and the holder record that term, sets the lock key to a new token of the resuming
//!   process (`PX lease`), draws a new term as acquisition does, rewrites the holder record with
//!   the resuming node (and its process identity), moves `until`, and publishes `acquired`;
//!   otherwise it answers that the lease is gone and `resume` returns `Ok(None)`. The restart
//!   guard, the eviction check and the lease checks of acquisition apply, not the wait for
//!   `until` (the lease resumed is that `until`). The send time of the script is the new term's
//!   first confirmed renewal. The predecessor's late requests carry its token and term, which the
//!   lock no longer holds: they are refused.
//!
//! # Backend string
//!
//! `redis://[user:pass@]host:port[/db][?prefix=p][&max_lease=30s]`, or `rediss://…` for TLS
//! (rustls, with the system's root certificates). `prefix` and `max_lease` (see
//! [`RedisBackend::with_max_lease`]) are removed before the URL reaches the Redis driver.
//!
//! # Errors
//!
//! A backend string with a bad part (scheme, host, port, database, parameter) is refused by
//! [`RedisBackend::new`] with a [`ConfigError::InvalidBackendUrl`] that names the part. At run
//! time, a refusal that retrying will not fix is an
//! [`Error::Misconfigured`](crate::Error::Misconfigured) of its
//! [kind](crate::Misconfiguration): a wrong or missing password (authentication), an ACL
//! refusal (permission), a database index the server does not have (missing database),
//! `rediss://` against a server without TLS or with an untrusted certificate (TLS), and a lease
//! that does not fit the lock (incompatible lease: the current holder's lease differs, it
//! exceeds the recorded maximum, or the server's `maxmemory-policy` may evict the lock's keys).
//! An unreachable server or a timeout is an [`Error::Backend`](crate::Error::Backend), retried.
//!
//! # What is not guaranteed
//!
//! One Redis primary is assumed. Replication is asynchronous: a failover to a replica (Sentinel,
//! Cluster) can lose the lock key and bring back an older lease record without the uptime reset
//! this backend watches for, and two nodes can then be primary until the old one's next renewal.
//! Key expiry and `until` follow the Redis host's wall clock; a forward step there shortens every
//! lease (keep the margin, use slewing NTP). Settings made with `CONFIG SET` are lost when Redis
//! restarts; the backend sets key events again when it reconnects. As with every lease, a paused holder resumes not primary, but work it already
//! started must carry the term to be refused downstream.
//!
//! # Mixing with version 0.1.0
//!
//! The lock, holder and term keys keep their format, and the scripts of 0.1.0 ignore the lease
//! record, so old and new nodes share a lock: each waits while the other holds the lock key,
//! nodes of both versions refuse a holder with another lease, and terms keep rising (both take
//! `max(last + 1, server time in µs)`, also for a resumption). Old nodes read the holder record
//! a new node wrote (the JSON's new fields are ignored) and follow a resumption through its
//! `acquired` message; only new nodes' leases are resumed. A new node finding no lease record (the first one after
//! the upgrade) waits the maximum lease once. The new guarantees (no grant before a lost key's
//! `until`, the longer restart guard, eviction refused) hold only among new nodes: an old node
//! still grants as soon as the lock key is gone and the server has been up for its own lease +
//! 1 s, and its holders do not record `until`.
//!
//! Old nodes neither read nor write the registry and reservation keys, and do not listen on the
//! registry's channel: they do not register (the elector of a new node never sees them as
//! candidates) and **ignore reservations**: an old node waiting for the lock may take it during a
//! window reserved for a new node (the handover then goes to it, as before the upgrade).
//! Safety is unchanged: the grant is still `SET NX` on the lock key and terms are drawn as
//! before.

mod config;
mod conn;
mod events;
mod leadership;
mod lock;
mod registry;
mod resume;
mod scripts;
mod state;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::Client;
use tokio_util::sync::CancellationToken;

use self::config::{validate_max_lease, validate_prefix};
use self::conn::Conn;
use self::events::Events;
use self::lock::{LockShared, RedisLock, lease_ms};
use self::scripts::Keys;
use super::{Backend, Lock};
use crate::error::{ConfigError, validate_lock_name};
const NAME: &str = "redis";

/// The key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "tower-primary";

/// The shortest lease this backend accepts.
const MIN_LEASE: Duration = Duration::from_secs(1);
/// How long an ordinary command may take before the connection is considered stuck.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting and subscribing the event connection may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the event connection is checked with a `PING`.
const PING_EVERY: Duration = Duration::from_secs(2);
/// Extra uptime, beyond the maximum lease, that Redis must have before a lock is granted.
const RESTART_GUARD: Duration = Duration::from_secs(1);
/// The maximum lease when none is given: see [`RedisBackend::with_max_lease`].
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(30);
/// How long an abandoned acquisition's token stays refused. A request delayed on a connection
/// that the client has closed reaches the server, if at all, within the kernel's retries for
/// orphaned sockets (well under a minute on Linux); this is far beyond them.
const ABANDONED_FOR: Duration = Duration::from_secs(600);

/// Whether waiters also listen for Redis key-expiry notifications (a crashed holder's key
/// running out). Waiters sleep until the key's remaining time to live in any case, so these only
/// add a second wake-up source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyEvents {
    /// Use them when the server already publishes them (`notify-keyspace-events` with `K` or
    /// `E`, and `x` or `A`). The default.
    #[default]
    IfEnabled,
    /// Turn them on with `CONFIG SET notify-keyspace-events` (adding `Kx` to what is set). This
    /// changes a setting of a server that may be shared, and is lost when Redis restarts (the
    /// backend sets it again when it reconnects); the server must allow `CONFIG`.
    Enable,
    /// Never use them.
    Off,
}

/// The Redis backend. See the [module docs](self).
///
/// Clones share their command connection. Each lock also keeps a connection of its own for its
/// lease and one for notifications.
#[derive(Clone)]
pub struct RedisBackend {
    client: Client,
    /// The URL without password, for `Debug`.
    shown: String,
    /// `scheme://host:port/db`, for [`Backend::address`].
    server: String,
    prefix: String,
    key_events: KeyEvents,
    max_lease: Duration,
    allow_eviction: bool,
    commands: Arc<Conn>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.shown)
            .field("prefix", &self.prefix)
            .field("key_events", &self.key_events)
            .field("max_lease", &self.max_lease)
            .field("allow_eviction", &self.allow_eviction)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A backend for the server at `url`:
    /// `redis://[user:pass@]host:port[/db][?prefix=p][&max_lease=30s]` or `rediss://…` (TLS).
    /// Nothing is connected until a lock is used.
    ///
    /// ```
    /// use tower_primary::backend::redis::RedisBackend;
    ///
    /// let backend = RedisBackend::new("redis://127.0.0.1:6379/1?prefix=billing").unwrap();
    /// assert_eq!(backend.prefix(), "billing");
    /// assert!(RedisBackend::new("redis://h/1?lease=5s").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidBackendUrl`] for a malformed URL, an unknown crate parameter or an
    /// invalid prefix (passwords are not repeated in the message).
    pub fn new(url: &str) -> Result<Self, ConfigError> {
        // The driver's messages may quote parts of the URL; none of them may show a password.
        let parsed = config::parse(url).map_err(|e| super::without_passwords(url, e))?;
        Ok(RedisBackend {
            commands: Arc::new(Conn::new(parsed.client.clone())),
            client: parsed.client,
            shown: parsed.shown,
            server: parsed.server,
            prefix: parsed.prefix,
            key_events: KeyEvents::default(),
            max_lease: parsed.max_lease,
            allow_eviction: false,
        })
    }

    /// Sets the key prefix (default [`DEFAULT_PREFIX`]): 1 to 64 characters of
    /// `[A-Za-z0-9._:-]`. Nodes of one lock must use the same prefix.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidBackendUrl`] naming the rule the prefix broke.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Result<Self, ConfigError> {
        let prefix = prefix.into();
        validate_prefix(&prefix).map_err(|rule| ConfigError::InvalidBackendUrl {
            url: self.shown.clone(),
            problem: format!("prefix {prefix:?} {rule}"),
        })?;
        self.prefix = prefix;
        Ok(self)
    }

    /// Whether waiters also use key-expiry notifications; see [`KeyEvents`].
    #[must_use]
    pub fn key_events(mut self, key_events: KeyEvents) -> Self {
        self.key_events = key_events;
        self
    }

    /// The key prefix.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Sets the maximum lease of every node of this backend's locks (default
    /// [`DEFAULT_MAX_LEASE`], 30 s; `max_lease=<duration>` in the backend string). A node whose
    /// lease is longer does not start. It bounds the wait when the lock's records are gone: after
    /// Redis restarts, nothing is granted before the server has been up for the maximum lease +
    /// 1 s, and when the lease record is missing (a fresh lock, `FLUSHALL`, a deleted key) the
    /// first acquisition waits the maximum lease once. The largest maximum any node used is
    /// recorded in Redis and applies to every node while the record lasts.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_primary::backend::Backend;
    /// use tower_primary::backend::redis::RedisBackend;
    /// use tower_primary::{Elector, Lease};
    ///
    /// let backend = RedisBackend::new("redis://127.0.0.1:6379")?
    ///     .with_max_lease(Duration::from_secs(10))?;
    /// assert_eq!(backend.max_lease(), Some(Duration::from_secs(10)));
    /// let same = RedisBackend::new("redis://127.0.0.1:6379?max_lease=10s")?;
    /// assert_eq!(same.max_lease(), Some(Duration::from_secs(10)));
    ///
    /// // A longer lease does not spawn.
    /// let refused = Elector::builder("jobs")
    ///     .backend(same)
    ///     .lease(Lease::new(Duration::from_secs(20)))
    ///     .spawn();
    /// assert!(matches!(refused, Err(tower_primary::ConfigError::InvalidTiming { .. })));
    /// # Ok::<(), tower_primary::ConfigError>(())
    /// ```
    ///
    /// Lowering it safely: first run every node with leases no longer than the new maximum (a
    /// rolling restart), then with the new maximum, then lower the recorded value with
    /// `HSET {<prefix>:<lock>}:lease max_ms <milliseconds>`. Until then the recorded, larger
    /// maximum applies.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidTiming`] when `max` is shorter than the shortest lease (1 s).
    pub fn with_max_lease(mut self, max: Duration) -> Result<Self, ConfigError> {
        validate_max_lease(max).map_err(|rule| ConfigError::InvalidTiming {
            setting: "maximum lease",
            value: max,
            rule: rule.to_owned(),
        })?;
        self.max_lease = max;
        Ok(self)
    }

    /// Whether to campaign on a server whose `maxmemory-policy` may evict keys (anything but
    /// `noeviction`; default `false`). The policy is read from `INFO memory` at every
    /// acquisition; with an evicting policy and without this setting, acquisitions fail with an
    /// error naming the policy and the node stays secondary.
    ///
    /// Evicting the lock key makes its holder step down at its next renewal; successors still
    /// wait for the holder's recorded lease (or the maximum lease if that record was evicted
    /// too, which only `allkeys-*` policies do), so leadership can change under memory pressure
    /// but two nodes are not primary at once. Allow it only when that is acceptable.
    ///
    /// ```
    /// use tower_primary::backend::redis::RedisBackend;
    ///
    /// let backend = RedisBackend::new("redis://127.0.0.1:6379")?.allow_eviction(true);
    /// # Ok::<(), tower_primary::ConfigError>(())
    /// ```
    #[must_use]
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    /// `scheme://host:port/db?prefix=p`, with the default port (6379) and database (0) filled
    /// in, and without user name or password.
    ///
    /// ```
    /// use tower_primary::backend::Backend;
    /// use tower_primary::backend::redis::RedisBackend;
    ///
    /// let backend = RedisBackend::new("redis://app:secret@10.0.0.5/2?prefix=billing")?;
    /// assert_eq!(backend.address(), "redis://10.0.0.5:6379/2?prefix=billing");
    /// # Ok::<(), tower_primary::ConfigError>(())
    /// ```
    fn address(&self) -> String {
        format!("{}?prefix={}", self.server, self.prefix)
    }

    fn min_lease(&self) -> Option<Duration> {
        Some(MIN_LEASE)
    }

    fn max_lease(&self) -> Option<Duration> {
        Some(self.max_lease)
    }

    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        validate_lock_name(name)?;
        let keys = Keys::new(&self.prefix, name, self.client.get_connection_info());
        let stop = CancellationToken::new();
        let events = Arc::new(Events::new(keys.clone(), self.key_events, stop.clone()));
        Ok(Arc::new(RedisLock {
            shared: Arc::new(LockShared {
                name: name.to_owned(),
                keys,
                client: self.client.clone(),
                commands: self.commands.clone(),
                lease: Arc::new(Conn::new(self.client.clone())),
                max_lease_ms: lease_ms(self.max_lease),
                seen_max_ms: AtomicU64::new(0),
                allow_eviction: self.allow_eviction,
                events,
                subscriber: Mutex::new(None),
                tokens: Mutex::new(HashMap::new()),
                _stop: stop.drop_guard(),
            }),
        }))
    }
}
