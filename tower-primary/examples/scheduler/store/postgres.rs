//! `--store postgres://…`: the outbox, the deliveries and the report runs in tables of a schema
//! of their own (`scheduler`, or `?schema=NAME`), shared by every host.
//!
//! # Tables
//!
//! Created by the run-once migration, one versioned step at a time (`schema_migrations` records
//! each; a step already recorded is skipped, so a migration re-run after a kill is harmless):
//!
//! - `fence (one, term)`: the **guard row**. Every write of the primary's jobs runs in a
//!   transaction that first runs `UPDATE fence SET term = $term WHERE term <= $term`; 0 rows
//!   means a newer primary has written, and the job stops for this term;
//! - `outbox (id, to_addr, subject, body, queued_by, queued_at)`: any worker of any host inserts;
//!   a trigger sends `NOTIFY <schema>_outbox`;
//! - `deliveries (seq, id, term, pid, message_id, queued_at, delivered_at)`, `failed (…)` and
//!   `report_runs (seq, slot, manual, term, pid, start_ns, end_ns, body)`: written by the
//!   primary only, fenced. `seq` comes from one sequence (`write_seq`), drawn while the guard
//!   row is locked, so it orders the fenced writes: their terms never go down along it.
//!
//! # Sessions
//!
//! Every session sets `idle_in_transaction_session_timeout` (2 s, or half of `--lease`) and
//! `lock_timeout` (half of that): an old primary stopped inside a fenced transaction (`SIGSTOP`,
//! a frozen VM) loses its session, and with it its lock on the guard row, before a successor can
//! take over, so it cannot stall the successor; and a write never waits long for the row. Email
//! delivery (SMTP or the `sent/` file) happens **outside** the transaction: a primary killed
//! between the delivery and the commit leaves the email queued, and the next primary delivers it
//! again with the same Message-ID.
//!
//! The `schema` parameter is the store's; `namespace` is the backend's (the store leaves it out);
//! every other parameter is the driver's. Plain TCP only (no TLS in this example's store).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify, RwLock};
use tokio_postgres::{Client, Config, NoTls, Statement, ToStatement, Transaction};
use tower_primary::{BoxError, TermContext};

use super::super::Dirs;
use super::{CONNECT_TIMEOUT, Counts, Fenced, QueueError, Queued, ReportRecord};

/// The sender's safety net: it looks at the outbox this often even without a notification (one
/// lost with a dropped connection, a row inserted by hand without the trigger).
pub(crate) const SWEEP: Duration = Duration::from_secs(5);
/// The store's schema without `?schema=`.
const DEFAULT_SCHEMA: &str = "scheduler";
/// The most emails the sender takes from the outbox at a time.
const BATCH: i64 = 100;
/// Test hook: the path of a file. The primary's sender that finds it (and removes it) logs
/// `fence paused …` inside its next fenced transaction, right after advancing the guard row, and
/// stays there until its term ends, so a test can stop it (`SIGSTOP`) at that exact point.
pub(crate) const PAUSE_ENV: &str = "SCHEDULER_TEST_PAUSE_IN_FENCE";

/// The guard row's update: the term advances, never goes back.
const FENCE: &str = "UPDATE fence SET term = $1 WHERE term <= $1";
/// The sender's read of the outbox.
const PENDING: &str = "SELECT id, to_addr, subject, body, queued_by FROM outbox \
                       ORDER BY queued_at, id LIMIT $1";
/// A delivery's record: the email leaves the outbox, its delivery is recorded.
const DELIVERED: &str = "WITH gone AS (DELETE FROM outbox WHERE id = $1 RETURNING queued_at) \
                         INSERT INTO deliveries (id, term, pid, message_id, queued_at) \
                         SELECT $1, $2, $3, $4, (SELECT queued_at FROM gone)";

