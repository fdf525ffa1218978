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
//! // In production: `.backend(FileLock::new("/run/myapp"))`, or a backend string from a flag.
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
//! # Backends and features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `file` | yes | [`FileLock`]: `flock` on a file in a directory; one host, zero setup |
//! | `axum` | yes | axum extractors for the role |
//! | — | always | [`MemoryBackend`]: in-process, with fault injection, for tests and doctests |
//! | `full` | no | every optional part |
//!
//! A backend can be chosen at run time from a string (a flag or `TOWER_PRIMARY_BACKEND`) with
//! [`backend::from_url`].
//!
//! # Shutdown
//!
//! [`Elector::shutdown`] (and [`Elector::shutdown_signal`], the future axum's graceful shutdown
//! wants) hands the lock over in this order (DESIGN §3.5):
//!
//! 1. stop admitting primary-only work ([`RoleHandle::is_primary`] turns false);
//! 2. cancel the term ([`TermContext::cancelled`] resolves in every singleton task);
//! 3. wait for the singleton tasks and in-flight gated requests ([`TermContext::in_flight`]) up to
//!    the grace period, and abort what is left;
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
//! - **Terms strictly increase** per lock name. The file backend uses `max(stored + 1, wall-clock
//!   µs)`, so a deleted or corrupt term record still yields a higher term unless the wall clock is
//!   set back.
//! - **Fail closed.** Nothing but a successful acquisition makes a node primary; backend errors keep
//!   it secondary and are retried with backoff.
//! - **What it does not promise:** exactly-once execution. A primary that dies mid-job leaves the
//!   job half done, and the next primary runs it again: make jobs idempotent, and carry the term
//!   into downstream writes so a stale primary is refused there too. The file backend is for one
//!   host only (not NFS); a raw `fork()` without `exec` shares the lock with the child.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
mod backoff;
pub mod clock;
pub mod elector;
pub mod error;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod extract;
pub mod header;
pub mod health;
pub mod layer;
pub mod require;
pub mod role;
pub mod schedule;
mod task;
pub mod testing;

pub use crate::clock::Clock;
pub use crate::elector::{Elector, ElectorBuilder, Lease, State, terminate_signal};
pub use crate::error::{BoxError, ConfigError, Error};
#[cfg(feature = "axum")]
pub use crate::extract::{CurrentRole, PrimaryTerm, RoleRejection};
pub use crate::layer::{Primary, PrimaryLayer};
pub use crate::require::{RequirePrimary, RequirePrimaryLayer};
pub use crate::role::{Holder, InFlight, NodeId, Role, RoleHandle, TermContext};

#[cfg(feature = "file")]
pub use crate::backend::file::FileLock;
pub use crate::backend::memory::MemoryBackend;
