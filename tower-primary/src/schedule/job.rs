//! Running a [`Schedule`] on the primary: [`Elector::schedule`], [`Run`], [`ScheduleHandle`].

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::{Mutex, mpsc};

use super::spec::{Schedule, Since};
use crate::backend::check_key;
use crate::backoff::Backoff;
use crate::elector::{Elector, StateStore};
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
    state: StateStore,
    trigger: mpsc::Sender<Trigger>,
}

/// Why [`ScheduleHandle::run_now`] did not queue a run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunNowError {
    /// This node is not primary: route the request to the primary (e.g. behind the primary-only
    /// gate).
    #[error("not primary: schedule {job:?} runs on the primary only")]
    NotPrimary {
        /// The job's name.
        job: String,
    },
    /// The queue of runs asked for is full ([`Schedule::queue`]); nothing was queued. Ask
    /// again later (an HTTP handler answers 429).
    #[error("schedule {job:?} already has {capacity} runs waiting; try again later")]
    Full {
        /// The job's name.
        job: String,
        /// The queue's capacity.
        capacity: usize,
    },
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
    /// Its slot is the current time; returns that slot.
    ///
    /// The run belongs to the current term: it waits for the term's schedule loop (also one that
    /// has not started yet, or is restarting after a failed run), and it is dropped if the term
    /// ends first. A manual run is not recorded as a completed slot. At most
    /// [`Schedule::queue`] runs (64 by default) wait at once.
    ///
    /// # Errors
    ///
    /// [`RunNowError::NotPrimary`] when this node is not primary, [`RunNowError::Full`] when
    /// the queue is full. Nothing was queued then.
    pub fn run_now(&self) -> Result<DateTime<Utc>, RunNowError> {
        let not_primary = || RunNowError::NotPrimary {
            job: self.name.to_string(),
        };
        let ctx = self.role.term_context().ok_or_else(not_primary)?;
        let slot = Utc::now();
        match self.trigger.try_send(Trigger {
            term: ctx.term(),
            slot,
        }) {
            Ok(()) => Ok(slot),
            Err(mpsc::error::TrySendError::Full(_)) => Err(RunNowError::Full {
                job: self.name.to_string(),
                capacity: self.trigger.max_capacity(),
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(not_primary()),
        }
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
    state: StateStore,
    triggers: Mutex<mpsc::Receiver<Trigger>>,
}

impl Elector {
    /// Runs `job` on `schedule`, only on the primary (a [singleton task](Elector::singleton_task)
    /// underneath).
    ///
    /// The last completed slot is stored through the [state API](Elector::state) under
    /// `schedule:<name>`, guarded by the term. The first primary to run the job stores there the
    /// slot it is responsible from (the first slot after it took the job on: a daily job deployed
    /// after today's time waits for tomorrow). So:
    /// - a slot runs at least once from then on, and by one term at a time (a term's runs are
    ///   cancelled, then aborted after the grace, before the lock is released);
    /// - a slot runs again only if the term running it ended before recording its completion (or
    ///   the job failed: `Err` or a panic restarts the job with backoff, and the slot counts as
    ///   missed) — also the very first slot; a completion that the backend fails to record is
    ///   retried with backoff while the term lasts, never run again by the same term;
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
    /// [`ConfigError::InvalidStateKey`] when `schedule:<name>` is not a valid state key;
    /// [`ConfigError::InvalidSchedule`] for a [`CatchUpAll`](super::Missed::CatchUpAll) above
    /// [`Missed::MAX_CATCH_UP`](super::Missed::MAX_CATCH_UP) or a [queue](Schedule::queue) of 0
    /// or over 65 536.
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
        schedule.validate()?;
        let (trigger, triggers) = mpsc::channel(schedule.queue_capacity());
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
        let now = Utc::now();
        let since = match self.progress().await? {
            Some(since) => since,
            None => {
                // The first term to run the job: it is responsible from the next slot on, and
                // says so before that slot can start, so a successor reruns it if it is cut short.
                let Some(first) = self.schedule.next_after(now) else {
                    return Ok(());
                };
                let marker = format!("{FROM_PREFIX}{}", first.timestamp_millis());
                if !self.record(&marker, &ctx).await {
                    return Ok(());
                }
                Since::From(first)
            }
        };
        let missed = self.schedule.due(since, now);
        if crate::metrics::ENABLED {
            // Counted up to the catch-up cap: the count walks back from `now`, and a long outage
            // must not cost a long scan.
            let slots = self
                .schedule
                .count_owed(since, now, super::Missed::MAX_CATCH_UP);
            crate::metrics::schedule_missed(ctx.lock(), &self.name, slots);
        }
        if !missed.is_empty() {
            tracing::info!(job = %self.name, term, missed = missed.len(), "running missed slots");
        }
        // Missed slots first, oldest first; then the manual runs asked for so far.
        for slot in missed.into_iter().rev() {
            queue.push_front((slot, false));
        }
        // The latest slot handled (or `now`): the next slot comes after it.
        let mut cursor = match since {
            Since::After(last) => last.max(now),
            Since::From(_) => now,
        };
        loop {
            let (slot, manual) = match queue.pop_front() {
                Some(next) => next,
                None => {
                    // Slots that passed during a long run count as missed too.
                    let now = Utc::now();
                    let late = self.schedule.due(Since::After(cursor), now);
                    if !late.is_empty() {
                        tracing::info!(job = %self.name, term, missed = late.len(), "slots passed during a run");
                        cursor = now;
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
            // Recorded, or the term is over: either way this term never runs the slot again.
            if !self
                .record(&slot.timestamp_millis().to_string(), &ctx)
                .await
            {
                return Ok(());
            }
            cursor = cursor.max(slot);
        }
    }

    /// Stores `value` as the job's record under the term of `ctx`, retrying backend errors with
    /// backoff while the term lasts. `false` when the term is over (or a newer term wrote it).
    async fn record(&self, value: &str, ctx: &TermContext) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            match self.state.store(&self.key, value.as_bytes(), ctx).await {
                Ok(()) => return true,
                Err(Error::StaleTerm { .. }) => return false,
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        job = %self.name,
                        term = ctx.term(),
                        error = %crate::error::Chain(&err),
                        retry_in = ?delay,
                        "cannot record the job's progress; retrying"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = ctx.cancelled() => return false,
                    }
                }
            }
        }
    }

    /// Where the slots owed start: after the last completed slot, or from the first slot the job
    /// is responsible for; `None` when no term has run the job yet.
    async fn progress(&self) -> Result<Option<Since>, Error> {
        Ok(read_record(&self.state, &self.name, &self.key)
            .await?
            .map(|r| match r {
                Record::Completed(t) => Since::After(t),
                Record::From(t) => Since::From(t),
            }))
    }
}

