//! The history checker: record every primary period of one lock, then check that no two overlap
//! and that terms rise.
//!
//! A [`History`] holds [`Period`]s — a node, its term, a start, and an end — and optionally the
//! writes nodes made to a fenced witness. [`History::check`] returns a [`Report`]: every pair of
//! overlapping periods and the total overlap, every period whose term did not rise above the
//! terms of the periods that started before it, the longest gap without a primary, and the
//! fenced-witness writes that a downstream store should have refused.
//!
//! # Time
//!
//! Times are `u64` nanoseconds on **one clock shared by every recorder of a history**:
//! [`Clock::system`](tower_primary::Clock::system)`.now().as_nanos()` (`CLOCK_BOOTTIME`, comparable
//! between the processes of one host), or [`monotonic_nanos`](tower_primary::clock::monotonic_nanos)
//! (`CLOCK_MONOTONIC`), or one [`Clock::tokio`](tower_primary::Clock::tokio) value under tokio's paused
//! clock. Never mix clocks in one history.
//!
//! # Ends and deadlines
//!
//! A period ends at its reported end or at its **deadline**, whichever comes first:
//! on a lease backend a primary stops acting at its deadline even when it never gets to report
//! it (a paused or killed process). A period with neither end nor deadline is *open* and counts
//! as lasting forever: any later period of another node overlaps it. Periods are half-open
//! intervals, so a period that starts exactly when another ends does not overlap it.
//!
//! # Recording
//!
//! - by hand: [`History::start`], [`History::end`], [`History::extend_deadline`],
//!   [`History::write`], or whole [`Period`]s with [`History::push`];
//! - from [`Event`]s, e.g. lines printed by the processes of a multi-process test
//!   ([`History::parse`], [`History::from_events`]);
//! - from live electors: [`Recorder::track`] (in process) or [`track`] with your own sink (print
//!   the events, parse them in the test).
//!
//! One history is about one lock name.
//!
//! # Examples
//!
//! ```
//! use tower_primary_testing::history::History;
//!
//! // node event term time, as printed by the nodes of a multi-process test
//! let history = History::parse(
//!     "a primary 1 1000
//!      a secondary 1 2000
//!      b primary 2 1500
//!      b secondary 2 3000",
//! )
//! .unwrap();
//! let report = history.check();
//! assert!(!report.is_ok());
//! assert_eq!(report.overlaps.len(), 1);
//! assert_eq!(report.total_overlap.as_nanos(), 500);
//! ```
//!
//! Recording the periods of live electors:
//!
//! ```
//! use tower_primary_testing::history::Recorder;
//! use tower_primary::{Elector, MemoryBackend, NodeId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_primary::Error> {
//! let recorder = Recorder::new();
//! let backend = MemoryBackend::new();
//! let a = Elector::builder("jobs").backend(backend.clone()).node(NodeId::new("a")).spawn()?;
//! recorder.track(&a);
//! let b = Elector::builder("jobs").backend(backend.connection()).node(NodeId::new("b")).spawn()?;
//! recorder.track(&b);
//!
//! a.handle().wait_primary().await;
//! a.shutdown().await;
//! b.handle().wait_primary().await;
//! b.shutdown().await;
//!
//! let history = recorder.history();
//! assert_eq!(history.periods().len(), 2);
//! history.assert_ok();
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use tower_primary::clock::Timestamp;
use tower_primary::elector::Elector;

/// One primary period: `node` was primary with `term` from `start` until `end` or `deadline`,
/// whichever comes first. See the [module docs](self).
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
    fn until(&self) -> u64 {
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

/// What an [`Event`] says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum EventKind {
    /// The node became primary with the term, at the time.
    Primary,
    /// The node stopped being primary with the term, at the time.
    Secondary,
    /// The node's period with the term lasts at most until the time (a lease deadline; the
    /// latest of several counts).
    Deadline,
    /// The node's write with the term was accepted by a fenced witness at the time.
    Write,
}

impl EventKind {
    /// `"primary"`, `"secondary"`, `"deadline"` or `"write"`.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::Primary => "primary",
            EventKind::Secondary => "secondary",
            EventKind::Deadline => "deadline",
            EventKind::Write => "write",
        }
    }
}

