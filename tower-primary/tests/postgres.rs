//! The PostgreSQL backend against a real server: the conformance suite, the lock API (holder
//! record, blocking waiters, cancelled waits, terminated sessions, hash collisions, the state
//! API), PgBouncer's transaction pooling, and real node processes (SIGKILL, SIGTERM,
//! `pg_terminate_backend`, a stalled connection).
//!
//! The server is `DATABASE_URL`, or `postgres://root@127.0.0.1:5432/test`
//! ([`servers::postgres_url`]); without it every test skips loudly (fails under
//! `TOWER_PRIMARY_REQUIRE_BACKENDS=1`). Each test has its own schema (`tp_<test>`) and namespace
//! (unique per run), so runs and tests never share a lock.
//!
//! Node processes: this binary re-executes itself (`node_entry`, see `tests/processes.rs`).
//! Tests that start processes or a PgBouncer take a shared lock and run one at a time.
//!
//! ```text
//! cargo test --features postgres --test postgres -- --nocapture
//! ```
#![cfg(feature = "postgres")]

mod common;

use common::ms;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::NoTls;
use tower_primary::backend::postgres::{PostgresBackend, advisory_key};
use tower_primary::backend::{AcquireRequest, Backend, Candidate, Leadership, Lock};
use tower_primary::clock::monotonic_nanos;
use tower_primary::{Error, NodeId};
use tower_primary_lab::node::{
    Cluster, EventKind, NodeCommand, NodeConfig, NodeSignal, Succession,
};
use tower_primary_lab::proxy::TcpProxy;
use tower_primary_lab::servers::{self, PgBouncer};
use tower_primary_testing::conformance::{Connection, Fault, FaultHooks, Fixture};
use tower_primary_testing::history::History;

/// Bounds a broken run; elections take milliseconds.
const WAIT: Duration = Duration::from_secs(20);

static SERIAL: Mutex<()> = Mutex::const_new(());

/// The node side of this binary.
#[test]
fn node_entry() {
    common::node_entry();
}

// ------------------------------------------------------------------------------------------------
// The server and each test's corner of it

/// The server's address, user, password and database, from [`servers::postgres_url`].
#[derive(Clone, Debug)]
struct Server {
    config: tokio_postgres::Config,
    addr: SocketAddr,
}

impl Server {
    /// A URL to `addr` (the server or a proxy in front of it) with `params`.
    fn url_via(&self, addr: SocketAddr, params: &str) -> String {
        let user = self.config.get_user().unwrap_or("postgres");
        let password = self
            .config
            .get_password()
            .map(|p| format!(":{}", String::from_utf8_lossy(p)))
            .unwrap_or_default();
        let db = self.config.get_dbname().unwrap_or(user);
        format!("postgres://{user}{password}@{addr}/{db}?{params}")
    }

    async fn admin(&self) -> tokio_postgres::Client {
        let (client, conn) = self.config.connect(NoTls).await.expect("admin connection");
        tokio::spawn(conn);
        client
    }
}

