//! Host groups with real processes: node processes that share a host directory
//! (`TOWER_PRIMARY_HOST_DIR`) campaign as one group. Every scenario is a module with one test per
//! server backend (`redis`, `postgres`, `etcd`):
//!
//! - `one_candidate_many_workers`: one primary, every follower names the same holder (term and
//!   pid), and only the candidate holds connections to the server (counted from `/proc` for each
//!   process, whatever the server; PostgreSQL's `pg_stat_activity` agrees): as many with 6
//!   workers as with 1;
//! - `worker_kill_resumes`: a `SIGKILL`ed candidate (three in a row) is succeeded by a sibling
//!   with a higher term, which takes the lease over on Redis and etcd and joins the queue at once
//!   on PostgreSQL;
//! - `container_stop_leaves_no_lease`: `SIGTERM` to every worker at once: all exit, the server
//!   holds nothing for the lock right after the last exit, and a new group takes it at once;
//! - `handover_on_exit`: a `SIGTERM`ed candidate hands its lease to a sibling;
//! - `stopped_candidate_is_replaced`: a `SIGSTOP`ped candidate is replaced, after its lease and a
//!   margin, by a follower with a fresh identity; resumed, it steps down (no overlap besides its
//!   frozen term, which its deadline ended);
//! - `bad_host_dir_is_refused`: a missing, symlinked, mode 0777, not-a-directory or (as root)
//!   another user's host directory is a clear error at spawn, never a primary;
//! - `corrupt_host_record_is_not_resumed`: a torn `.host` is replaced by a fresh candidate's;
//! - `exit_with_a_killed_sibling`, `exit_with_a_stopped_sibling`: a candidate that exits with no
//!   sibling able to take its lease leaves none on the server;
//! - `two_hosts_one_primary`: two host directories on one lock, one primary over both; a killed
//!   candidate's lease stays on its host on lease backends;
//! - `stopped_follower_keeps_the_candidate`: a follower frozen for leases, resumed, does not
//!   replace a live candidate;
//! - `mixed_backends`: a newcomer of another backend in a host directory is refused at spawn.
//!
//! A takeover of the lease (a resume) is read from the server, not from the clock: on etcd the
//! candidate key (named by its etcd lease) that holds the lock stays the same; on Redis the
//! successor is granted before the old lock key could have run out (its `PTTL`, read before the
//! signal) with no `released` message on the lock's channel in between, which no fresh
//! acquisition can do.
//!
//! Redis is the machine's server at 127.0.0.1:6379 (a key prefix per test), PostgreSQL the
//! machine's (`DATABASE_URL`, or `postgres://root@127.0.0.1:5432/test`, a namespace and an
//! application name per test), etcd a server of each test's own. Without one of them the test
//! prints `SKIPPED` (or fails when `TOWER_PRIMARY_REQUIRE_BACKENDS=1`). Tests run one at a time.
//!
//! ```text
//! cargo test -p tower-primary --all-features --test host_groups -- --nocapture
//! ```
#![cfg(all(
    feature = "file",
    feature = "redis",
    feature = "postgres",
    feature = "etcd"
))]

mod common;

use common::ms;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tower_primary::backend::AcquireRequest;
use tower_primary::backend::host::HOST_DIR_ENV;
use tower_primary::{Clock, Lease, NodeId};
use tower_primary_lab::node::{
    Cluster, Event, EventKind, NodeCommand, NodeConfig, NodeSignal, ObservedRole,
};
use tower_primary_lab::servers::{self, EtcdServer, TempDir};
use tower_primary_lab::sockets::established_to;
use tower_primary_testing::history::History;

/// Bounds a broken run only.
const WAIT: Duration = Duration::from_secs(40);

static SERIAL: Mutex<()> = Mutex::const_new(());

/// The node side of this binary: the tests re-execute it in node mode.
#[test]
fn node_entry() {
    common::node_entry();
}

// ---------------------------------------------------------------------------------------------
// Servers

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Redis,
    Postgres,
    Etcd,
}

impl Kind {}

/// One backend's server for one test: where it listens and a key space of the test's own.
struct Server {
    kind: Kind,
    /// The backend string without the test's parameters.
    base: String,
    port: u16,
    /// The key prefix (Redis, etcd) or namespace (PostgreSQL) of this test.
    space: String,
    _etcd: Option<EtcdServer>,
}

impl Server {
    async fn start(kind: Kind, test: &str) -> Option<Server> {
        let space = format!(
            "hg-{test}-{}-{:x}",
            std::process::id(),
            tower_primary::clock::monotonic_nanos()
        );
        let (base, port, etcd) = match kind {
            Kind::Redis => {
                let base = "redis://127.0.0.1:6379".to_owned();
                servers::require("redis at 127.0.0.1:6379", redis_ping(&base).await)?;
                (base, 6379, None)
            }
            Kind::Postgres => {
                let base = servers::postgres_url();
                let port = servers::require("postgres", postgres_port(&base).await)?;
                (base, port, None)
            }
            Kind::Etcd => {
                let etcd = servers::require("etcd", EtcdServer::start().await)?;
                (etcd.url(), etcd.addr().port(), Some(etcd))
            }
        };
        Some(Server {
            kind,
            base,
            port,
            space,
            _etcd: etcd,
        })
    }

