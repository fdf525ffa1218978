//! `examples/scheduler` end to end, with real processes: a supervisor and 4 workers on one lock
//! directory, 200 emails queued through all workers, the primary worker SIGKILLed 5 times at
//! random moments, then everything checked from the files and the logs. Smaller runs check
//! delivery over SMTP and every worker's `GET /metrics` against its `/health/role`.
//!
//! # How the service runs
//!
//! This test binary compiles the example's modules (`#[path]` below) and re-executes itself:
//! the `scheduler_entry` test returns at once unless `TOWER_PRIMARY_SCHEDULER_TEST_ARGS` is set;
//! then it runs the example with those arguments, as `cargo run --example scheduler -- …` would.
//! The example's supervisor re-executes the same command line with `TOWER_PRIMARY_WORKER=<i>`,
//! so the workers are this binary too. The test reads the service's log lines (stdout, shared by
//! the supervisor and its workers) as events; it never sleeps to synchronise. Its one sleep is
//! the random moment of each kill.
//!
//! ```text
//! cargo test --test scheduler -- --nocapture
//! ```

#[path = "../examples/scheduler/main.rs"]
#[allow(dead_code)]
mod scheduler;
#[path = "common/service.rs"]
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::timeout;
use tower_primary::http::health::{ReadinessReport, RoleReport};

use self::service::{BOUND, HttpClient, Log, client, field, free_ports, num, request};

const ARGS_ENV: &str = "TOWER_PRIMARY_SCHEDULER_TEST_ARGS";

/// Both tests start many processes on a 2-core machine: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The service side of this binary (see the module docs).
#[test]
fn scheduler_entry() {
    let Ok(args) = std::env::var(ARGS_ENV) else {
        return;
    };
    let args = scheduler::Args::try_from_flags(args.split_whitespace()).expect("valid flags");
    let code = i32::from(scheduler::run(&args).is_err());
    std::process::exit(code);
}

// ------------------------------------------------------------------------------------------------
// The test side

/// The running service: the supervisor process and its log.
struct Service {
    child: Child,
    log: Log,
    state: tempfile::TempDir,
    port: u16,
    base: u16,
    workers: u16,
}

impl Service {
    async fn start(workers: u16, extra: &str) -> Service {
        let state = tempfile::tempdir().unwrap();
        let (port, base) = free_ports(workers);
        let args = format!(
            "--workers {workers} --bind 127.0.0.1:{port} --worker-ports {base} --admin-mode redirect \
             --state-dir {} {extra}",
            state.path().display()
        );
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "scheduler_entry",
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "--quiet",
            ])
            .env(ARGS_ENV, &args)
            .env("RUST_LOG", "info")
            .env_remove(tower_primary::role::WORKER_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Log::follow(&mut child);
        Service {
            child,
            log,
            state,
            port,
            base,
            workers,
        }
    }

    /// SIGTERM to the supervisor; waits for it to exit and checks that it exited cleanly.
    /// Returns the log lines written from the signal on.
    async fn stop(&mut self) -> Vec<String> {
        let mark = self.log.len();
        let pid = self.child.id().expect("the supervisor is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let exit = timeout(BOUND, self.child.wait())
            .await
            .expect("the supervisor stops")
            .unwrap();
        assert!(exit.success(), "{exit}\n{}", self.log.dump());
        // The reader sees the end of the pipe once every worker is gone too.
        self.log.ended().await;
        let lines = self.log.snapshot();
        assert!(
            lines[mark..]
                .iter()
                .any(|l| l.contains("supervisor stopped ")),
            "{}",
            self.log.dump()
        );
        lines[mark..].to_vec()
    }

    fn dir(&self) -> &Path {
        self.state.path()
    }

    fn worker_url(&self, index: u16, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.base + index)
    }

    fn shared_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until every worker index has logged `worker ready` (as a worker started at or after
    /// log line `from`), and returns pid → worker index.
    async fn wait_workers_ready(&self, from: usize, indexes: &[u16]) -> BTreeMap<u32, u16> {
        let mut pids = BTreeMap::new();
        for &index in indexes {
            let (at, line) = self
                .log
                .wait(from, &format!("startup of worker {index}"), |l| {
                    l.contains("worker startup ")
                        && field(l, "worker") == Some(index.to_string().as_str())
                })
                .await;
            let pid: u32 = num(&line, "pid");
            self.log
                .wait(at, &format!("readiness of worker {index}"), |l| {
                    l.contains("worker ready ") && field(l, "pid") == Some(pid.to_string().as_str())
                })
                .await;
            pids.insert(pid, index);
        }
        pids
    }
}

