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
//! | `{p:name}:holder` | hash, same expiry | `token`, `term`, `lease_ms`, `record` (the [`Holder`] as JSON) |
//! | `{p:name}:term` | string, no expiry | the last term issued |
//! | `{p:name}:lease` | hash, no expiry | `until`: server time (ms) until which the last holder may act; `max_ms`: the largest maximum lease of the lock's nodes |
//! | `{p:name}:abandoned:<token>` | string, 10 min expiry | an acquisition that gave up; a late request with that token is refused |
//! | `{p:name}:state:<key>` | hash | `value`, `term` of a state value |
//! | `{p:name}:events` | channel | `acquired <term>`, `released <term>`, `state <key>` |
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
//!
//! # Backend string
//!
//! `redis://[user:pass@]host:port[/db][?prefix=p][&max_lease=30s]`, or `rediss://…` for TLS
//! (rustls, with the system's root certificates). `prefix` and `max_lease` (see
//! [`RedisBackend::with_max_lease`]) are removed before the URL reaches the Redis driver.
//!
//! # Guarantees
//!
//! One primary per lock name around **one Redis primary**: the holder fences itself a margin
//! before its lease can run out, and the lease record keeps a lost key from being granted early.
//! A crash costs the rest of the holder's lease; terms rise also across a restart without data.
//! Not covered: a failover to an asynchronously replicated replica (Sentinel, Cluster), and a
//! Redis host's clock that steps. The full statement, its assumptions and the bounds without a
//! primary are in GUARANTEES.md at the root of the repository. Settings made with `CONFIG SET` are
//! lost when Redis restarts; the backend sets key events again when it reconnects.
//!
//! # Mixing with version 0.1.0
//!
//! The lock, holder and term keys keep their format, and the scripts of 0.1.0 ignore the lease
//! record, so old and new nodes share a lock: each waits while the other holds the lock key,
//! nodes of both versions refuse a holder with another lease, and terms keep rising (both take
//! `max(last + 1, server time in µs)`). A new node finding no lease record (the first one after
//! the upgrade) waits the maximum lease once. The new guarantees (no grant before a lost key's
//! `until`, the longer restart guard, eviction refused) hold only among new nodes: an old node
//! still grants as soon as the lock key is gone and the server has been up for its own lease +
//! 1 s, and its holders do not record `until`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, RedisError, RedisResult, Script};
use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    AcquireRequest, Backend, BoxFuture, Changes, Leadership, Lock, RenewalSender, Renewals, Stored,
    VersionChanges, renewals,
};
use crate::backend::Lease;
use crate::clock::{Clock, Timestamp};
use crate::error::{ConfigError, Error, validate_lock_name};
use crate::role::Holder;

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
        Self::parse(url).map_err(|e| super::without_passwords(url, e))
    }

    fn parse(url: &str) -> Result<Self, ConfigError> {
        let shown = super::redact(url);
        let invalid = |problem: String| ConfigError::InvalidBackendUrl {
            url: shown.clone(),
            problem,
        };
        let (scheme, _) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected redis:// or rediss://".to_owned()))?;
        if scheme != "redis" && scheme != "rediss" {
            return Err(invalid(format!(
                "scheme {scheme:?}: expected redis:// or rediss://"
            )));
        }
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let mut prefix = DEFAULT_PREFIX.to_owned();
        let mut max_lease = DEFAULT_MAX_LEASE;
        let mut passed = Vec::new();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "prefix" => prefix = v.to_owned(),
                "max_lease" => {
                    max_lease = humantime::parse_duration(v)
                        .map_err(|e| invalid(format!("max_lease {v:?}: {e}")))?;
                    validate_max_lease(max_lease)
                        .map_err(|rule| invalid(format!("max_lease {v:?} {rule}")))?;
                }
                // Query parameters the driver itself understands.
                "protocol" | "insecure" | "lib_name" | "lib_ver" => passed.push(pair),
                "lease" | "ttl" => {
                    return Err(invalid(
                        "the lease is not part of the backend string; set it on the elector"
                            .to_owned(),
                    ));
                }
                other => return Err(invalid(format!("unknown parameter {other:?}"))),
            }
        }
        validate_prefix(&prefix).map_err(|rule| invalid(format!("prefix {prefix:?} {rule}")))?;
        let driver_url = if passed.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", passed.join("&"))
        };
        let client = Client::open(driver_url.as_str()).map_err(|e| invalid(e.to_string()))?;
        if scheme == "rediss" {
            // The driver builds its TLS config with rustls's process-wide crypto provider; make
            // sure there is one (ring) unless the application installed its own.
            if ::rustls::crypto::CryptoProvider::get_default().is_none() {
                let _ = ::rustls::crypto::ring::default_provider().install_default();
            }
        }
        Ok(RedisBackend {
            commands: Arc::new(Conn::new(client.clone())),
            client,
            shown,
            prefix,
            key_events: KeyEvents::default(),
            max_lease,
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

fn validate_max_lease(max: Duration) -> Result<(), &'static str> {
    if max < MIN_LEASE {
        return Err("must be at least the shortest lease, 1 s");
    }
    if max > Duration::from_secs(86_400) {
        return Err("must be at most a day");
    }
    Ok(())
}

fn validate_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() || prefix.len() > 64 {
        return Err("must be 1 to 64 characters");
    }
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err("may only hold ASCII letters, digits, '.', '_', ':' and '-'");
    }
    Ok(())
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
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

