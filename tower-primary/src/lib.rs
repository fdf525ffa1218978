//! Run it once: leader election for services that run as many workers or many replicas.
//!
//! A service started with N worker processes (or N containers) runs its startup code N times: N
//! schedulers, N copies of every email, N migrations racing. tower-primary elects one **primary**
//! per lock name, keeps it honest, and makes the role visible. You get:
//!
//! - an [`Elector`] that campaigns for a lock in the background, publishes the role through a
//!   cheap [`RoleHandle`], fails over when the primary dies, hands over at once on shutdown, and
//!   campaigns again after a loss;
//! - a strictly increasing **term** (a fencing token) for every primary period, to put into
//!   downstream writes so that a stale primary's writes are refused;
//! - [singleton tasks](Elector::singleton_task) that run only while this process is primary, are
//!   cancelled the moment it stops being primary, and start again on the next primary;
//!   [schedules](schedule) and run-once jobs on top of them (feature `schedule`);
//! - the HTTP side in [`http`]: [`PrimaryLayer`] puts the role into every request,
//!   [`RequirePrimaryLayer`] keeps a route to the primary (or, with the `forward` feature,
//!   forwards its requests to the primary), [`http::health`] serves
//!   `/health/role`, `/health/ready` and `/health/live`, and [`http::extract`] reads the role in
//!   handlers;
//! - backends for one host (a lock file) and for many (Redis, PostgreSQL, etcd), chosen in code
//!   or from a string at run time; the worker processes of one host can campaign on a server
//!   backend as one candidate ([`backend::host`], [`ElectorBuilder::host_dir`]).
//!
//! # A web service
//!
//! ```no_run
//! use axum::{Router, routing::{get, post}};
//! use tower_primary::{
//!     Elector, FileBackend, PrimaryLayer, RequirePrimaryLayer, TermContext, terminate_signal,
//! };
//!
//! async fn rebuild(term: TermContext) -> String {
//!     // Runs on the primary only; put `term` into the writes it makes (see below).
//!     format!("rebuilt under term {}", term.term())
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let port = 8080;
//!     // Checks the configuration now; claims the lock when the router is built.
//!     let primary = PrimaryLayer::new(
//!         Elector::builder("my-app")
//!             .backend(FileBackend::new("/run/my-app"))
//!             .advertise(format!("http://10.0.0.7:{port}")),
//!     )?;
//!
//!     let app = Router::new()
//!         // 503 on the other nodes, or with `.redirect()` a 307 to the primary's URL.
//!         .route("/admin/rebuild", post(rebuild).layer(RequirePrimaryLayer::new().redirect()))
//!         // 200 on every node: who this node is, its role, and who is primary.
//!         .route("/health/role", get(tower_primary::http::health::role))
//!         .layer(primary.clone()); // one elector, however many routes
//!
//!     let elector = primary.elector();
//!     elector.singleton_task("nightly-report", |ctx| async move {
//!         // Runs on one node at a time; `ctx.term()` is the fencing token, and
//!         // `ctx.cancelled()` resolves the moment the term ends.
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
//! With an elector of your own (or [`RoleHandle::fixed`] in a handler's unit test), use
//! [`AddRoleLayer::new(elector.handle())`](AddRoleLayer::new); [`RoleHeadersLayer`] adds
//! `x-primary-role` and `x-primary-term` to responses. Handlers read the role with the
//! [extractors](http::extract): [`TermContext`] (only on the primary, else 503), [`Role`] (a
//! snapshot) and [`RoleHandle`]. The request path never touches the backend:
//! the layer adds one extension insert per request. `examples/scheduler` in the repository puts it
//! all together: an email sender and a daily report under N workers.
//!
//! # Without HTTP
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
//! # Carry the term into downstream writes
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
//! In a handler, the term comes from the [`TermContext`] extractor (on the primary only); in a
//! singleton task, from its [`TermContext`]; in a scheduled run, from
//! [`Run::term`](schedule::Run::term).
//!
//! # Features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `file` | yes | [`FileBackend`]: `flock` on a file in a directory; one host, zero setup |
//! | `axum` | yes | axum extractors for the role ([`http::extract`]) and the [`http::health`] handlers; the layer and the gate ([`http::layer`], [`http::require`]) work on any tower stack without it |
//! | `schedule` | no | [schedules](schedule) (every interval, cron expressions in a time zone) and [run-once jobs](Elector::run_once), with [`http::health::Readiness`] |
//! | `redis` | no | [`RedisBackend`](backend::redis::RedisBackend): a lease renewed by owner-checked scripts, pub/sub handover; `redis://…`, `rediss://…` |
//! | `postgres` | no | [`PostgresBackend`](backend::postgres::PostgresBackend): session advisory locks; `postgres://…`, `postgresql://…` |
//! | `etcd` | no | [`EtcdBackend`](backend::etcd::EtcdBackend): a lease-bound election on a key prefix (building it needs `protoc`); `etcd://…`, `etcds://…` |
//! | `metrics` | no | role, transition, latency, task and schedule metrics on the `metrics` facade ([names](crate::metrics)) |
//! | `forward` | no | the gate [forwards](RequirePrimaryLayer::forward) primary-only requests to the primary and streams the answer back (hyper-util's pooled client; rustls with ring for `https://`); the gate's request body must then be an `http_body::Body + Send + 'static` |
//! | `full` | no | every optional part |
//!
//! [`MemoryBackend`], in-process with fault injection for tests, is always there. A backend can be
//! chosen at run time from a string (a flag or `TOWER_PRIMARY_BACKEND`) with
//! [`backend::from_url`]. Lease backends (Redis, etcd) use [`Lease::DEFAULT`] (5 s) unless the
//! elector is given another [lease](ElectorBuilder::lease).
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
//! [`Elector::step_down`] follows the same order, then campaigns again after the
//! [rejoin delay](ElectorBuilder::rejoin_delay).
//!
//! # Guarantees
//!
//! - At most one primary per lock name at any instant: the kernel's `flock` (file), a session
//!   advisory lock with death certificates or a fencing bound (PostgreSQL), or a lease that the
//!   primary fences itself by (Redis, etcd): [`RoleHandle::is_primary`] and
//!   [`TermContext::is_valid`] compare the term's deadline with the clock themselves, so a process
//!   resumed after a pause reads "not primary" before it does anything else.
//! - Terms strictly increase per lock name, also across restarts.
//! - Fail closed: nothing but a successful acquisition makes a node primary. A misconfigured
//!   backend (credentials, TLS, an incompatible lease...) is logged at ERROR once per cause, shown
//!   by [`RoleHandle::backend_error`] and `/health/role`, and counted;
//!   [`ElectorBuilder::spawn_checked`] returns it at start-up instead.
//! - Not exactly-once: a primary that dies mid-job leaves it half done, and the next primary runs
//!   it again. Make jobs idempotent and carry the term into downstream writes.
//!
//! What each backend promises, under which assumptions, and where each promise stops is stated
//! once, in GUARANTEES.md at the root of the repository; ARCHITECTURE.md, beside it, says where in
//! the code each invariant is kept.
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
        feature = "metrics",
        feature = "forward"
    )),
    allow(rustdoc::broken_intra_doc_links)
)]

