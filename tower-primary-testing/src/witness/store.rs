//! The witness store and its TCP server.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::protocol::Request;
use super::{Fence, Verdict, WriteRecord};
use crate::sync::lock;
use tower_primary::clock::monotonic_nanos;

/// The fenced witness: a TCP server on 127.0.0.1 that applies the [`Fence`] rule to every write
/// and logs it. See the [module docs](crate::witness).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness::writer::Connection;

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
}
