//! A fenced witness: a tiny store that refuses writes carrying an older term than one it has
//! accepted, as a fencing-aware database does (`UPDATE … WHERE term <= $term`), and that logs
//! every write it was offered. With it a test (or the `chaos` example) proves more than "no two
//! primary periods overlapped": it shows what a stale primary's writes did downstream.
//!
//! Three parts:
//!
//! - [`Witness`], the store: a TCP server on 127.0.0.1 that answers each write with its
//!   [`Verdict`] and keeps a [`WriteRecord`] of it. Its rule is [`Fence`].
//! - [`write_while_primary`], the node side: a [singleton task](tower_primary::Elector::singleton_task)
//!   that, while the node is primary, checks [`TermContext::is_valid`] and then writes
//!   `(node, term, time of the check, wall clock, deadline)` every few milliseconds. The
//!   multi-process node processes of your tests run it (the repository's own node mode does when `TOWER_PRIMARY_TEST_WITNESS` is
//!   set.
//! - [`merge`] and [`check`], the judge: the writes are merged into the [`History`] of primary
//!   periods (deadlines, earliest evidence of a period), and every write is classified.
//!
//! # What is a violation
//!
//! A write is *unsafe* when its node claimed to be primary when it was not:
//! - its time (taken just before the node checked its term) lies outside its own period — after
//!   the period's reported end or deadline, whichever comes first;
//! - or a write with a higher term was checked before it: the writer task only runs after its
//!   node was granted the lock, so a lower term checked later was checked after a newer primary
//!   existed;
//! - or the witness accepted it although it had already accepted a higher term (a broken fence).
//!
//! An unsafe write the witness **accepted** is a stale write that reached the store: the failure
//! fencing exists to prevent. An unsafe write it **rejected** was a self-fencing failure that the
//! fence caught. Both are violations. Rejected writes that are not unsafe are expected: a node
//! that checked its term, was paused (`SIGSTOP`, a GC pause) and sent the write after a newer
//! primary had written is refused, which is what fencing is for.
//!
//! # Time
//!
//! Write times and deadlines are `CLOCK_MONOTONIC` nanoseconds
//! ([`monotonic_nanos`]), the clock of the
//! multi-process node events, when the elector runs on the system clock; on a
//! [`Clock::tokio`](tower_primary::Clock::tokio) they are that clock's nanoseconds. The witness stamps
//! `received_at` with `CLOCK_MONOTONIC` (display only).
//!
//! # Protocol
//!
//! One line per write, `write <term> <checked_at> <wall_ns> <deadline|-> <node>`, answered with
//! `accepted` or `rejected <highest term>`; a line that cannot be read is answered with
//! `error <message>` and the connection is closed. A node may hold one connection and send
//! writes one after another.
//!
//! # Examples
//!
//! Two electors on one lock, each writing to one witness while primary:
//!
//! ```
//! use std::time::Duration;
//! use tower_primary_testing::history::History;
//! use tower_primary_testing::witness::{self, Witness};
//! use tower_primary::{Elector, MemoryBackend, NodeId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Witness::start().await?;
//! let backend = MemoryBackend::new();
//! let mut electors = Vec::new();
//! for name in ["a", "b"] {
//!     let elector = Elector::builder("jobs")
//!         .backend(backend.connection())
//!         .node(NodeId::new(name))
//!         .spawn()?;
//!     witness::write_while_primary(&elector, store.addr(), name, Duration::from_millis(2));
//!     electors.push(elector);
//! }
//! store.wait_for(|writes| writes.len() >= 3).await;
//! for elector in electors {
//!     elector.shutdown().await;
//! }
//! // Here the periods come from the writes alone; a multi-process test passes the periods its
//! // nodes reported (`node::history`, on the same clock as the writes).
//! let records = store.records();
//! let history = witness::merge(&History::new(), &records);
//! let report = witness::check(&history, &records);
//! assert!(report.is_ok(), "{report}");
//! assert!(report.accepted >= 3);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::history::{History, Period, Report};
use crate::sync::lock;
use tower_primary::clock::{Timestamp, monotonic_nanos};
use tower_primary::elector::Elector;
use tower_primary::role::TermContext;

// ------------------------------------------------------------------------------------------------
// The rule

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

// ------------------------------------------------------------------------------------------------
// Records

