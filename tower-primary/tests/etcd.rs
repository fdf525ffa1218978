//! The etcd backend against real `etcd` servers: the conformance suite, the backend's own
//! behaviour (terms are create or claim revisions, a waiter whose lease ran out never wins, loss on a
//! deleted key, the key layout, TLS, resuming a dead holder's lease, candidates of version 0.1),
//! the candidate registry (entries across connections, a `SIGKILL`ed registrant's entry gone
//! within a lease) and reservations (a waiter kept out until expiry, the reserved node ahead of
//! an older waiter, refused after a loss, the handover's time), and real processes under faults
//! (SIGKILL, SIGTERM, SIGSTOP past the lease, an etcd restart, a stalled connection).
//!
//! Every test starts its own `etcd` (`tower_primary_lab::servers::EtcdServer`: free ports, a
//! temporary data directory) and skips loudly when there is none (fails under
//! `TOWER_PRIMARY_REQUIRE_BACKENDS=1`). Tests that run node processes or restart the server take
//! a shared lock, so they run one at a time. They assert order and the absence of overlapping
//! primary periods; times are printed (`--nocapture`), never asserted tightly.
//!
//! The process tests re-execute this binary as nodes (see `tests/processes.rs` and
//! `tower_primary_lab::node`).
//!
//! ```text
//! cargo test --features etcd --test etcd -- --nocapture
//! ```
#![cfg(feature = "etcd")]

mod common;

use common::ms;

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::{Client, GetOptions, SortOrder, SortTarget};
use tokio::sync::{Mutex, MutexGuard};
use tower_primary::backend::etcd::EtcdBackend;
use tower_primary::backend::{
    AcquireRequest, Backend, BoxFuture, Candidate, Changes, Leadership, Lock, Registration, Stored,
    from_url,
};
use tower_primary::clock::monotonic_nanos;
use tower_primary::{ConfigError, Elector, Error, Holder, Lease, NodeId};
use tower_primary_lab::node::{Cluster, EventKind, NodeCommand, NodeConfig, NodeSignal};
use tower_primary_lab::proxy::TcpProxy;
use tower_primary_lab::servers::{self, EtcdServer};
use tower_primary_testing::conformance::{Connection, Fault, FaultHooks, Fixture};
use tower_primary_testing::history::History;

/// The lease every test uses: etcd's minimum.
const LEASE: Duration = Duration::from_secs(2);

/// Generous: elections take milliseconds and failovers a lease; this only bounds a broken run.
const WAIT: Duration = Duration::from_secs(30);

/// Held by tests that run node processes or kill the server: they run one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// An etcd of the test's own, or `None` (skipped loudly) when there is none.
async fn etcd() -> Option<EtcdServer> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tower_primary=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
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
        .map(Arc::new)
        .expect("a TCP proxy");
        let backend = EtcdBackend::new([proxy.addr().to_string()])
            .with_prefix(self.prefix.clone())
            .with_request_timeout(Duration::from_secs(2));
        let won = Won::default();
        let hooks = EtcdFaults {
            proxy: proxy.clone(),
            server: upstream.to_string(),
            won: won.clone(),
        };
        Connection::new(Tracked {
            inner: backend,
            won,
            _proxy: proxy,
        })
        .with_faults(hooks)
    }

    fn lease(&self) -> Option<Lease> {
        Some(Lease::new(LEASE))
    }
}

/// The terms a connection won.
type Won = Arc<StdMutex<Vec<u64>>>;

#[derive(Debug)]
struct EtcdFaults {
    proxy: Arc<TcpProxy>,
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

/// Revokes the leases of the candidate keys whose terms (their create revisions, or for a
/// raised term their latest claim's) are among `terms`.
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
        let term = |rev: i64| terms.contains(&u64::try_from(rev).unwrap());
        if is_candidate && (term(kv.create_revision()) || term(kv.mod_revision())) {
            client.lease_revoke(kv.lease()).await.expect("a revoke");
        }
    }
}

/// An [`EtcdBackend`] that remembers the terms it won, for `LoseLocks`, and keeps its proxy
/// running as long as it is used.
#[derive(Clone, Debug)]
struct Tracked {
    inner: EtcdBackend,
    won: Won,
    _proxy: Arc<TcpProxy>,
}

impl Backend for Tracked {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn address(&self) -> String {
        self.inner.address()
    }

    fn min_lease(&self) -> Option<Duration> {
        self.inner.min_lease()
    }

    fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        Ok(Arc::new(TrackedLock {
            inner: self.inner.lock(name)?,
            won: self.won.clone(),
            _proxy: self._proxy.clone(),
        }))
    }
}

#[derive(Debug)]
struct TrackedLock {
    inner: Arc<dyn Lock>,
    won: Won,
    // An elector keeps only its lock, not the backend.
    _proxy: Arc<TcpProxy>,
}

impl Lock for TrackedLock {
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
        Box::pin(async move {
            let leadership = self.inner.acquire(req).await?;
            self.won.lock().unwrap().push(leadership.term());
            Ok(leadership)
        })
    }

    fn resume<'a>(
        &'a self,
        req: AcquireRequest,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Leadership>>, Error>> {
        Box::pin(async move {
            let resumed = self.inner.resume(req, token).await?;
            if let Some(leadership) = &resumed {
                self.won.lock().unwrap().push(leadership.term());
            }
            Ok(resumed)
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

    fn register(
        &self,
        entry: Candidate,
        lease: Option<Lease>,
    ) -> BoxFuture<'_, Result<Box<dyn Registration>, Error>> {
        self.inner.register(entry, lease)
    }

    fn candidates(&self) -> BoxFuture<'_, Result<Vec<Candidate>, Error>> {
        self.inner.candidates()
    }

    fn watch_candidates(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        self.inner.watch_candidates()
    }
}

mod conformance {
    use super::EtcdFixture;

    tower_primary_testing::conformance_tests!(match EtcdFixture::start().await {
        Some(fixture) => fixture,
        None => return,
    });
}

// ------------------------------------------------------------------------------------------------
// The backend's own behaviour, in process.

/// Every key under `prefix/` in creation order: name, create revision, lease, value, mod
/// revision.
async fn keys(client: &mut Client, prefix: &str) -> Vec<(String, i64, i64, Vec<u8>, i64)> {
    let opts = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend);
    let resp = client
        .get(format!("{prefix}/"), Some(opts))
        .await
        .expect("a read");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().expect("a UTF-8 key").to_owned(),
                kv.create_revision(),
                kv.lease(),
                kv.value().to_vec(),
                kv.mod_revision(),
            )
        })
        .collect()
}

