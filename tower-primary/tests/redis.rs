//! The Redis backend against real `redis-server`s: the conformance suite, the backend's own
//! behaviour (terms across a restart, the restart guard, lease mismatch, the lease record and
//! maximum lease, eviction refused, waking on expiry, acquisitions abandoned or dropped while
//! their request is in flight, resuming a lease from another process, the candidate registry and
//! reservations, with their timings), and fault tests with real node processes (SIGKILL, SIGTERM,
//! SIGSTOP, Redis killed and restarted empty also during a lease change, `FLUSHALL`, a deleted
//! lock key, a stalled TCP proxy).
//!
//! Every test starts its own `redis-server` on a free port
//! ([`RedisServer`](tower_primary_lab::servers::RedisServer)) and uses its own key prefix
//! and lock names; tests that start node processes or kill servers take a shared lock and run one
//! at a time. Without `redis-server` the tests print `SKIPPED` (or fail when
//! `TOWER_PRIMARY_REQUIRE_BACKENDS=1`).
//!
//! The process tests re-execute this binary in node mode (`tower_primary_lab::node`); times
//! are printed (`--nocapture`), and only order and the absence of overlap are asserted, with
//! bounds of several leases.
//!
//! ```text
//! cargo test --features redis --test redis -- --nocapture
//! ```
#![cfg(feature = "redis")]

mod common;

use common::ms;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio::time::Instant;
use tower_primary::backend::redis::{KeyEvents, RedisBackend};
use tower_primary::backend::{AcquireRequest, Backend, Candidate, Changes, Leadership, Lock};
use tower_primary::{Clock, Elector, Error, Lease, Misconfiguration, NodeId, TermContext};
use tower_primary_lab::node::{Cluster, EventKind, NodeCommand, NodeConfig, NodeSignal};
use tower_primary_lab::proxy::TcpProxy;
use tower_primary_lab::servers::{self, RedisServer};
use tower_primary_testing::conformance::{Connection, Fault, FaultHooks, Fixture};
use tower_primary_testing::history::History;

/// Bounds a broken run only; elections take milliseconds to a lease.
const WAIT: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::const_new(());

/// A key prefix of its own for every test (and run).
fn prefix(test: &str) -> String {
    format!(
        "t-{test}-{}-{:x}",
        std::process::id(),
        tower_primary::clock::monotonic_nanos()
    )
}

async fn redis() -> Option<RedisServer> {
    servers::require("redis-server", RedisServer::start().await)
}

/// The maximum lease the tests give their backends (a fresh server or lock waits it once).
const MAX_LEASE: Duration = Duration::from_secs(2);

/// `&max_lease=<ms>ms`: the backend-string parameter for a maximum lease of `max`.
fn max_lease_param(max: Duration) -> String {
    format!("&max_lease={}ms", max.as_millis())
}

fn backend(server: &RedisServer, prefix: &str) -> RedisBackend {
    backend_at(&server.url(), prefix)
}

fn backend_at(url: &str, prefix: &str) -> RedisBackend {
    RedisBackend::new(&format!(
        "{url}/0?prefix={prefix}{}",
        max_lease_param(MAX_LEASE)
    ))
    .unwrap()
}

fn request(node: &str, lease: Duration) -> AcquireRequest {
    AcquireRequest::new(NodeId::new(node))
        .with_lease(Some(Lease::new(lease)))
        .with_clock(Clock::system())
}