/// The versioned migration steps: `(version, name, SQL)`; `{channel}` is the notify channel.
const STEPS: [(i32, &str, &str); 2] = [
    (
        1,
        "tables",
        "CREATE SEQUENCE write_seq;
         CREATE TABLE outbox (
             id text PRIMARY KEY,
             to_addr text NOT NULL,
             subject text NOT NULL,
             body text NOT NULL,
             queued_by integer NOT NULL,
             queued_at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE INDEX outbox_order ON outbox (queued_at, id);
         CREATE TABLE deliveries (
             seq bigint PRIMARY KEY DEFAULT nextval('write_seq'),
             id text NOT NULL,
             term bigint NOT NULL,
             pid integer NOT NULL,
             message_id text NOT NULL,
             queued_at timestamptz,
             delivered_at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE TABLE failed (
             seq bigint PRIMARY KEY DEFAULT nextval('write_seq'),
             id text NOT NULL,
             term bigint NOT NULL,
             reason text NOT NULL,
             email jsonb,
             at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE TABLE report_runs (
             seq bigint NOT NULL DEFAULT nextval('write_seq'),
             slot text NOT NULL,
             manual boolean NOT NULL,
             term bigint NOT NULL,
             pid integer NOT NULL,
             start_ns bigint NOT NULL,
             end_ns bigint NOT NULL,
             body text NOT NULL,
             PRIMARY KEY (slot, manual));",
    ),
    (
        2,
        "outbox-notify",
        "CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify('{channel}', ''); RETURN NULL; END $$;
         CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
             FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();",
    ),
];

/// The store on PostgreSQL.
#[derive(Clone)]
pub(crate) struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    schema: String,
    dirs: Dirs,
    idle_in_transaction: Duration,
    lock_timeout: Duration,
    simulate_work: Duration,
    /// The routes' connection (queries pipeline on it), made again when it closes.
    shared: RwLock<Option<Arc<Client>>>,
    /// The report job's connection.
    reports: Mutex<Option<Client>>,
    pause_file: Option<PathBuf>,
}

impl PgStore {
    /// Reads the URL and makes this host's folder for delivered emails (`sent/`). Connects
    /// lazily: a database that is down at start-up makes the worker unready, not fail.
    pub(crate) async fn open(
        url: &str,
        dirs: Dirs,
        lease: Option<Duration>,
        simulate_work: Duration,
    ) -> Result<Self, BoxError> {
        let (config, schema) = parse(url)?;
        tokio::fs::create_dir_all(dirs.sent()).await?;
        let idle_in_transaction = lease.map_or(Duration::from_secs(2), |l| {
            (l / 2).max(Duration::from_millis(200))
        });
        Ok(PgStore {
            inner: Arc::new(Inner {
                config,
                schema,
                dirs,
                idle_in_transaction,
                lock_timeout: idle_in_transaction / 2,
                simulate_work,
                shared: RwLock::new(None),
                reports: Mutex::new(None),
                pause_file: std::env::var_os(PAUSE_ENV).map(PathBuf::from),
            }),
        })
    }

    pub(crate) fn migration_version(&self) -> String {
        let last = STEPS.last().map_or(0, |s| s.0);
        format!("postgres-{}-v{last}", self.inner.schema)
    }

    fn channel(&self) -> String {
        format!("{}_outbox", self.inner.schema)
    }

    /// A new session: the store's schema first in `search_path`, the timeouts set.
    async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.inner.config.connect(NoTls).await?;
        tokio::spawn(connection);
        self.prepare(&client).await?;
        Ok(client)
    }

    async fn prepare(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let i = &self.inner;
        client
            .batch_execute(&format!(
                "SET search_path = \"{}\"; \
                 SET idle_in_transaction_session_timeout = {}; \
                 SET lock_timeout = {}; \
                 SET statement_timeout = 10000",
                i.schema,
                i.idle_in_transaction.as_millis(),
                i.lock_timeout.as_millis()
            ))
            .await
    }

    /// The routes' connection, made again if it closed.
    async fn shared(&self) -> Result<Arc<Client>, tokio_postgres::Error> {
        if let Some(c) = self.inner.shared.read().await.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let mut slot = self.inner.shared.write().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let client = Arc::new(self.connect().await?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Applies the steps not recorded yet, each in a fenced transaction.
    pub(crate) async fn migrate(&self, ctx: &TermContext) -> Result<(), BoxError> {
        let mut client = self.connect().await?;
        // The schema, the version table and the guard row: idempotent, unfenced (the guard
        // row is what they create).
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{}\";
                 CREATE TABLE IF NOT EXISTS schema_migrations (
                     version integer PRIMARY KEY,
                     name text NOT NULL,
                     term bigint NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT clock_timestamp());
                 CREATE TABLE IF NOT EXISTS fence (
                     one boolean PRIMARY KEY DEFAULT true CHECK (one),
                     term bigint NOT NULL);
                 INSERT INTO fence (one, term) VALUES (true, 0) ON CONFLICT DO NOTHING;",
                self.inner.schema
            ))
            .await?;
        let term = ctx.term();
        for (version, name, sql) in STEPS {
            let tx = client.transaction().await?;
            if let Fenced::Refused { newer } = fence(&tx, term).await? {
                return Err(format!(
                    "fence refused what=migration term={term} newer={newer}: a newer primary \
                     has written"
                )
                .into());
            }
            let done = tx
                .query_opt(
                    "SELECT 1 FROM schema_migrations WHERE version = $1",
                    &[&version],
                )
                .await?
                .is_some();
            if !done {
                tx.batch_execute(&sql.replace("{channel}", &self.channel()))
                    .await?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, term) VALUES ($1, $2, $3)",
                    &[&version, &name, &to_i64(term)],
                )
                .await?;
            }
            tx.commit().await?;
            if !done {
                tracing::info!("migration step applied version={version} name={name} term={term}");
            }
        }
        tracing::info!(
            "migration done version={} term={term} pid={}",
            self.migration_version(),
            std::process::id()
        );
        Ok(())
    }

    /// The database answers and this host's folder exists.
    pub(crate) async fn check(&self) -> Result<(), String> {
        tokio::fs::metadata(self.inner.dirs.sent())
            .await
            .map_err(|e| format!("{}: {e}", self.inner.dirs.sent().display()))?;
        let ping = async {
            let client = self.shared().await?;
            client.simple_query("SELECT 1").await.map(drop)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, ping).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("the database: {e}")),
            Err(_) => Err("the database: no answer within 2 s".to_owned()),
        }
    }

    pub(crate) async fn queue(&self, email: &Queued) -> Result<(), QueueError> {
        let insert = async {
            let client = self.shared().await?;
            client
                .execute(
                    "INSERT INTO outbox (id, to_addr, subject, body, queued_by) \
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &email.id,
                        &email.to,
                        &email.subject,
                        &email.body,
                        &i32::try_from(email.queued_by).unwrap_or(i32::MAX),
                    ],
                )
                .await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, insert).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if unavailable(&e) => Err(QueueError::Unavailable(e.to_string())),
            Ok(Err(e)) => Err(QueueError::Other(e.to_string())),
            Err(_) => Err(QueueError::Unavailable(
                "no answer from the database within 4 s".to_owned(),
            )),
        }
    }

    /// A session of the sender's own that listens for new emails.
    pub(crate) async fn outbox(&self, ctx: &TermContext) -> Result<PgOutbox, BoxError> {
        use futures_util::StreamExt as _;
        let (client, mut connection) = self.inner.config.connect(NoTls).await?;
        let notify = Arc::new(Notify::new());
        tokio::spawn({
            let notify = notify.clone();
            async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(tokio_postgres::AsyncMessage::Notification(_)) => notify.notify_one(),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                // The session ended: wake the sender, whose next query fails and restarts it.
                notify.notify_one();
            }
        });
        self.prepare(&client).await?;
        client
            .batch_execute(&format!("LISTEN \"{}\"", self.channel()))
            .await?;
        tracing::info!(
            "email sender listening channel={} term={} pid={}",
            self.channel(),
            ctx.term(),
            std::process::id()
        );
        let statements = [
            client.prepare(FENCE).await?,
            client.prepare(PENDING).await?,
            client.prepare(DELIVERED).await?,
        ];
        Ok(PgOutbox {
            store: self.clone(),
            client,
            notify,
            statements,
        })
    }

    pub(crate) async fn report_done(&self, slot: &str) -> Result<bool, BoxError> {
        let client = self.shared().await?;
        Ok(client
            .query_opt(
                "SELECT 1 FROM report_runs WHERE slot = $1 AND NOT manual",
                &[&slot],
            )
            .await?
            .is_some())
    }

    pub(crate) async fn record_report(
        &self,
        ctx: &TermContext,
        run: &ReportRecord<'_>,
    ) -> Result<Fenced, BoxError> {
        let mut slot = self.inner.reports.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.connect().await?);
        }
        let client = slot.as_mut().ok_or("no connection")?;
        let tx = client.transaction().await?;
        let fenced = fence(&tx, ctx.term()).await?;
        if fenced != Fenced::Written {
            return Ok(fenced);
        }
        let ns = |n: u128| i64::try_from(n).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO report_runs (slot, manual, term, pid, start_ns, end_ns, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            &[
                &run.slot,
                &run.manual,
                &to_i64(run.term),
                &pid(),
                &ns(run.start_ns),
                &ns(run.end_ns),
                &run.body,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(Fenced::Written)
    }

    pub(crate) async fn counts(&self) -> Result<Counts, BoxError> {
        let client = self.shared().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM outbox), \
                        (SELECT count(DISTINCT id) FROM deliveries), \
                        (SELECT count(*) FROM failed)",
                &[],
            )
            .await?;
        let n = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok(Counts {
            queued: n(0),
            sent: n(1),
            failed: n(2),
        })
    }

    /// The test hook ([`PAUSE_ENV`]), inside a fenced transaction.
    async fn pause_hook(&self, ctx: &TermContext, id: &str) {
        let Some(path) = &self.inner.pause_file else {
            return;
        };
        // Whoever removes the file pauses, once.
        if std::fs::remove_file(path).is_err() {
            return;
        }
        let (term, pid) = (ctx.term(), std::process::id());
        tracing::info!("fence paused id={id} term={term} pid={pid}");
        ctx.cancelled().await;
        tracing::info!("fence resumed id={id} term={term} pid={pid}: the term has ended");
    }
}