    /// The backend string of this test's nodes, whose lease is `lease`.
    fn url(&self, lease: Duration) -> String {
        self.url_in(0, lease)
    }

    /// The backend string in Redis database `db` (the same for the other backends).
    fn url_in(&self, db: u8, lease: Duration) -> String {
        match self.kind {
            Kind::Redis => format!(
                "{}/{db}?prefix={}&max_lease={}ms",
                self.base,
                self.space,
                lease.as_millis()
            ),
            Kind::Postgres => {
                let sep = if self.base.contains('?') { '&' } else { '?' };
                format!(
                    "{}{sep}namespace={}&application_name={}",
                    self.base, self.space, self.space
                )
            }
            Kind::Etcd => format!("{}?prefix={}", self.base, self.space),
        }
    }
}

/// PostgreSQL's own count of this test's sessions (`pg_stat_activity`, by the application name
/// the test's backend strings give).
async fn postgres_sessions(server: &Server) -> usize {
    let (client, conn) = tokio_postgres::connect(&server.base, tokio_postgres::NoTls)
        .await
        .expect("an admin connection");
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1 || '%'",
            &[&server.space],
        )
        .await
        .expect("pg_stat_activity");
    usize::try_from(row.get::<_, i64>(0)).unwrap_or(usize::MAX)
}

/// The server's own record of the lease on `lock`: the Redis lock key's token, or the key of the
/// oldest etcd candidate (named by its etcd lease); `None` when nothing holds it. PostgreSQL's
/// session lock has no lease: whether one of this test's sessions holds an advisory lock.
async fn lease_on_server(server: &Server, lock: &str) -> Option<String> {
    match server.kind {
        Kind::Redis => {
            let client = redis::Client::open(server.base.as_str()).expect("a Redis URL");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("a Redis connection");
            redis::cmd("GET")
                .arg(format!("{{{}:{lock}}}:lock", server.space))
                .query_async::<Option<String>>(&mut conn)
                .await
                .expect("GET the lock key")
        }
        Kind::Etcd => {
            let mut client =
                etcd_client::Client::connect([server.base.replace("etcd://", "http://")], None)
                    .await
                    .expect("an etcd connection");
            let options = etcd_client::GetOptions::new()
                .with_prefix()
                .with_sort(
                    etcd_client::SortTarget::Create,
                    etcd_client::SortOrder::Ascend,
                )
                .with_limit(1);
            let found = client
                .get(format!("{}/{lock}/election/", server.space), Some(options))
                .await
                .expect("etcd get");
            found
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        }
        Kind::Postgres => {
            let (client, conn) = tokio_postgres::connect(&server.base, tokio_postgres::NoTls)
                .await
                .expect("an admin connection");
            tokio::spawn(conn);
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                     WHERE l.locktype = 'advisory' AND l.granted \
                     AND a.application_name LIKE $1 || '%'",
                    &[&server.space],
                )
                .await
                .expect("pg_locks");
            (row.get::<_, i64>(0) > 0).then(|| "an advisory lock".to_owned())
        }
    }
}

/// What Redis says about a lease while its holder changes: when the lock key would run out at
/// the earliest (read when the watch began), and the messages of the lock's event channel since.
/// A successor granted before that time, with no `released` message in between, took the lease
/// over: a fresh acquisition waits until the key is released or runs out.
struct RedisLeaseWatch {
    /// `CLOCK_MONOTONIC` ns before which the key cannot have run out.
    runs_out: u64,
    messages: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RedisLeaseWatch {
    async fn start(server: &Server, lock: &str) -> RedisLeaseWatch {
        use futures_util::StreamExt as _;
        let client = redis::Client::open(server.base.as_str()).expect("a Redis URL");
        let tag = format!("{{{}:{lock}}}", server.space);
        let mut pubsub = client
            .get_async_pubsub()
            .await
            .expect("a Redis subscription");
        pubsub
            .subscribe(format!("{tag}:events"))
            .await
            .expect("SUBSCRIBE");
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = messages.clone();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let text = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                seen.lock().unwrap().push(text);
            }
        });
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("a Redis connection");
        let read_at = tower_primary::clock::monotonic_nanos();
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{tag}:lock"))
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert!(
            pttl > 0,
            "the lock key has no lease to take over (PTTL {pttl})"
        );
        RedisLeaseWatch {
            runs_out: read_at + u64::try_from(pttl).unwrap_or(0) * 1_000_000,
            messages,
            task,
        }
    }

    /// Why `granted_at` (`CLOCK_MONOTONIC` ns) was not a takeover of the watched lease, if it
    /// was not.
    fn not_taken_over(&self, granted_at: u64) -> Option<String> {
        let messages = self.messages.lock().unwrap().clone();
        if granted_at >= self.runs_out {
            return Some(format!(
                "granted {:.1} ms after the lock key could have run out",
                ms(self.runs_out, granted_at)
            ));
        }
        messages
            .iter()
            .any(|m| m.starts_with("released"))
            .then(|| format!("the lease was released to Redis in between: {messages:?}"))
    }
}

impl Drop for RedisLeaseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn redis_ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "no answer within 2 s".to_owned())?
    .map_err(|e| e.to_string())?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn postgres_port(url: &str) -> Result<u16, String> {
    let config: tokio_postgres::Config = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(2),
        config.connect(tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| "no answer within 2 s".to_owned())?
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| e.to_string())?;
    Ok(config.get_ports().first().copied().unwrap_or(5432))
}

