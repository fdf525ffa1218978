//! Mixed versions on one lock: the node of an older release (0.1.0, commit [`OLD`]) and the
//! current node run side by side, as in a rolling upgrade or a rollback, on the backends whose
//! stored records have changed since (PostgreSQL, Redis, etcd). Under the faults the old version
//! handled — `SIGKILL` and `SIGTERM` of the primary in both directions (an old primary succeeded
//! by a new node, and a new primary by an old node), `SIGSTOP` beyond the lease on Redis, and on
//! Redis a new holder's lease resumed by another new process (a host group's next candidate)
//! beside old nodes, and on etcd a resumption and a reservation beside a waiting old node —
//! there are never two primaries and terms never fall. On Redis, an old node ignores a new
//! holder's reservation (it takes the lock at once, as documented).
//!
//! The old node is built from a git worktree of the commit
//! ([`OldVersion`](tower_primary_lab::old_version::OldVersion), kept under
//! `<target>/old-versions` and reused); without git or the commit (a source tarball) the tests
//! print `SKIPPED`, or fail under `TOWER_PRIMARY_REQUIRE_BACKENDS=1`, as they do without a server.
//!
//! Every node writes to a [fenced witness](tower_primary_testing::witness) while primary: its
//! writes carry deadlines, so a frozen primary's period ends at its deadline, and a write made by a
//! node that was no longer primary fails the test. The history is checked with the events of every
//! node (no two periods overlap, terms rise) and with the witness's writes.
//!
//! PostgreSQL is `DATABASE_URL` or `postgres://root@127.0.0.1:5432/test`, with a schema of each
//! test's own (dropped when it passes); Redis is a `redis-server` of each test's own. Tests run one at
//! a time.
//!
//! ```text
//! cargo test --all-features --test compat -- --nocapture
//! ```
#![cfg(any(feature = "postgres", feature = "redis", feature = "etcd"))]

mod common;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tower_primary::clock::monotonic_nanos;
use tower_primary_lab::node::{Cluster, EventKind, NodeCommand, NodeConfig, NodeSignal};
use tower_primary_lab::old_version::{OldBuild, OldVersion};
use tower_primary_lab::servers;
use tower_primary_testing::witness::{self, Witness};

/// The reference old version: the last commit before the records changed (crate 0.1.0).
const OLD: &str = "be74ccc";

/// Bounds a broken run only. Generous: a new successor of an old primary that died without a
/// clean release may wait its predecessor's full fencing bound.
const WAIT: Duration = Duration::from_secs(60);

/// How often a primary writes to the witness.
const WRITE_EVERY: Duration = Duration::from_millis(5);

static SERIAL: Mutex<()> = Mutex::const_new(());

/// The node side of this binary: the new nodes re-execute it in node mode.
#[test]
fn node_entry() {
    common::node_entry();
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Version {
    Old,
    New,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::Old => "old",
            Version::New => "new",
        })
    }
}

/// Where old versions are checked out and built: next to this build's target directory.
fn old_versions_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("old-versions")
}

async fn old_build() -> Option<OldBuild> {
    let old = OldVersion::new(OLD, env!("CARGO_MANIFEST_DIR")).dir(old_versions_dir());
    let built = old.require().await?;
    if !built.took.is_zero() {
        println!(
            "old version {OLD} checked out and built in {:.1} s: {}",
            built.took.as_secs_f64(),
            built.program.display()
        );
    }
    Some(built)
}

/// Old and new nodes of one lock, the versions by pid, and the witness they write to.
struct Mixed {
    cluster: Cluster,
    old_config: NodeConfig,
    new_config: NodeConfig,
    old: NodeCommand,
    versions: HashMap<u32, Version>,
    witness: Witness,
    _serial: MutexGuard<'static, ()>,
}

impl Mixed {
    /// Old nodes run with `old_config`, new ones with `new_config`: the same lock and backend,
    /// and only settings that each version understands.
    async fn new(old_config: NodeConfig, new_config: NodeConfig) -> Option<Mixed> {
        let serial = SERIAL.lock().await;
        let old = old_build().await?.node_command();
        let witness = Witness::start().await.expect("a witness");
        let old_config = old_config.witness(witness.addr(), WRITE_EVERY);
        let new_config = new_config.witness(witness.addr(), WRITE_EVERY);
        let new = NodeCommand::test_entry("node_entry").expect("the test binary's path");
        Some(Mixed {
            cluster: Cluster::new(new, new_config.clone()),
            old_config,
            new_config,
            old,
            versions: HashMap::new(),
            witness,
            _serial: serial,
        })
    }

    fn spawn(&mut self, version: Version) -> u32 {
        let pid = match version {
            Version::Old => self.cluster.spawn_node_running(&self.old, &self.old_config),
            Version::New => self.cluster.spawn_node_with(&self.new_config),
        }
        .unwrap_or_else(|e| panic!("cannot start a {version} node: {e}"));
        self.versions.insert(pid, version);
        pid
    }

    fn version(&self, pid: u32) -> Version {
        self.versions[&pid]
    }

