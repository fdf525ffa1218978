//! When a job runs: [`Schedule`] (an interval or a cron expression) and the [`Missed`] policy.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::error::ConfigError;

/// How many slots the catch-up computation looks at, at most, to bound the work after a long
/// outage of a frequent schedule.
const MAX_SCAN: usize = 100_000;

/// When a scheduled job runs: every interval, or on a cron expression.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_primary::schedule::{Missed, Schedule};
///
/// let hourly = Schedule::every(Duration::from_secs(3600)).unwrap();
/// let daily = Schedule::cron("0 0 8 * * *").unwrap().timezone("Europe/Berlin").unwrap();
/// let careful = daily.missed(Missed::CatchUpAll { max: 3 });
/// assert!(Schedule::cron("not cron").is_err());
/// assert!(Schedule::every(Duration::ZERO).is_err());
/// # let _ = (hourly, careful);
/// ```
#[derive(Clone)]
pub struct Schedule {
    when: When,
    tz: Tz,
    missed: Missed,
}

#[derive(Clone)]
enum When {
    Every(chrono::TimeDelta),
    Cron(Box<cron::Schedule>),
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Schedule");
        match &self.when {
            When::Every(step) => d.field("every", step),
            When::Cron(c) => d.field("cron", &c.source()),
        };
        d.field("timezone", &self.tz.name())
            .field("missed", &self.missed)
            .finish()
    }
}

/// What a new primary does about slots that passed while no primary ran them (and what any
/// primary does about slots that passed while one of its runs was still going).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Missed {
    /// Run none of them; wait for the next slot.
    Skip,
    /// Run the latest missed slot once (the default).
    #[default]
    CatchUpLatest,
    /// Run each missed slot, oldest first, at most `max` of them (the latest `max`).
    CatchUpAll {
        /// The most missed slots to run.
        max: usize,
    },
}

impl Schedule {
    /// Every `interval`, on slots aligned to multiples of `interval` since the Unix epoch (UTC), so
    /// every node computes the same slots.
    ///
    /// # Errors
    ///
    /// A zero or sub-millisecond interval.
    pub fn every(interval: Duration) -> Result<Self, ConfigError> {
        let step = chrono::TimeDelta::from_std(interval)
            .ok()
            .filter(|d| d.num_milliseconds() >= 1)
            .ok_or_else(|| ConfigError::InvalidTiming {
                setting: "schedule interval",
                value: interval,
                rule: "must be at least 1 ms".to_owned(),
            })?;
        Ok(Schedule {
            when: When::Every(step),
            tz: Tz::UTC,
            missed: Missed::default(),
        })
    }

    /// On a cron expression with 6 fields (seconds first: `sec min hour day-of-month month
    /// day-of-week`) or 7 (a year last), in UTC unless [`timezone`](Self::timezone) is set.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidSchedule`] with the parser's message.
    pub fn cron(expr: &str) -> Result<Self, ConfigError> {
        let parsed = cron::Schedule::from_str(expr).map_err(|e| ConfigError::InvalidSchedule {
            expr: expr.to_owned(),
            problem: e.to_string(),
        })?;
        Ok(Schedule {
            when: When::Cron(Box::new(parsed)),
            tz: Tz::UTC,
            missed: Missed::default(),
        })
    }