async fn server() -> Option<Server> {
    // Logs go to the test's captured output, shown when it fails.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tower_primary=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    let url = servers::postgres_url();
    let probe = async {
        let config = tokio_postgres::Config::from_str(&url).map_err(|e| e.to_string())?;
        let addr = match (config.get_hosts().first(), config.get_ports().first()) {
            (Some(tokio_postgres::config::Host::Tcp(h)), port) => {
                let port = port.copied().unwrap_or(5432);
                tokio::net::lookup_host((h.as_str(), port))
                    .await
                    .map_err(|e| e.to_string())?
                    .next()
                    .ok_or("no address")?
            }
            _ => return Err("the tests need a TCP host in DATABASE_URL".to_owned()),
        };
        let connect = tokio::time::timeout(Duration::from_secs(5), config.connect(NoTls));
        match connect.await {
            Ok(Ok((client, conn))) => {
                drop(client);
                let _ = conn.await;
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("connect timed out".to_owned()),
        }
        Ok::<_, String>(Server { config, addr })
    };
    servers::require(&format!("PostgreSQL at {url}"), probe.await)
}

/// One test's schema and namespace, and an admin connection to look at the server.
struct Env {
    server: Server,
    schema: String,
    namespace: String,
    admin: tokio_postgres::Client,
}

impl Env {
    async fn new(test: &str) -> Option<Env> {
        let server = server().await?;
        let admin = server.admin().await;
        Some(Env {
            schema: format!("tp_{test}"),
            namespace: format!("{test}-{}-{:x}", std::process::id(), monotonic_nanos()),
            admin,
            server,
        })
    }

    fn params(&self) -> String {
        format!("namespace={}&schema={}", self.namespace, self.schema)
    }

    /// The backend string for nodes, direct to the server.
    fn url(&self) -> String {
        self.server.url_via(self.server.addr, &self.params())
    }

    fn backend(&self) -> PostgresBackend {
        PostgresBackend::new(&self.url()).expect("a valid URL")
    }

    fn key(&self, lock: &str) -> i64 {
        advisory_key(&self.namespace, lock)
    }

    /// `pg_locks` rows of the key: (pid, granted).
    async fn lock_rows(&self, lock: &str) -> Vec<(i32, bool)> {
        let key = self.key(lock);
        let bits = u64::from_ne_bytes(key.to_ne_bytes());
        let rows = self
            .admin
            .query(
                "SELECT pid, granted FROM pg_locks WHERE locktype = 'advisory' \
                 AND classid = $1::text::oid AND objid = $2::text::oid AND objsubid = 1 \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[&(bits >> 32).to_string(), &(bits & 0xffff_ffff).to_string()],
            )
            .await
            .expect("query pg_locks");
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// Waits (bounded; the server has no event for this) until `pred` holds on the key's rows.
    async fn wait_locks(&self, lock: &str, what: &str, pred: impl Fn(&[(i32, bool)]) -> bool) {
        let start = tokio::time::Instant::now();
        loop {
            let rows = self.lock_rows(lock).await;
            if pred(&rows) {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}; pg_locks rows: {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_waiters(&self, lock: &str, n: usize) {
        self.wait_locks(lock, &format!("{n} waiter(s)"), |rows| {
            rows.iter().filter(|(_, granted)| !granted).count() == n
        })
        .await;
    }

    /// The lock session's server process, from the holder row.
    async fn holder_pid(&self, lock: &str) -> i32 {
        let row = self
            .admin
            .query_one(
                &format!(
                    "SELECT backend_pid FROM {}.holders WHERE key = $1",
                    self.schema
                ),
                &[&self.key(lock)],
            )
            .await
            .expect("a holder row");
        row.get(0)
    }

    /// Server processes holding the key's step-down lock (`objsubid = 2`, shared).
    async fn step_down_holders(&self, lock: &str) -> Vec<i32> {
        let key = self.key(lock);
        let bits = u64::from_ne_bytes(key.to_ne_bytes());
        let rows = self
            .admin
            .query(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' \
                 AND classid = $1::text::oid AND objid = $2::text::oid AND objsubid = 2 \
                 AND granted AND mode = 'ShareLock' \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[&(bits >> 32).to_string(), &(bits & 0xffff_ffff).to_string()],
            )
            .await
            .expect("query pg_locks");
        rows.iter().map(|r| r.get(0)).collect()
    }

    async fn terminate(&self, pid: i32) {
        let row = self
            .admin
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .expect("pg_terminate_backend");
        assert!(
            row.get::<_, bool>(0),
            "no server process {pid} to terminate"
        );
    }
}

fn req(id: &str) -> AcquireRequest {
    AcquireRequest::new(NodeId::new(id))
}

/// Acquires on a task of its own (a blocking wait must be polled while the test goes on).
fn acquire_in_background(
    lock: &Arc<dyn Lock>,
    id: &str,
) -> tokio::task::JoinHandle<Result<Box<dyn Leadership>, Error>> {
    let lock = lock.clone();
    let req = req(id);
    tokio::spawn(async move { lock.acquire(req).await })
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

// ------------------------------------------------------------------------------------------------
// Conformance

/// Every node reaches the server through a proxy of its own, so the suite's `Fail` fault can
/// stall and cut it; its sessions carry a tag in `application_name`, so `LoseLocks` can terminate
/// its lock sessions.
struct PgFixture {
    server: Server,
    params: String,
    /// The proxies live as long as the fixture: the suite keeps some backends without their
    /// connection.
    proxies: std::sync::Mutex<Vec<Arc<TcpProxy>>>,
}

#[derive(Debug)]
struct PgFaults {
    proxy: Arc<TcpProxy>,
    tag: String,
    admin_url: String,
}

impl FaultHooks for PgFaults {
    fn supports(&self, fault: Fault) -> bool {
        matches!(fault, Fault::Fail | Fault::LoseLocks)
    }

    fn inject(&self, fault: Fault) {
        match fault {
            Fault::Fail => {
                self.proxy.stall();
                self.proxy.cut();
            }
            Fault::LoseLocks => {
                // The hook is synchronous: a thread of its own with a runtime of its own.
                let url = self.admin_url.clone();
                let pattern = format!("{} lock %", self.tag);
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime");
                    rt.block_on(async {
                        let (client, conn) = tokio_postgres::connect(&url, NoTls)
                            .await
                            .expect("admin connection");
                        tokio::spawn(conn);
                        client
                            .execute(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                                 WHERE application_name LIKE $1",
                                &[&pattern],
                            )
                            .await
                            .expect("terminate the lock sessions");
                    });
                })
                .join()
                .expect("the terminating thread");
            }
            _ => {}
        }
    }

    fn heal(&self, fault: Fault) {
        if fault == Fault::Fail {
            self.proxy.resume();
        }
    }
}

impl Fixture for PgFixture {
    fn connect(&self) -> Connection {
        // Unique in the process: tests run in parallel, each with a fixture of its own.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("tpc{}-{n}", std::process::id());
        // The suite runs on a multi-thread runtime; the proxy must live on it.
        let proxy = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(TcpProxy::start(self.server.addr))
        })
        .map(Arc::new)
        .expect("a proxy");
        self.proxies.lock().unwrap().push(proxy.clone());
        let url = self.server.url_via(
            proxy.addr(),
            &format!("{}&application_name={tag}&connect_timeout=1", self.params),
        );
        // The suite pauses a holder's runtime for 1 s and expects it to keep its term: a holder
        // keeps it for its fencing bound (less a tenth) after its last liveness check.
        let backend = PostgresBackend::new(&url)
            .expect("a valid URL")
            .fencing_bound(Duration::from_secs(2));
        let admin_url = self.server.url_via(self.server.addr, "sslmode=disable");
        Connection::new(backend).with_faults(PgFaults {
            proxy,
            tag,
            admin_url,
        })
    }
}

async fn fixture() -> Option<PgFixture> {
    let server = server().await?;
    let params = format!(
        "namespace=conformance-{}-{:x}&schema=tp_conformance",
        std::process::id(),
        monotonic_nanos()
    );
    Some(PgFixture {
        server,
        params,
        proxies: std::sync::Mutex::new(Vec::new()),
    })
}

mod suite {
    tower_primary_testing::conformance_tests!(match super::fixture().await {
        Some(fixture) => fixture,
        None => return,
    });
}

// ------------------------------------------------------------------------------------------------
// The lock API

#[tokio::test]
async fn acquiring_records_the_holder_and_releasing_clears_it() {
    let Some(env) = Env::new("records_holder").await else {
        return;
    };
    let lock = env.backend().lock("jobs").unwrap();
    let leadership = lock.acquire(req("a")).await.unwrap();
    let holder = lock.holder().await.unwrap().expect("a holder");
    assert_eq!((holder.id.as_str(), holder.term), ("a", leadership.term()));
    // The fencing bound, and the process a successor on this host can watch.
    assert_eq!(holder.lease_ms, Some(450));
    assert_eq!(
        holder.process.as_ref().map(|p| p.pid),
        Some(std::process::id())
    );
    assert!(!holder.released);
    assert_eq!(&holder, leadership.holder());
    let pid = env.holder_pid("jobs").await;
    assert_eq!(env.lock_rows("jobs").await, [(pid, true)]);

    leadership.release().await.unwrap();
    assert_eq!(lock.holder().await.unwrap(), None);
    assert_eq!(env.lock_rows("jobs").await, []);
}

#[tokio::test]
async fn liveness_checks_are_renewals_of_a_lease_implied_by_the_fencing_bound() {
    let Some(env) = Env::new("implied_lease").await else {
        return;
    };
    let lock = env.backend().lock("jobs").unwrap();
    let leadership = lock.acquire(req("a")).await.unwrap();
    // A successor without a death certificate waits the holder's fencing bound (450 ms by
    // default) after its grant: the elector fences the term a margin before that after the
    // last good check.
    let lease = leadership.implied_lease().expect("an implied lease");
    assert_eq!(lease.ttl(), Duration::from_millis(450));
    assert_eq!(lease.margin(), Duration::from_millis(45));
    let mut renewals = leadership.renewals().expect("liveness checks as renewals");
    let first = renewals.latest();
    let next = within("a liveness check", renewals.changed()).await;
    assert!(next > first, "{next:?} is not after {first:?}");
    leadership.release().await.unwrap();
}

#[tokio::test]
async fn a_blocked_waiter_takes_over_on_release_with_a_higher_term() {
    let Some(env) = Env::new("blocked_waiter").await else {
        return;
    };
    let backend = env.backend();
    let (a_lock, b_lock) = (backend.lock("jobs").unwrap(), backend.lock("jobs").unwrap());
    let a = a_lock.acquire(req("a")).await.unwrap();
    let b = acquire_in_background(&b_lock, "b");
    env.wait_waiters("jobs", 1).await;
    assert!(!b.is_finished(), "b acquired while a held the lock");

    let ta = a.term();
    a.release().await.unwrap();
    let b = within("b to acquire", b).await.unwrap().unwrap();
    assert!(b.term() > ta, "term {} after {ta}", b.term());
    let holder = a_lock.holder().await.unwrap().expect("a holder");
    assert_eq!((holder.id.as_str(), holder.term), ("b", b.term()));
    b.release().await.unwrap();
}

#[tokio::test]
async fn a_terminated_lock_session_is_lost_and_the_waiter_takes_over() {
    let Some(env) = Env::new("terminated").await else {
        return;
    };
    let backend = env.backend();
    let (a_lock, b_lock) = (backend.lock("jobs").unwrap(), backend.lock("jobs").unwrap());
    let mut a = a_lock.acquire(req("a")).await.unwrap();
    let ta = a.term();
    let b = acquire_in_background(&b_lock, "b");
    env.wait_waiters("jobs", 1).await;

    env.terminate(env.holder_pid("jobs").await).await;
    let lost = within("a to see the loss", a.lost()).await;
    assert!(
        matches!(&lost, Error::Lost { reason, .. } if reason.contains("terminat")),
        "{lost}"
    );
    // b gets the key, but is not primary before a has stepped down (released its term).
    env.wait_locks("jobs", "b to hold the key", |rows| {
        rows.iter().any(|(_, granted)| *granted)
    })
    .await;
    assert!(!b.is_finished(), "b acquired before a stepped down");
    // Nothing is left to release but the step-down lock.
    a.release().await.unwrap();
    let b = within("b to acquire", b).await.unwrap().unwrap();
    assert!(b.term() > ta);
    assert_eq!(
        b_lock.holder().await.unwrap().map(|h| h.id),
        Some("b".to_owned())
    );
    b.release().await.unwrap();
}

#[tokio::test]
async fn a_dropped_acquire_leaves_the_queue_and_never_holds_the_lock() {
    let Some(env) = Env::new("dropped_acquire").await else {
        return;
    };
    let backend = env.backend();
    let locks: Vec<_> = (0..3).map(|_| backend.lock("jobs").unwrap()).collect();
    let a = locks[0].acquire(req("a")).await.unwrap();
    let b = acquire_in_background(&locks[1], "b");
    env.wait_waiters("jobs", 1).await;

    b.abort();
    // The wait is cancelled through the cancel token and b's session closes.
    env.wait_waiters("jobs", 0).await;
    let ta = a.term();
    a.release().await.unwrap();
    let c = within("c to acquire", locks[2].acquire(req("c")))
        .await
        .unwrap();
    assert!(c.term() > ta);
    let holder = locks[2].holder().await.unwrap().expect("a holder");
    assert_eq!(holder.id, "c");
    c.release().await.unwrap();
}

#[tokio::test]
async fn a_hash_collision_is_reported_never_shared() {
    let Some(env) = Env::new("collision").await else {
        return;
    };
    let lock = env.backend().lock("victim").unwrap();
    // Creates the schema.
    assert_eq!(lock.holder().await.unwrap(), None);
    // Another lock name whose key is the same (forged: FNV-1a collisions are rare).
    env.admin
        .execute(
            &format!(
                "INSERT INTO {}.holders (key, namespace, lock_name, term, backend_pid, holder) \
                 VALUES ($1, $2, 'impostor', 1, 0, '{{}}')",
                env.schema
            ),
            &[&env.key("victim"), &env.namespace],
        )
        .await
        .unwrap();
    let err = lock.acquire(req("a")).await.unwrap_err().to_string();
    assert!(
        err.contains("hashes to advisory key") && err.contains("impostor"),
        "{err}"
    );
    // The lock taken before the check was given back.
    env.wait_locks("victim", "the lock to be free", <[_]>::is_empty)
        .await;
}

#[tokio::test]
async fn state_writes_need_the_live_term_and_never_overwrite_a_newer_one() {
    let Some(env) = Env::new("state_terms").await else {
        return;
    };
    let backend = env.backend();
    let (a_lock, b_lock) = (backend.lock("jobs").unwrap(), backend.lock("jobs").unwrap());
    let watcher = backend.lock("jobs").unwrap();
    let mut a = a_lock.acquire(req("a")).await.unwrap();
    let ta = a.term();
    a_lock.store("cursor", b"one", ta).await.unwrap();
    let stored = watcher.load("cursor").await.unwrap().expect("a value");
    assert_eq!(
        (stored.value.as_slice(), stored.term),
        (b"one".as_slice(), ta)
    );
    let mut changes = watcher.watch_key("cursor").await.unwrap();

    // The term's session is gone: its writes are refused although no one else holds the lock.
    env.terminate(env.holder_pid("jobs").await).await;
    within("a to see the loss", a.lost()).await;
    env.wait_locks("jobs", "the server to end a's session", <[_]>::is_empty)
        .await;
    let err = a_lock.store("cursor", b"late", ta).await.unwrap_err();
    assert!(
        matches!(err, Error::StaleTerm { term, .. } if term == ta),
        "{err}"
    );

    a.release().await.unwrap();

    let b = b_lock.acquire(req("b")).await.unwrap();
    b_lock.store("cursor", b"two", b.term()).await.unwrap();
    within("the watcher to wake", changes.changed())
        .await
        .unwrap();
    let err = a_lock.store("cursor", b"stale", ta).await.unwrap_err();
    assert!(
        matches!(err, Error::StaleTerm { current: Some(c), .. } if c == b.term()),
        "{err}"
    );
    let stored = watcher.load("cursor").await.unwrap().expect("a value");
    assert_eq!(
        (stored.value.as_slice(), stored.term),
        (b"two".as_slice(), b.term())
    );
    b.release().await.unwrap();
}

#[tokio::test]
async fn tls_is_used_when_the_server_offers_it_unless_disabled() {
    let Some(env) = Env::new("tls").await else {
        return;
    };
    let ssl_on: String = env.admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    for (mode, expect_tls) in [("prefer", ssl_on == "on"), ("disable", false)] {
        let url = format!("{}&sslmode={mode}", env.url());
        let lock = PostgresBackend::new(&url).unwrap().lock("jobs").unwrap();
        let l = lock.acquire(req("a")).await.unwrap();
        let pid = env.holder_pid("jobs").await;
        let ssl: bool = env
            .admin
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .get(0);
        assert_eq!(ssl, expect_tls, "sslmode={mode}");
        l.release().await.unwrap();
    }
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

/// A port on which nothing listens (bound, then freed).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An acquisition's error, within the test's patience.
async fn acquire_error(url: &str) -> Error {
    // Shown with --nocapture: the message as users read it.
    let shown = |e: Error| {
        eprintln!("{url} -> {e}");
        e
    };
    let lock = PostgresBackend::new(url)
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .lock("jobs")
        .unwrap();
    match within("an acquisition error", lock.acquire(req("a"))).await {
        Ok(_) => panic!("{url}: acquired"),
        Err(e) => shown(e),
    }
}

#[tokio::test]
async fn an_unreachable_server_is_a_backend_error_that_says_so_once() {
    let port = free_port();
    let url = format!("postgres://root@127.0.0.1:{port}/test");
    let err = acquire_error(&url).await;
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "postgres backend: connect to {url}: error connecting to server: Connection refused"
        )),
        "{text}"
    );
    assert_eq!(text.matches("postgres backend").count(), 1, "{text}");
    assert_eq!(text.matches("Connection refused").count(), 1, "{text}");
    assert_eq!(chain(&err), text, "the sources add nothing new");
    assert!(
        !text.contains("Error {") && !text.contains("tokio"),
        "{text}"
    );
}

