//! The clock that deadlines are read on.
//!
//! A lease backend's primary must stop acting once its lease could have expired. The
//! elector, [`RoleHandle::is_primary`](crate::RoleHandle::is_primary) and
//! [`TermContext::is_valid`](crate::TermContext::is_valid) all compare against a deadline read on
//! one [`Clock`]:
//!
//! - [`Clock::system`] (the default) counts while the machine is suspended (`CLOCK_BOOTTIME` on
//!   Linux), so a host that slept through its lease sees it expired on waking;
//! - [`Clock::tokio`] follows tokio's clock, so a test on tokio's paused clock can
//!   advance time (`tokio::time::advance`) and see timers and `is_primary()` agree.
//!
//! Backends report the send time of every confirmed renewal on the clock they are handed in
//! [`AcquireRequest`](crate::backend::AcquireRequest).

use std::fmt;
use std::time::Duration;

/// A point on a [`Clock`], in nanoseconds from the clock's origin.
///
/// Timestamps of different clocks are not comparable.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The origin of the clock.
    pub const ZERO: Timestamp = Timestamp(0);
    /// A point that is never reached.
    pub const NEVER: Timestamp = Timestamp(u64::MAX);

    /// A timestamp `nanos` nanoseconds after the clock's origin.
    #[must_use]
    pub const fn from_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    /// Nanoseconds since the clock's origin.
    #[must_use]
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating at [`Timestamp::NEVER`].
    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Self {
        let d = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(d))
    }

    /// `self - d`, saturating at [`Timestamp::ZERO`].
    #[must_use]
    pub fn saturating_sub(self, d: Duration) -> Self {
        let d = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_sub(d))
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    #[must_use]
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Timestamp::NEVER {
            f.write_str("Timestamp(never)")
        } else {
            write!(f, "Timestamp({:?})", Duration::from_nanos(self.0))
        }
    }
}

/// The clock deadlines are read on. See the [module docs](self).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_primary::Clock;
///
/// let clock = Clock::system();
/// let a = clock.now();
/// let b = clock.now();
/// assert!(b >= a);
/// assert!(a.saturating_add(Duration::from_secs(1)) > b);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    System,
    Tokio(tokio::time::Instant),
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl Clock {
    /// The production clock: `CLOCK_BOOTTIME`, which keeps counting while the machine is
    /// suspended.
    #[must_use]
    pub const fn system() -> Self {
        Clock { kind: Kind::System }
    }

    /// tokio's clock, for tests on tokio's paused clock (`#[tokio::test(start_paused = true)]`).
    ///
    /// # Panics
    ///
    /// Panics when called outside a tokio runtime with the time driver enabled.
    #[must_use]
    pub fn tokio() -> Self {
        Clock {
            kind: Kind::Tokio(tokio::time::Instant::now()),
        }
    }

    /// Whether this clock follows tokio's clock.
    #[must_use]
    pub const fn is_tokio(&self) -> bool {
        matches!(self.kind, Kind::Tokio(_))
    }

    /// The current time.
    #[must_use]
    pub fn now(&self) -> Timestamp {
        match self.kind {
            Kind::System => {
                // CLOCK_BOOTTIME cannot fail on Linux for a valid clock id; fall back to the
                // monotonic clock (which only undercounts during suspend) elsewhere.
                let ts = nix::time::clock_gettime(boot_clock())
                    .or_else(|_| nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC))
                    .unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
                let d = Duration::from(ts);
                Timestamp(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            }
            Kind::Tokio(origin) => {
                let d = tokio::time::Instant::now().saturating_duration_since(origin);
                // Start at 1 ns so that a real instant is never ZERO (ZERO means "not primary").
                Timestamp(
                    u64::try_from(d.as_nanos())
                        .unwrap_or(u64::MAX)
                        .saturating_add(1),
                )
            }
        }
    }

    /// The tokio instant at which this clock reads `at`, for timers.
    ///
    /// On the system clock this is an estimate (tokio's clock stops during suspend); it only
    /// decides when the elector wakes up, never whether a deadline has passed.
    #[must_use]
    pub fn to_tokio_instant(&self, at: Timestamp) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let far = now + Duration::from_secs(86_400 * 365);
        if at == Timestamp::NEVER {
            return far;
        }
        match self.kind {
            Kind::System => {
                let ahead = at.saturating_duration_since(self.now());
                now.checked_add(ahead).unwrap_or(far)
            }
            Kind::Tokio(origin) => origin
                .checked_add(Duration::from_nanos(at.0.saturating_sub(1)))
                .unwrap_or(far),
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn boot_clock() -> nix::time::ClockId {
    nix::time::ClockId::CLOCK_BOOTTIME
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn boot_clock() -> nix::time::ClockId {
    nix::time::ClockId::CLOCK_MONOTONIC
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable between processes on one host, used to timestamp
/// events in multi-process tests and benchmarks.
#[must_use]
pub fn monotonic_nanos() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| u64::try_from(Duration::from(ts).as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = Clock::tokio();
        let a = clock.now();
        assert_ne!(a, Timestamp::ZERO);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            clock.now().saturating_duration_since(a),
            Duration::from_secs(3)
        );
        let at = a.saturating_add(Duration::from_secs(5));
        let inst = clock.to_tokio_instant(at);
        tokio::time::sleep_until(inst).await;
        assert_eq!(clock.now(), at);
    }

    #[test]
    fn system_clock_is_monotonic() {
        let clock = Clock::system();
        let a = clock.now();
        let b = clock.now();
        assert!(b >= a);
        assert!(a > Timestamp::ZERO);
    }
}
