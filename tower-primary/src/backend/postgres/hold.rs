//! Supervising a held term: liveness checks, the loss, the release.

use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio_postgres::types::Type;

use super::config::ANSWER_GRACE;
use super::conn::{Conn, describe, pg_error};
use super::lock::{Shared, first_row};
use super::term::{Liveness, ReleaseReply, Term};
use crate::error::Error;

/// Holds the lock: checks the session every interval, releases on request or when the
/// leadership is dropped, reports a loss.
pub(super) async fn hold(
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

pub(super) fn term_i64(term: u64) -> i64 {
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
