//! One lock name on PostgreSQL: the lock session of each term, and the second connection for
//! LISTEN, the holder record and the state API.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use super::NAME;
use super::config::{ANSWER_GRACE, STOPPED_CHECK_EVERY, Settings};
use super::conn::{Conn, OnNotify, connect, describe, pg_error};
use super::sql::Sql;
use crate::backend::Lease;
use crate::backend::{
    AcquireRequest, BoxFuture, Changes, Leadership, Lock, RenewalSender, Renewals, Stored,
    VersionChanges, renewals,
};
use crate::backoff::Backoff;
use crate::clock::{Clock, Timestamp};
use crate::error::Error;
use crate::process::ProcessIdentity;
use crate::role::Holder;

/// A lock name on PostgreSQL, as one elector sees it.
pub(super) struct PgLock {
    shared: Arc<Shared>,
}

struct Shared {
    settings: Arc<Settings>,
    name: String,
    sql: Sql,
    aux: Aux,
    /// Whether the second connection should hold the step-down lock (shared): from just before
    /// a term begins until it has ended. Held while the lock operations run, so a reconnection
    /// never takes it again after a release.
    step_down_lock: tokio::sync::Mutex<bool>,
    /// Cancelled when the second connection came back during a term but could not take the
    /// step-down lock again: successors would no longer wait for this node, so the term ends.
    /// A fresh token for every term.
    step_down_broken: Mutex<CancellationToken>,
    /// The term this node holds, once recorded: a reconnected second connection records its
    /// new server process in that term's holder row.
    held_term: Mutex<Option<u64>>,
    /// Test hook: how long each (re)connection of the second connection is held back, in ms.
    #[cfg(test)]
    aux_delay_ms: std::sync::atomic::AtomicU64,
}

/// The second connection: LISTEN, holder record, state.
struct Aux {
    state: watch::Sender<AuxState>,
    /// Bumped at every holder notification, and after every (re)connection.
    holder: watch::Sender<u64>,
    /// One version per watched state key.
    keys: Mutex<HashMap<String, watch::Sender<u64>>>,
    started: AtomicBool,
    stop: CancellationToken,
}

#[derive(Clone)]
enum AuxState {
    Connecting,
    /// The connection and its server process id.
    Ready(Arc<Conn>, i32),
    Failed(String),
}

impl fmt::Debug for PgLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLock")
            .field("name", &self.shared.name)
            .field("namespace", &self.shared.settings.namespace)
            .field("key", &self.shared.sql.key)
            .finish_non_exhaustive()
    }
}

impl PgLock {
    pub(super) fn new(settings: Arc<Settings>, name: &str) -> Self {
        let sql = Sql::new(&settings.schema, &settings.namespace, name);
        PgLock {
            shared: Arc::new(Shared {
                settings,
                name: name.to_owned(),
                sql,
                step_down_lock: tokio::sync::Mutex::new(false),
                step_down_broken: Mutex::new(CancellationToken::new()),
                held_term: Mutex::new(None),
                #[cfg(test)]
                aux_delay_ms: std::sync::atomic::AtomicU64::new(0),
                aux: Aux {
                    state: watch::channel(AuxState::Connecting).0,
                    holder: watch::channel(0).0,
                    keys: Mutex::new(HashMap::new()),
                    started: AtomicBool::new(false),
                    stop: CancellationToken::new(),
                },
            }),
        }
    }
}

impl Drop for PgLock {
    fn drop(&mut self) {
        self.shared.aux.stop.cancel();
    }
}

/// The first data row of a simple query's result.
fn first_row(messages: &[SimpleQueryMessage]) -> Option<&tokio_postgres::SimpleQueryRow> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    })
}

impl Shared {
    fn backend_error(&self, message: impl Into<String>) -> Error {
        Error::backend_msg(NAME, message)
    }

    fn on_notify(&self, payload: &str) {
        if let Some(key) = payload.strip_prefix("state:") {
            if let Some(tx) = crate::sync::lock(&self.aux.keys).get(key) {
                tx.send_modify(|v| *v += 1);
            }
        } else {
            self.aux.holder.send_modify(|v| *v += 1);
        }
    }

    /// Wakes every watcher: notifications may have been missed while disconnected.
    fn bump_all(&self) {
        self.aux.holder.send_modify(|v| *v += 1);
        for tx in crate::sync::lock(&self.aux.keys).values() {
            tx.send_modify(|v| *v += 1);
        }
    }

    /// Connects the second connection: creates the schema's objects if missing, LISTENs.
    async fn connect_aux(self: &Arc<Self>) -> Result<(Conn, i32), Error> {
        let weak = Arc::downgrade(self);
        let on_notify: OnNotify = Arc::new(move |payload| {
            if let Some(shared) = weak.upgrade() {
                shared.on_notify(payload);
            }
        });
        #[cfg(test)]
        {
            let delay = self.aux_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
        }
        let app = format!("aux {}", self.name);
        let conn = connect(&self.settings, Some(&app), Some(on_notify)).await?;
        let prepare = async {
            let pid = configure_session(&self.settings, &conn).await?;
            let exists = conn.client.simple_query(&self.sql.setup_check).await?;
            if first_row(&exists).and_then(|r| r.get(0)) != Some("t") {
                conn.client.batch_execute(&self.sql.setup).await?;
            }
            conn.client.batch_execute(&self.sql.listen).await?;
            Ok::<_, tokio_postgres::Error>(pid)
        };
        match tokio::time::timeout(self.settings.request_timeout, prepare).await {
            Ok(Ok(pid)) => Ok((conn, pid)),
            Ok(Err(e)) => {
                conn.kill();
                Err(pg_error(
                    &format!("prepare schema {:?} and LISTEN", self.settings.schema),
                    e,
                ))
            }
            Err(_) => {
                conn.kill();
                Err(self.backend_error(format!(
                    "prepare schema {:?} and LISTEN: timed out after {:?}",
                    self.settings.schema, self.settings.request_timeout
                )))
            }
        }
    }