fn request(id: &str) -> AcquireRequest {
    AcquireRequest::new(NodeId::new(id)).with_lease(Some(Lease::new(LEASE)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_is_the_holder_keys_create_revision_and_the_record_its_value() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("layout");
    let backend = EtcdBackend::new([server.addr().to_string()]).with_prefix(prefix.clone());
    let lock = backend.lock("jobs").unwrap();
    let leadership = lock.acquire(request("a")).await.unwrap();

    let mut admin = admin(&server).await;
    let stored = keys(&mut admin, &prefix).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let (key, create, lease, value, _) = &stored[0];
    assert!(
        key.starts_with(&format!("{prefix}/jobs/election/v2-")),
        "{key}"
    );
    // No term was raised before the key was made: its create revision is the term, as for
    // version 0.1.
    assert_eq!(u64::try_from(*create).unwrap(), leadership.term());
    assert_ne!(*lease, 0, "the holder key is not bound to a lease");
    let record: Holder = serde_json::from_slice(value).unwrap();
    assert_eq!(record.id, "a");
    assert_eq!(record.term, leadership.term());
    assert_eq!(record.lease_ms, Some(2000));
    assert_eq!(&record, leadership.holder());
    let seen = lock.holder().await.unwrap().expect("a holder");
    assert_eq!((seen.id.as_str(), seen.term), ("a", leadership.term()));

    // A released lock has no key left: the lease was revoked.
    leadership.release().await.unwrap();
    assert!(keys(&mut admin, &prefix).await.is_empty());
    assert_eq!(lock.holder().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_values_are_stored_under_the_prefix_with_their_term() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("state");
    let backend = EtcdBackend::new([server.addr().to_string()]).with_prefix(prefix.clone());
    let lock = backend.lock("jobs").unwrap();
    let leadership = lock.acquire(request("a")).await.unwrap();
    let term = leadership.term();
    lock.store("last-run", b"2026-11-30", term).await.unwrap();

    let mut admin = admin(&server).await;
    let resp = admin
        .get(format!("{prefix}/jobs/state/last-run"), None)
        .await
        .unwrap();
    let raw = resp.kvs().first().expect("the state key").value().to_vec();
    assert_eq!(raw[..8], term.to_be_bytes());
    assert_eq!(&raw[8..], b"2026-11-30");
    assert_eq!(
        lock.load("last-run").await.unwrap(),
        Some(Stored::new(b"2026-11-30".to_vec(), term))
    );
    // A value too short to hold a term is reported as corrupt, not misread.
    admin
        .put(format!("{prefix}/jobs/state/bad"), "x", None)
        .await
        .unwrap();
    assert!(matches!(lock.load("bad").await, Err(Error::Corrupt { .. })));
    leadership.release().await.unwrap();
}

/// The pitfall measured on etcd's own Campaign (research E5): a waiter whose lease ran out while
/// it waited must not win when the holder lets go. Here the waiter's connection is stalled past its
/// lease, so etcd expires its lease and deletes its candidate key; then the holder releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_whose_lease_ran_out_while_waiting_does_not_win() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("e5");
    let proxy = TcpProxy::start(server.addr()).await.unwrap();
    let direct = EtcdBackend::new([server.addr().to_string()]).with_prefix(prefix.clone());
    let stalled = EtcdBackend::new([proxy.addr().to_string()])
        .with_prefix(prefix.clone())
        .with_request_timeout(Duration::from_secs(30));
    let lock_a = direct.lock("jobs").unwrap();
    let lock_b = stalled.lock("jobs").unwrap();
    let a = lock_a.acquire(request("a")).await.unwrap();

    let mut admin = admin(&server).await;
    let mut watch = admin
        .watch(
            format!("{prefix}/jobs/election/"),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let waiter = tokio::spawn(async move { lock_b.acquire(request("b")).await.map(|l| l.term()) });
    // b's candidate key appears…
    let b_key = next_event(&mut watch, etcd_client::EventType::Put).await;
    proxy.stall();
    // …and goes when etcd expires b's lease, which b cannot renew.
    let gone = next_event(&mut watch, etcd_client::EventType::Delete).await;
    assert_eq!(gone, b_key);
    a.release().await.unwrap();
    let a_gone = next_event(&mut watch, etcd_client::EventType::Delete).await;
    assert_ne!(a_gone, b_key);
    assert!(!waiter.is_finished(), "b's acquire ended while stalled");

    // b hears about it all at once: its acquire must fail, not win.
    proxy.resume();
    let outcome = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    let err = outcome.expect_err("a waiter whose lease had run out became primary");
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    assert!(keys(&mut admin, &prefix).await.is_empty());
}

/// The key of the next event of `kind` on `watch`.
async fn next_event(watch: &mut etcd_client::WatchStream, kind: etcd_client::EventType) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            let resp = watch.message().await.unwrap().expect("the watch goes on");
            for e in resp.events() {
                if e.event_type() == kind {
                    return e.kv().unwrap().key_str().unwrap().to_owned();
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind:?} event within {WAIT:?}"))
}

/// A holder whose key is deleted by hand keeps renewing its lease, so its deadline keeps moving:
/// only the watch on its own key can tell it the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_whose_key_is_deleted_learns_it_from_the_watch() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("deleted-key");
    let backend = EtcdBackend::new([server.addr().to_string()]).with_prefix(prefix.clone());
    let lock = backend.lock("jobs").unwrap();
    let mut a = lock.acquire(request("a")).await.unwrap();
    let mut renewals = a.renewals().expect("etcd is a lease backend");
    let first = renewals.latest();
    // Renewals are confirmed (send times rise) while the lock is held.
    let renewed = tokio::time::timeout(WAIT, renewals.changed())
        .await
        .unwrap();
    assert!(renewed > first);

    let mut admin = admin(&server).await;
    let stored = keys(&mut admin, &prefix).await;
    admin.delete(stored[0].0.clone(), None).await.unwrap();
    let lost = tokio::time::timeout(WAIT, a.lost()).await.unwrap();
    assert!(
        matches!(&lost, Error::Lost { reason, .. } if reason.contains("deleted")),
        "{lost:?}"
    );
    // The lock is free for the next node, with a higher term.
    let b = tokio::time::timeout(WAIT, lock.acquire(request("b")))
        .await
        .unwrap()
        .unwrap();
    assert!(b.term() > a.term());
    a.release().await.unwrap();
    b.release().await.unwrap();
}

/// Dropping an acquire that already created its candidate key revokes the lease at once, rather
/// than leaving the key to expire with the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_acquire_revokes_its_lease() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("dropped");
    let backend = EtcdBackend::new([server.addr().to_string()]).with_prefix(prefix.clone());
    let lock = backend.lock("jobs").unwrap();
    let a = lock.acquire(request("a")).await.unwrap();

    let mut admin = admin(&server).await;
    let mut watch = admin
        .watch(
            format!("{prefix}/jobs/election/"),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let waiting = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire(request("b")).await.map(|l| l.term()) })
    };
    let b_key = next_event(&mut watch, etcd_client::EventType::Put).await;
    let b_lease = keys(&mut admin, &prefix)
        .await
        .into_iter()
        .find(|k| k.0 == b_key)
        .expect("b's key")
        .2;
    let remaining = admin.lease_time_to_live(b_lease, None).await.unwrap().ttl();
    assert!(remaining > 0, "b's lease is already gone");
    let dropped = std::time::Instant::now();
    waiting.abort();
    let gone = next_event(&mut watch, etcd_client::EventType::Delete).await;
    let took = dropped.elapsed();
    assert_eq!(gone, b_key);
    // Revoked, not expired: b's keepalives (every lease / 3) had left it more than half the lease.
    assert!(
        took < LEASE / 2,
        "b's key went {took:?} after the drop: it expired"
    );
    let ttl = admin.lease_time_to_live(b_lease, None).await.unwrap().ttl();
    assert_eq!(ttl, -1, "b's lease still exists");
    let holder = lock.holder().await.unwrap().map(|h| h.id);
    assert_eq!(holder.as_deref(), Some("a"));
    a.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_strings_reach_the_server_under_their_prefix() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("from-url");
    let url = format!("{}?prefix={prefix}", server.url());
    let backend = from_url(&url).unwrap();
    assert_eq!(backend.name(), "etcd");
    assert_eq!(backend.min_lease(), Some(Duration::from_secs(2)));
    let elector = Elector::builder("jobs")
        .backend(backend)
        .node(NodeId::new("a"))
        .lease(Lease::new(LEASE))
        .spawn()
        .unwrap();
    let ctx = tokio::time::timeout(WAIT, elector.handle().wait_primary())
        .await
        .unwrap();
    let mut admin = admin(&server).await;
    let candidates = format!("{prefix}/jobs/election");
    let stored = keys(&mut admin, &candidates).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(u64::try_from(stored[0].1).unwrap(), ctx.term());
    // The elector's registry entry lives beside the candidates, not among them.
    let registry = keys(&mut admin, &format!("{prefix}/jobs/registry")).await;
    assert_eq!(registry.len(), 1, "{registry:?}");
    let reader = EtcdBackend::from_url(&url).unwrap().lock("jobs").unwrap();
    let mut changes = reader.watch_candidates().await.unwrap();
    elector.shutdown().await;
    assert!(keys(&mut admin, &candidates).await.is_empty());
    // Withdrawn as the elector stops (its lease revoked in the background).
    until_entries(
        reader.as_ref(),
        &mut changes,
        "the entry withdrawn",
        <[_]>::is_empty,
    )
    .await;
}

