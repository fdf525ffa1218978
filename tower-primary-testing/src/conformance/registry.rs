//! The checks of the candidate registry, reservations and deploy-aware leadership
//! ([`Lock::register`], [`Leadership::reserve`], the elector's priorities).
//!
//! [`Lock::register`]: tower_primary::backend::Lock::register
//! [`Leadership::reserve`]: tower_primary::backend::Leadership::reserve

use std::time::Duration;

use super::Fixture;
use super::harness::{Harness, Node, holder_is, shutdown_all};
use tower_primary::Candidate;
use tower_primary::backend::{AcquireRequest, Changes, Lock};
use tower_primary::error::{Error, HandOverRefusal};
use tower_primary::role::NodeId;

/// The window the checks reserve the lock for (etcd's leases last at least 2 s).
const WINDOW: Duration = Duration::from_secs(2);
/// The settle time of the checks' electors.
const SETTLE: Duration = Duration::from_millis(100);

/// Waits, re-reading at every change of `changes`, until `lock`'s registry satisfies `until`.
async fn registry_until<F: Fixture + ?Sized>(
    h: &Harness<'_, F>,
    what: &str,
    lock: &dyn Lock,
    changes: &mut Box<dyn Changes>,
    until: impl Fn(&[Candidate]) -> bool,
) -> Vec<Candidate> {
    h.within(what, async {
        loop {
            let list = h.ok("candidates()", lock.candidates().await);
            if until(&list) {
                return list;
            }
            h.ok("Changes::changed()", changes.changed().await);
        }
    })
    .await
}

fn entry<'a>(list: &'a [Candidate], node: &str) -> Option<&'a Candidate> {
    list.iter().find(|c| c.node == node)
}

/// The registry: an entry registered on one connection is listed by another as soon as
/// [`register`](tower_primary::backend::Lock::register) returns; an update and a withdrawal
/// (the [`Registration`](tower_primary::backend::Registration) dropped) wake a
/// [`watch_candidates`](tower_primary::backend::Lock::watch_candidates) subscription of the
/// other connection and show in its reads; two nodes' entries are listed side by side.
///
/// Backends without a registry (nothing listed right after a registration) skip the check.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn registry_lists_live_candidates<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "registry_lists_live_candidates");
    let (a, b) = (h.connect(), h.connect());
    let (lock_a, lock_b) = (h.lock(&a), h.lock(&b));
    let mut changes = h.ok("watch_candidates()", lock_b.watch_candidates().await);
    let first = Candidate::new("a").with_priority(3).with_ready(false);
    let reg_a = h
        .within(
            "register(a)",
            lock_a.register(first.clone(), fixture.lease()),
        )
        .await;
    let reg_a = h.ok("register(a)", reg_a);
    let listed = h.ok("candidates()", lock_b.candidates().await);
    if listed.is_empty() {
        h.skip("the backend keeps no candidate registry (register lists nobody)");
        return;
    }
    h.ensure(entry(&listed, "a") == Some(&first), || {
        format!("right after register(a), another connection lists {listed:?}")
    });
    let ready = first.clone().with_ready(true).with_priority(4);
    h.ok(
        "update(a)",
        h.within("update(a)", reg_a.update(ready.clone())).await,
    );
    registry_until(&h, "b to read a's update", &*lock_b, &mut changes, |l| {
        entry(l, "a") == Some(&ready)
    })
    .await;
    let reg_b = h
        .within(
            "register(b)",
            lock_b.register(Candidate::new("b").with_draining(true), fixture.lease()),
        )
        .await;
    let reg_b = h.ok("register(b)", reg_b);
    registry_until(
        &h,
        "both entries to be listed",
        &*lock_a,
        &mut h.ok("watch_candidates()", lock_a.watch_candidates().await),
        |l| entry(l, "a").is_some() && entry(l, "b").is_some_and(|b| b.draining),
    )
    .await;
    drop(reg_a);
    registry_until(&h, "a's withdrawal to show", &*lock_b, &mut changes, |l| {
        entry(l, "a").is_none() && entry(l, "b").is_some()
    })
    .await;
    drop(reg_b);
    registry_until(&h, "b's withdrawal to show", &*lock_b, &mut changes, |l| {
        entry(l, "b").is_none()
    })
    .await;
    h.finish();
}

