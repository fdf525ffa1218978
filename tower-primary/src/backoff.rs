//! Exponential backoff with jitter, shared by the elector and singleton tasks.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The next delay: uniformly in `[d/2, d]` where `d` doubles from `min` up to `max`
    /// (saturating: no setting can make it overflow).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = d.saturating_mul(2).min(self.max);
        let half = d / 2;
        let span = u64::try_from((d - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if span == 0 {
            0
        } else {
            random_u64() % span.saturating_add(1)
        };
        half.saturating_add(Duration::from_nanos(jitter))
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A non-cryptographic random number (std's per-process random hasher keys).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::clock::monotonic_nanos());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        let d2 = b.next_delay();
        assert!(d2 >= Duration::from_millis(100) && d2 <= Duration::from_millis(200));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_millis(400));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn huge_bounds_saturate_instead_of_overflowing() {
        let mut b = Backoff::new(Duration::MAX / 3, Duration::MAX);
        for _ in 0..4 {
            assert!(b.next_delay() >= Duration::MAX / 6);
        }
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        assert!(b.next_delay() >= Duration::MAX / 2);
        assert!(b.next_delay() >= Duration::MAX / 2);
    }
}