/// A plain command on a direct connection (the test's view of the server).
async fn command<T: redis::FromRedisValue>(server: &RedisServer, cmd: &redis::Cmd) -> T {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// Waits until the server has been up for `lease + 1 s`, so that the restart guard lets
/// acquisitions through (a fresh server refuses them for the maximum lease + 1 s).
async fn wait_uptime(server: &RedisServer, lease: Duration) {
    let need = lease + Duration::from_secs(1);
    loop {
        let info: String = command(server, redis::cmd("INFO").arg("server")).await;
        let up = info
            .lines()
            .find_map(|l| l.strip_prefix("uptime_in_seconds:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if Duration::from_secs(up) >= need {
            return;
        }
        tokio::time::sleep(need - Duration::from_secs(up)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The conformance suite

/// One `redis-server` per check; every node reaches it through a TCP proxy of its own, so a
/// fault hits one node only.
struct RedisFixture {
    server: RedisServer,
    prefix: String,
    proxies: Vec<Arc<TcpProxy>>,
    next: AtomicUsize,
}

impl RedisFixture {
    async fn start() -> Option<Self> {
        let server = redis().await?;
        let mut proxies = Vec::new();
        for _ in 0..12 {
            proxies.push(Arc::new(TcpProxy::start(server.addr()).await.unwrap()));
        }
        Some(RedisFixture {
            prefix: prefix("conformance"),
            server,
            proxies,
            next: AtomicUsize::new(0),
        })
    }
}

impl Fixture for RedisFixture {
    fn connect(&self) -> Connection {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let Some(proxy) = self.proxies.get(i) else {
            return Connection::new(backend(&self.server, &self.prefix));
        };
        let url = format!(
            "redis://{}/0?prefix={}{}",
            proxy.addr(),
            self.prefix,
            max_lease_param(MAX_LEASE)
        );
        Connection::new(RedisBackend::new(&url).unwrap()).with_faults(ProxyFaults {
            proxy: proxy.clone(),
            server: self.server.url(),
            prefix: self.prefix.clone(),
        })
    }

    fn lease(&self) -> Option<Lease> {
        Some(Lease::new(Duration::from_secs(1)))
    }
}

/// Faults through the node's proxy: `Fail` stalls every byte (calls time out), healing drops the
/// held bytes and the connections; `LoseLocks` deletes the lock keys of the fixture's prefix
/// behind the holders' backs (the fixture's checks have one holder at that point).
#[derive(Debug)]
struct ProxyFaults {
    proxy: Arc<TcpProxy>,
    server: String,
    prefix: String,
}

impl FaultHooks for ProxyFaults {
    fn supports(&self, fault: Fault) -> bool {
        matches!(fault, Fault::Fail | Fault::LoseLocks)
    }

    fn inject(&self, fault: Fault) {
        match fault {
            Fault::Fail => self.proxy.stall(),
            Fault::LoseLocks => {
                let client = redis::Client::open(self.server.as_str()).unwrap();
                let mut conn = client.get_connection().unwrap();
                let locks: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{{{}:*}}:lock", self.prefix))
                    .query(&mut conn)
                    .unwrap();
                for lock in locks {
                    let holder = lock.replace("}:lock", "}:holder");
                    let () = redis::cmd("DEL")
                        .arg(&lock)
                        .arg(&holder)
                        .query(&mut conn)
                        .unwrap();
                }
            }
            _ => {}
        }
    }

    fn heal(&self, fault: Fault) {
        if fault == Fault::Fail {
            self.proxy.cut();
            self.proxy.resume();
        }
    }
}

mod conformance {
    use super::RedisFixture;

    tower_primary_testing::conformance_tests!(match RedisFixture::start().await {
        Some(fixture) => fixture,
        None => return,
    });
}

// ---------------------------------------------------------------------------------------------
// The backend's own behaviour

#[tokio::test]
async fn backend_strings_reach_redis_with_database_and_prefix() {
    let Some(server) = redis().await else { return };
    let prefix = prefix("strings");
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let backend =
        tower_primary::backend::from_url(&format!("{}/3?prefix={prefix}", server.url())).unwrap();
    assert_eq!(backend.name(), "redis");
    assert_eq!(backend.min_lease(), Some(Duration::from_secs(1)));
    let lock = backend.lock("jobs").unwrap();
    let held = lock.acquire(request("a", lease)).await.unwrap();

    let key = format!("{{{prefix}:jobs}}:lock");
    let in_db3: i64 = command(&server, redis::cmd("EXISTS").arg(&key).arg("ignored")).await;
    assert_eq!(in_db3, 0, "the lock was written to database 0");
    let client = redis::Client::open(format!("{}/3", server.url())).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let token: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(token.map(|t| t.len()), Some(32), "a 128-bit hex token");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 1000, "PX lease: {pttl}");

    let holder = lock.holder().await.unwrap().expect("a holder");
    assert_eq!(holder.id, "a");
    assert_eq!(holder.term, held.term());
    assert_eq!(holder.lease_ms, Some(1000));
    held.release().await.unwrap();
    assert_eq!(lock.holder().await.unwrap(), None);
    let gone: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(gone, 0);
}

#[tokio::test]
async fn rediss_speaks_tls_and_fails_closed_on_a_plain_server() {
    let Some(server) = redis().await else { return };
    let url = server.url().replace("redis://", "rediss://");
    let lock = RedisBackend::new(&format!("{url}?prefix={}", prefix("tls")))
        .unwrap()
        .lock("tls")
        .unwrap();
    // A TLS handshake against a plain-text port fails: an error, never a panic or a grant.
    let res = tokio::time::timeout(WAIT, lock.acquire(request("a", Duration::from_secs(1))))
        .await
        .expect("an answer");
    let err = res.expect_err("a plain-text server cannot grant a TLS client");
    assert_eq!(err.misconfiguration(), Some(Misconfiguration::Tls), "{err}");
    assert!(lock.holder().await.is_err());
}

/// An error and its sources, as logs show them.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// Words of the driver's types that must never reach a message.
const DRIVER_NAMES: [&str; 6] = [
    "InvalidClientConfig",
    "AuthenticationFailed",
    "ResponseError",
    "Server(",
    "NoPerm",
    "- Io",
];

fn assert_our_words(text: &str) {
    for name in DRIVER_NAMES {
        assert!(!text.contains(name), "{name:?} in {text}");
    }
    assert_eq!(text.matches("redis backend").count(), 1, "{text}");
}

/// Acquires once (a short lease) and returns the error.
async fn acquire_error(url: &str, test: &str) -> Error {
    let lock = RedisBackend::new(&format!("{url}?prefix={}", prefix(test)))
        .unwrap()
        .lock(test)
        .unwrap();
    tokio::time::timeout(WAIT, lock.acquire(request("a", Duration::from_secs(1))))
        .await
        .expect("an answer, not a wait")
        .expect_err("no grant")
}

#[tokio::test]
async fn rediss_against_the_local_plain_redis_says_the_tls_handshake_failed() {
    let plain = std::net::TcpStream::connect("127.0.0.1:6379").map_err(|e| e.to_string());
    if servers::require("redis at 127.0.0.1:6379", plain).is_none() {
        return;
    }
    let err = acquire_error("rediss://127.0.0.1:6379", "tls6379").await;
    let text = chain(&err);
    assert_eq!(
        err.misconfiguration(),
        Some(Misconfiguration::Tls),
        "{text}"
    );
    assert!(
        matches!(
            &err,
            Error::Misconfigured {
                kind: Misconfiguration::Tls,
                ..
            }
        ),
        "{text}"
    );
    assert_eq!(
        text,
        "redis backend: TLS handshake failed: acquire: the server at 127.0.0.1:6379 answers \
         without TLS and may not speak TLS: use redis:// instead of rediss://, or enable TLS on \
         the server"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_backend_error_said_once() {
    let port = servers::free_port().unwrap();
    let err = acquire_error(&format!("redis://127.0.0.1:{port}"), "unreachable").await;
    let text = chain(&err);
    assert!(matches!(err, Error::Backend { .. }), "{text}");
    assert_eq!(err.misconfiguration(), None, "{text}");
    assert_eq!(
        text,
        "redis backend: acquire: Connection refused (os error 111)"
    );
    assert_our_words(&text);
}

#[tokio::test]
async fn a_wrong_or_missing_password_is_an_authentication_misconfiguration() {
    let Some(server) = servers::require(
        "redis-server",
        RedisServer::start_with(&["--requirepass", "secret"]).await,
    ) else {
        return;
    };
    let wrong = server.url().replace("redis://", "redis://:hunter2@");
    let err = acquire_error(&wrong, "wrongpass").await;
    let text = chain(&err);
    assert_eq!(
        err.misconfiguration(),
        Some(Misconfiguration::Authentication),
        "{text}"
    );
    assert_eq!(
        text,
        "redis backend: authentication failed: acquire: the server refused the user name or \
         password of the backend string: Password authentication failed"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert_our_words(&text);

    let err = acquire_error(&server.url(), "nopass").await;
    let text = chain(&err);
    assert_eq!(
        err.misconfiguration(),
        Some(Misconfiguration::Authentication),
        "{text}"
    );
    assert!(
        text.starts_with(
            "redis backend: authentication failed: acquire: the server requires a password; \
             give it in the backend string (redis://[user]:password@host)"
        ),
        "{text}"
    );
    assert_our_words(&text);
}

#[tokio::test]
async fn an_acl_refusal_is_a_permission_misconfiguration() {
    let Some(server) = servers::require(
        "redis-server",
        RedisServer::start_with(&["--user", "limited", "on", ">pw", "~elsewhere:*", "+@all"]).await,
    ) else {
        return;
    };
    let url = server.url().replace("redis://", "redis://limited:pw@");
    let err = acquire_error(&url, "noperm").await;
    let text = chain(&err);
    assert_eq!(
        err.misconfiguration(),
        Some(Misconfiguration::Permission),
        "{text}"
    );
    assert!(
        text.starts_with(
            "redis backend: permission denied: acquire: the server's ACL denies the backend \
             string's user a command or key the backend needs"
        ) && text.contains("NOPERM"),
        "{text}"
    );
    assert_our_words(&text);
}

#[tokio::test]
async fn a_database_index_out_of_range_is_a_missing_database() {
    let Some(server) = redis().await else { return };
    let err = acquire_error(&format!("{}/99", server.url()), "baddb").await;
    let text = chain(&err);
    assert_eq!(
        err.misconfiguration(),
        Some(Misconfiguration::MissingDatabase),
        "{text}"
    );
    assert_eq!(
        text,
        "redis backend: database does not exist: acquire: the server has no database 99 (see its \
         `databases` setting); choose another /db in the backend string: Redis server refused to \
         switch database: DB index is out of range"
    );
    assert_our_words(&text);
}

#[tokio::test]
async fn acquisition_waits_until_redis_has_been_up_longer_than_the_maximum_lease() {
    let Some(server) = redis().await else { return };
    let started = Instant::now();
    let lease = Duration::from_secs(1);
    let lock = backend(&server, &prefix("uptime")).lock("guarded").unwrap();
    let held = lock.acquire(request("a", lease)).await.unwrap();
    // A holder whose key vanished in a restart fences itself within its lease, at most the
    // maximum lease: nobody may be granted the lock before the server has been up for the
    // maximum lease + 1 s, whatever its own lease.
    assert!(
        started.elapsed() >= MAX_LEASE + Duration::from_secs(1),
        "granted {:?} after the server started",
        started.elapsed()
    );
    held.release().await.unwrap();
}

#[tokio::test]
async fn terms_rise_when_redis_restarts_without_its_data() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = redis().await else {
        return;
    };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("restart-terms");
    let lock = backend(&server, &prefix).lock("terms").unwrap();
    let mut last = 0;
    for _ in 0..3 {
        let held = lock.acquire(request("a", lease)).await.unwrap();
        assert!(held.term() > last);
        last = held.term();
        held.release().await.unwrap();
    }
    // A plain INCR would start at 1 again here.
    server.restart().await.unwrap();
    let empty: i64 = command(
        &server,
        redis::cmd("EXISTS").arg(format!("{{{prefix}:terms}}:term")),
    )
    .await;
    assert_eq!(empty, 0, "the restarted server kept its data");
    let held = tokio::time::timeout(WAIT, lock.acquire(request("a", lease)))
        .await
        .expect("an acquisition after the restart")
        .unwrap();
    assert!(
        held.term() > last,
        "term {} after the restart is not above {last}",
        held.term()
    );
    held.release().await.unwrap();
}

#[tokio::test]
async fn holder_loses_the_lock_when_redis_restarts_empty() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = redis().await else {
        return;
    };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let lock = backend(&server, &prefix("restart-loss"))
        .lock("lost")
        .unwrap();
    let mut held = lock.acquire(request("a", lease)).await.unwrap();
    let renewals = held.renewals().expect("a lease backend reports renewals");
    let killed_at = Clock::system().now();
    server.kill();
    server.restart().await.unwrap();
    // The first command after the restart fails; the next renewal finds the key gone.
    let err = tokio::time::timeout(WAIT, held.lost())
        .await
        .expect("the loss to be reported");
    assert!(matches!(err, Error::Lost { .. }), "{err}");
    // Nothing sent after the kill was confirmed: the term ended by its old deadline.
    assert!(
        renewals.latest() < killed_at,
        "a renewal was confirmed after the restart"
    );
}

#[tokio::test]
async fn a_node_with_another_lease_refuses_to_campaign() {
    let Some(server) = redis().await else { return };
    wait_uptime(&server, Duration::from_secs(2)).await;
    let b = backend(&server, &prefix("lease-mismatch"));
    let lock = b.lock("mixed").unwrap();
    let held = lock
        .acquire(request("a", Duration::from_secs(2)))
        .await
        .unwrap();
    let err = tokio::time::timeout(WAIT, lock.acquire(request("b", Duration::from_secs(1))))
        .await
        .expect("a refusal, not a wait")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            &err,
            Error::Misconfigured {
                kind: Misconfiguration::IncompatibleLease,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("2000 ms") && msg.contains("same lease"),
        "{msg}"
    );
    held.release().await.unwrap();
}

/// A lease the holder disagrees with fails every acquisition while the holder watch answers: the
/// misconfiguration stays published (the same report, never cleared and raised again) through a
/// change of holder, and ends once this node's acquisition succeeds.
#[tokio::test]
async fn a_lease_misconfiguration_outlives_holder_changes() {
    let Some(server) = redis().await else { return };
    wait_uptime(&server, Duration::from_secs(2)).await;
    let b = backend(&server, &prefix("lease-report"));
    let elector = |node: &str, lease: u64| {
        tower_primary::Elector::builder("mixed")
            .backend(b.clone())
            .node(NodeId::new(node))
            .lease(Lease::new(Duration::from_secs(lease)))
            .spawn()
            .unwrap()
    };
    let a = elector("a", 2);
    tokio::time::timeout(WAIT, a.handle().wait_primary())
        .await
        .expect("a leads");
    let c = elector("c", 2);
    let odd = elector("odd", 1);
    let mut role = odd.handle();
    // No event announces a report (it is read with the role): look at each change, and at
    // least every 20 ms.
    let reported = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(e) = role.backend_error() {
                return e;
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), role.changed()).await;
        }
    })
    .await
    .expect("the lease mismatch reported");
    assert_eq!(reported.kind, Misconfiguration::IncompatibleLease);

    // The holder changes: the watch answers, the lease is still wrong.
    a.step_down().await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if role.holder().is_some_and(|h| h.id == "c") {
                return;
            }
            role.changed().await;
        }
    })
    .await
    .expect("the odd node follows the new holder");
    assert_eq!(
        odd.handle().backend_error(),
        Some(reported),
        "the report was cleared by the holder watch"
    );

    // Alone with the lock, the odd node's own lease is the lock's: it takes it, and the
    // misconfiguration is over.
    a.shutdown().await;
    c.shutdown().await;
    tokio::time::timeout(WAIT, odd.handle().wait_primary())
        .await
        .expect("the odd node leads once nobody disagrees");
    assert_eq!(odd.handle().backend_error(), None);
    odd.shutdown().await;
}