    /// Keeps the second connection up until the lock is dropped.
    async fn supervise(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let attempt = tokio::select! {
                () = self.aux.stop.cancelled() => return,
                r = self.connect_aux() => r,
            };
            match attempt {
                Ok((conn, pid)) => {
                    backoff.reset();
                    let conn = Arc::new(conn);
                    {
                        // A term that outlived its second connection takes the step-down lock
                        // again, so that a successor still waits for this node to step down.
                        let wanted = self.step_down_lock.lock().await;
                        if *wanted && !self.take_step_down_lock(&conn).await {
                            // Successors would not wait for this node: end the term.
                            tracing::warn!(lock = %self.name, "postgres: could not take the step-down lock again after reconnecting; ending the term");
                            crate::sync::lock(&self.step_down_broken).cancel();
                        } else if let Some(term) = (*wanted)
                            .then(|| *crate::sync::lock(&self.held_term))
                            .flatten()
                        {
                            // So that waiters can end this connection too if this node stops.
                            let _ = tokio::time::timeout(
                                self.settings.request_timeout,
                                conn.client.query_typed(
                                    &self.sql.update_aux,
                                    &[
                                        (&self.sql.key, Type::INT8),
                                        (&term_i64(term), Type::INT8),
                                        (&pid, Type::INT4),
                                    ],
                                ),
                            )
                            .await;
                        }
                        self.aux
                            .state
                            .send_replace(AuxState::Ready(conn.clone(), pid));
                    }
                    self.bump_all();
                    let reason = tokio::select! {
                        () = self.aux.stop.cancelled() => {
                            conn.kill();
                            return;
                        }
                        reason = conn.ended() => reason,
                    };
                    tracing::warn!(lock = %self.name, reason = %reason, "postgres: holder/state connection lost; reconnecting");
                    self.aux.state.send_replace(AuxState::Connecting);
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::debug!(lock = %self.name, error = %err, retry_in = ?delay, "postgres: holder/state connection failed");
                    self.aux
                        .state
                        .send_replace(AuxState::Failed(err.to_string()));
                    tokio::select! {
                        () = self.aux.stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn take_step_down_lock(&self, conn: &Conn) -> bool {
        let taken = tokio::time::timeout(
            self.settings.request_timeout,
            conn.client.simple_query(&self.sql.ack_take),
        )
        .await;
        match taken {
            Ok(Ok(m)) => first_row(&m).and_then(|r| r.get(0)) == Some("t"),
            _ => false,
        }
    }

    /// Takes the step-down lock (shared) on the second connection before a term begins;
    /// returns the connection's server process id and the token cancelled if a reconnection
    /// cannot take it again.
    ///
    /// The guard is never held while waiting for the connection: `supervise` needs it to
    /// publish a new connection. The lock is taken under the guard on the connection that is
    /// current then, so that a reconnection never takes it a second time.
    async fn hold_step_down_lock(self: &Arc<Self>) -> Result<(i32, CancellationToken), Error> {
        loop {
            let (conn, _) = self.aux().await?;
            let mut wanted = self.step_down_lock.lock().await;
            let current = match &*self.aux.state.borrow() {
                AuxState::Ready(c, pid) if Arc::ptr_eq(c, &conn) && !c.is_ended() => Some(*pid),
                _ => None,
            };
            let Some(pid) = current else {
                // Replaced meanwhile: wait for the new one, without the guard.
                continue;
            };
            *wanted = true;
            let broken = CancellationToken::new();
            *crate::sync::lock(&self.step_down_broken) = broken.clone();
            return if self.take_step_down_lock(&conn).await {
                Ok((pid, broken))
            } else {
                Err(self
                    .backend_error("could not take the step-down lock on the second connection"))
            };
        }
    }

    /// Gives the step-down lock back once the term has ended (the elector calls `release` after
    /// the node stepped down and its tasks finished): a successor waits for this.
    async fn release_step_down_lock(&self) {
        let mut wanted = self.step_down_lock.lock().await;
        *crate::sync::lock(&self.held_term) = None;
        if !std::mem::replace(&mut *wanted, false) {
            return;
        }
        let state = self.aux.state.borrow().clone();
        if let AuxState::Ready(conn, _) = state {
            let released = tokio::time::timeout(
                self.settings.request_timeout,
                conn.client.simple_query(&self.sql.ack_release),
            )
            .await;
            if !matches!(released, Ok(Ok(_))) {
                // Closing the connection frees it on the server.
                conn.kill();
            }
        }
    }

    /// The second connection, once it is up (LISTEN active); its server process id.
    async fn aux(self: &Arc<Self>) -> Result<(Arc<Conn>, i32), Error> {
        if !self.aux.started.swap(true, Ordering::SeqCst) {
            tokio::spawn(self.clone().supervise());
        }
        let mut rx = self.aux.state.subscribe();
        let limit = self.settings.connect_timeout + self.settings.request_timeout;
        let ready = rx.wait_for(|s| match s {
            AuxState::Ready(conn, _) => !conn.is_ended(),
            AuxState::Failed(_) => true,
            AuxState::Connecting => false,
        });
        match tokio::time::timeout(limit, ready).await {
            Ok(Ok(state)) => match &*state {
                AuxState::Ready(conn, pid) => Ok((conn.clone(), *pid)),
                AuxState::Failed(e) => Err(self.backend_error(e.clone())),
                AuxState::Connecting => Err(self.backend_error("not connected")),
            },
            Ok(Err(_)) => Err(self.backend_error("the lock was dropped")),
            Err(_) => Err(self.backend_error(format!(
                "no connection to {} after {limit:?}",
                self.settings.url
            ))),
        }
    }

    /// A statement on the second connection, within the request timeout.
    async fn aux_query(
        self: &Arc<Self>,
        what: &str,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Error> {
        let (conn, _) = self.aux().await?;
        match tokio::time::timeout(
            self.settings.request_timeout,
            conn.client.query_typed(sql, params),
        )
        .await
        {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(pg_error(what, e)),
            Err(_) => {
                // A connection that does not answer is replaced.
                conn.kill();
                Err(self.backend_error(format!(
                    "{what}: timed out after {:?}",
                    self.settings.request_timeout
                )))
            }
        }
    }
}

impl Lock for PgLock {
    fn acquire(&self, req: AcquireRequest) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
        Box::pin(async move {
            // The schema exists and the server answers before a lock session is opened.
            let (_, aux_pid) = self.shared.aux().await?;
            let (tx, rx) = oneshot::channel();
            // The term lives in its own task: dropping this future drops `rx`, and the task
            // then cancels the wait, or releases a grant that nobody received.
            tokio::spawn(run_term(self.shared.clone(), req, aux_pid, tx));
            match rx.await {
                Ok(Ok(leadership)) => Ok(Box::new(leadership) as Box<dyn Leadership>),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(self.shared.backend_error("the lock session task ended")),
            }
        })
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
        Box::pin(async move {
            let s = &self.shared;
            let rows = s
                .aux_query(
                    "read the holder record",
                    &s.sql.holder,
                    &[
                        (&s.sql.key, Type::INT8),
                        (&s.settings.namespace, Type::TEXT),
                        (&s.name, Type::TEXT),
                    ],
                )
                .await?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let json: String = row
                .try_get(0)
                .map_err(|e| pg_error("read the holder record", e))?;
            serde_json::from_str(&json)
                .map(Some)
                .map_err(|e| Error::Corrupt {
                    backend: NAME,
                    what: format!("holder record of lock {:?}", s.name),
                    problem: e.to_string(),
                })
        })
    }

    fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            self.shared.aux().await?;
            Ok(Box::new(VersionChanges(self.shared.aux.holder.subscribe())) as Box<dyn Changes>)
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
        Box::pin(async move {
            crate::backend::validate_key(key)?;
            let s = &self.shared;
            let rows = s
                .aux_query(
                    "load state",
                    &s.sql.load,
                    &[
                        (&s.settings.namespace, Type::TEXT),
                        (&s.name, Type::TEXT),
                        (&key, Type::TEXT),
                    ],
                )
                .await?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let value: Vec<u8> = row.try_get(0).map_err(|e| pg_error("load state", e))?;
            let term: i64 = row.try_get(1).map_err(|e| pg_error("load state", e))?;
            let term = u64::try_from(term).map_err(|_| Error::Corrupt {
                backend: NAME,
                what: format!("state {key:?} of lock {:?}", s.name),
                problem: format!("negative term {term}"),
            })?;
            Ok(Some(Stored::new(value, term)))
        })
    }

    fn store<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        term: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            crate::backend::validate_key(key)?;
            let s = &self.shared;
            let stale = |current: Option<u64>| Error::StaleTerm {
                lock: s.name.clone(),
                term,
                current,
            };
            let Ok(term_i) = i64::try_from(term) else {
                return Err(stale(None));
            };
            let rows = s
                .aux_query(
                    "store state",
                    &s.sql.store,
                    &[
                        (&s.sql.key, Type::INT8),
                        (&term_i, Type::INT8),
                        (&s.settings.namespace, Type::TEXT),
                        (&s.name, Type::TEXT),
                        (&key, Type::TEXT),
                        (&value, Type::BYTEA),
                        (&s.sql.channel, Type::TEXT),
                    ],
                )
                .await?;
            let row = rows
                .first()
                .ok_or_else(|| s.backend_error("store state: no result row"))?;
            let get = |i| {
                row.try_get::<_, Option<i64>>(i)
                    .map_err(|e| pg_error("store state", e))
            };
            if get(0)? == Some(1) {
                return Ok(());
            }
            let newer = [get(2)?, get(3)?]
                .into_iter()
                .flatten()
                .filter_map(|t| u64::try_from(t).ok())
                .filter(|t| *t > term)
                .max();
            Err(stale(newer))
        })
    }