/// The keys and channels of one lock.
#[derive(Clone, Debug)]
struct Keys {
    lock: String,
    holder: String,
    term: String,
    /// The lease record: `until` (server ms) and `max_ms`; never expires.
    lease: String,
    /// The prefix of abandoned acquisitions' tombstones.
    abandoned: String,
    state: String,
    channel: String,
    /// The keyspace channel of the lock key, and the database's expired-keys channel.
    keyspace: String,
    keyevent: String,
}

impl Keys {
    fn new(prefix: &str, name: &str, info: &::redis::ConnectionInfo) -> Self {
        let tag = format!("{{{prefix}:{name}}}");
        let db = info.redis_settings().db();
        let lock = format!("{tag}:lock");
        Keys {
            keyspace: format!("__keyspace@{db}__:{lock}"),
            keyevent: format!("__keyevent@{db}__:expired"),
            holder: format!("{tag}:holder"),
            term: format!("{tag}:term"),
            lease: format!("{tag}:lease"),
            abandoned: format!("{tag}:abandoned:"),
            state: format!("{tag}:state:"),
            channel: format!("{tag}:events"),
            lock,
        }
    }

    fn state(&self, key: &str) -> String {
        format!("{}{key}", self.state)
    }

    fn abandoned(&self, token: &str) -> String {
        format!("{}{token}", self.abandoned)
    }
}

/// A lazily opened, self-healing connection: a stuck or broken connection is dropped and the next
/// call opens a new one (also on the current tokio runtime).
struct Conn {
    client: Client,
    manager: Mutex<Option<ConnectionManager>>,
}

impl Conn {
    fn new(client: Client) -> Self {
        Conn {
            client,
            manager: Mutex::new(None),
        }
    }

    fn manager(&self) -> RedisResult<ConnectionManager> {
        let mut slot = crate::sync::lock(&self.manager);
        if let Some(m) = &*slot {
            return Ok(m.clone());
        }
        // Our own timeouts bound every call; the driver only retries a reconnect briefly.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let m = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        *slot = Some(m.clone());
        Ok(m)
    }

    fn reset(&self) {
        *crate::sync::lock(&self.manager) = None;
    }

    /// Runs `f` on the connection, for at most `limit`.
    async fn run<T, F, Fut>(&self, what: &str, limit: Duration, f: F) -> Result<T, Error>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let manager = self
            .manager()
            .map_err(|e| Error::backend(NAME, format!("{what}: cannot connect"), e))?;
        match tokio::time::timeout(limit, f(manager)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.reset();
                }
                Err(Error::backend(NAME, what.to_owned(), e))
            }
            Err(_) => {
                self.reset();
                Err(Error::backend_msg(
                    NAME,
                    format!("{what}: no reply within {limit:?}"),
                ))
            }
        }
    }
}

/// `newer(a, b)`: whether the decimal string `a` is a larger number than `b` (exact for any u64,
/// where Lua's numbers are doubles).
const LUA_NEWER: &str = "local function newer(a, b) return #a > #b or (#a == #b and a > b) end\n";

/// `now_ms()`: the server's `TIME` in milliseconds (exact in a Lua double for millennia).
const LUA_NOW: &str = "local function now_ms() local t = redis.call('TIME') \
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end\n";

/// KEYS: lock, holder, term, lease record, this token's tombstone. ARGV: token, lease ms,
/// record JSON, maximum lease ms, channel, eviction allowed (`1`/`0`), restart guard ms.
/// Returns `{"granted", term, max ms}`, `{"held", pttl, holder lease ms}`, `{"wait", ms}`,
/// `{"policy", maxmemory-policy}`, `{"too_long", max ms}` or `{"abandoned"}`.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NEWER}{LUA_NOW}{}",
        r"
if redis.call('EXISTS', KEYS[5]) == 1 then return {'abandoned'} end
if ARGV[6] ~= '1' then
  local policy = string.match(redis.call('INFO', 'memory'), 'maxmemory_policy:([%w%-]+)')
  if policy and policy ~= 'noeviction' then return {'policy', policy} end
end
local lease = tonumber(ARGV[2])
local now = now_ms()
local mine = redis.call('GET', KEYS[1])
if mine == ARGV[1] then
  -- Granted by an earlier try of this acquisition whose reply was lost.
  redis.call('PEXPIRE', KEYS[1], lease)
  redis.call('PEXPIRE', KEYS[2], lease)
  local u = tonumber(redis.call('HGET', KEYS[4], 'until'))
  if not u or u < now + lease then redis.call('HSET', KEYS[4], 'until', tostring(now + lease)) end
  return {'granted', redis.call('HGET', KEYS[2], 'term'), redis.call('HGET', KEYS[4], 'max_ms') or ''}
end
if mine then
  return {'held', tostring(redis.call('PTTL', KEYS[1])), redis.call('HGET', KEYS[2], 'lease_ms') or ''}
end
local max = tonumber(ARGV[4])
local rec = redis.call('HMGET', KEYS[4], 'until', 'max_ms')
if not rec[1] then
  -- The record is gone (a fresh lock, FLUSHALL, a deleted key, a restart without data): a
  -- holder may act for up to the maximum lease.
  redis.call('HSET', KEYS[4], 'until', tostring(now + max), 'max_ms', tostring(math.max(max, tonumber(rec[2]) or 0)))
  return {'wait', tostring(max)}
end
local recorded = tonumber(rec[2])
if recorded and lease > recorded then return {'too_long', rec[2]} end
if not recorded or recorded < max then
  redis.call('HSET', KEYS[4], 'max_ms', ARGV[4])
  recorded = max
end
local up = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)')) or 0
local wait = recorded + tonumber(ARGV[7]) - up * 1000
if wait > 0 then return {'wait', tostring(wait)} end
local u = tonumber(rec[1]) or 0
if now < u then return {'wait', tostring(u - now)} end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', lease) then
  return {'held', tostring(redis.call('PTTL', KEYS[1])), ''}