#[tokio::test]
async fn waiter_wakes_when_a_crashed_holders_key_runs_out() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("expiry");
    let a = backend(&server, &prefix).lock("crash").unwrap();
    let b = backend(&server, &prefix).lock("crash").unwrap();
    // Key events are off on this server: the waiter must wake from the key's PTTL, not a poll.
    let held = a.acquire(request("a", lease)).await.unwrap();
    let ta = held.term();
    drop(held); // like a crash: no release, renewals stop
    let dropped = Instant::now();
    let next = tokio::time::timeout(WAIT, b.acquire(request("b", lease)))
        .await
        .expect("b to acquire")
        .unwrap();
    let took = dropped.elapsed();
    assert!(next.term() > ta);
    // Not before the key ran out (it was set or renewed at most a lease ago); and without a
    // poll interval on top (generous: several leases would mean polling).
    assert!(took <= lease * 3, "{took:?}");
    println!("crashed holder (lease {lease:?}) → waiter acquired after {took:?}");
    next.release().await.unwrap();
}

#[tokio::test]
async fn key_events_can_be_enabled_and_wake_waiters() {
    let _serial = SERIAL.lock().await;
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("keyevents");
    let a = backend(&server, &prefix)
        .key_events(KeyEvents::Enable)
        .lock("events")
        .unwrap();
    // Subscribing sets the server's notify-keyspace-events (opt-in).
    let _watch = a.watch_holder().await.unwrap();
    let flags: Vec<String> = command(
        &server,
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events"),
    )
    .await;
    let flags = flags.get(1).cloned().unwrap_or_default();
    assert!(
        flags.contains('K') && (flags.contains('x') || flags.contains('A')),
        "{flags:?}"
    );
    let b = backend(&server, &prefix).lock("events").unwrap();
    let held = b.acquire(request("b", lease)).await.unwrap();
    let mut changes = a.watch_holder().await.unwrap();
    drop(held); // no release: only the key's expiry can tell
    tokio::time::timeout(WAIT, changes.changed())
        .await
        .expect("a key event")
        .unwrap();
    let took = tokio::time::timeout(WAIT, async {
        loop {
            if a.holder().await.unwrap().is_none() {
                return;
            }
            changes.changed().await.unwrap();
        }
    })
    .await;
    assert!(took.is_ok(), "the expired holder is still reported");
}

#[tokio::test]
async fn state_writes_need_the_holding_term() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("state");
    let a = backend(&server, &prefix).lock("state").unwrap();
    let b = backend(&server, &prefix).lock("state").unwrap();
    let held = a.acquire(request("a", lease)).await.unwrap();
    let term = held.term();
    a.store("cursor", b"1", term).await.unwrap();
    // Another node naming the holder's term is not the holder.
    let err = b.store("cursor", b"2", term).await.unwrap_err();
    assert!(matches!(err, Error::StaleTerm { .. }), "{err}");
    let mut watch = b.watch_key("cursor").await.unwrap();
    a.store("cursor", b"3", term).await.unwrap();
    tokio::time::timeout(WAIT, watch.changed())
        .await
        .expect("a state notification")
        .unwrap();
    let stored = b.load("cursor").await.unwrap().unwrap();
    assert_eq!((stored.value.as_slice(), stored.term), (&b"3"[..], term));
    held.release().await.unwrap();
    let err = a.store("cursor", b"4", term).await.unwrap_err();
    assert!(matches!(err, Error::StaleTerm { .. }), "{err}");
    assert_eq!(b.load("missing").await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// Resuming a lease from another process

/// The lock key, holder and term keys of a lock, for the test's view of the server.
fn lock_keys(prefix: &str, lock: &str) -> (String, String) {
    (
        format!("{{{prefix}:{lock}}}:lock"),
        format!("{{{prefix}:{lock}}}:holder"),
    )
}

/// `{"token":…,"term":…}` with another term: a token whose term the lock does not hold.
fn with_term(token: &str, term: u64) -> String {
    let mut json: serde_json::Value = serde_json::from_str(token).unwrap();
    json["term"] = term.into();
    json.to_string()
}

#[tokio::test]
async fn resume_continues_a_dead_holders_lease_under_a_higher_term() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("resume");
    let a = backend(&server, &prefix).lock("jobs").unwrap();
    let b = backend(&server, &prefix).lock("jobs").unwrap();
    let held = a.acquire(request("a", lease)).await.unwrap();
    let (term_a, token) = (held.term(), held.resume_token().unwrap());
    // a's process dies: the leadership is dropped without a release, its renewals stop.
    drop(held);
    let resumed = b
        .resume(request("b", lease), &token)
        .await
        .unwrap()
        .expect("the lease is still a's");
    let term_b = resumed.term();
    assert!(term_b > term_a, "{term_b} after {term_a}");
    let record = b.holder().await.unwrap().unwrap();
    assert_eq!((record.id.as_str(), record.term), ("b", term_b));
    assert_eq!(record.lease_ms, Some(1000));
    assert_eq!(
        record.process,
        tower_primary::process::ProcessIdentity::current()
    );
    let mine = resumed.holder();
    assert_eq!((mine.id.as_str(), mine.term), ("b", term_b));
    assert_eq!(mine.process, record.process);
    // The lease goes on under b's renewals, past a's lease.
    let mut renewals = resumed.renewals().unwrap();
    for _ in 0..4 {
        tokio::time::timeout(WAIT, renewals.changed())
            .await
            .expect("renewals of the resumed lease");
    }
    let (lock_key, _) = lock_keys(&prefix, "jobs");
    let pttl: i64 = command(&server, redis::cmd("PTTL").arg(&lock_key)).await;
    assert!(pttl > 0, "the resumed lease ran out: PTTL {pttl}");
    // The resumed token is b's own, and a's is spent.
    let token_b = resumed.resume_token().unwrap();
    assert_ne!(token_b, token);
    assert!(
        a.resume(request("a", lease), &token)
            .await
            .unwrap()
            .is_none()
    );
    resumed.release().await.unwrap();
    assert_eq!(b.holder().await.unwrap(), None);
}

#[tokio::test]
async fn a_resume_token_the_lock_no_longer_holds_resumes_nothing() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("resume-stale");
    let a = backend(&server, &prefix).lock("jobs").unwrap();
    let b = backend(&server, &prefix).lock("jobs").unwrap();
    let (lock_key, _) = lock_keys(&prefix, "jobs");

    // A wrong term, below or above the holder's: nothing changes for the holder.
    let held = a.acquire(request("a", lease)).await.unwrap();
    let (term, token) = (held.term(), held.resume_token().unwrap());
    for wrong in [term - 1, term + 1] {
        let res = b
            .resume(request("b", lease), &with_term(&token, wrong))
            .await;
        assert!(matches!(res, Ok(None)), "term {wrong}: {res:?}");
    }
    let record = b.holder().await.unwrap().unwrap();
    assert_eq!((record.id.as_str(), record.term), ("a", term));
    // A malformed token is an error, not a resumption.
    let err = b.resume(request("b", lease), "{}").await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");

    // Released.
    held.release().await.unwrap();
    let res = b.resume(request("b", lease), &token).await;
    assert!(matches!(res, Ok(None)), "after a release: {res:?}");

    // Expired: the holder's renewals stopped, and its key ran out on the server.
    let watcher = backend(&server, &prefix)
        .key_events(KeyEvents::Enable)
        .lock("jobs")
        .unwrap();
    let mut changes = watcher.watch_holder().await.unwrap();
    let held = a.acquire(request("a", lease)).await.unwrap();
    let token = held.resume_token().unwrap();
    drop(held);
    tokio::time::timeout(WAIT, async {
        loop {
            changes.changed().await.unwrap();
            let exists: i64 = command(&server, redis::cmd("EXISTS").arg(&lock_key)).await;
            if exists == 0 {
                return;
            }
        }
    })
    .await
    .expect("the lock key to expire");
    let res = b.resume(request("b", lease), &token).await;
    assert!(matches!(res, Ok(None)), "after expiry: {res:?}");

    // Taken by another node since.
    let c = backend(&server, &prefix).lock("jobs").unwrap();
    let other = c.acquire(request("c", lease)).await.unwrap();
    let res = b.resume(request("b", lease), &token).await;
    assert!(
        matches!(res, Ok(None)),
        "after another node acquired: {res:?}"
    );
    let record = b.holder().await.unwrap().unwrap();
    assert_eq!((record.id.as_str(), record.term), ("c", other.term()));
    other.release().await.unwrap();
}

