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
//! | `{p:name}:state:<key>` | hash | `value`, `term` of a state value |
//! | `{p:name}:events` | channel | `acquired <term>`, `released <term>`, `state <key>` |
//!
//! - **Acquire** is one Lua script: `SET lock token NX PX lease`; on success the term becomes
//!   `max(last term + 1, server TIME in µs)`, the holder hash is written and `acquired` is
//!   published. Terms therefore rise even when Redis restarts empty (a plain `INCR` would start at
//!   1 again), as long as the Redis host's wall clock does not step back and fewer than a million
//!   terms are issued per second.
//! - **No overlap after a Redis restart.** The script refuses to grant while the server's uptime is
//!   below the lease + 1 s. A holder whose key vanished in the restart has, by then, passed its own
//!   deadline (its last renewal was confirmed by the old server) and fenced itself. This needs
//!   every node of a lock to use the same lease: a node whose lease differs from the current
//!   holder's refuses to acquire, with an error naming both.
//! - **Renewal** runs inside the backend every `lease / 3`, on a connection of its own, as an
//!   owner-checked script (`PEXPIRE` only if the token is still ours). Each confirmed renewal is
//!   reported with its send time, from which the elector computes the deadline. Transient errors
//!   (the first command after a Redis restart fails) are retried quickly until the deadline; a
//!   refusal (the key is gone or someone else's) ends the term at once.
//! - **Release** is an owner-checked script that deletes the keys and publishes `released`.
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
//! `redis://[user:pass@]host:port[/db][?prefix=p]`, or `rediss://…` for TLS (rustls, with the
//! system's root certificates). `prefix` is removed before the URL reaches the Redis driver.
//!
//! # What is not guaranteed
//!
//! One Redis primary is assumed. Replication is asynchronous: a failover to a replica (Sentinel,
//! Cluster) can lose the lock key without the uptime reset this backend watches for, and two nodes
//! can then be primary until the old one's next renewal. Key expiry follows the Redis host's wall
//! clock; a forward step there shortens every lease (keep the margin, use slewing NTP). Settings
//! made with `CONFIG SET` are lost when Redis restarts; the backend sets key events again when it
//! reconnects. As with every lease, a paused holder resumes not primary, but work it already
//! started must carry the term to be refused downstream.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
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
use crate::clock::{Clock, Timestamp};
use crate::elector::Lease;
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
/// Extra uptime, beyond the lease, that Redis must have before a lock is granted.
const RESTART_GUARD: Duration = Duration::from_secs(1);

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
    commands: Arc<Conn>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.shown)
            .field("prefix", &self.prefix)
            .field("key_events", &self.key_events)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A backend for the server at `url`: `redis://[user:pass@]host:port[/db][?prefix=p]` or
    /// `rediss://…` (TLS). Nothing is connected until a lock is used.
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
        let mut passed = Vec::new();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "prefix" => prefix = v.to_owned(),
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
        let client = Client::open(driver_url.as_str()).map_err(|e| {
            let mut msg = e.to_string();
            if let Some(pw) = password_of(url).filter(|p| !p.is_empty()) {
                msg = msg.replace(pw, "***");
            }
            invalid(msg)
        })?;
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

/// The password in a URL's user info, to keep it out of error messages.
fn password_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    userinfo.split_once(':').map(|(_, p)| p)
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn min_lease(&self) -> Option<Duration> {
        Some(MIN_LEASE)
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
            state: format!("{tag}:state:"),
            channel: format!("{tag}:events"),
            lock,
        }
    }

    fn state(&self, key: &str) -> String {
        format!("{}{key}", self.state)
    }
}

fn lock_mutex<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section in this file leaves its value consistent before it can panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let mut slot = lock_mutex(&self.manager);
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
        *lock_mutex(&self.manager) = None;
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

/// KEYS: lock, holder, term. ARGV: token, lease ms, record JSON, minimum uptime ms, channel.
/// Returns `{"granted", term}`, `{"held", pttl, holder lease ms}` or `{"wait", ms}`.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NEWER}{}",
        r"
local info = redis.call('INFO', 'server')
local up = tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) or 0
local wait = tonumber(ARGV[4]) - up * 1000
if wait > 0 then return {'wait', tostring(wait)} end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('GET', KEYS[1]) == ARGV[1] then
    -- Granted by an earlier try of this acquisition whose reply was lost.
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
    return {'granted', redis.call('HGET', KEYS[2], 'term')}
  end
  return {'held', tostring(redis.call('PTTL', KEYS[1])), redis.call('HGET', KEYS[2], 'lease_ms') or ''}
end
local t = redis.call('TIME')
local now = t[1] .. string.format('%06d', tonumber(t[2]))
local last = redis.call('GET', KEYS[3])
if last and not newer(now, last) then
  redis.call('INCR', KEYS[3])
else
  redis.call('SET', KEYS[3], now)
end
local term = redis.call('GET', KEYS[3])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'token', ARGV[1], 'term', term, 'lease_ms', ARGV[2], 'record', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[5], 'acquired ' .. term)
return {'granted', term}
"
    ))
});