/// The outbox as one term's sender sees it: a session of its own, listening.
pub(crate) struct PgOutbox {
    store: PgStore,
    client: Client,
    notify: Arc<Notify>,
    /// [`FENCE`], [`PENDING`] and [`DELIVERED`], prepared once for the session (one round trip
    /// each per email instead of two).
    statements: [Statement; 3],
}

impl PgOutbox {
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }

    pub(crate) async fn pending(
        &mut self,
    ) -> Result<Vec<Result<Queued, (String, String)>>, BoxError> {
        let rows = self.client.query(&self.statements[1], &[&BATCH]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok(Queued {
                    id: r.get(0),
                    to: r.get(1),
                    subject: r.get(2),
                    body: r.get(3),
                    queued_by: u32::try_from(r.get::<_, i32>(4)).unwrap_or(0),
                })
            })
            .collect())
    }

    /// In one fenced transaction: records the delivery and takes the email out of the outbox.
    pub(crate) async fn delivered(
        &mut self,
        ctx: &TermContext,
        id: &str,
        message_id: &str,
    ) -> Result<Fenced, BoxError> {
        // --simulate-work: the second half, between the delivery and its record (the window in
        // which a kill makes the email go out again).
        let half = self.store.inner.simulate_work / 2;
        if !half.is_zero() {
            tokio::time::sleep(half).await;
        }
        let tx = self.client.transaction().await?;
        let fenced = fence_with(&tx, &self.statements[0], ctx.term()).await?;
        if fenced != Fenced::Written {
            return Ok(fenced);
        }
        self.store.pause_hook(ctx, id).await;
        tx.execute(
            &self.statements[2],
            &[&id, &to_i64(ctx.term()), &pid(), &message_id],
        )
        .await?;
        tx.commit().await?;
        Ok(Fenced::Written)
    }

    /// In one fenced transaction: moves the email to `failed`.
    pub(crate) async fn give_up(
        &mut self,
        ctx: &TermContext,
        id: &str,
        why: &str,
    ) -> Result<Fenced, BoxError> {
        let tx = self.client.transaction().await?;
        let fenced = fence(&tx, ctx.term()).await?;
        if fenced != Fenced::Written {
            return Ok(fenced);
        }
        tx.execute(
            "WITH gone AS (DELETE FROM outbox o WHERE o.id = $1 RETURNING o.*) \
             INSERT INTO failed (id, term, reason, email) \
             SELECT $1, $2, $3, (SELECT to_jsonb(gone) FROM gone)",
            &[&id, &to_i64(ctx.term()), &why],
        )
        .await?;
        tx.commit().await?;
        Ok(Fenced::Written)
    }
}