#[tokio::test]
async fn a_resumed_terms_late_renewal_release_and_store_are_refused() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("resume-late");
    let a = backend(&server, &prefix).lock("jobs").unwrap();
    let b = backend(&server, &prefix).lock("jobs").unwrap();
    // a's leadership stays alive: its requests play the dead process's requests that arrive
    // after the resumption.
    let mut old = a.acquire(request("a", lease)).await.unwrap();
    let term_a = old.term();
    a.store("cursor", b"1", term_a).await.unwrap();
    let token = old.resume_token().unwrap();
    let resumed = b
        .resume(request("b", lease), &token)
        .await
        .unwrap()
        .expect("the lease is a's");
    let term_b = resumed.term();
    // The late store: refused, naming the resumed term.
    let err = a.store("cursor", b"late", term_a).await.unwrap_err();
    assert!(
        matches!(err, Error::StaleTerm { current: Some(t), .. } if t == term_b),
        "{err}"
    );
    // The late renewal: refused (the resumption's notification wakes the renewal at once).
    let lost = tokio::time::timeout(WAIT, old.lost())
        .await
        .expect("the old term to learn it is lost");
    assert!(matches!(lost, Error::Lost { .. }), "{lost}");
    // The late release: deletes nothing.
    old.release().await.unwrap();
    let record = b.holder().await.unwrap().unwrap();
    assert_eq!((record.id.as_str(), record.term), ("b", term_b));
    let mut renewals = resumed.renewals().unwrap();
    tokio::time::timeout(WAIT, renewals.changed())
        .await
        .expect("renewals of the resumed term go on");
    b.store("cursor", b"2", term_b).await.unwrap();
    let stored = a.load("cursor").await.unwrap().unwrap();
    assert_eq!((stored.value.as_slice(), stored.term), (&b"2"[..], term_b));
    resumed.release().await.unwrap();
}

#[tokio::test]
async fn a_resume_with_another_lease_is_refused() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, MAX_LEASE).await;
    let prefix = prefix("resume-lease");
    let a = backend(&server, &prefix).lock("jobs").unwrap();
    let b = backend(&server, &prefix).lock("jobs").unwrap();
    let held = a.acquire(request("a", lease)).await.unwrap();
    let token = held.resume_token().unwrap();
    let err = b
        .resume(request("b", Duration::from_millis(1500)), &token)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Misconfigured {
                kind: Misconfiguration::IncompatibleLease,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("1000 ms"), "{err}");
    let record = b.holder().await.unwrap().unwrap();
    assert_eq!((record.id.as_str(), record.term), ("a", held.term()));
    held.release().await.unwrap();
}

/// How long `Lock::resume` takes on a local `redis-server`, over 100 resumptions, each of the
/// lease the previous one resumed (its leadership dropped, as by a dead process).
#[tokio::test]
async fn resume_time_over_100_rounds() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("resume-time");
    let locks = [
        backend(&server, &prefix).lock("jobs").unwrap(),
        backend(&server, &prefix).lock("jobs").unwrap(),
    ];
    let mut held = locks[0].acquire(request("n0", lease)).await.unwrap();
    // One resumption to warm both connections and load the script.
    let token = held.resume_token().unwrap();
    held = locks[1]
        .resume(request("n1", lease), &token)
        .await
        .unwrap()
        .unwrap();
    let mut took = Vec::new();
    for round in 0..100 {
        let token = held.resume_token().unwrap();
        let term = held.term();
        drop(held);
        let started = Instant::now();
        held = locks[round % 2]
            .resume(request(&format!("n{round}"), lease), &token)
            .await
            .unwrap()
            .expect("the lease is the previous round's");
        took.push(started.elapsed());
        assert!(held.term() > term);
    }
    held.release().await.unwrap();
    took.sort();
    println!(
        "Lock::resume on local Redis, 100 rounds: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        took[49].as_secs_f64() * 1e3,
        took[98].as_secs_f64() * 1e3,
        took[99].as_secs_f64() * 1e3
    );
}

// ---------------------------------------------------------------------------------------------
// The candidate registry and reservations

/// A registry watch created once the lock's notification connection is live and its first
/// wake-up has passed: every change it reports afterwards is a real one (or a reconnection).
async fn registry_watch(lock: &dyn Lock) -> Box<dyn Changes> {
    drop(lock.watch_candidates().await.unwrap());
    lock.watch_candidates().await.unwrap()
}

/// The candidates `lock` lists, by node id.
async fn listed(lock: &dyn Lock) -> Vec<Candidate> {
    let mut all = lock.candidates().await.unwrap();
    all.sort_by(|a, b| a.node.cmp(&b.node));
    all
}

/// Waits for the next change `watch` reports (bounded by [`WAIT`]).
async fn next_change(watch: &mut Box<dyn Changes>, what: &str) {
    tokio::time::timeout(WAIT, watch.changed())
        .await
        .unwrap_or_else(|_| panic!("no registry notification for {what}"))
        .unwrap();
}

#[tokio::test]
async fn registry_add_update_and_withdraw_are_seen_by_another_connection() {
    let Some(server) = redis().await else { return };
    let prefix = prefix("registry");
    let a = backend(&server, &prefix).lock("jobs").unwrap();
    let b = backend(&server, &prefix).lock("jobs").unwrap();
    let c = backend(&server, &prefix).lock("jobs").unwrap();
    let lease = Some(Lease::new(Duration::from_secs(1)));
    let mut watch = registry_watch(&*b).await;
    assert!(listed(&*b).await.is_empty());

    // Added: listed as soon as register returns, and announced.
    let first = Candidate::new("a").with_priority(1);
    let reg_a = a.register(first.clone(), lease).await.unwrap();
    assert_eq!(listed(&*b).await, vec![first]);
    next_change(&mut watch, "an added entry").await;

    // Updated.
    let updated = Candidate::new("a").with_priority(2).with_ready(false);
    reg_a.update(updated.clone()).await.unwrap();
    assert_eq!(listed(&*b).await, vec![updated.clone()]);
    next_change(&mut watch, "an updated entry").await;

    // Another node, and that node registering again (another connection): replaced, once.
    let reg_b = b.register(Candidate::new("b"), lease).await.unwrap();
    next_change(&mut watch, "a second entry").await;
    let again = Candidate::new("b").with_priority(7).with_draining(true);
    let reg_b_again = c.register(again.clone(), lease).await.unwrap();
    assert_eq!(listed(&*b).await, vec![updated.clone(), again.clone()]);
    next_change(&mut watch, "a replaced entry").await;
    // The replaced registration does not bring its own entry back when it refreshes (every
    // third of the lease)...
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(listed(&*b).await, vec![updated.clone(), again.clone()]);

    // ... nor remove its successor's when dropped. Withdrawn on drop (asynchronously, in drop
    // order): announced, then no longer listed.
    drop(reg_b);
    drop(reg_a);
    next_change(&mut watch, "a withdrawn entry").await;
    let until = Instant::now() + WAIT;
    while listed(&*b).await.len() != 1 {
        assert!(
            Instant::now() < until,
            "the dropped registration is still listed"
        );
        watch.changed().await.unwrap();
    }
    assert_eq!(listed(&*a).await, vec![again]);
    drop(reg_b_again);
    next_change(&mut watch, "the last entry withdrawn").await;
    while !listed(&*b).await.is_empty() {
        tokio::time::timeout(WAIT, watch.changed())
            .await
            .expect("the last entry to go")
            .unwrap();
    }
}