end
local t = redis.call('TIME')
local stamp = t[1] .. string.format('%06d', tonumber(t[2]))
local last = redis.call('GET', KEYS[3])
if last and not newer(stamp, last) then
  redis.call('INCR', KEYS[3])
else
  redis.call('SET', KEYS[3], stamp)
end
local term = redis.call('GET', KEYS[3])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'token', ARGV[1], 'term', term, 'lease_ms', ARGV[2], 'record', ARGV[3])
redis.call('PEXPIRE', KEYS[2], lease)
redis.call('HSET', KEYS[4], 'until', tostring(now + lease))
redis.call('PUBLISH', ARGV[5], 'acquired ' .. term)
return {'granted', term, tostring(recorded)}
"
    ))
});

/// KEYS: lock, holder, lease record. ARGV: token, lease ms. Returns 1 if renewed, 0 if not ours.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NOW}{}",
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  local ends = now_ms() + tonumber(ARGV[2])
  local u = tonumber(redis.call('HGET', KEYS[3], 'until'))
  if not u or u < ends then redis.call('HSET', KEYS[3], 'until', tostring(ends)) end
  return 1
end
return 0
",
    ))
});

/// KEYS: lock, holder, lease record, this token's tombstone. ARGV: token, channel, tombstone ms
/// (`0`: none). Returns 1 if released, 0 if not ours. With a tombstone, a later acquisition
/// request carrying this token is refused.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NOW}{}",
        r"
if ARGV[3] ~= '0' then redis.call('SET', KEYS[4], '1', 'PX', ARGV[3]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local term = redis.call('HGET', KEYS[2], 'term') or ''
  redis.call('DEL', KEYS[1], KEYS[2])
  -- Ours, so the recorded lease is ours: successors need not wait for it.
  redis.call('HSET', KEYS[3], 'until', tostring(now_ms()))
  redis.call('PUBLISH', ARGV[2], 'released ' .. term)
  return 1
end
return 0
",
    ))
});

/// KEYS: lock, holder, state. ARGV: token, term, value, channel, state key.
/// Returns `{"ok"}` or `{"stale", newer term or ""}`.
static STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NEWER}{}",
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'stale', redis.call('HGET', KEYS[2], 'term') or ''}
end
local stored = redis.call('HGET', KEYS[3], 'term')
if stored and newer(stored, ARGV[2]) then return {'stale', stored} end
redis.call('HSET', KEYS[3], 'value', ARGV[3], 'term', ARGV[2])
redis.call('PUBLISH', ARGV[4], 'state ' .. ARGV[5])
return {'ok'}
"
    ))
});

/// What one lock shares between its handle, its leaderships and its tasks.
struct LockShared {
    name: String,
    keys: Keys,
    client: Client,
    /// The backend's command connection (holder, state, key-event configuration).
    commands: Arc<Conn>,
    /// This lock's connection for acquire, renewals and release.
    lease: Arc<Conn>,
    /// The backend's maximum lease, in ms.
    max_lease_ms: u64,
    /// The largest maximum lease recorded in Redis that this process has seen.
    seen_max_ms: AtomicU64,
    allow_eviction: bool,
    events: Arc<Events>,
    subscriber: Mutex<Option<JoinHandle<()>>>,
    /// The tokens of the terms this node holds, for state writes.
    tokens: Mutex<HashMap<u64, String>>,
    /// Stops the subscriber when the lock is dropped.
    _stop: DropGuard,
}

impl fmt::Debug for LockShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock")
            .field("lock", &self.name)
            .field("key", &self.keys.lock)
            .finish_non_exhaustive()
    }
}

impl LockShared {
    /// Starts the notification task if it is not running (again, e.g. after its runtime ended).
    fn ensure_subscriber(&self) {
        let mut slot = crate::sync::lock(&self.subscriber);
        if slot.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            *slot = Some(rt.spawn(subscribe(
                self.events.clone(),
                self.client.clone(),
                self.commands.clone(),
            )));
        }
    }

    fn lost_msg(&self, reason: impl Into<String>) -> Error {
        Error::Lost {
            lock: self.name.clone(),
            reason: reason.into(),
        }
    }
}

/// Change notifications fed by the subscriber task.
struct Events {
    keys: Keys,
    key_events: KeyEvents,
    stop: CancellationToken,
    /// Bumped when the holder may have changed.
    holder: watch::Sender<u64>,
    /// Bumped when a state value may have changed, per key.
    state: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Whether the subscription is live.
    live: watch::Sender<bool>,
}

impl Events {
    fn new(keys: Keys, key_events: KeyEvents, stop: CancellationToken) -> Self {
        Events {
            keys,
            key_events,
            stop,
            holder: watch::channel(0).0,
            state: Mutex::new(HashMap::new()),
            live: watch::channel(false).0,
        }
    }

