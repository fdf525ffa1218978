//! Events, one a line: what nodes log and a history is built from.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
/// Its [`Display`](fmt::Display) form is what [`FromStr`] and [`History::parse`](super::History::parse) read, so a node
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