/// The registrant's connection is stalled (a TCP proxy holding every byte), as if its process
/// had frozen or its host had been cut off: nobody withdraws the entry, and it is no longer
/// listed one lease after its last refresh; the reader that finds it dead tells every watcher.
/// When the connection comes back, the registration enters its entry again by itself.
#[tokio::test]
async fn an_entry_whose_refresh_stopped_disappears_within_a_lease_and_returns_on_reconnection() {
    let Some(server) = redis().await else { return };
    let prefix = prefix("registry-liveness");
    let proxy = TcpProxy::start(server.addr()).await.unwrap();
    let through = backend_at(&format!("redis://{}", proxy.addr()), &prefix)
        .lock("jobs")
        .unwrap();
    let reader = backend(&server, &prefix).lock("jobs").unwrap();
    let other = backend(&server, &prefix).lock("jobs").unwrap();
    let lease = Duration::from_secs(1);
    let entry = Candidate::new("cut").with_priority(3);
    let registration = through
        .register(entry.clone(), Some(Lease::new(lease)))
        .await
        .unwrap();
    assert_eq!(listed(&*reader).await, vec![entry.clone()]);
    let mut watch = registry_watch(&*other).await;

    proxy.stall();
    let stalled = Instant::now();
    // The elector re-reads the registry at least once a lease; this reader re-reads often, to
    // time the disappearance.
    loop {
        if listed(&*reader).await.is_empty() {
            break;
        }
        assert!(
            stalled.elapsed() < lease * 3,
            "the entry outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone = stalled.elapsed();
    // Refreshed at most a third of a lease before the stall, so gone after 2/3 of a lease at
    // the earliest and one lease (plus a read) at the latest.
    assert!(
        gone >= lease * 2 / 3 - Duration::from_millis(50),
        "{gone:?}"
    );
    assert!(gone <= lease + Duration::from_millis(300), "{gone:?}");
    println!("registry entry (lease {lease:?}) gone {gone:?} after its connection stalled");
    next_change(&mut watch, "a dead entry found by another reader").await;

    // Reconnected: the refresh task enters the entry again, and says so.
    proxy.cut();
    proxy.resume();
    let back = Instant::now();
    while listed(&*reader).await != vec![entry.clone()] {
        tokio::time::timeout(WAIT, watch.changed())
            .await
            .expect("the entry to come back")
            .unwrap();
    }
    println!(
        "registry entry back {:?} after the connection healed",
        back.elapsed()
    );
    drop(registration);
}

/// The reservation key of a lock, for the test's view of the server.
fn reservation_key(prefix: &str, lock: &str) -> String {
    format!("{{{prefix}:{lock}}}:reserved")
}

/// `lock.acquire(req)` in a task of its own.
fn acquiring(
    lock: &Arc<dyn Lock>,
    req: AcquireRequest,
) -> tokio::task::JoinHandle<Result<Box<dyn Leadership>, Error>> {
    let lock = lock.clone();
    tokio::spawn(async move { lock.acquire(req).await })
}

#[tokio::test]
async fn a_reservation_holds_other_waiters_off_until_it_expires_by_the_servers_count() {
    let Some(server) = redis().await else { return };
    // A lease (and so a slow poll) longer than the window: a waiter that takes the lock about
    // one window after the reservation woke from the reservation's PTTL, not from a poll.
    let lease = Duration::from_secs(2);
    wait_uptime(&server, lease).await;
    let prefix = prefix("reserve-expiry");
    let a = backend(&server, &prefix).lock("jobs").unwrap();
    let b = backend(&server, &prefix).lock("jobs").unwrap();
    let mut held = a.acquire(request("a", lease)).await.unwrap();
    let first = held.term();
    let mut waiter = acquiring(&b, request("b", lease));
    let window = Duration::from_millis(800);
    let reserved = Instant::now();
    held.reserve("gone-node", window).await.unwrap();
    held.release().await.unwrap();
    // Released, but reserved for a node that never comes: b neither takes the lock nor fails.
    let early = tokio::time::timeout(window - Duration::from_millis(150), &mut waiter).await;
    assert!(early.is_err(), "b took the lock during the reservation");
    assert!(a.holder().await.unwrap().is_none());
    let next = tokio::time::timeout(WAIT, waiter)
        .await
        .expect("b to acquire after the window")
        .unwrap()
        .unwrap();
    let took = reserved.elapsed();
    assert!(next.term() > first);
    assert!(took >= window - Duration::from_millis(50), "{took:?}");
    assert!(took < window + Duration::from_millis(500), "{took:?}");
    println!(
        "reservation of {window:?} for an absent node: another waiter acquired after {took:?}"
    );
    let exists: i64 = command(
        &server,
        redis::cmd("EXISTS").arg(reservation_key(&prefix, "jobs")),
    )
    .await;
    assert_eq!(exists, 0);
    next.release().await.unwrap();
}

#[tokio::test]
async fn the_reserved_node_takes_the_lock_at_once_with_a_higher_term_and_consumes_it() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("reserve-take");
    let a = backend(&server, &prefix).lock("jobs").unwrap();
    let b = backend(&server, &prefix).lock("jobs").unwrap();
    let c = backend(&server, &prefix).lock("jobs").unwrap();
    let mut held = a.acquire(request("a", lease)).await.unwrap();
    let first = held.term();
    let mut other = acquiring(&b, request("b", lease));
    let chosen = acquiring(&c, request("c", lease));
    let window = Duration::from_secs(10);
    held.reserve("c", window).await.unwrap();
    let ttl: i64 = command(
        &server,
        redis::cmd("PTTL").arg(reservation_key(&prefix, "jobs")),
    )
    .await;
    assert!(ttl > 0 && ttl <= 10_000, "{ttl}");
    let released = Instant::now();
    held.release().await.unwrap();
    let next = tokio::time::timeout(WAIT, chosen)
        .await
        .expect("the reserved node to acquire")
        .unwrap()
        .unwrap();
    let took = released.elapsed();
    assert!(next.term() > first);
    assert_eq!(c.holder().await.unwrap().unwrap().id, "c");
    println!("release → reserved node acquired after {took:?}");
    // Consumed: gone from the server, and once the reserved node releases, the other waiter
    // takes the lock at once, not after the window.
    let exists: i64 = command(
        &server,
        redis::cmd("EXISTS").arg(reservation_key(&prefix, "jobs")),
    )
    .await;
    assert_eq!(exists, 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut other)
            .await
            .is_err(),
        "b took a held lock"
    );
    let second = next.term();
    next.release().await.unwrap();
    let last = tokio::time::timeout(Duration::from_secs(2), other)
        .await
        .expect("b to acquire well before the window would have ended")
        .unwrap()
        .unwrap();
    assert!(last.term() > second);
    last.release().await.unwrap();
}

#[tokio::test]
async fn a_term_that_no_longer_holds_the_lock_cannot_reserve() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("reserve-stale");
    let a = backend(&server, &prefix).lock("jobs").unwrap();
    let b = backend(&server, &prefix).lock("jobs").unwrap();
    let c = backend(&server, &prefix).lock("jobs").unwrap();

    // Taken over under a newer term (a resumption): the old term is refused, naming the new.
    let mut old = a.acquire(request("a", lease)).await.unwrap();
    let token = old.resume_token().unwrap();
    let newer = b
        .resume(request("b", lease), &token)
        .await
        .unwrap()
        .expect("the lease to resume");
    match old.reserve("c", Duration::from_secs(5)).await {
        Err(Error::StaleTerm { term, current, .. }) => {
            assert_eq!((term, current), (old.term(), Some(newer.term())));
        }
        other => panic!("{other:?}"),
    }
    let exists: i64 = command(
        &server,
        redis::cmd("EXISTS").arg(reservation_key(&prefix, "jobs")),
    )
    .await;
    assert_eq!(exists, 0, "a refused reservation was written");
    drop(old);

    // The lock key gone (deleted, evicted, expired): refused too.
    let (lock_key, holder_key) = lock_keys(&prefix, "jobs");
    let mut lost = newer;
    let () = command(&server, redis::cmd("DEL").arg(&lock_key).arg(&holder_key)).await;
    match lost.reserve("c", Duration::from_secs(5)).await {
        Err(Error::StaleTerm { current: None, .. }) => {}
        other => panic!("{other:?}"),
    }
    drop(lost);
    // Nothing reserved: c, not the reserved one, acquires once the lost lease has passed.
    let taken = tokio::time::timeout(WAIT, c.acquire(request("c", lease)))
        .await
        .expect("c to acquire")
        .unwrap();
    taken.release().await.unwrap();
}

/// How long a planned handover takes on a local `redis-server`: `reserve` + `release` by the
/// holder → the reserved node's pending `acquire` returns, over 20 rounds, between two nodes
/// taking turns, while a third node waits all along and never gets the lock.
#[tokio::test]
async fn reserve_and_release_to_the_reserved_acquire_over_20_rounds() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("reserve-time");
    let nodes: [Arc<dyn Lock>; 2] = [
        backend(&server, &prefix).lock("jobs").unwrap(),
        backend(&server, &prefix).lock("jobs").unwrap(),
    ];
    let third = backend(&server, &prefix).lock("jobs").unwrap();
    let mut held = nodes[0].acquire(request("n0", lease)).await.unwrap();
    let mut bystander = acquiring(&third, request("bystander", lease));
    let mut took = Vec::new();
    for round in 1..=21 {
        let next = round % 2;
        let name = format!("n{next}");
        let waiting = acquiring(&nodes[next], request(&name, lease));
        // Measured as in a handover, with the successor already waiting on the held lock: time
        // for its first attempt to be answered (were it not, it would only acquire sooner).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let term = held.term();
        let started = Instant::now();
        held.reserve(&name, Duration::from_secs(2)).await.unwrap();
        held.release().await.unwrap();
        held = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("the reserved node to acquire")
            .unwrap()
            .unwrap();
        // Round 1 warms the connections and loads the scripts.
        if round > 1 {
            took.push(started.elapsed());
        }
        assert!(held.term() > term);
        assert_eq!(held.holder().id, name);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(10), &mut bystander)
            .await
            .is_err(),
        "the bystander took the lock"
    );
    bystander.abort();
    held.release().await.unwrap();
    took.sort();
    println!(
        "reserve + release → reserved acquire on local Redis, 20 rounds: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        took[9].as_secs_f64() * 1e3,
        took[19].as_secs_f64() * 1e3,
        took[19].as_secs_f64() * 1e3
    );
}

/// The whole planned handover on Redis, in this process: `Elector::hand_over_to` (the decision)
/// → the successor's singleton task starts its term, over 20 rounds between two electors.
#[tokio::test]
async fn directed_handover_to_the_successors_first_task_over_20_rounds() {
    let Some(server) = redis().await else { return };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, lease).await;
    let prefix = prefix("handover-time");
    let (tx, mut started) = tokio::sync::mpsc::unbounded_channel::<(String, u64, Instant)>();
    let spawn = |id: &'static str| {
        let elector = Elector::builder("jobs")
            .backend(backend(&server, &prefix))
            .node(NodeId::new(id))
            .lease(Lease::new(lease))
            .spawn()
            .unwrap();
        let tx = tx.clone();
        elector.singleton_task("tick", move |ctx: TermContext| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((id.to_owned(), ctx.term(), Instant::now()));
                ctx.cancelled().await;
                Ok::<(), std::convert::Infallible>(())
            }
        });
        elector
    };
    let nodes = [spawn("a"), spawn("b")];
    let (mut at, mut term, _) = tokio::time::timeout(WAIT, started.recv())
        .await
        .expect("a first primary")
        .unwrap();
    for node in &nodes {
        tokio::time::timeout(
            WAIT,
            node.handle().wait_candidates(|l| {
                l.iter().filter(|c| c.node == "a" || c.node == "b").count() == 2
            }),
        )
        .await
        .expect("both entries listed");
    }
    let mut took = Vec::new();
    for round in 0..21 {
        let (from, to) = if at == "a" { (0, "b") } else { (1, "a") };
        let decided = Instant::now();
        nodes[from].hand_over_to(to).await.unwrap();
        let (next, next_term, first_tick) = tokio::time::timeout(WAIT, started.recv())
            .await
            .expect("the successor's task to start")
            .unwrap();
        assert_eq!(next, to);
        assert!(next_term > term);
        // Round 0 warms the connections and loads the scripts.
        if round > 0 {
            took.push(first_tick - decided);
        }
        (at, term) = (next, next_term);
    }
    for node in &nodes {
        node.shutdown().await;
    }
    took.sort();
    println!(
        "hand_over_to → successor's first task on local Redis, 20 rounds: p50 {:.2} ms, p99 {:.2} ms",
        took[9].as_secs_f64() * 1e3,
        took[19].as_secs_f64() * 1e3,
    );
}

