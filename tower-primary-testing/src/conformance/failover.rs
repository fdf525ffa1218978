//! Checks of failover and fencing: crashes, pauses, stopped renewals, failing backends.

use std::time::Duration;

use tokio::sync::mpsc;

use super::harness::{Harness, TaskEvent, holder_is, period, shutdown_all, watch_task};
use super::thread_node::NodeCommand;
use super::{Fault, Fixture};
use tower_primary::clock::Timestamp;

/// The primary's runtime dies without releasing (its
/// [`Leadership`](tower_primary::backend::Leadership) is dropped): a waiting node becomes primary with a
/// higher term — on lease backends only after the dead holder's deadline.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn failover_when_the_primary_crashes<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "failover_when_the_primary_crashes");
    let a = h.thread_node("a", |_| {}).await;
    let ta = h.within("a to become primary", a.primary()).await.term();
    let b = h.follower("b", "a", ta).await;

    let killed = a.command(&h, NodeCommand::Kill).await;
    // A crashed node acts no more: its period ends at the crash.
    h.recorder.end("a", ta, killed.at.as_nanos());
    let tb = h
        .within("b to become primary after a crashed", b.primary())
        .await
        .term();
    h.ensure(tb > ta, || {
        format!("b's term {tb} is not above the crashed a's {ta}")
    });
    // On a lease backend only expiry frees a crashed holder's lock. (A session lock is freed
    // when the session dies, even where the backend implies a lease for self-fencing.)
    if let Some(deadline) = killed
        .deadline
        .filter(|d| fixture.lease().is_some() && *d != Timestamp::NEVER)
    {
        h.started_after("b", tb, "a's deadline", deadline.as_nanos());
    }
    b.elector.shutdown().await;
    h.finish();
}

/// Lease backends: the primary's runtime is frozen (not polled, as under `SIGSTOP`) past its
/// lease. Another node takes over only after the frozen node's deadline; meanwhile the frozen
/// node's `is_primary()` and `TermContext::is_valid()` read false without its elector running.
/// When it resumes, its task sees the term cancelled and the new primary keeps its lock.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn paused_primary_fences_itself<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "paused_primary_fences_itself");
    if fixture.lease().is_none() {
        return h.skip("the backend has no lease (see paused_primary_keeps_a_lock_without_lease)");
    }
    let (a, ctx_a, mut events, b) = h.pausable_primary_and_follower().await;
    let ta = ctx_a.term();

    let paused = a.command(&h, NodeCommand::Pause).await;
    let deadline = paused.deadline.filter(|d| *d != Timestamp::NEVER);
    let Some(deadline) = deadline else {
        h.fail(format!(
            "the paused primary has no lease deadline ({:?}) although the fixture has a lease",
            paused.deadline
        ));
    };
    h.recorder.extend_deadline("a", ta, deadline.as_nanos());

    let ctx_b = h
        .within("b to become primary while a is paused", b.primary())
        .await;
    let tb = ctx_b.term();
    h.ensure(!a.handle.is_primary() && !ctx_a.is_valid(), || {
        "the paused a still reads as primary after b took over".to_owned()
    });
    h.ensure(tb > ta, || format!("b's term {tb} is not above a's {ta}"));
    h.started_after("b", tb, "the paused a's deadline", deadline.as_nanos());

    a.command(&h, NodeCommand::Resume).await;
    let event = h
        .within("a's task to see its term end", events.recv())
        .await;
    h.ensure(
        event
            == Some(TaskEvent::Cancelled {
                term: ta,
                primary: false,
                valid: false,
            }),
        || format!("a's task saw {event:?} after resuming"),
    );
    h.within(
        "a to see b as the holder after resuming",
        holder_is(&a.handle, "b", Some(tb)),
    )
    .await;
    h.ensure(b.handle.is_primary() && ctx_b.is_valid(), || {
        "b lost the lock when the paused a resumed".to_owned()
    });
    a.command(&h, NodeCommand::Shutdown).await;
    b.elector.shutdown().await;
    h.finish();
}

/// Backends without a lease (a lock lives as long as the holder's process or session): a
/// primary whose runtime is frozen keeps its lock — nobody takes over in the meantime — and
/// when it resumes it is still primary with the same term.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn paused_primary_keeps_a_lock_without_lease<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "paused_primary_keeps_a_lock_without_lease");
    if fixture.lease().is_some() {
        return h.skip("the backend has a lease (see paused_primary_fences_itself)");
    }
    let (a, ctx_a, mut events, b) = h.pausable_primary_and_follower().await;
    let ta = ctx_a.term();

    a.command(&h, NodeCommand::Pause).await;
    let window = Duration::from_secs(1);
    if let Ok(ctx) = tokio::time::timeout(window, b.primary()).await {
        h.fail(format!(
            "b became primary with term {} while the holder a was only paused",
            ctx.term()
        ));
    }
    a.command(&h, NodeCommand::Resume).await;
    if let Ok(event) = tokio::time::timeout(window / 2, events.recv()).await {
        h.fail(format!(
            "after resuming, a's task saw {event:?}: the lock was taken from a paused holder"
        ));
    }
    h.ensure(a.handle.is_primary() && ctx_a.is_valid(), || {
        "a lost its primary role while it was paused".to_owned()
    });
    h.ensure(!b.handle.is_primary(), || {
        "b is primary although a still holds the lock".to_owned()
    });
    a.command(&h, NodeCommand::Shutdown).await;
    let tb = h
        .within("b to become primary after a shut down", b.primary())
        .await
        .term();
    h.ensure(tb > ta, || format!("b's term {tb} is not above a's {ta}"));
    b.elector.shutdown().await;
    h.finish();
}