// The README's Rust examples compile as doctests (they use the default features).
#[cfg(all(doctest, feature = "file", feature = "axum"))]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

pub mod backend;
mod backend_error;
mod backoff;
pub mod clock;
pub mod elector;
pub mod error;
pub mod http;
pub mod metrics;
mod origin;
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
pub use crate::elector::{Elector, ElectorBuilder, PRIORITY_ENV, StateStore, terminate_signal};
pub use crate::error::{BoxError, ConfigError, Error, HandOverRefusal, Misconfiguration};
#[cfg(feature = "axum")]
#[allow(deprecated)]
pub use crate::http::extract::{PrimaryTerm, RoleRejection};
pub use crate::http::layer::{AddRole, AddRoleLayer, PrimaryLayer, RoleHeaders, RoleHeadersLayer};
pub use crate::http::require::{RequirePrimary, RequirePrimaryLayer};
pub use crate::role::{
    BackendError, Candidate, Holder, InFlight, NodeId, Role, RoleHandle, TermContext,
};

#[cfg(feature = "file")]
pub use crate::backend::file::FileBackend;
#[cfg(feature = "file")]
#[allow(deprecated)]
pub use crate::backend::file::FileLock;
#[cfg(feature = "file")]
pub use crate::backend::host::{HOST_DIR_ENV, HostGroup};
pub use crate::backend::memory::MemoryBackend;