    fn bump_holder(&self) {
        self.holder.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn bump_state(&self, key: Option<&str>) {
        let mut state = crate::sync::lock(&self.state);
        state.retain(|_, tx| tx.receiver_count() > 0);
        for (k, tx) in state.iter() {
            if key.is_none_or(|key| key == k) {
                tx.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    fn watch_state(&self, key: &str) -> watch::Receiver<u64> {
        crate::sync::lock(&self.state)
            .entry(key.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Waits until the subscription is live.
    async fn wait_live(&self, name: &str) -> Result<(), Error> {
        let mut rx = self.live.subscribe();
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx.wait_for(|live| *live)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::backend_msg(
                NAME,
                format!("lock {name:?}: no notification connection to Redis"),
            )),
        }
    }

    fn dispatch(&self, channel: &str, payload: &str) {
        if channel == self.keys.channel {
            match payload.split_once(' ') {
                Some(("state", key)) => self.bump_state(Some(key)),
                _ => self.bump_holder(),
            }
        } else if (channel == self.keys.keyspace && payload == "expired")
            || (channel == self.keys.keyevent && payload == self.keys.lock)
        {
            self.bump_holder();
        }
    }
}

/// The notification task of one lock: keeps a subscription to the lock's channel (and key events
/// where used), reconnecting with backoff, and bumps the versions waiters watch. After every
/// (re)subscription everything is bumped, as messages may have been missed.
async fn subscribe(events: Arc<Events>, client: Client, commands: Arc<Conn>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let connect = async {
            let pubsub = client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&events.keys.channel).await?;
            Ok::<_, RedisError>((sink, stream))
        };
        let connected = tokio::select! {
            () = events.stop.cancelled() => return,
            res = tokio::time::timeout(SUBSCRIBE_TIMEOUT, connect) => res,
        };
        match connected {
            Ok(Ok((mut sink, mut stream))) => {
                delay = Duration::from_millis(100);
                if let Some(channel) = key_event_channel(&events, &commands).await
                    && let Err(err) = sink.subscribe(&channel).await
                {
                    tracing::debug!(error = %err, "cannot subscribe to key events");
                }
                events.live.send_replace(true);
                events.bump_holder();
                events.bump_state(None);
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.tick().await;
                loop {
                    tokio::select! {
                        () = events.stop.cancelled() => return,
                        msg = stream.next() => match msg {
                            Some(msg) => events.dispatch(
                                msg.get_channel_name(),
                                std::str::from_utf8(msg.get_payload_bytes()).unwrap_or(""),
                            ),
                            None => break,
                        },
                        _ = ping.tick() => {
                            let pong = tokio::time::timeout(PING_EVERY, sink.ping::<::redis::Value>()).await;
                            if !matches!(pong, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                events.live.send_replace(false);
                tracing::debug!(channel = %events.keys.channel, "notification connection lost; reconnecting");
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, channel = %events.keys.channel, "cannot subscribe");
            }
            Err(_) => tracing::debug!(channel = %events.keys.channel, "subscribing timed out"),
        }
        tokio::select! {
            () = events.stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The key-event channel to listen on, enabling notifications first if asked to.
async fn key_event_channel(events: &Events, commands: &Conn) -> Option<String> {
    if events.key_events == KeyEvents::Off {
        return None;
    }
    let get = commands
        .run("config get", COMMAND_TIMEOUT, |mut c| async move {
            ::redis::cmd("CONFIG")
                .arg("GET")
                .arg("notify-keyspace-events")
                .query_async::<Vec<String>>(&mut c)
                .await
        })
        .await;
    let mut flags = match get {
        Ok(v) => v.get(1).cloned().unwrap_or_default(),
        Err(err) => {
            tracing::debug!(error = %err, "cannot read notify-keyspace-events; not using key events");
            return None;
        }
    };
    let expired = |f: &str| f.contains('x') || f.contains('A');
    if events.key_events == KeyEvents::Enable && !(expired(&flags) && flags.contains('K')) {
        let mut wanted = flags.clone();
        for c in ['K', 'x'] {
            if !wanted.contains(c) {
                wanted.push(c);
            }
        }
        let set = commands
            .run("config set", COMMAND_TIMEOUT, |mut c| {
                let wanted = wanted.clone();
                async move {
                    ::redis::cmd("CONFIG")
                        .arg("SET")
                        .arg("notify-keyspace-events")
                        .arg(wanted)
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await;
        match set {
            Ok(()) => flags = wanted,
            Err(err) => tracing::warn!(error = %err, "cannot enable Redis key events"),
        }
    }
    if !expired(&flags) {
        None
    } else if flags.contains('K') {
        Some(events.keys.keyspace.clone())
    } else if flags.contains('E') {
        Some(events.keys.keyevent.clone())
    } else {
        None
    }
}

/// A random 128-bit token, in hex.
fn new_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !from_os {
        // Randomly keyed SipHash of the process, the time and a counter.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(n);
            h.write_usize(i);
            h.write_u32(std::process::id());
            h.write_u64(crate::clock::monotonic_nanos());
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        use std::fmt::Write;
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A lease in whole milliseconds, rounded up (the server must never expire before the client
/// stops).
fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

fn parse_term(what: &str, s: &str) -> Result<u64, Error> {
    s.parse().map_err(|_| Error::Corrupt {
        backend: NAME,
        what: what.to_owned(),
        problem: format!("term {s:?} is not a number"),
    })
}

fn unexpected(what: &str, reply: &[String]) -> Error {
    Error::backend_msg(NAME, format!("{what}: unexpected reply {reply:?}"))
}

/// One acquisition attempt's outcome.
enum Attempt {
    Granted(Grant),
    Held { pttl_ms: i64, lease_ms: Option<u64> },
    Wait(u64),
}

/// What the acquire script answered.
enum Reply {
    Granted { term: u64, max_ms: Option<u64> },
    Held { pttl_ms: i64, lease_ms: Option<u64> },
    Wait(u64),
    Policy(String),
    TooLong(u64),
    Abandoned,
}

/// A granted lock on its way to the acquisition that asked for it: released (with a release
/// message, so successors take over at once) if dropped before [`take`](Self::take)n, e.g. with
/// an acquisition that was cancelled while the grant was in flight.
struct Grant {
    shared: Arc<LockShared>,
    token: Option<String>,
    term: u64,
}

impl Grant {
    fn take(mut self) -> (String, u64) {
        (self.token.take().unwrap_or_default(), self.term)
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        let shared = self.shared.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(err) = release(&shared, &token, false).await {
                        tracing::warn!(lock = %shared.name, error = %err, "cannot release a grant nobody took; it runs out with its lease");
                    }
                });
            }
            Err(_) => tracing::warn!(
                lock = %shared.name,
                "a grant nobody took outlived its runtime; it runs out with its lease"
            ),
        }
    }
}

#[derive(Debug)]
struct RedisLock {
    shared: Arc<LockShared>,
}

impl RedisLock {
    /// Runs the acquire script once. The script runs in a task of its own, so a grant whose
    /// caller has gone is released ([`Grant`]), and a request that failed in a way that may still
    /// reach the server is abandoned: released with a tombstone, so that the request, should it
    /// arrive after the release (it may, on its old connection), is refused.
    async fn attempt(&self, token: &str, lease_ms: u64, record: &str) -> Result<Attempt, Error> {
        let shared = self.shared.clone();
        let token = token.to_owned();
        let record = record.to_owned();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let max_ms = shared
                .max_lease_ms
                .max(shared.seen_max_ms.load(Ordering::Relaxed));
            let mut tries = 0;
            let res = loop {
                tries += 1;
                let res = shared
                    .lease
                    .run("acquire", COMMAND_TIMEOUT, |mut c| {
                        let keys = shared.keys.clone();
                        let token = token.clone();
                        let record = record.clone();
                        let allow = if shared.allow_eviction { "1" } else { "0" };
                        async move {
                            ACQUIRE
                                .key(&keys.lock)
                                .key(&keys.holder)
                                .key(&keys.term)
                                .key(&keys.lease)
                                .key(keys.abandoned(&token))
                                .arg(&token)
                                .arg(lease_ms)
                                .arg(&record)
                                .arg(max_ms)
                                .arg(&keys.channel)
                                .arg(allow)
                                .arg(lease_ms_of(RESTART_GUARD))
                                .invoke_async::<Vec<String>>(&mut c)
                                .await
                        }
                    })
                    .await;
                // The first command on a connection that broke while idle (e.g. after a Redis
                // restart) fails; try once more on a fresh one. Safe: the script is idempotent
                // for one token.
                match res {
                    Err(err) if tries < 2 && is_connection_error(&err) => continue,
                    res => break res.and_then(|reply| parse_reply(&reply)),
                }
            };
            let res = match res {
                Ok(Reply::Granted { term, max_ms }) => {
                    if let Some(max) = max_ms {
                        shared.seen_max_ms.fetch_max(max, Ordering::Relaxed);
                    }
                    Ok(Ok(Attempt::Granted(Grant {
                        shared: shared.clone(),
                        token: Some(token.clone()),
                        term,
                    })))
                }
                Ok(Reply::Held { pttl_ms, lease_ms }) => {
                    Ok(Ok(Attempt::Held { pttl_ms, lease_ms }))
                }
                Ok(Reply::Wait(ms)) => Ok(Ok(Attempt::Wait(ms))),
                Ok(Reply::Policy(policy)) => Ok(Err(Error::backend_msg(
                    NAME,
                    format!(
                        "lock {:?}: the server's maxmemory-policy is {policy}, which may evict \
                         the lock's keys; set maxmemory-policy noeviction, or allow eviction \
                         with RedisBackend::allow_eviction(true)",
                        shared.name
                    ),
                ))),
                Ok(Reply::TooLong(max)) => Ok(Err(Error::Config(ConfigError::InvalidTiming {
                    setting: "lease",
                    value: Duration::from_millis(lease_ms),
                    rule: format!(
                        "must not exceed the maximum lease recorded for lock {:?} ({max} ms)",
                        shared.name
                    ),
                }))),
                Ok(Reply::Abandoned) => Err(Error::backend_msg(
                    NAME,
                    "acquire: this acquisition was abandoned",
                )),
                Err(err) => Err(err),
            };
            match res {
                // An answer: the request is done. A grant nobody takes releases itself.
                Ok(answer) => {
                    let _ = tx.send(answer);
                }
                // The request may still reach the server: make sure it grants nothing.
                Err(err) => {
                    let _ = tx.send(Err(err));
                    let _ = release(&shared, &token, true).await;
                }
            }
        });
        rx.await
            .map_err(|_| Error::backend_msg(NAME, "acquire: the attempt's task ended"))?
    }
}

/// Whether `err` is a connection that broke (not a refusal by the server or a timeout).
fn is_connection_error(err: &Error) -> bool {
    let Error::Backend {
        source: Some(source),
        ..
    } = err
    else {
        return false;
    };
    source
        .downcast_ref::<RedisError>()
        .is_some_and(|e| e.is_io_error() || e.is_connection_dropped())
}

fn lease_ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn parse_reply(reply: &[String]) -> Result<Reply, Error> {
    let number = |s: &String| s.parse::<u64>().map_err(|_| unexpected("acquire", reply));
    match reply {
        [kind, term, rest @ ..] if kind == "granted" => Ok(Reply::Granted {
            term: parse_term("term", term)?,
            max_ms: rest.first().and_then(|m| m.parse().ok()),
        }),
        [kind, pttl, lease] if kind == "held" => Ok(Reply::Held {
            pttl_ms: pttl.parse().map_err(|_| unexpected("acquire", reply))?,
            lease_ms: lease.parse().ok(),
        }),
        [kind, ms, ..] if kind == "wait" => Ok(Reply::Wait(number(ms)?)),
        [kind, policy] if kind == "policy" => Ok(Reply::Policy(policy.clone())),
        [kind, max] if kind == "too_long" => Ok(Reply::TooLong(number(max)?)),
        [kind] if kind == "abandoned" => Ok(Reply::Abandoned),
        _ => Err(unexpected("acquire", reply)),
    }
}

/// Runs the release script (owner-checked, publishes `released`). `abandon` also leaves a
/// tombstone that refuses any later acquisition request with this token.
async fn release(shared: &LockShared, token: &str, abandon: bool) -> Result<bool, Error> {
    let tombstone_ms = if abandon {
        lease_ms_of(ABANDONED_FOR)
    } else {
        0
    };
    shared
        .lease
        .run("release", COMMAND_TIMEOUT, |mut c| {
            let keys = shared.keys.clone();
            let token = token.to_owned();
            async move {
                RELEASE
                    .key(&keys.lock)
                    .key(&keys.holder)
                    .key(&keys.lease)
                    .key(keys.abandoned(&token))
                    .arg(&token)
                    .arg(&keys.channel)
                    .arg(tombstone_ms)
                    .invoke_async::<i64>(&mut c)
                    .await
            }
        })
        .await
        .map(|n| n == 1)
}

impl Lock for RedisLock {
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
        Box::pin(async move {
            let lease = req.lease.unwrap_or_default();
            lease.validate(MIN_LEASE)?;
            let ms = lease_ms(lease.ttl());
            if ms > self.shared.max_lease_ms {
                return Err(Error::Config(ConfigError::InvalidTiming {
                    setting: "lease",
                    value: lease.ttl(),
                    rule: format!(
                        "must not exceed the Redis backend's maximum lease ({} ms; see \
                         RedisBackend::with_max_lease)",
                        self.shared.max_lease_ms
                    ),
                }));
            }
            self.shared.ensure_subscriber();
            let token = new_token();
            let mut record = req.holder(0);
            let record_json = serde_json::to_string(&record)
                .map_err(|e| Error::backend(NAME, "encode the holder record", e))?;
            let poll = lease.ttl();
            let mut told_restart = false;
            loop {
                let mut changed = self.shared.events.holder.subscribe();
                let sent = Sent {
                    at: req.clock.now(),
                    instant: Instant::now(),
                };
                match self.attempt(&token, ms, &record_json).await? {
                    Attempt::Granted(grant) => {
                        let (token, term) = grant.take();
                        record.term = term;
                        return Ok(Box::new(RedisLeadership::start(
                            self.shared.clone(),
                            token,
                            term,
                            record,
                            lease,
                            req.clock,
                            sent,
                        )) as Box<dyn Leadership>);
                    }
                    Attempt::Wait(ms) => {
                        if !told_restart && ms >= 1000 {
                            told_restart = true;
                            tracing::info!(
                                lock = %self.shared.name,
                                wait_ms = ms,
                                "waiting until an earlier holder whose lock key may have been \
                                 lost (Redis restarted, flushed, or the key deleted or evicted) \
                                 has passed its lease"
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(ms.saturating_add(1))).await;
                    }
                    Attempt::Held {
                        pttl_ms,
                        lease_ms: theirs,
                    } => {
                        if let Some(theirs) = theirs.filter(|t| *t != ms) {
                            return Err(Error::Config(ConfigError::InvalidTiming {
                                setting: "lease",
                                value: lease.ttl(),
                                rule: format!(
                                    "must equal the lease of the current holder of lock {:?} \
                                     ({theirs} ms): all nodes of a lock must use the same lease",
                                    self.shared.name
                                ),
                            }));
                        }
                        // Wake when the holder's key runs out (a crash costs the lease, not the
                        // lease plus a poll), on a release or key event, or on the slow poll.
                        let until_expiry = u64::try_from(pttl_ms)
                            .map_or(poll, |ms| Duration::from_millis(ms.saturating_add(1)));
                        tokio::select! {
                            _ = changed.changed() => {}
                            () = tokio::time::sleep(until_expiry.min(poll)) => {}
                        }
                    }
                }
            }
        })
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
        Box::pin(async move {
            let (record, term) = self
                .shared
                .commands
                .run("read the holder", COMMAND_TIMEOUT, |mut c| {
                    let key = self.shared.keys.holder.clone();
                    async move {
                        ::redis::cmd("HMGET")
                            .arg(&key)
                            .arg("record")
                            .arg("term")
                            .query_async::<(Option<String>, Option<String>)>(&mut c)
                            .await
                    }
                })
                .await?;
            let (Some(record), Some(term)) = (record, term) else {
                return Ok(None);
            };
            let mut holder: Holder = serde_json::from_str(&record).map_err(|e| Error::Corrupt {
                backend: NAME,
                what: format!("holder record of lock {:?}", self.shared.name),
                problem: e.to_string(),
            })?;
            holder.term = parse_term("holder term", &term)?;
            Ok(Some(holder))
        })
    }

    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            self.shared.ensure_subscriber();
            let rx = self.shared.events.holder.subscribe();
            self.shared.events.wait_live(&self.shared.name).await?;
            Ok(Box::new(VersionChanges(rx)) as Box<dyn Changes>)
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
        Box::pin(async move {
            super::validate_key(key)?;
            let (value, term) = self
                .shared
                .commands
                .run("load", COMMAND_TIMEOUT, |mut c| {
                    let k = self.shared.keys.state(key);
                    async move {
                        ::redis::cmd("HMGET")
                            .arg(&k)
                            .arg("value")
                            .arg("term")
                            .query_async::<(Option<Vec<u8>>, Option<String>)>(&mut c)
                            .await
                    }
                })
                .await?;
            match (value, term) {
                (Some(value), Some(term)) => {
                    Ok(Some(Stored::new(value, parse_term("state term", &term)?)))
                }
                _ => Ok(None),
            }
        })
    }

    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            super::validate_key(key)?;
            let stale = |current: Option<u64>| Error::StaleTerm {
                lock: self.shared.name.clone(),
                term,
                current,
            };
            let Some(token) = crate::sync::lock(&self.shared.tokens).get(&term).cloned() else {
                return Err(stale(None));
            };
            let reply = self
                .shared
                .commands
                .run("store", COMMAND_TIMEOUT, |mut c| {
                    let keys = self.shared.keys.clone();
                    async move {
                        STORE
                            .key(&keys.lock)
                            .key(&keys.holder)
                            .key(keys.state(key))
                            .arg(&token)
                            .arg(term)
                            .arg(value)
                            .arg(&keys.channel)
                            .arg(key)
                            .invoke_async::<Vec<String>>(&mut c)
                            .await
                    }
                })
                .await?;
            match reply.as_slice() {
                [ok] if ok == "ok" => Ok(()),
                [kind, current] if kind == "stale" => Err(stale(current.parse().ok())),
                _ => Err(unexpected("store", &reply)),
            }
        })
    }

    fn watch_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            super::validate_key(key)?;
            self.shared.ensure_subscriber();
            let rx = self.shared.events.watch_state(key);
            self.shared.events.wait_live(&self.shared.name).await?;
            Ok(Box::new(VersionChanges(rx)) as Box<dyn Changes>)
        })
    }
}