/// One write as the witness saw it. See the [module docs](self) for the clocks.
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

    fn key(&self) -> (&str, u64, u64) {
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
struct Request {
    term: u64,
    checked_at: u64,
    wall_ns: u64,
    deadline: Option<u64>,
    node: String,
}

impl Request {
    fn parse(line: &str) -> Result<Request, String> {
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

// ------------------------------------------------------------------------------------------------
// The store

/// The fenced witness: a TCP server on 127.0.0.1 that applies the [`Fence`] rule to every write
/// and logs it. See the [module docs](self).
///
/// Runs on the tokio runtime it was started on; dropping it stops it.
#[derive(Clone)]
pub struct Witness {
    addr: SocketAddr,
    inner: Arc<Inner>,
    _stop: Arc<StopOnDrop>,
}

struct Inner {
    state: Mutex<State>,
    version: watch::Sender<usize>,
}

#[derive(Default)]
struct State {
    fence: Fence,
    records: Vec<WriteRecord>,
}

struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl fmt::Debug for Witness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Witness")
            .field("addr", &self.addr)
            .field("highest", &state.fence.highest())
            .field("records", &state.records.len())
            .finish()
    }
}

impl Witness {
    /// Starts a witness on a free port of 127.0.0.1.
    ///
    /// # Errors
    ///
    /// When no port can be bound.
    pub async fn start() -> std::io::Result<Self> {
        Witness::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a witness listening on `addr`.
    ///
    /// # Errors
    ///
    /// When `addr` cannot be bound.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            version: watch::channel(0).0,
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, inner.clone(), stop.clone()));
        Ok(Witness {
            addr,
            inner,
            _stop: Arc::new(StopOnDrop(stop)),
        })
    }

    /// The address writers connect to.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Offers a write directly (without the network), as a connection does, and returns the
    /// witness's answer.
    #[must_use = "the verdict says whether the write was taken"]
    pub fn offer(
        &self,
        node: &str,
        term: u64,
        checked_at: u64,
        deadline: Option<u64>,
        wall_ns: u64,
    ) -> Verdict {
        offer(
            &self.inner,
            Request {
                term,
                checked_at,
                wall_ns,
                deadline,
                node: node.to_owned(),
            },
        )
    }

    /// Every write so far, in the order the witness decided on them.
    #[must_use]
    pub fn records(&self) -> Vec<WriteRecord> {
        self.lock().records.clone()
    }

    /// How many writes so far.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether no write came yet.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The highest term accepted so far.
    #[must_use]
    pub fn highest(&self) -> Option<u64> {
        self.lock().fence.highest()
    }

    /// Waits until `condition` holds for the records (checked now and after every write).
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe.
    pub async fn wait_for(&self, mut condition: impl FnMut(&[WriteRecord]) -> bool) {
        let mut rx = self.inner.version.subscribe();
        loop {
            rx.borrow_and_update();
            if condition(&self.lock().records) {
                return;
            }
            // The sender lives in `inner`, which `self` keeps alive.
            let _ = rx.changed().await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }
}

fn offer(inner: &Inner, request: Request) -> Verdict {
    let mut state = lock(&inner.state);
    let verdict = state.fence.offer(request.term);
    state.records.push(WriteRecord {
        node: request.node,
        term: request.term,
        checked_at: request.checked_at,
        wall_ns: request.wall_ns,
        deadline: request.deadline,
        received_at: monotonic_nanos(),
        verdict,
    });
    let n = state.records.len();
    drop(state);
    inner.version.send_replace(n);
    verdict
}

async fn accept(listener: TcpListener, inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, inner.clone(), stop.clone()));
    }
}

