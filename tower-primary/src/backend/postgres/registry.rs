//! The candidate registry and reservations on PostgreSQL.
//!
//! **Registry.** A node's entry is a row of `candidates (namespace, lock_name, node, entry jsonb,
//! registration, backend_pid, backend_start, updated_at)` written on the lock's second
//! connection, which lives as long as the elector: the row names that session's server process
//! and start time. Readers list only rows whose session `pg_stat_activity` still shows, so the
//! entry of a node whose process died (its socket closed, the server ended the session) is gone
//! at once, without anybody deleting it; readers delete such rows later. When the second
//! connection comes back after a loss, the node writes its entries again. Every write and
//! withdrawal sends a `NOTIFY` on the lock's channel (payload `registry`); a death sends none and
//! is seen at the next read. Dropping the [`Registration`] withdraws the row (asynchronously).
//!
//! **Reservations.** `reservations (key, namespace, lock_name, node, until, term)`: one row per
//! lock, written by the holder in a statement that checks, like a state write, that its term's
//! session still holds the key (`until = now() + window`, the server's clock). A waiter granted
//! the key reads it at once on its lock session: a live reservation for another node makes it
//! unlock the key and wait, off the queue, for the server-computed rest of the window or a
//! `NOTIFY` (payload `reservation`) that the reservation changed, then queue again. The reserved
//! node's grant deletes (consumes) the row and goes on as any acquisition: its term comes from
//! the sequence, higher than every earlier one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use std::{fmt, future::Future};

use tokio_postgres::types::Type;

use super::NAME;
use super::conn::{Conn, pg_error};
use super::lock::Shared;
use super::second_connection::AuxState;
use super::term::Abandon;
use crate::NodeId;
use crate::backend::{BoxFuture, Candidate, Registration};
use crate::error::Error;

/// A registry entry of this process, withdrawn when dropped.
pub(super) struct PgRegistration {
    shared: Arc<Shared>,
    node: String,
    id: i64,
}

impl fmt::Debug for PgRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresRegistration")
            .field("lock", &self.shared.name)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// An id for a new registration: tells this registration's row from a later one of the same
/// node (a re-registration, a restarted process), whose row an old withdrawal must not delete.
fn registration_id() -> i64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let bits = (u64::from(std::process::id()) << 40)
        ^ crate::clock::monotonic_nanos()
        ^ NEXT.fetch_add(1, Ordering::Relaxed).rotate_right(8);
    i64::from_ne_bytes(bits.to_ne_bytes())
}

impl Registration for PgRegistration {
    fn update(&self, entry: Candidate) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let mut entry = entry;
            entry.node.clone_from(&self.node);
            let mut regs = self.shared.registrations.lock().await;
            regs.insert(self.node.clone(), (self.id, entry.clone()));
            // Kept in the map on failure: a new second connection writes it again.
            let (conn, _) = self.shared.aux().await?;
            self.shared.upsert(&conn, self.id, &entry).await
        })
    }
}

impl Drop for PgRegistration {
    fn drop(&mut self) {
        let shared = self.shared.clone();
        let node = std::mem::take(&mut self.node);
        let id = self.id;
        let withdraw = async move {
            let mut regs = shared.registrations.lock().await;
            if regs.get(&node).is_some_and(|(i, _)| *i == id) {
                regs.remove(&node);
            }
            // Without a connection the row has died with the last session already.
            let conn = match &*shared.aux.state.borrow() {
                AuxState::Ready(conn, _) if !conn.is_ended() => Some(conn.clone()),
                _ => None,
            };
            if let Some(conn) = conn {
                let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 5] = [
                    (&shared.settings.namespace, Type::TEXT),
                    (&shared.name, Type::TEXT),
                    (&node, Type::TEXT),
                    (&id, Type::INT8),
                    (&shared.sql.channel, Type::TEXT),
                ];
                let result = shared.timed(
                    "withdraw the registry entry",
                    conn.client
                        .query_typed(&shared.sql.registry.withdraw, &params),
                );
                if let Err(e) = result.await {
                    tracing::debug!(lock = %shared.name, node = %node, error = %e, "postgres: could not withdraw the registry entry");
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(withdraw);
            }
            Err(_) => {
                // No runtime: the entry goes with the connection (closed with the lock).
                if let Ok(mut regs) = self.shared.registrations.try_lock()
                    && regs.get(&self.node).is_some_and(|(i, _)| *i == id)
                {
                    regs.remove(&self.node);
                }
            }
        }
    }
}

