//! The second connection of a lock: LISTEN, the holder record, the state API and the step-down
//! lock. It reconnects by itself and wakes every watcher when it does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};
use tokio_util::sync::CancellationToken;

use super::NAME;
use super::conn::{Conn, OnNotify, connect, pg_error};
use super::hold::term_i64;
use super::lock::{Shared, first_row};
use super::term::configure_session;
use crate::backoff::Backoff;
use crate::error::Error;

/// The second connection: LISTEN, holder record, state.
pub(super) struct Aux {
    pub(super) state: watch::Sender<AuxState>,
    /// Bumped at every holder notification, and after every (re)connection.
    pub(super) holder: watch::Sender<u64>,
    /// Bumped at every registry notification, and after every (re)connection.
    pub(super) registry: watch::Sender<u64>,
    /// Bumped when a reservation is written or consumed, and after every (re)connection.
    pub(super) reservation: watch::Sender<u64>,
    /// One version per watched state key.
    pub(super) keys: Mutex<HashMap<String, watch::Sender<u64>>>,
    pub(super) started: AtomicBool,
    pub(super) stop: CancellationToken,
}

#[derive(Clone)]
pub(super) enum AuxState {
    Connecting,
    /// The connection and its server process id.
    Ready(Arc<Conn>, i32),
    /// The last attempt's error (the supervisor retries).
    Failed(Arc<Error>),
}

impl Shared {
    fn on_notify(&self, payload: &str) {
        if let Some(key) = payload.strip_prefix("state:") {
            if let Some(tx) = crate::sync::lock(&self.aux.keys).get(key) {
                tx.send_modify(|v| *v += 1);
            }
        } else if payload == "registry" {
            self.aux.registry.send_modify(|v| *v += 1);
        } else if payload == "reservation" {
            self.aux.reservation.send_modify(|v| *v += 1);
        } else {
            self.aux.holder.send_modify(|v| *v += 1);
        }
    }

    /// Wakes every watcher: notifications may have been missed while disconnected.
    fn bump_all(&self) {
        self.aux.holder.send_modify(|v| *v += 1);
        self.aux.registry.send_modify(|v| *v += 1);
        self.aux.reservation.send_modify(|v| *v += 1);
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
                    // This process's registry entries died with the last session.
                    self.register_again(&conn).await;
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
                    self.aux.state.send_replace(AuxState::Failed(Arc::new(err)));
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
    pub(super) async fn hold_step_down_lock(
        self: &Arc<Self>,
    ) -> Result<(i32, CancellationToken), Error> {
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
    pub(super) async fn release_step_down_lock(&self) {
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
    pub(super) async fn aux(self: &Arc<Self>) -> Result<(Arc<Conn>, i32), Error> {
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
                AuxState::Failed(e) => Err(again(e)),
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
    pub(super) async fn aux_query(
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

/// The same error once more, for another caller (errors are not `Clone`); its kind is kept,
/// and its message, which already holds the causes.
fn again(e: &Error) -> Error {
    match e {
        Error::Misconfigured { kind, message, .. } => {
            Error::misconfigured(NAME, *kind, message.clone(), None)
        }
        Error::Backend { message, .. } => Error::backend_msg(NAME, message.clone()),
        other => Error::backend_msg(NAME, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;
    use crate::backend::postgres::config::Settings;
    use crate::backend::postgres::lock::PgLock;
    use crate::backend::{AcquireRequest, Lock};

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
    use crate::backend::postgres::config::Settings;
    use crate::backend::postgres::lock::PgLock;
    use crate::backend::{AcquireRequest, Lock};

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