#[tokio::test]
async fn a_missing_database_is_a_misconfiguration() {
    let Some(env) = Env::new("nodb").await else {
        return;
    };
    let user = env.server.config.get_user().unwrap_or("postgres");
    let url = format!(
        "postgres://{user}@{}/no_such_db?{}",
        env.server.addr,
        env.params()
    );
    let err = acquire_error(&url).await;
    assert_eq!(
        err.misconfiguration(),
        Some(tower_primary::Misconfiguration::MissingDatabase),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "postgres backend: database does not exist: connect to postgres://{user}@{}/no_such_db?",
            env.server.addr
        )),
        "{text}"
    );
    assert!(
        text.contains(r#"database "no_such_db" does not exist (3D000)"#),
        "{text}"
    );
    assert!(
        text.ends_with("; create the database or fix its name in the connection string"),
        "{text}"
    );
    assert_eq!(chain(&err), text);
}

#[tokio::test]
async fn an_unknown_role_is_an_authentication_misconfiguration() {
    let Some(env) = Env::new("norole").await else {
        return;
    };
    // Refused as 28000 (role does not exist) under trust, 28P01 under password authentication.
    let role = "tp_no_such_role";
    let db = env.server.config.get_dbname().unwrap_or("postgres");
    let url = format!(
        "postgres://{role}@{}/{db}?{}",
        env.server.addr,
        env.params()
    );
    let err = acquire_error(&url).await;
    assert_eq!(
        err.misconfiguration(),
        Some(tower_primary::Misconfiguration::Authentication),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "postgres backend: authentication failed: connect to postgres://{role}@{}/{db}?",
            env.server.addr
        )),
        "{text}"
    );
    assert!(text.contains(&format!("\"{role}\"")), "{text}");
    assert!(
        text.ends_with("; check the user name and password of the connection string"),
        "{text}"
    );
    assert_eq!(text.matches("postgres backend").count(), 1, "{text}");
    assert_eq!(chain(&err), text);
}

