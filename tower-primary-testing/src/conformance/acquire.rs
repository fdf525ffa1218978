//! Checks of acquisition and handover: one primary, handovers, rising terms, dropped acquires.

use std::time::Duration;

use tokio::time::Instant;

use super::Fixture;
use super::harness::{Harness, Node, any_primary, holder_is, jitter, shutdown_all};
use tower_primary::backend::AcquireRequest;
use tower_primary::role::NodeId;

/// Five electors compete for one lock; five times, the primary steps down. At every handover
/// exactly one node is primary, its term is higher than the last, and the recorded history has
/// no overlapping periods.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn single_primary_among_candidates<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "single_primary_among_candidates");
    let nodes: Vec<Node> = (1..=5).map(|i| h.spawn(&format!("n{i}"))).collect();
    let mut last = 0;
    for round in 1..=5 {
        let (i, ctx) = h
            .within(
                &format!("a primary among the 5 candidates (round {round})"),
                any_primary(&nodes),
            )
            .await;
        let primaries: Vec<&str> = nodes
            .iter()
            .filter(|n| n.handle.is_primary())
            .map(|n| n.id.as_str())
            .collect();
        h.ensure(primaries.len() == 1, || {
            format!("round {round}: expected exactly one primary, found {primaries:?}")
        });
        h.ensure(ctx.term() > last, || {
            format!(
                "round {round}: term {} of {} is not above the previous term {last}",
                ctx.term(),
                nodes[i].id
            )
        });
        last = ctx.term();
        h.ok("step_down", nodes[i].elector.step_down().await);
        h.ensure(!nodes[i].handle.is_primary() && !ctx.is_valid(), || {
            format!(
                "{} still reads as primary after step_down() returned",
                nodes[i].id
            )
        });
    }
    shutdown_all(&nodes).await;
    let history = h.recorder.history();
    h.ensure(history.periods().len() >= 5, || {
        format!(
            "expected at least 5 recorded periods, got {}",
            history.periods().len()
        )
    });
    h.finish();
}

/// A secondary's [`RoleHandle::holder`](tower_primary::role::RoleHandle::holder) and [`Lock::holder`](tower_primary::backend::Lock::holder) on another connection name the
/// primary and its term; [`Lock::watch_holder`](tower_primary::backend::Lock::watch_holder) wakes when it changes; after a handover they
/// name the new primary.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn secondaries_see_the_holder<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "secondaries_see_the_holder");
    let a = h.spawn("a");
    let ta = h.within("a to become primary", a.primary()).await.term();
    let b = h.follower("b", "a", ta).await;

    let conn = h.connect();
    let lock = h.lock(&conn);
    let holder = h.ok("holder()", lock.holder().await);
    h.ensure(
        holder.as_ref().is_some_and(|x| x.id == "a" && x.term == ta),
        || {
            format!(
                "Lock::holder() on another connection gave {holder:?}, expected a with term {ta}"
            )
        },
    );
    let mut changes = h.ok("watch_holder()", lock.watch_holder().await);

    h.ok("step_down", a.elector.step_down().await);
    let woke = h
        .within(
            "watch_holder() to wake after the holder stepped down",
            changes.changed(),
        )
        .await;
    h.ok("Changes::changed()", woke);
    let tb = h.within("b to become primary", b.primary()).await.term();
    h.ensure(tb > ta, || format!("b's term {tb} is not above a's {ta}"));
    h.within(
        "a to see b as the holder",
        holder_is(&a.handle, "b", Some(tb)),
    )
    .await;
    h.within("Lock::holder() to name b", async {
        loop {
            let holder = h.ok("holder()", lock.holder().await);
            if holder.is_some_and(|x| x.id == "b" && x.term == tb) {
                return;
            }
            h.ok("Changes::changed()", changes.changed().await);
        }
    })
    .await;
    shutdown_all(&[a, b]).await;
    h.finish();
}

/// The primary steps down while another node waits: the waiting node becomes primary with a
/// higher term, at once (on lease backends well before the lease could have expired).
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn handover_on_step_down<F: Fixture + ?Sized>(fixture: &F) {
    handover(fixture, "handover_on_step_down", true).await;
}

