//! One term: connect the lock session, wait for the key, verify it is a dedicated session,
//! record the holder; then [`super::hold`] keeps it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::NAME;
use super::config::Settings;
use super::conn::{Conn, connect, describe, pg_error};
use super::hold::hold;
use super::lock::{Shared, first_row};
use super::predecessor::{end_stopped_holders, wait_for_predecessor, wait_out_predecessor};
use crate::backend::{
    AcquireRequest, BoxFuture, Leadership, Lease, RenewalSender, Renewals, renewals,
};
use crate::clock::Clock;
use crate::error::Error;
use crate::process::ProcessIdentity;
use crate::role::Holder;

pub(super) type ReleaseReply = oneshot::Sender<Result<(), Error>>;

pub(super) struct PgLeadership {
    shared: Arc<Shared>,
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

    fn reserve<'a>(
        &'a mut self,
        node: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if let Some(reason) = self.lost.borrow().clone() {
                return Err(Error::Lost {
                    lock: self.lock.clone(),
                    reason,
                });
            }
            self.shared.reserve(self.term, node, window).await
        })
    }
}

/// Why an acquisition attempt gave up early.
pub(super) enum Abandon {
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

pub(super) async fn run_term(
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
        loop {
            // Subscribed before the check: a reservation consumed after it wakes this node.
            let mut reservations = shared.aux.reservation.subscribe();
            wait_for_lock(&shared, &session, pid, aux_pid, &mut grant).await?;
            let Some(left) = shared.reserved_for_another(&session, &req.node).await? else {
                break;
            };
            // Reserved for another node: give the key back at once (the reserved node may be
            // next in the queue), wait off the queue, then queue again.
            shared.give_back_key(&session).await?;
            tokio::select! {
                () = grant.closed() => return Err(Abandon::Gone),
                _ = reservations.changed() => {}
                () = tokio::time::sleep(left) => {}
            }
        }
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
        shared: shared.clone(),
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
pub(super) struct Term {
    pub(super) term: u64,
    pub(super) session: Conn,
    pub(super) pid: i32,
    pub(super) step_down_broken: CancellationToken,
}

/// Where `hold` reports its confirmed liveness checks.
pub(super) struct Liveness {
    pub(super) clock: Clock,
    pub(super) confirmed: RenewalSender,
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
pub(super) async fn configure_session(
    s: &Settings,
    session: &Conn,
) -> Result<i32, tokio_postgres::Error> {
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

pub(super) fn refuse_pooler(shared: &Shared, why: &str) -> Error {
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