// ---------------------------------------------------------------------------------------------
// Real processes

/// The node side of this binary: the process tests re-execute it in node mode.
#[test]
fn node_entry() {
    common::node_entry();
}

struct Setup {
    cluster: Cluster,
    server: RedisServer,
    config: NodeConfig,
    _serial: MutexGuard<'static, ()>,
}

impl Setup {
    /// A first node that reaches the server through a proxy of its own and becomes primary,
    /// then `followers` more nodes, settled: the proxy, the primary's pid and its term.
    async fn primary_behind_a_proxy(&mut self, followers: usize) -> (TcpProxy, u32, u64) {
        let proxy = TcpProxy::start(self.server.addr()).await.unwrap();
        let mut through_proxy = self.config.clone();
        through_proxy.backend = self
            .config
            .backend
            .replace(&self.server.addr().to_string(), &proxy.addr().to_string());
        let primary = self.cluster.spawn_node_with(&through_proxy).unwrap();
        let (first, term) = self.cluster.wait_single_primary(WAIT).await.unwrap();
        assert_eq!(first, primary);
        self.cluster.spawn_nodes(followers).unwrap();
        self.cluster.wait_settled(WAIT).await.unwrap();
        (proxy, primary, term)
    }
}

async fn setup(test: &str, lease: Duration) -> Option<Setup> {
    let serial = SERIAL.lock().await;
    let server = redis().await?;
    wait_uptime(&server, lease).await;
    let config = NodeConfig::new(
        format!(
            "{}/0?prefix={}{}",
            server.url(),
            prefix(test),
            max_lease_param(lease)
        ),
        test.to_owned(),
    )
    .lease(lease)
    .grace(Duration::from_secs(2));
    let command = NodeCommand::test_entry("node_entry").expect("the test binary's path");
    Some(Setup {
        cluster: Cluster::new(command, config.clone()),
        server,
        config,
        _serial: serial,
    })
}

/// A node process registered by its elector is killed with `SIGKILL`: nobody withdraws its entry,
/// which runs out one lease after its last refresh; the surviving node's elector, re-reading the
/// registry (at least once a lease), finds it dead and announces it to every watcher.
#[tokio::test]
async fn a_sigkilled_nodes_entry_disappears_and_watchers_are_told() {
    let lease = Duration::from_secs(1);
    let Some(mut s) = setup("registry-sigkill", lease).await else {
        return;
    };
    let observer = RedisBackend::new(&s.config.backend)
        .unwrap()
        .lock(&s.config.lock)
        .unwrap();
    let mut watch = registry_watch(&*observer).await;
    let pids = s.cluster.spawn_nodes(2).unwrap();
    s.cluster.wait_settled(WAIT).await.unwrap();
    let of = |pid: u32| format!(":{pid}");
    loop {
        let list = listed(&*observer).await;
        if pids
            .iter()
            .all(|pid| list.iter().any(|c| c.node.ends_with(&of(*pid))))
        {
            break;
        }
        next_change(&mut watch, "the nodes' entries").await;
    }
    let victim = pids[1];
    let signalled = Instant::now();
    s.cluster.signal(victim, NodeSignal::Kill).await.unwrap();
    let list = loop {
        let list = listed(&*observer).await;
        if !list.iter().any(|c| c.node.ends_with(&of(victim))) {
            break list;
        }
        next_change(&mut watch, "the killed node's entry").await;
    };
    let took = signalled.elapsed();
    assert!(took <= lease * 3, "{took:?}\n{}", s.cluster.dump());
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].node.ends_with(&of(pids[0])), "{list:?}");
    println!("SIGKILL (lease {lease:?}) → registry entry gone, watchers told, after {took:?}");
}

#[tokio::test]
async fn sigkill_of_the_primary_elects_exactly_one_successor_with_a_higher_term() {
    let lease = Duration::from_secs(1);
    let Some(mut s) = setup("sigkill", lease).await else {
        return;
    };
    s.cluster.spawn_nodes(3).unwrap();
    let failover = s.cluster.kill_primary(WAIT).await;
    let took = Duration::from_nanos(failover.next.at - failover.signalled_at);
    assert!(took < lease * 5, "{took:?}\n{}", s.cluster.dump());
    println!("SIGKILL (lease {lease:?}) → successor primary after {took:?}");
}

#[tokio::test]
async fn sigterm_hands_over_before_the_lease_could_expire() {
    // A long lease: the key would outlive the primary by at least 2/3 of it.
    let lease = Duration::from_secs(6);
    let Some(mut s) = setup("sigterm", lease).await else {
        return;
    };
    s.cluster.spawn_nodes(3).unwrap();
    let handover = s.cluster.terminate_primary(WAIT).await.succession;
    let took = Duration::from_nanos(handover.next.at - handover.signalled_at);
    assert!(
        took < lease * 2 / 3,
        "the successor waited for the lease: {took:?}\n{}",
        s.cluster.dump()
    );
    println!("SIGTERM → successor primary after {took:?}");
}

#[tokio::test]
async fn sigstopped_primary_is_succeeded_and_resumes_as_secondary() {
    let lease = Duration::from_secs(1);
    let Some(mut s) = setup("sigstop", lease).await else {
        return;
    };
    s.cluster.spawn_nodes(3).unwrap();
    let (old, term) = s.cluster.wait_settled(WAIT).await.unwrap();
    let stopped = s.cluster.signal(old, NodeSignal::Stop).await.unwrap();
    let next = s.cluster.wait_primary_after(term, old, WAIT).await.unwrap();
    let new_term = next.term().unwrap();
    assert!(new_term > term);
    // Frozen well beyond its lease before it resumes.
    tokio::time::sleep(lease).await;
    let resumed = s.cluster.signal(old, NodeSignal::Cont).await.unwrap();
    s.cluster
        .wait_event("the resumed node to report secondary", WAIT, |e| {
            e.pid == old
                && e.at > resumed
                && matches!(e.kind, EventKind::Secondary { holder_term: Some(t), .. } if t == new_term)
        })
        .await
        .unwrap();
    let events = s.cluster.events();
    // Not one task step of the old term after the resume: it ended by its deadline.
    let late_tick = events.iter().find(|e| {
        e.pid == old
            && e.at > resumed
            && matches!(e.kind, EventKind::Tick { term: t, .. } if t == term)
    });
    assert!(late_tick.is_none(), "{late_tick:?}\n{}", s.cluster.dump());
    assert!(
        s.cluster
            .first_event(
                old,
                0,
                |k| matches!(k, EventKind::TaskCancelled { term: t } if *t == term)
            )
            .is_some()
    );
    assert!(
        stopped < next.at && next.at < resumed,
        "{}",
        s.cluster.dump()
    );
    assert_eq!(
        s.cluster.wait_settled(WAIT).await.unwrap(),
        (next.pid, new_term)
    );
    // Apart from the frozen period (which ended at its deadline, unseen), no overlap.
    let mut others = History::new();
    for p in s.cluster.history().periods() {
        if !(p.node == old.to_string() && p.term == term) {
            others.push(p.clone());
        }
    }
    let report = others.check();
    assert!(report.is_ok(), "{report}\n{}", s.cluster.dump());
    println!(
        "SIGSTOP (lease {lease:?}) → successor primary after {:.1} ms",
        ms(stopped, next.at)
    );
}

#[tokio::test]
async fn redis_restarted_empty_never_gives_two_primaries() {
    let lease = Duration::from_secs(1);
    let Some(mut s) = setup("redis-restart", lease).await else {
        return;
    };
    s.cluster.spawn_nodes(3).unwrap();
    let (old, term) = s.cluster.wait_settled(WAIT).await.unwrap();
    let killed = tower_primary::clock::monotonic_nanos();
    s.server.kill();
    s.server.restart().await.unwrap();
    let restarted = tower_primary::clock::monotonic_nanos();
    let next = s
        .cluster
        .wait_event("a primary after the restart", WAIT, |e| {
            e.at > killed && matches!(e.kind, EventKind::Primary { .. })
        })
        .await
        .unwrap();
    let (now, now_term) = s.cluster.wait_settled(WAIT).await.unwrap();
    assert!(
        now_term > term,
        "term {now_term} after the restart, {term} before"
    );
    let old_end = s
        .cluster
        .first_event(
            old,
            0,
            |k| matches!(k, EventKind::TaskCancelled { term: t } if *t == term),
        )
        .expect("the old primary to step down");
    assert!(old_end.at < next.at, "{}", s.cluster.dump());
    s.cluster.assert_history_ok();
    println!(
        "Redis killed and restarted empty ({:.1} ms down): old primary (pid {old}) stepped down \
         after {:.1} ms, new primary pid {now} (term {now_term}) after {:.1} ms",
        ms(killed, restarted),
        ms(killed, old_end.at),
        ms(killed, next.at)
    );
}

