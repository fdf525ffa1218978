//! Where the service keeps its work: the outbox, the deliveries and the report runs.
//!
//! Two stores behind one enum, so the jobs and the routes do not fork on it:
//!
//! - [`files`] (the default): folders and logs under `--state-dir`. One host only (or a shared
//!   volume): nothing to install.
//! - [`postgres`] (`--store postgres://…`): tables in a schema of their own, shared by every
//!   host. Every write of the primary's jobs is **fenced** by the term in SQL (a guard row), and
//!   an insert into the outbox wakes the primary's sender at once (`LISTEN`/`NOTIFY`).

pub(crate) mod files;
pub(crate) mod postgres;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tower_primary::{BoxError, TermContext};

use super::{Args, Dirs};

/// An email waiting in the outbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Queued {
    pub(crate) id: String,
    pub(crate) to: String,
    pub(crate) subject: String,
    pub(crate) body: String,
    pub(crate) queued_by: u32,
}

/// The outcome of a fenced write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fenced {
    /// Written under this term.
    Written,
    /// The guard row holds a newer term: a newer primary has written, this term must stop.
    Refused {
        /// The term in the guard row.
        newer: u64,
    },
}

/// Why an email could not be queued.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueError {
    /// The store cannot be reached (the database is down): nothing was stored.
    #[error("the store cannot be reached: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("cannot queue the email: {0}")]
    Other(String),
}

/// A report run as recorded.
pub(crate) struct ReportRecord<'a> {
    pub(crate) slot: &'a str,
    pub(crate) manual: bool,
    pub(crate) term: u64,
    pub(crate) body: &'a str,
    pub(crate) start_ns: u128,
    pub(crate) end_ns: u128,
}

/// The counts `/admin/status` and the report show.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counts {
    pub(crate) queued: u64,
    pub(crate) sent: u64,
    pub(crate) failed: u64,
}

/// The store of this process.
#[derive(Clone)]
pub(crate) enum Store {
    Files(files::FileStore),
    Postgres(postgres::PgStore),
}

/// Checks the flags that concern the store: `--store` needs a server backend, since the file
/// lock is per host and every host would elect a primary of its own.
pub(crate) fn check_flags(store: Option<&str>, backend: Option<&str>) -> Result<(), String> {
    let Some(store) = store else {
        return Ok(());
    };
    if !(store.starts_with("postgres://") || store.starts_with("postgresql://")) {
        return Err(format!(
            "--store {:?}: expected postgres://…",
            tower_primary::backend::redact(store)
        ));
    }
    if let Some(backend) = backend
        && (!backend.contains("://") || backend.starts_with("file://"))
    {
        return Err(
            "--store needs a server backend: the file lock is per host, so every host would \
             elect a primary of its own; leave --backend out (the store's PostgreSQL is used) or \
             pass --backend postgres://…, redis://… or etcd://…"
                .to_owned(),
        );
    }
    Ok(())
}

impl Store {
    /// Opens the store of `args` and prepares this host's part of it (every process does, at
    /// start-up: the folders it writes to).
    pub(crate) async fn open(args: &Args, dirs: &Dirs) -> Result<Store, BoxError> {
        match &args.store {
            None => Ok(Store::Files(
                files::FileStore::open(dirs.clone(), args.simulate_work).await?,
            )),
            Some(url) => Ok(Store::Postgres(
                postgres::PgStore::open(url, dirs.clone(), args.lease, args.simulate_work).await?,
            )),
        }
    }

    /// The migration's version, for the run-once job (names the schema for PostgreSQL, so a new
    /// schema gets its own run).
    pub(crate) fn migration_version(&self) -> String {
        match self {
            Store::Files(_) => files::MIGRATION.to_owned(),
            Store::Postgres(pg) => pg.migration_version(),
        }
    }

    /// The run-once migration (run by the primary).
    pub(crate) async fn migrate(&self, ctx: &TermContext) -> Result<(), BoxError> {
        match self {
            Store::Files(f) => f.migrate(ctx).await,
            Store::Postgres(pg) => pg.migrate(ctx).await,
        }
    }

    /// Whether this process can use the store now (for `/health/ready`).
    pub(crate) async fn check(&self) -> Result<(), String> {
        match self {
            Store::Files(f) => f.check().await,
            Store::Postgres(pg) => pg.check().await,
        }
    }

    /// Queues an email (any worker).
    pub(crate) async fn queue(&self, email: &Queued) -> Result<(), QueueError> {
        match self {
            Store::Files(f) => f.queue(email).await,
            Store::Postgres(pg) => pg.queue(email).await,
        }
    }

