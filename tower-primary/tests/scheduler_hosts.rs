//! `examples/scheduler` across two hosts on one PostgreSQL store (`--store postgres://…`), end to
//! end with real processes: two simulated hosts (PID namespaces of their own, see
//! `tower_primary_lab::host`) × a supervisor with 2 workers, emails queued through both hosts,
//! then the primary worker SIGKILLed, then every process of the primary's host, then the primary
//! stopped (SIGSTOP) inside a fenced transaction past its lease and continued (SIGCONT). The
//! checks read the store's tables and the `sent/` folders of both hosts.
//!
//! Needs root (for the PID namespaces) and the PostgreSQL server of `DATABASE_URL` (default
//! `postgres://root@127.0.0.1:5432/test`); skips loudly without them, fails instead with
//! `TOWER_PRIMARY_REQUIRE_BACKENDS=1`. Each run uses a schema and a lock namespace of its own.
//! It prints the latency from an email accepted on the secondary host to its delivery (p50, p99
//! over 100 emails):
//!
//! ```text
//! cargo test -p tower-primary --all-features --test scheduler_hosts -- --nocapture
//! ```
//!
//! As in `tests/scheduler.rs`, this binary runs the example itself (`scheduler_entry`) and reads
//! the service's log lines as events; it never sleeps to synchronise.

#[path = "../examples/scheduler/main.rs"]
#[allow(dead_code)]
mod scheduler;
#[path = "common/service.rs"]
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use http::StatusCode;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::timeout;
use tower_primary_lab::host::SimulatedHost;
use tower_primary_lab::servers::{PostgresServer, free_port, postgres_url, require};

use self::service::{BOUND, HttpClient, Log, client, field, free_ports, num, request};

const ARGS_ENV: &str = "TOWER_PRIMARY_SCHEDULER_TEST_ARGS";
/// Both tests start many processes on a small machine: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The service side of this binary.
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
// Hosts

/// One simulated host: a PID namespace, a supervisor with 2 workers, its own `--state-dir`.
struct Host {
    name: &'static str,
    sim: Option<SimulatedHost>,
    child: Option<Child>,
    log: Log,
    dir: PathBuf,
    port: u16,
    base: u16,
}

const WORKERS: u16 = 2;

impl Host {
    async fn start(name: &'static str, dir: PathBuf, store: &str, pause: &Path) -> Host {
        let (port, base) = free_ports(WORKERS);
        let mut host = Host {
            name,
            sim: None,
            child: None,
            log: Log::default(),
            dir,
            port,
            base,
        };
        host.boot(store, pause).await;
        host
    }

    /// Starts the host's namespace and its supervisor (again, after [`kill`](Self::kill)).
    async fn boot(&mut self, store: &str, pause: &Path) {
        let sim = SimulatedHost::start(self.name).await.unwrap();
        let args = format!(
            "--workers {WORKERS} --bind 127.0.0.1:{} --worker-ports {} --state-dir {} \
             --store {store} --report-every 1s --catch-up 100",
            self.port,
            self.base,
            self.dir.display()
        );
        let exe = std::env::current_exe().unwrap();
        let mut child = sim
            .command(
                &exe,
                [
                    "scheduler_entry",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                    "--quiet",
                ],
            )
            .env(ARGS_ENV, &args)
            .env("RUST_LOG", "info")
            .env(scheduler::store::postgres::PAUSE_ENV, pause)
            .env_remove(tower_primary::role::WORKER_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.log = Log::follow(&mut child);
        self.child = Some(child);
        self.sim = Some(sim);
    }

    /// Every process of the host at once (its PID namespace's init dies, the kernel kills the
    /// rest).
    async fn kill(&mut self) {
        drop(self.sim.take());
        if let Some(mut child) = self.child.take() {
            let _ = timeout(BOUND, child.wait())
                .await
                .expect("the host is gone");
        }
    }

    fn url(&self, index: u16, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.base + index)
    }

    /// Waits for `what` in this host's log from line `from` on.
    async fn wait(&self, from: usize, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let what = format!("{}: {what}", self.name);
        self.log.wait(from, &what, pred).await.1
    }