#[tokio::test]
async fn stalled_proxy_makes_the_primary_step_down_before_a_successor_appears() {
    let lease = Duration::from_secs(1);
    let Some(mut s) = setup("stalled-proxy", lease).await else {
        return;
    };
    let (proxy, first, term) = s.primary_behind_a_proxy(2).await;

    let stalled_at = tower_primary::clock::monotonic_nanos();
    proxy.stall();
    let stepped_down = s
        .cluster
        .wait_event("the cut-off primary to step down", WAIT, |e| {
            e.pid == first && matches!(e.kind, EventKind::TaskCancelled { term: t } if t == term)
        })
        .await
        .unwrap();
    let next = s
        .cluster
        .wait_primary_after(term, first, WAIT)
        .await
        .unwrap();
    assert!(
        stepped_down.at < next.at,
        "the successor appeared before the old primary stepped down\n{}",
        s.cluster.dump()
    );
    s.cluster.assert_history_ok();
    println!(
        "stalled proxy: primary stepped down after {:.1} ms, successor after {:.1} ms",
        ms(stalled_at, stepped_down.at),
        ms(stalled_at, next.at)
    );
    proxy.cut();
    proxy.resume();
}

// ---------------------------------------------------------------------------------------------
// Lost lock keys: a restart during a lease change, FLUSHALL, DEL, eviction

/// Wakes every waiter of the lock at once, as any node's release message would.
async fn wake_waiters(server: &RedisServer, prefix: &str, lock: &str) {
    let _: i64 = command(
        server,
        redis::cmd("PUBLISH")
            .arg(format!("{{{prefix}:{lock}}}:events"))
            .arg("released 0"),
    )
    .await;
}

#[tokio::test]
async fn redis_restarted_empty_during_a_lease_change_never_gives_two_primaries() {
    // A rolling change of the lease from 30 s to 5 s: node A (30 s) holds, node B (5 s) waits.
    // Redis restarts without its data while A is cut off from it (A keeps believing it holds the
    // lock until its own deadline). B must not become primary before that deadline.
    let _serial = SERIAL.lock().await;
    let Some(mut server) = redis().await else {
        return;
    };
    let long = Duration::from_secs(30);
    let short = Duration::from_secs(5);
    let prefix = prefix("lease-change");
    let url = format!("{}/0?prefix={prefix}", server.url());
    let proxy = TcpProxy::start(server.addr()).await.unwrap();
    let command = NodeCommand::test_entry("node_entry").expect("the test binary's path");
    let a_config = NodeConfig::new(
        url.replace(&server.addr().to_string(), &proxy.addr().to_string()),
        "change",
    )
    .lease(long)
    .grace(Duration::from_secs(2));
    let mut cluster = Cluster::new(command, a_config.clone());
    let a = cluster.spawn_node_with(&a_config).unwrap();
    let (first, term) = cluster
        .wait_single_primary(Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(first, a);
    let b_config = NodeConfig::new(url, "change")
        .lease(short)
        .grace(Duration::from_secs(2));
    cluster.spawn_node_with(&b_config).unwrap();
    cluster.wait_settled(WAIT).await.unwrap();

    proxy.stall();
    let killed = tower_primary::clock::monotonic_nanos();
    server.kill();
    server.restart().await.unwrap();
    let next = cluster
        .wait_primary_after(term, a, Duration::from_secs(120))
        .await
        .unwrap();
    let a_end = cluster
        .wait_event("the cut-off primary to step down", WAIT, |e| {
            e.pid == a && matches!(e.kind, EventKind::TaskCancelled { term: t } if t == term)
        })
        .await
        .unwrap();
    assert!(
        a_end.at < next.at,
        "B became primary {:.1} ms after the restart, A stepped down only after {:.1} ms\n{}",
        ms(killed, next.at),
        ms(killed, a_end.at),
        cluster.dump()
    );
    cluster.assert_history_ok();
    println!(
        "lease change 30 s → 5 s, Redis restarted empty: A stepped down after {:.1} ms, B primary \
         after {:.1} ms",
        ms(killed, a_end.at),
        ms(killed, next.at)
    );
    proxy.cut();
    proxy.resume();
}

#[derive(Clone, Copy, Debug)]
enum KeyLoss {
    FlushAll,
    DelLockKey,
}

/// A primary cut off from Redis (a stalled proxy) while its lock key is lost to `loss`; a waiter
/// is woken at once. The waiter must not become primary before the cut-off one stepped down.
async fn lost_key_never_gives_two_primaries(test: &str, loss: KeyLoss) {
    let lease = Duration::from_secs(2);
    let Some(mut s) = setup(test, lease).await else {
        return;
    };
    let (proxy, a, term) = s.primary_behind_a_proxy(1).await;

    let prefix = s
        .config
        .backend
        .split("prefix=")
        .nth(1)
        .and_then(|p| p.split('&').next())
        .unwrap()
        .to_owned();
    proxy.stall();
    let lost = tower_primary::clock::monotonic_nanos();
    match loss {
        KeyLoss::FlushAll => {
            let () = command(&s.server, &redis::cmd("FLUSHALL")).await;
        }
        KeyLoss::DelLockKey => {
            let n: i64 = command(
                &s.server,
                redis::cmd("DEL").arg(format!("{{{prefix}:{test}}}:lock")),
            )
            .await;
            assert_eq!(n, 1, "no lock key to delete");
        }
    }
    wake_waiters(&s.server, &prefix, test).await;
    let next = s.cluster.wait_primary_after(term, a, WAIT).await.unwrap();
    let a_end = s
        .cluster
        .wait_event("the cut-off primary to step down", WAIT, |e| {
            e.pid == a && matches!(e.kind, EventKind::TaskCancelled { term: t } if t == term)
        })
        .await
        .unwrap();
    assert!(
        a_end.at < next.at,
        "{loss:?}: a successor after {:.1} ms, the old primary stepped down after {:.1} ms\n{}",
        ms(lost, next.at),
        ms(lost, a_end.at),
        s.cluster.dump()
    );
    s.cluster.assert_history_ok();
    println!(
        "{loss:?} while a cut-off primary held (lease {lease:?}): it stepped down after {:.1} ms, \
         successor after {:.1} ms",
        ms(lost, a_end.at),
        ms(lost, next.at)
    );
    proxy.cut();
    proxy.resume();
}

#[tokio::test]
async fn flushall_while_a_primary_holds_never_gives_two_primaries() {
    lost_key_never_gives_two_primaries("flushall", KeyLoss::FlushAll).await;
}

#[tokio::test]
async fn deleted_lock_key_never_gives_two_primaries() {
    lost_key_never_gives_two_primaries("del-lock", KeyLoss::DelLockKey).await;
}

#[tokio::test]
async fn an_evicting_maxmemory_policy_is_refused() {
    let Some(server) = servers::require(
        "redis-server",
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"])
            .await,
    ) else {
        return;
    };
    let lease = Duration::from_secs(1);
    wait_uptime(&server, MAX_LEASE).await;
    let lock = backend(&server, &prefix("eviction")).lock("evict").unwrap();
    let res = tokio::time::timeout(WAIT, lock.acquire(request("a", lease)))
        .await
        .expect("a refusal, not a wait");
    let err = res.expect_err("granted under an evicting maxmemory-policy");
    let msg = err.to_string();
    assert!(
        msg.contains("maxmemory-policy") && msg.contains("volatile-lru"),
        "{msg}"
    );
    assert_eq!(
        err.misconfiguration(),
        Some(Misconfiguration::IncompatibleLease),
        "{msg}"
    );
    // Opted in: granted.
    let allowed = backend(&server, &prefix("eviction"))
        .allow_eviction(true)
        .lock("evict")
        .unwrap();
    let held = tokio::time::timeout(WAIT, allowed.acquire(request("a", lease)))
        .await
        .expect("a grant once eviction is allowed")
        .unwrap();
    held.release().await.unwrap();
}

/// The lease record's `until` and the server's time, in ms.
async fn recorded_until(server: &RedisServer, prefix: &str, lock: &str) -> (i64, i64) {
    let until: Option<i64> = command(
        server,
        redis::cmd("HGET")
            .arg(format!("{{{prefix}:{lock}}}:lease"))
            .arg("until"),
    )
    .await;
    let (secs, micros): (i64, i64) = command(server, &redis::cmd("TIME")).await;
    (until.expect("a lease record"), secs * 1000 + micros / 1000)
}

#[tokio::test]
async fn renewals_keep_the_lock_and_move_the_recorded_lease_end() {
    let Some(server) = redis().await else { return };
    let prefix = prefix("renew-until");
    warm_up(&server, &prefix, "renew").await;
    let lease = MAX_LEASE;
    let lock = backend(&server, &prefix).lock("renew").unwrap();
    let mut held = lock.acquire(request("a", lease)).await.unwrap();
    let renewals = held.renewals().unwrap();
    let first = renewals.latest();
    let (until, now) = recorded_until(&server, &prefix, "renew").await;
    assert!(
        until > now && until <= now + 2000,
        "until {until}, now {now}"
    );
    // Several renewals later (a lease and a half), still held, and `until` moved on.
    tokio::select! {
        err = held.lost() => panic!("lost the lock: {err}"),
        () = tokio::time::sleep(lease * 3 / 2) => {}
    }
    assert!(renewals.latest() > first, "no renewal was confirmed");
    let (later, now) = recorded_until(&server, &prefix, "renew").await;
    assert!(later > until && later > now, "until {later}, now {now}");
    held.release().await.unwrap();
    // A clean release ends the recorded lease at once.
    let (released, now) = recorded_until(&server, &prefix, "renew").await;
    assert!(
        released <= now,
        "until {released} after the release, now {now}"
    );
}

#[tokio::test]
async fn a_lease_above_the_recorded_maximum_is_refused() {
    let Some(server) = redis().await else { return };
    let prefix = prefix("max-lease");
    warm_up(&server, &prefix, "max").await;
    // Someone lowered the recorded maximum below this node's lease.
    let _: i64 = command(
        &server,
        redis::cmd("HSET")
            .arg(format!("{{{prefix}:max}}:lease"))
            .arg("max_ms")
            .arg(1000),
    )
    .await;
    let lock = backend(&server, &prefix).lock("max").unwrap();
    let err = tokio::time::timeout(WAIT, lock.acquire(request("a", MAX_LEASE)))
        .await
        .expect("a refusal, not a wait")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            &err,
            Error::Misconfigured {
                kind: Misconfiguration::IncompatibleLease,
                ..
            }
        ) && msg.contains("1000 ms"),
        "{msg}"
    );
    // And a lease above the backend's own maximum never reaches Redis.
    let err = lock.acquire(request("a", MAX_LEASE * 2)).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