/// Advances the guard row to `term` unless it holds a newer one.
async fn fence(tx: &Transaction<'_>, term: u64) -> Result<Fenced, tokio_postgres::Error> {
    fence_with(tx, FENCE, term).await
}

/// [`fence`] with the statement given (prepared once per session by the sender).
async fn fence_with<S: ToStatement + ?Sized>(
    tx: &Transaction<'_>,
    statement: &S,
    term: u64,
) -> Result<Fenced, tokio_postgres::Error> {
    let term = to_i64(term);
    let n = tx.execute(statement, &[&term]).await?;
    if n == 1 {
        return Ok(Fenced::Written);
    }
    let newer: i64 = tx.query_one("SELECT term FROM fence", &[]).await?.get(0);
    Ok(Fenced::Refused {
        newer: u64::try_from(newer).unwrap_or(0),
    })
}

fn to_i64(term: u64) -> i64 {
    i64::try_from(term).unwrap_or(i64::MAX)
}

fn pid() -> i32 {
    i32::try_from(std::process::id()).unwrap_or(i32::MAX)
}

/// Whether an error means the database cannot be reached (rather than refused the statement).
fn unavailable(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // Class 08 (connection exception), 57P01..57P03 (shutting down, cannot connect now).
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || code.starts_with("57P")
        }
        None => true,
    }
}

