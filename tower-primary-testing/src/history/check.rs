//! The check of a history and its report: overlaps, terms that do not rise, stale writes.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::{History, Period, Write};

impl History {
    /// Checks the history. See [`Report`].
    #[must_use]
    pub fn check(&self) -> Report {
        let sorted = self.sorted();
        let mut report = Report {
            periods: sorted.len(),
            open: sorted
                .iter()
                .filter(|p| p.effective_end().is_none())
                .count(),
            ..Report::default()
        };

        // Overlaps: a sweep over start order; a period can only overlap later-starting ones
        // that start before it ends.
        for (i, a) in sorted.iter().enumerate() {
            for b in &sorted[i + 1..] {
                if b.start >= a.until() {
                    break;
                }
                let end = a.until().min(b.until());
                if end > b.start {
                    let length = Duration::from_nanos(end - b.start);
                    report.total_overlap = report.total_overlap.saturating_add(length);
                    report.overlaps.push(Overlap {
                        first: (*a).clone(),
                        second: (*b).clone(),
                        length,
                    });
                }
            }
        }

        // Terms: every period's term must be above every earlier-starting period's.
        let mut highest: Option<&Period> = None;
        for p in &sorted {
            match highest {
                Some(h) if p.term <= h.term => report.term_regressions.push(TermRegression {
                    earlier: h.clone(),
                    later: (*p).clone(),
                }),
                _ => highest = Some(p),
            }
        }

        // Gaps between the union of the periods.
        let mut covered_until: Option<u64> = None;
        for p in &sorted {
            if let Some(until) = covered_until
                && p.start > until
            {
                let gap = Gap {
                    from: until,
                    to: p.start,
                };
                if report
                    .longest_gap
                    .as_ref()
                    .is_none_or(|g| gap.length() > g.length())
                {
                    report.longest_gap = Some(gap);
                }
            }
            covered_until = Some(covered_until.map_or(p.until(), |u| u.max(p.until())));
        }

        // Fenced-witness writes.
        let mut writes: Vec<&Write> = self.writes.iter().collect();
        writes.sort_by_key(|w| w.at);
        let mut newest: Option<&Write> = None;
        for w in &writes {
            match newest {
                Some(n) if w.term < n.term => report.stale_writes.push(StaleWrite {
                    write: (*w).clone(),
                    newer: n.clone(),
                }),
                Some(n) if w.term == n.term => {}
                _ => newest = Some(w),
            }
        }
        let mut by_term: HashMap<(&str, u64), Vec<&Period>> = HashMap::new();
        for p in &self.periods {
            by_term
                .entry((p.node.as_str(), p.term))
                .or_default()
                .push(p);
        }
        for w in &writes {
            let inside = by_term
                .get(&(w.node.as_str(), w.term))
                .is_some_and(|ps| ps.iter().any(|p| p.start <= w.at && w.at < p.until()));
            if !inside {
                report.writes_outside_periods.push((*w).clone());
            }
        }
        report
    }

    /// Whether [`check`](Self::check) finds nothing wrong.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.check().is_ok()
    }

    /// Panics with the report and the periods if [`check`](Self::check) finds anything wrong.
    ///
    /// # Panics
    ///
    /// When the history has overlapping periods, terms that do not rise, or stale or
    /// out-of-period writes.
    #[track_caller]
    pub fn assert_ok(&self) {
        let report = self.check();
        assert!(report.is_ok(), "{report}\n{self}");
    }

    pub(super) fn sorted(&self) -> Vec<&Period> {
        let mut sorted: Vec<&Period> = self.periods.iter().collect();
        sorted.sort_by_key(|p| (p.start, p.term));
        sorted
    }
}

/// Two periods that overlap.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Overlap {
    /// The period that started first.
    pub first: Period,
    /// The period that started while `first` was still on.
    pub second: Period,
    /// How long both were on (`u64::MAX` nanoseconds when both last forever).
    pub length: Duration,
}

/// A period whose term is not above the term of a period that started before it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TermRegression {
    /// The earlier period with the highest term so far.
    pub earlier: Period,
    /// The later period, whose term is not higher.
    pub later: Period,
}