/// One line of a history log: `node event term time`.
///
/// Its [`Display`](fmt::Display) form is what [`FromStr`] and [`History::parse`] read, so a node
/// process can `println!("{event}")` and the test can parse its output. It also (de)serializes
/// with serde as `{"node", "event", "term", "at"}`.
///
/// # Examples
///
/// ```
/// use tower_primary_testing::history::{Event, EventKind};
///
/// let e = Event::primary("web-1", 7, 123_456);
/// assert_eq!(e.to_string(), "web-1 primary 7 123456");
/// let back: Event = "web-1 primary 7 123456".parse().unwrap();
/// assert_eq!(back, e);
/// assert_eq!(back.kind, EventKind::Primary);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// The node id (may contain spaces; the last three fields of a line are the others).
    pub node: String,
    /// What happened.
    #[serde(rename = "event")]
    pub kind: EventKind,
    /// The term it happened with.
    pub term: u64,
    /// When, in nanoseconds; for [`EventKind::Deadline`], the deadline itself.
    pub at: u64,
}

impl Event {
    /// An event.
    #[must_use]
    pub fn new(node: impl Into<String>, kind: EventKind, term: u64, at: u64) -> Self {
        Event {
            node: node.into(),
            kind,
            term,
            at,
        }
    }

    /// `node` became primary with `term` at `at`.
    #[must_use]
    pub fn primary(node: impl Into<String>, term: u64, at: u64) -> Self {
        Event::new(node, EventKind::Primary, term, at)
    }

    /// `node` stopped being primary with `term` at `at`.
    #[must_use]
    pub fn secondary(node: impl Into<String>, term: u64, at: u64) -> Self {
        Event::new(node, EventKind::Secondary, term, at)
    }

    /// `node`'s period with `term` lasts at most until `deadline`.
    #[must_use]
    pub fn deadline(node: impl Into<String>, term: u64, deadline: u64) -> Self {
        Event::new(node, EventKind::Deadline, term, deadline)
    }

    /// `node`'s write with `term` was accepted at `at`.
    #[must_use]
    pub fn write(node: impl Into<String>, term: u64, at: u64) -> Self {
        Event::new(node, EventKind::Write, term, at)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.node,
            self.kind.as_str(),
            self.term,
            self.at
        )
    }
}

/// A line of a history log that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("history line {line}: {problem}")]
#[non_exhaustive]
pub struct ParseError {
    /// The line number, from 1 (1 for a single [`Event`] parsed alone).
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
}

impl FromStr for Event {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |problem: String| ParseError { line: 1, problem };
        let fields: Vec<&str> = s.split_whitespace().collect();
        let [node @ .., kind, term, at] = fields.as_slice() else {
            return Err(bad(format!("expected `node event term time`, got {s:?}")));
        };
        if node.is_empty() {
            return Err(bad(format!("expected `node event term time`, got {s:?}")));
        }
        let kind = match *kind {
            "primary" => EventKind::Primary,
            "secondary" => EventKind::Secondary,
            "deadline" => EventKind::Deadline,
            "write" => EventKind::Write,
            other => {
                return Err(bad(format!(
                    "unknown event {other:?} (expected primary, secondary, deadline or write)"
                )));
            }
        };
        let number = |what: &str, v: &str| {
            v.parse::<u64>()
                .map_err(|e| bad(format!("{what} {v:?}: {e}")))
        };
        Ok(Event {
            node: node.join(" "),
            kind,
            term: number("term", term)?,
            at: number("time", at)?,
        })
    }
}

/// The primary periods (and fenced-witness writes) of one lock. See the [module docs](self).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    periods: Vec<Period>,
    writes: Vec<Write>,
}

impl History {
    /// An empty history.
    #[must_use]
    pub fn new() -> Self {
        History::default()
    }

    /// A history from events in any order (e.g. the logs of several processes, concatenated).
    ///
    /// Primary, secondary and write events are applied in time order (stable for equal times);
    /// deadline events then apply to the period of their node and term.
    #[must_use]
    pub fn from_events(events: impl IntoIterator<Item = Event>) -> Self {
        let (deadlines, mut timed): (Vec<Event>, Vec<Event>) = events
            .into_iter()
            .partition(|e| e.kind == EventKind::Deadline);
        timed.sort_by_key(|e| e.at);
        let mut history = History::new();
        for e in timed.iter().chain(&deadlines) {
            history.apply(e);
        }
        history
    }