    /// Opens the outbox for the sender of one term.
    pub(crate) async fn outbox(&self, ctx: &TermContext) -> Result<Outbox, BoxError> {
        match self {
            Store::Files(f) => Ok(Outbox::Files(f.clone())),
            Store::Postgres(pg) => Ok(Outbox::Postgres(pg.outbox(ctx).await?)),
        }
    }

    /// Whether a scheduled run of `slot` is recorded.
    pub(crate) async fn report_done(&self, slot: &str) -> Result<bool, BoxError> {
        match self {
            Store::Files(f) => Ok(f.report_done(slot).await?),
            Store::Postgres(pg) => pg.report_done(slot).await,
        }
    }

    /// Records a report run, fenced by its term.
    pub(crate) async fn record_report(
        &self,
        ctx: &TermContext,
        run: &ReportRecord<'_>,
    ) -> Result<Fenced, BoxError> {
        match self {
            Store::Files(f) => {
                f.record_report(run).await?;
                Ok(Fenced::Written)
            }
            Store::Postgres(pg) => pg.record_report(ctx, run).await,
        }
    }

    /// The counts of queued, sent and failed emails.
    pub(crate) async fn counts(&self) -> Result<Counts, BoxError> {
        match self {
            Store::Files(f) => Ok(f.counts().await),
            Store::Postgres(pg) => pg.counts().await,
        }
    }

    /// The name of a delivered email's file under `sent/`: one per email with the file store,
    /// one per delivery (`<id>.t<term>.eml`) with PostgreSQL, where another host may deliver
    /// the same email again after a kill.
    pub(crate) fn eml_name(&self, id: &str, term: u64) -> String {
        match self {
            Store::Files(_) => format!("{id}.eml"),
            Store::Postgres(_) => format!("{id}.t{term}.eml"),
        }
    }
}

/// The outbox as the sender of one term sees it.
pub(crate) enum Outbox {
    Files(files::FileStore),
    Postgres(postgres::PgOutbox),
}

impl Outbox {
    /// The queued emails, oldest first (at most a batch).
    pub(crate) async fn pending(
        &mut self,
    ) -> Result<Vec<Result<Queued, (String, String)>>, BoxError> {
        match self {
            Outbox::Files(f) => Ok(f.pending().await?),
            Outbox::Postgres(pg) => pg.pending().await,
        }
    }

    /// Waits for new work: a notification (PostgreSQL), the sweep period, or the term's end.
    pub(crate) async fn wait(&mut self, ctx: &TermContext) {
        let period = match self {
            Outbox::Files(_) => files::POLL,
            Outbox::Postgres(_) => postgres::SWEEP,
        };
        let woken = async {
            match self {
                Outbox::Files(_) => std::future::pending::<()>().await,
                Outbox::Postgres(pg) => pg.notified().await,
            }
        };
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep(period) => {}
            () = ctx.cancelled() => {}
        }
    }

    /// Records a delivery and takes the email out of the outbox, fenced by the term.
    pub(crate) async fn delivered(
        &mut self,
        ctx: &TermContext,
        id: &str,
        message_id: &str,
    ) -> Result<Fenced, BoxError> {
        match self {
            Outbox::Files(f) => {
                f.delivered(ctx.term(), id, message_id).await?;
                Ok(Fenced::Written)
            }
            Outbox::Postgres(pg) => pg.delivered(ctx, id, message_id).await,
        }
    }

    /// Takes an email that can never be sent out of the outbox, fenced by the term.
    pub(crate) async fn give_up(
        &mut self,
        ctx: &TermContext,
        id: &str,
        why: &str,
    ) -> Result<Fenced, BoxError> {
        match self {
            Outbox::Files(f) => {
                f.give_up(id).await?;
                Ok(Fenced::Written)
            }
            Outbox::Postgres(pg) => pg.give_up(ctx, id, why).await,
        }
    }
}

/// How long a client waits for the database to answer a connection attempt.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::check_flags;

    #[test]
    fn the_store_needs_a_server_backend() {
        let store = Some("postgres://root@127.0.0.1/test");
        assert!(check_flags(None, None).is_ok());
        assert!(check_flags(store, None).is_ok());
        assert!(check_flags(store, Some("redis://127.0.0.1")).is_ok());
        for file in ["./state/locks", "file:///var/lock/app"] {
            let err = check_flags(store, Some(file)).unwrap_err();
            assert!(err.contains("needs a server backend"), "{err}");
        }
        let err = check_flags(Some("mysql://h/db"), None).unwrap_err();
        assert!(err.contains("expected postgres://"), "{err}");
    }
}
