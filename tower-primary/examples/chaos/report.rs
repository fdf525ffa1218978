//! What a run shows: the primary periods (from the nodes' events and the witness's writes), the
//! checks, failover times per fault kind, and the tables and last line that say it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use tower_primary_lab::node::{self, Event, EventKind, NodeSignal};
use tower_primary_testing::history::{History, Period};
use tower_primary_testing::witness::{self, WitnessReport, WriteRecord};

use crate::nemesis::{Fault, FaultKind};

/// Everything a run recorded.
#[derive(Debug, Default)]
pub(crate) struct RunData {
    /// The nodes' events and the parent's signals.
    pub(crate) events: Vec<Event>,
    /// The witness's log, in its order.
    pub(crate) records: Vec<WriteRecord>,
    /// The faults, in order.
    pub(crate) faults: Vec<Fault>,
    /// The time the first node was started (`CLOCK_MONOTONIC` ns): the timeline's zero.
    pub(crate) origin: u64,
    /// When the nodes were stopped.
    pub(crate) end: u64,
    /// The lease of lease backends (the longest, when nodes run different leases).
    pub(crate) lease: Option<Duration>,
    /// When the last fault was over (`CLOCK_MONOTONIC` ns): periods that end later were ended
    /// by the run's end.
    pub(crate) faults_end: u64,
    /// How long after a fault a primary period may still end because of it (the fault's effect
    /// reaches the node no later than a lease or detection time after the fault is over).
    pub(crate) slack: Duration,
    /// The documented bound on the time without a primary once a fault is over, and what it is.
    pub(crate) bound: Duration,
    pub(crate) bound_what: String,
}

/// Failover times after the faults of one kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct KindStats {
    /// Faults injected.
    pub(crate) injected: usize,
    /// Faults that hit the primary (for a restart: while there was one).
    pub(crate) on_primary: usize,
    /// Milliseconds from a fault on the primary to the next term's start, when one started
    /// before the next fault on a primary.
    pub(crate) failover_ms: Vec<f64>,
}

/// What a run shows.
#[derive(Debug)]
pub(crate) struct Analysis {
    /// The merged history.
    pub(crate) history: History,
    /// The checks.
    pub(crate) report: WitnessReport,
    /// How many times a new term began after the first.
    pub(crate) failovers: usize,
    /// Failover times per fault kind.
    pub(crate) per_kind: BTreeMap<FaultKind, KindStats>,
    /// Periods of a lease backend with no deadline written, bounded by their SIGSTOP + lease.
    pub(crate) bounded_by_stop: usize,
    /// Periods that ended although no fault touched their node or the server around then.
    pub(crate) ended_without_fault: Vec<Period>,
    /// Terms that ended in a planned handover (the node's `handing-over` line).
    pub(crate) handovers: usize,
    /// Every time without a primary, `(from, to)` in `CLOCK_MONOTONIC` ns.
    pub(crate) gaps: Vec<(u64, u64)>,
    /// The longest time without a primary after the last fault before it was over, and when
    /// that gap began.
    pub(crate) longest_after_fault: Option<(Duration, u64)>,
}

impl Analysis {
    /// The number of overlapping pairs of periods.
    pub(crate) fn overlaps(&self) -> usize {
        self.report.history.overlaps.len()
    }

    /// The longest time without a primary, in ms.
    pub(crate) fn max_gap_ms(&self) -> f64 {
        self.report
            .history
            .longest_gap
            .map_or(0.0, |g| g.length().as_secs_f64() * 1e3)
    }

    /// Whether the run broke an invariant.
    pub(crate) fn violated(&self) -> bool {
        !self.report.is_ok()
    }
}

