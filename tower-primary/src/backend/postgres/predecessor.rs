//! Before a granted node becomes primary: the previous holder must have stepped down and be
//! unable to act (a death certificate, or its fencing bound waited out). While waiting for the
//! key, stopped holders are ended.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_postgres::types::Type;

use super::config::STOPPED_CHECK_EVERY;
use super::conn::{Conn, describe, pg_error};
use super::lock::Shared;
use super::term::{Abandon, PgLeadership};
use crate::clock::{Clock, Timestamp};
use crate::error::Error;
use crate::process::ProcessIdentity;
use crate::role::Holder;

/// While this node waits for the key, ends the sessions of a node that holds it but has stopped
/// (`SIGSTOP`, a frozen VM whose kernel still answers keepalives): the server shows its lock
/// session idle for longer than any healthy node leaves it (`Settings::stopped_after`). A
/// healthy holder's liveness checks keep its session busy, and a successor waits out its
/// predecessor's bound in a server-side sleep. A stopped holder has fenced itself long before
/// (its term lasts one fencing bound past its last check), and its successor still waits for
/// that bound. Needs the holder's role, or `pg_signal_backend` and `pg_read_all_stats`.
pub(super) async fn end_stopped_holders(shared: &Arc<Shared>) -> std::convert::Infallible {
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
pub(super) async fn wait_out_predecessor(
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
pub(super) async fn wait_for_predecessor(
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