// ---------------------------------------------------------------------------------------------
// Groups

/// A host directory of its own (mode 0700), for `lock`.
fn host_dir() -> TempDir {
    let dir = TempDir::new("host-group").expect("a temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod 0700");
    dir
}

/// This binary in node mode, in the host group of `dir`.
fn in_group(dir: &Path) -> NodeCommand {
    NodeCommand::test_entry("node_entry")
        .expect("the test binary's path")
        .env(HOST_DIR_ENV, dir)
}

/// A host group of node processes on one server.
struct Group {
    cluster: Cluster,
    dir: TempDir,
    server: Server,
    lock: String,
    lease: Duration,
}

impl Group {
    async fn new(kind: Kind, test: &str, lease: Duration) -> Option<Group> {
        let server = Server::start(kind, test).await?;
        let dir = host_dir();
        let lock = test.to_owned();
        let config = NodeConfig::new(server.url(lease), &lock)
            .lease(lease)
            .grace(Duration::from_secs(2));
        Some(Group {
            cluster: Cluster::new(in_group(dir.path()), config),
            dir,
            server,
            lock,
            lease,
        })
    }

    fn spawn(&mut self, n: usize) -> Vec<u32> {
        self.cluster.spawn_nodes(n).expect("node processes")
    }

    fn live(&self) -> Vec<u32> {
        self.cluster
            .states()
            .values()
            .filter(|s| s.alive)
            .map(|s| s.pid)
            .collect()
    }

    /// Waits until exactly one live node is primary, its task started, and every other live,
    /// running node reports it (its term and pid) as the holder: (pid, term).
    async fn settled(&self) -> (u32, u64) {
        let res = self
            .cluster
            .wait_for(
                "one primary, named (term and pid) by every follower",
                WAIT,
                group_settled,
            )
            .await;
        res.unwrap_or_else(|e| panic!("{:?}: {e}", self.server.kind))
    }

    /// Connections of each live node to the server.
    fn connections(&self) -> Vec<(u32, usize)> {
        self.live()
            .into_iter()
            .map(|pid| (pid, established_to(pid, self.server.port).unwrap_or(0)))
            .collect()
    }

    /// The `.host` record of the lock, as JSON.
    fn host_record(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{}.host", self.lock)));
        serde_json::from_str(&text.ok()?).ok()
    }

    /// Panics with the dump unless `cond`.
    #[track_caller]
    fn ensure(&self, cond: bool, what: impl FnOnce() -> String) {
        assert!(
            cond,
            "{:?}: {}\n{}",
            self.server.kind,
            what(),
            self.cluster.dump()
        );
    }

    /// Takes the lock directly on the backend within half a lease: no lease is left held.
    async fn lock_is_free(&self) -> bool {
        let backend = tower_primary::backend::from_url(&self.server.url(self.lease)).unwrap();
        let lock = backend.lock(&self.lock).unwrap();
        let req = AcquireRequest::new(NodeId::new("probe"))
            .with_lease(Some(Lease::new(self.lease)))
            .with_clock(Clock::system());
        match tokio::time::timeout(self.lease / 2, lock.acquire(req)).await {
            Ok(Ok(leadership)) => {
                let _ = leadership.release().await;
                true
            }
            Ok(Err(e)) => panic!(
                "{:?}: the probe's acquisition failed: {e}",
                self.server.kind
            ),
            Err(_) => false,
        }
    }

    /// `SIGTERM` to every live node, then waits until they have exited.
    async fn stop_all(&self) -> Vec<(u32, Option<i32>)> {
        terminate_all(&self.cluster).await
    }
}

