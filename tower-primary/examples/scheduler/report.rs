//! The daily report: a schedule job, run only on the primary, idempotent per slot.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use tower_primary::BoxError;
use tower_primary::schedule::{Run, RunOnce};

use super::now_ns;
use super::store::{Fenced, ReportRecord, Store};

type Job = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// A slot as written in file names and logs: RFC 3339 in UTC with milliseconds, no spaces.
pub(crate) fn slot_name(slot: DateTime<Utc>) -> String {
    slot.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The job for [`Elector::schedule`](tower_primary::Elector::schedule).
pub(crate) fn job(
    store: Store,
    migration: RunOnce,
    simulate_work: Duration,
) -> impl Fn(Run) -> Job + Send + Sync + 'static {
    move |run| {
        Box::pin(write_report(
            run,
            store.clone(),
            migration.clone(),
            simulate_work,
        ))
    }
}

/// Writes the slot's report and records the run (the file store: `reports/<slot>.txt`, then a
/// line in `runs.log`; PostgreSQL: a row of `report_runs`, fenced by the term). A slot already
/// recorded is skipped, so a slot re-run after its primary died between the record and the
/// schedule's completion record (the schedule's at-least-once) still yields one report.
async fn write_report(
    run: Run,
    store: Store,
    migration: RunOnce,
    simulate_work: Duration,
) -> Result<(), BoxError> {
    let ctx = run.ctx();
    let ended = || -> BoxError { "the term ended before the report was written".into() };
    // The term's end first: a run whose term ended while it waited does not start.
    tokio::select! {
        biased;
        () = ctx.cancelled() => return Err(ended()),
        () = migration.wait() => {}
    }
    let slot = slot_name(run.slot());
    let (term, pid, manual) = (run.term(), std::process::id(), run.is_manual());
    if !manual && store.report_done(&slot).await? {
        tracing::info!(
            "report skipped slot={slot} term={term} pid={pid}: already recorded (an earlier \
             term wrote it but died before recording completion)"
        );
        return Ok(());
    }
    if !ctx.is_valid() {
        return Err(ended());
    }
    let start = now_ns();
    tracing::info!("report started slot={slot} term={term} pid={pid} manual={manual}");
    let counts = store.counts().await?;
    if !simulate_work.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(simulate_work) => {}
            () = ctx.cancelled() => return Err(ended()),
        }
    }
    // Write only while the term lasts: a stale primary stops here (and the store's fence
    // refuses it where the store has one).
    if !ctx.is_valid() {
        return Err(ended());
    }
    let body = format!(
        "slot={slot}\nterm={term}\npid={pid}\nmanual={manual}\nemails_sent={}\n\
         emails_queued={}\nkey={}\n",
        counts.sent,
        counts.queued,
        run.idempotency_key()
    );
    let record = ReportRecord {
        slot: &slot,
        manual,
        term,
        body: &body,
        start_ns: start,
        end_ns: now_ns(),
    };
    if let Fenced::Refused { newer } = store.record_report(ctx, &record).await? {
        tracing::warn!(
            "fence refused what=report slot={slot} term={term} newer={newer} pid={pid} (a \
             newer primary has written: this run stops)"
        );
        return Err("the guard row holds a newer term".into());
    }
    super::prometheus::count(super::prometheus::REPORTS_WRITTEN);
    tracing::info!("report done slot={slot} term={term} pid={pid} manual={manual}");
    Ok(())
}
