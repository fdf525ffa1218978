//! The judge: merges the witness log into a history and checks both.

use std::collections::HashMap;
use std::fmt;

use super::{Fence, WriteRecord};
use crate::history::{History, Period, Report};

/// The periods of `history` with what the writes in `records` show about them, and every write
/// (accepted or rejected) recorded at its `checked_at`:
///
/// - a period's deadline becomes the latest deadline its node wrote with (a node that is paused
///   or cut off never reports its end; its deadline bounds it);
/// - a period starts no later than its node's first write of the term (the writer may run before
///   the line that reports the promotion);
/// - writes of a node and term that no period covers make a period of their own, from the first
///   write to the last (the node was killed before it reported anything).
///
/// Check the result with [`History::check`] (overlaps, terms, gaps) or [`check`].
#[must_use]
pub fn merge(history: &History, records: &[WriteRecord]) -> History {
    let mut periods: Vec<Period> = history.periods().to_vec();
    let mut orphans: HashMap<(String, u64), (u64, u64, Option<u64>)> = HashMap::new();
    for r in records {
        let found = periods
            .iter_mut()
            .rev()
            .find(|p| p.node == r.node && p.term == r.term);
        match found {
            Some(p) => {
                p.start = p.start.min(r.checked_at);
                if let Some(d) = r.deadline {
                    p.deadline = Some(p.deadline.map_or(d, |old| old.max(d)));
                }
            }
            None => {
                let e = orphans.entry((r.node.clone(), r.term)).or_insert((
                    r.checked_at,
                    r.checked_at,
                    None,
                ));
                e.0 = e.0.min(r.checked_at);
                e.1 = e.1.max(r.checked_at);
                if let Some(d) = r.deadline {
                    e.2 = Some(e.2.map_or(d, |old: u64| old.max(d)));
                }
            }
        }
    }
    for ((node, term), (first, last, deadline)) in orphans {
        // Half-open periods: the last write must lie inside.
        let mut p = Period::new(node, term, first).with_end(last.saturating_add(1));
        if let Some(d) = deadline {
            p = p.with_deadline(d);
        }
        periods.push(p);
    }
    periods.sort_by_key(|p| p.start);
    let mut merged = History::new();
    for p in periods {
        merged.push(p);
    }
    for r in records {
        merged.write(&r.node, r.term, r.checked_at);
    }
    merged
}

/// What [`check`] found: the history's report and the writes sorted by what they mean.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct WitnessReport {
    /// The report of the merged history: overlaps, terms, the longest gap.
    pub history: Report,
    /// How many writes the witness accepted.
    pub accepted: usize,
    /// How many it rejected (stale terms: expected when primaries are paused).
    pub rejected: usize,
    /// Unsafe writes the witness accepted: stale writes that reached the store (violations).
    pub stale_accepted: Vec<WriteRecord>,
    /// Unsafe writes the witness rejected: a node acted as primary when it was not, and the
    /// fence caught it (violations).
    pub unsafe_rejected: Vec<WriteRecord>,
}

impl WitnessReport {
    /// Whether nothing is wrong: no overlap, rising terms and no unsafe write.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.history.overlaps.is_empty()
            && self.history.term_regressions.is_empty()
            && self.stale_accepted.is_empty()
            && self.unsafe_rejected.is_empty()
    }
}

impl fmt::Display for WitnessReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_ok() { "ok" } else { "FAILED" };
        writeln!(
            f,
            "witness check {verdict}: {} writes accepted, {} rejected as stale",
            self.accepted, self.rejected
        )?;
        for (what, writes) in [
            ("stale write accepted", &self.stale_accepted),
            (
                "write made while not primary, rejected",
                &self.unsafe_rejected,
            ),
        ] {
            for w in writes {
                writeln!(
                    f,
                    "  {what}: node {} term {} at {}",
                    w.node, w.term, w.checked_at
                )?;
            }
        }
        write!(f, "{}", self.history)
    }
}

