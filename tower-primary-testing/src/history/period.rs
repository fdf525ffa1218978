//! Primary periods and writes: what a history is made of.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One primary period: `node` was primary with `term` from `start` until `end` or `deadline`,
/// whichever comes first. See the [module docs](crate::history).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Period {
    /// The node id.
    pub node: String,
    /// The fencing term.
    pub term: u64,
    /// When the node became primary, in nanoseconds.
    pub start: u64,
    /// When the node reported that it stopped being primary, if it did.
    pub end: Option<u64>,
    /// The latest instant the node could still act as primary (lease backends), if known.
    pub deadline: Option<u64>,
}

impl Period {
    /// An open period: `node` primary with `term` since `start`.
    #[must_use]
    pub fn new(node: impl Into<String>, term: u64, start: u64) -> Self {
        Period {
            node: node.into(),
            term,
            start,
            end: None,
            deadline: None,
        }
    }

    /// Sets the reported end.
    #[must_use]
    pub fn with_end(mut self, end: u64) -> Self {
        self.end = Some(end);
        self
    }

    /// Sets the deadline.
    #[must_use]
    pub fn with_deadline(mut self, deadline: u64) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// When the period ends: the earlier of the reported end and the deadline; `None` when it has
    /// neither (it lasts forever).
    ///
    /// ```
    /// use tower_primary_testing::history::Period;
    ///
    /// assert_eq!(Period::new("a", 1, 0).with_end(50).with_deadline(30).effective_end(), Some(30));
    /// assert_eq!(Period::new("a", 1, 0).effective_end(), None);
    /// ```
    #[must_use]
    pub fn effective_end(&self) -> Option<u64> {
        match (self.end, self.deadline) {
            (Some(e), Some(d)) => Some(e.min(d)),
            (e, d) => e.or(d),
        }
    }

    /// Whether the node has not reported an end (it may still be bounded by a deadline).
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.end.is_none()
    }

    /// How long the period lasted; `None` when it lasts forever.
    #[must_use]
    pub fn duration(&self) -> Option<Duration> {
        self.effective_end()
            .map(|e| Duration::from_nanos(e.saturating_sub(self.start)))
    }

    /// The effective end, with "forever" as `u64::MAX`.
    pub(super) fn until(&self) -> u64 {
        self.effective_end().unwrap_or(u64::MAX)
    }
}

/// A write a node made to a fenced witness (a downstream store that should refuse writes carrying
/// an older term than one it has seen), as the witness accepted it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Write {
    /// The node id.
    pub node: String,
    /// The term the write carried.
    pub term: u64,
    /// When it was made, in nanoseconds: when the witness accepted it, or (as
    /// [`witness::merge`](crate::witness::merge) records it) when the node checked its
    /// term just before writing.
    pub at: u64,
}

impl Write {
    /// A write by `node` with `term`, accepted at `at`.
    #[must_use]
    pub fn new(node: impl Into<String>, term: u64, at: u64) -> Self {
        Write {
            node: node.into(),
            term,
            at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_end_before_the_deadline_counts() {
        let p = Period::new("a", 1, 0).with_deadline(100).with_end(10);
        assert_eq!(p.effective_end(), Some(10));
        assert_eq!(p.duration(), Some(Duration::from_nanos(10)));
    }
}