/// A time with no primary, between the end of one period and the start of the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Gap {
    /// When the last primary stopped.
    pub from: u64,
    /// When the next one started.
    pub to: u64,
}

impl Gap {
    /// How long the lock had no primary.
    #[must_use]
    pub fn length(&self) -> Duration {
        Duration::from_nanos(self.to.saturating_sub(self.from))
    }
}

/// A write accepted with a lower term than a write accepted before it: a fenced witness should
/// have refused it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StaleWrite {
    /// The stale write.
    pub write: Write,
    /// The earlier write with the higher term.
    pub newer: Write,
}

/// What [`History::check`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// How many periods were checked.
    pub periods: usize,
    /// How many periods have neither an end nor a deadline (they count as lasting forever).
    pub open: usize,
    /// Every pair of overlapping periods.
    pub overlaps: Vec<Overlap>,
    /// The sum of the overlaps' lengths.
    pub total_overlap: Duration,
    /// Every period whose term did not rise above the earlier periods' terms.
    pub term_regressions: Vec<TermRegression>,
    /// The longest time between two periods with no primary.
    pub longest_gap: Option<Gap>,
    /// Writes accepted with a term lower than an earlier accepted write's.
    pub stale_writes: Vec<StaleWrite>,
    /// Writes made at a time when their node did not hold their term.
    pub writes_outside_periods: Vec<Write>,
}

