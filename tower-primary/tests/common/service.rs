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

// ------------------------------------------------------------------------------------------------
// Instances of the example service and a rolling deploy over them (`tests/deploy.rs`,
// `examples/deploy_bench`).

/// Starts the example service with the given flags: a command for this binary's service side.
pub(crate) type Launcher = dyn Fn(&str) -> tokio::process::Command + Send + Sync;

/// One instance of the example service: a supervisor and its workers, with a state folder of its
/// own (a host of its own: its own host group on a server backend).
pub(crate) struct Instance {
    /// `old0`, `new2`, … for the report.
    pub(crate) name: String,
    child: Child,
    pub(crate) log: Log,
    state: tempfile::TempDir,
    pub(crate) port: u16,
    pub(crate) base: u16,
    pub(crate) workers: u16,
    /// The workers' pids, once [`wait_ready`](Self::wait_ready) returned.
    pub(crate) pids: Vec<u32>,
}

impl Instance {
    /// Starts an instance with `--workers workers`, its own `--state-dir`, `--bind` and
    /// `--worker-ports`, and `flags` (the backend, the priority, …).
    pub(crate) fn start(launch: &Launcher, name: &str, workers: u16, flags: &str) -> Instance {
        let state = tempfile::tempdir().unwrap();
        let (port, base) = free_ports(workers);
        let args = format!(
            "--workers {workers} --bind 127.0.0.1:{port} --worker-ports {base} --state-dir {} \
             {flags}",
            state.path().display()
        );
        let mut cmd = launch(&args);
        cmd.env("RUST_LOG", "info")
            .env_remove(tower_primary::role::WORKER_ENV)
            .env_remove(tower_primary::PRIORITY_ENV)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let log = Log::follow(&mut child);
        Instance {
            name: name.to_owned(),
            child,
            log,
            state,
            port,
            base,
            workers,
            pids: Vec::new(),
        }
    }

    /// Worker `index`'s own URL for `path`.
    pub(crate) fn worker_url(&self, index: u16, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.base + index)
    }

    /// Waits until every worker has logged `worker ready` (migrated, listening, listed ready in
    /// the registry), then checks that each one's `/health/ready` answers 200.
    pub(crate) async fn wait_ready(&mut self, client: &HttpClient) {
        let mut pids = Vec::new();
        for index in 0..self.workers {
            // `--workers 1` runs in the supervisor's place: its worker is `-`.
            let name = if self.workers == 1 {
                "-".to_owned()
            } else {
                index.to_string()
            };
            let (at, line) = self
                .log
                .wait(0, &format!("{} worker {index} startup", self.name), |l| {
                    l.contains("worker startup ") && field(l, "worker") == Some(name.as_str())
                })
                .await;
            let pid: u32 = num(&line, "pid");
            self.log
                .wait(at, &format!("{} worker {index} ready", self.name), |l| {
                    l.contains("worker ready ") && field(l, "pid") == Some(pid.to_string().as_str())
                })
                .await;
            pids.push(pid);
        }
        for index in 0..self.workers {
            let url = self.worker_url(index, "/health/ready");
            let (status, _, text) = request(client, "GET", &url, "").await;
            assert_eq!(status, StatusCode::OK, "{} {url}: {text}", self.name);
        }
        self.pids = pids;
    }

    /// SIGTERM to the supervisor; waits until it and its workers have exited (cleanly).
    pub(crate) async fn stop(&mut self) {
        let pid = self.child.id().expect("the supervisor is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let exit = timeout(BOUND, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not stop\n{}", self.name, self.log.dump()))
            .unwrap();
        assert!(exit.success(), "{}: {exit}\n{}", self.name, self.log.dump());
        self.log.ended().await;
    }

    /// The state folder.
    pub(crate) fn dir(&self) -> &std::path::Path {
        self.state.path()
    }

    /// The terms this instance's workers led, from their log lines (`worker startup …
    /// primary=true` and `role changed … role=primary`): (term, pid).
    pub(crate) fn primary_terms(&self) -> Vec<(u64, u32)> {
        self.log
            .snapshot()
            .iter()
            .filter(|l| {
                (l.contains("worker startup ") && field(l, "primary") == Some("true"))
                    || (l.contains("role changed ") && field(l, "role") == Some("primary"))
            })
            .map(|l| (num(l, "term"), num(l, "pid")))
            .collect()
    }
}

/// A rolling deploy and what it did.
#[derive(Debug, Clone)]
pub(crate) struct Deploy {
    /// Every term led during the deploy and the settling before it, in term order:
    /// (term, instance name, pid).
    pub(crate) terms: Vec<(u64, String, u32)>,
    /// The primary when the deploy started.
    pub(crate) first: (u64, String, u32),
    /// Primary changes from then on (a new term led by another process).
    pub(crate) moves: usize,
    /// Of those, the moves to a new instance and to an old one.
    pub(crate) to_new: usize,
    pub(crate) to_old: usize,
    /// The primary at the end.
    pub(crate) last: (u64, String, u32),
    /// From the first new instance's start to the last old instance's exit, and to the final
    /// primary known.
    pub(crate) total: Duration,
    /// The elector's handover and acquisition log lines of every instance, in time order, each
    /// prefixed with its instance: to explain a move.
    pub(crate) events: Vec<String>,
    /// For every handover (`handing the lock over` logged by the primary), the time until the
    /// next `became primary` line of any instance (the log lines' own timestamps, one host).
    pub(crate) gaps: Vec<Duration>,
}

impl Deploy {
    /// Whether the primary at the end is a new instance.
    pub(crate) fn ends_on_new(&self) -> bool {
        self.last.1.starts_with("new")
    }
}

