//! Checks of singleton tasks: cancellation when a term ends and at shutdown.

use std::convert::Infallible;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::harness::{Harness, Log, LogOnDrop, TaskEvent, watch_task};
use super::{Fault, Fixture};

/// A singleton task's `ctx.cancelled()` fires when its term ends: on step-down (before
/// `step_down()` returns, with `is_primary()` already false) and, with [`Fault::LoseLocks`],
/// when the backend takes the lock away. In the next term the task starts again with a fresh,
/// valid context.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn task_cancelled_when_the_term_ends<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "task_cancelled_when_the_term_ends");
    let conn = h.connect();
    let (tx, mut events) = mpsc::unbounded_channel();
    let a = h.spawn_on("a", conn.clone(), |b| {
        b.rejoin_delay(Duration::from_millis(300))
    });
    watch_task(&a.elector, tx);
    let ctx_a = h.within("a to become primary", a.primary()).await;
    let ta = ctx_a.term();
    h.expect_event("a's task to start", &mut events, TaskEvent::Started(ta))
        .await;

    h.ok("step_down", a.elector.step_down().await);
    let event = events.try_recv().ok();
    h.ensure(
        event
            == Some(TaskEvent::Cancelled {
                term: ta,
                primary: false,
                valid: false,
            }),
        || {
            format!(
                "when step_down() returned, a's task had seen {event:?}, expected the end of \
                 term {ta} with is_primary() false"
            )
        },
    );

    // Nobody else campaigns: a rejoins after its rejoin delay, with a new term and a new task.
    let ctx = h.within("a to become primary again", a.primary()).await;
    let tb = ctx.term();
    h.ensure(tb > ta, || format!("a's new term {tb} is not above {ta}"));
    h.ensure(!ctx_a.is_valid(), || {
        "the old term's context is valid again".to_owned()
    });
    h.expect_event(
        "a's task to start in the new term",
        &mut events,
        TaskEvent::Started(tb),
    )
    .await;

    match conn.hook(Fault::LoseLocks) {
        None => h.skip("part 2 (loss of the lock): the fixture has no LoseLocks fault hook"),
        Some(hooks) => {
            hooks.inject(Fault::LoseLocks);
            let event = h
                .within(
                    "a's task to be cancelled after the lock was lost",
                    events.recv(),
                )
                .await;
            h.ensure(
                event
                    == Some(TaskEvent::Cancelled {
                        term: tb,
                        primary: false,
                        valid: false,
                    }),
                || format!("after the loss a's task saw {event:?}, expected the end of term {tb}"),
            );
            h.ensure(!ctx.is_valid(), || {
                "the lost term's context is still valid".to_owned()
            });
            let tc = h
                .within("a to become primary again after the loss", a.primary())
                .await
                .term();
            h.ensure(tc > tb, || {
                format!("a's term {tc} after the loss is not above {tb}")
            });
            h.expect_event(
                "a's task to start after the loss",
                &mut events,
                TaskEvent::Started(tc),
            )
            .await;
        }
    }
    a.elector.shutdown().await;
    h.finish();
}

/// When `shutdown()` returns, the primary's task has seen its term cancelled, with
/// `is_primary()` already false, and has finished its clean-up; the successor's task starts only
/// after that (the lock was released last).
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn shutdown_cancels_tasks_before_release<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "shutdown_cancels_tasks_before_release");
    let log = Log::default();
    let a = h.spawn("a");
    {
        let log = log.clone();
        let handle = a.handle.clone();
        a.elector.singleton_task("conformance-cleanup", move |ctx| {
            let log = log.clone();
            let handle = handle.clone();
            async move {
                log.push("a started");
                ctx.cancelled().await;
                log.push(if handle.is_primary() {
                    "a cancelled while primary"
                } else {
                    "a cancelled"
                });
                // Clean-up work that takes a while.
                tokio::time::sleep(Duration::from_millis(200)).await;
                log.push("a finished");
                Ok::<(), Infallible>(())
            }
        });
    }
    h.within("a to become primary", a.primary()).await;
    h.within("a's task to start", log.wait_for("a started"))
        .await;
    let (b, mut b_started) = h.logging_successor(&log).await;

    h.within("a's shutdown", a.elector.shutdown()).await;
    let at_return = log.entries();
    h.ensure(
        at_return.iter().any(|e| e == "a cancelled") && at_return.iter().any(|e| e == "a finished"),
        || {
            format!(
                "when shutdown() returned, a's task had logged {at_return:?}; expected it \
                 cancelled (not primary) and finished"
            )
        },
    );
    h.within("b's task to start", b_started.recv()).await;
    let entries = log.entries();
    let position = |what: &str| entries.iter().position(|e| e == what);
    h.ensure(
        position("a cancelled") < position("a finished")
            && position("a finished") < position("b started"),
        || format!("expected a cancelled, a finished, then b started; got {entries:?}"),
    );
    b.elector.shutdown().await;
    h.finish();
}

/// A task that ignores cancellation is aborted when the grace is over, and only
/// then is the lock released: `shutdown()` takes at least the grace, and the successor's task
/// starts after the stuck task was dropped.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn shutdown_aborts_tasks_after_the_grace<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "shutdown_aborts_tasks_after_the_grace");
    let grace = Duration::from_millis(300);
    let log = Log::default();
    let a = h.spawn_on("a", h.connect(), |b| b.grace(grace));
    {
        let log = log.clone();
        a.elector.singleton_task("conformance-stuck", move |_ctx| {
            let log = log.clone();
            async move {
                let _dropped = LogOnDrop(log.clone(), "a dropped");
                log.push("a started");
                std::future::pending::<()>().await;
                Ok::<(), Infallible>(())
            }
        });
    }
    h.within("a to become primary", a.primary()).await;
    h.within("a's task to start", log.wait_for("a started"))
        .await;
    let (b, mut b_started) = h.logging_successor(&log).await;

    let started = Instant::now();
    h.within("a's shutdown", a.elector.shutdown()).await;
    let took = started.elapsed();
    h.ensure(took >= grace, || {
        format!(
            "shutdown() returned after {took:?}, before the grace {grace:?}, although a task \
             never finished"
        )
    });
    h.ensure(log.entries().iter().any(|e| e == "a dropped"), || {
        "when shutdown() returned, the stuck task had not been aborted".to_owned()
    });
    h.within("b's task to start", b_started.recv()).await;
    let entries = log.entries();
    let position = |what: &str| entries.iter().position(|e| e == what);
    h.ensure(position("a dropped") < position("b started"), || {
        format!("expected the stuck task dropped before b started; got {entries:?}")
    });
    b.elector.shutdown().await;
    h.finish();
}