/// When a request was sent: on the request's clock (for the deadline) and on tokio's (for timers).
#[derive(Clone, Copy)]
struct Sent {
    at: Timestamp,
    instant: Instant,
}

/// Holding the lock: one term, renewed by a task of its own.
struct RedisLeadership {
    shared: Arc<LockShared>,
    token: String,
    term: u64,
    record: Holder,
    renewals: Renewals,
    lost: watch::Receiver<Option<String>>,
    task: JoinHandle<()>,
}

impl fmt::Debug for RedisLeadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLeadership")
            .field("lock", &self.shared.name)
            .field("term", &self.term)
            .finish_non_exhaustive()
    }
}

impl RedisLeadership {
    fn start(
        shared: Arc<LockShared>,
        token: String,
        term: u64,
        record: Holder,
        lease: Lease,
        clock: Clock,
        sent: Sent,
    ) -> Self {
        crate::sync::lock(&shared.tokens).insert(term, token.clone());
        let (tx, renewals) = renewals(sent.at);
        let (lost_tx, lost) = watch::channel(None);
        let task = tokio::spawn(renew(
            shared.clone(),
            token.clone(),
            lease,
            clock,
            tx,
            lost_tx,
            sent,
        ));
        RedisLeadership {
            shared,
            token,
            term,
            record,
            renewals,
            lost,
            task,
        }
    }

