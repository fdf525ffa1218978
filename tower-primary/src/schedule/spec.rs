//! When a job runs: [`Schedule`] (an interval or a cron expression) and the [`Missed`] policy.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{
    DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeDelta, TimeZone, Utc,
};
use chrono_tz::Tz;
use cron::TimeUnitSpec;

use crate::error::ConfigError;

/// When a scheduled job runs: every interval, or on a cron expression.
///
/// See the [module docs](crate::schedule) for how cron expressions meet daylight-saving time.
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
    queue: usize,
}

#[derive(Clone)]
enum When {
    Every(TimeDelta),
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
            .field("queue", &self.queue)
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
    /// `max` may be at most [`Missed::MAX_CATCH_UP`].
    CatchUpAll {
        /// The most missed slots to run.
        max: usize,
    },
}

impl Missed {
    /// The most slots [`Missed::CatchUpAll`] may catch up at once: a larger `max` is refused by
    /// [`Elector::schedule`](crate::Elector::schedule).
    pub const MAX_CATCH_UP: usize = 10_000;

    /// How many missed slots the policy runs.
    fn keep(self) -> usize {
        match self {
            Missed::Skip => 0,
            Missed::CatchUpLatest => 1,
            Missed::CatchUpAll { max } => max.min(Missed::MAX_CATCH_UP),
        }
    }
}

/// The default of [`Schedule::queue`].
const DEFAULT_QUEUE: usize = 64;
/// The largest [`Schedule::queue`].
pub(crate) const MAX_QUEUE: usize = 65_536;

/// Where a job's progress starts the slots it owes: after the last completed slot, or from a
/// slot (inclusive) that no run has reached yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Since {
    /// Slots after this one (the last completed) are owed.
    After(DateTime<Utc>),
    /// This slot and the ones after it are owed (the first slot after the job was registered).
    From(DateTime<Utc>),
}

