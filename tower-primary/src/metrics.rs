//! Metrics: who is primary, how often that changes, how long acquisitions and renewals take, and
//! what singleton tasks and schedules do.
//!
//! With the `metrics` feature the elector, the task supervisor and the schedules record on the
//! [`metrics`](https://docs.rs/metrics) facade: install any recorder (e.g.
//! `metrics-exporter-prometheus`) and they show up. Without the feature every call is compiled
//! out. Every metric carries the label `lock` (the lock name).
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `tower_primary_is_primary` | gauge | `lock` | 1 while this node is primary, else 0 |
//! | `tower_primary_term` | gauge | `lock` | the latest known term: this node's while primary, else the holder's |
//! | `tower_primary_transitions_total` | counter | `lock`, `reason` | role changes, see below |
//! | `tower_primary_acquire_seconds` | histogram | `lock` | from the start of an acquisition to the grant (includes waiting for the holder to go) |
//! | `tower_primary_renew_seconds` | histogram | `lock` | from sending a lease renewal to the elector seeing it confirmed |
//! | `tower_primary_backend_errors_total` | counter | `lock`, `op`, `kind` | failed backend calls: `op` is `acquire`, `holder`, `watch` or `release` (backends may add their own); `kind` is the [misconfiguration](crate::Misconfiguration::as_str) (`authentication`, `tls`…) for errors retrying will not fix, else `transient` |
//! | `tower_primary_task_starts_total` | counter | `lock`, `task` | singleton task starts (first runs and restarts) |
//! | `tower_primary_task_failures_total` | counter | `lock`, `task`, `kind` | task runs that ended in `error` or `panic` |
//! | `tower_primary_task_restarts_total` | counter | `lock`, `task` | restarts after a failure, within one term |
//! | `tower_primary_task_aborts_total` | counter | `lock`, `task` | tasks aborted because they outlived the grace |
//! | `tower_primary_schedule_runs_total` | counter | `lock`, `job`, `outcome` | scheduled runs, `outcome` `ok` or `error` |
//! | `tower_primary_schedule_missed_total` | counter | `lock`, `job` | slots that passed while no primary ran the job (counted by the next primary, whatever the [`Missed`](crate::schedule::Missed) policy does with them) |
//!
//! `reason` of `tower_primary_transitions_total`: `acquired` when this node becomes primary; then
//! exactly one of `lost` (the backend reported the lock gone), `fenced` (the lease deadline passed
//! without a confirmed renewal), `stepped-down`, `handed-over` (a planned handover to a chosen
//! node: a higher priority, a draining primary's successor, or `hand_over_to`) or `shutdown`
//! when the term ends; and, unless the
//! lock was lost, `released` when it was then given back (a waiting node can take over at once).
//! A step-down, shutdown or fencing without `released` left the lock to expire or to the
//! holder's process exit.
//!
//! Useful alerts: `tower_primary_backend_errors_total{kind!="transient"}` rising (a misconfigured
//! backend: the node cannot become primary until it is fixed; `/health/role` says what),
//! `sum by (lock) (tower_primary_is_primary) > 1` (two primaries),
//! `sum by (lock) (tower_primary_is_primary) == 0` for long (nobody primary), and
//! `rate(tower_primary_transitions_total{reason="acquired"}[10m])` (flapping).

use std::time::Duration;

/// `tower_primary_is_primary`: 1 while this node is primary, else 0.
pub const IS_PRIMARY: &str = "tower_primary_is_primary";
/// `tower_primary_term`: the latest known term.
pub const TERM: &str = "tower_primary_term";
/// `tower_primary_transitions_total{reason}`: role changes by reason.
pub const TRANSITIONS: &str = "tower_primary_transitions_total";
/// `tower_primary_acquire_seconds`: from the start of an acquisition to the grant.
pub const ACQUIRE_SECONDS: &str = "tower_primary_acquire_seconds";
/// `tower_primary_renew_seconds`: from sending a renewal to seeing it confirmed.
pub const RENEW_SECONDS: &str = "tower_primary_renew_seconds";
/// `tower_primary_backend_errors_total{op, kind}`: failed backend calls.
pub const BACKEND_ERRORS: &str = "tower_primary_backend_errors_total";
/// `tower_primary_task_starts_total{task}`: singleton task starts.
pub const TASK_STARTS: &str = "tower_primary_task_starts_total";
/// `tower_primary_task_failures_total{task, kind}`: task runs that failed (`error`, `panic`).
pub const TASK_FAILURES: &str = "tower_primary_task_failures_total";
/// `tower_primary_task_restarts_total{task}`: restarts after a failure.
pub const TASK_RESTARTS: &str = "tower_primary_task_restarts_total";
/// `tower_primary_task_aborts_total{task}`: tasks aborted after the grace.
pub const TASK_ABORTS: &str = "tower_primary_task_aborts_total";
/// `tower_primary_schedule_runs_total{job, outcome}`: scheduled runs.
pub const SCHEDULE_RUNS: &str = "tower_primary_schedule_runs_total";
/// `tower_primary_schedule_missed_total{job}`: slots that passed without a primary.
pub const SCHEDULE_MISSED: &str = "tower_primary_schedule_missed_total";