    /// Stops renewing and forgets the term.
    fn stop(&mut self) {
        self.task.abort();
        crate::sync::lock(&self.shared.tokens).remove(&self.term);
    }
}

/// The renewal loop: every `lease / 3`, and at once when the holder may have changed. Transient
/// errors are retried quickly until the deadline; a refusal or a passed deadline ends the term.
async fn renew(
    shared: Arc<LockShared>,
    token: String,
    lease: Lease,
    clock: Clock,
    tx: RenewalSender,
    lost: watch::Sender<Option<String>>,
    acquired: Sent,
) {
    let every = lease.renew_every();
    let ms = lease_ms(lease.ttl());
    let attempt_limit = every.clamp(Duration::from_millis(100), COMMAND_TIMEOUT);
    let mut changed = shared.events.holder.subscribe();
    let mut confirmed = acquired.at;
    let mut next = acquired.instant + every;
    let mut retry = Duration::from_millis(25);
    loop {
        let deadline = lease.deadline_after(confirmed);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = tokio::time::sleep_until(clock.to_tokio_instant(deadline)) => {}
            _ = changed.changed() => {}
        }
        if tx.is_closed() {
            return;
        }
        if clock.now() >= deadline {
            let _ = lost.send(Some(
                "no renewal was confirmed before the lease deadline".to_owned(),
            ));
            return;
        }
        let sent = clock.now();
        let sent_at = Instant::now();
        let res = shared
            .lease
            .run("renew", attempt_limit, |mut c| {
                let keys = shared.keys.clone();
                let token = token.clone();
                async move {
                    RENEW
                        .key(&keys.lock)
                        .key(&keys.holder)
                        .key(&keys.lease)
                        .arg(&token)
                        .arg(ms)
                        .invoke_async::<i64>(&mut c)
                        .await
                }
            })
            .await;
        match res {
            Ok(1) => {
                tx.confirm(sent);
                confirmed = confirmed.max(sent);
                next = sent_at + every;
                retry = Duration::from_millis(25);
            }
            Ok(_) => {
                let _ = lost.send(Some(
                    "the lock key is gone or held by another node (expired, deleted, or Redis \
                     restarted without its data)"
                        .to_owned(),
                ));
                return;
            }
            Err(err) => {
                tracing::debug!(lock = %shared.name, error = %err, retry_in = ?retry, "renewal failed; retrying");
                next = Instant::now() + retry;
                retry = (retry * 2).min(Duration::from_millis(200));
            }
        }
    }
}