/// An error's text with its sources, as a logger shows it (each cause once).
fn chain(e: &dyn std::error::Error) -> String {
    let mut shown = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !shown.contains(&text) {
            shown = format!("{shown}: {text}");
        }
        source = s.source();
    }
    shown
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_backend_error_that_says_so_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let lock = EtcdBackend::new([format!("127.0.0.1:{port}")])
        .with_request_timeout(Duration::from_secs(2))
        .lock("jobs")
        .unwrap();
    let err = tokio::time::timeout(WAIT, lock.acquire(request("a")))
        .await
        .expect("an unreachable server is an error, not a hang")
        .expect_err("no lock without a server");
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    let text = err.to_string();
    eprintln!("{text}");
    // The channel connects lazily: the first request says it.
    assert!(
        text.starts_with(
            "etcd backend: grant a lease: tcp connect error: transport error: Connection refused"
        ),
        "{text}"
    );
    assert_eq!(text.matches("etcd backend").count(), 1, "{text}");
    assert_eq!(chain(&err), text, "the sources add nothing new");
    for driver_words in ["Status {", "MetadataMap", "tonic", "Error {"] {
        assert!(!text.contains(driver_words), "{text}");
    }
    let segments: Vec<&str> = text.split(": ").collect();
    for (i, s) in segments.iter().enumerate().skip(1) {
        assert_ne!(Some(s), segments.get(i - 1), "a doubled part: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_against_a_plain_server_is_a_misconfiguration() {
    let Some(server) = etcd().await else { return };
    let lock = EtcdBackend::new([server.url().trim_start_matches("etcd://").to_owned()])
        .with_tls(true)
        .with_request_timeout(Duration::from_secs(3))
        .lock("jobs")
        .unwrap();
    let err = tokio::time::timeout(WAIT, lock.acquire(request("a")))
        .await
        .expect("a refused handshake is an error, not a hang")
        .expect_err("no lock over a failed handshake");
    let text = err.to_string();
    eprintln!("{text}");
    assert_eq!(
        err.misconfiguration(),
        Some(tower_primary::Misconfiguration::Tls),
        "{err:?}"
    );
    // The server either sends bytes the handshake cannot read, or resets the connection; then
    // the backend finds it answering without TLS.
    assert!(
        text.starts_with("etcd backend: TLS handshake failed: check the connection: ")
            && (text.contains("tls handshake") || text.contains("the server answers without TLS")),
        "{text}"
    );
    assert!(
        text.ends_with(
            "; check etcd:// or etcds:// (does the server serve TLS?) and the CA certificate"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn leases_under_two_seconds_are_refused_at_spawn() {
    let err = Elector::builder("jobs")
        .backend(EtcdBackend::new(["127.0.0.1:2379"]))
        .lease(Lease::new(Duration::from_millis(1500)))
        .spawn()
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::InvalidTiming {
                setting: "lease",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("2s"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// Resuming a dead holder's lease, and candidates of version 0.1.

/// Three nodes' views of one lock under `prefix`, each on a connection of its own (as three
/// processes would be).
fn three_locks(server: &EtcdServer, prefix: &str) -> [Arc<dyn Lock>; 3] {
    let backend = EtcdBackend::new([server.addr().to_string()]).with_prefix(prefix);
    [
        backend.lock("jobs").unwrap(),
        backend.connection().lock("jobs").unwrap(),
        backend.connection().lock("jobs").unwrap(),
    ]
}

/// A candidate key as a node of version 0.1 makes it (16 hex digits of its lease, on that
/// lease, with its holder record), through the admin client. Returns the lease and the key's
/// create revision.
async fn old_candidate(admin: &mut Client, prefix: &str, id: &str) -> (i64, i64) {
    let lease = admin.lease_grant(30, None).await.unwrap().id();
    let key = format!("{prefix}/jobs/election/{:016x}", lease.cast_unsigned());
    let record = serde_json::to_vec(&Holder::new(&NodeId::new(id), 0)).unwrap();
    let put = admin
        .put(
            key,
            record,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    (lease, put.header().unwrap().revision())
}

/// Waits until the renewals of `held` have been confirmed for longer than a lease after `from`:
/// the lease lives on only if this node keeps it alive.
async fn renewed_past_a_lease(held: &dyn Leadership) {
    let mut renewals = held.renewals().expect("etcd is a lease backend");
    let from = renewals.latest();
    tokio::time::timeout(WAIT, async {
        while renewals.latest().saturating_duration_since(from) <= LEASE {
            renewals.changed().await;
        }
    })
    .await
    .expect("renewals go on");
}

/// A holder dies (its leadership is dropped: no release, no more keepalives); another process
/// resumes with its token. The lease and the key stay (same lease id, same create revision, so
/// the waiter that was behind it stays behind it); the claim writes the key again, and its
/// revision is the new, higher term; the record names the new node; the new node keeps the
/// lease alive. When it releases, the waiter — whose key is older than the resumption — wins
/// with a term higher still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_keeps_the_lease_and_key_and_claims_a_higher_term() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("resume");
    let [lock_a, lock_b, lock_w] = three_locks(&server, &prefix);
    let mut admin = admin(&server).await;
    let a = lock_a.acquire(request("a")).await.unwrap();
    let ta = a.term();
    let token = a
        .resume_token()
        .expect("etcd leaderships give a resume token");
    let before = keys(&mut admin, &prefix).await;
    assert_eq!(before.len(), 1, "{before:?}");

    let mut watch = admin
        .watch(
            format!("{prefix}/jobs/election/"),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let waiter = tokio::spawn(async move { lock_w.acquire(request("w")).await });
    next_event(&mut watch, etcd_client::EventType::Put).await;

    drop(a);
    let b = lock_b
        .resume(request("b"), &token)
        .await
        .unwrap()
        .expect("a live lease resumes");
    let tb = b.term();
    assert!(tb > ta, "resumed term {tb} not above {ta}");
    assert_eq!((b.holder().id.as_str(), b.holder().term), ("b", tb));

    let after = keys(&mut admin, &prefix).await;
    let (key, create, lease, value, claim) = &after[0];
    assert_eq!(
        (key, create, lease),
        (&before[0].0, &before[0].1, &before[0].2)
    );
    assert_eq!(u64::try_from(*claim).unwrap(), tb);
    let record: Holder = serde_json::from_slice(value).unwrap();
    assert_eq!(record.id, "b");
    let seen = lock_b.holder().await.unwrap().expect("a holder");
    assert_eq!((seen.id.as_str(), seen.term), ("b", tb));

    renewed_past_a_lease(b.as_ref()).await;
    let ttl = admin.lease_time_to_live(*lease, None).await.unwrap().ttl();
    assert!(ttl > 0, "the resumed lease expired");
    assert!(
        !waiter.is_finished(),
        "the waiter won while b held the lock"
    );

    let resumed_at = std::time::Instant::now();
    b.release().await.unwrap();
    let w = tokio::time::timeout(WAIT, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    eprintln!(
        "etcd: waiter took over {:.1} ms after the resumed holder released",
        resumed_at.elapsed().as_secs_f64() * 1e3
    );
    assert!(w.term() > tb, "waiter's term {} not above {tb}", w.term());
    // The waiter's key is older than the resumed term: its own term is raised to its claim.
    let candidates = format!("{prefix}/jobs/election");
    let stored = keys(&mut admin, &candidates).await;
    assert_eq!(u64::try_from(stored[0].4).unwrap(), w.term(), "{stored:?}");
    let tw = w.term();
    w.release().await.unwrap();
    // A key made after every raised term has its create revision as its term again.
    let fresh = lock_b.acquire(request("f")).await.unwrap();
    let stored = keys(&mut admin, &candidates).await;
    assert_eq!(u64::try_from(stored[0].1).unwrap(), fresh.term());
    assert!(fresh.term() > tw);
    fresh.release().await.unwrap();
}

/// A token resumes only the term it was given by: not once another process resumed it, not
/// after the lease was revoked or ran out. Bad tokens are errors, not `None`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_or_bad_resume_tokens_resume_nothing() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("stale-token");
    let [lock_a, lock_b, lock_c] = three_locks(&server, &prefix);
    let mut admin = admin(&server).await;

    // Claimed again since: the spent token resumes nothing, and leaves the holder alone.
    let a = lock_a.acquire(request("a")).await.unwrap();
    let token_a = a.resume_token().unwrap();
    drop(a);
    let b = lock_b
        .resume(request("b"), &token_a)
        .await
        .unwrap()
        .unwrap();
    assert!(
        lock_c
            .resume(request("c"), &token_a)
            .await
            .unwrap()
            .is_none()
    );
    let stored = keys(&mut admin, &prefix).await;
    assert_eq!(u64::try_from(stored[0].4).unwrap(), b.term());
    let lease = stored[0].2;
    assert!(admin.lease_time_to_live(lease, None).await.unwrap().ttl() > 0);
    assert_eq!(lock_c.holder().await.unwrap().unwrap().id, "b");

    // Revoked: nothing to resume.
    let token_b = b.resume_token().unwrap();
    assert_ne!(token_b, token_a);
    admin.lease_revoke(lease).await.unwrap();
    assert!(
        lock_c
            .resume(request("c"), &token_b)
            .await
            .unwrap()
            .is_none()
    );
    drop(b);

    // Ran out: nothing to resume either.
    let d = lock_a.acquire(request("d")).await.unwrap();
    let token_d = d.resume_token().unwrap();
    let mut watch = admin
        .watch(
            format!("{prefix}/jobs/election/"),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    drop(d);
    next_event(&mut watch, etcd_client::EventType::Delete).await;
    assert!(
        lock_c
            .resume(request("c"), &token_d)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(lock_c.holder().await.unwrap(), None);

    // Not a token, or another lock's: corrupt, never a guess.
    for bad in [
        "",
        "{}",
        r#"{"lease":1,"key":"elsewhere/v2-0000000000000001","revision":5}"#,
    ] {
        let err = lock_c.resume(request("c"), bad).await.unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{bad:?}: {err:?}");
    }
}

/// A state write of the resumed term arriving late (its process was already replaced) is
/// refused on the server, and the old leadership learns from its watch that its key was claimed
/// again; the resumed term writes. Releasing the old leadership then leaves the lease alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_state_write_of_the_resumed_term_is_refused() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("late-write");
    let [lock_a, lock_b, lock_c] = three_locks(&server, &prefix);
    let mut a = lock_a.acquire(request("a")).await.unwrap();
    let ta = a.term();
    lock_a.store("k", b"a", ta).await.unwrap();
    // a is not dropped: its process still believes it holds the term (its write is late).
    let b = lock_b
        .resume(request("b"), &a.resume_token().unwrap())
        .await
        .unwrap()
        .unwrap();
    let tb = b.term();
    let late = lock_a.store("k", b"late", ta).await;
    assert!(
        matches!(late, Err(Error::StaleTerm { term, current: Some(c), .. }) if term == ta && c == tb),
        "{late:?}"
    );
    let lost = tokio::time::timeout(WAIT, a.lost()).await.unwrap();
    assert!(
        matches!(&lost, Error::Lost { reason, .. } if reason.contains("claimed again")),
        "{lost:?}"
    );
    lock_b.store("k", b"b", tb).await.unwrap();
    assert_eq!(
        lock_c.load("k").await.unwrap(),
        Some(Stored::new(b"b".to_vec(), tb))
    );
    // The old leadership's release leaves the lease to the process that resumed it.
    a.release().await.unwrap();
    let mut admin = admin(&server).await;
    let candidates = format!("{prefix}/jobs/election");
    let stored = keys(&mut admin, &candidates).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(u64::try_from(stored[0].4).unwrap(), tb);
    assert!(
        admin
            .lease_time_to_live(stored[0].2, None)
            .await
            .unwrap()
            .ttl()
            > 0
    );
    lock_b.store("k", b"b again", tb).await.unwrap();
    b.release().await.unwrap();
    assert!(keys(&mut admin, &candidates).await.is_empty());
}

/// While a candidate of version 0.1 waits, no claim out of key order is made: a resumption
/// returns `None` and ends the dead holder's lease at once, so the old candidate — whose term
/// is its key's create revision — takes the lock with a term above the dead holder's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_resume_while_a_candidate_of_version_0_1_waits() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("resume-old");
    let [lock_a, lock_b, lock_c] = three_locks(&server, &prefix);
    let mut admin = admin(&server).await;
    let a = lock_a.acquire(request("a")).await.unwrap();
    let ta = a.term();
    let token = a.resume_token().unwrap();
    let (old_lease, old_term) = old_candidate(&mut admin, &prefix, "old").await;
    drop(a);
    assert!(lock_b.resume(request("b"), &token).await.unwrap().is_none());
    let left = keys(&mut admin, &prefix).await;
    assert_eq!(
        left.len(),
        1,
        "the dead holder's key is still there: {left:?}"
    );
    let holder = lock_c.holder().await.unwrap().unwrap();
    assert_eq!(holder.id, "old");
    assert_eq!(holder.term, u64::try_from(old_term).unwrap());
    assert!(holder.term > ta);
    admin.lease_revoke(old_lease).await.unwrap();
    let c = lock_c.acquire(request("c")).await.unwrap();
    assert!(c.term() > holder.term);
    c.release().await.unwrap();
}

/// The order of terms across a resumption and a candidate of version 0.1: a new waiter whose
/// key is older than a resumption, and an old candidate that came after it. The new waiter,
/// oldest once the resumed holder is gone, would claim above the old candidate's future term
/// (its create revision); so it gives its place up (re-creates its key behind the old one), the
/// old candidate takes the lock, and the new waiter takes it after, each term above the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_waiter_gives_its_place_to_a_candidate_of_version_0_1() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("yield-old");
    let [lock_a, lock_b, lock_w] = three_locks(&server, &prefix);
    let mut admin = admin(&server).await;
    let mut watch = admin
        .watch(
            format!("{prefix}/jobs/election/"),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let a = lock_a.acquire(request("a")).await.unwrap();
    let ta = a.term();
    let a_key = next_event(&mut watch, etcd_client::EventType::Put).await;
    let waiter = tokio::spawn(async move { lock_w.acquire(request("w")).await });
    let w_key = loop {
        let key = next_event(&mut watch, etcd_client::EventType::Put).await;
        if key != a_key {
            break key;
        }
    };
    let token = a.resume_token().unwrap();
    drop(a);
    let b = lock_b.resume(request("b"), &token).await.unwrap().unwrap();
    let tb = b.term();
    assert!(tb > ta);
    let (old_lease, old_term) = old_candidate(&mut admin, &prefix, "old").await;
    let old_term = u64::try_from(old_term).unwrap();
    assert!(old_term > tb);

    b.release().await.unwrap();
    // The waiter's key goes and comes back younger than the old candidate's.
    let gone = next_event(&mut watch, etcd_client::EventType::Delete).await;
    assert_eq!(gone, a_key);
    let yielded = next_event(&mut watch, etcd_client::EventType::Delete).await;
    assert_eq!(yielded, w_key);
    let holder = lock_b.holder().await.unwrap().unwrap();
    assert_eq!((holder.id.as_str(), holder.term), ("old", old_term));
    assert!(
        !waiter.is_finished(),
        "the new waiter won over the old candidate"
    );

    admin.lease_revoke(old_lease).await.unwrap();
    let w = tokio::time::timeout(WAIT, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        w.term() > old_term,
        "the waiter's term {} is not above the old candidate's {old_term}",
        w.term()
    );
    w.release().await.unwrap();
}

/// How long a resumption takes, from the call to the leadership (what a host group's next
/// candidate spends once its predecessor is certified dead): 100 rounds, printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_takes_milliseconds() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("resume-time");
    let [lock_a, lock_b, _] = three_locks(&server, &prefix);
    let mut took = Vec::with_capacity(100);
    for _ in 0..100 {
        let a = lock_a.acquire(request("a")).await.unwrap();
        let token = a.resume_token().unwrap();
        drop(a);
        let started = std::time::Instant::now();
        let b = lock_b.resume(request("b"), &token).await.unwrap().unwrap();
        took.push(started.elapsed());
        b.release().await.unwrap();
    }
    took.sort();
    eprintln!(
        "etcd resume over {} rounds: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        took.len(),
        took[49].as_secs_f64() * 1e3,
        took[98].as_secs_f64() * 1e3,
        took[99].as_secs_f64() * 1e3
    );
}

// ------------------------------------------------------------------------------------------------
// The candidate registry and reservations.

/// The registry entries another connection reads, by node id.
async fn entries(lock: &dyn Lock) -> Vec<Candidate> {
    let mut all = lock.candidates().await.unwrap();
    all.sort_by(|a, b| a.node.cmp(&b.node));
    all
}

/// Waits (on `changes`) until `lock`'s registry satisfies `done`; returns how long it took.
async fn until_entries(
    lock: &dyn Lock,
    changes: &mut Box<dyn Changes>,
    what: &str,
    done: impl Fn(&[Candidate]) -> bool,
) -> Duration {
    let started = std::time::Instant::now();
    let reached = tokio::time::timeout(WAIT, async {
        while !done(&entries(lock).await) {
            changes.changed().await.unwrap();
        }
    })
    .await;
    if reached.is_err() {
        panic!("{what}: not within {WAIT:?}: {:?}", entries(lock).await);
    }
    started.elapsed()
}

/// Entries registered on one connection are read on another as soon as `register` returns;
/// `update` replaces one; registering a node again replaces its entry; dropping a registration
/// withdraws it at once (its lease is revoked). The watch fires at each step. The keys live
/// under `P/L/registry/`, outside the range every version reads candidates from, and the lock
/// itself is untouched: nobody holds it, a campaign's term is its key's create revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_entries_are_seen_updated_and_withdrawn_across_connections() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("registry");
    let [lock_a, lock_b, reader] = three_locks(&server, &prefix);
    let mut changes = reader.watch_candidates().await.unwrap();
    assert!(entries(reader.as_ref()).await.is_empty());

    let a = lock_a
        .register(
            Candidate::new("a").with_priority(7),
            Some(Lease::new(LEASE)),
        )
        .await
        .unwrap();
    assert_eq!(
        entries(reader.as_ref()).await,
        [Candidate::new("a").with_priority(7)]
    );
    let b = lock_b
        .register(Candidate::new("b").with_ready(false), None)
        .await
        .unwrap();
    assert_eq!(entries(reader.as_ref()).await.len(), 2);
    tokio::time::timeout(WAIT, changes.changed())
        .await
        .unwrap()
        .unwrap();

    b.update(Candidate::new("b").with_ready(true).with_draining(true))
        .await
        .unwrap();
    let seen = entries(reader.as_ref()).await;
    assert_eq!(
        seen[1],
        Candidate::new("b").with_ready(true).with_draining(true)
    );

    let mut admin = admin(&server).await;
    let stored = keys(&mut admin, &prefix).await;
    let names: Vec<&str> = stored.iter().map(|k| k.0.as_str()).collect();
    assert_eq!(
        names,
        [
            format!("{prefix}/jobs/registry/a"),
            format!("{prefix}/jobs/registry/b")
        ],
        "{stored:?}"
    );
    assert!(stored.iter().all(|k| k.2 != 0), "an entry without a lease");
    assert_eq!(reader.holder().await.unwrap(), None);

    // Registered again: replaced, and the first registration's drop (its lease revoked) leaves
    // the second alone.
    let first = stored[0].2;
    let a2 = lock_b
        .register(Candidate::new("a").with_priority(8), None)
        .await
        .unwrap();
    assert_eq!(
        entries(reader.as_ref()).await[0],
        Candidate::new("a").with_priority(8)
    );
    drop(a);
    // The revocation runs in the background and changes no key: nothing to watch but the lease.
    tokio::time::timeout(WAIT, async {
        while admin.lease_time_to_live(first, None).await.unwrap().ttl() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the dropped registration's lease revoked");
    assert_eq!(
        entries(reader.as_ref()).await[0],
        Candidate::new("a").with_priority(8)
    );

    // Withdrawn on drop, at once (revoked, not expired), the watch says so.
    let dropped = std::time::Instant::now();
    drop(b);
    until_entries(reader.as_ref(), &mut changes, "b withdrawn", |e| {
        e.iter().all(|c| c.node != "b")
    })
    .await;
    let took = dropped.elapsed();
    assert!(
        took < LEASE / 2,
        "b's entry went after {took:?}: it expired"
    );
    drop(a2);
    until_entries(
        reader.as_ref(),
        &mut changes,
        "all withdrawn",
        <[_]>::is_empty,
    )
    .await;

    // A campaign next to the registry: its term is its key's create revision, as before.
    let held = reader.acquire(request("c")).await.unwrap();
    let stored = keys(&mut admin, &format!("{prefix}/jobs/election")).await;
    assert_eq!(u64::try_from(stored[0].1).unwrap(), held.term());
    held.release().await.unwrap();
}

/// A registration whose lease is revoked behind its back (etcd expired it during a stall, or
/// an operator revoked it) writes its entry again on a new lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_whose_lease_was_revoked_writes_its_entry_again() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("registry-revoked");
    let [lock_a, reader, _] = three_locks(&server, &prefix);
    let mut changes = reader.watch_candidates().await.unwrap();
    let _a = lock_a
        .register(Candidate::new("a"), Some(Lease::new(LEASE)))
        .await
        .unwrap();
    let mut admin = admin(&server).await;
    let first = keys(&mut admin, &prefix).await[0].2;
    admin.lease_revoke(first).await.unwrap();
    until_entries(reader.as_ref(), &mut changes, "a gone", <[_]>::is_empty).await;
    let took = until_entries(reader.as_ref(), &mut changes, "a back", |e| e.len() == 1).await;
    let now = keys(&mut admin, &prefix).await;
    assert_ne!(now[0].2, first, "the entry is on the revoked lease");
    eprintln!(
        "etcd registry: entry written again {:.1} ms after its lease was revoked",
        took.as_secs_f64() * 1e3
    );
}

/// The environment variable that makes this binary a registrant process (its value: the
/// backend string).
const REGISTRANT: &str = "TOWER_PRIMARY_TEST_REGISTRANT";

/// The registrant side of this binary: registers node `doomed` on lock `jobs`, says so on
/// stdout, and waits to be killed.
#[test]
fn registrant_entry() {
    let Ok(url) = std::env::var(REGISTRANT) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let lock = EtcdBackend::from_url(&url).unwrap().lock("jobs").unwrap();
        let _entry = lock
            .register(Candidate::new("doomed"), Some(Lease::new(LEASE)))
            .await
            .unwrap();
        println!("registered");
        std::future::pending::<()>().await;
    });
}

/// The entry of a registrant process killed with `SIGKILL` (nothing withdraws it) is gone
/// within one lease: etcd expires the lease that nobody keeps alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entry_of_a_killed_registrant_goes_within_a_lease() {
    use tokio::io::AsyncBufReadExt;

    let Some(server) = etcd().await else { return };
    let prefix = prefix("registry-killed");
    let url = format!("{}?prefix={prefix}", server.url());
    let reader = EtcdBackend::from_url(&url).unwrap().lock("jobs").unwrap();
    let mut changes = reader.watch_candidates().await.unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "registrant_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(REGISTRANT, &url)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("registered") {
                return;
            }
        }
        panic!("the registrant exited before it registered");
    })
    .await
    .expect("the registrant registers");
    assert_eq!(entries(reader.as_ref()).await, [Candidate::new("doomed")]);

    child.start_kill().unwrap();
    let killed = std::time::Instant::now();
    child.wait().await.unwrap();
    until_entries(
        reader.as_ref(),
        &mut changes,
        "the dead entry gone",
        <[_]>::is_empty,
    )
    .await;
    let took = killed.elapsed();
    eprintln!(
        "etcd registry: a SIGKILLed registrant's entry gone after {:.0} ms (lease {LEASE:?})",
        took.as_secs_f64() * 1e3
    );
    // etcd checks for expired leases every 500 ms.
    assert!(
        took <= LEASE + Duration::from_millis(600),
        "gone after {took:?}"
    );
}