    /// One `primary` node, alone until it holds the lock and its task runs; then `n` nodes of
    /// `secondaries` that settle as its secondaries. Returns the primary's pid and term.
    async fn primary_with_secondaries(
        &mut self,
        primary: Version,
        secondaries: Version,
        n: usize,
    ) -> (u32, u64) {
        let first = self.spawn(primary);
        let (pid, term) = self.settled().await;
        assert_eq!(pid, first, "{}", self.dump());
        for _ in 0..n {
            self.spawn(secondaries);
        }
        let settled = self.settled().await;
        assert_eq!(
            settled,
            (first, term),
            "the {secondaries} nodes did not settle as secondaries of the {primary} primary\n{}",
            self.dump()
        );
        (first, term)
    }

    /// Waits until one node is primary, known to all others. A cluster that never settles is
    /// most often split (each version holding a lock of its own): the history check says so
    /// first.
    async fn settled(&self) -> (u32, u64) {
        match self.cluster.wait_settled(WAIT).await {
            Ok(settled) => settled,
            Err(e) => {
                let report = self.cluster.history().check();
                panic!(
                    "{}{report}\n{e}\n{}",
                    if report.is_ok() {
                        ""
                    } else {
                        "TWO PRIMARIES AT ONCE: "
                    },
                    self.versions_line()
                )
            }
        }
    }

    /// Every check on everything so far: the periods from the nodes' events with the witness's
    /// writes merged in (a frozen node's period ends at the deadline it wrote with, as it never
    /// reports its end), no two overlap, terms rise, and no node wrote while not primary.
    fn check(&self) {
        let records = self.witness.records();
        let merged = witness::merge(&self.cluster.history(), &records);
        let report = witness::check(&merged, &records);
        assert!(report.is_ok(), "{report}\n{}", self.dump());
        assert!(
            report.accepted > 0,
            "no primary wrote to the witness\n{}",
            self.dump()
        );
        let mut terms: Vec<(u64, String)> = self
            .cluster
            .history()
            .periods()
            .iter()
            .map(|p| {
                let pid: u32 = p.node.parse().unwrap_or_default();
                (p.term, format!("{} ({})", p.node, self.version(pid)))
            })
            .collect();
        terms.dedup();
        println!(
            "primaries (term, pid): {terms:?}; witness: {} accepted, {} rejected",
            report.accepted, report.rejected
        );
    }

    fn versions_line(&self) -> String {
        let mut v: Vec<_> = self.versions.iter().collect();
        v.sort();
        format!("versions by pid: {v:?}")
    }

    fn dump(&self) -> String {
        format!("{}\n{}", self.versions_line(), self.cluster.dump())
    }

    /// `SIGKILL` of a `primary` node whose secondaries are all `successor` nodes: one of them
    /// succeeds it with a higher term, without overlap.
    async fn kill(&mut self, primary: Version, successor: Version) {
        self.primary_with_secondaries(primary, successor, 2).await;
        let s = self.cluster.kill_primary(WAIT).await;
        assert_eq!(self.version(s.next.pid), successor, "{}", self.dump());
        println!(
            "SIGKILL of the {primary} primary → {successor} successor after {:.1} ms",
            common::ms(s.signalled_at, s.next.at)
        );
        self.check();
    }

    /// `SIGTERM` of a `primary` node whose secondaries are all `successor` nodes: it winds its
    /// term down and releases; one of them succeeds it with a higher term.
    async fn terminate(&mut self, primary: Version, successor: Version) {
        self.primary_with_secondaries(primary, successor, 2).await;
        let h = self.cluster.terminate_primary(WAIT).await;
        assert_eq!(
            self.version(h.succession.next.pid),
            successor,
            "{}",
            self.dump()
        );
        println!(
            "SIGTERM of the {primary} primary → {successor} successor after {:.1} ms",
            common::ms(h.succession.signalled_at, h.succession.next.at)
        );
        self.check();
    }

    /// `SIGSTOP` of a `primary` node (lease `lease`) whose secondaries are all `successor` nodes,
    /// frozen until one of them has been primary for another lease; after `SIGCONT` it runs no
    /// step of its old term and reports the successor as holder.
    async fn stop(&mut self, primary: Version, successor: Version, lease: Duration) {
        let (old, term) = self.primary_with_secondaries(primary, successor, 2).await;
        let stopped = self.cluster.signal(old, NodeSignal::Stop).await.unwrap();
        let next = self
            .cluster
            .wait_primary_after(term, old, WAIT)
            .await
            .unwrap();
        let new_term = next.term().unwrap_or_default();
        assert!(new_term > term, "{}", self.dump());
        assert_eq!(self.version(next.pid), successor, "{}", self.dump());
        // The successor's witness writes go on while the old node stays frozen for a lease more.
        tokio::time::sleep(lease).await;
        let resumed = self.cluster.signal(old, NodeSignal::Cont).await.unwrap();
        self.cluster
            .wait_event("the resumed node to report the successor", WAIT, |e| {
                e.pid == old
                    && e.at > resumed
                    && matches!(e.kind, EventKind::Secondary { holder_term: Some(t), .. } if t == new_term)
            })
            .await
            .unwrap();
        let late_tick = self.cluster.events().into_iter().find(|e| {
            e.pid == old
                && e.at > resumed
                && matches!(e.kind, EventKind::Tick { term: t, .. } if t == term)
        });
        assert!(late_tick.is_none(), "{late_tick:?}\n{}", self.dump());
        assert_eq!(
            self.settled().await,
            (next.pid, new_term),
            "{}",
            self.dump()
        );
        println!(
            "SIGSTOP of the {primary} primary (lease {lease:?}) → {successor} successor after \
             {:.1} ms",
            common::ms(stopped, next.at)
        );
        self.check();
    }