    /// Reads cron expressions in the IANA time zone `name` (e.g. `"Europe/Berlin"`).
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidSchedule`] for an unknown zone.
    pub fn timezone(mut self, name: &str) -> Result<Self, ConfigError> {
        self.tz = name.parse().map_err(|_| ConfigError::InvalidSchedule {
            expr: name.to_owned(),
            problem: "unknown time zone".to_owned(),
        })?;
        Ok(self)
    }

    /// Sets the missed-slot policy (default [`Missed::CatchUpLatest`]).
    #[must_use]
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// The missed-slot policy.
    #[must_use]
    pub fn missed_policy(&self) -> Missed {
        self.missed
    }

    /// The first slot strictly after `t`.
    #[must_use]
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(step) => {
                let step_ms = step.num_milliseconds();
                let ms = t.timestamp_millis();
                let next = (ms.div_euclid(step_ms) + 1).checked_mul(step_ms)?;
                Utc.timestamp_millis_opt(next).single()
            }
            When::Cron(c) => c
                .after(&t.with_timezone(&self.tz))
                .next()
                .map(|d| d.with_timezone(&Utc)),
        }
    }

    /// The slots to run on promotion at `now`, given the last completed slot, by the missed-slot
    /// policy. Oldest first. Nothing when the job never completed a slot (it starts with the next).
    #[must_use]
    pub fn missed_slots(
        &self,
        last: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        let Some(last) = last else {
            return Vec::new();
        };
        let keep = match self.missed {
            Missed::Skip => return Vec::new(),
            Missed::CatchUpLatest => 1,
            Missed::CatchUpAll { max } => max,
        };
        if keep == 0 {
            return Vec::new();
        }
        let mut out = std::collections::VecDeque::with_capacity(keep.min(64));
        match &self.when {
            When::Every(step) => {
                let step_ms = step.num_milliseconds();
                let latest = now.timestamp_millis().div_euclid(step_ms);
                let first = last.timestamp_millis().div_euclid(step_ms) + 1;
                let from = first.max(latest - i64::try_from(keep).unwrap_or(i64::MAX) + 1);
                for n in from..=latest {
                    if let Some(t) = n
                        .checked_mul(step_ms)
                        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
                    {
                        out.push_back(t);
                    }
                }
            }
            When::Cron(c) => {
                for t in c.after(&last.with_timezone(&self.tz)).take(MAX_SCAN) {
                    let t = t.with_timezone(&Utc);
                    if t > now {
                        break;
                    }
                    if out.len() == keep {
                        out.pop_front();
                    }
                    out.push_back(t);
                }
            }
        }
        out.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn interval_slots_are_aligned_to_the_epoch() {
        let s = Schedule::every(Duration::from_secs(60)).unwrap();
        assert_eq!(
            s.next_after(at("2026-11-30T08:00:30Z")),
            Some(at("2026-11-30T08:01:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-11-30T08:01:00Z")),
            Some(at("2026-11-30T08:02:00Z"))
        );
    }

    #[test]
    fn cron_reads_seconds_and_time_zones() {
        let utc = Schedule::cron("0 0 8 * * *").unwrap();
        assert_eq!(
            utc.next_after(at("2026-11-30T08:00:00Z")),
            Some(at("2026-12-01T08:00:00Z"))
        );
        let berlin = utc.clone().timezone("Europe/Berlin").unwrap();
        assert_eq!(
            berlin.next_after(at("2026-11-30T06:00:00Z")),
            Some(at("2026-11-30T07:00:00Z"))
        );
        assert!(utc.timezone("Mars/Olympus").is_err());
    }

    #[test]
    fn missed_slot_policies() {
        let last = Some(at("2026-11-30T08:00:00Z"));
        let now = at("2026-11-30T08:05:30Z");
        let every = Schedule::every(Duration::from_secs(60)).unwrap();
        assert!(
            every
                .clone()
                .missed(Missed::Skip)
                .missed_slots(last, now)
                .is_empty()
        );
        assert_eq!(
            every.missed_slots(last, now),
            vec![at("2026-11-30T08:05:00Z")]
        );
        assert_eq!(
            every
                .clone()
                .missed(Missed::CatchUpAll { max: 10 })
                .missed_slots(last, now)
                .len(),
            5
        );
        assert_eq!(
            every
                .clone()
                .missed(Missed::CatchUpAll { max: 2 })
                .missed_slots(last, now),
            vec![at("2026-11-30T08:04:00Z"), at("2026-11-30T08:05:00Z")]
        );
        assert!(every.missed_slots(None, now).is_empty());

        let cron = Schedule::cron("0 * * * * *")
            .unwrap()
            .missed(Missed::CatchUpAll { max: 2 });
        assert_eq!(
            cron.missed_slots(last, now),
            vec![at("2026-11-30T08:04:00Z"), at("2026-11-30T08:05:00Z")]
        );
        // Nothing missed when the last slot is the latest.
        assert!(
            cron.missed_slots(Some(at("2026-11-30T08:05:00Z")), now)
                .is_empty()
        );
    }
}
