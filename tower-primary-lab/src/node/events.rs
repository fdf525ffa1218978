//! What nodes report, one line each, and the signals they are sent.

use std::fmt;

use super::reported_pid;
use tower_primary::clock::monotonic_nanos;

/// A signal the parent sends to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NodeSignal {
    /// `SIGKILL`: the process dies at once; the kernel closes its descriptors.
    Kill,
    /// `SIGTERM`: the node shuts its elector down (graceful handover), then exits.
    Term,
    /// `SIGINT`.
    Int,
    /// `SIGSTOP`: the process is frozen.
    Stop,
    /// `SIGCONT`: a frozen process resumes.
    Cont,
}

impl NodeSignal {
    /// The signal's name, e.g. `"SIGKILL"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            NodeSignal::Kill => "SIGKILL",
            NodeSignal::Term => "SIGTERM",
            NodeSignal::Int => "SIGINT",
            NodeSignal::Stop => "SIGSTOP",
            NodeSignal::Cont => "SIGCONT",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            NodeSignal::Kill,
            NodeSignal::Term,
            NodeSignal::Int,
            NodeSignal::Stop,
            NodeSignal::Cont,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    pub(super) fn to_nix(self) -> nix::sys::signal::Signal {
        use nix::sys::signal::Signal;
        match self {
            NodeSignal::Kill => Signal::SIGKILL,
            NodeSignal::Term => Signal::SIGTERM,
            NodeSignal::Int => Signal::SIGINT,
            NodeSignal::Stop => Signal::SIGSTOP,
            NodeSignal::Cont => Signal::SIGCONT,
        }
    }
}

impl fmt::Display for NodeSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An order the parent gives a node through its stdin, one line each
/// ([`Cluster::order`](super::Cluster::order)); the node reports
/// [`Obeyed`](EventKind::Obeyed) or [`Refused`](EventKind::Refused).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Order {
    /// [`Elector::ready`](tower_primary::Elector::ready).
    Ready,
    /// [`Elector::drain`](tower_primary::Elector::drain): never lead again, hand over if primary.
    Drain,
    /// [`Elector::hand_over_to`](tower_primary::Elector::hand_over_to) the node with this id
    /// (its [`Node`](EventKind::Node) event).
    HandOverTo(String),
    /// [`Elector::step_down`](tower_primary::Elector::step_down).
    StepDown,
}

impl Order {
    /// Parses an order's line (`ready`, `drain`, `hand-over-to <id>`, `step-down`).
    #[must_use]
    pub fn parse(line: &str) -> Option<Order> {
        let mut words = line.split_whitespace();
        let order = match words.next()? {
            "ready" => Order::Ready,
            "drain" => Order::Drain,
            "step-down" => Order::StepDown,
            "hand-over-to" => Order::HandOverTo(words.next()?.to_owned()),
            _ => return None,
        };
        words.next().is_none().then_some(order)
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Order::Ready => f.write_str("ready"),
            Order::Drain => f.write_str("drain"),
            Order::StepDown => f.write_str("step-down"),
            Order::HandOverTo(node) => write!(f, "hand-over-to {node}"),
        }
    }
}

/// What happened; see the [protocol](crate::node#protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// The node spawned its elector.
    Started,
    /// The node's role became primary.
    Primary {
        /// The term.
        term: u64,
    },
    /// The node's role became secondary, or the holder it knows changed.
    Secondary {
        /// The term of the holder the node knows of.
        holder_term: Option<u64>,
        /// The pid of the holder the node knows of.
        holder_pid: Option<u32>,
    },
    /// The singleton task started (the first tick of the term).
    TaskStart {
        /// The term.
        term: u64,
    },
    /// A periodic tick of the singleton task.
    Tick {
        /// The term.
        term: u64,
        /// 1 for the first periodic tick after the start, then 2, 3…
        n: u64,
    },
    /// The singleton task saw its term end.
    TaskCancelled {
        /// The term.
        term: u64,
    },
    /// The singleton task spawned the configured command.
    ChildSpawned {
        /// The pid of the spawned process.
        pid: u32,
    },
    /// `SIGTERM` arrived; the node is shutting its elector down.
    SigTerm,
    /// [`Elector::shutdown`](tower_primary::Elector::shutdown) returned: the lock is released.
    Released,
    /// The node is about to exit with `code`.
    Exit {
        /// The exit status.
        code: i32,
    },
    /// The node could not start (bad configuration, a configuration error from `spawn()`).
    Error {
        /// What went wrong.
        message: String,
    },
    /// The node's id in the lock's candidate registry ([`NodeId`](tower_primary::NodeId)):
    /// what [`Order::HandOverTo`] names.
    Node {
        /// The id, e.g. `host:1234`.
        id: String,
    },
    /// The node decided to hand the lock over (the elector's "handing the lock over" log):
    /// the lock is reserved for `to` and the term is winding down.
    HandingOver {
        /// The term being handed over.
        term: u64,
        /// The node id of the successor.
        to: String,
    },
    /// The node carried out an [`Order`] (for a drain: the drain began).
    Obeyed {
        /// The order.
        order: Order,
    },
    /// A [drain](Order::Drain) resolved: the node is not primary.
    Drained,
    /// An [`Order`] failed (e.g. a refused handover); the node goes on.
    Refused {
        /// The order.
        order: Order,
        /// Why.
        message: String,
    },
    /// Recorded by the parent: the process was spawned.
    Spawned,
    /// Recorded by the parent, timestamped just before `kill(2)`.
    Signalled {
        /// The signal sent.
        signal: NodeSignal,
    },
    /// Recorded by the parent: the process exited and was reaped.
    Exited {
        /// The exit code, when it exited normally.
        code: Option<i32>,
        /// The signal that ended it, if any.
        signal: Option<i32>,
    },
}