    /// `SIGSTOP` of a `primary` node whose secondaries are all `others` nodes, for `frozen`, then
    /// `SIGCONT`: whoever is primary afterwards, and whether or not anyone succeeded the frozen
    /// node meanwhile, no two periods overlap (the frozen node's ends at its deadline at the
    /// latest) and terms rise.
    async fn freeze(&mut self, primary: Version, others: Version, frozen: Duration) {
        let (old, term) = self.primary_with_secondaries(primary, others, 2).await;
        self.cluster.signal(old, NodeSignal::Stop).await.unwrap();
        // The fault itself lasts this long; nothing is awaited.
        tokio::time::sleep(frozen).await;
        let resumed = self.cluster.signal(old, NodeSignal::Cont).await.unwrap();
        self.cluster
            .wait_event("the resumed node to report anything", WAIT, |e| {
                e.pid == old && e.at > resumed && !matches!(e.kind, EventKind::Signalled { .. })
            })
            .await
            .unwrap();
        let (pid, now) = self.settled().await;
        println!(
            "SIGSTOP of the {primary} primary (term {term}) for {frozen:?}, then SIGCONT → \
             primary: the {} node {pid}, term {now}",
            self.version(pid)
        );
        self.check();
    }

    /// A rolling upgrade of three `from` nodes to `to` nodes, one at a time, the primary last
    /// (each leaves by `SIGTERM` and its replacement joins before the next one leaves), then the
    /// same back: every handover crosses versions at least once.
    async fn roll(&mut self, from: Version, to: Version) {
        for _ in 0..3 {
            self.spawn(from);
        }
        self.settled().await;
        for (a, b) in [(from, to), (to, from)] {
            for _ in 0..3 {
                let (primary, term) = self.settled().await;
                let states = self.cluster.states();
                let leaving = states
                    .values()
                    .filter(|s| s.alive && self.version(s.pid) == a)
                    .map(|s| s.pid)
                    .find(|&pid| pid != primary)
                    .unwrap_or(primary);
                if leaving == primary {
                    let h = self.cluster.terminate_primary(WAIT).await;
                    assert!(h.succession.next.term().unwrap_or_default() > term);
                    println!(
                        "SIGTERM of the {a} primary → {} successor",
                        self.version(h.succession.next.pid)
                    );
                } else {
                    self.cluster
                        .signal(leaving, NodeSignal::Term)
                        .await
                        .unwrap();
                    let exit = self.cluster.wait_exit(leaving, WAIT).await.unwrap();
                    assert_eq!(exit, (Some(0), None), "{}", self.dump());
                }
                self.spawn(b);
            }
            let (primary, _) = self.settled().await;
            assert_eq!(self.version(primary), b, "{}", self.dump());
            let alive: Vec<Version> = self
                .cluster
                .states()
                .values()
                .filter(|s| s.alive)
                .map(|s| self.version(s.pid))
                .collect();
            assert_eq!(alive, [b, b, b], "{}", self.dump());
        }
        self.check();
    }
}

/// A unique suffix for this run's namespaces, prefixes and lock names.
fn unique(test: &str) -> String {
    format!(
        "compat-{test}-{}-{:x}",
        std::process::id(),
        monotonic_nanos()
    )
}