    /// Parses a log of [`Event`] lines (`node event term time`); blank lines and lines starting
    /// with `#` are skipped. See [`History::from_events`].
    ///
    /// # Errors
    ///
    /// [`ParseError`] naming the first line that is not an event.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut events = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let event = line
                .parse::<Event>()
                .map_err(|e| ParseError { line: i + 1, ..e })?;
            events.push(event);
        }
        Ok(History::from_events(events))
    }

    /// Applies one event, as it happens (see [`History::start`], [`History::end`],
    /// [`History::extend_deadline`], [`History::write`]).
    pub fn apply(&mut self, event: &Event) {
        let Event {
            node,
            kind,
            term,
            at,
        } = event;
        match kind {
            EventKind::Primary => self.start(node, *term, *at),
            EventKind::Secondary => {
                self.end(node, *term, *at);
            }
            EventKind::Deadline => self.extend_deadline(node, *term, *at),
            EventKind::Write => self.write(node, *term, *at),
        }
    }

    /// Adds a whole period.
    pub fn push(&mut self, period: Period) {
        self.periods.push(period);
    }

    /// `node` became primary with `term` at `at`.
    ///
    /// A node is primary for one term at a time: if it still has an open period of another term,
    /// that period is ended at `at`. A second start of the same open period is ignored.
    pub fn start(&mut self, node: &str, term: u64, at: u64) {
        if let Some(open) = self.open_mut(node) {
            if open.term == term {
                return;
            }
            open.end = Some(at);
        }
        self.periods.push(Period::new(node, term, at));
    }

    /// `node` stopped being primary with `term` at `at`: ends its open period of that term, or
    /// else its open period of any term. Returns whether a period was ended.
    pub fn end(&mut self, node: &str, term: u64, at: u64) -> bool {
        let index = self
            .periods
            .iter()
            .rposition(|p| p.is_open() && p.node == node && p.term == term)
            .or_else(|| {
                self.periods
                    .iter()
                    .rposition(|p| p.is_open() && p.node == node)
            });
        match index {
            Some(i) => {
                self.periods[i].end = Some(at);
                true
            }
            None => false,
        }
    }

    /// `node`'s latest period with `term` lasts at most until `deadline`. Deadlines only extend:
    /// a deadline earlier than the one recorded is ignored (a lease's deadline moves forward with
    /// each renewal). Ignored when there is no such period.
    pub fn extend_deadline(&mut self, node: &str, term: u64, deadline: u64) {
        if let Some(p) = self
            .periods
            .iter_mut()
            .rev()
            .find(|p| p.node == node && p.term == term)
        {
            p.deadline = Some(p.deadline.map_or(deadline, |d| d.max(deadline)));
        }
    }

    /// A fenced witness accepted `node`'s write with `term` at `at`.
    pub fn write(&mut self, node: &str, term: u64, at: u64) {
        self.writes.push(Write::new(node, term, at));
    }

    /// Ends every open period at `at` (e.g. when a test stops all nodes and no longer hears
    /// from them). Periods whose deadline is earlier keep ending at their deadline.
    pub fn close_open(&mut self, at: u64) {
        for p in self.periods.iter_mut().filter(|p| p.is_open()) {
            p.end = Some(at);
        }
    }

    /// The periods, in the order they were recorded.
    #[must_use]
    pub fn periods(&self) -> &[Period] {
        &self.periods
    }

    /// The fenced-witness writes, in the order they were recorded.
    #[must_use]
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// The terms of the periods, in start order.
    #[must_use]
    pub fn terms(&self) -> Vec<u64> {
        self.sorted().iter().map(|p| p.term).collect()
    }

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

    fn open_mut(&mut self, node: &str) -> Option<&mut Period> {
        self.periods
            .iter_mut()
            .rev()
            .find(|p| p.is_open() && p.node == node)
    }

    fn sorted(&self) -> Vec<&Period> {
        let mut sorted: Vec<&Period> = self.periods.iter().collect();
        sorted.sort_by_key(|p| (p.start, p.term));
        sorted
    }
}

/// A table of the periods, times in milliseconds from the first start.
impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = self.periods.iter().map(|p| p.start).min().unwrap_or(0);
        let ms = |t: u64| format!("{:.3}", t.saturating_sub(origin) as f64 / 1e6);
        writeln!(
            f,
            "{} periods (ms from the first start):",
            self.periods.len()
        )?;
        for p in self.sorted() {
            write!(f, "  {} term {}: {} ..", p.node, p.term, ms(p.start))?;
            match p.end {
                Some(e) => write!(f, " {}", ms(e))?,
                None => write!(f, " (open)")?,
            }
            if let Some(d) = p.deadline {
                write!(f, " deadline {}", ms(d))?;
            }
            writeln!(f)?;
        }
        if !self.writes.is_empty() {
            writeln!(f, "{} writes", self.writes.len())?;
        }
        Ok(())
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