impl Report {
    /// Whether nothing is wrong: no overlap, rising terms, no stale or out-of-period write.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.overlaps.is_empty()
            && self.term_regressions.is_empty()
            && self.stale_writes.is_empty()
            && self.writes_outside_periods.is_empty()
    }

    /// Panics with the report if anything is wrong.
    ///
    /// # Panics
    ///
    /// When [`is_ok`](Self::is_ok) is false.
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(self.is_ok(), "{self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_ok() { "ok" } else { "FAILED" };
        writeln!(f, "history check {verdict}: {} periods", self.periods)?;
        if !self.overlaps.is_empty() {
            writeln!(
                f,
                "  {} overlapping pairs, {:?} in total:",
                self.overlaps.len(),
                self.total_overlap
            )?;
            for o in &self.overlaps {
                writeln!(
                    f,
                    "    {} term {} and {} term {} for {:?}",
                    o.first.node, o.first.term, o.second.node, o.second.term, o.length
                )?;
            }
        }
        for r in &self.term_regressions {
            writeln!(
                f,
                "  term did not rise: {} term {} started after {} term {}",
                r.later.node, r.later.term, r.earlier.node, r.earlier.term
            )?;
        }
        for s in &self.stale_writes {
            writeln!(
                f,
                "  stale write accepted: {} term {} after {} term {}",
                s.write.node, s.write.term, s.newer.node, s.newer.term
            )?;
        }
        for w in &self.writes_outside_periods {
            writeln!(
                f,
                "  write outside its period: {} term {} at {}",
                w.node, w.term, w.at
            )?;
        }
        if self.open > 0 {
            writeln!(f, "  {} periods never ended", self.open)?;
        }
        if let Some(g) = &self.longest_gap {
            writeln!(f, "  longest gap without a primary: {:?}", g.length())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn disjoint_periods_pass_and_the_gap_is_measured() {
        let mut h = History::new();
        h.push(Period::new("a", 1, 0).with_end(10 * MS));
        h.push(Period::new("b", 2, 15 * MS).with_end(20 * MS));
        h.push(Period::new("a", 3, 20 * MS).with_end(30 * MS));
        h.push(Period::new("c", 4, 70 * MS).with_end(80 * MS));
        let r = h.check();
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.periods, 4);
        let gap = r.longest_gap.unwrap();
        assert_eq!((gap.from, gap.to), (30 * MS, 70 * MS));
        assert_eq!(gap.length(), Duration::from_millis(40));
        h.assert_ok();
    }

    #[test]
    fn overlap_is_caught_with_its_length() {
        let mut h = History::new();
        h.start("a", 1, 0);
        h.start("b", 2, 5 * MS);
        h.end("a", 1, 8 * MS);
        h.end("b", 2, 20 * MS);
        h.start("c", 3, 18 * MS);
        h.end("c", 3, 30 * MS);
        let r = h.check();
        assert!(!r.is_ok());
        assert_eq!(r.overlaps.len(), 2);
        assert_eq!(r.overlaps[0].first.node, "a");
        assert_eq!(r.overlaps[0].second.node, "b");
        assert_eq!(r.overlaps[0].length, Duration::from_millis(3));
        assert_eq!(r.overlaps[1].length, Duration::from_millis(2));
        assert_eq!(r.total_overlap, Duration::from_millis(5));
        assert!(r.term_regressions.is_empty());
        assert!(r.to_string().contains("2 overlapping pairs"), "{r}");
    }

    #[test]
    fn periods_that_touch_do_not_overlap() {
        let mut h = History::new();
        h.push(Period::new("a", 1, 0).with_end(10));
        h.push(Period::new("b", 2, 10).with_end(20));
        h.assert_ok();
        assert_eq!(h.check().longest_gap, None);
    }

    #[test]
    fn an_open_period_lasts_forever() {
        let mut h = History::new();
        h.start("a", 1, 0);
        h.push(Period::new("b", 2, 1_000 * MS).with_end(1_001 * MS));
        let r = h.check();
        assert_eq!(r.overlaps.len(), 1);
        assert_eq!(r.open, 1);
        h.close_open(500 * MS);
        h.assert_ok();
    }

    #[test]
    fn stale_term_is_caught() {
        let mut h = History::new();
        h.push(Period::new("a", 5, 0).with_end(10));
        h.push(Period::new("b", 4, 20).with_end(30));
        h.push(Period::new("c", 6, 40).with_end(50));
        h.push(Period::new("a", 6, 60).with_end(70));
        let r = h.check();
        assert!(!r.is_ok());
        assert!(r.overlaps.is_empty());
        assert_eq!(r.term_regressions.len(), 2);
        assert_eq!(
            (
                r.term_regressions[0].earlier.term,
                r.term_regressions[0].later.term
            ),
            (5, 4)
        );
        assert_eq!(
            (
                r.term_regressions[1].earlier.term,
                r.term_regressions[1].later.term
            ),
            (6, 6)
        );
        assert_eq!(h.terms(), vec![5, 4, 6, 6]);
    }

    #[test]
    fn deadline_cuts_a_period_short_so_no_false_overlap() {
        // `a` was paused and never reported its end; its lease deadline passed at 40 ms, and `b`
        // took over at 50 ms.
        let mut h = History::new();
        h.start("a", 1, 0);
        h.extend_deadline("a", 1, 30 * MS);
        h.extend_deadline("a", 1, 40 * MS);
        h.extend_deadline("a", 1, 35 * MS); // older news: ignored
        h.start("b", 2, 50 * MS);
        h.end("b", 2, 60 * MS);
        assert_eq!(h.periods()[0].effective_end(), Some(40 * MS));
        let r = h.check();
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.longest_gap.unwrap().length(), Duration::from_millis(10));

        // A successor that started before the deadline overlaps.
        h.push(Period::new("c", 3, 39 * MS).with_end(45 * MS));
        let r = h.check();
        assert_eq!(r.overlaps.len(), 1);
        assert_eq!(r.overlaps[0].length, Duration::from_millis(1));
    }

    #[test]
    fn stale_and_out_of_period_writes_are_caught() {
        let mut h = History::new();
        h.push(Period::new("a", 1, 0).with_end(10));
        h.push(Period::new("b", 2, 20).with_end(30));
        h.write("a", 1, 5);
        h.write("b", 2, 25);
        h.assert_ok();

        h.write("a", 1, 26); // a stale primary's write, accepted after term 2's
        let r = h.check();
        assert_eq!(r.stale_writes.len(), 1);
        assert_eq!(r.stale_writes[0].newer.term, 2);
        assert_eq!(r.writes_outside_periods.len(), 1);
        assert!(!r.is_ok());
    }

    #[test]
    #[should_panic(expected = "overlapping pairs")]
    fn assert_ok_panics_on_overlap() {
        let mut h = History::new();
        h.push(Period::new("a", 1, 0).with_end(10));
        h.push(Period::new("b", 2, 5).with_end(15));
        h.assert_ok();
    }
}