/// Splits `?schema=` (the store's) and `?namespace=` (the backend's) off the URL; the rest is
/// the driver's.
fn parse(url: &str) -> Result<(Config, String), BoxError> {
    let redacted = tower_primary::backend::redact(url);
    let (head, query) = url.split_once('?').unwrap_or((url, ""));
    let mut schema = DEFAULT_SCHEMA.to_owned();
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("schema", value)) => schema = value.to_owned(),
            Some(("namespace", _)) => {}
            _ => rest.push(pair),
        }
    }
    let valid = !schema.is_empty()
        && schema.len() <= 50
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(format!(
            "--store {redacted}: schema {schema:?}: expected 1 to 50 of [a-z0-9_], not starting \
             with a digit"
        )
        .into());
    }
    let driver = if rest.is_empty() {
        head.to_owned()
    } else {
        format!("{head}?{}", rest.join("&"))
    };
    let mut config = Config::from_str(&driver).map_err(|e| format!("--store {redacted}: {e}"))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("scheduler store");
    }
    Ok((config, schema))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn the_schema_is_the_stores_and_the_namespace_the_backends() {
        let (config, schema) =
            parse("postgres://root@127.0.0.1:5432/test?schema=s1&namespace=n&connect_timeout=3")
                .unwrap();
        assert_eq!(schema, "s1");
        assert_eq!(config.get_dbname(), Some("test"));
        assert_eq!(
            config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        let (_, schema) = parse("postgres://root@127.0.0.1/test").unwrap();
        assert_eq!(schema, "scheduler");
        let err = parse("postgres://root@h/test?schema=Bad-Name").unwrap_err();
        assert!(err.to_string().contains("schema"), "{err}");
        assert!(parse("postgres://root@h/test?frobnicate=1").is_err());
    }
}