    fn watch_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            crate::backend::validate_key(key)?;
            self.shared.aux().await?;
            let mut keys = crate::sync::lock(&self.shared.aux.keys);
            keys.retain(|_, tx| tx.receiver_count() > 0);
            let rx = keys
                .entry(key.to_owned())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe();
            Ok(Box::new(VersionChanges(rx)) as Box<dyn Changes>)
        })
    }
}

// ------------------------------------------------------------------------------------------------
// One term: connect, wait, verify, record, hold, release.

type ReleaseReply = oneshot::Sender<Result<(), Error>>;

struct PgLeadership {
    lock: String,
    term: u64,
    holder: Holder,
    /// Confirmed liveness checks, by send time.
    renewals: Renewals,
    /// The server's dead-peer detection time: how long after the last exchange the server may
    /// free the lock of a holder it no longer hears.
    implied: Lease,
    lost: watch::Receiver<Option<String>>,
    release: Option<oneshot::Sender<ReleaseReply>>,
}

impl fmt::Debug for PgLeadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLeadership")
            .field("lock", &self.lock)
            .field("term", &self.term)
            .finish_non_exhaustive()
    }
}

impl Leadership for PgLeadership {
    fn term(&self) -> u64 {
        self.term
    }

    fn holder(&self) -> &Holder {
        &self.holder
    }

    fn renewals(&self) -> Option<Renewals> {
        Some(self.renewals.clone())
    }

    fn implied_lease(&self) -> Option<Lease> {
        Some(self.implied)
    }