/// The primary shuts down while another node waits: the waiting node becomes primary with a
/// higher term, at once (on lease backends well before the lease could have expired).
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn handover_on_shutdown<F: Fixture + ?Sized>(fixture: &F) {
    handover(fixture, "handover_on_shutdown", false).await;
}

async fn handover<F: Fixture + ?Sized>(fixture: &F, check: &'static str, step_down: bool) {
    let h = Harness::new(fixture, check);
    let a = h.spawn("a");
    let ctx_a = h.within("a to become primary", a.primary()).await;
    let b = h.follower("b", "a", ctx_a.term()).await;

    let started = Instant::now();
    let how = if step_down {
        h.ok("step_down", a.elector.step_down().await);
        "step_down()"
    } else {
        a.elector.shutdown().await;
        "shutdown()"
    };
    h.ensure(!a.handle.is_primary() && !ctx_a.is_valid(), || {
        format!("a still reads as primary after {how} returned")
    });
    let ctx_b = h.within("b to become primary", b.primary()).await;
    let took = started.elapsed();
    h.ensure(ctx_b.term() > ctx_a.term(), || {
        format!(
            "b's term {} is not above a's {}",
            ctx_b.term(),
            ctx_a.term()
        )
    });
    h.fast_handover(took, how);
    if step_down {
        h.within(
            "a to see b as the holder after stepping down",
            holder_is(&a.handle, "b", Some(ctx_b.term())),
        )
        .await;
    }
    shutdown_all(&[a, b]).await;
    h.finish();
}

/// Six handovers between nodes that step down, shut down and are replaced by new nodes on new
/// connections, then a new node on an idle lock: every term is higher than all before it.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn terms_rise_over_handovers<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "terms_rise_over_handovers");
    let mut nodes = vec![h.spawn("r0"), h.spawn("r1")];
    let mut next = 2;
    let mut terms: Vec<u64> = Vec::new();
    for round in 1..=6 {
        let (i, ctx) = h
            .within(&format!("a primary (round {round})"), any_primary(&nodes))
            .await;
        h.ensure(terms.last().is_none_or(|t| ctx.term() > *t), || {
            format!(
                "round {round}: term {} of {} is not above the terms before it {terms:?}",
                ctx.term(),
                nodes[i].id
            )
        });
        terms.push(ctx.term());
        if round % 2 == 1 {
            h.ok("step_down", nodes[i].elector.step_down().await);
        } else {
            let gone = nodes.remove(i);
            gone.elector.shutdown().await;
            nodes.push(h.spawn(&format!("r{next}")));
            next += 1;
        }
    }
    shutdown_all(&nodes).await;

    let late = h.spawn("late");
    let term = h
        .within(
            "a new node to become primary on the idle lock",
            late.primary(),
        )
        .await
        .term();
    h.ensure(terms.iter().all(|t| term > *t), || {
        format!("the term {term} after the lock was idle is not above the earlier terms {terms:?}")
    });
    late.elector.shutdown().await;
    h.finish();
}