impl Schedule {
    /// Every `interval`, on slots aligned to multiples of `interval` since the Unix epoch (UTC), so
    /// every node computes the same slots.
    ///
    /// # Errors
    ///
    /// A zero or sub-millisecond interval.
    pub fn every(interval: Duration) -> Result<Self, ConfigError> {
        let step = TimeDelta::from_std(interval)
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
            queue: DEFAULT_QUEUE,
        })
    }

    /// On a cron expression with 6 fields (seconds first: `sec min hour day-of-month month
    /// day-of-week`) or 7 (a year last), in UTC unless [`timezone`](Self::timezone) is set. A day
    /// must match both the day-of-month and the day-of-week field.
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
            queue: DEFAULT_QUEUE,
        })
    }

    /// Reads cron expressions in the IANA time zone `name` (e.g. `"Europe/Berlin"`); see the
    /// [module docs](crate::schedule) for daylight-saving time.
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

    /// How many [`run_now`](super::ScheduleHandle::run_now) requests may wait for the job's loop
    /// (default 64, from 1 to 65 536); beyond that `run_now` answers
    /// [`RunNowError::Full`](super::RunNowError::Full).
    #[must_use]
    pub fn queue(mut self, capacity: usize) -> Self {
        self.queue = capacity;
        self
    }

    /// The capacity of the [`run_now`](super::ScheduleHandle::run_now) queue.
    #[must_use]
    pub fn queue_capacity(&self) -> usize {
        self.queue
    }

    /// Checks the settings that [`Elector::schedule`](crate::Elector::schedule) refuses.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Missed::CatchUpAll { max } = self.missed
            && max > Missed::MAX_CATCH_UP
        {
            return Err(ConfigError::InvalidSchedule {
                expr: format!("Missed::CatchUpAll {{ max: {max} }}"),
                problem: format!(
                    "catch-up must be at most {} slots (Missed::MAX_CATCH_UP)",
                    Missed::MAX_CATCH_UP
                ),
            });
        }
        if self.queue == 0 || self.queue > MAX_QUEUE {
            return Err(ConfigError::InvalidSchedule {
                expr: format!("queue({})", self.queue),
                problem: format!("the run-now queue must hold from 1 to {MAX_QUEUE} runs"),
            });
        }
        Ok(())
    }

    /// The first slot strictly after `t`; `None` when there is none (a cron expression that never
    /// matches again before 2100).
    #[must_use]
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(step) => {
                let step_ms = step.num_milliseconds();
                let ms = t.timestamp_millis();
                let next = ms
                    .div_euclid(step_ms)
                    .checked_add(1)?
                    .checked_mul(step_ms)?;
                Utc.timestamp_millis_opt(next).single()
            }
            When::Cron(c) => Cron::new(c, self.tz).next_after(t),
        }
    }

    /// The last slot at or before `t`.
    fn latest_at(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(step) => {
                let step_ms = step.num_milliseconds();
                let n = t.timestamp_millis().div_euclid(step_ms);
                Utc.timestamp_millis_opt(n.checked_mul(step_ms)?).single()
            }
            When::Cron(c) => Cron::new(c, self.tz).latest_at(t),
        }
    }

    /// The slots to run on promotion at `now`, given the last completed slot, by the missed-slot
    /// policy. Oldest first. Nothing when the job never completed a slot.
    ///
    /// The slots are found walking back from `now`, so a long outage costs no more than the
    /// slots the policy keeps (at most [`Missed::MAX_CATCH_UP`]).
    #[must_use]
    pub fn missed_slots(
        &self,
        last: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        match last {
            Some(last) => self.due(Since::After(last), now),
            None => Vec::new(),
        }
    }

    /// The owed slots up to `now` that the policy runs, oldest first.
    pub(crate) fn due(&self, since: Since, now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        self.walk_back(since, now, self.missed.keep())
    }

    /// How many owed slots passed up to `now`, counted up to `cap`.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn count_owed(&self, since: Since, now: DateTime<Utc>, cap: usize) -> usize {
        if let When::Every(step) = &self.when {
            let step_ms = step.num_milliseconds();
            let latest = now.timestamp_millis().div_euclid(step_ms);
            let first = match since {
                Since::After(t) => t.timestamp_millis().div_euclid(step_ms).saturating_add(1),
                Since::From(t) => t
                    .timestamp_millis()
                    .saturating_add(step_ms - 1)
                    .div_euclid(step_ms),
            };
            let n = latest.saturating_sub(first).saturating_add(1).max(0);
            return usize::try_from(n).unwrap_or(usize::MAX).min(cap);
        }
        self.walk_back(since, now, cap).len()
    }

    /// Up to `keep` owed slots, the latest ones up to `now`, oldest first.
    fn walk_back(&self, since: Since, now: DateTime<Utc>, keep: usize) -> Vec<DateTime<Utc>> {
        let owed = |t: DateTime<Utc>| match since {
            Since::After(last) => t > last,
            Since::From(first) => t >= first,
        };
        let mut out = Vec::new();
        let mut at = now;
        while out.len() < keep {
            let Some(slot) = self.latest_at(at).filter(|s| owed(*s)) else {
                break;
            };
            out.push(slot);
            let Some(before) = slot.checked_sub_signed(TimeDelta::nanoseconds(1)) else {
                break;
            };
            at = before;
        }
        out.reverse();
        out
    }
}

/// Slot search on a cron expression in a time zone (see the module docs for the rules).
struct Cron<'a> {
    c: &'a cron::Schedule,
    tz: Tz,
    /// The hour field is `*`: the expression follows real time through clock changes.
    real_time: bool,
}

/// A part of one local day over which the UTC offset is constant, or a gap in the local clock.
#[derive(Debug)]
enum Piece {
    /// Local times `[from, to)` (seconds of the day) are the instants `day + t - offset`.
    Span { from: u32, to: u32, offset: i64 },
    /// Local times `[from, to)` do not exist; a match among them runs at `at`.
    Gap {
        from: u32,
        to: u32,
        at: DateTime<Utc>,
    },
}

const DAY: u32 = 86_400;

/// Whole seconds of `d`, rounded down (towards the past, also for negative durations).
fn floor_secs(d: TimeDelta) -> i64 {
    d.num_seconds() - i64::from(d.subsec_nanos() < 0)
}
/// The years a cron expression can name.
const FIRST_YEAR: i32 = 1970;
const LAST_YEAR: i32 = 2100;

impl<'a> Cron<'a> {
    fn new(c: &'a cron::Schedule, tz: Tz) -> Self {
        Cron {
            c,
            tz,
            real_time: c.hours().is_all(),
        }
    }