    fn lost(&mut self) -> BoxFuture<'_, Error> {
        Box::pin(async move {
            let reason = match self.lost.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone().unwrap_or_default(),
                Err(_) => "the lock session ended".to_owned(),
            };
            Error::Lost {
                lock: self.lock.clone(),
                reason,
            }
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            let Some(tx) = self.release.take() else {
                return Ok(());
            };
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx.send(reply_tx).is_err() {
                return Ok(());
            }
            reply_rx.await.unwrap_or(Ok(()))
        })
    }
}

/// Why an acquisition attempt gave up early.
enum Abandon {
    /// The caller went away.
    Gone,
    /// An error to report.
    Failed(Error),
}

impl From<Error> for Abandon {
    fn from(e: Error) -> Self {
        Abandon::Failed(e)
    }
}

async fn run_term(
    shared: Arc<Shared>,
    req: AcquireRequest,
    aux_pid: i32,
    mut grant: oneshot::Sender<Result<PgLeadership, Error>>,
) {
    let settings = shared.settings.clone();
    let app = format!("lock {}", shared.name);
    let session = tokio::select! {
        () = grant.closed() => return,
        s = connect(&settings, Some(&app), None) => s,
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            let _ = grant.send(Err(e));
            return;
        }
    };
    let outcome = async {
        let pid = prepare_session(&shared, &session).await?;
        wait_for_lock(&shared, &session, pid, aux_pid, &mut grant).await?;
        Ok::<_, Abandon>((pid, req.clock.now()))
    }
    .await;
    let (pid, granted_at) = match outcome {
        Ok(v) => v,
        Err(abandon) => {
            session.close(&settings).await;
            if let Abandon::Failed(e) = abandon {
                let _ = grant.send(Err(e));
            }
            return;
        }
    };
    // This dedicated session holds the key from here on: every failure gives it back.
    let outcome = async {
        wait_for_predecessor(&shared, &session, &mut grant).await?;
        wait_out_predecessor(&shared, &session, &req.clock, granted_at, &mut grant).await?;
        let (aux_pid, broken) = shared.hold_step_down_lock().await?;
        // The server hears this session no earlier than now: the first "renewal".
        let sent = req.clock.now();
        record_holder(&shared, &session, pid, aux_pid, &req)
            .await
            .map(|(term, holder)| (term, holder, sent, broken))
    }
    .await;
    let (term, holder, sent, broken) = match outcome {
        Ok(v) => v,
        Err(abandon) => {
            shared.release_step_down_lock().await;
            let _ = tokio::time::timeout(
                settings.request_timeout,
                session.client.simple_query(&shared.sql.give_back),
            )
            .await;
            session.close(&settings).await;
            if let Abandon::Failed(e) = abandon {
                let _ = grant.send(Err(e));
            }
            return;
        }
    };
    *crate::sync::lock(&shared.held_term) = Some(term);
    let (lost_tx, lost_rx) = watch::channel(None);
    let (release_tx, release_rx) = oneshot::channel();
    let (renew_tx, renewals) = renewals(sent);
    let leadership = PgLeadership {
        lock: shared.name.clone(),
        term,
        holder,
        renewals,
        implied: Lease::new(settings.fencing_bound).with_margin(settings.fencing_margin()),
        lost: lost_rx,
        release: Some(release_tx),
    };
    tracing::debug!(lock = %shared.name, term, backend_pid = pid, "postgres: lock acquired");
    // If nobody receives the grant, the leadership is dropped with it, `release_rx` closes, and
    // `hold` releases at once.
    let _ = grant.send(Ok(leadership));
    let liveness = Liveness {
        clock: req.clock,
        confirmed: renew_tx,
    };
    let term = Term {
        term,
        session,
        pid,
        step_down_broken: broken,
    };
    hold(&shared, term, &liveness, lost_tx, release_rx).await;
}

/// The lock session of a term.
struct Term {
    term: u64,
    session: Conn,
    pid: i32,
    step_down_broken: CancellationToken,
}

/// Where `hold` reports its confirmed liveness checks.
struct Liveness {
    clock: Clock,
    confirmed: RenewalSender,
}

/// Session settings; returns the server process id.
async fn prepare_session(shared: &Shared, session: &Conn) -> Result<i32, Abandon> {
    let s = &shared.settings;
    match tokio::time::timeout(s.request_timeout, configure_session(s, session)).await {
        Ok(Ok(pid)) => Ok(pid),
        Ok(Err(e)) => Err(pg_error("prepare the lock session", e).into()),
        Err(_) => Err(shared
            .backend_error(format!(
                "prepare the lock session: timed out after {:?}",
                s.request_timeout
            ))
            .into()),
    }
}

/// Settings of both connections; returns the server process id.
///
/// No server-wide timeout may cut the blocking wait, the idle holder or the idle second
/// connection (which holds the step-down lock); the server notices a vanished client (and frees
/// its locks) by keepalive within the detection time.
async fn configure_session(s: &Settings, session: &Conn) -> Result<i32, tokio_postgres::Error> {
    let info = session
        .client
        .simple_query("SELECT pg_backend_pid(), current_setting('server_version_num')")
        .await?;
    let row = first_row(&info);
    let pid = row
        .and_then(|r| r.get(0))
        .and_then(|p| p.parse::<i32>().ok())
        .unwrap_or(0);
    let version = row
        .and_then(|r| r.get(1))
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    let mut sets = format!(
        "SET statement_timeout = 0; SET lock_timeout = 0; \
         SET idle_in_transaction_session_timeout = 0; \
         SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; \
         SET tcp_keepalives_count = {};",
        s.keepalive_idle.as_secs(),
        s.keepalive_interval.as_secs(),
        s.keepalive_count
    );
    if version >= 120_000 {
        sets.push_str(&format!(
            " SET tcp_user_timeout = {};",
            s.server_detection().as_millis()
        ));
    }
    if version >= 140_000 {
        // A waiter whose process died leaves the queue within a second instead of taking the
        // lock for a moment when its turn comes.
        sets.push_str(
            " SET idle_session_timeout = 0; SET client_connection_check_interval = 1000;",
        );
    }
    session.client.batch_execute(&sets).await?;
    Ok(pid)
}

