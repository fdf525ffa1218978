//! [`Lease`]: the lease of a lease backend, part of the backend contract.

use std::time::Duration;

use crate::clock::Timestamp;
use crate::error::{ConfigError, at_most_a_day};

/// The lease of a lease backend (Redis, etcd): how long the lock stays held without renewal, and
/// the safety margin the primary stops acting before it.
///
/// A primary acts only until `send time of the last confirmed renewal + ttl - margin`.
/// Backends renew every `ttl / 3`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_primary::Lease;
///
/// let lease = Lease::new(Duration::from_secs(10));
/// assert_eq!(lease.margin(), Duration::from_secs(1));
/// assert_eq!(lease.renew_every(), Duration::from_secs(10) / 3);
/// let lease = lease.with_margin(Duration::from_millis(500));
/// assert_eq!(lease.margin(), Duration::from_millis(500));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    ttl: Duration,
    margin: Duration,
}

impl Lease {
    /// The default lease: 5 s, margin 0.5 s, renewed every 1.67 s. A crash costs what is left of
    /// the holder's lease (up to 5 s); a holder keeps its term through a backend stall of up to
    /// about 2.8 s. GUARANTEES.md, at the root of the repository, gives the reasons.
    pub const DEFAULT: Lease = Lease {
        ttl: Duration::from_secs(5),
        margin: Duration::from_millis(500),
    };

    /// A lease of `ttl`, with a margin of `ttl / 10`.
    #[must_use]
    pub fn new(ttl: Duration) -> Self {
        Lease {
            ttl,
            margin: ttl / 10,
        }
    }

    /// Sets the margin. It must be longer than zero and shorter than `ttl / 3`.
    #[must_use]
    pub fn with_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// The time to live.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The safety margin.
    #[must_use]
    pub fn margin(&self) -> Duration {
        self.margin
    }

    /// How often backends renew: `ttl / 3`.
    #[must_use]
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// The deadline of a term whose latest confirmed renewal was sent at `sent`.
    #[must_use]
    pub fn deadline_after(&self, sent: Timestamp) -> Timestamp {
        sent.saturating_add(self.ttl).saturating_sub(self.margin)
    }

    /// Checks the lease against a backend's minimum.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidTiming`] naming the rule broken.
    pub fn validate(&self, min: Duration) -> Result<(), ConfigError> {
        if self.ttl < min || self.ttl.is_zero() {
            return Err(ConfigError::InvalidTiming {
                setting: "lease",
                value: self.ttl,
                rule: format!("must be at least {min:?} on this backend"),
            });
        }
        at_most_a_day("lease", self.ttl)?;
        if self.margin.is_zero() {
            return Err(ConfigError::InvalidTiming {
                setting: "lease margin",
                value: self.margin,
                rule: "must be longer than zero: a primary must stop acting before its lease \
                       can expire"
                    .to_owned(),
            });
        }
        if self.margin >= self.ttl / 3 {
            return Err(ConfigError::InvalidTiming {
                setting: "lease margin",
                value: self.margin,
                rule: format!(
                    "must be shorter than a third of the lease ({:?})",
                    self.ttl / 3
                ),
            });
        }
        Ok(())
    }
}

impl Default for Lease {
    fn default() -> Self {
        Lease::DEFAULT
    }
}
