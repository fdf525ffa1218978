//! One lock name on PostgreSQL: what every connection of an elector shares, and the [`Lock`]
//! operations (acquire, holder record, state API, candidate registry). Each term runs in
//! [`super::term`], the second connection in [`super::second_connection`], the registry in
//! [`super::registry`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::NAME;
use super::config::Settings;
use super::conn::pg_error;
use super::second_connection::{Aux, AuxState};
use super::sql::Sql;
use super::term::run_term;
use crate::backend::{
    AcquireRequest, BoxFuture, Candidate, Changes, Leadership, Lease, Lock, Registration, Stored,
    VersionChanges,
};
use crate::error::Error;
use crate::role::Holder;

/// A lock name on PostgreSQL, as one elector sees it.
pub(super) struct PgLock {
    pub(super) shared: Arc<Shared>,
}

pub(super) struct Shared {
    pub(super) settings: Arc<Settings>,
    pub(super) name: String,
    pub(super) sql: Sql,
    pub(super) aux: Aux,
    /// Whether the second connection should hold the step-down lock (shared): from just before
    /// a term begins until it has ended. Held while the lock operations run, so a reconnection
    /// never takes it again after a release.
    pub(super) step_down_lock: tokio::sync::Mutex<bool>,
    /// Cancelled when the second connection came back during a term but could not take the
    /// step-down lock again: successors would no longer wait for this node, so the term ends.
    /// A fresh token for every term.
    pub(super) step_down_broken: Mutex<CancellationToken>,
    /// The term this node holds, once recorded: a reconnected second connection records its
    /// new server process in that term's holder row.
    pub(super) held_term: Mutex<Option<u64>>,
    /// This process's entries in the candidate registry (node → registration id, entry), entered
    /// again on every new second connection. Held while an entry is written or withdrawn.
    pub(super) registrations: tokio::sync::Mutex<HashMap<String, (i64, Candidate)>>,
    /// Test hook: how long each (re)connection of the second connection is held back, in ms.
    #[cfg(test)]
    pub(super) aux_delay_ms: std::sync::atomic::AtomicU64,
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
                registrations: tokio::sync::Mutex::new(HashMap::new()),
                #[cfg(test)]
                aux_delay_ms: std::sync::atomic::AtomicU64::new(0),
                aux: Aux {
                    state: watch::channel(AuxState::Connecting).0,
                    holder: watch::channel(0).0,
                    registry: watch::channel(0).0,
                    reservation: watch::channel(0).0,
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
pub(super) fn first_row(
    messages: &[SimpleQueryMessage],
) -> Option<&tokio_postgres::SimpleQueryRow> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    })
}

impl Shared {
    pub(super) fn backend_error(&self, message: impl Into<String>) -> Error {
        Error::backend_msg(NAME, message)
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

    fn register(
        &self,
        entry: Candidate,
        _lease: Option<Lease>,
    ) -> BoxFuture<'_, Result<Box<dyn Registration>, Error>> {
        Box::pin(async move {
            let registration = self.shared.register(entry).await?;
            Ok(Box::new(registration) as Box<dyn Registration>)
        })
    }

    fn candidates(&self) -> BoxFuture<'_, Result<Vec<Candidate>, Error>> {
        Box::pin(async move { self.shared.candidates().await })
    }

    fn watch_candidates(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
        Box::pin(async move {
            self.shared.aux().await?;
            Ok(Box::new(VersionChanges(self.shared.aux.registry.subscribe())) as Box<dyn Changes>)
        })
    }
}
