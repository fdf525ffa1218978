//! The candidate registry and reservations: what a lock knows about the nodes that wait for it,
//! so that the primary can hand the lock to the one it should (deploy-aware leadership).
//!
//! - Every node **registers** a [`Candidate`] entry with [`Lock::register`](super::Lock::register):
//!   its priority, whether it is ready to lead, whether it is draining. The entry lives as long as
//!   the node does: the backend ties it to something that dies with the node (a `flock`'d file, a
//!   key on the node's lease, a row of its session, an etcd key on its lease), so a crashed node's
//!   entry disappears without anybody deleting it. Dropping the [`Registration`] withdraws it.
//! - The primary reads the live entries ([`Lock::candidates`](super::Lock::candidates)) and waits
//!   for changes ([`Lock::watch_candidates`](super::Lock::watch_candidates)): never per request.
//! - To hand the lock to a chosen candidate the primary **reserves** it
//!   ([`Leadership::reserve`](super::Leadership::reserve)) and then releases it: until the
//!   reservation expires only that candidate's [`acquire`](super::Lock::acquire) may take the
//!   lock; after it any waiter may. The window is timed by the server (a Redis `PX`, PostgreSQL's
//!   `now()`, an etcd lease) or, on one host, by the lock file's owner, never by comparing the
//!   clocks of two hosts.
//!
//! A backend without a registry (the defaults of the trait methods) registers nobody and lists
//! nobody: the elector then never moves the lock by preference, and failover works as before.

use std::fmt;

use super::BoxFuture;
use crate::error::Error;
pub use crate::role::Candidate;

/// A node's entry in the registry, live until this is dropped (or the node dies).
///
/// The backend keeps the entry alive by itself (refreshing a key, re-inserting a row after a
/// reconnection) and withdraws it, best effort, on drop.
pub trait Registration: fmt::Debug + Send + Sync + 'static {
    /// Replaces the entry (same node): its priority, readiness or draining flag changed.
    fn update(&self, entry: Candidate) -> BoxFuture<'_, Result<(), Error>>;
}

/// The registration of a backend without a registry: nothing is kept.
#[derive(Debug)]
pub(crate) struct Unregistered;

impl Registration for Unregistered {
    fn update(&self, _entry: Candidate) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
}
