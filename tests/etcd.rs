//! The etcd backend against real `etcd` servers: the conformance suite, the backend's own
//! behaviour (terms are create revisions, the re-check after winning, loss on a deleted key,
//! the key layout), and real processes under faults (SIGKILL, SIGTERM, SIGSTOP past the lease, an
//! etcd restart, a stalled connection).
//!
//! Every test starts its own `etcd` (`tower_primary::testing::servers::EtcdServer`: free ports, a
//! temporary data directory) and skips loudly when there is none (fails under
//! `TOWER_PRIMARY_REQUIRE_BACKENDS=1`). Tests that run node processes or restart the server take
//! a shared lock, so they run one at a time. They assert order and the absence of overlapping
//! primary periods; times are printed (`--nocapture`), never asserted tightly.
//!
//! The process tests re-execute this binary as nodes (see `tests/processes.rs` and
//! `tower_primary::testing::node`).
//!
//! ```text
//! cargo test --features etcd --test etcd -- --nocapture
//! ```
#![cfg(feature = "etcd")]

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::{Client, GetOptions, SortOrder, SortTarget};
use tokio::sync::{Mutex, MutexGuard};
use tower_primary::backend::etcd::EtcdBackend;
use tower_primary::backend::{
    AcquireRequest, Backend, BoxFuture, Changes, Leadership, Lock, Stored, from_url,
};
use tower_primary::testing::conformance::{Connection, Fault, FaultHooks, Fixture};
use tower_primary::testing::node::{
    self, Cluster, Event, EventKind, NodeCommand, NodeConfig, NodeSignal,
};
use tower_primary::testing::proxy::TcpProxy;
use tower_primary::testing::servers::{self, EtcdServer};
use tower_primary::{ConfigError, Elector, Error, Holder, Lease, NodeId};

/// The lease every test uses: etcd's minimum.
const LEASE: Duration = Duration::from_secs(2);

/// Generous: elections take milliseconds and failovers a lease; this only bounds a broken run.
const WAIT: Duration = Duration::from_secs(30);

/// Held by tests that run node processes or kill the server: they run one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// An etcd of the test's own, or `None` (skipped loudly) when there is none.
async fn etcd() -> Option<EtcdServer> {
    servers::require("etcd", EtcdServer::start().await)
}

/// A plain etcd-client on the server, to look at and change what the backend stored.
async fn admin(server: &EtcdServer) -> Client {
    Client::connect([format!("http://{}", server.addr())], None)
        .await
        .expect("an etcd client")
}

/// A key prefix of the test's own.
fn prefix(test: &str) -> String {
    format!("test/{test}-{}", std::process::id())
}

// ------------------------------------------------------------------------------------------------
// The conformance suite.

/// One etcd per check; every connection goes through a TCP proxy of its own, so a fault can be
/// injected into one node's connection:
///
/// - `Fail` and `StopRenewals` stall the proxy (every call of that connection, renewals
///   included, hangs and times out; nothing is released);
/// - `LoseLocks` revokes, through another client, the leases of the terms this connection won
///   (as if etcd had expired them).
struct EtcdFixture {
    server: EtcdServer,
    prefix: String,
}

impl EtcdFixture {
    async fn start() -> Option<Self> {
        Some(EtcdFixture {
            server: etcd().await?,
            prefix: prefix("conformance"),
        })
    }
}

impl Fixture for EtcdFixture {
    fn connect(&self) -> Connection {
        let upstream = self.server.addr();
        let proxy = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(TcpProxy::start(upstream))
        })
        .expect("a TCP proxy");
        let backend = EtcdBackend::new([proxy.addr().to_string()])
            .with_prefix(self.prefix.clone())
            .with_request_timeout(Duration::from_secs(2));
        let won = Won::default();
        let hooks = EtcdFaults {
            proxy,
            server: upstream.to_string(),
            won: won.clone(),
        };
        Connection::new(Tracked {
            inner: backend,
            won,
        })
        .with_faults(hooks)
    }

    fn lease(&self) -> Option<Lease> {
        Some(Lease::new(LEASE))
    }
}

/// The terms a connection won, with their lock names.
type Won = Arc<StdMutex<Vec<u64>>>;

#[derive(Debug)]
struct EtcdFaults {
    proxy: TcpProxy,
    server: String,
    won: Won,
}

impl FaultHooks for EtcdFaults {
    fn supports(&self, _fault: Fault) -> bool {
        true
    }

    fn inject(&self, fault: Fault) {
        match fault {
            Fault::Fail | Fault::StopRenewals => self.proxy.stall(),
            Fault::LoseLocks => {
                let terms = self.won.lock().unwrap().clone();
                let server = self.server.clone();
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(revoke_terms(&server, &terms));
                });
            }
            _ => unreachable!("a fault this fixture does not know: {fault:?}"),
        }
    }

    fn heal(&self, fault: Fault) {
        if matches!(fault, Fault::Fail | Fault::StopRenewals) {
            self.proxy.resume();
        }
    }
}

/// Revokes the leases of the candidate keys whose create revisions are `terms`.
async fn revoke_terms(server: &str, terms: &[u64]) {
    let mut client = Client::connect([format!("http://{server}")], None)
        .await
        .expect("an etcd client");
    let all = client
        .get("test/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("a read of every key");
    for kv in all.kvs() {
        let is_candidate = kv.key_str().is_ok_and(|k| k.contains("/election/"));
        if is_candidate && terms.contains(&u64::try_from(kv.create_revision()).unwrap()) {
            client.lease_revoke(kv.lease()).await.expect("a revoke");
        }
    }
}

/// An [`EtcdBackend`] that remembers the terms it won, for `LoseLocks`.
#[derive(Clone, Debug)]
struct Tracked {
    inner: EtcdBackend,
    won: Won,
}

impl Backend for Tracked {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn min_lease(&self) -> Option<Duration> {
        self.inner.min_lease()
    }

    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        Ok(Arc::new(TrackedLock {
            inner: self.inner.lock(name)?,
            won: self.won.clone(),
        }))
    }
}

#[derive(Debug)]
struct TrackedLock {
    inner: Arc<dyn Lock>,
    won: Won,
}

impl Lock for TrackedLock {
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
        Box::pin(async move {
            let leadership = self.inner.acquire(req).await?;
            self.won.lock().unwrap().push(leadership.term());
            Ok(leadership)
        })
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
        self.inner.holder()
    }

    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        self.inner.watch_holder()
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
        self.inner.load(key)
    }

    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        self.inner.store(key, value, term)
    }

    fn watch_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
        self.inner.watch_key(key)
    }
}

mod conformance {
    use super::EtcdFixture;

    tower_primary::conformance_tests!(match EtcdFixture::start().await {
        Some(fixture) => fixture,
        None => return,
    });
}
