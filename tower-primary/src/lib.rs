//! Run it once: leader election for services that run as many workers or many replicas.
//!
//! A service started with N worker processes (or N containers) runs its startup code N times: N
//! schedulers, N copies of every email, N migrations racing. tower-primary elects one **primary**
//! per lock name, keeps it honest, and makes the role visible:
//!
//! - an [`Elector`] campaigns for a lock in the background, publishes the role through a cheap
//!   [`RoleHandle`], fails over the moment the primary dies, hands over at once on shutdown, and
//!   campaigns again after a loss;
//! - every term carries a strictly increasing **term** number (a fencing token) to put into
//!   downstream writes, so a stale primary's writes can be refused;
//! - [singleton tasks](Elector::singleton_task) run only while this process is primary, are
//!   cancelled the moment it stops being primary, and start again on the next primary;
//! - on lease backends the primary **fences itself**: [`RoleHandle::is_primary`] and
//!   [`TermContext::is_valid`] compare the lease deadline with the clock themselves, so a process
//!   resumed after a pause sees "not primary" before it does anything else.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_primary::{Elector, MemoryBackend};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_primary::Error> {
//! // In production: `.backend(FileBackend::new("/run/myapp"))`, or a backend string from a flag.
//! let elector = Elector::builder("report-scheduler")
//!     .backend(MemoryBackend::new())
//!     .grace(Duration::from_secs(5))
//!     .spawn()?;
//!
//! elector.singleton_task("daily-report", |ctx| async move {
//!     while ctx.is_valid() {
//!         // ... work that must run on one node only, tagged with ctx.term() ...
//!         tokio::select! {
//!             _ = tokio::time::sleep(Duration::from_secs(60)) => {}
//!             _ = ctx.cancelled() => break,
//!         }
//!     }
//!     Ok::<_, std::io::Error>(())
//! });
//!
//! let role = elector.handle();
//! # role.clone().wait_primary().await;
//! println!("primary: {}, term: {:?}", role.is_primary(), role.term());
//!
//! // On SIGTERM: hand over first (a secondary takes over at once), then stop serving.
//! elector.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # A web service
//!
//! [`PrimaryLayer`] puts the role into every request; [`RequirePrimaryLayer`] keeps a route to
//! the primary (503, or a 307 to the primary's advertised URL); [`http::health::role`] serves
//! `/health/role`, and [`http::health::Readiness`] `/health/ready` (503 until the
//! [run-once jobs](Elector::run_once) it requires are done); the [extractors](http::extract) read the
//! role in handlers. The request path never touches the backend: the layer adds one extension
//! insert per request. [Schedules](schedule) run jobs on the primary every interval or on a cron
//! expression. `examples/scheduler` puts it all together: an email sender and a daily report under
//! N workers.
//!
//! ```no_run
//! use axum::{Router, routing::{get, post}};
//! use tower_primary::{
//!     Elector, FileBackend, PrimaryLayer, PrimaryTerm, RequirePrimaryLayer, terminate_signal,
//! };
//!
//! async fn rebuild(term: PrimaryTerm) -> String {
//!     // Runs on the primary only; `term` goes into the writes (see below).
//!     format!("rebuilt under term {}", term.term())
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let port = 8080;
//!     // Checks the configuration now; claims the lock when the router is built.
//!     let primary = PrimaryLayer::from_builder(
//!         Elector::builder("my-app")
//!             .backend(FileBackend::new("/run/my-app"))
//!             .advertise(format!("http://10.0.0.7:{port}")),
//!     )?;
//!
//!     let app = Router::new()
//!         .route("/admin/rebuild", post(rebuild).layer(RequirePrimaryLayer::new().redirect()))
//!         .route("/health/role", get(tower_primary::http::health::role))
//!         .layer(primary.clone()); // one elector, however many routes
//!
//!     let elector = primary.elector().expect("the layer owns its elector");
//!     elector.singleton_task("nightly-report", |ctx| async move {
//!         // Runs on one node at a time; cancelled the moment the term ends.
//!         ctx.cancelled().await;
//!         Ok::<_, std::io::Error>(())
//!     });
//!
//!     // On SIGTERM/Ctrl-C: stop admitting gated requests, wait for those in flight (up to the
//!     // grace), release the lock (a secondary takes over at once), then drain the server.
//!     let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
//!     axum::serve(listener, app)
//!         .with_graceful_shutdown(elector.shutdown_signal(terminate_signal()))
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! With an elector of your own, use `PrimaryLayer::new(elector.handle())`; with one lock
//! directory and defaults, `PrimaryLayer::file(dir)?`.
//!
//! ## Carry the term into downstream writes
//!
//! Being primary when a request starts does not mean being primary when its write lands: a
//! pause, a partition or a slow request can outlive the term. Store the term next to the data and
//! let the store refuse older terms, e.g. in SQL:
//!
//! ```sql
//! UPDATE reports SET body = $1, term = $2 WHERE id = $3 AND term <= $2
//! -- 0 rows: a newer primary has written; stop.
//! ```
//!
//! The same rule, with a stand-in for the table:
//!
//! ```
//! use std::sync::Mutex;
//! use tower_primary::{Elector, MemoryBackend, NodeId, TermContext};
//!
//! struct Row { body: String, term: u64 }
//!
//! /// `UPDATE row SET body = $body, term = $term WHERE term <= $term`
//! fn fenced_update(row: &Mutex<Row>, body: &str, ctx: &TermContext) -> bool {
//!     let mut row = row.lock().unwrap();
//!     if row.term > ctx.term() {
//!         return false; // 0 rows affected
//!     }
//!     *row = Row { body: body.to_owned(), term: ctx.term() };
//!     true
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_primary::Error> {
//! let store = MemoryBackend::new();
//! let a = Elector::builder("reports").backend(store.clone()).node(NodeId::new("a")).spawn()?;
//! let old = a.handle().wait_primary().await;
//! let b = Elector::builder("reports").backend(store.connection()).node(NodeId::new("b")).spawn()?;
//!
//! a.step_down().await?; // or a pause, a partition, a crash...
//! let new = b.handle().wait_primary().await;
//! let row = Mutex::new(Row { body: String::new(), term: 0 });
//! assert!(fenced_update(&row, "from b", &new));
//!
//! // a's late write still carries its old term: the row refuses it.
//! assert!(!fenced_update(&row, "late write from a", &old));
//! assert_eq!(row.lock().unwrap().body, "from b");
//! # a.shutdown().await; b.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! In a handler, the term comes from [`PrimaryTerm`] (or `Extension<TermContext>` behind the
//! gate); in a singleton task, from its [`TermContext`].
//!
//! # Backends and features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `file` | yes | [`FileBackend`]: `flock` on a file in a directory; one host, zero setup |
//! | `axum` | yes | axum extractors for the role ([`http::extract`]) and the [`http::health`] handlers |
//! | — | always | [`MemoryBackend`]: in-process, with fault injection, for tests and doctests |
//! | `redis` | no | [`RedisBackend`](backend::redis::RedisBackend): a lease (`SET NX PX`) renewed by owner-checked scripts, pub/sub handover (redis-rs, rustls); `redis://…`, `rediss://…` |
//! | `postgres` | no | [`PostgresBackend`](backend::postgres::PostgresBackend): session advisory locks on PostgreSQL (tokio-postgres, rustls); `postgres://…` |
//! | `etcd` | no | [`EtcdBackend`](backend::etcd::EtcdBackend): a lease-bound election on an etcd key prefix (etcd-client, rustls; building it needs `protoc`); `etcd://…`, `etcds://…` |
//! | `metrics` | no | role, transition, latency, task and schedule metrics on the `metrics` facade ([names](crate::metrics)) |
//! | `full` | no | every optional part |
//!
//! A backend can be chosen at run time from a string (a flag or `TOWER_PRIMARY_BACKEND`) with
//! [`backend::from_url`].
//!
//! # Shutdown
//!
//! [`Elector::shutdown`] (and [`Elector::shutdown_signal`], the future axum's graceful shutdown
//! wants) hands the lock over in this order:
//!
//! 1. stop admitting primary-only work ([`RoleHandle::is_primary`] turns false);
//! 2. cancel the term ([`TermContext::cancelled`] resolves in every singleton task);
//! 3. wait for the singleton tasks and in-flight gated requests ([`TermContext::in_flight`]; a
//!    gated request until its response body has ended) up to the grace period, and abort what is
//!    left (tasks are aborted, gated handlers dropped, gated response bodies cut with an error);
//! 4. release the lock, which wakes the waiting nodes at once;
//! 5. return, so the server can stop accepting connections and drain.
//!
//! # Guarantees
//!
//! - **At most one primary per lock name at any instant.** The file backend relies on `flock`,
//!   which the kernel holds exactly while the holder's open file lives: a crashed holder's lock is
//!   freed the instant its process exits, and a live holder cannot lose it. The lock file must never
//!   be deleted; if it is, the holder notices (inotify) and steps down, and a new node never becomes
//!   primary on a deleted inode. Lease backends rely on self-fencing under bounded clock-rate drift.
//!   PostgreSQL session locks hold while the holder's lock session lives: a crashed holder's lock
//!   is freed in milliseconds; a holder cut off from the server steps down by its liveness check
//!   before the server's keepalive frees the lock; a successor waits until its predecessor has
//!   stepped down (also after `pg_terminate_backend`); PgBouncer transaction pooling is refused.
//!   etcd times the lease on its raft leader and deletes the holder's key when it expires; the
//!   holder stops acting a margin before that, and also as soon as its key is gone.
//!   Redis expires the holder's key a lease after its last renewal (on the Redis host's clock);
//!   the holder stops acting a margin before that, by its own deadline, or as soon as a renewal is
//!   refused. After a Redis restart no lock is granted until Redis has been up for the lease + 1 s,
//!   so a holder whose key was lost has fenced itself first (all nodes of a lock must use the same
//!   lease; one that differs refuses to campaign).
//! - **Terms strictly increase** per lock name. The file backend uses `max(stored + 1, wall-clock
//!   µs)`, so a deleted or corrupt term record still yields a higher term unless the wall clock is
//!   set back. Redis issues `max(last + 1, server TIME in µs)` inside the acquire script, so terms
//!   rise even after Redis restarted without its data (unless the Redis host's clock is set back).
//!   PostgreSQL draws them from a sequence; etcd uses the holder key's create revision,
//!   which survives restarts of etcd (not a restore of an older backup, nor a wiped data
//!   directory).
//! - **Fail closed.** Nothing but a successful acquisition makes a node primary; backend errors keep
//!   it secondary and are retried with backoff. A misconfigured backend (credentials, TLS, an
//!   incompatible lease...) is logged at ERROR, shown by [`RoleHandle::backend_error`] and
//!   `/health/role`, and counted; [`ElectorBuilder::spawn_checked`] returns it at start-up.
//! - **What it does not promise:** exactly-once execution. A primary that dies mid-job leaves the
//!   job half done, and the next primary runs it again: make jobs idempotent, and carry the term
//!   into downstream writes so a stale primary is refused there too. The file backend is for one
//!   host only (not NFS); a raw `fork()` without `exec` shares the lock with the child. The Redis
//!   backend assumes one Redis primary: replication is asynchronous, so a failover to a replica
//!   (Sentinel, Cluster) can lose the lock key without a restart, and two nodes can then be primary
//!   until the old one's next renewal (a third of the lease) — fence downstream writes with the
//!   term, or use PostgreSQL or etcd where that matters.
#![cfg_attr(docsrs, feature(doc_cfg))]
// The docs link items of every feature. With some features off those links have no target; every
// link is checked by the documentation build with all features (docs.rs and CI).
#![cfg_attr(
    not(all(
        feature = "file",
        feature = "axum",
        feature = "schedule",
        feature = "redis",
        feature = "postgres",
        feature = "etcd",
        feature = "metrics"
    )),
    allow(rustdoc::broken_intra_doc_links)
)]