#[tokio::test]
async fn leases_outside_the_backends_bounds_are_refused_at_spawn() {
    // Checked before anything is sent: no server is needed, none is at this address.
    for (lease, rule) in [
        (
            Duration::from_millis(500),
            "must be at least 1s on this backend",
        ),
        (
            Duration::from_secs(60),
            "must not exceed the backend's maximum lease 30s",
        ),
    ] {
        let err = tower_primary::Elector::builder("jobs")
            .backend(RedisBackend::new("redis://127.0.0.1:1").unwrap())
            .lease(Lease::new(lease))
            .spawn()
            .unwrap_err();
        assert!(
            matches!(
                err,
                tower_primary::ConfigError::InvalidTiming {
                    setting: "lease",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), format!("invalid lease {lease:?}: {rule}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Acquisitions that end while their request is in flight

/// A TCP proxy that holds the first request mentioning `pattern` (and everything after it on
/// that connection) until [`pass`](Self::pass), and reports when the server's reply to it came
/// back, and how many later requests mentioning `pattern` were answered on other connections.
struct HoldingProxy {
    addr: std::net::SocketAddr,
    state: Arc<HoldState>,
}

struct HoldState {
    pattern: Vec<u8>,
    claimed: std::sync::atomic::AtomicBool,
    held: tokio::sync::watch::Sender<bool>,
    pass: tokio::sync::watch::Sender<bool>,
    replied: tokio::sync::watch::Sender<bool>,
    /// Replies to requests mentioning `pattern` on connections that were not held.
    others_answered: tokio::sync::watch::Sender<usize>,
}

fn mentions(chunk: &[u8], pattern: &[u8]) -> bool {
    chunk.windows(pattern.len()).any(|w| w == pattern)
}

impl HoldingProxy {
    async fn start(upstream: std::net::SocketAddr, pattern: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(HoldState {
            pattern: pattern.as_bytes().to_vec(),
            claimed: false.into(),
            held: tokio::sync::watch::channel(false).0,
            pass: tokio::sync::watch::channel(false).0,
            replied: tokio::sync::watch::channel(false).0,
            others_answered: tokio::sync::watch::channel(0).0,
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(upstream).await {
                        HoldingProxy::run(client, server, st).await;
                    }
                });
            }
        });
        HoldingProxy { addr, state }
    }

    async fn run(client: tokio::net::TcpStream, server: tokio::net::TcpStream, st: Arc<HoldState>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let holding = std::sync::atomic::AtomicBool::new(false);
        let asked = AtomicUsize::new(0);
        let up = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = cr.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                if mentions(&buf[..n], &st.pattern) {
                    if !holding.load(Ordering::SeqCst) && !st.claimed.swap(true, Ordering::SeqCst) {
                        holding.store(true, Ordering::SeqCst);
                        st.held.send_replace(true);
                        let _ = st.pass.subscribe().wait_for(|p| *p).await;
                    } else if !holding.load(Ordering::SeqCst) {
                        asked.fetch_add(1, Ordering::SeqCst);
                    }
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            if holding.load(Ordering::SeqCst) {
                // The client went away; its held request still reaches the server.
                let _ = st.pass.subscribe().wait_for(|p| *p).await;
                let _ = st.replied.subscribe().wait_for(|r| *r).await;
            }
        };
        let down = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = sr.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                if holding.load(Ordering::SeqCst) && *st.pass.borrow() {
                    st.replied.send_replace(true);
                } else if asked.swap(0, Ordering::SeqCst) > 0 {
                    st.others_answered.send_modify(|n| *n += 1);
                }
                let _ = cw.write_all(&buf[..n]).await;
                if *st.replied.borrow() && holding.load(Ordering::SeqCst) {
                    break;
                }
            }
        };
        tokio::join!(up, down);
    }

    async fn wait_held(&self) {
        let _ = self.state.held.subscribe().wait_for(|h| *h).await;
    }

    fn pass(&self) {
        self.state.pass.send_replace(true);
    }

    async fn wait_replied(&self) {
        let _ = self.state.replied.subscribe().wait_for(|r| *r).await;
    }

    async fn wait_others_answered(&self, n: usize) {
        let _ = self
            .state
            .others_answered
            .subscribe()
            .wait_for(|m| *m >= n)
            .await;
    }
}

/// Acquires and releases `lock` once directly: the scripts are loaded and the lock's records
/// exist, so that the next acquisition is a single request.
async fn warm_up(server: &RedisServer, prefix: &str, lock: &str) {
    wait_uptime(server, MAX_LEASE).await;
    let l = backend(server, prefix).lock(lock).unwrap();
    let held = tokio::time::timeout(WAIT, l.acquire(request("warm-up", MAX_LEASE)))
        .await
        .unwrap()
        .unwrap();
    held.release().await.unwrap();
}

#[tokio::test]
async fn an_abandoned_acquisition_that_arrives_late_leaves_no_lock_behind() {
    // The acquisition's request is delayed on its connection beyond the command timeout; the
    // backend gives up and releases on a new connection, which overtakes the delayed request.
    let Some(server) = redis().await else { return };
    let prefix = prefix("late-acquire");
    warm_up(&server, &prefix, "late").await;
    let lock_key = format!("{{{prefix}:late}}:lock");
    let proxy = HoldingProxy::start(server.addr(), &lock_key).await;
    let lock = backend_at(&format!("redis://{}", proxy.addr), &prefix)
        .key_events(KeyEvents::Off)
        .lock("late")
        .unwrap();
    let mut acquiring = lock.acquire(request("a", MAX_LEASE));
    tokio::select! {
        res = &mut acquiring => panic!("acquired through a held request: {:?}", res.map(|l| l.term())),
        () = proxy.wait_held() => {}
    }
    let err = tokio::time::timeout(WAIT, acquiring)
        .await
        .expect("the acquisition to give up")
        .expect_err("granted while its request was held");
    println!("acquisition gave up: {err}");
    // The abandon-release went out on another connection and was answered.
    tokio::time::timeout(WAIT, proxy.wait_others_answered(1))
        .await
        .expect("the abandon-release to reach the server");
    proxy.pass();
    tokio::time::timeout(WAIT, proxy.wait_replied())
        .await
        .expect("the delayed acquisition to reach the server");
    let owner: Option<String> = command(&server, redis::cmd("GET").arg(&lock_key)).await;
    let pttl: i64 = command(&server, redis::cmd("PTTL").arg(&lock_key)).await;
    assert!(
        owner.is_none(),
        "the late acquisition left a lock nobody holds (token {owner:?}, {pttl} ms to live)"
    );
    // And another node gets the lock at once.
    let other = backend(&server, &prefix).lock("late").unwrap();
    let next = tokio::time::timeout(MAX_LEASE / 2, other.acquire(request("b", MAX_LEASE)))
        .await
        .expect("the lock to be free")
        .unwrap();
    next.release().await.unwrap();
}

#[tokio::test]
async fn a_grant_dropped_with_its_acquisition_is_released_at_once() {
    // The grant is on its way to an acquisition that is dropped before it looks (an elector
    // shutting down): the lock must be handed over at once, not after the lease.
    let Some(server) = redis().await else { return };
    let prefix = prefix("dropped-grant");
    let lease = MAX_LEASE;
    warm_up(&server, &prefix, "grant").await;
    let lock_key = format!("{{{prefix}:grant}}:lock");
    let proxy = HoldingProxy::start(server.addr(), &lock_key).await;
    let lock = backend_at(&format!("redis://{}", proxy.addr), &prefix)
        .key_events(KeyEvents::Off)
        .lock("grant")
        .unwrap();
    let mut acquiring = lock.acquire(request("a", lease));
    tokio::select! {
        res = &mut acquiring => panic!("acquired through a held request: {:?}", res.map(|l| l.term())),
        () = proxy.wait_held() => {}
    }
    proxy.pass();
    proxy.wait_replied().await;
    // Give the grant time to reach the acquisition's channel, without polling the acquisition.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let owner: Option<String> = command(&server, redis::cmd("GET").arg(&lock_key)).await;
    assert!(owner.is_some(), "the acquisition was not granted");
    drop(acquiring);
    let dropped = Instant::now();
    let other = backend(&server, &prefix).lock("grant").unwrap();
    let next = tokio::time::timeout(WAIT, other.acquire(request("b", lease)))
        .await
        .expect("b to acquire")
        .unwrap();
    let took = dropped.elapsed();
    println!("grant dropped with its acquisition → next node acquired after {took:?}");
    assert!(
        took < lease / 2,
        "the dropped grant held the lock for {took:?} (lease {lease:?})"
    );
    next.release().await.unwrap();
}