// ------------------------------------------------------------------------------------------------
// PostgreSQL

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;

    /// A schema of the test's own, created by whichever node comes first (an old primary
    /// creates the tables of 0.1.0, which new nodes then extend, as in an upgrade); dropped by
    /// [`remove`](Self::remove) at the end of a test that passed.
    struct Schema {
        url: String,
        name: String,
    }

    impl Schema {
        async fn remove(self) {
            let Ok((client, conn)) =
                tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await
            else {
                return;
            };
            tokio::spawn(conn);
            let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
            if let Err(e) = client.batch_execute(&drop).await {
                eprintln!("could not drop schema {}: {e}", self.name);
            }
        }
    }

    async fn mixed(test: &str) -> Option<(Mixed, Schema)> {
        let url = servers::postgres_url();
        let probe = async {
            let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
            match tokio::time::timeout(Duration::from_secs(5), connect).await {
                Ok(Ok((client, conn))) => {
                    drop(client);
                    let _ = conn.await;
                    Ok(())
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("connect timed out".to_owned()),
            }
        };
        servers::require(&format!("PostgreSQL at {url}"), probe.await)?;
        let schema = format!("tp_compat_{}_{:x}", std::process::id(), monotonic_nanos());
        let sep = if url.contains('?') { '&' } else { '?' };
        let backend = format!("{url}{sep}namespace={}&schema={schema}", unique(test));
        let config = NodeConfig::new(backend, "jobs").grace(Duration::from_secs(2));
        let mixed = Mixed::new(config.clone(), config).await?;
        Some((mixed, Schema { url, name: schema }))
    }

    #[tokio::test]
    async fn postgres_old_primary_killed_new_node_succeeds() {
        let Some((mut m, schema)) = mixed("pg-kill-old").await else {
            return;
        };
        m.kill(Version::Old, Version::New).await;
        drop(m);
        schema.remove().await;
    }

    #[tokio::test]
    async fn postgres_new_primary_killed_old_node_succeeds() {
        let Some((mut m, schema)) = mixed("pg-kill-new").await else {
            return;
        };
        m.kill(Version::New, Version::Old).await;
        drop(m);
        schema.remove().await;
    }

    #[tokio::test]
    async fn postgres_old_primary_hands_over_to_a_new_node() {
        let Some((mut m, schema)) = mixed("pg-term-old").await else {
            return;
        };
        m.terminate(Version::Old, Version::New).await;
        drop(m);
        schema.remove().await;
    }

    #[tokio::test]
    async fn postgres_new_primary_hands_over_to_an_old_node() {
        let Some((mut m, schema)) = mixed("pg-term-new").await else {
            return;
        };
        m.terminate(Version::New, Version::Old).await;
        drop(m);
        schema.remove().await;
    }

    /// Longer than a new waiter takes to end an idle lock session and wait out a record
    /// without a fencing bound (about 4 s each by default).
    const FROZEN: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn postgres_old_primary_frozen_and_resumed_beside_new_nodes() {
        let Some((mut m, schema)) = mixed("pg-stop-old").await else {
            return;
        };
        m.freeze(Version::Old, Version::New, FROZEN).await;
        drop(m);
        schema.remove().await;
    }

    #[tokio::test]
    async fn postgres_new_primary_frozen_and_resumed_beside_old_nodes() {
        let Some((mut m, schema)) = mixed("pg-stop-new").await else {
            return;
        };
        m.freeze(Version::New, Version::Old, FROZEN).await;
        drop(m);
        schema.remove().await;
    }

    #[tokio::test]
    async fn postgres_rolling_upgrade_and_rollback() {
        let Some((mut m, schema)) = mixed("pg-roll").await else {
            return;
        };
        m.roll(Version::Old, Version::New).await;
        drop(m);
        schema.remove().await;
    }
}

