//! Building a history from periods, events and event logs.

use std::fmt;

use super::{Event, EventKind, History, ParseError, Period, Write};

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

    fn open_mut(&mut self, node: &str) -> Option<&mut Period> {
        self.periods
            .iter_mut()
            .rev()
            .find(|p| p.is_open() && p.node == node)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
