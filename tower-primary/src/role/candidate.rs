//! A node's entry in a lock's candidate registry.

use serde::{Deserialize, Serialize};

/// A candidate's entry in a lock's registry.
///
/// # Examples
///
/// ```
/// use tower_primary::Candidate;
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
    /// ([`Elector::hand_over_to`](crate::Elector::hand_over_to)): until it leads again, no
    /// primary hands the lock over by preference (else it would not stay where the operator put
    /// it).
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