// ------------------------------------------------------------------------------------------------
// Redis

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use tower_primary::backend::redis::RedisBackend;
    use tower_primary_lab::servers::RedisServer;

    /// One lease for every node of a lock, old and new: a node with another lease refuses to
    /// campaign.
    const LEASE: Duration = Duration::from_secs(1);

    /// The maximum lease of new nodes, where the current version has that setting (0.1.0
    /// refuses the parameter): the lease itself, which every node of the lock uses. It bounds how
    /// long the first grant of a fresh lock or server waits, and the first new successor of an
    /// old holder (whose records carry no lease end).
    const MAX_LEASE: &str = "max_lease=1s";

    /// A `redis-server` of the test's own; the nodes wait out its start-up guard themselves.
    async fn mixed(test: &str) -> Option<(Mixed, RedisServer)> {
        let server = servers::require("redis-server", RedisServer::start().await)?;
        let url = format!("{}/0?prefix={}", server.url(), unique(test));
        let config = |url: String| {
            NodeConfig::new(url, "jobs")
                .lease(LEASE)
                .grace(Duration::from_secs(2))
        };
        let new_url = format!("{url}&{MAX_LEASE}");
        let new_url = if RedisBackend::new(&new_url).is_ok() {
            new_url
        } else {
            url.clone()
        };
        Some((Mixed::new(config(url), config(new_url)).await?, server))
    }

    #[tokio::test]
    async fn redis_old_primary_killed_new_node_succeeds() {
        let Some((mut m, _server)) = mixed("redis-kill-old").await else {
            return;
        };
        m.kill(Version::Old, Version::New).await;
    }

    #[tokio::test]
    async fn redis_new_primary_killed_old_node_succeeds() {
        let Some((mut m, _server)) = mixed("redis-kill-new").await else {
            return;
        };
        m.kill(Version::New, Version::Old).await;
    }

    #[tokio::test]
    async fn redis_old_primary_hands_over_to_a_new_node() {
        let Some((mut m, _server)) = mixed("redis-term-old").await else {
            return;
        };
        m.terminate(Version::Old, Version::New).await;
    }

    #[tokio::test]
    async fn redis_new_primary_hands_over_to_an_old_node() {
        let Some((mut m, _server)) = mixed("redis-term-new").await else {
            return;
        };
        m.terminate(Version::New, Version::Old).await;
    }

    #[tokio::test]
    async fn redis_old_primary_frozen_beyond_its_lease_new_node_succeeds() {
        let Some((mut m, _server)) = mixed("redis-stop-old").await else {
            return;
        };
        m.stop(Version::Old, Version::New, LEASE).await;
    }

    #[tokio::test]
    async fn redis_new_primary_frozen_beyond_its_lease_old_node_succeeds() {
        let Some((mut m, _server)) = mixed("redis-stop-new").await else {
            return;
        };
        m.stop(Version::New, Version::Old, LEASE).await;
    }

    #[tokio::test]
    async fn redis_rolling_upgrade_and_rollback() {
        let Some((mut m, _server)) = mixed("redis-roll").await else {
            return;
        };
        m.roll(Version::Old, Version::New).await;
    }

    /// Waits until every node of `pids` reports the holder of `term`.
    async fn all_see(m: &Mixed, pids: &[u32], term: u64) {
        for &pid in pids {
            m.cluster
                .wait_event(&format!("{pid} to see term {term}"), WAIT, |e| {
                    e.pid == pid
                        && matches!(e.kind, EventKind::Secondary { holder_term: Some(t), .. } if t == term)
                })
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", m.dump()));
        }
    }

    /// A new holder's lease resumed by another new process (as the next candidate of its host
    /// group does when the first dies) while old and new nodes campaign: every node reads the
    /// resumed holder and its higher term and stays secondary while it holds, and after its
    /// release one of them succeeds with a higher term still. The holders of the resumed lease
    /// run in this process; the others are node processes.
    #[tokio::test]
    async fn redis_new_lease_resumed_beside_old_and_new_nodes() {
        use tower_primary::backend::{AcquireRequest, Backend};
        use tower_primary::{Clock, Lease, NodeId};

        let Some((mut m, _server)) = mixed("redis-resume").await else {
            return;
        };
        let lock = || {
            RedisBackend::new(&m.new_config.backend)
                .unwrap()
                .lock(&m.new_config.lock)
                .unwrap()
        };
        let (first, second) = (lock(), lock());
        let request = |id: &str| {
            AcquireRequest::new(NodeId::new(id))
                .with_lease(Some(Lease::new(LEASE)))
                .with_clock(Clock::system())
        };
        // The fresh server's start-up guard passes first.
        let held = first.acquire(request("first-candidate")).await.unwrap();
        let term = held.term();
        let pids = [
            m.spawn(Version::Old),
            m.spawn(Version::Old),
            m.spawn(Version::New),
        ];
        all_see(&m, &pids, term).await;

        // The first candidate dies (its leadership goes without release); the next resumes.
        let token = held.resume_token().unwrap();
        drop(held);
        let resumed = second
            .resume(request("next-candidate"), &token)
            .await
            .unwrap()
            .expect("the lease is still the first candidate's");
        let resumed_term = resumed.term();
        assert!(resumed_term > term, "{resumed_term} after {term}");
        all_see(&m, &pids, resumed_term).await;
        // It holds on for a lease and more of its own renewals, past the first one's lease.
        let mut renewals = resumed.renewals().unwrap();
        for _ in 0..4 {
            tokio::time::timeout(WAIT, renewals.changed())
                .await
                .expect("renewals of the resumed lease");
        }
        let released_at = monotonic_nanos();
        resumed.release().await.unwrap();

        let (pid, next) = m.settled().await;
        assert!(
            next > resumed_term,
            "{next} after {resumed_term}\n{}",
            m.dump()
        );
        let early = m
            .cluster
            .events()
            .into_iter()
            .find(|e| matches!(e.kind, EventKind::Primary { .. }) && e.at < released_at);
        assert!(
            early.is_none(),
            "a node was primary while the lease was held here: {early:?}\n{}",
            m.dump()
        );
        // The successor has settled; its first write to the witness may still be on its way.
        tokio::time::timeout(
            WAIT,
            m.witness
                .wait_for(|writes| writes.iter().any(|w| w.term == next)),
        )
        .await
        .unwrap_or_else(|_| panic!("the successor never wrote to the witness\n{}", m.dump()));
        println!(
            "terms: {term} (first candidate), {resumed_term} (resumed), {next} (the {} node {pid})",
            m.version(pid)
        );
        m.check();
    }

    /// A new holder reserves the lock for a node that never comes, and releases it: an old node
    /// (0.1.0) waiting for the lock does not know the reservation, and takes the lock at once
    /// under a higher term, not after the window (ignoring it is what GUARANTEES.md states);
    /// one primary at a time all the same. The new holder runs in this process.
    #[tokio::test]
    async fn redis_an_old_node_ignores_a_reservation() {
        use tower_primary::backend::{AcquireRequest, Backend};
        use tower_primary::{Clock, Lease, NodeId};

        let Some((mut m, _server)) = mixed("redis-reserve").await else {
            return;
        };
        let lock = RedisBackend::new(&m.new_config.backend)
            .unwrap()
            .lock(&m.new_config.lock)
            .unwrap();
        let request = AcquireRequest::new(NodeId::new("new-holder"))
            .with_lease(Some(Lease::new(LEASE)))
            .with_clock(Clock::system());
        let mut held = lock.acquire(request).await.unwrap();
        let term = held.term();
        let old = m.spawn(Version::Old);
        all_see(&m, &[old], term).await;

        let window = Duration::from_secs(30);
        held.reserve("nobody", window).await.unwrap();
        let released_at = monotonic_nanos();
        held.release().await.unwrap();
        let (pid, next) = m.settled().await;
        let took = Duration::from_nanos(
            m.cluster
                .first_event(pid, released_at, |k| matches!(k, EventKind::Primary { .. }))
                .map_or(u64::MAX, |e| e.at.saturating_sub(released_at)),
        );
        assert_eq!(pid, old, "{}", m.dump());
        assert!(next > term, "{next} after {term}\n{}", m.dump());
        assert!(took < window / 3, "{took:?}\n{}", m.dump());
        println!("an old node took a lock reserved for another {took:?} after the release");
        tokio::time::timeout(
            WAIT,
            m.witness
                .wait_for(|writes| writes.iter().any(|w| w.term == next)),
        )
        .await
        .unwrap_or_else(|_| panic!("the old node never wrote to the witness\n{}", m.dump()));
        m.check();
    }
}