/// One line of the [protocol](crate::node#protocol): when, which process, what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC` in nanoseconds.
    pub at: u64,
    /// The node's process id.
    pub pid: u32,
    /// What happened.
    pub kind: EventKind,
}

impl Event {
    /// An event of this process, now.
    #[must_use]
    pub fn now(kind: EventKind) -> Self {
        Event {
            at: monotonic_nanos(),
            pid: reported_pid(),
            kind,
        }
    }

    /// The term the event is about, if any.
    #[must_use]
    pub fn term(&self) -> Option<u64> {
        match self.kind {
            EventKind::Primary { term }
            | EventKind::TaskStart { term }
            | EventKind::Tick { term, .. }
            | EventKind::TaskCancelled { term } => Some(term),
            EventKind::Secondary { holder_term, .. } => holder_term,
            _ => None,
        }
    }

    /// Parses a protocol line; `None` for any other line.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_primary_lab::node::{Event, EventKind};
    ///
    /// let e = Event::parse("EVENT 123456 42 primary 7").unwrap();
    /// assert_eq!((e.at, e.pid, e.kind.clone()), (123456, 42, EventKind::Primary { term: 7 }));
    /// assert_eq!(e.to_string(), "EVENT 123456 42 primary 7");
    /// assert!(Event::parse("running 1 test").is_none());
    /// ```
    #[must_use]
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.trim_end().split(' ');
        if words.next()? != "EVENT" {
            return None;
        }
        let at = words.next()?.parse().ok()?;
        let pid = words.next()?.parse().ok()?;
        let what = words.next()?;
        let mut num = || words.next()?.parse::<u64>().ok();
        let kind = match what {
            "started" => EventKind::Started,
            "primary" => EventKind::Primary { term: num()? },
            "secondary" => {
                let opt = |w: Option<&str>| -> Option<Option<u64>> {
                    match w? {
                        "-" => Some(None),
                        n => n.parse().ok().map(Some),
                    }
                };
                let holder_term = opt(words.next())?;
                let holder_pid = match opt(words.next())? {
                    None => None,
                    Some(p) => Some(u32::try_from(p).ok()?),
                };
                EventKind::Secondary {
                    holder_term,
                    holder_pid,
                }
            }
            "task-start" => EventKind::TaskStart { term: num()? },
            "tick" => EventKind::Tick {
                term: num()?,
                n: num()?,
            },
            "task-cancelled" => EventKind::TaskCancelled { term: num()? },
            "child" => EventKind::ChildSpawned {
                pid: u32::try_from(num()?).ok()?,
            },
            "sigterm" => EventKind::SigTerm,
            "released" => EventKind::Released,
            "exit" => EventKind::Exit {
                code: words.next()?.parse().ok()?,
            },
            "error" => EventKind::Error {
                message: words.collect::<Vec<_>>().join(" "),
            },
            "node" => EventKind::Node {
                id: words.next()?.to_owned(),
            },
            "handing-over" => EventKind::HandingOver {
                term: num()?,
                to: words.next()?.to_owned(),
            },
            "obeyed" => EventKind::Obeyed {
                order: Order::parse(&words.collect::<Vec<_>>().join(" "))?,
            },
            "drained" => EventKind::Drained,
            "refused" => {
                let rest: Vec<&str> = words.collect();
                let split = rest.iter().position(|w| *w == "--")?;
                EventKind::Refused {
                    order: Order::parse(&rest[..split].join(" "))?,
                    message: rest[split + 1..].join(" "),
                }
            }
            "spawned" => EventKind::Spawned,
            "signal" => EventKind::Signalled {
                signal: NodeSignal::from_name(words.next()?)?,
            },
            "exited" => {
                let opt = |w: Option<&str>| -> Option<Option<i32>> {
                    match w? {
                        "-" => Some(None),
                        n => n.parse().ok().map(Some),
                    }
                };
                EventKind::Exited {
                    code: opt(words.next())?,
                    signal: opt(words.next())?,
                }
            }
            _ => return None,
        };
        Some(Event { at, pid, kind })
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn opt<T: fmt::Display>(v: Option<T>) -> String {
            v.map_or_else(|| "-".to_owned(), |v| v.to_string())
        }
        write!(f, "EVENT {} {} ", self.at, self.pid)?;
        match &self.kind {
            EventKind::Started => f.write_str("started"),
            EventKind::Primary { term } => write!(f, "primary {term}"),
            EventKind::Secondary {
                holder_term,
                holder_pid,
            } => write!(f, "secondary {} {}", opt(*holder_term), opt(*holder_pid)),
            EventKind::TaskStart { term } => write!(f, "task-start {term}"),
            EventKind::Tick { term, n } => write!(f, "tick {term} {n}"),
            EventKind::TaskCancelled { term } => write!(f, "task-cancelled {term}"),
            EventKind::ChildSpawned { pid } => write!(f, "child {pid}"),
            EventKind::SigTerm => f.write_str("sigterm"),
            EventKind::Released => f.write_str("released"),
            EventKind::Exit { code } => write!(f, "exit {code}"),
            EventKind::Error { message } => {
                write!(
                    f,
                    "error {}",
                    message.split_whitespace().collect::<Vec<_>>().join(" ")
                )
            }
            EventKind::Node { id } => write!(f, "node {id}"),
            EventKind::HandingOver { term, to } => write!(f, "handing-over {term} {to}"),
            EventKind::Obeyed { order } => write!(f, "obeyed {order}"),
            EventKind::Drained => f.write_str("drained"),
            EventKind::Refused { order, message } => write!(
                f,
                "refused {order} -- {}",
                message.split_whitespace().collect::<Vec<_>>().join(" ")
            ),
            EventKind::Spawned => f.write_str("spawned"),
            EventKind::Signalled { signal } => write!(f, "signal {signal}"),
            EventKind::Exited { code, signal } => {
                write!(f, "exited {} {}", opt(*code), opt(*signal))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: u64, pid: u32, kind: EventKind) -> Event {
        Event { at, pid, kind }
    }

    #[test]
    fn every_event_round_trips_through_its_line() {
        let kinds = [
            EventKind::Started,
            EventKind::Primary { term: 9 },
            EventKind::Secondary {
                holder_term: Some(9),
                holder_pid: Some(77),
            },
            EventKind::Secondary {
                holder_term: None,
                holder_pid: None,
            },
            EventKind::TaskStart { term: 9 },
            EventKind::Tick { term: 9, n: 3 },
            EventKind::TaskCancelled { term: 9 },
            EventKind::ChildSpawned { pid: 5 },
            EventKind::SigTerm,
            EventKind::Released,
            EventKind::Exit { code: 0 },
            EventKind::Error {
                message: "lock directory /x: is a symlink".to_owned(),
            },
            EventKind::Spawned,
            EventKind::Node {
                id: "host:42".to_owned(),
            },
            EventKind::HandingOver {
                term: 9,
                to: "host:43".to_owned(),
            },
            EventKind::Obeyed {
                order: Order::Drain,
            },
            EventKind::Obeyed {
                order: Order::HandOverTo("host:43".to_owned()),
            },
            EventKind::Drained,
            EventKind::Refused {
                order: Order::HandOverTo("x".to_owned()),
                message: "not a live candidate".to_owned(),
            },
            EventKind::Refused {
                order: Order::StepDown,
                message: "not primary".to_owned(),
            },
            EventKind::Signalled {
                signal: NodeSignal::Stop,
            },
            EventKind::Exited {
                code: None,
                signal: Some(9),
            },
        ];
        for kind in kinds {
            let e = ev(12_345, 42, kind);
            assert_eq!(Event::parse(&e.to_string()).as_ref(), Some(&e), "{e}");
        }
        assert!(Event::parse("EVENT 1 2 primary").is_none());
        assert!(Event::parse("EVENT 1 2 obeyed hand-over-to").is_none());
        assert_eq!(Order::parse("ready now"), None);
        assert!(Event::parse("test node_entry ... ok").is_none());
    }
}