async fn serve(stream: TcpStream, inner: Arc<Inner>, stop: CancellationToken) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    loop {
        let line = tokio::select! {
            () = stop.cancelled() => return,
            l = lines.next_line() => l,
        };
        let Ok(Some(line)) = line else { return };
        let reply = match Request::parse(&line) {
            Ok(request) => match offer(&inner, request) {
                Verdict::Accepted => "accepted\n".to_owned(),
                Verdict::Rejected { highest } => format!("rejected {highest}\n"),
            },
            Err(problem) => {
                let _ = write
                    .write_all(format!("error {problem}\n").as_bytes())
                    .await;
                return;
            }
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The node side

/// Registers a singleton task on `elector` that writes to the witness at `addr` every `every`
/// while this node is primary, as node `node` (a node process uses its pid, the node id of its
/// history lines).
///
/// Each write takes its time, reads the term's deadline, checks
/// [`TermContext::is_valid`] and only then sends `(term, time, wall clock, deadline)`; it waits
/// for the answer before the next. In that order a write's time is always before its
/// deadline on a correct elector, and the deadline it carries is one the node held when it wrote.
/// Rejected writes are logged at `debug`; a witness that cannot be reached is retried every
/// `every` (at least 50 ms) while the term lasts.
pub fn write_while_primary(
    elector: &Elector,
    addr: SocketAddr,
    node: impl Into<String>,
    every: Duration,
) {
    let node: Arc<str> = node.into().into();
    let handle = elector.handle();
    let every = every.max(Duration::from_micros(100));
    elector.singleton_task("tower-primary-witness", move |ctx: TermContext| {
        let node = node.clone();
        let handle = handle.clone();
        async move {
            let stamp = Stamp::new(handle.clock());
            let mut conn: Option<Connection> = None;
            loop {
                if conn.is_none() {
                    let connected = tokio::select! {
                        () = ctx.cancelled() => return Ok::<(), std::convert::Infallible>(()),
                        c = TcpStream::connect(addr) => c,
                    };
                    match connected {
                        Ok(stream) => {
                            let _ = stream.set_nodelay(true);
                            conn = Some(Connection::new(stream));
                        }
                        Err(err) => {
                            tracing::warn!(%addr, error = %err, "cannot reach the witness");
                            if ctx
                                .run_until_cancelled(tokio::time::sleep(
                                    every.max(Duration::from_millis(50)),
                                ))
                                .await
                                .is_none()
                            {
                                return Ok(());
                            }
                            continue;
                        }
                    }
                }
                // The order matters; see the function's docs.
                let (checked_at, offset) = stamp.now();
                let deadline = handle.deadline();
                if !ctx.is_valid() {
                    return Ok(());
                }
                let Some(deadline) = deadline else {
                    return Ok(());
                };
                let request = Request {
                    term: ctx.term(),
                    checked_at,
                    wall_ns: wall_ns(),
                    deadline: (deadline != Timestamp::NEVER)
                        .then(|| deadline.as_nanos().saturating_sub(offset)),
                    node: node.to_string(),
                };
                let Some(conn_ref) = conn.as_mut() else {
                    continue;
                };
                match ctx.run_until_cancelled(conn_ref.send(&request)).await {
                    None => return Ok(()),
                    Some(Ok(Verdict::Accepted)) => {}
                    Some(Ok(Verdict::Rejected { highest })) => {
                        tracing::debug!(
                            term = request.term,
                            highest,
                            "the witness refused a write"
                        );
                    }
                    Some(Err(err)) => {
                        tracing::warn!(%addr, error = %err, "witness connection failed");
                        conn = None;
                    }
                }
                if ctx
                    .run_until_cancelled(tokio::time::sleep(every))
                    .await
                    .is_none()
                {
                    return Ok(());
                }
            }
        }
    });
}

/// The clock writes are stamped on, and its offset from the elector's clock.
struct Stamp {
    clock: tower_primary::Clock,
}

impl Stamp {
    fn new(clock: tower_primary::Clock) -> Self {
        Stamp { clock }
    }

    /// The write's time, and `elector clock - write clock` to convert the deadline with.
    ///
    /// The monotonic time is read before the elector's clock: the offset is then over-estimated
    /// by the time between the reads, and a converted deadline comes out that much early, never
    /// late, and still after the write's time (the deadline was read after both).
    fn now(&self) -> (u64, u64) {
        if self.clock.is_tokio() {
            return (self.clock.now().as_nanos(), 0);
        }
        let mono = monotonic_nanos();
        let elector = self.clock.now().as_nanos();
        (mono, elector.saturating_sub(mono))
    }
}

fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

struct Connection {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Connection {
    fn new(stream: TcpStream) -> Self {
        let (read, writer) = stream.into_split();
        Connection {
            reader: BufReader::new(read),
            writer,
            line: String::new(),
        }
    }

    async fn send(&mut self, request: &Request) -> std::io::Result<Verdict> {
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .await?;
        self.line.clear();
        if self.reader.read_line(&mut self.line).await? == 0 {
            return Err(std::io::Error::other("the witness closed the connection"));
        }
        let reply = self.line.trim();
        if reply == "accepted" {
            return Ok(Verdict::Accepted);
        }
        if let Some(highest) = reply.strip_prefix("rejected ").and_then(|h| h.parse().ok()) {
            return Ok(Verdict::Rejected { highest });
        }
        Err(std::io::Error::other(format!(
            "the witness answered {reply:?}"
        )))
    }
}

// ------------------------------------------------------------------------------------------------
// The judge

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
/// [module docs](self#what-is-a-violation) say.
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
    use super::*;
    use crate::history::Period;

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

    #[tokio::test]
    async fn the_witness_refuses_older_terms_over_tcp_and_logs_both() {
        let witness = Witness::start().await.unwrap();
        let mut conn = Connection::new(TcpStream::connect(witness.addr()).await.unwrap());
        let write = |term, node: &str| Request {
            term,
            checked_at: 1,
            wall_ns: 2,
            deadline: Some(3),
            node: node.into(),
        };
        assert_eq!(conn.send(&write(5, "a")).await.unwrap(), Verdict::Accepted);
        assert_eq!(
            conn.send(&write(4, "b")).await.unwrap(),
            Verdict::Rejected { highest: 5 }
        );
        assert_eq!(conn.send(&write(6, "b")).await.unwrap(), Verdict::Accepted);
        assert_eq!(
            witness.offer("a", 5, 9, None, 0),
            Verdict::Rejected { highest: 6 }
        );
        let records = witness.records();
        let verdicts: Vec<(&str, u64, bool)> = records
            .iter()
            .map(|r| (r.node.as_str(), r.term, r.verdict.is_accepted()))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("a", 5, true),
                ("b", 4, false),
                ("b", 6, true),
                ("a", 5, false)
            ]
        );
        assert_eq!(records[0].deadline, Some(3));
        assert_eq!(witness.highest(), Some(6));

        // A line it cannot read is answered and the connection closed.
        conn.writer.write_all(b"hello\n").await.unwrap();
        conn.line.clear();
        conn.reader.read_line(&mut conn.line).await.unwrap();
        assert!(conn.line.starts_with("error "), "{}", conn.line);
        assert_eq!(witness.len(), 4);
    }

    #[tokio::test]
    async fn electors_write_only_while_primary_and_a_handover_moves_the_writes() {
        use tower_primary::{MemoryBackend, NodeId};

        let witness = Witness::start().await.unwrap();
        let backend = MemoryBackend::new();
        let a = Elector::builder("witness-handover")
            .backend(backend.clone())
            .node(NodeId::new("a"))
            .spawn()
            .unwrap();
        write_while_primary(&a, witness.addr(), "a", Duration::from_millis(1));
        let ta = a.handle().wait_primary().await.term();
        let b = Elector::builder("witness-handover")
            .backend(backend.connection())
            .node(NodeId::new("b"))
            .spawn()
            .unwrap();
        write_while_primary(&b, witness.addr(), "b", Duration::from_millis(1));
        witness
            .wait_for(|w| w.iter().filter(|r| r.node == "a").count() >= 3)
            .await;
        a.shutdown().await;
        let tb = b.handle().wait_primary().await.term();
        witness.wait_for(|w| w.iter().any(|r| r.node == "b")).await;
        b.shutdown().await;

        let records = witness.records();
        assert!(records.iter().all(|r| r.verdict.is_accepted()));
        assert!(
            records.iter().all(|r| r.deadline.is_none()),
            "memory has no lease"
        );
        let last_a = records.iter().rposition(|r| r.node == "a").unwrap();
        let first_b = records.iter().position(|r| r.node == "b").unwrap();
        assert!(last_a < first_b, "a wrote after b: {records:?}");
        assert!(records[..=last_a].iter().all(|r| r.term == ta));
        assert!(records[first_b..].iter().all(|r| r.term == tb));
        assert!(tb > ta);
        // A stale write now is refused.
        assert_eq!(
            witness.offer("a", ta, monotonic_nanos(), None, 0),
            Verdict::Rejected { highest: tb }
        );
        // Writes alone make a consistent history.
        let report = check(&merge(&History::new(), &records), &records);
        assert!(report.is_ok(), "{report}");
    }
}
