//! The node side: writes to the witness while primary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::Verdict;
use super::protocol::Request;
use tower_primary::clock::{Timestamp, monotonic_nanos};
use tower_primary::elector::Elector;
use tower_primary::role::TermContext;

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

pub(super) struct Connection {
    pub(super) reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    pub(super) writer: tokio::net::tcp::OwnedWriteHalf,
    pub(super) line: String,
}

impl Connection {
    pub(super) fn new(stream: TcpStream) -> Self {
        let (read, writer) = stream.into_split();
        Connection {
            reader: BufReader::new(read),
            writer,
            line: String::new(),
        }
    }

    pub(super) async fn send(&mut self, request: &Request) -> std::io::Result<Verdict> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::History;
    use crate::witness::{Witness, check, merge};

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