/// The next candidate key created under `watch` (a put that made the key, not a claim that
/// wrote it again).
async fn next_created(watch: &mut etcd_client::WatchStream) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            let resp = watch.message().await.unwrap().expect("the watch goes on");
            for e in resp.events() {
                if let Some(kv) = e.kv().filter(|kv| {
                    e.event_type() == etcd_client::EventType::Put
                        && kv.create_revision() == kv.mod_revision()
                }) {
                    return kv.key_str().unwrap().to_owned();
                }
            }
        }
    })
    .await
    .expect("a new candidate key")
}

type Pending = tokio::task::JoinHandle<Result<Box<dyn Leadership>, Error>>;

/// Starts `lock.acquire` for `node` in a task, and returns once its candidate key exists (it
/// waits in key order), with the key.
async fn waiting(
    lock: &Arc<dyn Lock>,
    node: &str,
    watch: &mut etcd_client::WatchStream,
) -> (Pending, String) {
    let lock = lock.clone();
    let req = request(node);
    let task = tokio::spawn(async move { lock.acquire(req).await });
    let key = next_created(watch).await;
    (task, key)
}

async fn election_watch(admin: &mut Client, prefix: &str) -> etcd_client::WatchStream {
    admin
        .watch(
            format!("{prefix}/jobs/election/"),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap()
}

/// A reservation for a node that does not come: the waiter does not take the released lock
/// during the window, and takes it once the reservation's lease expires (etcd times it: a lease
/// of the window, at least 2 s), with a higher term. Its acquire neither fails nor returns
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_does_not_take_a_lock_reserved_for_another_until_it_expires() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("reserve-expiry");
    let [lock_a, lock_w, reader] = three_locks(&server, &prefix);
    let mut admin = admin(&server).await;
    let mut watch = election_watch(&mut admin, &prefix).await;
    let mut a = lock_a.acquire(request("a")).await.unwrap();
    let ta = a.term();
    next_created(&mut watch).await;
    let (mut w, _) = waiting(&lock_w, "w", &mut watch).await;

    a.reserve("absent", Duration::from_millis(500))
        .await
        .unwrap();
    let reserved = admin
        .get(format!("{prefix}/jobs/reserved"), None)
        .await
        .unwrap();
    let kv = reserved.kvs().first().expect("the reservation key");
    let ttl = admin.lease_time_to_live(kv.lease(), None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 2, "a window under 2 s is rounded up");
    let released = std::time::Instant::now();
    a.release().await.unwrap();
    assert_eq!(reader.holder().await.unwrap(), None);
    // Most of the window (2 s from the reservation): no event to await, the waiter must not
    // return meanwhile.
    let early = tokio::time::timeout(Duration::from_millis(1500), &mut w).await;
    assert!(early.is_err(), "the waiter took a reserved lock: {early:?}");
    let w = tokio::time::timeout(WAIT, w)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let took = released.elapsed();
    eprintln!(
        "etcd reservation for an absent node: the waiter took the lock {:.0} ms after the release",
        took.as_secs_f64() * 1e3
    );
    assert!(took >= Duration::from_millis(1500));
    assert!(w.term() > ta, "term {} not above {ta}", w.term());
    assert_eq!(reader.holder().await.unwrap().unwrap().id, "w");
    let left = admin
        .get(format!("{prefix}/jobs/reserved"), None)
        .await
        .unwrap();
    assert!(left.kvs().is_empty(), "the reservation outlived its lease");
    w.release().await.unwrap();
}