/// Reservations: a holder reserves the lock for `c` and releases it while `b` and `c` wait: `c`
/// takes it with a higher term, `b` does not; once `c` has released it, `b` takes it (the
/// reservation was consumed). A reservation for a node that never comes keeps `b` out for (at
/// least half) the window, then `b` takes the lock, with a higher term.
///
/// Backends without reservations ([`Error::Unsupported`]) skip the check.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn reservation_admits_only_its_node<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "reservation_admits_only_its_node");
    let (a, b, c) = (h.connect(), h.connect(), h.connect());
    let (lock_a, lock_b, lock_c) = (h.lock(&a), h.lock(&b), h.lock(&c));
    let request = |id: &str| {
        AcquireRequest::new(NodeId::new(id))
            .with_lease(fixture.lease())
            .with_clock(h.clock)
    };
    let now = || h.clock.now().as_nanos();

    let held = h.within("a to acquire", lock_a.acquire(request("a"))).await;
    let mut held = h.ok("acquire", held);
    let ta = held.term();
    h.recorder.start("a", ta, now());
    let lock_b2 = lock_b.clone();
    let lock_c2 = lock_c.clone();
    let req_b = request("b");
    let req_c = request("c");
    let mut waiting_b = tokio::spawn(async move { lock_b2.acquire(req_b).await });
    let waiting_c = tokio::spawn(async move { lock_c2.acquire(req_c).await });
    // Both wait behind a.
    let early = tokio::time::timeout(Duration::from_millis(200), &mut waiting_b).await;
    h.ensure(early.is_err(), || "b took a held lock".to_owned());

    match h.within("reserve(c)", held.reserve("c", WINDOW)).await {
        Ok(()) => {}
        Err(Error::Unsupported { .. }) => {
            h.recorder.end("a", ta, now());
            h.ok("release", held.release().await);
            waiting_b.abort();
            waiting_c.abort();
            h.skip("the backend has no reservations");
            return;
        }
        Err(e) => h.fail(format!("reserve(c) by the holder failed: {e}")),
    }
    h.recorder.end("a", ta, now());
    h.ok("release", held.release().await);
    let got_c = h
        .within("c, the reserved node, to acquire", waiting_c)
        .await;
    let held_c = h.ok("acquire(c)", h.ok("c's task", got_c));
    let tc = held_c.term();
    h.recorder.start("c", tc, now());
    h.ensure(tc > ta, || format!("c's term {tc} is not above a's {ta}"));
    h.ensure(!waiting_b.is_finished(), || {
        "b, not reserved, acquired the lock along with c".to_owned()
    });
    h.recorder.end("c", tc, now());
    h.ok("release(c)", held_c.release().await);
    let got_b = h
        .within(
            "b to acquire once c released (the reservation consumed)",
            waiting_b,
        )
        .await;
    let mut held_b = h.ok("acquire(b)", h.ok("b's task", got_b));
    let tb = held_b.term();
    h.recorder.start("b", tb, now());
    h.ensure(tb > tc, || format!("b's term {tb} is not above c's {tc}"));

    // A reservation for a node that never comes: everybody else waits it out.
    h.ok(
        "reserve(ghost)",
        h.within("reserve(ghost)", held_b.reserve("ghost", WINDOW))
            .await,
    );
    h.recorder.end("b", tb, now());
    h.ok("release(b)", held_b.release().await);
    let released_at = tokio::time::Instant::now();
    let lock_a2 = lock_a.clone();
    let req_a = request("a");
    let mut waiting_a = tokio::spawn(async move { lock_a2.acquire(req_a).await });
    let early = tokio::time::timeout(WINDOW / 2, &mut waiting_a).await;
    h.ensure(early.is_err(), || {
        "a took the lock while it was reserved for another node".to_owned()
    });
    let got_a = h
        .within("a to acquire once the reservation ran out", waiting_a)
        .await;
    let held_a = h.ok("acquire(a)", h.ok("a's task", got_a));
    let ta2 = held_a.term();
    h.recorder.start("a", ta2, now());
    h.ensure(ta2 > tb, || format!("a's term {ta2} is not above b's {tb}"));
    println!(
        "reservation_admits_only_its_node: the lock reserved for nobody was taken {:?} after the release (window {WINDOW:?})",
        released_at.elapsed()
    );
    h.recorder.end("a", ta2, now());
    h.ok("release(a)", held_a.release().await);
    h.finish();
}

async fn primary_is(h: &Harness<'_, impl Fixture + ?Sized>, nodes: &[&Node], id: &str) -> u64 {
    let node = nodes
        .iter()
        .find(|n| n.id == id)
        .unwrap_or_else(|| h.fail(format!("no node {id}")));
    let ctx = h
        .within(&format!("{id} to become primary"), node.primary())
        .await;
    for other in nodes {
        h.within(
            &format!("{} to name {id} as the holder", other.id),
            holder_is(&other.handle, id, Some(ctx.term())),
        )
        .await;
    }
    ctx.term()
}