/// Builds the history of a run and checks it.
///
/// The periods come from the nodes' events ([`node::history`]); then:
/// - a period that ended at the parent's `SIGKILL` (stamped just before `kill(2)`) lasts until
///   its node's last write if that is later: the process was still running, and primary;
/// - the witness's writes add deadlines and earliest starts ([`witness::merge`]);
/// - on a lease backend, a period whose node was stopped and that no write gave a deadline is
///   bounded by the stop plus the lease (the deadline cannot be later: it is a renewal's send time
///   plus the lease minus a margin, and no renewal is sent while stopped).
pub(crate) fn analyse(data: &RunData) -> Analysis {
    let base = node::history(&data.events);
    let mut kills: HashMap<String, Vec<u64>> = HashMap::new();
    let mut stops: HashMap<String, Vec<u64>> = HashMap::new();
    for e in &data.events {
        match e.kind {
            EventKind::Signalled {
                signal: NodeSignal::Kill,
            } => kills.entry(e.pid.to_string()).or_default().push(e.at),
            EventKind::Signalled {
                signal: NodeSignal::Stop,
            } => stops.entry(e.pid.to_string()).or_default().push(e.at),
            _ => {}
        }
    }
    let mut last_write: HashMap<(&str, u64), u64> = HashMap::new();
    for r in &data.records {
        let w = last_write.entry((r.node.as_str(), r.term)).or_insert(0);
        *w = (*w).max(r.checked_at);
    }
    let mut adjusted = History::new();
    for p in base.periods() {
        let mut p = p.clone();
        if let Some(end) = p.end
            && kills.get(&p.node).is_some_and(|k| k.contains(&end))
            && let Some(&w) = last_write.get(&(p.node.as_str(), p.term))
        {
            p.end = Some(end.max(w + 1));
        }
        adjusted.push(p);
    }
    let merged = witness::merge(&adjusted, &data.records);

    let mut bounded_by_stop = 0;
    let history = match data.lease {
        None => merged,
        Some(lease) => {
            let lease_ns = u64::try_from(lease.as_nanos()).unwrap_or(u64::MAX);
            let mut h = History::new();
            for p in merged.periods() {
                let mut p: Period = p.clone();
                if p.deadline.is_none() {
                    let until = p.end.unwrap_or(u64::MAX);
                    if let Some(&s) = stops
                        .get(&p.node)
                        .and_then(|s| s.iter().find(|&&s| s >= p.start && s < until))
                    {
                        p.deadline = Some(s.saturating_add(lease_ns));
                        bounded_by_stop += 1;
                    }
                }
                h.push(p);
            }
            for w in merged.writes() {
                h.write(&w.node, w.term, w.at);
            }
            h
        }
    };
    let report = witness::check(&history, &data.records);

    let mut starts: Vec<&Period> = history.periods().iter().collect();
    starts.sort_by_key(|p| p.start);
    let failovers = starts.len().saturating_sub(1);
    let mut per_kind: BTreeMap<FaultKind, KindStats> = BTreeMap::new();
    for (i, f) in data.faults.iter().enumerate() {
        let stats = per_kind.entry(f.kind).or_default();
        stats.injected += 1;
        let Some(term) = f.primary_term else { continue };
        stats.on_primary += 1;
        // The failover it caused comes before the next fault that hits a primary.
        let next_fault = data.faults[i + 1..]
            .iter()
            .find(|n| n.primary_term.is_some())
            .map_or(u64::MAX, |n| n.at);
        if let Some(p) = starts
            .iter()
            .find(|p| p.term > term && p.start >= f.at && p.start < next_fault)
        {
            stats.failover_ms.push((p.start - f.at) as f64 / 1e6);
        }
    }
    let slack = u64::try_from(data.slack.as_nanos()).unwrap_or(u64::MAX);
    let before = 100_000_000; // a signal is stamped just before kill(2)
    // A planned handover (a higher priority, a drain) ends a term without a fault on purpose:
    // the node printed `handing-over <term>` for it.
    let handed_over = |p: &Period| {
        data.events.iter().any(|e| {
            e.pid.to_string() == p.node
                && matches!(e.kind, EventKind::HandingOver { term, .. } if term == p.term)
        })
    };
    let handovers = history.periods().iter().filter(|p| handed_over(p)).count();
    let ended_without_fault = history
        .periods()
        .iter()
        .filter(|p| {
            let Some(end) = p.end else { return false };
            if end >= data.faults_end || handed_over(p) {
                return false;
            }
            !data.faults.iter().any(|f| {
                let touched = f.kind.hits_server()
                    || [f.pid, f.also]
                        .iter()
                        .flatten()
                        .any(|pid| pid.to_string() == p.node);
                touched
                    && end.saturating_add(before) >= f.at
                    && end <= f.until.saturating_add(slack)
            })
        })
        .cloned()
        .collect();

    let mut gaps = Vec::new();
    let mut covered: Option<u64> = None;
    for p in &starts {
        if let Some(c) = covered
            && p.start > c
        {
            gaps.push((c, p.start));
        }
        let end = p.effective_end().unwrap_or(u64::MAX);
        covered = Some(covered.map_or(end, |c| c.max(end)));
    }
    let longest_after_fault = gaps
        .iter()
        .map(|&(from, to)| {
            let healed = data
                .faults
                .iter()
                .filter(|f| f.at <= to)
                .map(|f| f.until)
                .max()
                .unwrap_or(0);
            (
                Duration::from_nanos(to.saturating_sub(from.max(healed))),
                from,
            )
        })
        .max();
    Analysis {
        history,
        report,
        failovers,
        per_kind,
        bounded_by_stop,
        ended_without_fault,
        handovers,
        gaps,
        longest_after_fault,
    }
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// The summary table.
pub(crate) fn summary(data: &RunData, a: &Analysis) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "fault", "injected", "on primary", "failovers", "p50 ms", "p99 ms", "max ms"
    );
    for (kind, s) in &a.per_kind {
        let mut v = s.failover_ms.clone();
        v.sort_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "{:<14} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9}",
            kind.as_str(),
            s.injected,
            s.on_primary,
            v.len(),
            ms(percentile(&v, 50.0)),
            ms(percentile(&v, 99.0)),
            ms(v.last().copied()),
        );
    }
    let r = &a.report;
    let h = &r.history;
    let terms = a.history.terms();
    let lengths: Vec<f64> = {
        let mut v: Vec<f64> = a
            .history
            .periods()
            .iter()
            .filter_map(|p| p.duration())
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let _ = writeln!(out);
    let row = |out: &mut String, what: &str, value: String| {
        let _ = writeln!(out, "{what:<54} {value}");
    };
    row(
        &mut out,
        "primary periods (one per term)",
        format!(
            "{} (terms {}..{}; length p50 {} ms, max {} ms)",
            h.periods,
            terms
                .first()
                .map_or_else(|| "-".into(), ToString::to_string),
            terms.last().map_or_else(|| "-".into(), ToString::to_string),
            ms(percentile(&lengths, 50.0)),
            ms(lengths.last().copied()),
        ),
    );
    row(
        &mut out,
        "failovers (new terms after the first)",
        a.failovers.to_string(),
    );
    row(
        &mut out,
        "terms rising in time",
        if h.term_regressions.is_empty() {
            "yes".to_owned()
        } else {
            format!("NO: {} regressions", h.term_regressions.len())
        },
    );
    row(
        &mut out,
        "overlapping primary periods",
        format!(
            "{} (total {:.3} ms)",
            h.overlaps.len(),
            h.total_overlap.as_secs_f64() * 1e3
        ),
    );
    let bound_ms = data.bound.as_secs_f64() * 1e3;
    row(
        &mut out,
        "longest time without a primary",
        match h.longest_gap {
            Some(g) => format!(
                "{:.1} ms (from {:.3} s); documented bound {bound_ms:.0} ms once the fault \
                 is over ({})",
                g.length().as_secs_f64() * 1e3,
                g.from.saturating_sub(data.origin) as f64 / 1e9,
                data.bound_what
            ),
            None => "-".to_owned(),
        },
    );
    row(
        &mut out,
        "longest time without a primary after a fault was over",
        match a.longest_after_fault {
            Some((d, from)) => format!(
                "{:.1} ms (of {} gaps; that one from {:.3} s); documented bound {bound_ms:.0} ms{}",
                d.as_secs_f64() * 1e3,
                a.gaps.len(),
                from.saturating_sub(data.origin) as f64 / 1e9,
                if d > data.bound {
                    " — OVER THE BOUND"
                } else {
                    ""
                }
            ),
            None => "-".to_owned(),
        },
    );
    row(
        &mut out,
        "terms handed over (a higher priority, a drain)",
        a.handovers.to_string(),
    );
    row(
        &mut out,
        "terms that ended without a fault (goal 0)",
        a.ended_without_fault.len().to_string(),
    );
    row(&mut out, "witness writes accepted", r.accepted.to_string());
    row(
        &mut out,
        "stale-term writes rejected (expected under pauses)",
        r.rejected.to_string(),
    );
    row(
        &mut out,
        "stale writes accepted (violation)",
        r.stale_accepted.len().to_string(),
    );
    row(
        &mut out,
        "writes while not primary, rejected (violation)",
        r.unsafe_rejected.len().to_string(),
    );
    if a.bounded_by_stop > 0 {
        row(
            &mut out,
            "periods bounded by SIGSTOP + lease (no deadline)",
            a.bounded_by_stop.to_string(),
        );
    }
    for o in &h.overlaps {
        let _ = writeln!(
            out,
            "OVERLAP: pid {} term {} [{}] and pid {} term {} [{}] for {:?}",
            o.first.node,
            o.first.term,
            span(&o.first, data.origin),
            o.second.node,
            o.second.term,
            span(&o.second, data.origin),
            o.length
        );
    }
    for p in &a.ended_without_fault {
        let _ = writeln!(
            out,
            "ENDED WITHOUT A FAULT: pid {} term {} [{}]",
            p.node,
            p.term,
            span(p, data.origin)
        );
    }
    for t in &h.term_regressions {
        let _ = writeln!(
            out,
            "TERM DID NOT RISE: pid {} term {} started after pid {} term {}",
            t.later.node, t.later.term, t.earlier.node, t.earlier.term
        );
    }
    for (what, writes) in [
        ("STALE WRITE ACCEPTED", &r.stale_accepted),
        ("WRITE WHILE NOT PRIMARY (rejected)", &r.unsafe_rejected),
    ] {
        for w in writes.iter().take(20) {
            let _ = writeln!(
                out,
                "{what}: pid {} term {} checked at {:.6} s, received at {:.6} s",
                w.node,
                w.term,
                w.checked_at.saturating_sub(data.origin) as f64 / 1e9,
                w.received_at.saturating_sub(data.origin) as f64 / 1e9
            );
        }
    }
    out
}