// ------------------------------------------------------------------------------------------------
// etcd

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;
    use std::sync::Arc;

    use etcd_client::{EventType, WatchOptions};
    use tower_primary::backend::etcd::EtcdBackend;
    use tower_primary::backend::{AcquireRequest, Backend, Lock};
    use tower_primary::{Lease, NodeId};
    use tower_primary_lab::servers::EtcdServer;
    use tower_primary_testing::history::History;

    /// One lease for every node of a lock, old and new: etcd's minimum.
    const LEASE: Duration = Duration::from_secs(2);

    /// An `etcd` of the test's own and the nodes of one lock on it; also its backend string.
    async fn mixed(test: &str) -> Option<(Mixed, EtcdServer, String)> {
        let server = servers::require("etcd", EtcdServer::start().await)?;
        let url = format!("{}?prefix={}", server.url(), unique(test));
        let config = NodeConfig::new(url.clone(), "jobs")
            .lease(LEASE)
            .grace(Duration::from_secs(2));
        Some((Mixed::new(config.clone(), config).await?, server, url))
    }

    #[tokio::test]
    async fn etcd_old_primary_killed_new_node_succeeds() {
        let Some((mut m, _server, _)) = mixed("etcd-kill-old").await else {
            return;
        };
        m.kill(Version::Old, Version::New).await;
    }

    #[tokio::test]
    async fn etcd_new_primary_killed_old_node_succeeds() {
        let Some((mut m, _server, _)) = mixed("etcd-kill-new").await else {
            return;
        };
        m.kill(Version::New, Version::Old).await;
    }

    #[tokio::test]
    async fn etcd_old_primary_hands_over_to_a_new_node() {
        let Some((mut m, _server, _)) = mixed("etcd-term-old").await else {
            return;
        };
        m.terminate(Version::Old, Version::New).await;
    }

    #[tokio::test]
    async fn etcd_new_primary_hands_over_to_an_old_node() {
        let Some((mut m, _server, _)) = mixed("etcd-term-new").await else {
            return;
        };
        m.terminate(Version::New, Version::Old).await;
    }

    #[tokio::test]
    async fn etcd_rolling_upgrade_and_rollback() {
        let Some((mut m, _server, _)) = mixed("etcd-roll").await else {
            return;
        };
        m.roll(Version::Old, Version::New).await;
    }

    fn request(id: &str) -> AcquireRequest {
        AcquireRequest::new(NodeId::new(id)).with_lease(Some(Lease::new(LEASE)))
    }

    /// Waits for the next put of a key under `watch` that is not `except`; returns the key.
    async fn next_put(watch: &mut etcd_client::WatchStream, except: &[&str]) -> String {
        tokio::time::timeout(WAIT, async {
            loop {
                let resp = watch.message().await.unwrap().expect("the watch goes on");
                for e in resp.events() {
                    let key = e.kv().and_then(|kv| kv.key_str().ok()).unwrap_or_default();
                    if e.event_type() == EventType::Put && !except.contains(&key) {
                        return key.to_owned();
                    }
                }
            }
        })
        .await
        .expect("a new candidate key")
    }

    /// Resumptions next to a node of 0.1.0, whose term is its key's create revision. New nodes
    /// run in this process, each on a connection of its own (as processes of a host group would):
    ///
    /// 1. new `a` holds; new `w` waits; `a` dies and `b` resumes its lease (no old node yet):
    ///    a higher term;
    /// 2. an old node joins and waits: its key is younger than `w`'s, which is older than the
    ///    resumption;
    /// 3. `b` dies; resuming its lease is refused while the old node waits (a claim out of key
    ///    order would put a term above the old node's future one), and the dead holder's lease
    ///    ends at once; `w`, now the oldest, gives its place to the old node, which takes the
    ///    lock with a term above `b`'s;
    /// 4. the old node leaves (`SIGTERM`); `w` takes the lock with a term above the old node's.
    ///
    /// Never two primaries (the history of the old node's events and the in-process terms), terms
    /// rise throughout.
    #[tokio::test]
    async fn etcd_resume_next_to_an_old_waiting_node() {
        let Some((mut m, server, url)) = mixed("etcd-resume").await else {
            return;
        };
        let backend = EtcdBackend::from_url(&url).unwrap();
        let prefix = backend.prefix().to_owned();
        let connect = || -> Arc<dyn Lock> { backend.connection().lock("jobs").unwrap() };
        let (lock_a, lock_b, lock_w) = (connect(), connect(), connect());
        let mut history = History::new();
        let mut admin = etcd_client::Client::connect([format!("http://{}", server.addr())], None)
            .await
            .unwrap();
        let mut watch = admin
            .watch(
                format!("{prefix}/jobs/election/"),
                Some(WatchOptions::new().with_prefix()),
            )
            .await
            .unwrap();

        // 1.
        let a = lock_a.acquire(request("a")).await.unwrap();
        let ta = a.term();
        history.start("a", ta, monotonic_nanos());
        let a_key = next_put(&mut watch, &[]).await;
        let waiter = tokio::spawn(async move {
            let w = lock_w.acquire(request("w")).await;
            (w, monotonic_nanos())
        });
        let w_key = next_put(&mut watch, &[&a_key]).await;
        let token = a.resume_token().unwrap();
        drop(a);
        history.end("a", ta, monotonic_nanos());
        let b = lock_b.resume(request("b"), &token).await.unwrap().unwrap();
        let tb = b.term();
        history.start("b", tb, monotonic_nanos());
        assert!(tb > ta, "resumed term {tb} not above {ta}");

        // 2.
        let old = m.spawn(Version::Old);
        next_put(&mut watch, &[&a_key, &w_key]).await;

        // 3.
        let token = b.resume_token().unwrap();
        drop(b);
        history.end("b", tb, monotonic_nanos());
        let refused = lock_a.resume(request("b2"), &token).await.unwrap();
        assert!(
            refused.is_none(),
            "a resumption while an old node waits: term {:?}",
            refused.map(|l| l.term())
        );
        let primary = m
            .cluster
            .wait_primary_after(tb, 0, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", m.dump()));
        assert_eq!(primary.pid, old, "{}", m.dump());
        let t_old = primary.term().unwrap();
        assert!(
            !waiter.is_finished(),
            "w won while the old node held the lock"
        );

        // 4.
        m.cluster.signal(old, NodeSignal::Term).await.unwrap();
        let exit = m.cluster.wait_exit(old, WAIT).await.unwrap();
        assert_eq!(exit, (Some(0), None), "{}", m.dump());
        let (w, w_at) = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
        let w = w.unwrap();
        history.start("w", w.term(), w_at);
        assert!(
            w.term() > t_old,
            "w's term {} not above the old node's {t_old}",
            w.term()
        );
        let tw = w.term();
        history.end("w", tw, monotonic_nanos());
        w.release().await.unwrap();

        for p in m.cluster.history().periods() {
            history.push(p.clone());
        }
        let report = history.check();
        assert!(report.is_ok(), "{report}\n{}", m.dump());
        println!("terms: a {ta}, b (resumed) {tb}, old node {t_old}, w {tw}");
    }

    /// A reservation next to a node of 0.1.0 that waits with a key older than the reserved
    /// node's. New nodes run in this process, each on a connection of its own:
    ///
    /// 1. new `a` holds; the old node joins and waits; new `r` joins and waits behind it;
    /// 2. `a` reserves the lock for `r` and releases it. The old node does not know
    ///    reservations: its key is now the oldest, and it takes the lock in key order, with a
    ///    term above `a`'s. `r` may not claim out of key order while a candidate of version
    ///    0.1 exists (that candidate's term, its create revision, could fall below `r`'s): it
    ///    gives the reservation up (deletes it: its lease is still live, so it did not expire)
    ///    and waits in key order;
    /// 3. the old node leaves (`SIGTERM`); `r` takes the lock with a term above the old node's.
    ///
    /// Never two primaries (the old node's events and the in-process terms), terms rise.
    #[tokio::test]
    async fn etcd_reservation_next_to_an_older_waiting_old_node() {
        let Some((mut m, server, url)) = mixed("etcd-reserve").await else {
            return;
        };
        let backend = EtcdBackend::from_url(&url).unwrap();
        let prefix = backend.prefix().to_owned();
        let lock_a = backend.connection().lock("jobs").unwrap();
        let lock_r = backend.connection().lock("jobs").unwrap();
        let mut history = History::new();
        let mut admin = etcd_client::Client::connect([format!("http://{}", server.addr())], None)
            .await
            .unwrap();
        let mut watch = admin
            .watch(
                format!("{prefix}/jobs/election/"),
                Some(WatchOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        let reserved_key = format!("{prefix}/jobs/reserved");
        let mut reserved = admin.watch(reserved_key.clone(), None).await.unwrap();

        // 1.
        let mut a = lock_a.acquire(request("a")).await.unwrap();
        let ta = a.term();
        history.start("a", ta, monotonic_nanos());
        let a_key = next_put(&mut watch, &[]).await;
        let old = m.spawn(Version::Old);
        let old_key = next_put(&mut watch, &[&a_key]).await;
        let waiter = tokio::spawn(async move {
            let r = lock_r.acquire(request("r")).await;
            (r, monotonic_nanos())
        });
        next_put(&mut watch, &[&a_key, &old_key]).await;

        // 2.
        a.reserve("r", Duration::from_secs(2)).await.unwrap();
        let lease = admin
            .get(reserved_key.clone(), None)
            .await
            .unwrap()
            .kvs()
            .first()
            .expect("the reservation")
            .lease();
        history.end("a", ta, monotonic_nanos());
        a.release().await.unwrap();
        let primary = m
            .cluster
            .wait_primary_after(ta, 0, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", m.dump()));
        assert_eq!(primary.pid, old, "{}", m.dump());
        let t_old = primary.term().unwrap();
        assert!(t_old > ta, "the old node's term {t_old} not above {ta}");
        tokio::time::timeout(WAIT, async {
            loop {
                let resp = reserved
                    .message()
                    .await
                    .unwrap()
                    .expect("the watch goes on");
                if resp
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    return;
                }
            }
        })
        .await
        .expect("the reservation withdrawn");
        let ttl = admin.lease_time_to_live(lease, None).await.unwrap().ttl();
        assert!(
            ttl > 0,
            "the reservation expired rather than being given up"
        );
        assert!(
            !waiter.is_finished(),
            "r took the lock while the old node held it"
        );

        // 3.
        m.cluster.signal(old, NodeSignal::Term).await.unwrap();
        let exit = m.cluster.wait_exit(old, WAIT).await.unwrap();
        assert_eq!(exit, (Some(0), None), "{}", m.dump());
        let (r, r_at) = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
        let r = r.unwrap();
        let tr = r.term();
        history.start("r", tr, r_at);
        assert!(tr > t_old, "r's term {tr} not above the old node's {t_old}");
        history.end("r", tr, monotonic_nanos());
        r.release().await.unwrap();

        for p in m.cluster.history().periods() {
            history.push(p.clone());
        }
        let report = history.check();
        assert!(report.is_ok(), "{report}\n{}", m.dump());
        println!(
            "terms: a {ta}, old node {t_old} (took the reserved lock in key order), r {tr} \
             (gave the reservation up, then in order)"
        );
    }

    /// The elector's preferred handover (a higher priority) beside an old node, with real
    /// processes: new `p` is primary and an old node waits; new `c`, with a higher priority,
    /// joins behind it. `p` reserves the lock for `c` and releases it; the old node, whose key is
    /// older than `c`'s, takes it in key order, and `c` gives the reservation up. The old node
    /// does not know priorities and keeps the lock until it leaves (`SIGTERM`); then `c`, the
    /// oldest candidate left, leads. Never two primaries (the witness and every node's events),
    /// terms rise.
    #[tokio::test]
    async fn etcd_priority_handover_beside_an_older_waiting_old_node() {
        let Some((mut m, server, url)) = mixed("etcd-priority").await else {
            return;
        };
        let prefix = EtcdBackend::from_url(&url).unwrap().prefix().to_owned();
        let mut admin = etcd_client::Client::connect([format!("http://{}", server.addr())], None)
            .await
            .unwrap();
        let mut reserved = admin
            .watch(format!("{prefix}/jobs/reserved"), None)
            .await
            .unwrap();
        let (p, tp) = m
            .primary_with_secondaries(Version::New, Version::Old, 1)
            .await;
        let old = m
            .cluster
            .states()
            .values()
            .map(|s| s.pid)
            .find(|&pid| pid != p)
            .expect("the old node");
        let higher = NodeCommand::test_entry("node_entry")
            .expect("the test binary's path")
            .env("TOWER_PRIMARY_PRIORITY", "2");
        let c = m
            .cluster
            .spawn_node_running(&higher, &m.new_config)
            .expect("a new node with a higher priority");
        m.versions.insert(c, Version::New);
        let next = m
            .cluster
            .wait_primary_after(tp, p, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", m.dump()));
        assert_eq!(next.pid, old, "{}", m.dump());
        let t_old = next.term().unwrap();
        assert!(t_old > tp, "{}", m.dump());
        // p reserved the lock for c; c gave the reservation up (deleted it while its lease
        // lived: it did not expire).
        let (lease, record) = tokio::time::timeout(WAIT, async {
            let mut put = None;
            loop {
                let resp = reserved
                    .message()
                    .await
                    .unwrap()
                    .expect("the watch goes on");
                for e in resp.events() {
                    match (e.event_type(), e.kv()) {
                        (EventType::Put, Some(kv)) => {
                            put = Some((kv.lease(), kv.value_str().unwrap().to_owned()));
                        }
                        (EventType::Delete, _) => {
                            if let Some(put) = put.take() {
                                return put;
                            }
                        }
                        _ => {}
                    }
                }
            }
        })
        .await
        .expect("a reservation made and given up");
        let named: serde_json::Value = serde_json::from_str(&record).unwrap();
        assert!(
            named["node"]
                .as_str()
                .is_some_and(|n| n.ends_with(&format!(":{c}"))),
            "reserved for another node than c ({c}): {record}"
        );
        let ttl = admin.lease_time_to_live(lease, None).await.unwrap().ttl();
        assert!(
            ttl > 0,
            "the reservation expired rather than being given up"
        );

        m.cluster.signal(old, NodeSignal::Term).await.unwrap();
        let last = m
            .cluster
            .wait_primary_after(t_old, old, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", m.dump()));
        assert_eq!(last.pid, c, "{}", m.dump());
        assert!(last.term().unwrap() > t_old, "{}", m.dump());
        assert_eq!(m.settled().await, (c, last.term().unwrap()), "{}", m.dump());
        println!(
            "terms: p {tp}, old node {t_old} (took the reserved lock in key order), c {} \
             (priority 2)",
            last.term().unwrap()
        );
        m.check();
    }
}
