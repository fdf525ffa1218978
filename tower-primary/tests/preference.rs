//! Deploy-aware leadership with real node processes: priorities, readiness, reservations and
//! host groups. Every scenario is a module with one test per backend (`file`, `redis`,
//! `postgres`, `etcd`):
//!
//! - `no_flapping`: three nodes of equal priority keep their primary over many settle times; a
//!   higher-priority node that is not ready moves nothing either; once it is ready
//!   (an order through its stdin), the lock moves to it, once;
//! - `higher_priority_takes_over_once`: a node of a higher priority that starts is handed the
//!   lock (a reserved handover: the old primary's `handing-over` line names it) with a higher
//!   term, and it stays there;
//! - `stopped_target_costs_the_window`: a directed handover to a `SIGSTOP`ped node: no other
//!   waiter takes the lock during the window, and one does after it (the time is printed);
//! - `killed_target_is_replaced`: the target of a preferred handover is `SIGKILL`ed right after
//!   the decision: another waiter is primary within the window plus one failover (printed);
//! - `dead_primary_is_not_a_target`: the highest-priority primary is `SIGKILL`ed; its successor
//!   must not hand the lock to the dead node (a reservation for a node that cannot take it
//!   costs the whole window without a primary);
//! - `drain_hands_over`: a drained primary hands the lock to the best eligible candidate and
//!   never leads again.
//!
//! `host_group_priority` (server backends): two host groups; a group's priority is its best
//! ready member's.
//!
//! Redis and etcd are servers of each test's own (`tower_primary_lab::servers`), PostgreSQL the
//! machine's (`DATABASE_URL`, or `postgres://root@127.0.0.1:5432/test`; a namespace per test).
//! Without one the test prints `SKIPPED` (or fails when `TOWER_PRIMARY_REQUIRE_BACKENDS=1`).
//!
//! ```text
//! cargo test -p tower-primary --all-features --test preference -- --nocapture --test-threads=1
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
use std::time::Duration;

use tower_primary_lab::node::{
    Cluster, Event, EventKind, NodeCommand, NodeConfig, NodeSignal, ObservedRole, Order,
};
use tower_primary_lab::servers::{self, EtcdServer, RedisServer, TempDir};

/// Bounds a broken run only.
const WAIT: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_millis(200);
const WINDOW: Duration = Duration::from_secs(2);

/// The node side of this binary: the tests re-execute it in node mode.
#[test]
fn node_entry() {
    common::node_entry();
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    Redis,
    Postgres,
    Etcd,
}

/// A backend for one test; dropped at its end.
struct Backend {
    url: String,
    _dir: Option<TempDir>,
    _redis: Option<RedisServer>,
    _etcd: Option<EtcdServer>,
}

impl Backend {
    async fn start(kind: Kind, test: &str) -> Option<Backend> {
        let space = format!(
            "pref-{test}-{}-{:x}",
            std::process::id(),
            tower_primary::clock::monotonic_nanos()
        );
        let mut backend = Backend {
            url: String::new(),
            _dir: None,
            _redis: None,
            _etcd: None,
        };
        match kind {
            Kind::File => {
                let dir = TempDir::new("preference").expect("a temporary directory");
                backend.url = dir.path().display().to_string();
                backend._dir = Some(dir);
            }
            Kind::Redis => {
                let redis = servers::require("redis-server", RedisServer::start().await)?;
                backend.url = format!(
                    "{}?prefix={space}&max_lease={}ms",
                    redis.url(),
                    LEASE.as_millis()
                );
                backend._redis = Some(redis);
            }
            Kind::Postgres => {
                let base = servers::postgres_url();
                servers::require("postgres", postgres_ping(&base).await)?;
                let sep = if base.contains('?') { '&' } else { '?' };
                backend.url = format!("{base}{sep}namespace={}", space.replace('-', "_"));
            }
            Kind::Etcd => {
                let etcd = servers::require("etcd", EtcdServer::start().await)?;
                backend.url = format!("{}?prefix={space}", etcd.url());
                backend._etcd = Some(etcd);
            }
        }
        Some(backend)
    }