/// Blocks in `pg_advisory_lock` until granted; cancels the wait if the caller goes away.
/// Refuses a session that is not a dedicated server session (a transaction pooler).
async fn wait_for_lock(
    shared: &Arc<Shared>,
    session: &Conn,
    pid: i32,
    aux_pid: i32,
    grant: &mut oneshot::Sender<Result<PgLeadership, Error>>,
) -> Result<(), Abandon> {
    let s = &shared.settings;
    let mut lock = std::pin::pin!(session.client.simple_query(&shared.sql.lock));
    let result = tokio::select! {
        r = &mut lock => r,
        never = end_stopped_holders(shared) => match never {},
        () = grant.closed() => {
            // Cancel the wait; if the grant won the race, give it back before closing.
            if let Err(e) = session.cancel(&s.tls).await {
                tracing::debug!(lock = %shared.name, error = %describe(&e), "postgres: cancel request failed");
            }
            let granted = matches!(tokio::time::timeout(s.request_timeout, &mut lock).await, Ok(Ok(_)));
            if granted {
                let _ = tokio::time::timeout(s.request_timeout, session.client.simple_query(&shared.sql.unlock)).await;
            }
            return Err(Abandon::Gone);
        }
    };
    let messages = result.map_err(|e| pg_error("wait for the advisory lock", e))?;
    let row = first_row(&messages);
    let before = row.and_then(|r| r.get(0)).unwrap_or("");
    let lock_pid = row
        .and_then(|r| r.get(2))
        .and_then(|p| p.parse::<i32>().ok())
        .unwrap_or(0);
    let pooled = if before != "0" {
        Some(format!(
            "the server session already held the lock before this node asked for it \
             ({before} lock(s) held by server process {lock_pid})"
        ))
    } else if lock_pid != pid {
        Some(format!(
            "the lock was taken by server process {lock_pid}, but the session started on {pid}"
        ))
    } else if lock_pid == aux_pid {
        Some(format!(
            "the lock session and the second connection share server process {pid}"
        ))
    } else {
        None
    };
    if let Some(why) = pooled {
        // Give back what was just taken (on a shared server connection it is someone else's).
        let _ = tokio::time::timeout(
            s.request_timeout,
            session.client.simple_query(&shared.sql.unlock),
        )
        .await;
        return Err(refuse_pooler(shared, &why).into());
    }
    Ok(())
}

/// While this node waits for the key, ends the sessions of a node that holds it but has stopped
/// (`SIGSTOP`, a frozen VM whose kernel still answers keepalives): the server shows its lock
/// session idle for longer than any healthy node leaves it (`Settings::stopped_after`). A
/// healthy holder's liveness checks keep its session busy, and a successor waits out its
/// predecessor's bound in a server-side sleep. A stopped holder has fenced itself long before
/// (its term lasts one fencing bound past its last check), and its successor still waits for
/// that bound. Needs the holder's role, or `pg_signal_backend` and `pg_read_all_stats`.
async fn end_stopped_holders(shared: &Arc<Shared>) -> std::convert::Infallible {
    let s = &shared.settings;
    let idle_ms = i64::try_from(s.stopped_after().as_millis()).unwrap_or(i64::MAX);
    let mut warned = false;
    loop {
        tokio::time::sleep(STOPPED_CHECK_EVERY).await;
        let rows = shared
            .aux_query(
                "end a stopped holder's sessions",
                &shared.sql.end_stopped,
                &[(&shared.sql.key, Type::INT8), (&idle_ms, Type::INT8)],
            )
            .await;
        let problem = match rows {
            Ok(rows) => {
                let get = |i| {
                    rows.first()
                        .and_then(|r| r.try_get::<_, Option<i64>>(i).ok())
                        .flatten()
                        .unwrap_or(0)
                };
                let (ended, aux_ended, hidden) = (get(0), get(1), get(2));
                if ended > 0 {
                    tracing::warn!(
                        lock = %shared.name,
                        idle_over = ?s.stopped_after(),
                        second_connections = aux_ended,
                        "postgres: ended the sessions of a stopped node holding the lock"
                    );
                }
                (hidden > 0).then(|| {
                    "the holder's session is not visible to this role (pg_stat_activity)".to_owned()
                })
            }
            Err(e) => {
                let message = e.to_string();
                message.contains("42501").then_some(message)
            }
        };
        if let Some(problem) = problem
            && !warned
        {
            warned = true;
            crate::metrics::backend_error(&shared.name, "end_stopped_holder");
            tracing::warn!(
                lock = %shared.name,
                problem = %problem,
                "postgres: a stopped node holding the lock cannot be ended: grant this role \
                 pg_signal_backend and pg_read_all_stats, or use the same role on every node; \
                 until then a stopped holder keeps the lock until it resumes"
            );
        }
    }
}