/// Deploy-aware leadership with electors: with equal priorities nothing moves; a node with a
/// higher priority that is not ready does not pull the lock; once ready (and settled) it gets
/// the lock handed over, once. A directed handover
/// ([`hand_over_to`](tower_primary::Elector::hand_over_to)) refuses unknown, unready and
/// draining nodes, moves the lock to a lower priority, and the lock does not come back on its
/// own; a draining primary hands over to the best eligible node. Terms rise at every move.
///
/// Backends without a registry skip the check.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn priorities_move_the_lock_once<F: Fixture + ?Sized>(fixture: &F) {
    let h = Harness::new(fixture, "priorities_move_the_lock_once");
    let spawn = |id: &str, priority: u64, ready: bool| {
        h.spawn_on(id, h.connect(), |b| {
            b.priority(priority)
                .ready_at_spawn(ready)
                .settle_time(SETTLE)
                .handover_window(WINDOW)
        })
    };
    let a = spawn("a", 1, true);
    let ta = a.primary().await.term();
    let b = spawn("b", 1, true);
    let probe = h.lock(&h.connect());
    let mut changes = h.ok("watch_candidates()", probe.watch_candidates().await);
    let listed = h.ok("candidates()", probe.candidates().await);
    let registered = async {
        let mut listed = listed;
        loop {
            if entry(&listed, "a").is_some() && entry(&listed, "b").is_some() {
                return true;
            }
            if listed.is_empty() {
                // Give a registry that exists the time to show the electors' entries.
                if tokio::time::timeout(Duration::from_secs(2), changes.changed())
                    .await
                    .is_err()
                {
                    return false;
                }
            } else {
                h.ok("Changes::changed()", changes.changed().await);
            }
            listed = h.ok("candidates()", probe.candidates().await);
        }
    };
    if !h.within("the electors' registry entries", registered).await {
        h.skip("the backend keeps no candidate registry");
        shutdown_all(&[a, b]).await;
        return;
    }
    // Equal priorities, and a higher one that is not ready: nothing moves for many settle times.
    let c = spawn("c", 2, false);
    h.within(
        "c's entry to show",
        c.handle.wait_candidates(|l| entry(l, "c").is_some()),
    )
    .await;
    tokio::time::sleep(SETTLE * 10).await;
    h.ensure(a.handle.is_primary() && a.handle.term() == Some(ta), || {
        format!(
            "the lock moved without a ready higher priority: {:?}",
            a.handle.role()
        )
    });
    // Ready: the lock moves to c, once.
    c.elector.ready();
    let tc = primary_is(&h, &[&a, &b, &c], "c").await;
    h.ensure(tc > ta, || format!("c's term {tc} is not above a's {ta}"));

    // Directed handovers: refusals first.
    let refusal = |r: Result<(), Error>| match r {
        Err(Error::HandOver { refusal, .. }) => Some(refusal),
        _ => None,
    };
    let unknown = c.elector.hand_over_to("nobody").await;
    h.ensure(
        refusal(unknown) == Some(HandOverRefusal::UnknownNode),
        || "hand_over_to(an unknown node) was not refused as unknown".to_owned(),
    );
    let d = spawn("d", 0, false);
    h.within(
        "d's entry to show",
        c.handle.wait_candidates(|l| entry(l, "d").is_some()),
    )
    .await;
    let unready = c.elector.hand_over_to("d").await;
    h.ensure(refusal(unready) == Some(HandOverRefusal::NotReady), || {
        "hand_over_to(an unready node) was not refused as not ready".to_owned()
    });
    let not_primary = b.elector.hand_over_to("a").await;
    h.ensure(matches!(not_primary, Err(Error::NotPrimary { .. })), || {
        format!("hand_over_to on a secondary returned {not_primary:?}")
    });
    // To b (priority 1, below c's 2): it moves, and does not come back to c.
    h.ok("hand_over_to(b)", c.elector.hand_over_to("b").await);
    let tb = primary_is(&h, &[&a, &b, &c], "b").await;
    h.ensure(tb > tc, || format!("b's term {tb} is not above c's {tc}"));
    tokio::time::sleep(SETTLE * 10).await;
    h.ensure(b.handle.is_primary() && b.handle.term() == Some(tb), || {
        format!(
            "after a directed handover the lock did not stay: b is {:?}",
            b.handle.role()
        )
    });
    // b drains: it hands over to the best eligible node, c (priority 2).
    b.elector.drain().await;
    let tc2 = primary_is(&h, &[&a, &b, &c], "c").await;
    h.ensure(tc2 > tb, || format!("c's term {tc2} is not above b's {tb}"));
    let draining = c.elector.hand_over_to("b").await;
    h.ensure(refusal(draining) == Some(HandOverRefusal::Draining), || {
        "hand_over_to(a draining node) was not refused as draining".to_owned()
    });
    shutdown_all(&[a, b, c, d]).await;
    h.finish();
}