#[tokio::test]
async fn tls_required_of_a_server_without_it_is_a_misconfiguration() {
    // A server that declines TLS, as PostgreSQL with `ssl = off` does: it answers the client's
    // SSLRequest (8 bytes) with 'N'.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if socket.read_exact(&mut request).await.is_ok() {
                    let _ = socket.write_all(b"N").await;
                    let _ = socket.read(&mut request).await;
                }
            });
        }
    });
    let url = format!("postgres://root@{addr}/test?sslmode=require");
    let err = acquire_error(&url).await;
    assert_eq!(
        err.misconfiguration(),
        Some(tower_primary::Misconfiguration::Tls),
        "{err:?}"
    );
    let text = err.to_string();
    assert_eq!(
        text,
        format!(
            "postgres backend: TLS handshake failed: connect to {url}: error performing TLS \
             handshake: server does not support TLS; check sslmode (does the server offer TLS?) \
             and sslrootcert"
        )
    );
    assert_eq!(chain(&err), text);
}

#[tokio::test]
async fn a_role_without_rights_is_a_misconfiguration() {
    let Some(env) = Env::new("norights").await else {
        return;
    };
    // A role that may log in (trust authentication) but not create the schema.
    let role = "tp_no_rights";
    env.admin
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .await
        .unwrap();
    let db = env.server.config.get_dbname().unwrap_or("postgres");
    let url = format!(
        "postgres://{role}@{}/{db}?namespace={}&schema=tp_never_created",
        env.server.addr, env.namespace
    );
    let err = acquire_error(&url).await;
    if err.misconfiguration() == Some(tower_primary::Misconfiguration::Authentication) {
        eprintln!("the server does not let {role} log in without a password: {err}");
        return;
    }
    assert_eq!(
        err.misconfiguration(),
        Some(tower_primary::Misconfiguration::Permission),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(
            r#"postgres backend: permission denied: prepare schema "tp_never_created" and LISTEN: "#
        ),
        "{text}"
    );
    assert!(text.contains("(42501)"), "{text}");
}

#[tokio::test]
async fn pgbouncer_transaction_pooling_is_refused() {
    let Some(env) = Env::new("pgbouncer").await else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let user = env
        .server
        .config
        .get_user()
        .unwrap_or("postgres")
        .to_owned();
    let bouncer = match PgBouncer::start(env.server.addr, &user, "transaction").await {
        Ok(b) => b,
        Err(e) => {
            // Not `require`: PgBouncer is optional even where backends are required.
            eprintln!(
                "\n==============================\nSKIPPED: pgbouncer is not available: {e}\n\
                 ==============================\n"
            );
            return;
        }
    };
    let pooled = PostgresBackend::new(&env.server.url_via(bouncer.addr(), &env.params())).unwrap();
    for node in ["a", "b"] {
        let lock = pooled.lock("jobs").unwrap();
        let err = lock.acquire(req(node)).await.unwrap_err().to_string();
        assert!(err.contains("connection pooler"), "{node}: {err}");
    }
    // Nothing leaked on the pooled server connection: a direct node gets the lock.
    env.wait_locks("jobs", "the lock to be free", <[_]>::is_empty)
        .await;
    let direct = env.backend().lock("jobs").unwrap();
    let l = within("a direct acquisition", direct.acquire(req("direct")))
        .await
        .unwrap();
    l.release().await.unwrap();
}

// ------------------------------------------------------------------------------------------------
// Real processes

struct Nodes {
    cluster: Cluster,
    env: Env,
    _serial: MutexGuard<'static, ()>,
}

impl Nodes {
    /// A first node that reaches the server through a proxy of its own and becomes primary
    /// alone, then `followers` more nodes, settled: the proxy, the primary's pid and its term.
    async fn primary_behind_a_proxy(&mut self, followers: usize) -> (TcpProxy, u32, u64) {
        let proxy = TcpProxy::start(self.env.server.addr).await.unwrap();
        let mut via_proxy = self.cluster.config().clone();
        via_proxy.backend = self.env.server.url_via(proxy.addr(), &self.env.params());
        let primary = self.cluster.spawn_node_with(&via_proxy).unwrap();
        let (first, term) = self.cluster.wait_single_primary(WAIT).await.unwrap();
        assert_eq!(first, primary);
        self.cluster.spawn_nodes(followers).unwrap();
        self.cluster.wait_settled(WAIT).await.unwrap();
        (proxy, primary, term)
    }
}

async fn nodes(test: &str) -> Option<Nodes> {
    let env = Env::new(test).await?;
    let serial = SERIAL.lock().await;
    let config = NodeConfig::new(env.url(), "jobs").grace(Duration::from_secs(2));
    let command = NodeCommand::test_entry("node_entry").expect("the test binary's path");
    Some(Nodes {
        cluster: Cluster::new(command, config),
        env,
        _serial: serial,
    })
}