/// Raw [`Lock::acquire`](tower_primary::backend::Lock::acquire) calls on another connection are dropped (timed out) around the moment
/// the holder releases, eight times: whenever such a call was granted after it was dropped, the
/// backend must release the grant, so one of the electors becomes primary again, at once. At
/// the end, with every elector gone, a new node must get the free lock: no dropped call may
/// still be waiting for it.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn dropped_acquire_does_not_leak_the_lock<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "dropped_acquire_does_not_leak_the_lock");
    let nodes = vec![h.spawn("a"), h.spawn("b")];
    let x = h.connect();
    let x_lock = h.lock(&x);
    let request = AcquireRequest::new(NodeId::new("x"))
        .with_lease(fixture.lease())
        .with_clock(h.clock);
    let mut last = 0;
    let mut handed_over: Option<Instant> = None;
    for round in 1..=8 {
        let (i, ctx) = h
            .within(&format!("a primary (round {round})"), any_primary(&nodes))
            .await;
        if let Some(at) = handed_over {
            h.fast_handover(at.elapsed(), "step_down() around a dropped acquire");
        }
        h.ensure(ctx.term() > last, || {
            format!("round {round}: term {} is not above {last}", ctx.term())
        });
        last = ctx.term();
        // The other elector may still hold off after its own step-down a round ago, until it
        // reads a holder other than itself; the primary of this round may hold the lock for too
        // short a time to be read. Wait until it has seen this term's holder, so that it
        // campaigns: a slow handover then means a leaked grant, not a held-off elector.
        let primary_id = nodes[i].id.clone();
        for other in nodes.iter().filter(|n| n.id != primary_id) {
            h.within(
                &format!(
                    "{} to see {primary_id} as the holder (round {round})",
                    other.id
                ),
                holder_is(&other.handle, &primary_id, Some(last)),
            )
            .await;
        }

        // Odd rounds drop the acquire for sure while the lock is held, before the step-down;
        // even rounds race the drop against the step-down.
        let dropped_first = round % 2 == 1;
        let give_up_after = if dropped_first {
            Duration::from_millis(5)
        } else {
            jitter(Duration::from_millis(20))
        };
        let lock = x_lock.clone();
        let req = request.clone();
        let recorder = h.recorder.clone();
        let clock = h.clock;
        let attempt = tokio::spawn(async move {
            match tokio::time::timeout(give_up_after, lock.acquire(req)).await {
                Ok(Ok(leadership)) => {
                    // A grant in time is fine: record it and give it back.
                    let term = leadership.term();
                    recorder.start("x", term, clock.now().as_nanos());
                    recorder.end("x", term, clock.now().as_nanos());
                    leadership.release().await.map(|()| Some(term))
                }
                Ok(Err(err)) => Err(err),
                Err(_) => Ok(None),
            }
        });
        let outcome = if dropped_first {
            let outcome = h.within("the raw acquire to give up", attempt).await;
            h.ok("step_down", nodes[i].elector.step_down().await);
            handed_over = Some(Instant::now());
            outcome
        } else {
            h.ok("step_down", nodes[i].elector.step_down().await);
            handed_over = Some(Instant::now());
            h.within("the raw acquire to finish", attempt).await
        };
        match outcome {
            Ok(Ok(Some(term))) => h.ensure(term > last, || {
                format!("the raw acquire got term {term}, not above {last}")
            }),
            Ok(Ok(None)) => {}
            Ok(Err(err)) => h.fail(format!("the raw acquire or its release failed: {err}")),
            Err(join) => h.fail(format!("the raw acquire panicked: {join}")),
        }
    }
    let (_, ctx) = h
        .within("a primary after the last round", any_primary(&nodes))
        .await;
    h.ensure(ctx.term() > last, || {
        format!("term {} is not above {last}", ctx.term())
    });
    last = ctx.term();

    // With every elector gone, a dropped acquire that still runs somewhere would take the free
    // lock now: for a while, nobody may.
    let mut changes = h.ok("watch_holder()", x_lock.watch_holder().await);
    shutdown_all(&nodes).await;
    let quiet_until = Instant::now() + Duration::from_millis(500);
    loop {
        let holder = h.ok("holder()", x_lock.holder().await);
        if let Some(holder) = holder.filter(|x| x.id == "x" && x.term > last) {
            h.fail(format!(
                "a dropped acquire took the free lock with term {} after every elector was gone",
                holder.term
            ));
        }
        match tokio::time::timeout_at(quiet_until, changes.changed()).await {
            Ok(res) => h.ok("Changes::changed()", res),
            Err(_) => break,
        }
    }
    let late = h.spawn("late");
    let term = h
        .within(
            "a new node to become primary once the electors are gone \
             (is a dropped acquire holding the lock?)",
            late.primary(),
        )
        .await
        .term();
    h.ensure(term > last, || format!("term {term} is not above {last}"));
    let holder = h.ok("holder()", x_lock.holder().await);
    h.ensure(holder.as_ref().is_some_and(|x| x.id == "late"), || {
        format!("the holder record names {holder:?}, expected the new node")
    });
    late.elector.shutdown().await;
    h.finish();
}
