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

use serde::{Deserialize, Serialize};

use super::BoxFuture;
use crate::error::Error;

/// A candidate's entry in a lock's registry.
///
/// # Examples
///
/// ```
/// use tower_primary::backend::Candidate;
///
/// let entry = Candidate::new("web-7").with_priority(42).with_ready(true);
/// assert!(entry.is_eligible());
/// assert!(!entry.clone().with_draining(true).is_eligible());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Candidate {
    /// The node's id ([`NodeId`](crate::NodeId)); with a host group, the id of the process that
    /// campaigns for the group.
    pub node: String,
    /// Higher leads: a ready candidate with a strictly higher priority than the primary's gets
    /// the lock handed over. A build number or a deploy counter works well.
    pub priority: u64,
    /// Whether the node can serve as primary now. Only ready candidates are handover targets.
    pub ready: bool,
    /// A draining node never becomes primary; a draining primary hands over once an eligible
    /// successor exists.
    pub draining: bool,
    /// The node handed the lock away on an operator's request
    /// ([`Elector::hand_over_to`](crate::Elector::hand_over_to)): it is not the target of a
    /// preferred handover until it leads again (else the lock would come straight back).
    #[serde(default)]
    pub yielded: bool,
}

impl Candidate {
    /// An entry for `node`: priority 0, ready, not draining.
    #[must_use]
    pub fn new(node: impl Into<String>) -> Self {
        Candidate {
            node: node.into(),
            priority: 0,
            ready: true,
            draining: false,
            yielded: false,
        }
    }

    /// With `priority`.
    #[must_use]
    pub fn with_priority(mut self, priority: u64) -> Self {
        self.priority = priority;
        self
    }

    /// With `ready`.
    #[must_use]
    pub fn with_ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }

    /// With `draining`.
    #[must_use]
    pub fn with_draining(mut self, draining: bool) -> Self {
        self.draining = draining;
        self
    }

    /// With `yielded`.
    #[must_use]
    pub fn with_yielded(mut self, yielded: bool) -> Self {
        self.yielded = yielded;
        self
    }

    /// Whether the node may be handed the lock: ready and not draining.
    #[must_use]
    pub fn is_eligible(&self) -> bool {
        self.ready && !self.draining
    }
}

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