fn span(p: &Period, origin: u64) -> String {
    let s = |t: u64| format!("{:.6}", t.saturating_sub(origin) as f64 / 1e9);
    let end = p.end.map_or_else(|| "open".to_owned(), s);
    let deadline = p
        .deadline
        .map_or_else(String::new, |d| format!(", deadline {}", s(d)));
    format!("{} .. {end}{deadline}", s(p.start))
}

/// Every period, one line per term, and every fault: the detail behind the summary.
pub(crate) fn periods_table(
    data: &RunData,
    a: &Analysis,
    slot_of: &dyn Fn(&str) -> String,
) -> String {
    let mut writes: HashMap<(&str, u64), (usize, usize)> = HashMap::new();
    for r in &data.records {
        let e = writes.entry((r.node.as_str(), r.term)).or_default();
        if r.verdict.is_accepted() {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# primary periods (s since the first node started; the end is the reported end or the \
         deadline, whichever comes first)"
    );
    let _ = writeln!(
        out,
        "{:>20} {:>8} {:>7} {:>11} {:>11} {:>11} {:>10} {:>9}",
        "term", "node", "pid", "start", "end", "deadline", "accepted", "rejected"
    );
    let mut periods: Vec<&Period> = a.history.periods().iter().collect();
    periods.sort_by_key(|p| p.start);
    let t = |v: u64| format!("{:.3}", v.saturating_sub(data.origin) as f64 / 1e9);
    for p in periods {
        let (acc, rej) = writes
            .get(&(p.node.as_str(), p.term))
            .copied()
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:>20} {:>8} {:>7} {:>11} {:>11} {:>11} {:>10} {:>9}",
            p.term,
            slot_of(&p.node),
            p.node,
            t(p.start),
            p.effective_end().map_or_else(|| "open".to_owned(), t),
            p.deadline.map_or_else(|| "-".to_owned(), t),
            acc,
            rej
        );
    }
    let _ = writeln!(out, "\n# faults");
    for f in &data.faults {
        let _ = writeln!(
            out,
            "{:>9} .. {:>9} {:<8} {:<8} {}{}",
            t(f.at),
            t(f.until),
            f.kind.as_str(),
            f.slot
                .map_or_else(|| "server".to_owned(), |s| format!("node {}", s + 1)),
            f.detail,
            f.primary_term
                .map_or_else(String::new, |term| format!(" (primary, term {term})")),
        );
    }
    out
}