/// Once granted the key, waits until the previous holder can no longer act: at once when its
/// record carries a clean release or it ran on this host and its process is gone (a death
/// certificate); otherwise until its fencing bound (its recorded `lease_ms`, at most
/// `max_fencing_bound`; the maximum for a record without one) has passed since the grant. The
/// server frees a session lock when it closes the session, which it can do while the holder
/// still believes it holds the lock (both of its connections ended by an administrator, an
/// asymmetric partition): the holder's term ends one bound after its last good liveness check,
/// which came before the grant. The wait is a server-side sleep on the lock session, so the
/// session stays active and no other waiter takes this node for a stopped one.
async fn wait_out_predecessor(
    shared: &Shared,
    session: &Conn,
    clock: &Clock,
    granted_at: Timestamp,
    grant: &mut oneshot::Sender<Result<PgLeadership, Error>>,
) -> Result<(), Abandon> {
    let s = &shared.settings;
    let sql = &shared.sql;
    let read = tokio::time::timeout(
        s.request_timeout,
        session.client.query_typed(
            &sql.predecessor,
            &[
                (&sql.key, Type::INT8),
                (&s.namespace, Type::TEXT),
                (&shared.name, Type::TEXT),
            ],
        ),
    )
    .await;
    let rows = match read {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => return Err(pg_error("read the previous holder's record", e).into()),
        Err(_) => {
            return Err(shared
                .backend_error("read the previous holder's record: timed out")
                .into());
        }
    };
    // No record: nobody has held this lock since the table was made.
    let Some(json) = rows.first().and_then(|r| r.try_get::<_, String>(0).ok()) else {
        return Ok(());
    };
    let max = s.max_fencing_bound();
    let bound = match serde_json::from_str::<Holder>(&json) {
        Ok(h) if h.released => return Ok(()),
        Ok(h) => {
            let bound = h.lease_ms.map_or(max, Duration::from_millis).min(max);
            let until = granted_at.saturating_add(bound);
            if let (Some(theirs), Some(mine)) = (&h.process, ProcessIdentity::current())
                && mine.same_host(theirs)
            {
                let left = until.saturating_duration_since(clock.now());
                let gone = tokio::select! {
                    gone = theirs.wait_gone(left) => gone,
                    () = grant.closed() => return Err(Abandon::Gone),
                };
                if gone {
                    return Ok(());
                }
            }
            tracing::debug!(lock = %shared.name, predecessor = %h.id, term = h.term, bound = ?bound, "postgres: waiting out the previous holder's fencing bound");
            bound
        }
        Err(e) => {
            tracing::warn!(lock = %shared.name, error = %e, bound = ?max, "postgres: unreadable previous holder record; waiting the maximum fencing bound");
            max
        }
    };
    let until = granted_at.saturating_add(bound);
    let left = until.saturating_duration_since(clock.now());
    if !left.is_zero() {
        let statement = format!("{}{:.6})", sql.sleep, left.as_secs_f64());
        let mut sleep = std::pin::pin!(session.client.simple_query(&statement));
        let slept = tokio::select! {
            r = &mut sleep => r,
            () = grant.closed() => {
                if let Err(e) = session.cancel(&s.tls).await {
                    tracing::debug!(lock = %shared.name, error = %describe(&e), "postgres: cancel request failed");
                }
                let _ = tokio::time::timeout(s.request_timeout, &mut sleep).await;
                return Err(Abandon::Gone);
            }
        };
        slept.map_err(|e| pg_error("wait out the previous holder's fencing bound", e))?;
    }
    // The server's sleep ran on its clock: make sure of it on ours.
    let left = until.saturating_duration_since(clock.now());
    if !left.is_zero() {
        tokio::time::sleep(left).await;
    }
    Ok(())
}

/// Waits until the previous holder has stepped down: it holds the step-down lock (shared) on its
/// second connection until its elector released the term, or until its process is gone. A
/// holder whose lock session was terminated (`pg_terminate_backend`) learns of it a moment after
/// the server freed the key; without this wait its successor could be primary in that moment.
async fn wait_for_predecessor(
    shared: &Shared,
    session: &Conn,
    grant: &mut oneshot::Sender<Result<PgLeadership, Error>>,
) -> Result<(), Abandon> {
    let s = &shared.settings;
    let mut wait = std::pin::pin!(session.client.simple_query(&shared.sql.ack_wait));
    let result = tokio::select! {
        r = &mut wait => r,
        () = grant.closed() => {
            if let Err(e) = session.cancel(&s.tls).await {
                tracing::debug!(lock = %shared.name, error = %describe(&e), "postgres: cancel request failed");
            }
            let _ = tokio::time::timeout(s.request_timeout, &mut wait).await;
            return Err(Abandon::Gone);
        }
    };
    result.map_err(|e| pg_error("wait for the previous holder to step down", e))?;
    Ok(())
}

fn refuse_pooler(shared: &Shared, why: &str) -> Error {
    shared.backend_error(format!(
        "refusing lock {:?}: {why}; this is not a dedicated server session — a connection pooler \
         in transaction or statement mode (PgBouncer pool_mode=transaction) lets two clients hold \
         one advisory lock. Connect directly to PostgreSQL, or through pool_mode=session",
        shared.name
    ))
}

