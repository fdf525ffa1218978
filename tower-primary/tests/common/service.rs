//! What the example service's tests share (`tests/scheduler.rs`, `tests/scheduler_hosts.rs`):
//! the service's log as events, its `key=value` fields, free ports and an HTTP client.

// Each of the two test binaries uses part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::timeout;

/// A bound on waits for events that must happen, so a bug fails the test instead of hanging
/// it. Never used as synchronisation.
pub(crate) const BOUND: Duration = Duration::from_secs(60);

/// Every line a process wrote to its stdout, in arrival order, and a watch of their count.
#[derive(Clone)]
pub(crate) struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
}

impl Default for Log {
    /// The log of no process yet: no lines, already ended.
    fn default() -> Self {
        Log {
            lines: Arc::default(),
            count: watch::channel(0).1,
        }
    }
}

impl Log {
    /// Follows `child`'s stdout (piped); the count's sender is dropped when it ends.
    pub(crate) fn follow(child: &mut Child) -> Log {
        let stdout = child.stdout.take().expect("a piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, count) = watch::channel(0);
        tokio::spawn({
            let lines = lines.clone();
            async move {
                let mut reader = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    let n = {
                        let mut lines = lines.lock().unwrap();
                        lines.push(line);
                        lines.len()
                    };
                    count_tx.send_replace(n);
                }
                // Dropping the sender tells waiters that the output has ended.
            }
        });
        Log { lines, count }
    }

    /// A watch of the line count, for waiting on several logs at once; it errs once the output
    /// has ended.
    pub(crate) fn changes(&self) -> watch::Receiver<usize> {
        self.count.clone()
    }

    pub(crate) fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// The first line at index `from` or later that `pred` accepts, if it has arrived, with its
    /// index.
    pub(crate) fn find(&self, from: usize, pred: impl Fn(&str) -> bool) -> Option<(usize, String)> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| pred(l))
            .map(|(i, l)| (i, l.clone()))
    }

    /// Waits for the first line at index `from` or later that `pred` accepts (`what` names it
    /// in the panic when it does not come within [`BOUND`]).
    pub(crate) async fn wait(
        &self,
        from: usize,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        let mut count = self.count.clone();
        let found = timeout(BOUND, async {
            loop {
                if let Some(hit) = self.find(from, &pred) {
                    return Some(hit);
                }
                if count.changed().await.is_err() {
                    return self.find(from, &pred);
                }
            }
        })
        .await;
        match found {
            Ok(Some(hit)) => hit,
            Ok(None) => panic!("the output ended before {what}\n{}", self.dump()),
            Err(_) => panic!("no {what} within {BOUND:?}\n{}", self.dump()),
        }
    }

    /// Waits until the output has ended (every writer of the pipe is gone), at most [`BOUND`].
    pub(crate) async fn ended(&self) {
        let mut count = self.count.clone();
        timeout(BOUND, async { while count.changed().await.is_ok() {} })
            .await
            .unwrap_or_else(|_| panic!("the output did not end\n{}", self.dump()));
    }

    /// The last lines, for a failure message.
    pub(crate) fn dump(&self) -> String {
        let lines = self.snapshot();
        let from = lines.len().saturating_sub(150);
        format!("--- last log lines ---\n{}", lines[from..].join("\n"))
    }
}

/// The value of `key=` in a log or file line.
pub(crate) fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The number after `key=` in `line` (a trailing `:` ignored).
pub(crate) fn num<T: std::str::FromStr>(line: &str, key: &str) -> T {
    field(line, key)
        .and_then(|v| v.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

/// A free port for `--bind` and `n` consecutive free ports for `--worker-ports`.
pub(crate) fn free_ports(n: u16) -> (u16, u16) {
    let shared = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = shared.local_addr().unwrap().port();
    for _ in 0..200 {
        let base = fastrand::u16(20_000..60_000);
        let held: Vec<_> = (base..base + n)
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) && !(base..base + n).contains(&port) {
            return (port, base);
        }
    }
    panic!("no {n} consecutive free ports");
}

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub(crate) fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One request with a JSON body: status, headers and body text (bounded by [`BOUND`]).
pub(crate) async fn request(
    client: &HttpClient,
    method: &str,
    url: &str,
    body: &str,
) -> (StatusCode, HeaderMap, String) {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let res = timeout(BOUND, client.request(req))
        .await
        .unwrap_or_else(|_| panic!("{method} {url} timed out"))
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}