/// The prefix of a record that holds the first slot a job is responsible for, rather than the
/// last completed slot (a bare number of Unix milliseconds).
const FROM_PREFIX: &str = "from:";

/// A job's record under `schedule:<name>`.
enum Record {
    /// The last completed slot.
    Completed(DateTime<Utc>),
    /// No slot completed yet; the job is owed slots from this one on.
    From(DateTime<Utc>),
}

async fn read_record(state: &StateStore, name: &str, key: &str) -> Result<Option<Record>, Error> {
    let Some(stored) = state.load(key).await? else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&stored.value).unwrap_or("").trim();
    let (from, ms) = match text.strip_prefix(FROM_PREFIX) {
        Some(ms) => (true, ms),
        None => (false, text),
    };
    let Some(t) = ms
        .parse::<i64>()
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
    else {
        tracing::warn!(job = %name, %key, "corrupt schedule record; starting the job afresh");
        return Ok(None);
    };
    Ok(Some(if from {
        Record::From(t)
    } else {
        Record::Completed(t)
    }))
}

async fn last_completed(
    state: &StateStore,
    name: &str,
    key: &str,
) -> Result<Option<DateTime<Utc>>, Error> {
    Ok(match read_record(state, name, key).await? {
        Some(Record::Completed(t)) => Some(t),
        Some(Record::From(_)) | None => None,
    })
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