/// Lease backends with [`Fault::StopRenewals`]: the primary's renewals stop. By its deadline
/// (at most a lease after the stop) it reads as not primary and its task is cancelled; the
/// waiting node becomes primary only after that deadline, with a higher term.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn self_fencing_when_renewals_stop<F: Fixture + ?Sized>(fixture: &F) {
    self_fencing(
        fixture,
        "self_fencing_when_renewals_stop",
        Fault::StopRenewals,
    )
    .await;
}

/// Lease backends with [`Fault::Fail`]: every call of the primary's connection fails (renewals,
/// release). It fences itself by its deadline and cancels its task; the waiting node becomes
/// primary only after that deadline, with a higher term.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn self_fencing_when_the_backend_fails<F: Fixture + ?Sized>(fixture: &F) {
    self_fencing(fixture, "self_fencing_when_the_backend_fails", Fault::Fail).await;
}

async fn self_fencing<F: Fixture + ?Sized>(fixture: &F, check: &'static str, fault: Fault) {
    let h = Harness::new(fixture, check);
    let Some(lease) = fixture.lease() else {
        return h.skip("the backend has no lease");
    };
    let conn = h.connect();
    let Some(hooks) = conn.hook(fault) else {
        return h.skip(&format!("the fixture has no {fault:?} fault hook"));
    };
    let (tx, mut events) = mpsc::unbounded_channel();
    // Without exit_on_loss a node that can still acquire could win its lock back at once.
    let a = h.spawn_on("a", conn.clone(), |b| b.exit_on_loss(true));
    watch_task(&a.elector, tx);
    let ctx_a = h.within("a to become primary", a.primary()).await;
    let ta = ctx_a.term();
    h.expect_event("a's task to start", &mut events, TaskEvent::Started(ta))
        .await;
    let b = h.follower("b", "a", ta).await;

    let stopped_at = h.clock.now();
    hooks.inject(fault);
    let event = h
        .within(
            "a's task to be cancelled after its lease ran out",
            events.recv(),
        )
        .await;
    h.ensure(
        event
            == Some(TaskEvent::Cancelled {
                term: ta,
                primary: false,
                valid: false,
            }),
        || format!("a's task saw {event:?}, expected the end of term {ta} with is_primary() false"),
    );
    h.ensure(!a.handle.is_primary() && !ctx_a.is_valid(), || {
        "a reads as primary after its term was cancelled".to_owned()
    });
    let history = h.recorder.history();
    let deadline = period(&history, "a", ta).and_then(|p| p.deadline);
    let Some(deadline) = deadline else {
        h.fail("no deadline was recorded for a's lease term".to_owned());
    };
    let latest = stopped_at.saturating_add(lease.ttl()).as_nanos();
    h.ensure(deadline <= latest, || {
        format!(
            "a's deadline is {:?} after the fault, more than the lease {:?}",
            Duration::from_nanos(deadline.saturating_sub(stopped_at.as_nanos())),
            lease.ttl()
        )
    });

    let tb = h
        .within("b to become primary after a fenced itself", b.primary())
        .await
        .term();
    h.ensure(tb > ta, || format!("b's term {tb} is not above a's {ta}"));
    h.started_after("b", tb, "a's deadline", deadline);
    h.ensure(!a.handle.is_primary(), || {
        "a reads as primary again while its fault lasts".to_owned()
    });
    h.within("a to stop (exit_on_loss)", a.elector.stopped())
        .await;
    hooks.heal(fault);
    shutdown_all(&[a, b]).await;
    h.finish();
}

/// With [`Fault::Fail`]: a node whose every backend call fails does not become primary, neither
/// while another node holds the lock nor once the lock is free; when its backend works again it
/// becomes primary with a higher term. Nothing but a successful acquisition makes a node
/// primary.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn fail_closed_on_backend_errors<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "fail_closed_on_backend_errors");
    let conn = h.connect();
    let Some(hooks) = conn.hook(Fault::Fail) else {
        return h.skip("the fixture has no Fail fault hook");
    };
    let a = h.spawn("a");
    let ta = h.within("a to become primary", a.primary()).await.term();
    hooks.inject(Fault::Fail);
    let c = h.spawn_on("c", conn.clone(), |b| b);
    a.elector.shutdown().await;

    // The lock is free now; c retries every 20-200 ms and must fail every time.
    let window = Duration::from_secs(1);
    let mut handle = c.handle.clone();
    if let Ok(ctx) = tokio::time::timeout(window, handle.wait_primary()).await {
        h.fail(format!(
            "c became primary with term {} while every call of its backend failed",
            ctx.term()
        ));
    }
    h.ensure(!c.handle.is_primary(), || {
        "c reads as primary while its backend fails".to_owned()
    });

    hooks.heal(Fault::Fail);
    let tc = h
        .within(
            "c to become primary once its backend works again",
            c.primary(),
        )
        .await
        .term();
    h.ensure(tc > ta, || format!("c's term {tc} is not above a's {ta}"));
    c.elector.shutdown().await;
    h.finish();
}
