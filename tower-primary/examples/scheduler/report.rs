//! The daily report: a schedule job, run only on the primary, idempotent per slot.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use tower_primary::schedule::{Run, RunOnce};

use super::{Dirs, append_line, now_ns, remove_stale_tmp, write_atomic};

type Job = Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

/// A slot as written in file names and logs: RFC 3339 in UTC with milliseconds, no spaces.
pub(crate) fn slot_name(slot: DateTime<Utc>) -> String {
    slot.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The job for [`Elector::schedule`](tower_primary::Elector::schedule).
pub(crate) fn job(
    dirs: Dirs,
    migration: RunOnce,
    simulate_work: Duration,
) -> impl Fn(Run) -> Job + Send + Sync + 'static {
    move |run| {
        Box::pin(write_report(
            run,
            dirs.clone(),
            migration.clone(),
            simulate_work,
        ))
    }
}

/// Writes `reports/<slot>.txt`, then appends `report <slot> term=… pid=… start=… end=…` to
/// `runs.log`. That line is the record that the slot's report exists: a slot already in it is
/// skipped, so a slot re-run after its primary died between the line and the completion record
/// (the schedule's at-least-once) still yields one report.
async fn write_report(
    run: Run,
    dirs: Dirs,
    migration: RunOnce,
    simulate_work: Duration,
) -> std::io::Result<()> {
    let ctx = run.ctx();
    let ended = || std::io::Error::other("the term ended before the report was written");
    // The term's end first: a run whose term ended while it waited does not start.
    tokio::select! {
        biased;
        () = ctx.cancelled() => return Err(ended()),
        () = migration.wait() => {}
    }
    let slot = slot_name(run.slot());
    let (term, pid, manual) = (run.term(), std::process::id(), run.is_manual());
    let log = dirs.runs_log();
    if !manual && already_done(&log, &slot).await? {
        tracing::info!(
            "report skipped slot={slot} term={term} pid={pid}: runs.log has it (an earlier \
             term wrote it but died before recording completion)"
        );
        return Ok(());
    }
    // Only the primary's report job writes reports/, one run at a time.
    remove_stale_tmp(&dirs.reports()).await;
    if !ctx.is_valid() {
        return Err(ended());
    }
    let start = now_ns();
    tracing::info!("report started slot={slot} term={term} pid={pid} manual={manual}");
    let sent = count(&dirs.sent(), ".eml").await;
    let queued = count(&dirs.outbox(), ".json").await;
    if !simulate_work.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(simulate_work) => {}
            () = ctx.cancelled() => return Err(ended()),
        }
    }
    // Write only while the term lasts: a stale primary stops here.
    if !ctx.is_valid() {
        return Err(ended());
    }
    let name = if manual {
        format!("{slot}-manual.txt")
    } else {
        format!("{slot}.txt")
    };
    let body = format!(
        "slot={slot}\nterm={term}\npid={pid}\nmanual={manual}\nemails_sent={sent}\n\
         emails_queued={queued}\nkey={}\n",
        run.idempotency_key()
    );
    write_atomic(&dirs.reports().join(name), body.as_bytes()).await?;
    let end = now_ns();
    let mut line = format!("report {slot} term={term} pid={pid} start={start} end={end}");
    if manual {
        line.push_str(" manual=true");
    }
    append_line(&log, &line).await?;
    tracing::info!("report done slot={slot} term={term} pid={pid} manual={manual}");
    super::prometheus::count(super::prometheus::REPORTS_WRITTEN);
    Ok(())
}

/// Whether `runs.log` records a scheduled run of `slot`.
async fn already_done(log: &std::path::Path, slot: &str) -> std::io::Result<bool> {
    let text = match tokio::fs::read_to_string(log).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(text.lines().any(|line| {
        let mut words = line.split(' ');
        words.next() == Some("report")
            && words.next() == Some(slot)
            && !line.ends_with(" manual=true")
    }))
}

/// How many files in `dir` end with `ext` (hidden temporary files left out).
pub(crate) async fn count(dir: &std::path::Path, ext: &str) -> usize {
    let mut n = 0;
    if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(e)) = entries.next_entry().await {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(ext) && !name.starts_with('.') {
                n += 1;
            }
        }
    }
    n
}