/// Checks `history` (from [`merge`]) and classifies `records` (in the witness's order) as the
/// [module docs](crate::witness#what-is-a-violation) say.
#[must_use]
pub fn check(history: &History, records: &[WriteRecord]) -> WitnessReport {
    let report = history.check();
    let mut flagged: Vec<(&str, u64, u64)> = report
        .stale_writes
        .iter()
        .map(|s| (s.write.node.as_str(), s.write.term, s.write.at))
        .chain(
            report
                .writes_outside_periods
                .iter()
                .map(|w| (w.node.as_str(), w.term, w.at)),
        )
        .collect();
    // The fence itself, replayed over the witness's order.
    let mut fence = Fence::new();
    for r in records {
        if r.verdict.is_accepted() && !fence.offer(r.term).is_accepted() {
            flagged.push(r.key());
        }
    }
    let mut out = WitnessReport {
        accepted: records.iter().filter(|r| r.verdict.is_accepted()).count(),
        rejected: records.iter().filter(|r| !r.verdict.is_accepted()).count(),
        ..WitnessReport::default()
    };
    for r in records {
        if flagged.contains(&r.key()) {
            if r.verdict.is_accepted() {
                out.stale_accepted.push(r.clone());
            } else {
                out.unsafe_rejected.push(r.clone());
            }
        }
    }
    out.history = report;
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::history::Period;
    use crate::witness::Verdict;

    const MS: u64 = 1_000_000;

    fn accepted(node: &str, term: u64, at_ms: u64) -> WriteRecord {
        WriteRecord::new(node, term, at_ms * MS, Verdict::Accepted)
    }

    fn rejected(node: &str, term: u64, at_ms: u64, highest: u64) -> WriteRecord {
        WriteRecord::new(node, term, at_ms * MS, Verdict::Rejected { highest })
    }

    /// `a` term 1 from 0, deadline 100 ms, never reports its end (paused); `b` term 2 from 150.
    fn paused_then_replaced() -> History {
        let mut h = History::new();
        h.push(Period::new("a", 1, 0));
        h.push(Period::new("b", 2, 150 * MS).with_end(300 * MS));
        h
    }

    #[test]
    fn a_paused_primary_is_bounded_by_its_written_deadline_and_its_late_write_is_refused() {
        let records = vec![
            accepted("a", 1, 10).with_deadline(60 * MS),
            accepted("a", 1, 50).with_deadline(100 * MS),
            accepted("b", 2, 151).with_deadline(400 * MS),
            // `a` checked at 90 ms, was paused, and its write arrived after b's.
            rejected("a", 1, 90, 2).with_deadline(100 * MS),
        ];
        let merged = merge(&paused_then_replaced(), &records);
        assert_eq!(merged.periods()[0].effective_end(), Some(100 * MS));
        let report = check(&merged, &records);
        assert!(report.is_ok(), "{report}");
        assert_eq!((report.accepted, report.rejected), (3, 1));
        let gap = report.history.longest_gap.unwrap();
        assert_eq!(gap.length(), Duration::from_millis(50));

        // Without the deadlines the paused period lasts forever: an overlap.
        let no_deadlines: Vec<WriteRecord> = records
            .iter()
            .map(|r| WriteRecord::new(&r.node, r.term, r.checked_at, r.verdict))
            .collect();
        let report = check(
            &merge(&paused_then_replaced(), &no_deadlines),
            &no_deadlines,
        );
        assert_eq!(report.history.overlaps.len(), 1, "{report}");
        assert!(!report.is_ok());
    }

    #[test]
    fn overlapping_periods_are_caught() {
        let mut h = History::new();
        h.push(Period::new("a", 1, 0).with_end(100 * MS));
        h.push(Period::new("b", 2, 80 * MS).with_end(200 * MS));
        let records = vec![accepted("a", 1, 70), accepted("b", 2, 81)];
        let report = check(&merge(&h, &records), &records);
        assert_eq!(report.history.overlaps.len(), 1);
        assert_eq!(report.history.total_overlap, Duration::from_millis(20));
        assert!(!report.is_ok());
        assert!(report.to_string().contains("FAILED"), "{report}");
    }

    #[test]
    fn a_stale_write_the_witness_accepted_is_caught() {
        // `a` wrote with term 1 after its deadline (60 ms) — self-fencing failed — and before
        // `b` wrote, so the fence could not refuse it.
        let mut h = History::new();
        h.push(Period::new("a", 1, 0));
        h.push(Period::new("b", 2, 70 * MS).with_end(200 * MS));
        let records = vec![
            accepted("a", 1, 10).with_deadline(60 * MS),
            accepted("a", 1, 65).with_deadline(60 * MS),
            accepted("b", 2, 80),
        ];
        let report = check(&merge(&h, &records), &records);
        assert!(report.history.overlaps.is_empty(), "{report}");
        assert_eq!(report.stale_accepted.len(), 1, "{report}");
        assert_eq!(report.stale_accepted[0].checked_at, 65 * MS);
        assert!(report.unsafe_rejected.is_empty());
        assert!(!report.is_ok());
    }

    #[test]
    fn a_lower_term_checked_after_a_higher_one_is_unsafe_even_inside_its_period() {
        // The history missed that `a` lost its term (no deadline, no end): its write checked
        // after b's is caught by the order of the checks, whether the fence took it or not.
        let mut h = History::new();
        h.push(Period::new("a", 1, 0).with_end(500 * MS));
        h.push(Period::new("b", 2, 100 * MS).with_end(500 * MS));
        let records = vec![
            accepted("b", 2, 101),
            rejected("a", 1, 102, 2),
            accepted("a", 1, 103), // a broken fence: accepted after term 2
        ];
        let report = check(&merge(&h, &records), &records);
        assert_eq!(report.unsafe_rejected.len(), 1, "{report}");
        assert_eq!(report.stale_accepted.len(), 1, "{report}");
        assert_eq!(report.stale_accepted[0].checked_at, 103 * MS);
    }

    #[test]
    fn a_broken_fence_is_caught_from_the_log_alone() {
        // Check order is fine (a's write was checked first), but the witness accepted term 1
        // after it had accepted term 2.
        let mut h = History::new();
        h.push(Period::new("a", 1, 0).with_end(100 * MS));
        h.push(Period::new("b", 2, 100 * MS).with_end(200 * MS));
        let records = vec![accepted("b", 2, 150), accepted("a", 1, 50)];
        let report = check(&merge(&h, &records), &records);
        assert_eq!(report.stale_accepted.len(), 1, "{report}");
        assert_eq!(report.stale_accepted[0].node, "a");
    }

    #[test]
    fn writes_extend_a_period_back_and_make_one_when_none_was_reported() {
        let mut h = History::new();
        h.push(Period::new("a", 1, 10 * MS).with_end(100 * MS));
        let records = vec![
            accepted("a", 1, 9),
            accepted("c", 3, 300),
            accepted("c", 3, 302),
        ];
        let merged = merge(&h, &records);
        assert_eq!(merged.periods()[0].start, 9 * MS);
        assert_eq!(merged.periods()[1].node, "c");
        assert_eq!(merged.periods()[1].start, 300 * MS);
        let report = check(&merged, &records);
        assert!(report.is_ok(), "{report}");
        assert_eq!(
            report.history.longest_gap.unwrap().length(),
            Duration::from_millis(200)
        );
    }
}