    fn offset(&self, t: DateTime<Utc>) -> i64 {
        i64::from(
            self.tz
                .offset_from_utc_datetime(&t.naive_utc())
                .fix()
                .local_minus_utc(),
        )
    }

    /// The first instant in `(a, b]` at the offset of `b`, when the offset of `a` differs (one
    /// clock change between them).
    fn change_between(&self, a: DateTime<Utc>, b: DateTime<Utc>) -> DateTime<Utc> {
        let before = self.offset(a);
        let (mut lo, mut hi) = (a.timestamp(), b.timestamp());
        let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap_or(b);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.offset(at(mid)) == before {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        at(hi)
    }

    /// The instant of a local time: its only or first occurrence, or for a time in a gap the
    /// first instant after the gap. `None` outside chrono's range.
    fn instant(&self, local: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&local) {
            chrono::LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            chrono::LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
            chrono::LocalResult::None => {
                let as_utc = local.and_utc();
                let a = as_utc.checked_sub_signed(TimeDelta::hours(30))?;
                let b = as_utc.checked_add_signed(TimeDelta::hours(30))?;
                Some(self.change_between(a, b))
            }
        }
    }

    fn date_matches(&self, d: NaiveDate) -> bool {
        let c = self.c;
        u32::try_from(d.year()).is_ok_and(|y| c.years().includes(y))
            && c.months().includes(d.month())
            && c.days_of_month().includes(d.day())
            && c.days_of_week().includes(d.weekday().number_from_sunday())
    }

    /// The pieces of local day `d`, in the order of their instants.
    fn pieces(&self, d: NaiveDate) -> Option<Vec<Piece>> {
        let midnight = d.and_time(NaiveTime::MIN);
        let start = self.instant(midnight)?;
        let end = self.instant(d.succ_opt()?.and_time(NaiveTime::MIN))?;
        let mut pieces = Vec::with_capacity(3);
        let day = |offset: i64, t: DateTime<Utc>| {
            let secs = (t.naive_utc() - midnight).num_seconds() + offset;
            u32::try_from(secs.clamp(0, i64::from(DAY))).unwrap_or(DAY)
        };
        let first = self.offset(start);
        let begins = day(first, start);
        if begins > 0 && !self.real_time {
            // Midnight itself fell in a gap.
            pieces.push(Piece::Gap {
                from: 0,
                to: begins,
                at: start,
            });
        }
        let last = self.offset(end - TimeDelta::seconds(1));
        if first == last {
            pieces.push(Piece::Span {
                from: begins,
                to: DAY,
                offset: first,
            });
            return Some(pieces);
        }
        let change = self.change_between(start, end - TimeDelta::seconds(1));
        let (old_end, new_start) = (day(first, change), day(last, change));
        pieces.push(Piece::Span {
            from: begins,
            to: old_end,
            offset: first,
        });
        if new_start > old_end {
            // Spring forward: [old_end, new_start) does not exist.
            if !self.real_time {
                pieces.push(Piece::Gap {
                    from: old_end,
                    to: new_start,
                    at: change,
                });
            }
            pieces.push(Piece::Span {
                from: new_start,
                to: DAY,
                offset: last,
            });
        } else {
            // Fall back: [new_start, old_end) happens again; fixed times only the first time.
            let from = if self.real_time { new_start } else { old_end };
            pieces.push(Piece::Span {
                from,
                to: DAY,
                offset: last,
            });
        }
        Some(pieces)
    }

    /// The first matching second of the day in `[lo, hi)`.
    fn first_time(&self, lo: u32, hi: u32) -> Option<u32> {
        if lo >= hi {
            return None;
        }
        let (h0, m0, s0) = (lo / 3600, lo / 60 % 60, lo % 60);
        for h in self.c.hours().range(h0..=23) {
            let m_from = if h == h0 { m0 } else { 0 };
            for m in self.c.minutes().range(m_from..=59) {
                let s_from = if h == h0 && m == m0 { s0 } else { 0 };
                if let Some(s) = self.c.seconds().range(s_from..=59).next() {
                    let t = h * 3600 + m * 60 + s;
                    return (t < hi).then_some(t);
                }
            }
        }
        None
    }