/// The reserved node takes the lock at once when the holder releases, ahead of a waiter whose
/// key is older, with a term above the holder's; it consumes the reservation (a later one
/// replaced an earlier one for another node). Everyone reads it as the holder (the mark of a
/// holder ahead of the key order), and the older waiter waits until it lets go, then takes
/// the lock with a term above it. State writes are fenced as for any term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reserved_node_takes_the_lock_ahead_of_an_older_waiter() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("reserve-ahead");
    let [lock_a, lock_w, lock_r] = three_locks(&server, &prefix);
    let reader = EtcdBackend::new([server.addr().to_string()])
        .with_prefix(prefix.clone())
        .lock("jobs")
        .unwrap();
    let mut admin = admin(&server).await;
    let mut watch = election_watch(&mut admin, &prefix).await;
    let mut a = lock_a.acquire(request("a")).await.unwrap();
    let ta = a.term();
    next_created(&mut watch).await;
    let (mut w, w_key) = waiting(&lock_w, "w", &mut watch).await;
    let (r, r_key) = waiting(&lock_r, "r", &mut watch).await;
    assert!(w_key != r_key);

    a.reserve("someone-else", Duration::from_secs(2))
        .await
        .unwrap();
    a.reserve("r", Duration::from_secs(2)).await.unwrap();
    let released = std::time::Instant::now();
    a.release().await.unwrap();
    let r = tokio::time::timeout(WAIT, r)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let took = released.elapsed();
    eprintln!(
        "etcd reserved handover: release → reserved acquire {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    let tr = r.term();
    assert!(tr > ta, "term {tr} not above {ta}");
    assert_eq!(
        (r.holder().id.as_str(), r.holder().term),
        ("r", tr),
        "the leadership's record"
    );
    let seen = reader.holder().await.unwrap().unwrap();
    assert_eq!((seen.id.as_str(), seen.term), ("r", tr));
    let reserved = admin
        .get(format!("{prefix}/jobs/reserved"), None)
        .await
        .unwrap();
    assert!(
        reserved.kvs().is_empty(),
        "the reservation was not consumed"
    );
    let mark = admin
        .get(format!("{prefix}/jobs/reserved-holder"), None)
        .await
        .unwrap();
    assert_eq!(
        mark.kvs().first().map(|kv| kv.value().to_vec()),
        Some(r_key.clone().into_bytes())
    );
    lock_r.store("k", b"r", tr).await.unwrap();

    // The older waiter stays behind until r lets go (checked for a while: no event to await).
    let early = tokio::time::timeout(Duration::from_millis(300), &mut w).await;
    assert!(early.is_err(), "the older waiter took the lock: {early:?}");
    r.release().await.unwrap();
    let w = tokio::time::timeout(WAIT, w)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(w.term() > tr, "term {} not above {tr}", w.term());
    assert_eq!(reader.holder().await.unwrap().unwrap().id, "w");
    let mark = admin
        .get(format!("{prefix}/jobs/reserved-holder"), None)
        .await
        .unwrap();
    assert!(mark.kvs().is_empty(), "the mark outlived its holder");
    w.release().await.unwrap();
}