pub mod backend;
mod backend_error;
mod backoff;
pub mod clock;
pub mod elector;
pub mod error;
pub mod http;
pub mod metrics;
pub mod process;
mod rfc3339;
pub mod role;
#[cfg(feature = "schedule")]
#[cfg_attr(docsrs, doc(cfg(feature = "schedule")))]
pub mod schedule;
mod sync;
mod task;
#[cfg(test)]
mod test_support;
mod watchdog;

pub use crate::backend::Lease;
pub use crate::clock::Clock;
pub use crate::elector::{Elector, ElectorBuilder, StateStore, terminate_signal};
pub use crate::error::{BoxError, ConfigError, Error, Misconfiguration};
#[cfg(feature = "axum")]
#[allow(deprecated)]
pub use crate::http::extract::{PrimaryTerm, RoleRejection};
pub use crate::http::layer::{AddRole, AddRoleLayer, PrimaryLayer, RoleHeaders, RoleHeadersLayer};
pub use crate::http::require::{RequirePrimary, RequirePrimaryLayer};
pub use crate::role::{BackendError, Holder, InFlight, NodeId, Role, RoleHandle, TermContext};

#[cfg(feature = "file")]
pub use crate::backend::file::FileBackend;
#[cfg(feature = "file")]
#[allow(deprecated)]
pub use crate::backend::file::FileLock;
pub use crate::backend::memory::MemoryBackend;