    /// Waits until both workers have logged `worker ready`; returns their pids (the host's own)
    /// by worker index.
    async fn wait_ready(&self) -> BTreeMap<u16, u32> {
        let mut pids = BTreeMap::new();
        for index in 0..WORKERS {
            let line = self
                .wait(0, "a worker's startup", |l| {
                    l.contains("worker startup ")
                        && field(l, "worker") == Some(index.to_string().as_str())
                })
                .await;
            let pid: u32 = num(&line, "pid");
            self.wait(0, "a worker's readiness", |l| {
                l.contains("worker ready ") && field(l, "pid") == Some(pid.to_string().as_str())
            })
            .await;
            pids.insert(index, pid);
        }
        pids
    }

    /// The pid this machine knows the host's process `inner` by.
    fn machine_pid(&self, inner: u32) -> u32 {
        let sim = self.sim.as_ref().expect("the host runs");
        let ns = format!("pid:[{}]", sim.pid_namespace().unwrap());
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let same_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .is_ok_and(|l| l.to_string_lossy() == ns);
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let nspid = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>());
            if same_ns && nspid.is_some_and(|p| p.last() == Some(&inner.to_string().as_str())) {
                return pid;
            }
        }
        panic!("{}: no process {inner}", self.name);
    }

    fn signal(&self, inner: u32, signal: Signal) {
        let pid = self.machine_pid(inner);
        kill(Pid::from_raw(i32::try_from(pid).unwrap()), signal).unwrap();
    }
}

/// The newest sender with a term above `term_above` in the hosts' logs: host index, pid (the
/// host's own), term.
fn sender_after(hosts: &[&Host], term_above: u64) -> Option<(usize, u32, u64)> {
    hosts
        .iter()
        .enumerate()
        .flat_map(|(h, host)| {
            host.log
                .snapshot()
                .into_iter()
                .filter(|l| l.contains("email sender started "))
                .map(move |l| (h, num::<u32>(&l, "pid"), num::<u64>(&l, "term")))
        })
        .filter(|&(_, _, term)| term > term_above)
        .max_by_key(|&(_, _, term)| term)
}