async fn role_of(client: &HttpClient, url: &str) -> RoleReport {
    let (status, _, text) = request(client, "GET", url, "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Queues `n` emails, spread over the workers' own ports and the shared port; returns their ids.
async fn queue_emails(
    service: &Service,
    client: &HttpClient,
    round: usize,
    n: usize,
) -> Vec<String> {
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..n {
        let url = match i % (usize::from(service.workers) + 1) {
            0 => service.shared_url("/emails"),
            w => service.worker_url(u16::try_from(w - 1).unwrap(), "/emails"),
        };
        let body = serde_json::json!({
            "to": format!("user{i}@example.com"),
            "subject": format!("round {round} email {i}"),
            "body": format!("Hello {i}, this is round {round}."),
        })
        .to_string();
        let client = client.clone();
        requests.spawn(async move { request(&client, "POST", &url, &body).await });
    }
    let mut ids = Vec::new();
    while let Some(res) = requests.join_next().await {
        let (status, _, text) = res.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        ids.push(json["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Malformed requests get 400 with a message, on every worker.
async fn send_malformed(service: &Service, client: &HttpClient) -> usize {
    let bad = [
        ("{not json", "expected JSON"),
        ("[]", "expected JSON"),
        ("", "expected JSON"),
        (r#"{"to": "a@example.com", "subject": "no body"}"#, "body"),
        (
            r#"{"to": "not an address", "subject": "s", "body": "b"}"#,
            "bad address",
        ),
        (
            r#"{"to": "@example.com", "subject": "s", "body": "b"}"#,
            "bad address",
        ),
        (
            r#"{"to": "a@example.com", "subject": "two\nlines", "body": "b"}"#,
            "one line",
        ),
        (r#"{"to": 7, "subject": "s", "body": "b"}"#, "expected JSON"),
    ];
    for (i, (body, says)) in bad.iter().enumerate() {
        let url = service.worker_url(u16::try_from(i).unwrap() % service.workers, "/emails");
        let (status, _, text) = request(client, "POST", &url, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?} → {text}");
        assert!(
            text.contains(says),
            "{body:?} → {text} (expected it to say {says:?})"
        );
    }
    bad.len()
}

/// The `.json`/`.eml` files of a folder, without the temporary `.tmp-…` ones.
fn listing(dir: &Path, ext: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.starts_with('.'))
                .filter_map(|n| n.strip_suffix(ext).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// One line of `runs.log`.
#[derive(Debug, Clone)]
struct RunLine {
    job: String,
    slot: String,
    term: u64,
    pid: u32,
    start: u128,
    end: u128,
    manual: bool,
}

fn runs_log(dir: &Path) -> Vec<RunLine> {
    read(&dir.join("runs.log"))
        .lines()
        .map(|l| {
            let mut words = l.split(' ');
            RunLine {
                job: words.next().unwrap().to_owned(),
                slot: words.next().unwrap().to_owned(),
                term: num(l, "term"),
                pid: num(l, "pid"),
                start: num(l, "start"),
                end: num(l, "end"),
                manual: field(l, "manual") == Some("true"),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_and_reports_survive_five_kills_of_the_primary_worker() {
    let _serial = SERIAL.lock().await;
    const KILLS: usize = 5;
    const PER_ROUND: usize = 40;
    // Each report and each email send takes this long (`--simulate-work`).
    const WORK: Duration = Duration::from_millis(10);
    let mut service = Service::start(
        4,
        &format!(
            "--report-every 1s --catch-up 100 --simulate-work {}ms",
            WORK.as_millis()
        ),
    )
    .await;
    let log = service.log.clone();
    let client = client();
    let all: Vec<u16> = (0..service.workers).collect();
    let mut live = service.wait_workers_ready(0, &all).await;

    // Readiness: the migration ran once, on the primary; every worker says ready.
    let migrations: Vec<_> = log
        .snapshot()
        .into_iter()
        .filter(|l| l.contains("migration done "))
        .collect();
    assert_eq!(migrations.len(), 1, "{migrations:?}");
    for index in &all {
        let (status, _, text) = request(
            &client,
            "GET",
            &service.worker_url(*index, "/health/ready"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let ready: ReadinessReport = serde_json::from_str(&text).unwrap();
        assert!(
            ready.ready && ready.jobs.iter().all(|j| j.done),
            "{ready:?}"
        );
        let (status, _, text) = request(
            &client,
            "GET",
            &service.worker_url(*index, "/health/live"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }

    // Malformed requests: 400, and nothing queued.
    let mut malformed = send_malformed(&service, &client).await;
    assert!(listing(&service.dir().join("outbox"), ".json").is_empty());

    let mut accepted = BTreeSet::new();
    let mut killed: Vec<u32> = Vec::new();
    let mut terms = Vec::new();
    let mut last_failover = None;
    for round in 0..KILLS {
        // Who is primary now (asked of any worker).
        let role = role_of(&client, &service.shared_url("/health/role")).await;
        let holder = role.holder.expect("a primary");
        terms.push(holder.term);
        let primary = holder.pid;
        assert!(
            live.contains_key(&primary),
            "{primary} is not a live worker"
        );

        let ids = queue_emails(&service, &client, round, PER_ROUND).await;
        accepted.extend(ids);
        if round == 2 {
            malformed += send_malformed(&service, &client).await;
        }
        // The fault, at a random moment: while the primary works through the outbox (even
        // rounds), or while it writes a report (odd rounds).
        let mark = log.len();
        if round % 2 == 1 {
            log.wait(mark, "a report by the primary", |l| {
                l.contains("report started ")
                    && field(l, "pid") == Some(primary.to_string().as_str())
            })
            .await;
            tokio::time::sleep(WORK.mul_f64(fastrand::f64())).await;
        } else {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..400))).await;
        }
        let mark = log.len();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(primary).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        killed.push(primary);
        let index = live.remove(&primary).unwrap();

        // A surviving worker takes over with a higher term, the supervisor restarts the dead one,
        // and the new primary runs the report.
        let (at, line) = log
            .wait(mark, "a new primary", |l| {
                l.contains("role changed ") && field(l, "role") == Some("primary")
            })
            .await;
        let new_primary: u32 = num(&line, "pid");
        let new_term: u64 = num(&line, "term");
        last_failover = Some((at, new_primary));
        assert_ne!(new_primary, primary);
        assert!(live.contains_key(&new_primary), "{line}");
        assert!(
            new_term > holder.term,
            "term {new_term} after {}",
            holder.term
        );
        let (_, restarted) = log
            .wait(mark, "the restart of the killed worker", |l| {
                l.contains("worker started ")
                    && field(l, "worker") == Some(index.to_string().as_str())
            })
            .await;
        assert!(!restarted.contains(&format!("pid={primary}")));
        live.extend(service.wait_workers_ready(mark, &[index]).await);
        log.wait(at, "a report by the new primary", |l| {
            l.contains("report done ") && field(l, "pid") == Some(new_primary.to_string().as_str())
        })
        .await;
    }
    assert_eq!(accepted.len(), KILLS * PER_ROUND);

    // The last primary empties the outbox (every email was queued before the last kill); the
    // files below show that nothing was lost.
    let (last_kill, last_primary) = last_failover.expect("a failover");
    log.wait(last_kill, "an empty outbox", |l| {
        l.contains("email sender idle ")
            && field(l, "pid") == Some(last_primary.to_string().as_str())
    })
    .await;

    // Admin routes: a secondary redirects to the primary's own port, which queues a report run.
    let role = role_of(&client, &service.shared_url("/health/role")).await;
    let holder = role.holder.expect("a primary");
    terms.push(holder.term);
    let primary_url = holder.url.clone().expect("the primary advertises its port");
    let secondary = live
        .iter()
        .find(|(pid, _)| **pid != holder.pid)
        .map(|(_, index)| *index)
        .unwrap();
    let (status, headers, _) = request(
        &client,
        "POST",
        &service.worker_url(secondary, "/admin/report-now"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
    let location = headers["location"].to_str().unwrap().to_owned();
    assert_eq!(location, format!("{primary_url}/admin/report-now"));
    let (status, _, text) = request(&client, "POST", &location, "").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    let manual_slot = serde_json::from_str::<serde_json::Value>(&text).unwrap()["slot"]
        .as_str()
        .unwrap()
        .to_owned();
    log.wait(0, "the manual report run", |l| {
        l.contains("report done ") && field(l, "slot") == Some(manual_slot.as_str())
    })
    .await;
    let (status, _, text) =
        request(&client, "GET", &format!("{primary_url}/admin/status"), "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["outbox"], 0, "{status}");
    assert_eq!(status["sent"], KILLS * PER_ROUND, "{status}");

    // A graceful stop: SIGTERM to the supervisor stops every worker, and nothing is restarted.
    let after = service.stop().await;
    let log_lines = log.snapshot();
    assert!(
        !after.iter().any(|l| l.contains("worker started ")),
        "restarted during shutdown:\n{}",
        after.join("\n")
    );
    for pid in live.keys() {
        assert!(
            after.iter().any(|l| l.contains("worker stopped ")
                && field(l, "pid") == Some(pid.to_string().as_str())
                && field(l, "status") == Some("exit-0")),
            "worker {pid} did not stop cleanly:\n{}",
            after.join("\n")
        );
    }

    // No work starts in a worker after it began stepping down for the shutdown (its term is over).
    for (i, line) in log_lines.iter().enumerate() {
        if !(line.contains("stepping down") && line.contains("shutdown")) {
            continue;
        }
        let Some(pid) = field(line, "node")
            .and_then(|node| node.split(':').find_map(|part| part.parse::<u32>().ok()))
        else {
            continue;
        };
        let late: Vec<&String> = log_lines[i..]
            .iter()
            .filter(|l| {
                (l.contains("email sender started ") || l.contains("report started "))
                    && field(l, "pid") == Some(pid.to_string().as_str())
            })
            .collect();
        assert!(
            late.is_empty(),
            "worker {pid} started work after stepping down:\n{line}\n{late:?}"
        );
    }

    // ---- The files ----
    let dir = service.dir();
    // No email lost; nothing but the accepted ones (the malformed requests changed nothing).
    let sent = listing(&dir.join("sent"), ".eml");
    assert_eq!(sent, accepted, "sent/ differs from the accepted emails");
    assert!(listing(&dir.join("outbox"), ".json").is_empty());
    assert!(listing(&dir.join("failed"), ".json").is_empty());
    // What killed primaries left half-written was cleaned up by their successors.
    for folder in ["outbox", "sent", "reports"] {
        let tmp: Vec<_> = std::fs::read_dir(dir.join(folder))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(tmp.is_empty(), "{folder}: {tmp:?}");
    }

    // deliveries.log: each accepted id at least once; a second delivery only for the email a
    // killed primary was sending, at most one per kill, with the same Message-ID and a newer term.
    let mut deliveries: BTreeMap<String, Vec<(u64, u32, String)>> = BTreeMap::new();
    for line in read(&dir.join("deliveries.log")).lines() {
        let id = line.split(' ').next().unwrap().to_owned();
        assert!(
            accepted.contains(&id),
            "unknown id in deliveries.log: {line}"
        );
        deliveries.entry(id).or_default().push((
            num(line, "term"),
            num(line, "pid"),
            field(line, "message-id").unwrap().to_owned(),
        ));
    }
    assert_eq!(deliveries.len(), accepted.len());
    let mut resent_by: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for (id, lines) in &deliveries {
        let message_id = scheduler_message_id(id);
        for (term, _, mid) in lines {
            assert_eq!(mid, &message_id, "{id}");
            assert!(
                terms.contains(term),
                "{id} delivered under an unknown term: {lines:?}"
            );
        }
        for pair in lines.windows(2) {
            let ((t0, p0, _), (t1, _, _)) = (&pair[0], &pair[1]);
            assert!(t1 > t0, "{id} delivered twice by one term: {lines:?}");
            assert!(
                killed.contains(p0),
                "{id} delivered again after a live primary: {lines:?}"
            );
            resent_by.entry(*p0).or_default().push(id);
        }
        // The .eml on disk is the last delivery's (same Message-ID, its term).
        let eml = read(&dir.join("sent").join(format!("{id}.eml")));
        assert!(eml.contains(&format!("Message-ID: {message_id}")), "{eml}");
        let (last_term, _, _) = lines.last().unwrap();
        assert!(
            eml.contains(&format!("X-Primary-Term: {last_term}")),
            "{id}: {eml}"
        );
    }
    for (pid, ids) in &resent_by {
        assert_eq!(ids.len(), 1, "killed primary {pid} left {ids:?} to resend");
    }
    let resent: usize = resent_by.values().map(Vec::len).sum();
    assert!(resent <= KILLS);

    // runs.log: runs never overlap, no slot was completed twice (by two terms or one), and with
    // CatchUpAll no slot between the first and the last is missing.
    let mut runs = runs_log(dir);
    assert!(runs.iter().all(|r| r.job == "report"));
    runs.sort_by_key(|r| r.start);
    for pair in runs.windows(2) {
        assert!(
            pair[0].end <= pair[1].start,
            "overlapping runs: {:?} and {:?}",
            pair[0],
            pair[1]
        );
        assert!(
            pair[0].term <= pair[1].term,
            "a stale term ran later: {pair:?}"
        );
    }
    let scheduled: Vec<&RunLine> = runs.iter().filter(|r| !r.manual).collect();
    let slots: Vec<i64> = scheduled
        .iter()
        .map(|r| {
            chrono::DateTime::parse_from_rfc3339(&r.slot)
                .unwrap()
                .timestamp_millis()
        })
        .collect();
    let unique: BTreeSet<i64> = slots.iter().copied().collect();
    assert_eq!(
        unique.len(),
        slots.len(),
        "a slot completed twice: {scheduled:?}"
    );
    let (first, last) = (*unique.first().unwrap(), *unique.last().unwrap());
    let expected: BTreeSet<i64> = (first..=last).step_by(1000).collect();
    assert_eq!(
        unique, expected,
        "missing slots between the first and the last"
    );
    assert!(
        runs.iter().any(|r| r.manual && r.slot == manual_slot),
        "the manual run is not in runs.log"
    );
    // Every primary period that lasted over a slot wrote reports; the terms seen are the
    // primaries' terms.
    let mut pid_of_term = BTreeMap::new();
    for r in &runs {
        assert_eq!(
            *pid_of_term.entry(r.term).or_insert(r.pid),
            r.pid,
            "one term, two pids: {r:?}"
        );
    }
    assert!(pid_of_term.len() <= KILLS + 1, "{pid_of_term:?}");
    // A report cut short by a kill was written later by the next primary.
    let mut interrupted = 0;
    for line in log_lines.iter().filter(|l| l.contains("report started ")) {
        let (slot, pid) = (field(line, "slot").unwrap(), num::<u32>(line, "pid"));
        let done = log_lines.iter().any(|l| {
            l.contains("report done ")
                && field(l, "slot") == Some(slot)
                && field(l, "pid") == Some(pid.to_string().as_str())
        });
        if done || field(line, "manual") == Some("true") {
            continue;
        }
        assert!(
            killed.contains(&pid),
            "{line} never finished, yet its worker lived"
        );
        interrupted += 1;
        let redone = runs
            .iter()
            .find(|r| r.slot == slot)
            .unwrap_or_else(|| panic!("{slot} cut short and never written"));
        assert_ne!(redone.pid, pid);
    }
    let report_terms: BTreeSet<u64> = runs.iter().map(|r| r.term).collect();
    assert!(report_terms.len() >= KILLS, "{report_terms:?}");
    assert!(
        report_terms.iter().all(|t| terms.contains(t)),
        "{report_terms:?} vs {terms:?}"
    );
    for r in &runs {
        assert!(
            std::path::Path::new(&dir.join("reports").join(if r.manual {
                format!("{}-manual.txt", r.slot)
            } else {
                format!("{}.txt", r.slot)
            }))
            .exists(),
            "no report file for {r:?}"
        );
    }
    let skipped = log_lines
        .iter()
        .filter(|l| l.contains("report skipped "))
        .count();

    // The closing note's numbers.
    let longest_gap = scheduled
        .windows(2)
        .map(|p| p[1].start - p[0].start)
        .max()
        .unwrap();
    let latest_start = scheduled
        .iter()
        .map(|r| {
            let slot = chrono::DateTime::parse_from_rfc3339(&r.slot).unwrap();
            r.start
                .saturating_sub(u128::try_from(slot.timestamp_nanos_opt().unwrap()).unwrap())
        })
        .max()
        .unwrap();
    let lost = accepted.len() - sent.len();
    println!(
        "scheduler e2e: failovers={KILLS} (terms {}), emails accepted={} lost={lost} resent={resent} \
         malformed={malformed} (all 400), report runs={} (slots {}..{} all present, manual 1, \
         cut short by a kill and rerun {interrupted}, skipped as already done {skipped}), \
         longest gap between report starts={:.1} ms, latest start after its slot={:.1} ms",
        terms.len(),
        accepted.len(),
        runs.len(),
        scheduled.first().unwrap().slot,
        scheduled.last().unwrap().slot,
        longest_gap as f64 / 1e6,
        latest_start as f64 / 1e6,
    );
    assert_eq!(lost, 0);
}

fn scheduler_message_id(id: &str) -> String {
    scheduler::email::message_id(id)
}

// ------------------------------------------------------------------------------------------------
// SMTP

/// A minimal SMTP server: accepts every message and keeps its DATA.
async fn fake_smtp() -> (u16, Arc<Mutex<Vec<String>>>, watch::Receiver<usize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let messages = Arc::new(Mutex::new(Vec::new()));
    let (count_tx, count) = watch::channel(0);
    let count_tx = Arc::new(count_tx);
    tokio::spawn({
        let messages = messages.clone();
        async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (messages, count_tx) = (messages.clone(), count_tx.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut read = BufReader::new(read);
                    write.write_all(b"220 fake ESMTP\r\n").await.ok();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let verb = line.trim_end().to_ascii_uppercase();
                        let reply: &[u8] = if verb.starts_with("EHLO") || verb.starts_with("HELO") {
                            b"250-fake\r\n250 8BITMIME\r\n"
                        } else if verb == "DATA" {
                            write.write_all(b"354 go ahead\r\n").await.ok();
                            let mut data = String::new();
                            loop {
                                let mut l = String::new();
                                if read.read_line(&mut l).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                if l == ".\r\n" {
                                    break;
                                }
                                data.push_str(&l);
                            }
                            let n = {
                                let mut m = messages.lock().unwrap();
                                m.push(data);
                                m.len()
                            };
                            count_tx.send_replace(n);
                            b"250 queued\r\n"
                        } else if verb == "QUIT" {
                            write.write_all(b"221 bye\r\n").await.ok();
                            return;
                        } else {
                            b"250 ok\r\n"
                        };
                        write.write_all(reply).await.ok();
                    }
                });
            }
        }
    });
    (port, messages, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_go_out_over_smtp_with_their_message_ids() {
    let _serial = SERIAL.lock().await;
    let (smtp_port, messages, mut count) = fake_smtp().await;
    let mut service = Service::start(
        2,
        &format!("--report-every 1h --smtp smtp://127.0.0.1:{smtp_port}"),
    )
    .await;
    let client = client();
    service.wait_workers_ready(0, &[0, 1]).await;
    let ids: BTreeSet<String> = queue_emails(&service, &client, 0, 6)
        .await
        .into_iter()
        .collect();
    for id in &ids {
        service
            .log
            .wait(0, &format!("delivery of {id}"), |l| {
                l.contains("email sent ") && field(l, "id") == Some(id.as_str())
            })
            .await;
    }
    // Delivered means the server has it (it answered 250 before the sender logged).
    assert!(*count.borrow_and_update() >= ids.len());
    let term = role_of(&client, &service.shared_url("/health/role"))
        .await
        .term
        .unwrap();
    let messages = messages.lock().unwrap().clone();
    assert_eq!(messages.len(), ids.len());
    let mut seen = BTreeSet::new();
    for data in &messages {
        let id = ids
            .iter()
            .find(|id| data.contains(&format!("Message-ID: {}", scheduler_message_id(id))))
            .unwrap_or_else(|| panic!("a message with an unknown Message-ID:\n{data}"));
        assert!(data.contains(&format!("X-Primary-Term: {term}")), "{data}");
        assert!(data.contains("From: "), "{data}");
        seen.insert(id.clone());
    }
    assert_eq!(seen, ids);
    // Over SMTP nothing is written to sent/; deliveries.log still records each one.
    assert!(listing(&service.dir().join("sent"), ".eml").is_empty());
    let delivered: BTreeSet<String> = read(&service.dir().join("deliveries.log"))
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(delivered, ids);
    service.stop().await;
}

/// The value of the sample `name` (with `labels`, e.g. `lock="scheduler"`, or none) in a
/// Prometheus text page.
fn sample(page: &str, name: &str, labels: &str) -> Option<f64> {
    let series = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    page.lines()
        .find_map(|l| l.strip_prefix(&series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a number"))
}

/// Every worker's `GET /metrics` carries the library's role gauge and term, equal to what its
/// `/health/role` says, and the example's counters: one email accepted by one worker and sent by
/// the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_serves_its_role_and_term_on_metrics() {
    let _serial = SERIAL.lock().await;
    let mut service = Service::start(2, "--report-every 1h").await;
    let client = client();
    service.wait_workers_ready(0, &[0, 1]).await;
    // One email, through worker 1, delivered by the primary.
    let body = r#"{"to": "ana@example.com", "subject": "Hi", "body": "Hello"}"#;
    let (status, _, text) = request(&client, "POST", &service.worker_url(1, "/emails"), body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    let id = serde_json::from_str::<serde_json::Value>(&text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    service
        .log
        .wait(0, &format!("delivery of {id}"), |l| {
            l.contains("email sent ") && field(l, "id") == Some(id.as_str())
        })
        .await;

    let lock = r#"lock="scheduler""#;
    let (mut primaries, mut sent, mut accepted) = (0, 0.0, 0.0);
    for index in 0..service.workers {
        // Every worker settled (ready) before the email went out: its gauges match its role.
        let role = role_of(&client, &service.worker_url(index, "/health/role")).await;
        let (status, headers, page) =
            request(&client, "GET", &service.worker_url(index, "/metrics"), "").await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(
            headers[http::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4"),
            "{headers:?}"
        );
        assert!(
            page.contains("# TYPE tower_primary_is_primary gauge"),
            "{page}"
        );
        let is_primary = sample(&page, "tower_primary_is_primary", lock)
            .unwrap_or_else(|| panic!("no is_primary gauge on worker {index}:\n{page}"));
        let term = sample(&page, "tower_primary_term", lock)
            .unwrap_or_else(|| panic!("no term gauge on worker {index}:\n{page}"));
        let expected = if role.role == "primary" { 1.0 } else { 0.0 };
        assert_eq!(is_primary, expected, "worker {index}: {role:?}\n{page}");
        assert!(term >= 1.0, "{page}");
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let term = term as u64;
        assert_eq!(Some(term), role.term, "worker {index}: {role:?}\n{page}");
        if role.role == "primary" {
            primaries += 1;
            assert!(
                sample(
                    &page,
                    "tower_primary_transitions_total",
                    &format!(r#"{lock},reason="acquired""#)
                )
                .is_some_and(|n| n >= 1.0),
                "{page}"
            );
        }
        sent += sample(&page, "scheduler_emails_sent_total", "").expect("the sent counter");
        accepted +=
            sample(&page, "scheduler_emails_accepted_total", "").expect("the accepted counter");
        assert!(
            sample(&page, "scheduler_reports_written_total", "").is_some(),
            "{page}"
        );
    }
    assert_eq!(primaries, 1);
    assert_eq!(accepted, 1.0);
    assert_eq!(sent, 1.0);
    service.stop().await;
}