/// `SIGTERM` to every live node of `cluster` at once, then waits until they have exited: their
/// exit codes.
async fn terminate_all(cluster: &Cluster) -> Vec<(u32, Option<i32>)> {
    let live: Vec<u32> = cluster
        .states()
        .values()
        .filter(|s| s.alive)
        .map(|s| s.pid)
        .collect();
    for pid in &live {
        let _ = cluster.signal(*pid, NodeSignal::Term).await;
    }
    let mut codes = Vec::new();
    for pid in live {
        let (code, _) = cluster
            .wait_exit(pid, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        codes.push((pid, code));
    }
    codes
}

/// On a lease backend, that the successor granted at `granted_at` took the lease over rather
/// than waiting for it or taking a new one: on etcd the same candidate key (the same etcd lease)
/// holds the lock as `before`; on Redis the grant came before the old lock key could have run
/// out, and nothing was released to the server in between. Nothing on PostgreSQL (no lease).
async fn check_taken_over(
    g: &Group,
    before: Option<String>,
    redis: Option<&RedisLeaseWatch>,
    granted_at: u64,
    how: &str,
) {
    match g.server.kind {
        Kind::Etcd => {
            let after = lease_on_server(&g.server, &g.lock).await;
            g.ensure(before.is_some() && after == before, || {
                format!("not {how}: the etcd key holding the lock was {before:?}, is {after:?}")
            });
        }
        Kind::Redis => {
            let why = redis.and_then(|w| w.not_taken_over(granted_at));
            g.ensure(why.is_none(), || {
                format!("not {how}: {}", why.unwrap_or_default())
            });
        }
        Kind::Postgres => {}
    }
}

/// The holder (term, pid) the last `secondary` line of each node names.
fn holders(events: &[Event]) -> std::collections::BTreeMap<u32, (Option<u64>, Option<u32>)> {
    let mut last = std::collections::BTreeMap::new();
    for e in events {
        if let EventKind::Secondary {
            holder_term,
            holder_pid,
        } = e.kind
        {
            last.insert(e.pid, (holder_term, holder_pid));
        }
    }
    last
}

/// The lab's settled primary, which every other live, running node also names by pid.
fn group_settled(events: &[Event]) -> Option<(u32, u64)> {
    let (pid, term) = tower_primary_lab::node::settled_primary(events)?;
    let named = holders(events);
    let states = tower_primary_lab::node::node_states(events);
    let all_follow = states
        .values()
        .filter(|s| s.alive && s.pid != pid && !s.stopped)
        .all(|s| named.get(&s.pid) == Some(&(Some(term), Some(pid))));
    all_follow.then_some((pid, term))
}

/// Whether `json` holds the number `pid` anywhere (the `.host` record names its candidate's
/// process; its exact layout is the library's).
fn names_pid(json: &serde_json::Value, pid: u32) -> bool {
    match json {
        serde_json::Value::Number(n) => n.as_u64() == Some(u64::from(pid)),
        serde_json::Value::Array(a) => a.iter().any(|v| names_pid(v, pid)),
        serde_json::Value::Object(o) => o
            .iter()
            .any(|(k, v)| (k.contains("pid") || v.is_object()) && names_pid(v, pid)),
        _ => false,
    }
}

/// Runs `scenario` on one backend, one test at a time.
async fn run<Fut: std::future::Future<Output = ()>>(kind: Kind, scenario: fn(Kind) -> Fut) {
    let _serial: MutexGuard<'_, ()> = SERIAL.lock().await;
    scenario(kind).await;
}

/// A module `$name` of three tests, `redis`, `postgres` and `etcd`, that run `$scenario` on
/// that backend; each may carry attributes (`#[ignore = "why"]`).
macro_rules! on_each_backend {
    ($name:ident, $scenario:ident) => {
        on_each_backend!($name, $scenario, redis: [], postgres: [], etcd: []);
    };
    ($name:ident, $scenario:ident,
     redis: [$(#[$r:meta])*], postgres: [$(#[$p:meta])*], etcd: [$(#[$e:meta])*]) => {
        mod $name {
            use super::{$scenario, Kind, run};

            #[tokio::test]
            $(#[$r])*
            async fn redis() {
                run(Kind::Redis, $scenario).await;
            }

            #[tokio::test]
            $(#[$p])*
            async fn postgres() {
                run(Kind::Postgres, $scenario).await;
            }

            #[tokio::test]
            $(#[$e])*
            async fn etcd() {
                run(Kind::Etcd, $scenario).await;
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// 1. One candidate, many workers

on_each_backend!(one_candidate_many_workers, one_candidate);

async fn one_candidate(kind: Kind) {
    let Some(mut g) = Group::new(kind, "one-candidate", Duration::from_secs(2)).await else {
        return;
    };
    g.spawn(1);
    let (first, term) = g.settled().await;
    let alone: usize = g.connections().iter().map(|(_, n)| n).sum();
    let sessions_alone = if kind == Kind::Postgres {
        postgres_sessions(&g.server).await
    } else {
        0
    };
    g.ensure(alone > 0, || {
        format!(
            "the candidate holds no connection to port {}",
            g.server.port
        )
    });

    // W = 4: the same primary, named by every follower.
    g.spawn(3);
    let settled = g.settled().await;
    g.ensure(settled == (first, term), || {
        format!("the group of 4 settled on {settled:?}, not on the first node {first} term {term}")
    });

    // W = 6: followers hold no connection to the server; the group's total does not grow.
    g.spawn(2);
    let settled = g.settled().await;
    g.ensure(settled == (first, term), || {
        format!("the group of 6 settled on {settled:?}")
    });
    let per_node = g.connections();
    let followers: Vec<_> = per_node.iter().filter(|(pid, _)| *pid != first).collect();
    g.ensure(followers.len() == 5, || format!("{per_node:?}"));
    g.ensure(followers.iter().all(|(_, n)| *n == 0), || {
        format!("followers hold connections to the server: {per_node:?}")
    });
    let six: usize = per_node.iter().map(|(_, n)| n).sum();
    g.ensure(six <= alone, || {
        format!("W=1: {alone} connection(s); W=6: {six} ({per_node:?})")
    });
    println!("{kind:?}: connections to the server with W=1: {alone}, with W=6: {six}");
    let mode = std::fs::metadata(g.dir.path().join(format!("{}.host", g.lock)))
        .map(|m| m.permissions().mode() & 0o777);
    g.ensure(matches!(mode, Ok(0o600)), || {
        format!(
            "the .host record's mode: {:?}",
            mode.map(|m| format!("{m:o}"))
        )
    });
    if kind == Kind::Postgres {
        // The server's view agrees.
        let sessions = postgres_sessions(&g.server).await;
        g.ensure(sessions <= sessions_alone, || {
            format!("pg_stat_activity: W=1: {sessions_alone} session(s); W=6: {sessions}")
        });
        println!(
            "Postgres: sessions in pg_stat_activity with W=1: {sessions_alone}, with W=6: {sessions}"
        );
    }
    g.cluster.assert_history_ok();
    let codes = g.stop_all().await;
    g.ensure(codes.iter().all(|(_, c)| *c == Some(0)), || {
        format!("{codes:?}")
    });
}

// ---------------------------------------------------------------------------------------------
// 2. Worker kill

/// A long lease: a successor that waited for it would show.
const LONG_LEASE: Duration = Duration::from_secs(8);

on_each_backend!(
    worker_kill_resumes,
    worker_kill,
    redis: [],
    postgres: [],
    etcd: []
);

async fn worker_kill(kind: Kind) {
    let Some(mut g) = Group::new(kind, "worker-kill", LONG_LEASE).await else {
        return;
    };
    g.spawn(3);
    // Three candidates in a row: a resumed lease's token must resume again.
    for round in 1..=3 {
        let (old, _) = g.settled().await;
        let before = lease_on_server(&g.server, &g.lock).await;
        let redis = if kind == Kind::Redis {
            Some(RedisLeaseWatch::start(&g.server, &g.lock).await)
        } else {
            None
        };
        let s = g.cluster.kill_primary(WAIT).await;
        assert_eq!(s.old, old);
        let (new, new_term) = g.settled().await;
        g.ensure(new == s.next.pid && new_term > s.term, || {
            format!("settled on {new} term {new_term} after term {}", s.term)
        });
        let record = g.host_record();
        g.ensure(record.as_ref().is_some_and(|r| names_pid(r, new)), || {
            format!("the .host record does not name the successor {new}: {record:?}")
        });
        check_taken_over(&g, before, redis.as_ref(), s.next.at, "resumed").await;
        println!(
            "{kind:?}: SIGKILL of candidate {round} → sibling primary after {:.1} ms (lease {:?})",
            ms(s.signalled_at, s.next.at),
            g.lease
        );
        g.spawn(1);
    }
    g.cluster.assert_history_ok();
    g.stop_all().await;
}

on_each_backend!(exit_with_a_killed_sibling, exit_with_killed_sibling);
on_each_backend!(exit_with_a_stopped_sibling, exit_with_stopped_sibling);

async fn exit_with_killed_sibling(kind: Kind) {
    exit_without_a_taker(kind, NodeSignal::Kill).await;
}

async fn exit_with_stopped_sibling(kind: Kind) {
    exit_without_a_taker(kind, NodeSignal::Stop).await;
}

/// The candidate's only sibling was killed (its announcement may stay behind) or is stopped (it
/// cannot take the candidate lock): the candidate's exit leaves no lease on the server that
/// nobody renews. A stopped sibling, resumed, then campaigns and leads.
async fn exit_without_a_taker(kind: Kind, fate: NodeSignal) {
    let test = if fate == NodeSignal::Kill {
        "exit-killed-sibling"
    } else {
        "exit-stopped-sibling"
    };
    let Some(mut g) = Group::new(kind, test, LONG_LEASE).await else {
        return;
    };
    g.spawn(2);
    let (candidate, term) = g.settled().await;
    let sibling = g.live().into_iter().find(|p| *p != candidate).unwrap();
    g.cluster.signal(sibling, fate).await.unwrap();
    if fate == NodeSignal::Kill {
        g.cluster.wait_exit(sibling, WAIT).await.unwrap();
    }
    g.cluster.signal(candidate, NodeSignal::Term).await.unwrap();
    let exit = g.cluster.wait_exit(candidate, WAIT).await.unwrap();
    g.ensure(exit == (Some(0), None), || format!("exit {exit:?}"));
    let left = lease_on_server(&g.server, &g.lock).await;
    g.ensure(left.is_none(), || {
        format!("the candidate exited without a taker, and the server still holds {left:?}")
    });
    if fate == NodeSignal::Stop {
        g.cluster.signal(sibling, NodeSignal::Cont).await.unwrap();
        let next = g
            .cluster
            .wait_primary_after(term, candidate, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        g.ensure(next.pid == sibling, || format!("{next}"));
        g.cluster.assert_history_ok();
        g.stop_all().await;
    } else {
        g.ensure(g.lock_is_free().await, || {
            "the lock is still held on the backend after the last candidate exited".to_owned()
        });
    }
}

on_each_backend!(
    two_hosts_one_primary,
    two_hosts,
    redis: [],
    postgres: [],
    etcd: []
);

/// Two host groups (two host directories) on one lock: one primary over both. A killed
/// candidate's lease goes to its own host's sibling on Redis and etcd (the resume, before the
/// other host could take it); on PostgreSQL the other host's candidate, queued on the server,
/// may take it.
async fn two_hosts(kind: Kind) {
    let Some(mut g) = Group::new(kind, "two-hosts", LONG_LEASE).await else {
        return;
    };
    let other = host_dir();
    let config = g.cluster.config().clone();
    let mut host_of = std::collections::BTreeMap::new();
    for _ in 0..2 {
        host_of.insert(g.spawn(1)[0], "a");
        let pid = g
            .cluster
            .spawn_node_running(&in_group(other.path()), &config)
            .unwrap();
        host_of.insert(pid, "b");
    }
    for _ in 0..2 {
        let (old, _) = g.settled().await;
        let s = g.cluster.kill_primary(WAIT).await;
        let (old_host, new_host) = (host_of[&old], host_of[&s.next.pid]);
        if kind != Kind::Postgres {
            g.ensure(old_host == new_host, || {
                format!(
                    "the killed candidate of host {old_host} was succeeded by host {new_host}, \
                     not by its own sibling"
                )
            });
        }
        println!(
            "{kind:?}: two hosts: candidate of host {old_host} killed → host {new_host} primary \
             after {:.1} ms",
            ms(s.signalled_at, s.next.at)
        );
        // The killed node's host gets a new worker.
        let pid = if old_host == "a" {
            g.spawn(1)[0]
        } else {
            g.cluster
                .spawn_node_running(&in_group(other.path()), &config)
                .unwrap()
        };
        host_of.insert(pid, old_host);
    }
    g.cluster.assert_history_ok();
    g.stop_all().await;
}

on_each_backend!(stopped_follower_keeps_the_candidate, stopped_follower);

/// A follower frozen for several leases and resumed must not take a live candidate's heartbeat
/// for a stale one: the candidate stays primary in its term, and nobody else becomes primary.
async fn stopped_follower(kind: Kind) {
    let Some(mut g) = Group::new(kind, "stopped-follower", Duration::from_secs(2)).await else {
        return;
    };
    g.spawn(3);
    let (candidate, term) = g.settled().await;
    let follower = g.live().into_iter().find(|p| *p != candidate).unwrap();
    // The candidate's own ticks measure the time: 3 leases frozen, 3 leases after.
    let ticks_per_lease = (g.lease.as_millis() / g.cluster.config().tick.as_millis()) as u64;
    let tick_of = |events: &[Event]| {
        events
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::Tick { term: t, n } if e.pid == candidate && t == term => Some(n),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    };
    let wait_ticks = |from: u64, what: &'static str| {
        let target = from + 3 * ticks_per_lease;
        g.cluster.wait_for(what, WAIT, move |events| {
            (tick_of(events) >= target).then_some(())
        })
    };
    g.cluster.signal(follower, NodeSignal::Stop).await.unwrap();
    let now = tick_of(&g.cluster.events());
    wait_ticks(
        now,
        "three leases of the candidate's ticks while a follower is stopped",
    )
    .await
    .unwrap();
    let resumed = g.cluster.signal(follower, NodeSignal::Cont).await.unwrap();
    let now = tick_of(&g.cluster.events());
    wait_ticks(
        now,
        "three leases of the candidate's ticks after the follower resumed",
    )
    .await
    .unwrap();
    let events = g.cluster.events();
    let change = events.iter().find(|e| {
        e.at > resumed
            && match e.kind {
                EventKind::Primary { term: t } => t != term,
                EventKind::TaskCancelled { .. } => e.pid == candidate,
                _ => false,
            }
    });
    g.ensure(change.is_none(), || {
        format!("a resumed follower disturbed the live candidate: {change:?}")
    });
    let settled = g.settled().await;
    g.ensure(settled == (candidate, term), || {
        format!("settled on {settled:?}")
    });
    g.cluster.assert_history_ok();
    g.stop_all().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Container stop

on_each_backend!(container_stop_leaves_no_lease, container_stop);

async fn container_stop(kind: Kind) {
    let Some(mut g) = Group::new(kind, "container-stop", LONG_LEASE).await else {
        return;
    };
    g.spawn(4);
    g.settled().await;
    let codes = g.stop_all().await;
    g.ensure(codes.iter().all(|(_, c)| *c == Some(0)), || {
        format!("not every worker exited with 0: {codes:?}")
    });
    g.cluster.assert_history_ok();
    let left = lease_on_server(&g.server, &g.lock).await;
    g.ensure(left.is_none(), || {
        format!("every worker exited, and the server still holds {left:?}")
    });
    g.ensure(g.lock_is_free().await, || {
        format!(
            "the lock is still held on the backend after every worker exited (waited {:?})",
            g.lease / 2
        )
    });
    // A new group on another host directory takes it at once.
    let dir = host_dir();
    let mut next = Cluster::new(in_group(dir.path()), g.cluster.config().clone());
    next.spawn_nodes(2).unwrap();
    let (pid, term) = next.wait_settled(WAIT).await.unwrap();
    println!("{kind:?}: after a container stop a new group is primary: pid {pid} term {term}");
    terminate_all(&next).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Handover on exit

on_each_backend!(
    handover_on_exit,
    handover,
    redis: [],
    postgres: [],
    etcd: []
);

async fn handover(kind: Kind) {
    let Some(mut g) = Group::new(kind, "handover", LONG_LEASE).await else {
        return;
    };
    g.spawn(3);
    g.settled().await;
    let before = lease_on_server(&g.server, &g.lock).await;
    let redis = if kind == Kind::Redis {
        Some(RedisLeaseWatch::start(&g.server, &g.lock).await)
    } else {
        None
    };
    let h = g.cluster.terminate_primary(WAIT).await;
    let s = &h.succession;
    let (new, new_term) = g.settled().await;
    g.ensure(new == s.next.pid && new_term > s.term, || {
        format!("settled on {new} term {new_term} after term {}", s.term)
    });
    check_taken_over(&g, before, redis.as_ref(), s.next.at, "handed over").await;
    let record = g.host_record();
    g.ensure(record.as_ref().is_some_and(|r| names_pid(r, new)), || {
        format!("the .host record does not name the sibling {new}: {record:?}")
    });
    println!(
        "{kind:?}: SIGTERM of the candidate → sibling primary after {:.1} ms",
        ms(s.signalled_at, s.next.at)
    );
    g.stop_all().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Stopped candidate

on_each_backend!(stopped_candidate_is_replaced, stopped_candidate);

async fn stopped_candidate(kind: Kind) {
    let Some(mut g) = Group::new(kind, "stopped", Duration::from_secs(2)).await else {
        return;
    };
    g.spawn(3);
    let (old, term) = g.settled().await;
    let before = lease_on_server(&g.server, &g.lock).await;
    let redis = if kind == Kind::Redis {
        Some(RedisLeaseWatch::start(&g.server, &g.lock).await)
    } else {
        None
    };
    let stopped = g.cluster.signal(old, NodeSignal::Stop).await.unwrap();
    let next = g
        .cluster
        .wait_primary_after(term, old, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    let new_term = next.term().unwrap();
    // A fresh identity, not a resume: a new etcd lease; on Redis, granted only once the stopped
    // candidate's key could have run out.
    match kind {
        Kind::Etcd => {
            let after = lease_on_server(&g.server, &g.lock).await;
            g.ensure(after.is_some() && after != before, || {
                format!(
                    "the stopped candidate's etcd key {before:?} still holds the lock: {after:?}"
                )
            });
        }
        Kind::Redis => {
            let w = redis.as_ref().expect("a Redis watch");
            g.ensure(next.at >= w.runs_out, || {
                format!(
                    "the stopped candidate's Redis lease was taken over {:.1} ms before it \
                     could run out",
                    ms(next.at, w.runs_out)
                )
            });
        }
        Kind::Postgres => {}
    }
    let record = g.host_record();
    g.ensure(
        record.as_ref().is_some_and(|r| names_pid(r, next.pid)),
        || {
            format!(
                "the .host record does not name the replacement {}: {record:?}",
                next.pid
            )
        },
    );
    let resumed = g.cluster.signal(old, NodeSignal::Cont).await.unwrap();
    g.cluster
        .wait_event("the resumed candidate to report secondary", WAIT, |e| {
            e.pid == old && e.at > resumed && matches!(e.kind, EventKind::Secondary { .. })
        })
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    let events = g.cluster.events();
    let late_tick = events.iter().find(|e| {
        e.pid == old
            && e.at > resumed
            && matches!(e.kind, EventKind::Tick { term: t, .. } if t == term)
    });
    g.ensure(late_tick.is_none(), || {
        format!("the resumed candidate ran its old term: {late_tick:?}")
    });
    let settled = g.settled().await;
    g.ensure(settled == (next.pid, new_term), || {
        format!("settled on {settled:?}, not on the replacement")
    });
    // Apart from the frozen period (ended by its deadline, which no line shows), no overlap.
    let mut others = History::new();
    for p in g.cluster.history().periods() {
        if !(p.node == old.to_string() && p.term == term) {
            others.push(p.clone());
        }
    }
    let report = others.check();
    g.ensure(report.is_ok(), || report.to_string());
    println!(
        "{kind:?}: SIGSTOP of the candidate (lease {:?}) → replacement primary after {:.1} ms",
        g.lease,
        ms(stopped, next.at)
    );
    g.stop_all().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Bad input through the environment

on_each_backend!(bad_host_dir_is_refused, bad_host_dir);

async fn bad_host_dir(kind: Kind) {
    let Some(server) = Server::start(kind, "bad-dir").await else {
        return;
    };
    let base = TempDir::new("host-group-bad").unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let missing = base.path().join("missing");
    let real = base.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = base.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let file = base.path().join("file");
    std::fs::write(&file, b"").unwrap();
    // Another user's directory (the tests run as root; as anyone else this case is left out).
    let foreign = base.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
    let foreign_owned = nix::unistd::geteuid().is_root()
        && std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).is_ok();

    let mut cases: Vec<(&Path, &[&str])> = vec![
        (&missing, &["exist", "missing", "not found", "no such"]),
        (&link, &["symlink", "symbolic link"]),
        (&open, &["writable", "mode", "777", "permission"]),
        (&file, &["not a directory"]),
    ];
    if foreign_owned {
        cases.push((&foreign, &["owned", "owner"]));
    }
    let config = NodeConfig::new(server.url(Duration::from_secs(2)), "bad-dir")
        .lease(Duration::from_secs(2));
    for (dir, words) in cases {
        let mut cluster = Cluster::new(in_group(dir), config.clone());
        let pid = cluster.spawn_node().unwrap();
        // Until it exits or reports a role, whichever comes first.
        let first = cluster
            .wait_event("the node to exit or report a role", WAIT, |e| {
                e.pid == pid
                    && matches!(
                        e.kind,
                        EventKind::Exited { .. }
                            | EventKind::Primary { .. }
                            | EventKind::Secondary { .. }
                    )
            })
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {}: {e}", dir.display()));
        let code = match first.kind {
            EventKind::Exited { code, .. } => code,
            _ => None,
        };
        let events = cluster.events();
        let message = events.iter().find_map(|e| match &e.kind {
            EventKind::Error { message } => Some(message.to_lowercase()),
            _ => None,
        });
        let named = message
            .as_deref()
            .is_some_and(|m| words.iter().any(|w| m.contains(w)));
        assert!(
            code == Some(2) && named,
            "{kind:?}: host dir {}: expected a spawn error naming one of {words:?}, got exit {code:?} \
             and {message:?}\n{}",
            dir.display(),
            cluster.dump()
        );
        assert!(
            !events
                .iter()
                .any(|e| matches!(e.kind, EventKind::Primary { .. })),
            "{kind:?}: a node with a bad host dir became primary\n{}",
            cluster.dump()
        );
        println!(
            "{kind:?}: {} → {}",
            dir.display(),
            message.unwrap_or_default()
        );
    }
}

on_each_backend!(corrupt_host_record_is_not_resumed, corrupt_host_record);

/// A `.host` record that is not JSON (a torn write, a disk error) is not resumed from: the group
/// elects a candidate with a fresh identity, which rewrites the record.
async fn corrupt_host_record(kind: Kind) {
    let Some(mut g) = Group::new(kind, "corrupt-host", Duration::from_secs(2)).await else {
        return;
    };
    let record = g.dir.path().join(format!("{}.host", g.lock));
    std::fs::write(&record, b"{\"address\": tru").unwrap();
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o600)).unwrap();
    g.spawn(2);
    let (pid, term) = g.settled().await;
    let rewritten = g.host_record();
    g.ensure(
        rewritten.as_ref().is_some_and(|r| names_pid(r, pid)),
        || format!("the corrupt .host was not replaced by the candidate's: {rewritten:?}"),
    );
    println!("{kind:?}: a corrupt .host → candidate {pid}, term {term}");
    g.cluster.assert_history_ok();
    g.stop_all().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Mixed groups

/// A node of `other`'s backend joins a host directory whose candidate campaigns on `first`'s
/// (Redis database 0, or PostgreSQL). The host group refuses it at spawn, naming both backends
/// (the module's choice: a clear error for the newcomer), and the candidate keeps its term.
async fn newcomer_of_another_backend(
    first: Kind,
    other: impl FnOnce(&Server, Duration) -> Option<String>,
) {
    let _serial = SERIAL.lock().await;
    let lease = Duration::from_secs(2);
    let Some(first_server) = Server::start(first, "mixed").await else {
        return;
    };
    let Some(other) = other(&first_server, lease) else {
        return;
    };
    let first_url = first_server.url(lease);
    let dir = host_dir();
    let lock = "mixed";
    let config = NodeConfig::new(&first_url, lock)
        .lease(lease)
        .grace(Duration::from_secs(2));
    let mut cluster = Cluster::new(in_group(dir.path()), config);
    let first = cluster.spawn_node().unwrap();
    let (pid, term) = cluster.wait_settled(WAIT).await.unwrap();
    assert_eq!(pid, first);
    let second = cluster
        .spawn_node_with(&NodeConfig::new(&other, lock).lease(lease))
        .unwrap();
    let first_report = cluster
        .wait_event("the newcomer to exit or report a role", WAIT, |e| {
            e.pid == second
                && matches!(
                    e.kind,
                    EventKind::Exited { .. }
                        | EventKind::Primary { .. }
                        | EventKind::Secondary { .. }
                )
        })
        .await
        .unwrap();
    let message = cluster.events().into_iter().find_map(|e| match e.kind {
        EventKind::Error { message } if e.pid == second => Some(message),
        _ => None,
    });
    assert!(
        matches!(first_report.kind, EventKind::Exited { code: Some(2), .. })
            && message.as_deref().is_some_and(|m| {
                // Both backends named: their schemes at least.
                m.contains("same backend") && m.contains(&first_url[..4]) && m.contains(&other[..4])
            }),
        "{other}: the newcomer was not refused with an error naming both backends: {message:?}\n{}",
        cluster.dump()
    );
    assert!(
        cluster
            .states()
            .get(&first)
            .is_some_and(|s| s.role == Some(ObservedRole::Primary { term })),
        "the candidate lost its term to a newcomer of another backend\n{}",
        cluster.dump()
    );
    cluster.assert_history_ok();
    println!("{other}: refused: {}", message.unwrap_or_default());
    terminate_all(&cluster).await;
}

mod mixed_backends {
    use super::{Kind, Server, newcomer_of_another_backend};

    #[tokio::test]
    async fn redis_databases() {
        newcomer_of_another_backend(Kind::Redis, |redis, lease| Some(redis.url_in(1, lease))).await;
    }

    #[tokio::test]
    async fn redis_and_postgres() {
        let pg = Server::start(Kind::Postgres, "mixed").await;
        newcomer_of_another_backend(Kind::Redis, |_, lease| pg.map(|pg| pg.url(lease))).await;
    }

    #[tokio::test]
    async fn redis_and_etcd() {
        let etcd = Server::start(Kind::Etcd, "mixed").await;
        newcomer_of_another_backend(Kind::Redis, |_, lease| {
            etcd.as_ref().map(|etcd| etcd.url(lease))
        })
        .await;
    }

    #[tokio::test]
    async fn postgres_namespaces() {
        newcomer_of_another_backend(Kind::Postgres, |pg, lease| {
            Some(
                pg.url(lease)
                    .replace("namespace=hg-", "namespace=hg-other-"),
            )
        })
        .await;
    }
}
