//! Running a [`Schedule`] on the primary: [`Elector::schedule`], [`Run`], [`ScheduleHandle`].

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::{Mutex, mpsc};

use super::spec::Schedule;
use crate::backend::check_key;
use crate::elector::{Elector, State};
use crate::error::{BoxError, ConfigError, Error};
use crate::role::{RoleHandle, TermContext};

/// One run of a scheduled job: its slot and the term running it.
///
/// Use [`idempotency_key`](Self::idempotency_key) (job and slot) to make the job's side effects
/// idempotent, and [`term`](Self::term) to fence downstream writes.
#[derive(Clone)]
pub struct Run {
    job: Arc<str>,
    slot: DateTime<Utc>,
    ctx: TermContext,
    manual: bool,
}

impl fmt::Debug for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run")
            .field("job", &self.job)
            .field("slot", &self.slot)
            .field("term", &self.ctx.term())
            .field("manual", &self.manual)
            .finish()
    }
}

impl Run {
    /// The job's name.
    #[must_use]
    pub fn job(&self) -> &str {
        &self.job
    }

    /// The slot this run is for (for a run asked for with [`ScheduleHandle::run_now`], the time it
    /// was asked for).
    #[must_use]
    pub fn slot(&self) -> DateTime<Utc> {
        self.slot
    }

    /// The fencing term of the primary running it.
    #[must_use]
    pub fn term(&self) -> u64 {
        self.ctx.term()
    }

    /// The term's context: check [`is_valid`](TermContext::is_valid) before side effects, select
    /// on [`cancelled`](TermContext::cancelled).
    #[must_use]
    pub fn ctx(&self) -> &TermContext {
        &self.ctx
    }

    /// Whether the run was asked for with [`ScheduleHandle::run_now`] rather than scheduled.
    #[must_use]
    pub fn is_manual(&self) -> bool {
        self.manual
    }

    /// `"<job>:<slot in unix milliseconds>"`: the same for every attempt at this slot, on every
    /// node and term.
    #[must_use]
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.job, self.slot.timestamp_millis())
    }
}

/// A registered schedule; see [`Elector::schedule`].
#[derive(Clone, Debug)]
pub struct ScheduleHandle {
    name: Arc<str>,
    role: RoleHandle,
    trigger: mpsc::UnboundedSender<DateTime<Utc>>,
}

impl ScheduleHandle {
    /// The job's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks for a run now, through the schedule's own loop, so it never overlaps a scheduled run.
    /// Its slot is the current time. Returns that slot, or `None` when this node is not primary
    /// (route such requests to the primary, e.g. behind the primary-only gate).
    ///
    /// A manual run is not recorded as a completed slot, and it is dropped if the term ends first.
    #[must_use = "None means the run was not queued"]
    pub fn run_now(&self) -> Option<DateTime<Utc>> {
        if !self.role.is_primary() {
            return None;
        }
        let slot = Utc::now();
        self.trigger.send(slot).ok().map(|()| slot)
    }
}

struct Job {
    name: Arc<str>,
    key: String,
    schedule: Schedule,
    state: State,
    triggers: Mutex<mpsc::UnboundedReceiver<DateTime<Utc>>>,
}