#[tokio::test]
async fn a_killed_primary_is_succeeded_by_exactly_one_node_with_a_higher_term() {
    let Some(mut n) = nodes("proc_sigkill").await else {
        return;
    };
    n.cluster.spawn_nodes(3).unwrap();
    let failover = n.cluster.kill_primary(WAIT).await;
    eprintln!(
        "SIGKILL → successor primary {:.3} ms",
        ms(failover.signalled_at, failover.next.at)
    );
}

#[tokio::test]
async fn a_terminated_primary_hands_over_and_every_secondary_learns_the_new_holder() {
    let Some(mut n) = nodes("proc_sigterm").await else {
        return;
    };
    n.cluster.spawn_nodes(3).unwrap();
    // Settled on the successor: the third node, which never held the lock, heard of the new
    // holder by NOTIFY.
    let handover = n.cluster.terminate_primary(WAIT).await;
    let Succession {
        signalled_at: sent_at,
        ref next,
        ..
    } = handover.succession;
    assert!(
        next.at <= handover.released + 1_000_000_000,
        "{}",
        n.cluster.dump()
    );
    eprintln!(
        "SIGTERM → successor primary {:.3} ms (old task cancelled at {:.3} ms)",
        ms(sent_at, next.at),
        ms(sent_at, handover.cancelled)
    );
}

#[tokio::test]
async fn a_primary_whose_lock_session_is_terminated_steps_down_before_the_successor_starts() {
    let Some(mut n) = nodes("proc_terminate").await else {
        return;
    };
    n.cluster.spawn_nodes(3).unwrap();
    let (old, term) = n.cluster.wait_settled(WAIT).await.unwrap();

    let pid = n.env.holder_pid("jobs").await;
    let at = monotonic_nanos();
    n.env.terminate(pid).await;
    let next = n.cluster.wait_primary_after(term, old, WAIT).await.unwrap();
    let stepped_down = n
        .cluster
        .wait_event("the old primary to step down", WAIT, |e| {
            e.pid == old && matches!(e.kind, EventKind::TaskCancelled { term: t } if t == term)
        })
        .await
        .unwrap()
        .at;
    // The server freed the key at once; the successor still waited for the old primary.
    assert!(
        at < stepped_down && stepped_down < next.at,
        "{}",
        n.cluster.dump()
    );
    n.cluster.assert_history_ok();
    // The old primary is alive and campaigns again.
    assert!(n.cluster.states()[&old].alive);
    n.cluster.wait_settled(WAIT).await.unwrap();
    eprintln!(
        "pg_terminate_backend → old primary's task cancelled {:.3} ms, successor {:.3} ms",
        ms(at, stepped_down),
        ms(at, next.at)
    );
}

#[tokio::test]
async fn a_stalled_primary_steps_down_before_the_server_frees_its_lock() {
    let Some(mut n) = nodes("proc_stall").await else {
        return;
    };
    let (proxy, old, term) = n.primary_behind_a_proxy(2).await;

    let stalled_at = monotonic_nanos();
    proxy.stall();
    // The liveness check gets no answer: the holder steps down on its own ...
    let stepped_down = n
        .cluster
        .wait_event("the stalled primary to step down", WAIT, |e| {
            e.pid == old && matches!(e.kind, EventKind::TaskCancelled { term: t } if t == term)
        })
        .await
        .unwrap()
        .at;
    // ... while the server still holds its lock for it: nobody else may be primary yet.
    assert_eq!(
        n.env.lock_rows("jobs").await.iter().filter(|r| r.1).count(),
        1
    );
    assert!(
        !n.cluster
            .events()
            .iter()
            .any(|e| e.pid != old && matches!(e.kind, EventKind::Primary { .. })),
        "{}",
        n.cluster.dump()
    );
    // Then the server side goes, as a server's keepalive would end it; the lock is freed.
    let cut_at = monotonic_nanos();
    proxy.cut_upstream();
    let next = n.cluster.wait_primary_after(term, old, WAIT).await.unwrap();
    assert!(stalled_at < stepped_down && stepped_down < cut_at && cut_at < next.at);
    n.cluster.assert_history_ok();
    eprintln!(
        "stall → old primary stepped down {:.3} ms; upstream cut → successor {:.3} ms",
        ms(stalled_at, stepped_down),
        ms(cut_at, next.at)
    );
    n.cluster.kill_all(WAIT).await.unwrap();
}

// ------------------------------------------------------------------------------------------------
// Double faults: both connections of a holder gone at once, stopped nodes

#[tokio::test]
async fn a_holder_whose_connections_are_all_terminated_is_waited_for_by_its_successor() {
    let Some(env) = Env::new("both_terminated").await else {
        return;
    };
    let backend = env.backend();
    let (a_lock, b_lock) = (backend.lock("jobs").unwrap(), backend.lock("jobs").unwrap());
    let mut a = a_lock.acquire(req("a")).await.unwrap();
    let b = acquire_in_background(&b_lock, "b");
    env.wait_waiters("jobs", 1).await;

    // An administrator ends every session of a's node: the second connection first (the
    // step-down lock goes with it), then the lock session.
    let lock_pid = env.holder_pid("jobs").await;
    for pid in env.step_down_holders("jobs").await {
        env.terminate(pid).await;
    }
    env.terminate(lock_pid).await;
    within("a to see the loss", a.lost()).await;
    // a's second connection may have reconnected, and taken the step-down lock again for its
    // term, before a saw its lock session end; the administrator ends that session too.
    for pid in env.step_down_holders("jobs").await {
        env.terminate(pid).await;
    }
    env.wait_locks("jobs", "b to hold the key", |rows| {
        rows.iter().any(|(_, granted)| *granted)
    })
    .await;
    // a's process lives on and has not released its term: b may not be primary yet (a clean
    // release or the predecessor's fencing bound, counted from b's grant).
    let granted_at = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !b.is_finished(),
        "b acquired while a's term had not been released"
    );
    let b = within("b to acquire", b).await.unwrap().unwrap();
    assert!(
        granted_at.elapsed() >= Duration::from_millis(350),
        "b acquired {:?} after its grant, before a's fencing bound",
        granted_at.elapsed()
    );
    let holder = b_lock.holder().await.unwrap().expect("a holder");
    assert_eq!(holder.id, "b");
    assert_eq!(holder.lease_ms, Some(450), "{holder:?}");
    assert!(holder.process.is_some(), "{holder:?}");
    drop(a);
    b.release().await.unwrap();
}

#[tokio::test]
async fn an_asymmetric_partition_of_the_primary_never_overlaps_its_successor() {
    let Some(mut n) = nodes("proc_drop").await else {
        return;
    };
    let (proxy, old, term) = n.primary_behind_a_proxy(2).await;

    // The server closes both of the primary's sessions; the primary hears nothing.
    let cut_at = monotonic_nanos();
    proxy.cut_upstream();
    let next = n.cluster.wait_primary_after(term, old, WAIT).await.unwrap();
    let stepped_down = n
        .cluster
        .wait_event("the cut-off primary to step down", WAIT, |e| {
            e.pid == old && matches!(e.kind, EventKind::TaskCancelled { term: t } if t == term)
        })
        .await
        .unwrap()
        .at;
    assert!(stepped_down < next.at, "{}", n.cluster.dump());
    n.cluster.assert_history_ok();
    eprintln!(
        "upstream cut → old primary stepped down {:.3} ms; successor {:.3} ms",
        ms(cut_at, stepped_down),
        ms(cut_at, next.at)
    );
    n.cluster.kill_all(WAIT).await.unwrap();
}