/// KEYS: lock, holder. ARGV: token, lease ms. Returns 1 if renewed, 0 if not ours.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
",
    )
});

/// KEYS: lock, holder. ARGV: token, channel. Returns 1 if released, 0 if not ours.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local term = redis.call('HGET', KEYS[2], 'term') or ''
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('PUBLISH', ARGV[2], 'released ' .. term)
  return 1
end
return 0
",
    )
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
        let mut slot = lock_mutex(&self.subscriber);
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
        let mut state = lock_mutex(&self.state);
        state.retain(|_, tx| tx.receiver_count() > 0);
        for (k, tx) in state.iter() {
            if key.is_none_or(|key| key == k) {
                tx.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    fn watch_state(&self, key: &str) -> watch::Receiver<u64> {
        lock_mutex(&self.state)
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
    Granted(u64),
    Held { pttl_ms: i64, lease_ms: Option<u64> },
    Wait(u64),
}

#[derive(Debug)]
struct RedisLock {
    shared: Arc<LockShared>,
}

impl RedisLock {
    /// Runs the acquire script once. The script runs in a task of its own, so a grant whose
    /// caller has gone (or that failed in a way that may have reached the server) is released.
    async fn attempt(&self, token: &str, lease_ms: u64, record: &str) -> Result<Attempt, Error> {
        let shared = self.shared.clone();
        let token = token.to_owned();
        let record = record.to_owned();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let min_uptime = lease_ms.saturating_add(lease_ms_of(RESTART_GUARD));
            let mut tries = 0;
            let res = loop {
                tries += 1;
                let res = shared
                    .lease
                    .run("acquire", COMMAND_TIMEOUT, |mut c| {
                        let keys = shared.keys.clone();
                        let token = token.clone();
                        let record = record.clone();
                        async move {
                            ACQUIRE
                                .key(&keys.lock)
                                .key(&keys.holder)
                                .key(&keys.term)
                                .arg(&token)
                                .arg(lease_ms)
                                .arg(&record)
                                .arg(min_uptime)
                                .arg(&keys.channel)
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
                    res => break res.and_then(|reply| parse_attempt(&reply)),
                }
            };
            let failed = res.is_err();
            let abandoned = match tx.send(res) {
                Ok(()) => failed,
                Err(res) => matches!(res, Ok(Attempt::Granted(_)) | Err(_)),
            };
            if abandoned {
                // Nobody will hold this token: make sure the server does not either.
                let _ = release(&shared, &token).await;
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

fn parse_attempt(reply: &[String]) -> Result<Attempt, Error> {
    match reply {
        [kind, term, ..] if kind == "granted" => Ok(Attempt::Granted(parse_term("term", term)?)),
        [kind, pttl, lease] if kind == "held" => Ok(Attempt::Held {
            pttl_ms: pttl.parse().map_err(|_| unexpected("acquire", reply))?,
            lease_ms: lease.parse().ok(),
        }),
        [kind, ms, ..] if kind == "wait" => Ok(Attempt::Wait(
            ms.parse().map_err(|_| unexpected("acquire", reply))?,
        )),
        _ => Err(unexpected("acquire", reply)),
    }
}

/// Runs the release script (owner-checked, publishes `released`).
async fn release(shared: &LockShared, token: &str) -> Result<bool, Error> {
    shared
        .lease
        .run("release", COMMAND_TIMEOUT, |mut c| {
            let keys = shared.keys.clone();
            let token = token.to_owned();
            async move {
                RELEASE
                    .key(&keys.lock)
                    .key(&keys.holder)
                    .arg(&token)
                    .arg(&keys.channel)
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
                    Attempt::Granted(term) => {
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
                        if !told_restart {
                            told_restart = true;
                            tracing::info!(
                                lock = %self.shared.name,
                                wait_ms = ms,
                                "Redis started less than the lease + 1 s ago; waiting so that an \
                                 earlier holder whose key was lost has fenced itself"
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(ms)).await;
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
            let Some(token) = lock_mutex(&self.shared.tokens).get(&term).cloned() else {
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
        lock_mutex(&shared.tokens).insert(term, token.clone());
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
        lock_mutex(&self.shared.tokens).remove(&self.term);
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
                match release(&self.shared, &self.token).await {
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
    fn attempt_replies_are_parsed() {
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(matches!(
            parse_attempt(&s(&["granted", "1796022380000063"])),
            Ok(Attempt::Granted(1_796_022_380_000_063))
        ));
        assert!(matches!(
            parse_attempt(&s(&["held", "1234", "2000"])),
            Ok(Attempt::Held {
                pttl_ms: 1234,
                lease_ms: Some(2000)
            })
        ));
        assert!(matches!(
            parse_attempt(&s(&["held", "-1", ""])),
            Ok(Attempt::Held {
                pttl_ms: -1,
                lease_ms: None
            })
        ));
        assert!(matches!(
            parse_attempt(&s(&["wait", "900"])),
            Ok(Attempt::Wait(900))
        ));
        assert!(parse_attempt(&s(&["what"])).is_err());
    }
}