    /// The nodes' configuration: lease 2 s, settle 200 ms, window 2 s.
    fn config(&self, lock: &str) -> NodeConfig {
        NodeConfig::new(self.url.clone(), lock)
            .lease(LEASE)
            .settle(SETTLE)
            .handover_window(WINDOW)
            .tick(Duration::from_millis(20))
    }
}

async fn postgres_ping(url: &str) -> Result<(), String> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| "no answer within 2 s".to_owned())?
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    client
        .simple_query("SELECT 1")
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

fn cluster(backend: &Backend, lock: &str) -> Cluster {
    Cluster::new(
        NodeCommand::test_entry("node_entry").expect("the test binary's path"),
        backend.config(lock),
    )
}

/// Waits until the backend's registry of `lock` lists `node` (read on a connection of its own).
async fn registered(backend: &Backend, lock: &str, node: &str) {
    let server = tower_primary::backend::from_url(&backend.url).expect("the backend string");
    let lock = server.lock(lock).expect("the lock");
    let mut changes = lock.watch_candidates().await.expect("watch_candidates");
    tokio::time::timeout(WAIT, async {
        loop {
            let listed = lock.candidates().await.expect("candidates");
            if listed.iter().any(|c| c.node == node) {
                return;
            }
            changes.changed().await.expect("a registry change");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{node} is not in the registry after {WAIT:?}"));
}

/// The node id node `pid` reported (waits for its `node` line).
async fn node_id(cluster: &Cluster, pid: u32) -> String {
    let event = cluster
        .wait_event(&format!("pid {pid}'s node id"), WAIT, |e| {
            e.pid == pid && matches!(e.kind, EventKind::Node { .. })
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match event.kind {
        EventKind::Node { id } => id,
        _ => unreachable!(),
    }
}

/// Every `primary` line so far: (pid, term).
fn promotions(cluster: &Cluster) -> Vec<(u32, u64)> {
    cluster
        .events()
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Primary { term } => Some((e.pid, term)),
            _ => None,
        })
        .collect()
}

/// Waits for an order's answer from `pid` (obeyed or refused) after `sent`.
async fn answer(cluster: &Cluster, pid: u32, sent: u64) -> Event {
    cluster
        .wait_event(&format!("pid {pid}'s answer to an order"), WAIT, |e| {
            e.pid == pid
                && e.at >= sent
                && matches!(e.kind, EventKind::Obeyed { .. } | EventKind::Refused { .. })
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Gives `pid` the order to hand over to `to`, again while it is refused because the primary
/// has not read `to`'s entry yet; returns when it was obeyed.
async fn hand_over(cluster: &Cluster, pid: u32, to: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let sent = cluster
            .order(pid, Order::HandOverTo(to.to_owned()))
            .await
            .expect("an order");
        let event = answer(cluster, pid, sent).await;
        match event.kind {
            EventKind::Obeyed { .. } => return,
            EventKind::Refused { message, .. } => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the handover to {to} is still refused: {message}\n{}",
                    cluster.dump()
                );
                // The primary's registry has not listed the target yet: that is the refusal
                // expected here, and the only one retried.
                assert!(
                    message.contains("no live candidate"),
                    "refused: {message}\n{}",
                    cluster.dump()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => unreachable!(),
        }
    }
}

macro_rules! on_each_backend {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn file() {
                    super::$name(super::Kind::File).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$name(super::Kind::Redis).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name(super::Kind::Postgres).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn etcd() {
                    super::$name(super::Kind::Etcd).await;
                }
            }
        )*
    };
}

on_each_backend!(
    no_flapping,
    higher_priority_takes_over_once,
    stopped_target_costs_the_window,
    killed_target_is_replaced,
    drain_hands_over,
);

/// On Redis and etcd the dead node's registry entry outlives its lock key (up to a lease): the
/// successor does not prefer the holder its term followed for a lease and a window.
mod dead_primary_is_not_a_target {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file() {
        super::dead_primary_is_not_a_target(super::Kind::File).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis() {
        super::dead_primary_is_not_a_target(super::Kind::Redis).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::dead_primary_is_not_a_target(super::Kind::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd() {
        super::dead_primary_is_not_a_target(super::Kind::Etcd).await;
    }
}

/// Equal priorities never move the lock; an unready higher priority neither; a ready one does,
/// once.
async fn no_flapping(kind: Kind) {
    let Some(backend) = Backend::start(kind, "flap").await else {
        return;
    };
    let mut cluster = cluster(&backend, "flap");
    let config = backend.config("flap").priority(3);
    for _ in 0..3 {
        cluster.spawn_node_with(&config).unwrap();
    }
    let (primary, term) = cluster.wait_settled(WAIT).await.unwrap();
    let unready = cluster
        .spawn_node_with(&config.clone().priority(9).ready_at_spawn(false))
        .unwrap();
    cluster
        .wait_event("the unready node to follow the primary", WAIT, |e| {
            e.pid == unready
                && matches!(e.kind, EventKind::Secondary { holder_term: Some(t), .. } if t == term)
        })
        .await
        .unwrap();
    // Ten settle times, and a registry refresh (a lease) on top.
    tokio::time::sleep(SETTLE * 10 + LEASE).await;
    assert_eq!(
        promotions(&cluster),
        [(primary, term)],
        "the lock moved without a ready higher priority\n{}",
        cluster.dump()
    );
    assert_eq!(
        cluster.states()[&primary].role,
        Some(ObservedRole::Primary { term })
    );
    // Ready: the lock moves to it, once (the check above can fail: this shows it would).
    let sent = cluster.order(unready, Order::Ready).await.unwrap();
    let started = cluster
        .wait_task_start_after(term, primary, WAIT)
        .await
        .unwrap();
    assert_eq!(started.pid, unready, "{}", cluster.dump());
    println!(
        "{kind:?}: ready -> the new node's first task line {:.1} ms (settle {SETTLE:?})",
        ms(sent, started.at)
    );
    tokio::time::sleep(SETTLE * 5).await;
    let after: Vec<(u32, u64)> = promotions(&cluster)
        .into_iter()
        .filter(|(_, t)| *t > term)
        .collect();
    assert_eq!(after.len(), 1, "{after:?}\n{}", cluster.dump());
    cluster.assert_history_ok();
}

/// A higher priority that starts gets the lock with a reserved handover, and keeps it.
async fn higher_priority_takes_over_once(kind: Kind) {
    let Some(backend) = Backend::start(kind, "higher").await else {
        return;
    };
    let mut cluster = cluster(&backend, "higher");
    let config = backend.config("higher");
    let old = cluster
        .spawn_node_with(&config.clone().priority(1))
        .unwrap();
    let waiter = cluster
        .spawn_node_with(&config.clone().priority(1))
        .unwrap();
    let (primary, term) = cluster.wait_settled(WAIT).await.unwrap();
    let (old, _) = if primary == old {
        (old, waiter)
    } else {
        (waiter, old)
    };
    let new = cluster
        .spawn_node_with(&config.clone().priority(2))
        .unwrap();
    let new_id = node_id(&cluster, new).await;
    let decided = cluster
        .wait_event("the handover decision", WAIT, |e| {
            e.pid == old && matches!(e.kind, EventKind::HandingOver { .. })
        })
        .await
        .unwrap();
    assert_eq!(
        decided.kind,
        EventKind::HandingOver {
            term,
            to: new_id.clone()
        }
    );
    let started = cluster
        .wait_task_start_after(term, old, WAIT)
        .await
        .unwrap();
    assert_eq!(started.pid, new, "{}", cluster.dump());
    println!(
        "{kind:?}: decision -> successor's first task line {:.1} ms",
        ms(decided.at, started.at)
    );
    cluster.wait_settled(WAIT).await.unwrap();
    tokio::time::sleep(SETTLE * 5).await;
    let after: Vec<(u32, u64)> = promotions(&cluster)
        .into_iter()
        .filter(|(_, t)| *t > term)
        .collect();
    assert_eq!(
        after,
        [(new, started.term().unwrap())],
        "{}",
        cluster.dump()
    );
    cluster.assert_history_ok();
}

/// A directed handover to a frozen node: the other waiter keeps waiting for the window, then
/// takes the lock.
async fn stopped_target_costs_the_window(kind: Kind) {
    let Some(backend) = Backend::start(kind, "stopped").await else {
        return;
    };
    let mut cluster = cluster(&backend, "stopped");
    let primary = cluster.spawn_node().unwrap();
    let (p, term) = cluster.wait_settled(WAIT).await.unwrap();
    assert_eq!(p, primary);
    let waiter = cluster.spawn_node().unwrap();
    let target = cluster.spawn_node().unwrap();
    cluster.wait_settled(WAIT).await.unwrap();
    let target_id = node_id(&cluster, target).await;
    // The target's entry must be on the server before it freezes (a node frozen before its
    // registration lists nobody); the primary may still read it late (a refused order is
    // retried).
    registered(&backend, "stopped", &target_id).await;
    cluster.signal(target, NodeSignal::Stop).await.unwrap();
    hand_over(&cluster, primary, &target_id).await;
    let decided = cluster
        .first_event(primary, 0, |k| matches!(k, EventKind::HandingOver { .. }))
        .expect("a handing-over line");
    assert_eq!(
        decided.kind,
        EventKind::HandingOver {
            term,
            to: target_id
        }
    );
    // The waiter, or the old primary campaigning again: whoever is first after the window.
    let next = cluster
        .wait_event(
            "a task start after the window",
            WAIT + WINDOW,
            |e| matches!(e.kind, EventKind::TaskStart { term: t } if t > term),
        )
        .await
        .unwrap();
    let waited = ms(decided.at, next.at);
    println!(
        "{kind:?}: decision -> another waiter's first task line {waited:.1} ms (window {WINDOW:?})"
    );
    assert!(
        next.pid == waiter || next.pid == primary,
        "{}",
        cluster.dump()
    );
    // The reservation is renewed right before the release, after the decision: nobody else
    // may take the lock within the window (a margin for the two clocks' readings only).
    assert!(
        waited >= WINDOW.as_secs_f64() * 1e3 - 50.0,
        "the lock was taken {waited:.1} ms after a handover to a frozen node\n{}",
        cluster.dump()
    );
    cluster.signal(target, NodeSignal::Cont).await.unwrap();
    let (settled, _) = cluster.wait_settled(WAIT).await.unwrap();
    assert_ne!(settled, target, "{}", cluster.dump());
    cluster.assert_history_ok();
}

/// The target of a preferred handover dies right after the decision: another waiter leads
/// within the window and one failover.
async fn killed_target_is_replaced(kind: Kind) {
    let Some(backend) = Backend::start(kind, "killed").await else {
        return;
    };
    let mut cluster = cluster(&backend, "killed");
    let config = backend.config("killed");
    let old = cluster
        .spawn_node_with(&config.clone().priority(1))
        .unwrap();
    cluster.wait_settled(WAIT).await.unwrap();
    let waiter = cluster
        .spawn_node_with(&config.clone().priority(1))
        .unwrap();
    let (_, term) = cluster.wait_settled(WAIT).await.unwrap();
    let target = cluster
        .spawn_node_with(&config.clone().priority(2))
        .unwrap();
    let decided = cluster
        .wait_event("the handover decision", WAIT, |e| {
            e.pid == old && matches!(e.kind, EventKind::HandingOver { .. })
        })
        .await
        .unwrap();
    cluster.signal(target, NodeSignal::Kill).await.unwrap();
    // The target may have been quicker than the signal: then its death is a plain failover.
    let next = cluster
        .wait_event("a live successor's first task line", WAIT + WINDOW, |e| {
            e.pid != target && matches!(e.kind, EventKind::TaskStart { term: t } if t > term)
        })
        .await
        .unwrap();
    let target_led = cluster
        .first_event(target, 0, |k| matches!(k, EventKind::TaskStart { .. }))
        .is_some();
    println!(
        "{kind:?}: decision -> pid {} ({}) first task line {:.1} ms; the killed target led: {target_led}",
        next.pid,
        if next.pid == waiter {
            "the waiter"
        } else {
            "the old primary"
        },
        ms(decided.at, next.at)
    );
    let bound = WINDOW + LEASE * 2 + Duration::from_secs(2);
    assert!(
        ms(decided.at, next.at) < bound.as_secs_f64() * 1e3,
        "{}",
        cluster.dump()
    );
    cluster.wait_settled(WAIT).await.unwrap();
    cluster.assert_history_ok();
}

/// A drained primary hands over to the best eligible candidate and never leads again.
async fn drain_hands_over(kind: Kind) {
    let Some(backend) = Backend::start(kind, "drain").await else {
        return;
    };
    let mut cluster = cluster(&backend, "drain");
    let config = backend.config("drain");
    let old = cluster
        .spawn_node_with(&config.clone().priority(5))
        .unwrap();
    cluster.wait_settled(WAIT).await.unwrap();
    let low = cluster
        .spawn_node_with(&config.clone().priority(1))
        .unwrap();
    let best = cluster
        .spawn_node_with(&config.clone().priority(3))
        .unwrap();
    let never = cluster
        .spawn_node_with(&config.clone().priority(9).never_lead())
        .unwrap();
    let (_, term) = cluster.wait_settled(WAIT).await.unwrap();
    let best_id = node_id(&cluster, best).await;
    // The primary must have read `best`'s entry: wait until a directed handover to it would
    // be accepted is not possible without moving the lock, so wait for the registry to be
    // read (a lease) instead.
    tokio::time::sleep(LEASE).await;
    let sent = cluster.order(old, Order::Drain).await.unwrap();
    cluster
        .wait_event("the drain to resolve", WAIT, |e| {
            e.pid == old && e.at >= sent && matches!(e.kind, EventKind::Drained)
        })
        .await
        .unwrap();
    let decided = cluster
        .first_event(old, sent, |k| matches!(k, EventKind::HandingOver { .. }))
        .expect("a handing-over line");
    assert_eq!(
        decided.kind,
        EventKind::HandingOver { term, to: best_id },
        "{}",
        cluster.dump()
    );
    let next = cluster
        .wait_task_start_after(term, old, WAIT)
        .await
        .unwrap();
    assert_eq!(next.pid, best, "{}", cluster.dump());
    // Kill the new primary: the drained node stays out; the low one takes over.
    cluster.signal(best, NodeSignal::Kill).await.unwrap();
    let after = cluster
        .wait_task_start_after(next.term().unwrap(), best, WAIT)
        .await
        .unwrap();
    assert_eq!(after.pid, low, "{}", cluster.dump());
    assert!(
        cluster
            .first_event(never, 0, |k| matches!(k, EventKind::Primary { .. }))
            .is_none()
    );
    assert!(
        cluster
            .first_event(old, sent, |k| matches!(k, EventKind::Primary { .. }))
            .is_none()
    );
    cluster.assert_history_ok();
}

/// A `SIGKILL`ed primary of the highest priority: its successor keeps the lock. Its registry view
/// may still list the dead node (a death "may be reported late"), but a handover to it
/// reserves the lock for a node that cannot take it: no primary for the whole window.
async fn dead_primary_is_not_a_target(kind: Kind) {
    let Some(backend) = Backend::start(kind, "dead").await else {
        return;
    };
    let mut cluster = cluster(&backend, "dead");
    let config = backend.config("dead");
    cluster
        .spawn_node_with(&config.clone().priority(1))
        .unwrap();
    cluster
        .spawn_node_with(&config.clone().priority(1))
        .unwrap();
    let (_, term) = cluster.wait_settled(WAIT).await.unwrap();
    let top = cluster
        .spawn_node_with(&config.clone().priority(5))
        .unwrap();
    let top_id = node_id(&cluster, top).await;
    let led = cluster.wait_task_start_after(term, 0, WAIT).await.unwrap();
    assert_eq!(led.pid, top, "{}", cluster.dump());
    let (_, top_term) = cluster.wait_settled(WAIT).await.unwrap();
    // Every secondary has read the top node's entry long since (a lease).
    tokio::time::sleep(LEASE).await;
    let killed = cluster.signal(top, NodeSignal::Kill).await.unwrap();
    let next = cluster
        .wait_task_start_after(top_term, top, WAIT)
        .await
        .unwrap();
    let stable = cluster.wait_settled(WAIT).await.unwrap();
    let handed_to_the_dead = cluster
        .events()
        .into_iter()
        .filter(|e| e.at >= killed)
        .find(|e| matches!(&e.kind, EventKind::HandingOver { to, .. } if *to == top_id));
    println!(
        "{kind:?}: SIGKILL -> first successor task line {:.1} ms, settled on pid {} term {}; \
         handed to the dead node: {}",
        ms(killed, next.at),
        stable.0,
        stable.1,
        handed_to_the_dead.is_some()
    );
    assert!(
        handed_to_the_dead.is_none(),
        "the successor reserved the lock for the SIGKILLed node {top_id}: {:?}\n{}",
        handed_to_the_dead,
        cluster.dump()
    );
    cluster.assert_history_ok();
}

// ---------------------------------------------------------------------------------------------
// Host groups

/// A host directory of its own (mode 0700).
fn host_dir() -> TempDir {
    let dir = TempDir::new("pref-host").expect("a temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod 0700");
    dir
}

/// Two host groups on a server backend: the group whose best *ready* member has the higher
/// priority leads; an unready member does not count until it is ready.
async fn host_group_priority(kind: Kind) {
    let Some(backend) = Backend::start(kind, "groups").await else {
        return;
    };
    let (a, b) = (host_dir(), host_dir());
    let mut cluster = cluster(&backend, "groups");
    let config = backend.config("groups");
    let a1 = cluster
        .spawn_node_with(&config.clone().priority(3).host_dir(a.path()))
        .unwrap();
    let (primary, term) = cluster.wait_settled(WAIT).await.unwrap();
    assert_eq!(primary, a1);
    let b_low = config.clone().host_dir(b.path());
    cluster.spawn_node_with(&b_low.clone().priority(1)).unwrap();
    cluster.spawn_node_with(&b_low.clone().priority(2)).unwrap();
    let b_hi = cluster
        .spawn_node_with(&b_low.clone().priority(7).ready_at_spawn(false))
        .unwrap();
    cluster.wait_settled(WAIT).await.unwrap();
    // Group b's best ready member has 2 < 3: nothing moves.
    tokio::time::sleep(SETTLE * 5 + LEASE).await;
    assert_eq!(
        promotions(&cluster),
        [(primary, term)],
        "{}",
        cluster.dump()
    );
    // Its priority-7 member is ready: group b (7) outranks group a (3).
    cluster.order(b_hi, Order::Ready).await.unwrap();
    let next = cluster
        .wait_task_start_after(term, primary, WAIT)
        .await
        .unwrap();
    let group_b: Vec<u32> = cluster.pids()[1..].to_vec();
    assert!(group_b.contains(&next.pid), "{}", cluster.dump());
    println!(
        "{kind:?}: group b leads (pid {}) after its priority-7 member became ready",
        next.pid
    );
    cluster.wait_settled(WAIT).await.unwrap();
    cluster.assert_history_ok();
}

mod host_group_priority {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis() {
        super::host_group_priority(super::Kind::Redis).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::host_group_priority(super::Kind::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd() {
        super::host_group_priority(super::Kind::Etcd).await;
    }
}