/// Every term the instances' workers led, in term order: (term, instance, pid).
fn terms_of(instances: &[&Instance]) -> Vec<(u64, String, u32)> {
    let mut terms: Vec<(u64, String, u32)> = instances
        .iter()
        .flat_map(|i| {
            i.primary_terms()
                .into_iter()
                .map(|(t, pid)| (t, i.name.clone(), pid))
        })
        .collect();
    terms.sort();
    terms.dedup();
    terms
}

/// Waits until `pred` holds for some instance in `instances`, checked at every log line.
async fn wait_any(instances: &[&Instance], what: &str, pred: impl Fn(&Instance) -> bool) {
    let found = timeout(BOUND, async {
        let mut changes: Vec<_> = instances.iter().map(|i| i.log.changes()).collect();
        loop {
            if instances.iter().any(|i| pred(i)) {
                return true;
            }
            if changes.is_empty() {
                return false;
            }
            let waits = changes.iter_mut().map(|c| Box::pin(c.changed()));
            let (res, at, _) = futures_util::future::select_all(waits).await;
            if res.is_err() {
                // That output has ended.
                changes.remove(at);
            }
        }
    })
    .await;
    let dump = || {
        instances
            .iter()
            .map(|i| format!("=== {}\n{}", i.name, i.log.dump()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    match found {
        Ok(true) => {}
        Ok(false) => panic!("every output ended before {what}\n{}", dump()),
        Err(_) => panic!("no {what} within {BOUND:?}\n{}", dump()),
    }
}

/// A rolling deploy with surge 1 over `count` instances of `workers` workers each, all on the
/// backend that `flags` names: starts `count` old instances with priority `old`, waits for a
/// primary, then `count` times starts a new instance with priority `new`, waits until it is ready
/// (`/health/ready`), SIGTERMs the oldest old instance and waits for it to exit. Then waits for
/// the primary to be a new instance's, stops the new instances, and reports the primary changes
/// (from the instances' log lines).
pub(crate) async fn rolling_deploy(
    launch: &Launcher,
    flags: &str,
    count: usize,
    workers: u16,
    old: u64,
    new: u64,
) -> Deploy {
    let client = client();
    let mut olds = Vec::new();
    for k in 0..count {
        let mut i = Instance::start(
            launch,
            &format!("old{k}"),
            workers,
            &format!("{flags} --priority {old}"),
        );
        i.wait_ready(&client).await;
        olds.push(i);
    }
    {
        let refs: Vec<&Instance> = olds.iter().collect();
        wait_any(&refs, "first primary", |i| !i.primary_terms().is_empty()).await;
    }
    let first = terms_of(&olds.iter().collect::<Vec<_>>())
        .last()
        .cloned()
        .unwrap();

    let started = tokio::time::Instant::now();
    let mut news = Vec::new();
    for (k, oldest) in olds.iter_mut().enumerate() {
        let mut i = Instance::start(
            launch,
            &format!("new{k}"),
            workers,
            &format!("{flags} --priority {new}"),
        );
        i.wait_ready(&client).await;
        news.push(i);
        oldest.stop().await;
    }
    // Every old instance is gone: the primary is (or is about to be) a new one, with a term
    // above every old one's.
    let old_top = terms_of(&olds.iter().collect::<Vec<_>>())
        .last()
        .map_or(0, |t| t.0);
    {
        let refs: Vec<&Instance> = news.iter().collect();
        wait_any(&refs, "a primary on a new instance", |i| {
            i.primary_terms().iter().any(|(t, _)| *t > old_top)
        })
        .await;
    }
    let total = started.elapsed();
    let all: Vec<&Instance> = olds.iter().chain(news.iter()).collect();
    let terms = terms_of(&all);
    let last = terms.last().cloned().unwrap();
    // The primary's own /health/role agrees.
    let at = news.iter().find(|i| i.name == last.1).unwrap();
    let index = at.pids.iter().position(|p| *p == last.2).unwrap();
    let (status, _, text) = request(
        &client,
        "GET",
        &at.worker_url(u16::try_from(index).unwrap(), "/health/role"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let role: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(role["role"], "primary", "{text}");
    assert_eq!(role["term"], last.0, "{text}");

    let mut moves = 0;
    let (mut to_new, mut to_old) = (0, 0);
    let mut prev = first.clone();
    for t in terms.iter().filter(|t| t.0 > first.0) {
        if t.2 != prev.2 {
            moves += 1;
            if t.1.starts_with("new") {
                to_new += 1;
            } else {
                to_old += 1;
            }
        }
        prev = t.clone();
    }
    let mut events: Vec<(String, String)> = all
        .iter()
        .flat_map(|i| {
            i.log
                .snapshot()
                .into_iter()
                .filter(|l| {
                    l.contains("tower_primary")
                        && (l.contains("handing the lock over")
                            || l.contains("became primary")
                            || l.contains("reserv")
                            || l.contains("passed over")
                            || l.contains("stepping down"))
                })
                .map(|l| (l, i.name.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    events.sort();
    let stamp = |l: &str| {
        l.split_whitespace()
            .next()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
    };
    let mut gaps = Vec::new();
    let mut handing: Option<std::time::SystemTime> = None;
    for (l, _) in &events {
        if l.contains("handing the lock over") {
            handing = stamp(l);
        } else if l.contains("became primary")
            && let (Some(from), Some(to)) = (handing.take(), stamp(l))
        {
            gaps.push(to.duration_since(from).unwrap_or_default());
        }
    }
    let events = events
        .into_iter()
        .map(|(l, name)| format!("{name}: {l}"))
        .collect();
    for i in &mut news {
        i.stop().await;
    }
    Deploy {
        terms,
        first,
        moves,
        to_new,
        to_old,
        last,
        total,
        events,
        gaps,
    }
}