/// Waits (on the log lines of both hosts) for a sender with a term above `term_above`.
async fn wait_sender(hosts: &[&Host], term_above: u64) -> (usize, u32, u64) {
    let mut counts: Vec<_> = hosts.iter().map(|h| h.log.changes()).collect();
    let found = timeout(BOUND, async {
        loop {
            if let Some(found) = sender_after(hosts, term_above) {
                return found;
            }
            let changes = counts.iter_mut().map(|c| Box::pin(c.changed()));
            let _ = futures_util::future::select_all(changes).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        let dumps: Vec<_> = hosts
            .iter()
            .map(|h| format!("--- {} ---\n{}", h.name, h.log.dump()))
            .collect();
        panic!("no sender above term {term_above}\n{}", dumps.join("\n"))
    })
}

// ------------------------------------------------------------------------------------------------
// HTTP and the store

/// One request: status and body text.
async fn call(client: &HttpClient, method: &str, url: &str, body: &str) -> (StatusCode, String) {
    let (status, _, text) = request(client, method, url, body).await;
    (status, text)
}

/// Queues one email through `url`; its id.
async fn queue(client: &HttpClient, url: &str, n: usize) -> String {
    let body = serde_json::json!({
        "to": format!("user{n}@example.com"),
        "subject": format!("email {n}"),
        "body": format!("Hello {n}."),
    })
    .to_string();
    let (status, text) = call(client, "POST", url, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{url}: {text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["id"].as_str().unwrap().to_owned()
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Waits until every id of `ids` has a delivery (polling the table: the test's one poll, for
/// a condition in another process's database).
async fn wait_delivered(db: &tokio_postgres::Client, schema: &str, ids: &[String]) {
    let sql = format!("SELECT count(DISTINCT id) FROM {schema}.deliveries WHERE id = ANY($1)");
    let want = i64::try_from(ids.len()).unwrap();
    timeout(BOUND, async {
        loop {
            let n: i64 = db.query_one(&sql, &[&ids]).await.unwrap().get(0);
            if n == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} emails not delivered within {BOUND:?}", ids.len()));
}

/// Milliseconds from the insert into the outbox to the delivery's record, per email, sorted.
async fn latencies(db: &tokio_postgres::Client, schema: &str, ids: &[String]) -> Vec<f64> {
    let mut ms: Vec<f64> = db
        .query(
            &format!(
                "SELECT extract(epoch FROM min(delivered_at) - min(queued_at))::float8 * 1000 \
                 FROM {schema}.deliveries WHERE id = ANY($1) GROUP BY id"
            ),
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    ms.sort_by(f64::total_cmp);
    assert_eq!(ms.len(), ids.len());
    ms
}

/// The `p` quantile of sorted values (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * sorted.len() as f64).ceil().max(1.0);
    sorted[(rank as usize).min(sorted.len()) - 1]
}

// ------------------------------------------------------------------------------------------------
// The test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_one_store_every_email_delivered_every_write_fenced() {
    let _serial = SERIAL.lock().await;
    let base_url = postgres_url();
    let Some(db) = require(
        &format!("PostgreSQL at {base_url}"),
        connect(&base_url).await,
    ) else {
        return;
    };
    let Some(probe) = require(
        "a simulated host (root, unshare)",
        SimulatedHost::start("probe").await,
    ) else {
        return;
    };
    drop(probe);
    let schema = format!("sched_hosts_{}_{}", std::process::id(), fastrand::u32(..));
    let sep = if base_url.contains('?') { '&' } else { '?' };
    let store = format!("{base_url}{sep}schema={schema}&namespace={schema}");
    let tmp = tempfile::tempdir().unwrap();
    let pause = tmp.path().join("pause");
    let mut a = Host::start("host-a", tmp.path().join("a"), &store, &pause).await;
    let mut b = Host::start("host-b", tmp.path().join("b"), &store, &pause).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let client = client();
    let mut accepted: Vec<String> = Vec::new();
    let mut n = 0;

    // Both hosts are ready and accept; malformed requests get 400 and store nothing.
    for host in [&a, &b] {
        for index in 0..WORKERS {
            let (status, text) = call(&client, "GET", &host.url(index, "/health/ready"), "").await;
            assert_eq!(status, StatusCode::OK, "{}: {text}", host.name);
        }
        let (status, text) = call(
            &client,
            "POST",
            &host.url(0, "/emails"),
            r#"{"to": "not an address", "subject": "malformed", "body": "b"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        let (status, _) = call(&client, "POST", &host.url(1, "/emails"), "{not json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    let (mut h, _, mut term) = wait_sender(&[&a, &b], 0).await;
    let migrations = [&a, &b]
        .iter()
        .flat_map(|host| host.log.snapshot())
        .filter(|l| l.contains("migration done "))
        .count();
    assert_eq!(migrations, 1, "the migration runs once across hosts");

    // Emails through both hosts, both workers of each.
    for _ in 0..40 {
        let host = if n % 2 == 0 { &a } else { &b };
        accepted.push(
            queue(
                &client,
                &host.url(u16::try_from(n / 2 % 2).unwrap(), "/emails"),
                n,
            )
            .await,
        );
        n += 1;
    }
    wait_delivered(&db, &schema, &accepted).await;

    // The target: from accepted on the secondary host to delivered (the store's clock at the
    // insert and at the delivery's record): one email at a time (each queued once the one
    // before is sent), then 100 back to back.
    let secondary = if h == 0 { &b } else { &a };
    let primary = if h == 0 { &a } else { &b };
    let mut one_by_one = Vec::new();
    for i in 0..100 {
        let mark = primary.log.len();
        let id = queue(&client, &secondary.url(i % WORKERS, "/emails"), n).await;
        n += 1;
        primary
            .wait(mark, "the email sent", |l| {
                l.contains("email sent ") && field(l, "id") == Some(id.as_str())
            })
            .await;
        one_by_one.push(id.clone());
        accepted.push(id);
    }
    let mut burst = Vec::new();
    for i in 0..100 {
        burst.push(queue(&client, &secondary.url(i % WORKERS, "/emails"), n).await);
        n += 1;
    }
    wait_delivered(&db, &schema, &burst).await;
    accepted.extend(burst.iter().cloned());
    println!(
        "\naccepted on the secondary host -> delivered (targets: p50 <= 100 ms, p99 <= 500 ms)"
    );
    println!("| emails | queued | min ms | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|");
    for (what, ids) in [("one at a time", &one_by_one), ("back to back", &burst)] {
        let l = latencies(&db, &schema, ids).await;
        println!(
            "| {} | {what} | {:.1} | {:.1} | {:.1} | {:.1} |",
            l.len(),
            l[0],
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            l[l.len() - 1]
        );
    }
    println!();

    // 1. SIGKILL of the primary worker, emails queued on the other host meanwhile.
    let hosts = [&a, &b];
    let (_, pid, _) = sender_after(&hosts, term - 1).unwrap();
    hosts[h].signal(pid, Signal::SIGKILL);
    let other = hosts[1 - h];
    let before_worker_kill = (hosts[h].name, term);
    let mut batch = Vec::new();
    for i in 0..20 {
        batch.push(queue(&client, &other.url(i % WORKERS, "/emails"), n).await);
        n += 1;
    }
    (h, _, term) = wait_sender(&[&a, &b], term).await;
    println!(
        "primary worker SIGKILLed: {} term {} -> {} term {term}",
        before_worker_kill.0,
        before_worker_kill.1,
        [&a, &b][h].name
    );
    wait_delivered(&db, &schema, &batch).await;
    accepted.extend(batch);

    // 2. Every process of the primary's host; the other host carries on (and catches the
    //    report slots up), then the host comes back.
    let before_host_kill = term;
    {
        let victim = if h == 0 { &mut a } else { &mut b };
        victim.kill().await;
    }
    let survivor = if h == 0 { &b } else { &a };
    let mut batch = Vec::new();
    for i in 0..20 {
        batch.push(queue(&client, &survivor.url(i % WORKERS, "/emails"), n).await);
        n += 1;
    }
    let (h2, _, t2) = wait_sender(&[&a, &b], before_host_kill).await;
    assert_ne!(h2, h, "the killed host has no sender");
    println!(
        "host killed: term {before_host_kill} -> {} term {t2}",
        [&a, &b][h2].name
    );
    (h, term) = (h2, t2);
    wait_delivered(&db, &schema, &batch).await;
    accepted.extend(batch);
    {
        let victim = if h == 0 { &mut b } else { &mut a };
        victim.boot(&store, &pause).await;
        victim.wait_ready().await;
    }

    // 3. The primary, stopped inside a fenced transaction past its lease, then continued: its
    //    record is refused by the guard row, and it does not stall its successor.
    std::fs::write(&pause, b"").unwrap();
    let hosts = [&a, &b];
    let marks: Vec<usize> = hosts.iter().map(|h| h.log.len()).collect();
    accepted.push(queue(&client, &hosts[1 - h].url(0, "/emails"), n).await);
    n += 1;
    let paused_line = hosts[h]
        .wait(marks[h], "the primary pausing in its fence", |l| {
            l.contains("fence paused ")
        })
        .await;
    let (paused_pid, paused_term): (u32, u64) =
        (num(&paused_line, "pid"), num(&paused_line, "term"));
    let paused_id = field(&paused_line, "id").unwrap().to_owned();
    assert_eq!(paused_term, term);
    hosts[h].signal(paused_pid, Signal::SIGSTOP);
    let (h3, successor_pid, successor_term) = wait_sender(&hosts, paused_term).await;
    // The successor works while the old primary is still stopped.
    let paused_index = {
        let host = hosts[h];
        let line = host
            .log
            .snapshot()
            .into_iter()
            .find(|l| {
                l.contains("worker startup ")
                    && field(l, "pid") == Some(paused_pid.to_string().as_str())
            })
            .expect("the paused worker's startup line");
        num::<u16>(&line, "worker")
    };
    let mut batch = Vec::new();
    for i in 0..20u16 {
        let (host, index) = if h3 == h {
            (hosts[h], 1 - paused_index)
        } else {
            (hosts[h3], i % WORKERS)
        };
        batch.push(queue(&client, &host.url(index, "/emails"), n).await);
        n += 1;
    }
    wait_delivered(&db, &schema, &batch).await;
    wait_delivered(&db, &schema, std::slice::from_ref(&paused_id)).await;
    accepted.extend(batch);
    let successor_wrote: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM {schema}.deliveries WHERE term = $1"),
            &[&i64::try_from(successor_term).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(successor_wrote >= 20, "the successor was not stalled");
    let still_stopped =
        std::fs::read_to_string(format!("/proc/{}/stat", hosts[h].machine_pid(paused_pid)))
            .unwrap();
    assert!(
        still_stopped.contains(") T "),
        "the old primary is still stopped: {still_stopped}"
    );
    let mark = hosts[h].log.len();
    hosts[h].signal(paused_pid, Signal::SIGCONT);
    let refused = hosts[h]
        .wait(mark, "the guard row refusing the old primary", |l| {
            l.contains("fence refused ") && field(l, "pid") == Some(paused_pid.to_string().as_str())
        })
        .await;
    assert_eq!(num::<u64>(&refused, "term"), paused_term, "{refused}");
    assert!(num::<u64>(&refused, "newer") >= successor_term, "{refused}");
    println!(
        "stopped in its fence: {} pid {paused_pid} term {paused_term}; successor {} pid \
         {successor_pid} term {successor_term} sent {successor_wrote} meanwhile; continued: {}",
        hosts[h].name,
        hosts[h3].name,
        refused.split("fence refused").nth(1).unwrap_or_default()
    );

    // ---- The checks, from the store and both hosts' sent/ folders.
    wait_delivered(&db, &schema, &accepted).await;
    let s = &schema;
    let rows = db
        .query(
            &format!("SELECT id, count(*) FROM {s}.deliveries GROUP BY id"),
            &[],
        )
        .await
        .unwrap();
    let recorded: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let accepted_set: BTreeSet<String> = accepted.iter().cloned().collect();
    assert_eq!(accepted_set.len(), accepted.len());
    assert_eq!(
        recorded.keys().cloned().collect::<BTreeSet<_>>(),
        accepted_set,
        "every accepted email recorded as delivered, and nothing else"
    );
    assert!(
        recorded.values().all(|&c| c == 1),
        "one record per email: {recorded:?}"
    );
    let outbox: i64 = db
        .query_one(&format!("SELECT count(*) FROM {s}.outbox"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbox, 0);
    let failed: i64 = db
        .query_one(&format!("SELECT count(*) FROM {s}.failed"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed, 0, "the malformed requests stored nothing");

    // Deliveries (files): every accepted email at least once; a second one only for an email in
    // flight at a fault (at most one per fault: two kills and the stop), with the same
    // Message-ID.
    let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for host in [&a, &b] {
        for entry in std::fs::read_dir(host.dir.join("sent")).unwrap().flatten() {
            let name = entry.file_name().into_string().unwrap();
            if let Some((id, _)) = name.strip_suffix(".eml").and_then(|n| n.rsplit_once(".t")) {
                files.entry(id.to_owned()).or_default().push(entry.path());
            }
        }
    }
    assert_eq!(files.keys().cloned().collect::<BTreeSet<_>>(), accepted_set);
    let twice: Vec<_> = files.iter().filter(|(_, f)| f.len() > 1).collect();
    assert!(twice.len() <= 3, "{twice:?}");
    assert!(
        files.get(&paused_id).is_some_and(|f| f.len() == 2),
        "the email in flight at the stop went out twice: {:?}",
        files.get(&paused_id)
    );
    for (id, paths) in &twice {
        assert!(paths.len() == 2, "{id}: {paths:?}");
        for path in paths.iter() {
            let text = std::fs::read_to_string(path).unwrap();
            let want = format!("Message-ID: {}", scheduler::email::message_id(id));
            assert!(text.contains(&want), "{}: {text}", path.display());
        }
    }

    // Every report slot once, none missing between the first and the last (the host kill's
    // catch-up included).
    let slots: Vec<String> = db
        .query(
            &format!("SELECT slot FROM {s}.report_runs WHERE NOT manual ORDER BY slot"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let times: Vec<chrono::DateTime<chrono::Utc>> =
        slots.iter().map(|s| s.parse().unwrap()).collect();
    assert!(times.len() > 5, "{slots:?}");
    for pair in times.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::TimeDelta::seconds(1),
            "a missing or repeated slot: {slots:?}"
        );
    }

    // No write with an older term after a newer one, in the order the guard row gave them.
    let terms: Vec<i64> = db
        .query(
            &format!(
                "SELECT term FROM (SELECT seq, term FROM {s}.deliveries \
                 UNION ALL SELECT seq, term FROM {s}.report_runs \
                 UNION ALL SELECT seq, term FROM {s}.failed) w ORDER BY seq"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        terms.windows(2).all(|w| w[0] <= w[1]),
        "a write with an older term after a newer one: {terms:?}"
    );
    assert!(terms.contains(&i64::try_from(successor_term).unwrap()));
    let guard: i64 = db
        .query_one(&format!("SELECT term FROM {s}.fence"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(Some(&guard), terms.iter().max());

    a.kill().await;
    b.kill().await;
    db.batch_execute(&format!("DROP SCHEMA {s} CASCADE"))
        .await
        .unwrap();
}

/// The database down: `POST /emails` answers 503 with a clear body and stores nothing, the
/// worker is unready; once it is back, emails are accepted and delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_emails_are_refused_with_503() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = require("a throwaway PostgreSQL", PostgresServer::start().await) else {
        return;
    };
    let Some(_lock_db) = require("PostgreSQL for the lock", connect(&postgres_url()).await) else {
        return;
    };
    let tag = format!("sched_down_{}_{}", std::process::id(), fastrand::u32(..));
    let store = server.url();
    // The lock lives on the machine's PostgreSQL: only the store goes down.
    let sep = if postgres_url().contains('?') {
        '&'
    } else {
        '?'
    };
    let backend = format!("{}{sep}namespace={tag}", postgres_url());
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "scheduler_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env(
            ARGS_ENV,
            format!(
                "--workers 1 --bind 127.0.0.1:{port} --state-dir {} --store {store} \
                 --backend {backend}",
                tmp.path().display()
            ),
        )
        .env("RUST_LOG", "info")
        .env_remove(tower_primary::role::WORKER_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = Log::follow(&mut child);
    let host = Host {
        name: "local",
        sim: None,
        child: None,
        log,
        dir: tmp.path().to_owned(),
        port,
        base: port,
    };
    host.wait(0, "readiness", |l| l.contains("worker ready "))
        .await;
    let client = client();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let first = queue(&client, &url("/emails"), 0).await;

    server.kill();
    let body = r#"{"to": "down@example.com", "subject": "while down", "body": "b"}"#;
    let (status, text) = call(&client, "POST", &url("/emails"), body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["error"], "store_unavailable", "{text}");
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .contains("nothing was stored"),
        "{text}"
    );
    let (status, text) = call(&client, "GET", &url("/health/ready"), "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("the database"), "{text}");
    let (status, _) = call(&client, "POST", &url("/emails"), "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    server.restart().await.unwrap();
    let (status, text) = call(&client, "GET", &url("/health/ready"), "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let second = queue(&client, &url("/emails"), 1).await;
    let db = connect(&server.url()).await.unwrap();
    wait_delivered(&db, "scheduler", &[first, second]).await;
    let outbox: i64 = db
        .query_one("SELECT count(*) FROM scheduler.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbox, 0, "nothing half-written");
    let delivered: i64 = db
        .query_one("SELECT count(*) FROM scheduler.deliveries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(delivered, 2, "the refused email was not stored");
    drop(child);
}