/// Gives every metric its help text and unit, on the recorder installed now.
pub(crate) fn describe() {
    #[cfg(feature = "metrics")]
    {
        use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_gauge!(
            IS_PRIMARY,
            "1 while this node is primary for the lock, else 0"
        );
        describe_gauge!(
            TERM,
            "the latest known fencing term of the lock (this node's while primary)"
        );
        describe_counter!(
            TRANSITIONS,
            "role changes: acquired, lost, fenced, stepped-down, handed-over, shutdown, released"
        );
        describe_histogram!(
            ACQUIRE_SECONDS,
            Unit::Seconds,
            "from the start of an acquisition to the grant"
        );
        describe_histogram!(
            RENEW_SECONDS,
            Unit::Seconds,
            "from sending a lease renewal to seeing it confirmed"
        );
        describe_counter!(
            BACKEND_ERRORS,
            "failed backend calls, by operation and kind (a misconfiguration, or transient)"
        );
        describe_counter!(TASK_STARTS, "singleton task starts");
        describe_counter!(TASK_FAILURES, "singleton task runs that failed or panicked");
        describe_counter!(TASK_RESTARTS, "singleton task restarts after a failure");
        describe_counter!(
            TASK_ABORTS,
            "singleton tasks aborted after the grace period"
        );
        describe_counter!(SCHEDULE_RUNS, "scheduled job runs, by outcome");
        describe_counter!(
            SCHEDULE_MISSED,
            "schedule slots that passed without a primary"
        );
    }
}

/// The role gauges: `is_primary`, and `term` when known.
pub(crate) fn role(lock: &str, primary: bool, term: Option<u64>) {
    #[cfg(feature = "metrics")]
    {
        ::metrics::gauge!(IS_PRIMARY, "lock" => lock.to_owned()).set(if primary {
            1.0
        } else {
            0.0
        });
        if let Some(term) = term {
            // Terms stay below 2^53 (microsecond clocks, counters), where f64 is exact.
            #[allow(clippy::cast_precision_loss)]
            ::metrics::gauge!(TERM, "lock" => lock.to_owned()).set(term as f64);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (lock, primary, term);
}

/// One role change.
pub(crate) fn transition(lock: &str, reason: &'static str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(TRANSITIONS, "lock" => lock.to_owned(), "reason" => reason).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (lock, reason);
}

/// A granted acquisition that took `took`.
pub(crate) fn acquired(lock: &str, took: Duration) {
    #[cfg(feature = "metrics")]
    ::metrics::histogram!(ACQUIRE_SECONDS, "lock" => lock.to_owned()).record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (lock, took);
}

/// A confirmed renewal, seen `took` after it was sent.
pub(crate) fn renewed(lock: &str, took: Duration) {
    #[cfg(feature = "metrics")]
    ::metrics::histogram!(RENEW_SECONDS, "lock" => lock.to_owned()).record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (lock, took);
}

/// A failed backend call, of kind `transient` (the PostgreSQL backend's own calls).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn backend_error(lock: &str, op: &'static str) {
    backend_error_kind(lock, op, None);
}

/// A failed backend call: `kind` is its misconfiguration, `None` for a transient error.
pub(crate) fn backend_error_kind(
    lock: &str,
    op: &'static str,
    kind: Option<crate::error::Misconfiguration>,
) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(
        BACKEND_ERRORS,
        "lock" => lock.to_owned(),
        "op" => op,
        "kind" => kind.map_or("transient", crate::error::Misconfiguration::as_str)
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (lock, op, kind);
}

/// A singleton task started; `restart` when it follows a failure in the same term.
pub(crate) fn task_started(lock: &str, task: &str, restart: bool) {
    #[cfg(feature = "metrics")]
    {
        ::metrics::counter!(TASK_STARTS, "lock" => lock.to_owned(), "task" => task.to_owned())
            .increment(1);
        if restart {
            ::metrics::counter!(TASK_RESTARTS, "lock" => lock.to_owned(), "task" => task.to_owned())
                .increment(1);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (lock, task, restart);
}

/// A singleton task run failed: `kind` is `error` or `panic`.
pub(crate) fn task_failed(lock: &str, task: &str, kind: &'static str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(
        TASK_FAILURES,
        "lock" => lock.to_owned(),
        "task" => task.to_owned(),
        "kind" => kind
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (lock, task, kind);
}

/// A singleton task was aborted after the grace.
pub(crate) fn task_aborted(lock: &str, task: &str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(TASK_ABORTS, "lock" => lock.to_owned(), "task" => task.to_owned())
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (lock, task);
}

#[cfg(feature = "schedule")]
/// A scheduled run ended: `ok` is whether the job returned `Ok`.
pub(crate) fn schedule_run(lock: &str, job: &str, ok: bool) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(
        SCHEDULE_RUNS,
        "lock" => lock.to_owned(),
        "job" => job.to_owned(),
        "outcome" => if ok { "ok" } else { "error" }
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (lock, job, ok);
}

/// Whether metrics are recorded (feature `metrics`): callers skip work whose only use is a metric.
#[cfg(feature = "schedule")]
pub(crate) const ENABLED: bool = cfg!(feature = "metrics");

#[cfg(feature = "schedule")]
/// `slots` of a schedule passed while no primary ran its job, as a new term finds them.
pub(crate) fn schedule_missed(lock: &str, job: &str, slots: usize) {
    #[cfg(feature = "metrics")]
    if slots > 0 {
        ::metrics::counter!(SCHEDULE_MISSED, "lock" => lock.to_owned(), "job" => job.to_owned())
            .increment(u64::try_from(slots).unwrap_or(u64::MAX));
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (lock, job, slots);
}