/// Checks that `pg_locks` shows this session holding the key, draws the term, records the
/// holder and notifies.
async fn record_holder(
    shared: &Shared,
    session: &Conn,
    pid: i32,
    aux_pid: i32,
    req: &AcquireRequest,
) -> Result<(u64, Holder), Abandon> {
    let s = &shared.settings;
    let sql = &shared.sql;
    let held = tokio::time::timeout(
        s.request_timeout,
        session.client.simple_query(&sql.held_term),
    )
    .await;
    let held = match held {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Err(pg_error("check pg_locks and draw a term", e).into()),
        Err(_) => {
            return Err(shared
                .backend_error("check pg_locks and draw a term: timed out")
                .into());
        }
    };
    let row = first_row(&held);
    let now_pid = row
        .and_then(|r| r.get(0))
        .and_then(|p| p.parse::<i32>().ok())
        .unwrap_or(0);
    if now_pid != pid || row.and_then(|r| r.get(1)) != Some("t") {
        return Err(refuse_pooler(
            shared,
            &format!(
                "after acquiring, pg_locks does not show server process {pid} holding the lock \
                 (the check ran on process {now_pid})"
            ),
        )
        .into());
    }
    let Some(term) = row
        .and_then(|r| r.get(2))
        .and_then(|t| t.parse::<i64>().ok())
        .filter(|t| *t > 0)
    else {
        return Err(shared
            .backend_error("draw a term: the sequence returned no positive value")
            .into());
    };
    let mut record = req.holder(0);
    record.lease_ms = Some(u64::try_from(s.fencing_bound.as_millis()).unwrap_or(u64::MAX));
    record.process = ProcessIdentity::current();
    let json = serde_json::to_string(&record)
        .map_err(|e| Error::backend(NAME, "encode the holder record", e))?;
    // The record as readers will see it (the stored time has millisecond precision).
    let mut holder: Holder = serde_json::from_str(&json)
        .map_err(|e| Error::backend(NAME, "decode the holder record", e))?;
    let recorded = tokio::time::timeout(
        s.request_timeout,
        session.client.query_typed(
            &sql.acquired,
            &[
                (&sql.key, Type::INT8),
                (&s.namespace, Type::TEXT),
                (&shared.name, Type::TEXT),
                (&json, Type::TEXT),
                (&sql.channel, Type::TEXT),
                (&term, Type::INT8),
                (&aux_pid, Type::INT4),
            ],
        ),
    )
    .await;
    let rows = match recorded {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            return Err(pg_error("record the holder", e).into());
        }
        Err(_) => {
            return Err(shared.backend_error("record the holder: timed out").into());
        }
    };
    let recorded: Option<i64> = rows.first().and_then(|r| r.try_get(0).ok()).flatten();
    let Some(term) = recorded.and_then(|t| u64::try_from(t).ok()) else {
        let owner: Option<String> = rows.first().and_then(|r| r.try_get(2).ok()).flatten();
        return Err(shared
            .backend_error(format!(
                "lock {:?} in namespace {:?} hashes to advisory key {}, which the lock {} already \
                 uses; rename one of them or use another namespace",
                shared.name,
                s.namespace,
                sql.key,
                owner.map_or_else(|| "?".to_owned(), |o| format!("{o:?}"))
            ))
            .into());
    };
    holder.term = term;
    Ok((term, holder))
}