/// A [`History`] shared between the tasks and threads that record into it.
///
/// Clones share one history. [`track`](Self::track) records an elector's periods;
/// [`wait_for`](Self::wait_for) waits until the history satisfies a condition.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

#[derive(Default)]
struct RecorderInner {
    history: Mutex<History>,
    version: watch::Sender<u64>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("history", &*self.lock())
            .finish()
    }
}

impl Recorder {
    /// A recorder with an empty history.
    #[must_use]
    pub fn new() -> Self {
        Recorder::default()
    }

    /// Applies an event; see [`History::apply`].
    pub fn apply(&self, event: &Event) {
        self.update(|h| h.apply(event));
    }

    /// See [`History::start`].
    pub fn start(&self, node: &str, term: u64, at: u64) {
        self.update(|h| h.start(node, term, at));
    }

    /// See [`History::end`] (which also says whether a period was ended).
    pub fn end(&self, node: &str, term: u64, at: u64) {
        self.update(|h| {
            h.end(node, term, at);
        });
    }

    /// See [`History::extend_deadline`].
    pub fn extend_deadline(&self, node: &str, term: u64, deadline: u64) {
        self.update(|h| h.extend_deadline(node, term, deadline));
    }

    /// See [`History::write`].
    pub fn write(&self, node: &str, term: u64, at: u64) {
        self.update(|h| h.write(node, term, at));
    }

    /// A copy of the history so far.
    #[must_use]
    pub fn history(&self) -> History {
        self.lock().clone()
    }

    /// Checks the history so far.
    #[must_use]
    pub fn check(&self) -> Report {
        self.lock().check()
    }

    /// Panics if the history so far has anything wrong; see [`History::assert_ok`].
    ///
    /// # Panics
    ///
    /// When the history is not ok.
    #[track_caller]
    pub fn assert_ok(&self) {
        self.history().assert_ok();
    }

    /// Waits until `condition` holds for the history.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe.
    pub async fn wait_for(&self, mut condition: impl FnMut(&History) -> bool) {
        let mut rx = self.inner.version.subscribe();
        loop {
            if condition(&self.lock()) {
                return;
            }
            // The sender lives in `inner`, which `self` keeps alive.
            let _ = rx.changed().await;
        }
    }

    /// Records the primary periods of `elector` from now on; see [`track`].
    pub fn track(&self, elector: &Elector) {
        let recorder = self.clone();
        track(elector, move |event| recorder.apply(&event));
    }

    fn update(&self, f: impl FnOnce(&mut History)) {
        f(&mut self.lock());
        self.inner.version.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        // Every update leaves the history consistent before it could panic.
        crate::sync::lock(&self.inner.history)
    }
}