/// A reservation is written only while its term holds the lock: after the term lost its key
/// (and a successor took the lock) it is refused, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_after_losing_the_lock_is_refused() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("reserve-lost");
    let [lock_a, lock_b, _] = three_locks(&server, &prefix);
    let mut admin = admin(&server).await;
    let mut a = lock_a.acquire(request("a")).await.unwrap();
    let stored = keys(&mut admin, &prefix).await;
    admin.delete(stored[0].0.clone(), None).await.unwrap();
    let b = tokio::time::timeout(WAIT, lock_b.acquire(request("b")))
        .await
        .unwrap()
        .unwrap();
    let refused = a.reserve("a2", Duration::from_secs(2)).await;
    assert!(
        matches!(refused, Err(Error::StaleTerm { .. } | Error::Lost { .. })),
        "{refused:?}"
    );
    // Once the loss is known, refused without asking the server.
    let _ = tokio::time::timeout(WAIT, a.lost()).await.unwrap();
    let refused = a.reserve("a2", Duration::from_secs(2)).await;
    assert!(matches!(refused, Err(Error::Lost { .. })), "{refused:?}");
    let reserved = admin
        .get(format!("{prefix}/jobs/reserved"), None)
        .await
        .unwrap();
    assert!(reserved.kvs().is_empty(), "a lost term wrote a reservation");
    assert_eq!(lock_a.holder().await.unwrap().unwrap().id, "b");
    b.release().await.unwrap();
    drop(a);
}