/// The last line.
pub(crate) fn last_line(data: &RunData, a: &Analysis) -> String {
    format!(
        "faults={} failovers={} overlaps={} stale_writes={} max_gap_ms={:.1} bound_ms={:.0} \
         ended_without_fault={}",
        data.faults.len(),
        a.failovers,
        a.overlaps(),
        a.report.stale_accepted.len(),
        a.max_gap_ms(),
        data.bound.as_secs_f64() * 1e3,
        a.ended_without_fault.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_primary_testing::witness::Verdict;

    const MS: u64 = 1_000_000;

    fn ev(at_ms: u64, pid: u32, kind: EventKind) -> Event {
        Event {
            at: at_ms * MS,
            pid,
            kind,
        }
    }

    fn write(pid: u32, term: u64, at_ms: u64, deadline_ms: Option<u64>, ok: bool) -> WriteRecord {
        let verdict = if ok {
            Verdict::Accepted
        } else {
            Verdict::Rejected { highest: 99 }
        };
        let r = WriteRecord::new(pid.to_string(), term, at_ms * MS, verdict);
        match deadline_ms {
            Some(d) => r.with_deadline(d * MS),
            None => r,
        }
    }

    fn fault(kind: FaultKind, pid: u32, at_ms: u64, until_ms: u64, term: Option<u64>) -> Fault {
        Fault {
            kind,
            detail: String::new(),
            slot: Some(0),
            pid: Some(pid),
            also: None,
            at: at_ms * MS,
            until: until_ms * MS,
            primary_term: term,
        }
    }

    /// Node 1 is primary (term 5) from 10 ms, SIGKILLed at 100 ms; node 2 takes over at 103 ms
    /// (term 6), is SIGSTOPped at 200 ms (lease 50 ms, deadline written: 230 ms), node 3 takes
    /// over at 260 ms (term 7); node 2 resumes at 400 ms and reports its loss.
    fn run() -> RunData {
        let kill = EventKind::Signalled {
            signal: NodeSignal::Kill,
        };
        let stop = EventKind::Signalled {
            signal: NodeSignal::Stop,
        };
        RunData {
            events: vec![
                ev(10, 1, EventKind::Primary { term: 5 }),
                ev(100, 1, kill),
                ev(103, 2, EventKind::Primary { term: 6 }),
                ev(200, 2, stop),
                ev(260, 3, EventKind::Primary { term: 7 }),
                ev(400, 2, EventKind::TaskCancelled { term: 6 }),
                ev(500, 3, EventKind::Released),
            ],
            records: vec![
                write(1, 5, 11, None, true),
                // Checked just after the parent stamped its SIGKILL, before the signal landed.
                write(1, 5, 100, None, true),
                write(2, 6, 104, Some(180), true),
                write(2, 6, 199, Some(230), true),
                write(3, 7, 261, Some(300), true),
                // Node 2's write checked before its stop, sent after it resumed: refused.
                write(2, 6, 199, Some(230), false),
            ],
            faults: vec![
                fault(FaultKind::Kill, 1, 100, 100, Some(5)),
                fault(FaultKind::Stop, 2, 200, 400, Some(6)),
                fault(FaultKind::Stop, 4, 450, 450, None),
            ],
            origin: 0,
            end: 500 * MS,
            lease: Some(Duration::from_millis(50)),
            faults_end: 450 * MS,
            slack: Duration::from_millis(60),
            bound: Duration::from_millis(60),
            bound_what: "lease + 10 ms".to_owned(),
        }
    }

    #[test]
    fn a_clean_run_passes_with_failover_times_per_kind() {
        let data = run();
        let a = analyse(&data);
        assert!(!a.violated(), "{}", a.report);
        assert_eq!(a.failovers, 2);
        assert_eq!(a.per_kind[&FaultKind::Kill].failover_ms, vec![3.0]);
        assert_eq!(a.per_kind[&FaultKind::Stop].failover_ms, vec![60.0]);
        assert_eq!(a.per_kind[&FaultKind::Stop].injected, 2);
        assert_eq!(a.per_kind[&FaultKind::Stop].on_primary, 1);
        assert_eq!(a.report.rejected, 1);
        // The killed period lasts until its last write (100 ms + 1 ns).
        assert_eq!(a.history.periods()[0].end, Some(100 * MS + 1));
        assert_eq!(a.max_gap_ms(), 30.0);
        assert_eq!(
            last_line(&data, &a),
            "faults=3 failovers=2 overlaps=0 stale_writes=0 max_gap_ms=30.0 bound_ms=60 \
             ended_without_fault=0"
        );
        let table = summary(&data, &a);
        assert!(
            table.contains("stale writes accepted (violation)"),
            "{table}"
        );
        let periods = periods_table(&data, &a, &|pid| format!("node {pid}"));
        // One line per period (node 2 had one), one per fault (all hit slot 0: "node 1").
        assert_eq!(periods.lines().filter(|l| l.contains("node 2")).count(), 1);
        assert_eq!(
            periods.lines().filter(|l| l.contains(" node 1 ")).count(),
            1 + 3
        );
    }

    #[test]
    fn terms_ending_without_a_fault_and_waits_after_faults_are_counted() {
        let mut data = run();
        let a = analyse(&data);
        assert!(a.ended_without_fault.is_empty());
        // Two gaps: after the kill (3 ms, all of it after the fault) and during the stop (none
        // of it after the stop was over).
        assert_eq!(a.gaps.len(), 2);
        let (after, _) = a.longest_after_fault.unwrap();
        assert!(after > Duration::from_millis(2) && after < Duration::from_millis(4));
        // Node 3's term ends at 300 ms with no fault on it or the server.
        data.events
            .push(ev(300, 3, EventKind::TaskCancelled { term: 7 }));
        let a = analyse(&data);
        assert_eq!(a.ended_without_fault.len(), 1);
        assert_eq!(a.ended_without_fault[0].node, "3");
        assert!(last_line(&data, &a).ends_with("ended_without_fault=1"));
        // A planned handover of that term is no fault's doing either.
        data.events.push(ev(
            299,
            3,
            EventKind::HandingOver {
                term: 7,
                to: "host:2".to_owned(),
            },
        ));
        let a = analyse(&data);
        assert!(a.ended_without_fault.is_empty());
        assert_eq!(a.handovers, 1);
        data.events.pop();
        // A restart of the server around then touches every node.
        data.faults
            .push(fault(FaultKind::Restart, 9, 280, 290, Some(7)));
        assert!(analyse(&data).ended_without_fault.is_empty());
    }

    #[test]
    fn an_overlap_and_a_stale_write_fail_the_run() {
        let mut data = run();
        // Node 3 took over before node 2's deadline, and node 2 wrote (accepted) after it.
        data.events[4] = ev(220, 3, EventKind::Primary { term: 7 });
        data.records[4] = write(3, 7, 221, Some(300), true);
        data.records.push(write(2, 6, 225, Some(230), true));
        let a = analyse(&data);
        assert!(a.violated());
        assert_eq!(a.overlaps(), 1);
        assert_eq!(a.report.stale_accepted.len(), 1, "{}", a.report);
        assert!(last_line(&data, &a).contains("overlaps=1 stale_writes=1"));
        assert!(summary(&data, &a).contains("OVERLAP: pid 2 term 6"));
    }

    #[test]
    fn a_stopped_period_without_a_written_deadline_is_bounded_by_the_stop_and_the_lease() {
        let mut data = run();
        data.records.retain(|r| r.node != "2");
        let a = analyse(&data);
        assert_eq!(a.bounded_by_stop, 1);
        // 200 ms + 50 ms lease < 260 ms: no overlap.
        assert!(!a.violated(), "{}", a.report);
        // Without a lease (the file backend) a stopped node keeps its period: an overlap.
        data.lease = None;
        assert_eq!(analyse(&data).overlaps(), 1);
    }

    #[test]
    fn a_write_well_after_a_kill_is_not_covered() {
        let mut data = run();
        // A write of node 1 checked 2 ms after its kill and after node 2's start: unsafe.
        data.records.push(write(1, 5, 104, None, true));
        let a = analyse(&data);
        assert!(a.violated());
        assert_eq!(a.overlaps(), 1, "{}", a.report);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