/// Reports the primary periods of `elector` to `sink` as [`Event`]s, from now on.
///
/// It registers a [singleton task](Elector::singleton_task) that, in every term:
/// - sends [`Event::primary`] when it starts (just after the node became primary);
/// - on lease backends, sends [`Event::deadline`] whenever the term's deadline moves (sampled
///   every 1/20 of the lease, at most every 50 ms);
/// - sends [`Event::secondary`] when the term's context is cancelled, which the elector does
///   after `is_primary()` turned false and before it releases the lock.
///
/// So a recorded period lies within the time the node held the lock, and a successor's
/// recorded start comes after the recorded end: overlaps found in a correct run are real. A
/// period of a node that is killed or paused gets no end: add one, or its deadline, yourself
/// (the [conformance suite](crate::conformance) does).
///
/// Times are read on the elector's [`Clock`](tower_primary::Clock): give every elector of one history the
/// same clock value.
///
/// # Examples
///
/// A node process printing its events for the test that runs it:
///
/// ```
/// # use tower_primary::{Elector, MemoryBackend};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_primary::Error> {
/// let elector = Elector::builder("jobs").backend(MemoryBackend::new()).spawn()?;
/// tower_primary_testing::history::track(&elector, |event| println!("{event}"));
/// # elector.handle().wait_primary().await;
/// # elector.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub fn track(elector: &Elector, sink: impl Fn(Event) + Send + Sync + 'static) {
    let sink = Arc::new(sink);
    let handle = elector.handle();
    elector.singleton_task("tower-primary-history", move |ctx| {
        let sink = sink.clone();
        let handle = handle.clone();
        async move {
            let clock = handle.clock();
            let node = handle.node().id().to_owned();
            let term = ctx.term();
            let start = clock.now();
            if !ctx.is_valid() {
                return Ok::<(), std::convert::Infallible>(());
            }
            sink(Event::primary(&node, term, start.as_nanos()));
            let sample = handle.holder().and_then(|h| h.lease_ms).map(|ms| {
                (Duration::from_millis(ms) / 20)
                    .clamp(Duration::from_millis(1), Duration::from_millis(50))
            });
            let mut reported = Timestamp::ZERO;
            let report = |reported: &mut Timestamp| {
                if let Some(deadline) = handle.deadline()
                    && deadline != Timestamp::NEVER
                    && deadline > *reported
                    && ctx.is_valid()
                {
                    *reported = deadline;
                    sink(Event::deadline(&node, term, deadline.as_nanos()));
                }
            };
            report(&mut reported);
            match sample {
                Some(every) => loop {
                    tokio::select! {
                        () = ctx.cancelled() => break,
                        () = tokio::time::sleep(every) => report(&mut reported),
                    }
                },
                None => ctx.cancelled().await,
            }
            sink(Event::secondary(&node, term, clock.now().as_nanos()));
            Ok(())
        }
    });
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
    fn a_reported_end_before_the_deadline_counts() {
        let p = Period::new("a", 1, 0).with_deadline(100).with_end(10);
        assert_eq!(p.effective_end(), Some(10));
        assert_eq!(p.duration(), Some(Duration::from_nanos(10)));
    }

    #[test]
    fn events_build_a_history_from_several_logs() {
        let log_a = "a primary 1 100\na deadline 1 400\n# a was killed here\n";
        let log_b = "\nb primary 2 500\nb secondary 2 900\n";
        let log_c = "c primary 3 1000\n";
        let h = History::parse(&format!("{log_c}{log_b}{log_a}")).unwrap();
        assert_eq!(h.periods().len(), 3);
        let a = &h.periods()[0];
        assert_eq!(
            (a.node.as_str(), a.term, a.start, a.end, a.deadline),
            ("a", 1, 100, None, Some(400))
        );
        assert_eq!(h.periods()[1].end, Some(900));
        assert!(h.periods()[2].is_open());
        h.assert_ok();

        // Event lines round-trip, and nodes may contain spaces.
        for e in [
            Event::primary("web 1", 7, 5),
            Event::secondary("b", 7, 6),
            Event::deadline("b", 7, 8),
            Event::write("b", 7, 9),
        ] {
            assert_eq!(e.to_string().parse::<Event>().unwrap(), e);
        }
        let json = serde_json::to_string(&Event::primary("a", 1, 2)).unwrap();
        assert_eq!(json, r#"{"node":"a","event":"primary","term":1,"at":2}"#);
    }

    #[test]
    fn bad_lines_are_named() {
        let err = History::parse("a primary 1 100\na leader 2 200\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(
            err.to_string().contains("unknown event \"leader\""),
            "{err}"
        );
        let err = History::parse("a primary x 100").unwrap_err();
        assert!(
            err.to_string().starts_with("history line 1: term \"x\""),
            "{err}"
        );
        assert!(History::parse("primary 1 100").is_err());
    }

    #[test]
    fn a_new_term_of_the_same_node_ends_its_previous_period() {
        let mut h = History::new();
        h.apply(&Event::primary("a", 1, 0));
        h.apply(&Event::primary("a", 1, 5)); // repeated: ignored
        h.apply(&Event::primary("a", 2, 10));
        h.apply(&Event::secondary("a", 2, 20));
        assert_eq!(h.periods().len(), 2);
        assert_eq!(h.periods()[0].end, Some(10));
        h.assert_ok();
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

    #[tokio::test]
    async fn recorder_tracks_periods_of_electors() {
        use tower_primary::{MemoryBackend, NodeId};

        let recorder = Recorder::new();
        let backend = MemoryBackend::new();
        let a = Elector::builder("history-a")
            .backend(backend.clone())
            .node(NodeId::new("a"))
            .spawn()
            .unwrap();
        recorder.track(&a);
        let b = Elector::builder("history-a")
            .backend(backend.connection())
            .node(NodeId::new("b"))
            .spawn()
            .unwrap();
        recorder.track(&b);
        let ta = a.handle().wait_primary().await.term();
        recorder
            .wait_for(|h| h.periods().iter().any(|p| p.node == "a"))
            .await;
        a.shutdown().await;
        let tb = b.handle().wait_primary().await.term();
        b.shutdown().await;
        let h = recorder.history();
        assert_eq!(h.terms(), vec![ta, tb]);
        assert!(h.periods().iter().all(|p| p.end.is_some()), "{h}");
        h.assert_ok();
    }
}