/// The handover a primary makes to a chosen successor, timed from `reserve` to the successor's
/// `acquire` returning (it waited already): 20 rounds, each node handing back to the other,
/// printed (p50, p99).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_handover_takes_milliseconds() {
    let Some(server) = etcd().await else { return };
    let prefix = prefix("reserve-time");
    let [lock_x, lock_y, _] = three_locks(&server, &prefix);
    let mut admin = admin(&server).await;
    let mut watch = election_watch(&mut admin, &prefix).await;
    let mut nodes = [("x", lock_x), ("y", lock_y)];
    let mut held = nodes[0].1.acquire(request("x")).await.unwrap();
    next_created(&mut watch).await;
    let mut last = held.term();
    let mut took = Vec::with_capacity(20);
    for _ in 0..20 {
        let (next, next_lock) = (nodes[1].0, nodes[1].1.clone());
        let (pending, _) = waiting(&next_lock, next, &mut watch).await;
        let started = std::time::Instant::now();
        held.reserve(next, Duration::from_secs(2)).await.unwrap();
        let reserved = started.elapsed();
        held.release().await.unwrap();
        held = tokio::time::timeout(WAIT, pending)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        took.push((started.elapsed(), reserved));
        assert!(held.term() > last);
        last = held.term();
        nodes.swap(0, 1);
    }
    held.release().await.unwrap();
    let ms = |mut d: Vec<Duration>| {
        d.sort();
        (
            d[d.len() / 2].as_secs_f64() * 1e3,
            d[d.len() * 99 / 100].as_secs_f64() * 1e3,
        )
    };
    let (p50, p99) = ms(took.iter().map(|t| t.0).collect());
    let (r50, r99) = ms(took.iter().map(|t| t.1).collect());
    eprintln!(
        "etcd reserve + release → reserved acquire over {} rounds: p50 {p50:.2} ms, p99 \
         {p99:.2} ms (of which reserve: p50 {r50:.2} ms, p99 {r99:.2} ms)",
        took.len()
    );
}

// ------------------------------------------------------------------------------------------------
// Real processes under faults.

/// The node side of this binary: runs as a node when `TOWER_PRIMARY_TEST_NODE=1`.
#[test]
fn node_entry() {
    common::node_entry();
}

struct Setup {
    cluster: Cluster,
    server: EtcdServer,
    url: String,
    lock: String,
    _serial: MutexGuard<'static, ()>,
}

impl Setup {
    /// A node configuration on `backend` for this test's lock, with the 2 s lease.
    fn config(&self, backend: &str) -> NodeConfig {
        NodeConfig::new(backend, &self.lock).lease(LEASE)
    }
}

/// An etcd of its own and a cluster (no node yet) on it, under the serial lock.
async fn setup(test: &str) -> Option<Setup> {
    let serial = SERIAL.lock().await;
    let server = etcd().await?;
    let url = format!("{}?prefix={}", server.url(), prefix(test));
    let config = NodeConfig::new(&url, test).lease(LEASE);
    let command = NodeCommand::test_entry("node_entry").expect("the test binary's path");
    Some(Setup {
        cluster: Cluster::new(command, config),
        server,
        url,
        lock: test.to_owned(),
        _serial: serial,
    })
}

fn assert_no_overlap(history: &History, cluster: &Cluster) {
    let report = history.check();
    assert!(report.is_ok(), "{report}\n{}", cluster.dump());
}

/// The latest a node frozen or killed at `at` can still act: its last renewal was sent before,
/// so its deadline is at most one lease (less the margin) later.
fn deadline_bound(at: u64) -> u64 {
    let lease = Lease::new(LEASE);
    at + u64::try_from((lease.ttl() - lease.margin()).as_nanos()).unwrap()
}

/// The cluster's history with the period of `(pid, term)` bounded by `deadline`.
fn with_deadline(cluster: &Cluster, pid: u32, term: u64, deadline: u64) -> History {
    let mut history = History::new();
    for p in cluster.history().periods() {
        let mut p = p.clone();
        if p.node == pid.to_string() && p.term == term {
            p = p.with_deadline(deadline);
        }
        history.push(p);
    }
    history
}

#[tokio::test]
async fn killed_primary_is_succeeded_by_one_node_with_a_higher_term() {
    let Some(mut s) = setup("etcd-sigkill").await else {
        return;
    };
    s.cluster.spawn_nodes(3).unwrap();
    let failover = s.cluster.kill_primary(WAIT).await;
    eprintln!(
        "etcd SIGKILL → successor primary after {:.1} ms (lease {LEASE:?})",
        ms(failover.signalled_at, failover.next.at)
    );
}

#[tokio::test]
async fn terminated_primary_hands_over_before_it_exits() {
    let Some(mut s) = setup("etcd-sigterm").await else {
        return;
    };
    s.cluster.spawn_nodes(3).unwrap();
    let handover = s.cluster.terminate_primary(WAIT).await.succession;
    eprintln!(
        "etcd SIGTERM → successor primary after {:.1} ms (handover, lease {LEASE:?})",
        ms(handover.signalled_at, handover.next.at)
    );
}