/// Holds the lock: checks the session every interval, releases on request or when the
/// leadership is dropped, reports a loss.
async fn hold(
    shared: &Arc<Shared>,
    term: Term,
    liveness: &Liveness,
    lost: watch::Sender<Option<String>>,
    mut release: oneshot::Receiver<ReleaseReply>,
) {
    let s = &shared.settings;
    let Term {
        term,
        session,
        pid,
        step_down_broken,
    } = term;
    enum Next {
        Release(Option<ReleaseReply>),
        Lost(String),
        Check,
    }
    let reason = loop {
        let next = tokio::select! {
            biased;
            cmd = &mut release => Next::Release(cmd.ok()),
            reason = session.ended() => Next::Lost(format!("the lock session ended: {reason}")),
            () = step_down_broken.cancelled() => Next::Lost(
                "the second connection came back but could not take the step-down lock again".to_owned(),
            ),
            () = tokio::time::sleep(s.liveness_every) => Next::Check,
        };
        match next {
            Next::Release(reply) => {
                if reply.is_some() {
                    // The elector has stepped down: the successor need not wait for this node.
                    mark_released(shared, &session, term).await;
                }
                shared.release_step_down_lock().await;
                let result = release_lock(shared, &session).await;
                session.close(s).await;
                if let Err(e) = &result {
                    tracing::warn!(lock = %shared.name, error = %e, "postgres: release failed; the session was closed");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
                return;
            }
            Next::Lost(reason) => break reason,
            Next::Check => {
                let sent = liveness.clock.now();
                if let Err(reason) = check_liveness(shared, &session, pid).await {
                    break reason;
                }
                liveness.confirmed.confirm(sent);
            }
        }
    };
    // Close the socket now: a server that still hears us ends the session and frees the lock.
    session.kill();
    tracing::warn!(lock = %shared.name, backend_pid = pid, reason = %reason, "postgres: lock lost");
    lost.send_replace(Some(reason));
    // The elector releases after the node stepped down and its tasks ended (or drops the
    // leadership): only then may a successor act.
    let reply = release.await.ok();
    if reply.is_some() {
        // Stepped down: a successor waiting out this node's bound may read this mark.
        let _ = shared
            .aux_query(
                "mark the holder record released",
                &shared.sql.mark_released,
                &[(&shared.sql.key, Type::INT8), (&term_i64(term), Type::INT8)],
            )
            .await;
    }
    shared.release_step_down_lock().await;
    if let Some(reply) = reply {
        let _ = reply.send(Ok(()));
    }
}

fn term_i64(term: u64) -> i64 {
    i64::try_from(term).unwrap_or(i64::MAX)
}

/// Marks this term's holder record as cleanly released (only this term's: a node that is
/// behind never marks its successor's record). A failure only costs the successor its wait.
async fn mark_released(shared: &Shared, session: &Conn, term: u64) {
    let marked = tokio::time::timeout(
        shared.settings.request_timeout,
        session.client.query_typed(
            &shared.sql.mark_released,
            &[(&shared.sql.key, Type::INT8), (&term_i64(term), Type::INT8)],
        ),
    )
    .await;
    if !matches!(marked, Ok(Ok(_))) {
        tracing::debug!(lock = %shared.name, term, "postgres: could not mark the holder record released");
    }
}

async fn check_liveness(shared: &Shared, session: &Conn, pid: i32) -> Result<(), String> {
    let timeout = shared.settings.liveness_timeout;
    let mut query = std::pin::pin!(session.client.simple_query(&shared.sql.held));
    let answer = match tokio::time::timeout(timeout, &mut query).await {
        Ok(answer) => answer,
        // The timer may have run out while this process was not running (stopped, frozen,
        // descheduled), with the answer unread in the socket: judge only after the connection
        // task had a moment of running time to read it.
        Err(_) => match tokio::time::timeout(ANSWER_GRACE, &mut query).await {
            Ok(answer) => answer,
            Err(_) => {
                return Err(format!(
                    "the lock session did not answer within {timeout:?}"
                ));
            }
        },
    };
    let answer = answer.map_err(|e| format!("liveness check failed: {}", describe(&e)))?;
    let row = first_row(&answer);
    let now_pid = row
        .and_then(|r| r.get(0))
        .and_then(|p| p.parse::<i32>().ok())
        .unwrap_or(0);
    if now_pid != pid {
        return Err(format!(
            "the lock session moved from server process {pid} to {now_pid} (a connection pooler?)"
        ));
    }
    if row.and_then(|r| r.get(1)) != Some("t") {
        return Err(format!(
            "pg_locks no longer shows server process {pid} holding the lock"
        ));
    }
    Ok(())
}

/// Unlocks explicitly (closing the connection frees the lock only when the server gets to it),
/// then notifies the secondaries.
async fn release_lock(shared: &Shared, session: &Conn) -> Result<(), Error> {
    let s = &shared.settings;
    match tokio::time::timeout(
        s.request_timeout,
        session.client.simple_query(&shared.sql.release),
    )
    .await
    {
        Ok(Ok(m)) if first_row(&m).and_then(|r| r.get(0)) == Some("t") => Ok(()),
        Ok(Ok(_)) => Err(Error::Lost {
            lock: shared.name.clone(),
            reason: "the lock was no longer held when released".to_owned(),
        }),
        Ok(Err(e)) => Err(pg_error("release", e)),
        Err(_) => {
            Err(shared.backend_error(format!("release: timed out after {:?}", s.request_timeout)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;

    /// A waiter granted the key while its second connection reconnects must not stall: the
    /// step-down guard is not held while waiting for that connection (`supervise` needs it to
    /// publish the new one; before, the wait ran into its 10 s timeout).
    #[tokio::test]
    async fn a_grant_during_a_reconnection_of_the_second_connection_does_not_stall() {
        let url = format!(
            "{}?namespace=lockorder-{}-{:x}&schema=tp_lock_order",
            crate::test_support::postgres_url(),
            std::process::id(),
            crate::clock::monotonic_nanos()
        );
        let settings = Arc::new(Settings::from_url(&url).unwrap());
        let a = PgLock::new(settings.clone(), "jobs");
        let req = |id: &str| AcquireRequest::new(NodeId::new(id));
        let Some(la) = crate::test_support::require(
            "PostgreSQL",
            tokio::time::timeout(Duration::from_secs(10), a.acquire(req("a")))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string())),
        ) else {
            return;
        };
        let b = Arc::new(PgLock::new(settings, "jobs"));
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire(req("b")).await })
        };
        // b waits in the queue (its lock session asked for the key).
        let mut rx = b.shared.aux.state.subscribe();
        let Ok(state) = rx.wait_for(|s| matches!(s, AuxState::Ready(..))).await else {
            panic!("b's second connection never came up");
        };
        let AuxState::Ready(conn, _) = state.clone() else {
            unreachable!()
        };
        drop(state);
        let (admin, driver) =
            tokio_postgres::connect(&crate::test_support::postgres_url(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(driver);
        let key = b.shared.sql.key;
        loop {
            let waiting: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                     AND classid = ($1::bigint >> 32)::text::oid \
                     AND objid = ($1::bigint & 4294967295)::text::oid AND objsubid = 1",
                    &[&key],
                )
                .await
                .unwrap()
                .get(0);
            if waiting == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // b's second connection drops and takes a while to come back; a releases meanwhile.
        b.shared.aux_delay_ms.store(1_000, Ordering::SeqCst);
        conn.kill();
        rx.wait_for(|s| !matches!(s, AuxState::Ready(..)))
            .await
            .unwrap();
        let released = tokio::time::Instant::now();
        la.release().await.unwrap();
        let lb = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("b stalled after its grant")
            .unwrap()
            .unwrap();
        eprintln!("b primary {:?} after a released", released.elapsed());
        lb.release().await.unwrap();
    }
}

#[cfg(test)]
mod step_down_tests {
    use super::*;
    use crate::NodeId;

    /// A holder whose second connection comes back but cannot take the step-down lock again
    /// ends its term: successors would no longer wait for it.
    #[tokio::test]
    async fn a_failed_retake_of_the_step_down_lock_ends_the_term() {
        let url = format!(
            "{}?namespace=retake-{}-{:x}&schema=tp_lock_order",
            crate::test_support::postgres_url(),
            std::process::id(),
            crate::clock::monotonic_nanos()
        );
        let settings = Arc::new(Settings::from_url(&url).unwrap());
        let a = PgLock::new(settings, "jobs");
        let Some(mut la) = crate::test_support::require(
            "PostgreSQL",
            tokio::time::timeout(
                Duration::from_secs(10),
                a.acquire(AcquireRequest::new(NodeId::new("a"))),
            )
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string())),
        ) else {
            return;
        };
        let AuxState::Ready(conn, _) = a.shared.aux.state.borrow().clone() else {
            panic!("a's second connection is not up");
        };
        let (admin, driver) =
            tokio_postgres::connect(&crate::test_support::postgres_url(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(driver);
        // The connection drops; before it is back, another session holds the step-down lock.
        a.shared.aux_delay_ms.store(500, Ordering::SeqCst);
        conn.kill();
        let take = a.shared.sql.ack_wait.split(';').next().unwrap().to_owned();
        tokio::time::timeout(Duration::from_secs(5), admin.batch_execute(&take))
            .await
            .expect("the step-down lock was not freed with the connection")
            .unwrap();
        let lost = tokio::time::timeout(Duration::from_secs(10), la.lost())
            .await
            .expect("the term went on without the step-down lock");
        assert!(lost.to_string().contains("step-down"), "{lost}");
        la.release().await.unwrap();
    }
}