#[tokio::test]
async fn a_stopped_primary_is_ended_by_a_waiter_and_resumes_as_secondary() {
    let Some(mut n) = nodes("proc_sigstop").await else {
        return;
    };
    n.cluster.spawn_nodes(3).unwrap();
    let (old, term) = n.cluster.wait_settled(WAIT).await.unwrap();
    // Its kernel keeps answering keepalives: the server keeps its sessions.
    let stopped = n.cluster.signal(old, NodeSignal::Stop).await.unwrap();
    let next = n.cluster.wait_primary_after(term, old, WAIT).await.unwrap();
    let new_term = next.term().unwrap();
    let resumed = n.cluster.signal(old, NodeSignal::Cont).await.unwrap();
    n.cluster
        .wait_event("the resumed node to report secondary", WAIT, |e| {
            e.pid == old
                && e.at > resumed
                && matches!(e.kind, EventKind::Secondary { holder_term: Some(t), .. } if t >= new_term)
        })
        .await
        .unwrap();
    let events = n.cluster.events();
    let late_tick = events.iter().find(|e| {
        e.pid == old
            && e.at > resumed
            && matches!(e.kind, EventKind::Tick { term: t, .. } if t == term)
    });
    assert!(late_tick.is_none(), "{late_tick:?}\n{}", n.cluster.dump());
    assert!(stopped < next.at, "{}", n.cluster.dump());
    // Apart from the frozen period (which ended at its deadline, unseen), no overlap.
    let mut others = History::new();
    for p in n.cluster.history().periods() {
        if !(p.node == old.to_string() && p.term == term) {
            others.push(p.clone());
        }
    }
    let report = others.check();
    assert!(report.is_ok(), "{report}\n{}", n.cluster.dump());
    n.cluster.wait_settled(WAIT).await.unwrap();
    eprintln!(
        "SIGSTOP of the primary → successor primary {:.1} ms",
        ms(stopped, next.at)
    );
    n.cluster.kill_all(WAIT).await.unwrap();
}

#[tokio::test]
async fn a_stopped_waiter_granted_the_lock_is_ended_and_never_becomes_primary() {
    let Some(mut n) = nodes("proc_stopped_waiter").await else {
        return;
    };
    let first = n.cluster.spawn_node().unwrap();
    let (p, term) = n.cluster.wait_single_primary(WAIT).await.unwrap();
    assert_eq!(p, first);
    // The head of the queue, stopped while it waits.
    let stuck = n.cluster.spawn_node().unwrap();
    n.env.wait_waiters("jobs", 1).await;
    let stopped = n.cluster.signal(stuck, NodeSignal::Stop).await.unwrap();
    let other = n.cluster.spawn_node().unwrap();
    n.env.wait_waiters("jobs", 2).await;
    // The server grants the key to the stopped node.
    n.cluster.signal(first, NodeSignal::Term).await.unwrap();
    let next = n
        .cluster
        .wait_primary_after(term, first, WAIT)
        .await
        .unwrap();
    assert_eq!(next.pid, other, "{}", n.cluster.dump());
    let resumed = n.cluster.signal(stuck, NodeSignal::Cont).await.unwrap();
    n.cluster
        .wait_event("the resumed node to report secondary", WAIT, |e| {
            e.pid == stuck && e.at > resumed && matches!(e.kind, EventKind::Secondary { .. })
        })
        .await
        .unwrap();
    assert!(
        !n.cluster
            .events()
            .iter()
            .any(|e| e.pid == stuck && matches!(e.kind, EventKind::Primary { .. })),
        "{}",
        n.cluster.dump()
    );
    n.cluster.assert_history_ok();
    n.cluster.wait_settled(WAIT).await.unwrap();
    eprintln!(
        "SIGSTOP of the head waiter, then handover → successor primary {:.1} ms",
        ms(stopped, next.at)
    );
    n.cluster.kill_all(WAIT).await.unwrap();
}

#[tokio::test]
async fn a_silent_holder_is_ended_by_waiters_only_with_the_rights_to_see_and_signal_it() {
    let Some(env) = Env::new("stopped_rights").await else {
        return;
    };
    // A role that may neither see nor signal the admin's sessions owns this test's schema.
    env.admin
        .batch_execute(&format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tp_pg_limited') \
             THEN CREATE ROLE tp_pg_limited LOGIN; END IF; END $$; \
             CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION tp_pg_limited; \
             GRANT CREATE ON DATABASE \"{db}\" TO tp_pg_limited",
            schema = env.schema,
            db = env.server.config.get_dbname().unwrap_or("postgres"),
        ))
        .await
        .expect("a limited role");
    // A session of another role takes the key and goes silent, as a stopped node's would.
    let stuck = env.server.admin().await;
    stuck
        .execute("SELECT pg_advisory_lock($1)", &[&env.key("jobs")])
        .await
        .unwrap();
    let short = |url: &str| {
        PostgresBackend::new(url)
            .unwrap()
            .max_fencing_bound(Duration::from_secs(1))
    };
    let db = env
        .server
        .config
        .get_dbname()
        .unwrap_or("postgres")
        .to_owned();
    let limited = short(&format!(
        "postgres://tp_pg_limited@{}/{db}?{}",
        env.server.addr,
        env.params()
    ))
    .lock("jobs")
    .unwrap();
    let mut waiter = acquire_in_background(&limited, "limited");
    // Idle far past the 1.15 s limit and checked twice: the limited waiter cannot tell, so it
    // leaves the session alone and keeps waiting.
    let waited = tokio::time::timeout(Duration::from_secs(5), &mut waiter).await;
    assert!(waited.is_err(), "the limited waiter acquired: {waited:?}");
    stuck
        .execute("SELECT 1", &[])
        .await
        .expect("the silent session was ended");
    waiter.abort();
    // A waiter of the same role ends it and takes the lock.
    let allowed = short(&env.url()).lock("jobs").unwrap();
    let l = within(
        "the allowed waiter to acquire",
        allowed.acquire(req("allowed")),
    )
    .await
    .unwrap();
    assert!(stuck.execute("SELECT 1", &[]).await.is_err());
    l.release().await.unwrap();
}

// ------------------------------------------------------------------------------------------------
// The candidate registry and reservations

/// The live entries another connection reads, by node, sorted.
async fn listed(lock: &Arc<dyn Lock>) -> Vec<(String, u64, bool)> {
    let mut entries: Vec<_> = lock
        .candidates()
        .await
        .expect("read the registry")
        .into_iter()
        .map(|c| (c.node, c.priority, c.draining))
        .collect();
    entries.sort();
    entries
}