    /// The last matching second of the day in `[lo, hi)`.
    fn last_time(&self, lo: u32, hi: u32) -> Option<u32> {
        if lo >= hi {
            return None;
        }
        let top = hi - 1;
        let (h0, m0, s0) = (top / 3600, top / 60 % 60, top % 60);
        for h in self.c.hours().range(0..=h0).rev() {
            let m_to = if h == h0 { m0 } else { 59 };
            for m in self.c.minutes().range(0..=m_to).rev() {
                let s_to = if h == h0 && m == m0 { s0 } else { 59 };
                if let Some(s) = self.c.seconds().range(0..=s_to).next_back() {
                    let t = h * 3600 + m * 60 + s;
                    return (t >= lo).then_some(t);
                }
            }
        }
        None
    }

    /// The instant of second `t` of a span of the day that starts (local midnight) at `midnight`.
    fn at(midnight: NaiveDateTime, t: u32, offset: i64) -> DateTime<Utc> {
        (midnight + TimeDelta::seconds(i64::from(t) - offset)).and_utc()
    }

    /// The first slot strictly after `t`.
    fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut d = t.with_timezone(&self.tz).date_naive().pred_opt()?;
        while d.year() <= LAST_YEAR {
            if !self.date_matches(d) {
                d = self.skip_forward(d)?;
                continue;
            }
            let midnight = d.and_time(NaiveTime::MIN);
            let pieces = self.pieces(d)?;
            for piece in pieces {
                match piece {
                    Piece::Span { from, to, offset } => {
                        // The first second s with midnight + s - offset > t.
                        let after = floor_secs(t.naive_utc() - midnight) + offset;
                        let lo = u32::try_from((after + 1).clamp(0, i64::from(DAY))).ok()?;
                        if let Some(s) = self.first_time(from.max(lo), to) {
                            return Some(Self::at(midnight, s, offset));
                        }
                    }
                    Piece::Gap { from, to, at } => {
                        if at > t && self.first_time(from, to).is_some() {
                            return Some(at);
                        }
                    }
                }
            }
            d = d.succ_opt()?;
        }
        None
    }

    /// The last slot at or before `t`.
    fn latest_at(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut d = t.with_timezone(&self.tz).date_naive().succ_opt()?;
        while d.year() >= FIRST_YEAR {
            if !self.date_matches(d) {
                d = self.skip_back(d)?;
                continue;
            }
            let midnight = d.and_time(NaiveTime::MIN);
            let pieces = self.pieces(d)?;
            for piece in pieces.into_iter().rev() {
                match piece {
                    Piece::Span { from, to, offset } => {
                        // The last second s with midnight + s - offset <= t.
                        let upto = floor_secs(t.naive_utc() - midnight) + offset;
                        let hi = u32::try_from((upto + 1).clamp(0, i64::from(DAY))).ok()?;
                        if let Some(s) = self.last_time(from, to.min(hi)) {
                            return Some(Self::at(midnight, s, offset));
                        }
                    }
                    Piece::Gap { from, to, at } => {
                        if at <= t && self.first_time(from, to).is_some() {
                            return Some(at);
                        }
                    }
                }
            }
            d = d.pred_opt()?;
        }
        None
    }

    /// The next day after `d` that may match: skips years and months that do not.
    fn skip_forward(&self, d: NaiveDate) -> Option<NaiveDate> {
        let year_ok = u32::try_from(d.year()).is_ok_and(|y| self.c.years().includes(y));
        if !year_ok {
            return NaiveDate::from_ymd_opt(d.year() + 1, 1, 1);
        }
        if !self.c.months().includes(d.month()) {
            return if d.month() == 12 {
                NaiveDate::from_ymd_opt(d.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(d.year(), d.month() + 1, 1)
            };
        }
        d.succ_opt()
    }

    /// The day before `d` that may match: skips years and months that do not.
    fn skip_back(&self, d: NaiveDate) -> Option<NaiveDate> {
        let year_ok = u32::try_from(d.year()).is_ok_and(|y| self.c.years().includes(y));
        if !year_ok {
            return NaiveDate::from_ymd_opt(d.year() - 1, 12, 31);
        }
        if !self.c.months().includes(d.month()) {
            return NaiveDate::from_ymd_opt(d.year(), d.month(), 1)?.pred_opt();
        }
        d.pred_opt()
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