impl Leadership for RedisLeadership {
    fn term(&self) -> u64 {
        self.term
    }

    fn holder(&self) -> &Holder {
        &self.record
    }

    fn renewals(&self) -> Option<Renewals> {
        Some(self.renewals.clone())
    }

    fn lost(&mut self) -> BoxFuture<'_, Error> {
        Box::pin(async move {
            let reason = self
                .lost
                .wait_for(Option::is_some)
                .await
                .map(|r| r.clone().unwrap_or_default());
            match reason {
                Ok(reason) => self.shared.lost_msg(reason),
                // The renewal task ended without a loss (released): nothing more to report.
                Err(_) => std::future::pending().await,
            }
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            self.stop();
            let mut delay = Duration::from_millis(50);
            let mut tries = 0;
            loop {
                match release(&self.shared, &self.token, false).await {
                    Ok(_) => return Ok(()),
                    Err(err) if tries >= 2 => return Err(err),
                    Err(_) => {
                        tries += 1;
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        })
    }
}

impl Drop for RedisLeadership {
    fn drop(&mut self) {
        // Dropped without release (the process or its runtime is going away): stop renewing and
        // let the lease run out, as after a crash. The elector always releases explicitly.
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_crate_parameters_and_passwords_to_themselves() {
        let b = RedisBackend::new("redis://u:hunter2@127.0.0.1:6380/3?prefix=app.1").unwrap();
        assert_eq!(b.prefix(), "app.1");
        let info = b.client.get_connection_info();
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.redis_settings().password(), Some("hunter2"));
        assert!(!format!("{b:?}").contains("hunter2"));

        for bad in [
            "redis://u:hunter2@h/1?lease=5s",
            "redis://u:hunter2@h/1?nope=1",
            "redis://u:hunter2@h/1?prefix=a{b}",
            "redis://u:hunter2@h/notadb",
            "http://u:hunter2@h/1",
        ] {
            let err = RedisBackend::new(bad).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{bad}: {err}");
            assert!(err.starts_with("invalid backend string"), "{bad}: {err}");
        }
        assert_eq!(
            RedisBackend::new("rediss://h:6379").unwrap().prefix(),
            DEFAULT_PREFIX
        );
    }

    #[test]
    fn keys_share_one_hash_tag_and_name_the_database() {
        let b = RedisBackend::new("redis://h/2?prefix=p").unwrap();
        let k = Keys::new("p", "jobs", b.client.get_connection_info());
        assert_eq!(k.lock, "{p:jobs}:lock");
        assert_eq!(k.holder, "{p:jobs}:holder");
        assert_eq!(k.term, "{p:jobs}:term");
        assert_eq!(k.lease, "{p:jobs}:lease");
        assert_eq!(k.abandoned("t0"), "{p:jobs}:abandoned:t0");
        assert_eq!(k.state("x.y"), "{p:jobs}:state:x.y");
        assert_eq!(k.channel, "{p:jobs}:events");
        assert_eq!(k.keyspace, "__keyspace@2__:{p:jobs}:lock");
        assert_eq!(k.keyevent, "__keyevent@2__:expired");
    }

    #[test]
    fn tokens_are_random_and_leases_round_up() {
        let a = new_token();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_token());
        assert_eq!(lease_ms(Duration::from_micros(1_500_001)), 1501);
        assert_eq!(lease_ms(Duration::from_secs(2)), 2000);
    }

    #[test]
    fn acquire_replies_are_parsed() {
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(matches!(
            parse_reply(&s(&["granted", "1796022380000063", "30000"])),
            Ok(Reply::Granted {
                term: 1_796_022_380_000_063,
                max_ms: Some(30_000)
            })
        ));
        assert!(matches!(
            parse_reply(&s(&["granted", "7", ""])),
            Ok(Reply::Granted {
                term: 7,
                max_ms: None
            })
        ));
        assert!(matches!(
            parse_reply(&s(&["held", "1234", "2000"])),
            Ok(Reply::Held {
                pttl_ms: 1234,
                lease_ms: Some(2000)
            })
        ));
        assert!(matches!(
            parse_reply(&s(&["held", "-1", ""])),
            Ok(Reply::Held {
                pttl_ms: -1,
                lease_ms: None
            })
        ));
        assert!(matches!(
            parse_reply(&s(&["wait", "900"])),
            Ok(Reply::Wait(900))
        ));
        assert!(matches!(
            parse_reply(&s(&["policy", "volatile-lru"])),
            Ok(Reply::Policy(p)) if p == "volatile-lru"
        ));
        assert!(matches!(
            parse_reply(&s(&["too_long", "5000"])),
            Ok(Reply::TooLong(5000))
        ));
        assert!(matches!(
            parse_reply(&s(&["abandoned"])),
            Ok(Reply::Abandoned)
        ));
        assert!(parse_reply(&s(&["what"])).is_err());
        assert!(parse_reply(&s(&["wait", "soon"])).is_err());
    }

    #[test]
    fn max_lease_comes_from_the_url_or_the_builder() {
        let b = RedisBackend::new("redis://h/1").unwrap();
        assert_eq!(b.max_lease(), Some(DEFAULT_MAX_LEASE));
        let b = RedisBackend::new("redis://h/1?max_lease=2500ms&prefix=x").unwrap();
        assert_eq!(b.max_lease(), Some(Duration::from_millis(2500)));
        for bad in ["redis://h/1?max_lease=500ms", "redis://h/1?max_lease=soon"] {
            let err = RedisBackend::new(bad).unwrap_err().to_string();
            assert!(err.contains("max_lease"), "{bad}: {err}");
        }
        assert!(b.clone().with_max_lease(Duration::from_millis(10)).is_err());
        assert_eq!(
            b.with_max_lease(Duration::from_secs(9))
                .unwrap()
                .max_lease(),
            Some(Duration::from_secs(9))
        );
    }
}