/// Waits for a registry change seen by `changes`, then until `pred` holds on what `lock` lists
/// (a change may have been reported before the one awaited).
async fn wait_listed(
    changes: &mut Box<dyn tower_primary::backend::Changes>,
    lock: &Arc<dyn Lock>,
    what: &str,
    pred: impl Fn(&[(String, u64, bool)]) -> bool,
) -> Vec<(String, u64, bool)> {
    within(what, async {
        loop {
            let now = listed(lock).await;
            if pred(&now) {
                return now;
            }
            changes.changed().await.expect("registry changes");
        }
    })
    .await
}

#[tokio::test]
async fn registry_entries_are_seen_by_another_connection_when_added_updated_and_withdrawn() {
    let Some(env) = Env::new("registry").await else {
        return;
    };
    let (a, b) = (
        env.backend().lock("jobs").unwrap(),
        env.backend().lock("jobs").unwrap(),
    );
    let mut changes = b.watch_candidates().await.unwrap();
    assert_eq!(listed(&b).await, vec![]);

    let reg = a
        .register(Candidate::new("a").with_priority(7), None)
        .await
        .unwrap();
    // Visible as soon as register returned, and notified.
    assert_eq!(listed(&b).await, vec![("a".to_owned(), 7, false)]);
    within("the add notification", changes.changed())
        .await
        .unwrap();

    reg.update(Candidate::new("a").with_priority(8).with_draining(true))
        .await
        .unwrap();
    assert_eq!(listed(&b).await, vec![("a".to_owned(), 8, true)]);
    within("the update notification", changes.changed())
        .await
        .unwrap();

    // A second registration of the same node replaces the entry; the first one's withdrawal
    // leaves the second one's alone.
    let again = a
        .register(Candidate::new("a").with_priority(9), None)
        .await
        .unwrap();
    let other = b.register(Candidate::new("b"), None).await.unwrap();
    assert_eq!(
        listed(&a).await,
        vec![("a".to_owned(), 9, false), ("b".to_owned(), 0, false)]
    );
    drop(reg);
    drop(other);
    wait_listed(&mut changes, &b, "b's withdrawal", |l| {
        l == [("a".to_owned(), 9, false)]
    })
    .await;
    drop(again);
    wait_listed(&mut changes, &b, "a's withdrawal", <[_]>::is_empty).await;
    let rows: i64 = env
        .admin
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.candidates WHERE namespace = $1",
                env.schema
            ),
            &[&env.namespace],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "withdrawn rows are deleted");
}

#[tokio::test]
async fn a_registrant_whose_connection_is_cut_is_unlisted_and_listed_again_when_it_reconnects() {
    let Some(env) = Env::new("registry_cut").await else {
        return;
    };
    let proxy = TcpProxy::start(env.server.addr).await.unwrap();
    let via_proxy = PostgresBackend::new(
        &env.server
            .url_via(proxy.addr(), &format!("{}&connect_timeout=1", env.params())),
    )
    .unwrap()
    .lock("jobs")
    .unwrap();
    let reader = env.backend().lock("jobs").unwrap();
    let mut changes = reader.watch_candidates().await.unwrap();
    let _reg = via_proxy
        .register(Candidate::new("cut").with_priority(3), None)
        .await
        .unwrap();
    assert_eq!(listed(&reader).await, vec![("cut".to_owned(), 3, false)]);
    let old_pid: i32 = env
        .admin
        .query_one(
            &format!(
                "SELECT backend_pid FROM {}.candidates WHERE namespace = $1",
                env.schema
            ),
            &[&env.namespace],
        )
        .await
        .unwrap()
        .get(0);

    // The server sees the socket close and ends the session: the row is no longer listed,
    // though nobody deleted it (no notification either: the server has no event for this).
    proxy.stall();
    proxy.cut();
    let started = tokio::time::Instant::now();
    within("the cut entry to be unlisted", async {
        while !listed(&reader).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    eprintln!(
        "registry entry unlisted {:?} after its session was cut",
        started.elapsed()
    );
    let rows: i64 = env
        .admin
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.candidates WHERE namespace = $1",
                env.schema
            ),
            &[&env.namespace],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the dead row is still there, only filtered");

    // Back online: the node writes its entry again on its new session, and readers are told.
    proxy.resume();
    wait_listed(
        &mut changes,
        &reader,
        "the entry to be written again",
        |l| l == [("cut".to_owned(), 3, false)],
    )
    .await;
    let new_pid: i32 = env
        .admin
        .query_one(
            &format!(
                "SELECT backend_pid FROM {}.candidates WHERE namespace = $1",
                env.schema
            ),
            &[&env.namespace],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(new_pid, old_pid, "the entry names the new session");
}

/// The registrant side of `a_killed_registrant_is_no_longer_listed`: registers and waits to be
/// killed.
#[test]
fn registrant_entry() {
    let Ok(url) = std::env::var("TP_PG_REGISTRANT_URL") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let lock = PostgresBackend::new(&url).unwrap().lock("jobs").unwrap();
        let _reg = lock
            .register(Candidate::new("child").with_priority(5), None)
            .await
            .unwrap();
        use std::io::Write;
        let mut out = std::io::stdout();
        writeln!(out, "registered").unwrap();
        out.flush().unwrap();
        std::future::pending::<()>().await;
    });
}