#[tokio::test]
async fn stopped_primary_reads_not_primary_when_it_resumes_after_its_lease() {
    let Some(mut s) = setup("etcd-sigstop").await else {
        return;
    };
    s.cluster.spawn_nodes(3).unwrap();
    let (old, term) = s.cluster.wait_settled(WAIT).await.unwrap();

    let stopped_at = s.cluster.signal(old, NodeSignal::Stop).await.unwrap();
    // etcd expires the frozen node's lease; another node takes over.
    let next = s.cluster.wait_primary_after(term, old, WAIT).await.unwrap();
    let deadline = deadline_bound(stopped_at);
    assert!(
        next.at > deadline,
        "a successor before the frozen node's deadline\n{}",
        s.cluster.dump()
    );

    let resumed_at = s.cluster.signal(old, NodeSignal::Cont).await.unwrap();
    let first = s
        .cluster
        .wait_event("the resumed node's first event", WAIT, |e| {
            e.pid == old && e.at > resumed_at
        })
        .await
        .unwrap();
    // Its first word after resuming is that its term is over, never a step of the old term.
    assert!(
        matches!(
            first.kind,
            EventKind::TaskCancelled { term: t } if t == term
        ) || matches!(first.kind, EventKind::Secondary { .. }),
        "the resumed primary's first event was {first:?}\n{}",
        s.cluster.dump()
    );
    s.cluster
        .wait_event("the resumed node's task to end", WAIT, |e| {
            e.pid == old && matches!(e.kind, EventKind::TaskCancelled { term: t } if t == term)
        })
        .await
        .unwrap();
    assert!(
        s.cluster
            .first_event(
                old,
                resumed_at,
                |k| matches!(k, EventKind::Tick { term: t, .. } if *t == term)
            )
            .is_none(),
        "the resumed node ticked in its old term\n{}",
        s.cluster.dump()
    );
    let (now, now_term) = s.cluster.wait_settled(WAIT).await.unwrap();
    assert_eq!(now, next.pid);
    assert!(now_term > term);
    assert_no_overlap(&with_deadline(&s.cluster, old, term, deadline), &s.cluster);
    eprintln!(
        "etcd SIGSTOP → successor after {:.1} ms; resumed node's first event {:?} {:.1} ms after SIGCONT",
        ms(stopped_at, next.at),
        first.kind,
        ms(resumed_at, first.at)
    );
}

#[tokio::test]
async fn terms_keep_rising_across_etcd_restarts() {
    let Some(mut s) = setup("etcd-restart").await else {
        return;
    };
    s.cluster.spawn_nodes(3).unwrap();
    let (first, t1) = s.cluster.wait_settled(WAIT).await.unwrap();

    // A short outage: the primary may keep its term (etcd refreshes leases on restart) or lose it.
    s.server.kill();
    let down_at = monotonic_nanos();
    s.server.restart().await.unwrap();
    let (second, t2) = s.cluster.wait_settled(WAIT).await.unwrap();
    assert!(
        t2 >= t1 && (t2 > t1 || second == first),
        "{}",
        s.cluster.dump()
    );

    // A long one: the primary fences itself by its deadline, with etcd still down.
    s.server.kill();
    s.cluster
        .wait_event("the primary to step down while etcd is down", WAIT, |e| {
            e.pid == second && matches!(e.kind, EventKind::TaskCancelled { term } if term == t2)
        })
        .await
        .unwrap();
    s.server.restart().await.unwrap();
    let next = s.cluster.wait_primary_after(t2, 0, WAIT).await.unwrap();
    let (third, t3) = s.cluster.wait_settled(WAIT).await.unwrap();
    assert!(t3 > t2, "{}", s.cluster.dump());

    let history = s.cluster.history();
    let terms: Vec<u64> = history.periods().iter().map(|p| p.term).collect();
    assert!(
        terms.windows(2).all(|w| w[0] < w[1]),
        "terms did not rise: {terms:?}\n{}",
        s.cluster.dump()
    );
    assert_no_overlap(&history, &s.cluster);
    eprintln!(
        "etcd restarts: terms {terms:?}; primary {first} → {second} → {third}; \
         new primary {:.1} ms after the first kill",
        ms(down_at, next.at)
    );
}

#[tokio::test]
async fn primary_behind_a_stalled_connection_steps_down_before_a_successor_appears() {
    let Some(mut s) = setup("etcd-stall").await else {
        return;
    };
    let proxy = TcpProxy::start(s.server.addr()).await.unwrap();
    let through_proxy = s
        .url
        .replace(&s.server.addr().to_string(), &proxy.addr().to_string());
    let a = s
        .cluster
        .spawn_node_with(&s.config(&through_proxy))
        .unwrap();
    let term = s
        .cluster
        .wait_event("the proxied node to become primary", WAIT, |e| {
            e.pid == a && matches!(e.kind, EventKind::Primary { .. })
        })
        .await
        .unwrap()
        .term()
        .unwrap();
    s.cluster.spawn_nodes(2).unwrap();
    assert_eq!(s.cluster.wait_settled(WAIT).await.unwrap(), (a, term));

    let stalled_at = monotonic_nanos();
    proxy.stall();
    let next = s.cluster.wait_primary_after(term, a, WAIT).await.unwrap();
    let stepped_down = s
        .cluster
        .first_event(
            a,
            stalled_at,
            |k| matches!(k, EventKind::TaskCancelled { term: t } if *t == term),
        )
        .unwrap_or_else(|| {
            panic!(
                "the stalled primary never stepped down\n{}",
                s.cluster.dump()
            )
        });
    assert!(
        stepped_down.at < next.at,
        "the successor appeared before the stalled primary stepped down\n{}",
        s.cluster.dump()
    );
    assert_no_overlap(&s.cluster.history(), &s.cluster);
    proxy.resume();
    let (now, now_term) = s.cluster.wait_settled(WAIT).await.unwrap();
    assert!(now_term > term);
    eprintln!(
        "etcd stalled connection: primary stepped down {:.1} ms after the stall, successor \
         (pid {now}) {:.1} ms after it",
        ms(stalled_at, stepped_down.at),
        ms(stalled_at, next.at)
    );
}

// ------------------------------------------------------------------------------------------------
// TLS.

/// A throwaway CA and a server certificate for 127.0.0.1 in `dir`, made with the `openssl` tool:
/// `(ca.pem, server.pem, server.key)`.
fn make_certificates(dir: &std::path::Path) -> Result<[std::path::PathBuf; 3], String> {
    let run = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("cannot run openssl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem"],
        &["-days", "2", "-subj", "/CN=tower-primary test CA"],
    ]
    .concat())?;
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat())?;
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ])?;
    Ok(["ca.pem", "server.pem", "server.key"].map(|f| dir.join(f)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcds_connects_with_tls_and_refuses_an_unknown_server_certificate() {
    let dir = servers::TempDir::new("etcd-tls").unwrap();
    let Some([ca, cert, key]) = servers::require("openssl", make_certificates(dir.path())) else {
        return;
    };
    let Some(server) = servers::require("etcd with TLS", EtcdServer::start_tls(&cert, &key).await)
    else {
        return;
    };
    let url = format!("{}?prefix={}", server.url(), prefix("tls"));
    assert!(url.starts_with("etcds://"), "{url}");

    // The system's roots do not know the test CA: no connection, no lock (fail closed).
    let untrusted = EtcdBackend::from_url(&url).unwrap().lock("jobs").unwrap();
    let refused = tokio::time::timeout(WAIT, untrusted.acquire(request("x")))
        .await
        .expect("a refused TLS connection is an error, not a hang");
    // Retrying cannot fix an untrusted certificate: a misconfiguration, reported as such.
    let refused = refused.expect_err("no lock without a trusted certificate");
    assert_eq!(
        refused.misconfiguration(),
        Some(tower_primary::Misconfiguration::Tls),
        "{refused:?}"
    );

    let trusted = EtcdBackend::from_url(&url)
        .unwrap()
        .with_ca_pem(std::fs::read(&ca).unwrap())
        .lock("jobs")
        .unwrap();
    let leadership = tokio::time::timeout(WAIT, trusted.acquire(request("a")))
        .await
        .unwrap()
        .unwrap();
    let holder = trusted.holder().await.unwrap().expect("a holder");
    assert_eq!((holder.id.as_str(), holder.term), ("a", leadership.term()));
    leadership.release().await.unwrap();
    assert_eq!(trusted.holder().await.unwrap(), None);
}
