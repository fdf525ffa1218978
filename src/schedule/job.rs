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
    /// node and term. A [manual](Self::is_manual) run's key is `"<job>:manual:<ms>"`, so it never
    /// equals a scheduled slot's.
    #[must_use]
    pub fn idempotency_key(&self) -> String {
        if self.manual {
            format!("{}:manual:{}", self.job, self.slot.timestamp_millis())
        } else {
            format!("{}:{}", self.job, self.slot.timestamp_millis())
        }
    }
}

/// A registered schedule; see [`Elector::schedule`].
#[derive(Clone, Debug)]
pub struct ScheduleHandle {
    name: Arc<str>,
    key: Arc<str>,
    role: RoleHandle,
    state: State,
    trigger: mpsc::UnboundedSender<Trigger>,
}

/// A [`ScheduleHandle::run_now`] request: the term that accepted it and its slot.
#[derive(Debug)]
struct Trigger {
    term: u64,
    slot: DateTime<Utc>,
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
    /// The run belongs to the current term: it waits for the term's schedule loop (also one that
    /// has not started yet, or is restarting after a failed run), and it is dropped if the term
    /// ends first. A manual run is not recorded as a completed slot.
    #[must_use = "None means the run was not queued"]
    pub fn run_now(&self) -> Option<DateTime<Utc>> {
        let ctx = self.role.term_context()?;
        let slot = Utc::now();
        self.trigger
            .send(Trigger {
                term: ctx.term(),
                slot,
            })
            .ok()
            .map(|()| slot)
    }

    /// The last slot recorded as completed (by any node), read through the
    /// [state API](Elector::state); `None` before the first.
    ///
    /// # Errors
    ///
    /// The backend's error.
    pub async fn last_completed(&self) -> Result<Option<DateTime<Utc>>, Error> {
        last_completed(&self.state, &self.name, &self.key).await
    }
}

struct Job {
    name: Arc<str>,
    key: String,
    schedule: Schedule,
    state: State,
    triggers: Mutex<mpsc::UnboundedReceiver<Trigger>>,
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
    ///   by the schedule's [`Missed`](super::Missed) policy, and so does a primary whose run
    ///   outlasted the next slots (runs of one job never overlap);
    /// - [`ScheduleHandle::run_now`] queues an extra run through the same loop.
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
            key: key.clone(),
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
            key: key.into(),
            role: self.handle(),
            state: self.state(),
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
        let term = ctx.term();
        // One term at a time holds the trigger queue. Requests accepted by an earlier term are
        // dropped; this term's (asked for before this loop started) are kept.
        let mut triggers = self.triggers.lock().await;
        let mut queue = VecDeque::new();
        while let Ok(t) = triggers.try_recv() {
            if t.term == term {
                queue.push_back((t.slot, true));
            }
        }
        let last = self.last_completed().await?;
        let now = Utc::now();
        let missed = self.schedule.missed_slots(last, now);
        crate::metrics::schedule_missed(ctx.lock(), &self.name, &self.schedule, last, now);
        if !missed.is_empty() {
            tracing::info!(job = %self.name, term, missed = missed.len(), "running missed slots");
        }
        // Missed slots first, oldest first; then the manual runs asked for so far.
        for slot in missed.into_iter().rev() {
            queue.push_front((slot, false));
        }
        // The latest slot handled (or `now` when there is none): the next slot comes after it.
        let mut cursor = last.map_or(now, |l| l.max(now));
        loop {
            let (slot, manual) = match queue.pop_front() {
                Some(next) => next,
                None => {
                    // Slots that passed during a long run count as missed too.
                    let now = Utc::now();
                    let late = self.schedule.missed_slots(Some(cursor), now);
                    if !late.is_empty() {
                        tracing::info!(job = %self.name, term, missed = late.len(), "slots passed during a run");
                        queue.extend(late.into_iter().map(|slot| (slot, false)));
                        continue;
                    }
                    let Some(next) = self.schedule.next_after(cursor.max(now)) else {
                        return Ok(());
                    };
                    tokio::select! {
                        () = sleep_until_wall(next) => (next, false),
                        Some(t) = triggers.recv() => {
                            if t.term != term {
                                continue;
                            }
                            (t.slot, true)
                        }
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
            tracing::debug!(job = %self.name, %slot, term, manual, "running");
            let res: Result<(), BoxError> = job(run).await.map_err(Into::into);
            crate::metrics::schedule_run(ctx.lock(), &self.name, res.is_ok());
            res?;
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
        last_completed(&self.state, &self.name, &self.key).await
    }
}

async fn last_completed(
    state: &State,
    name: &str,
    key: &str,
) -> Result<Option<DateTime<Utc>>, Error> {
    let Some(stored) = state.load(key).await? else {
        return Ok(None);
    };
    let parsed = std::str::from_utf8(&stored.value)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single());
    if parsed.is_none() {
        tracing::warn!(job = %name, %key, "corrupt last-slot record; treating the job as never run");
    }
    Ok(parsed)
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