#[tokio::test]
async fn a_killed_registrant_is_no_longer_listed() {
    let Some(env) = Env::new("registry_kill").await else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let reader = env.backend().lock("jobs").unwrap();
    /// Kills the child if the test fails before it does.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Child(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "registrant_entry",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TP_PG_REGISTRANT_URL", env.url())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the registrant"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let registered = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        // libtest prints the test's name on the same line.
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.ends_with("registered"))
    });
    let registered = tokio::time::timeout(WAIT, registered).await;
    assert!(
        matches!(registered, Ok(Ok(true))),
        "the child did not register: {registered:?}"
    );
    assert_eq!(listed(&reader).await, vec![("child".to_owned(), 5, false)]);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = tokio::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success(), "{status:?}");
    within("the killed child's entry to be unlisted", async {
        while !listed(&reader).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    eprintln!(
        "registry entry unlisted {:?} after SIGKILL",
        killed.elapsed()
    );
}

async fn reservation_rows(env: &Env) -> i64 {
    env.admin
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.reservations WHERE namespace = $1",
                env.schema
            ),
            &[&env.namespace],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_waiter_the_lock_is_not_reserved_for_waits_out_the_window_then_takes_it() {
    let Some(env) = Env::new("reserve_expiry").await else {
        return;
    };
    let backend = env.backend();
    let (a_lock, b_lock) = (backend.lock("jobs").unwrap(), backend.lock("jobs").unwrap());
    let mut a = a_lock.acquire(req("a")).await.unwrap();
    let b = acquire_in_background(&b_lock, "b");
    env.wait_waiters("jobs", 1).await;

    let window = Duration::from_millis(800);
    let reserved_at = tokio::time::Instant::now();
    a.reserve("absent", window).await.unwrap();
    assert_eq!(reservation_rows(&env).await, 1);
    let ta = a.term();
    a.release().await.unwrap();
    let b = within("b to acquire after the window", b)
        .await
        .unwrap()
        .unwrap();
    let waited = reserved_at.elapsed();
    eprintln!("b acquired {waited:?} after a reserved for {window:?}");
    // The server started the window after `reserved_at` (same host, same clock).
    assert!(waited >= window, "b acquired after {waited:?}");
    assert!(
        waited < window + Duration::from_secs(1),
        "b waited {waited:?}"
    );
    assert!(b.term() > ta);
    assert_eq!(
        reservation_rows(&env).await,
        0,
        "the expired row is deleted"
    );
    b.release().await.unwrap();
}

#[tokio::test]
async fn the_reserved_waiter_takes_the_lock_at_once_with_a_higher_term_and_consumes_it() {
    let Some(env) = Env::new("reserve_taken").await else {
        return;
    };
    let backend = env.backend();
    let locks: Vec<_> = (0..3).map(|_| backend.lock("jobs").unwrap()).collect();
    let mut a = locks[0].acquire(req("a")).await.unwrap();
    // b queues first: it is granted the key first and must give it back.
    let b = acquire_in_background(&locks[1], "b");
    env.wait_waiters("jobs", 1).await;
    let r = acquire_in_background(&locks[2], "r");
    env.wait_waiters("jobs", 2).await;

    let window = Duration::from_secs(10);
    let ta = a.term();
    let started = tokio::time::Instant::now();
    a.reserve("r", window).await.unwrap();
    a.release().await.unwrap();
    let r = within("r to acquire", r).await.unwrap().unwrap();
    let took = started.elapsed();
    eprintln!("r acquired {took:?} after reserve + release");
    assert!(took < Duration::from_secs(2), "r took {took:?}");
    assert!(r.term() > ta, "term {} after {ta}", r.term());
    assert_eq!(
        locks[1].holder().await.unwrap().map(|h| h.id),
        Some("r".to_owned())
    );
    assert_eq!(
        reservation_rows(&env).await,
        0,
        "the reservation is consumed"
    );
    assert!(!b.is_finished(), "b acquired while r held the lock");

    // Consumed: when r releases, b takes the lock at once, long before the window would end.
    let tr = r.term();
    let released = tokio::time::Instant::now();
    r.release().await.unwrap();
    let b = within("b to acquire", b).await.unwrap().unwrap();
    assert!(released.elapsed() < Duration::from_secs(2));
    assert!(b.term() > tr);
    b.release().await.unwrap();
}

#[tokio::test]
async fn a_term_that_lost_the_lock_cannot_reserve_it() {
    let Some(env) = Env::new("reserve_lost").await else {
        return;
    };
    let backend = env.backend();
    let (a_lock, b_lock) = (backend.lock("jobs").unwrap(), backend.lock("jobs").unwrap());
    let mut a = a_lock.acquire(req("a")).await.unwrap();
    let b = acquire_in_background(&b_lock, "b");
    env.wait_waiters("jobs", 1).await;

    // The server checks the term like a state write: a holder row naming a newer term (as a
    // successor's would) refuses the reservation, and says which term.
    let bump = format!(
        "UPDATE {}.holders SET term = term + $2 WHERE key = $1",
        env.schema
    );
    env.admin
        .execute(&bump, &[&env.key("jobs"), &1000_i64])
        .await
        .unwrap();
    let refused = a.reserve("b", Duration::from_secs(5)).await.unwrap_err();
    assert!(
        matches!(refused, Error::StaleTerm { term, current: Some(c), .. } if term == a.term() && c == a.term() + 1000),
        "{refused}"
    );
    env.admin
        .execute(&bump, &[&env.key("jobs"), &-1000_i64])
        .await
        .unwrap();
    a.reserve("b", Duration::from_secs(5)).await.unwrap();
    assert_eq!(reservation_rows(&env).await, 1);
    env.admin
        .execute(&format!("DELETE FROM {}.reservations", env.schema), &[])
        .await
        .unwrap();

    // Refused once the session is gone, whether or not the node has noticed yet (then by the
    // server's check: its session no longer holds the key).
    let a_pid = env.holder_pid("jobs").await;
    env.terminate(a_pid).await;
    // The server process of a's session has exited once b's session holds the key.
    env.wait_locks("jobs", "b to be granted the key", |rows| {
        rows.iter().any(|(pid, granted)| *granted && *pid != a_pid)
    })
    .await;
    let refused = a.reserve("b", Duration::from_secs(5)).await.unwrap_err();
    assert!(
        matches!(refused, Error::StaleTerm { .. } | Error::Lost { .. }),
        "{refused}"
    );
    within("a to see the loss", a.lost()).await;
    let refused = a.reserve("b", Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(refused, Error::Lost { .. }), "{refused}");
    assert_eq!(reservation_rows(&env).await, 0);
    a.release().await.unwrap();
    let b = within("b to acquire", b).await.unwrap().unwrap();
    b.release().await.unwrap();
}

/// p50/p99/max of `samples`.
fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() - 1) as f64 * q).round() as usize;
        samples[i]
    };
    format!(
        "p50 {:?}, p99 {:?}, max {:?} over {} rounds",
        at(0.5),
        at(0.99),
        samples[samples.len() - 1],
        samples.len()
    )
}

/// Prints p50/p99 of reserve + release → the reserved node's acquire returning, over 20
/// handovers back and forth between two nodes, and of release → the waiter's acquire without a
/// reservation, for comparison.
#[tokio::test]
async fn handover_to_a_reserved_node_latency() {
    let Some(env) = Env::new("reserve_latency").await else {
        return;
    };
    let backend = env.backend();
    let locks = [backend.lock("jobs").unwrap(), backend.lock("jobs").unwrap()];
    let names = ["x", "y"];
    let mut holder = locks[0].acquire(req(names[0])).await.unwrap();
    let mut last_term = holder.term();
    let (mut reserved, mut plain) = (Vec::new(), Vec::new());
    for round in 0..40 {
        let next = (round + 1) % 2;
        let with_reservation = round < 20;
        let waiter = acquire_in_background(&locks[next], names[next]);
        env.wait_waiters("jobs", 1).await;
        let started = tokio::time::Instant::now();
        if with_reservation {
            holder
                .reserve(names[next], Duration::from_secs(2))
                .await
                .unwrap();
        }
        holder.release().await.unwrap();
        holder = within("the waiting node to acquire", waiter)
            .await
            .unwrap()
            .unwrap();
        let took = started.elapsed();
        if with_reservation {
            reserved.push(took);
        } else {
            plain.push(took);
        }
        assert!(holder.term() > last_term);
        assert_eq!(holder.holder().id, names[next]);
        last_term = holder.term();
    }
    holder.release().await.unwrap();
    assert_eq!(
        reservation_rows(&env).await,
        0,
        "every reservation consumed"
    );
    eprintln!(
        "postgres reserve+release -> reserved acquire: {}",
        percentiles(reserved)
    );
    eprintln!(
        "postgres release -> waiter acquire (no reservation): {}",
        percentiles(plain)
    );
}