impl Shared {
    /// A statement within the request timeout.
    async fn timed<T>(
        &self,
        what: &str,
        query: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.settings.request_timeout, query).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(pg_error(what, e)),
            Err(_) => Err(self.backend_error(format!(
                "{what}: timed out after {:?}",
                self.settings.request_timeout
            ))),
        }
    }

    /// Writes `entry`'s row, tied to `conn`'s session.
    async fn upsert(&self, conn: &Conn, id: i64, entry: &Candidate) -> Result<(), Error> {
        let json = serde_json::to_string(entry)
            .map_err(|e| Error::backend(NAME, "encode the registry entry", e))?;
        self.timed(
            "write the registry entry",
            conn.client.query_typed(
                &self.sql.registry.upsert,
                &[
                    (&self.settings.namespace, Type::TEXT),
                    (&self.name, Type::TEXT),
                    (&entry.node, Type::TEXT),
                    (&json, Type::TEXT),
                    (&id, Type::INT8),
                    (&self.sql.channel, Type::TEXT),
                ],
            ),
        )
        .await
        .map(drop)
    }

    /// Enters `entry` in the registry, tied to the second connection's session.
    pub(super) async fn register(
        self: &Arc<Self>,
        entry: Candidate,
    ) -> Result<PgRegistration, Error> {
        let id = registration_id();
        let mut regs = self.registrations.lock().await;
        let written = async {
            let (conn, _) = self.aux().await?;
            self.upsert(&conn, id, &entry).await
        }
        .await;
        written?;
        let node = entry.node.clone();
        regs.insert(node.clone(), (id, entry));
        Ok(PgRegistration {
            shared: self.clone(),
            node,
            id,
        })
    }

    /// Writes this process's entries again on a new second connection (the last session's rows
    /// died with it).
    pub(super) async fn register_again(&self, conn: &Conn) {
        let regs = self.registrations.lock().await;
        for (id, entry) in regs.values() {
            if let Err(e) = self.upsert(conn, *id, entry).await {
                // A new connection tries again.
                tracing::warn!(lock = %self.name, node = %entry.node, error = %e, "postgres: could not write the registry entry again after reconnecting");
                conn.kill();
                return;
            }
        }
    }

    /// The live entries; rows of ended sessions are skipped (and deleted once they are old).
    pub(super) async fn candidates(self: &Arc<Self>) -> Result<Vec<Candidate>, Error> {
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] = [
            (&self.settings.namespace, Type::TEXT),
            (&self.name, Type::TEXT),
        ];
        let rows = self
            .aux_query(
                "read the candidate registry",
                &self.sql.registry.list,
                &params,
            )
            .await?;
        let mut live = Vec::with_capacity(rows.len());
        let mut dead = 0;
        for row in &rows {
            let get = |e| pg_error("read the candidate registry", e);
            let node: String = row.try_get(0).map_err(get)?;
            let json: String = row.try_get(1).map_err(get)?;
            let alive: bool = row.try_get(2).map_err(get)?;
            if !alive {
                dead += 1;
                continue;
            }
            match serde_json::from_str::<Candidate>(&json) {
                Ok(mut entry) => {
                    entry.node = node;
                    live.push(entry);
                }
                Err(e) => {
                    tracing::warn!(lock = %self.name, node = %node, error = %e, "postgres: skipping an unreadable registry entry");
                }
            }
        }
        if dead > 0 {
            let _ = self
                .aux_query(
                    "delete dead registry entries",
                    &self.sql.registry.reap,
                    &params,
                )
                .await;
        }
        Ok(live)
    }

    /// Reserves the lock for `node` for `window`, while `term` holds it.
    pub(super) async fn reserve(
        self: &Arc<Self>,
        term: u64,
        node: &str,
        window: Duration,
    ) -> Result<(), Error> {
        let stale = |current: Option<u64>| Error::StaleTerm {
            lock: self.name.clone(),
            term,
            current,
        };
        let Ok(term_i) = i64::try_from(term) else {
            return Err(stale(None));
        };
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .aux_query(
                "reserve the lock",
                &self.sql.registry.reserve,
                &[
                    (&self.sql.key, Type::INT8),
                    (&term_i, Type::INT8),
                    (&self.settings.namespace, Type::TEXT),
                    (&self.name, Type::TEXT),
                    (&node, Type::TEXT),
                    (&window_ms, Type::INT8),
                    (&self.sql.channel, Type::TEXT),
                ],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| self.backend_error("reserve the lock: no result row"))?;
        let get = |i| {
            row.try_get::<_, Option<i64>>(i)
                .map_err(|e| pg_error("reserve the lock", e))
        };
        if get(0)? == Some(1) {
            return Ok(());
        }
        let current = get(2)?.and_then(|t| u64::try_from(t).ok());
        Err(stale(current.filter(|t| *t != term)))
    }

    /// On a lock session just granted the key: consumes a reservation for `me` (or an expired
    /// one); `Some(rest of the window)` when a live one names another node.
    pub(super) async fn reserved_for_another(
        &self,
        session: &Conn,
        me: &NodeId,
    ) -> Result<Option<Duration>, Abandon> {
        let rows = self
            .timed(
                "check for a reservation",
                session.client.query_typed(
                    &self.sql.registry.check_reserved,
                    &[
                        (&self.sql.key, Type::INT8),
                        (&self.settings.namespace, Type::TEXT),
                        (&self.name, Type::TEXT),
                        (&me.id(), Type::TEXT),
                        (&self.sql.channel, Type::TEXT),
                    ],
                ),
            )
            .await?;
        let row = rows.first();
        let node: Option<String> = row.and_then(|r| r.try_get(0).ok()).flatten();
        let left: Option<i64> = row.and_then(|r| r.try_get(1).ok()).flatten();
        Ok(node.map(|node| {
            let left = Duration::from_millis(left.map_or(1, |ms| ms.max(1).cast_unsigned()));
            tracing::debug!(lock = %self.name, reserved_for = %node, left = ?left, "postgres: the lock is reserved for another node; waiting");
            left
        }))
    }

    /// Unlocks the key a reservation keeps from this node.
    pub(super) async fn give_back_key(&self, session: &Conn) -> Result<(), Abandon> {
        self.timed(
            "give the reserved lock back",
            session.client.simple_query(&self.sql.unlock),
        )
        .await?;
        Ok(())
    }
}