impl Elector {
    /// Runs `job` on `schedule`, only on the primary (a [singleton task](Elector::singleton_task)
    /// underneath).
    ///
    /// The last completed slot is stored through the [state API](Elector::state) under
    /// `schedule:<name>`, guarded by the term. So:
    /// - a slot runs at least once, and by one term at a time (a term's runs are cancelled, then
    ///   aborted after the grace, before the lock is released);
    /// - a slot runs again only if the term running it ended before recording its completion (or
    ///   the job failed: `Err` or a panic restarts the job with backoff, and the slot counts as
    ///   missed);
    /// - on promotion the new primary handles the slots that passed since the last completed one
    ///   by the schedule's [`Missed`](super::Missed) policy.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_primary::schedule::Schedule;
    /// use tower_primary::{Elector, MemoryBackend};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let elector = Elector::builder("reports").backend(MemoryBackend::new()).spawn()?;
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// elector.schedule("tick", Schedule::every(Duration::from_millis(50))?, move |run| {
    ///     let tx = tx.clone();
    ///     async move {
    ///         tx.send(run.idempotency_key()).ok();
    ///         Ok::<_, std::io::Error>(())
    ///     }
    /// })?;
    /// let first = rx.recv().await.unwrap();
    /// assert!(first.starts_with("tick:"));
    /// # elector.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidStateKey`] when `schedule:<name>` is not a valid state key.
    pub fn schedule<F, Fut, E>(
        &self,
        name: &str,
        schedule: Schedule,
        job: F,
    ) -> Result<ScheduleHandle, ConfigError>
    where
        F: Fn(Run) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let key = format!("schedule:{name}");
        check_key(&key)?;
        let (trigger, triggers) = mpsc::unbounded_channel();
        let spec = Arc::new(Job {
            name: name.into(),
            key,
            schedule,
            state: self.state(),
            triggers: Mutex::new(triggers),
        });
        let job = Arc::new(job);
        self.singleton_task(format!("schedule:{name}"), move |ctx| {
            let spec = spec.clone();
            let job = job.clone();
            async move { spec.run_term(ctx, &*job).await }
        });
        Ok(ScheduleHandle {
            name: name.into(),
            role: self.handle(),
            trigger,
        })
    }
}

impl Job {
    async fn run_term<F, Fut, E>(&self, ctx: TermContext, job: &F) -> Result<(), BoxError>
    where
        F: Fn(Run) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        // One term at a time holds the trigger queue; requests from an earlier term are dropped.
        let mut triggers = self.triggers.lock().await;
        while triggers.try_recv().is_ok() {}
        let last = self.last_completed().await?;
        let now = Utc::now();
        let missed = self.schedule.missed_slots(last, now);
        if !missed.is_empty() {
            tracing::info!(job = %self.name, term = ctx.term(), missed = missed.len(), "running missed slots");
        }
        let mut queue: VecDeque<_> = missed.into();
        let mut cursor = last.map_or(now, |l| l.max(now));
        loop {
            let (slot, manual) = match queue.pop_front() {
                Some(slot) => (slot, false),
                None => {
                    let Some(next) = self.schedule.next_after(cursor) else {
                        return Ok(());
                    };
                    tokio::select! {
                        () = sleep_until_wall(next) => (next, false),
                        Some(at) = triggers.recv() => (at, true),
                        () = ctx.cancelled() => return Ok(()),
                    }
                }
            };
            if !ctx.is_valid() {
                return Ok(());
            }
            let run = Run {
                job: self.name.clone(),
                slot,
                ctx: ctx.clone(),
                manual,
            };
            tracing::debug!(job = %self.name, %slot, term = ctx.term(), manual, "running");
            job(run).await.map_err(Into::into)?;
            if manual {
                continue;
            }
            let value = slot.timestamp_millis().to_string();
            match self.state.store(&self.key, value.as_bytes(), &ctx).await {
                Ok(()) => cursor = slot,
                Err(Error::StaleTerm { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn last_completed(&self) -> Result<Option<DateTime<Utc>>, Error> {
        let Some(stored) = self.state.load(&self.key).await? else {
            return Ok(None);
        };
        let parsed = std::str::from_utf8(&stored.value)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single());
        if parsed.is_none() {
            tracing::warn!(job = %self.name, key = %self.key, "corrupt last-slot record; treating the job as never run");
        }
        Ok(parsed)
    }
}

/// Sleeps until the wall clock reads `t`, re-reading it at least every minute so a clock step is
/// noticed.
async fn sleep_until_wall(t: DateTime<Utc>) {
    loop {
        let now = Utc::now();
        let Ok(left) = (t - now).to_std() else { return };
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(Duration::from_secs(60))).await;
    }
}
