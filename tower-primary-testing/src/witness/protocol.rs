//! The rule and the wire: the fence, verdicts, write records and request lines.

use std::fmt;

/// What the witness answered to a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Verdict {
    /// The write's term was at least the highest accepted so far.
    Accepted,
    /// The write's term was lower than `highest`, which had been accepted before.
    Rejected {
        /// The highest term accepted when the write came.
        highest: u64,
    },
}

impl Verdict {
    /// Whether the write was accepted.
    #[must_use]
    pub fn is_accepted(self) -> bool {
        self == Verdict::Accepted
    }
}

/// The fencing rule: accept a write whose term is at least the highest accepted so far.
///
/// ```
/// use tower_primary_testing::witness::{Fence, Verdict};
///
/// let mut fence = Fence::new();
/// assert_eq!(fence.offer(5), Verdict::Accepted);
/// assert_eq!(fence.offer(5), Verdict::Accepted);
/// assert_eq!(fence.offer(4), Verdict::Rejected { highest: 5 });
/// assert_eq!(fence.offer(7), Verdict::Accepted);
/// assert_eq!(fence.highest(), Some(7));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fence {
    highest: Option<u64>,
}

impl Fence {
    /// A fence that has accepted nothing.
    #[must_use]
    pub fn new() -> Self {
        Fence::default()
    }

    /// Offers a write with `term`; remembers it when accepted.
    pub fn offer(&mut self, term: u64) -> Verdict {
        match self.highest {
            Some(highest) if term < highest => Verdict::Rejected { highest },
            _ => {
                self.highest = Some(term);
                Verdict::Accepted
            }
        }
    }

    /// The highest term accepted so far.
    #[must_use]
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }
}

/// One write as the witness saw it. See the [module docs](crate::witness) for the clocks.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteRecord {
    /// The writer's node id.
    pub node: String,
    /// The term the write carried.
    pub term: u64,
    /// When the node took the write's time, just before it checked that its term was valid.
    pub checked_at: u64,
    /// The node's wall clock at that moment, in nanoseconds since the Unix epoch (display only).
    pub wall_ns: u64,
    /// The node's deadline for the term when it wrote, if it has one (lease backends).
    pub deadline: Option<u64>,
    /// When the witness received it (`CLOCK_MONOTONIC`).
    pub received_at: u64,
    /// What the witness answered.
    pub verdict: Verdict,
}

impl WriteRecord {
    /// A write by `node` with `term`, checked at `checked_at`, answered with `verdict`; the other
    /// fields are zero or `None`.
    #[must_use]
    pub fn new(node: impl Into<String>, term: u64, checked_at: u64, verdict: Verdict) -> Self {
        WriteRecord {
            node: node.into(),
            term,
            checked_at,
            wall_ns: 0,
            deadline: None,
            received_at: checked_at,
            verdict,
        }
    }

    /// Sets the deadline.
    #[must_use]
    pub fn with_deadline(mut self, deadline: u64) -> Self {
        self.deadline = Some(deadline);
        self
    }

    pub(super) fn key(&self) -> (&str, u64, u64) {
        (self.node.as_str(), self.term, self.checked_at)
    }
}

/// `<received_at> accepted|rejected:<highest> <term> <checked_at> <wall_ns> <deadline|-> <node>`:
/// one line of a witness log.
impl fmt::Display for WriteRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Verdict::Accepted => "accepted".to_owned(),
            Verdict::Rejected { highest } => format!("rejected:{highest}"),
        };
        let deadline = self
            .deadline
            .map_or_else(|| "-".to_owned(), |d| d.to_string());
        write!(
            f,
            "{} {verdict} {} {} {} {deadline} {}",
            self.received_at, self.term, self.checked_at, self.wall_ns, self.node
        )
    }
}

/// A write request as it travels: `write <term> <checked_at> <wall_ns> <deadline|-> <node>`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Request {
    pub(super) term: u64,
    pub(super) checked_at: u64,
    pub(super) wall_ns: u64,
    pub(super) deadline: Option<u64>,
    pub(super) node: String,
}

impl Request {
    pub(super) fn parse(line: &str) -> Result<Request, String> {
        let mut words = line.trim().splitn(6, ' ');
        if words.next() != Some("write") {
            return Err(
                "expected `write <term> <checked_at> <wall_ns> <deadline|-> <node>`".into(),
            );
        }
        let mut number = |what: &str| -> Result<Option<u64>, String> {
            match words.next() {
                None => Err(format!("missing {what}")),
                Some("-") => Ok(None),
                Some(v) => v
                    .parse()
                    .map(Some)
                    .map_err(|e| format!("{what} {v:?}: {e}")),
            }
        };
        let required = |v: Option<u64>, what: &str| v.ok_or_else(|| format!("{what} is required"));
        let term = required(number("term")?, "term")?;
        let checked_at = required(number("checked_at")?, "checked_at")?;
        let wall_ns = required(number("wall_ns")?, "wall_ns")?;
        let deadline = number("deadline")?;
        let node = words.next().unwrap_or_default().trim().to_owned();
        if node.is_empty() {
            return Err("missing node".into());
        }
        Ok(Request {
            term,
            checked_at,
            wall_ns,
            deadline,
            node,
        })
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let deadline = self
            .deadline
            .map_or_else(|| "-".to_owned(), |d| d.to_string());
        write!(
            f,
            "write {} {} {} {deadline} {}",
            self.term, self.checked_at, self.wall_ns, self.node
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_lines_are_named() {
        let r = Request {
            term: 7,
            checked_at: 123,
            wall_ns: 456,
            deadline: None,
            node: "web 1".into(),
        };
        assert_eq!(Request::parse(&r.to_string()).unwrap(), r);
        let r = Request {
            deadline: Some(999),
            ..r
        };
        assert_eq!(Request::parse(&r.to_string()).unwrap(), r);
        assert!(
            Request::parse("write x 1 2 - a")
                .unwrap_err()
                .contains("term")
        );
        assert!(
            Request::parse("write 1 1 2 -")
                .unwrap_err()
                .contains("node")
        );
        assert!(Request::parse("read 1").is_err());
    }
}
