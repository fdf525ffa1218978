//! The check of resuming a lease from another process ([`Lock::resume`]), for backends whose
//! leaderships give a resume token.
//!
//! [`Lock::resume`]: tower_primary::backend::Lock::resume

use super::Fixture;
use super::harness::Harness;
use tower_primary::backend::AcquireRequest;
use tower_primary::error::Error;
use tower_primary::role::NodeId;

/// Resuming a lease: a holder `a` whose leadership is dropped without release (its process
/// died) hands its lease, through its
/// [`resume_token`](tower_primary::backend::Leadership::resume_token), to `b` on another
/// connection: [`Lock::resume`](tower_primary::backend::Lock::resume) returns a leadership with a
/// higher term and `b` in the holder record, which [`Lock::holder`](tower_primary::backend::Lock::holder)
/// and a [`watch_holder`](tower_primary::backend::Lock::watch_holder) subscription of a third
/// connection see; its renewals go on. After that the spent token resumes nothing
/// (`Ok(None)`), `a`'s term may no longer store state while `b`'s may, and once `b` releases,
/// its own token resumes nothing either and a new acquisition gets a higher term still.
///
/// Backends whose leaderships give no resume token (`resume_token()` is `None`, the default)
/// skip the check.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn resume_continues_the_lease_under_a_higher_term<F: Fixture + ?Sized>(fixture: &F) {
    const KEY: &str = "conformance-resume";
    let h = Harness::new(fixture, "resume_continues_the_lease_under_a_higher_term");
    let (a, b, c) = (h.connect(), h.connect(), h.connect());
    let (lock_a, lock_b, lock_c) = (h.lock(&a), h.lock(&b), h.lock(&c));
    let request = |id: &str| {
        AcquireRequest::new(NodeId::new(id))
            .with_lease(fixture.lease())
            .with_clock(h.clock)
    };
    let now = || h.clock.now().as_nanos();

    let held = h
        .within("a to acquire the free lock", lock_a.acquire(request("a")))
        .await;
    let held = h.ok("acquire", held);
    let ta = held.term();
    h.recorder.start("a", ta, now());
    let Some(token) = held.resume_token() else {
        h.recorder.end("a", ta, now());
        h.ok("release", held.release().await);
        h.skip("the backend's leaderships give no resume token");
        return;
    };
    h.ok("store by a", lock_a.store(KEY, b"a", ta).await);
    // a's process dies: its leadership goes without a release.
    drop(held);
    h.recorder.end("a", ta, now());

    let mut changes = h.ok("watch_holder()", lock_c.watch_holder().await);
    let resumed = h
        .within("b to resume a's lease", lock_b.resume(request("b"), &token))
        .await;
    let Some(resumed) = h.ok("resume with a's token", resumed) else {
        h.fail(format!(
            "resume with the token of a's live lease (term {ta}) returned None"
        ));
    };
    let tb = resumed.term();
    h.recorder.start("b", tb, now());
    h.ensure(tb > ta, || {
        format!("the resumed term {tb} is not above a's {ta}")
    });
    h.ensure(
        resumed.holder().id == "b" && resumed.holder().term == tb,
        || {
            format!(
                "the resumed leadership's holder record is {:?}, expected b with term {tb}",
                resumed.holder()
            )
        },
    );
    h.within("watch_holder to wake after the resumption", async {
        loop {
            h.ok("Changes::changed()", changes.changed().await);
            let holder = h.ok("holder()", lock_c.holder().await);
            if holder.is_some_and(|x| x.id == "b" && x.term == tb) {
                return;
            }
        }
    })
    .await;
    if let Some(mut renewals) = resumed.renewals() {
        h.within(
            "a confirmed renewal of the resumed lease",
            renewals.changed(),
        )
        .await;
    }

    let again = h
        .within(
            "a second resume with a's token",
            lock_c.resume(request("c"), &token),
        )
        .await;
    if let Some(other) = h.ok("resume with a's spent token", again) {
        h.fail(format!(
            "a's token resumed the lease a second time (term {}), after b had resumed it",
            other.term()
        ));
    }
    let stale = lock_a.store(KEY, b"late", ta).await;
    h.ensure(matches!(stale, Err(Error::StaleTerm { .. })), || {
        format!("Lock::store with a's term {ta} after the resumption returned {stale:?}")
    });
    h.ok("store by b", lock_b.store(KEY, b"b", tb).await);
    let loaded = h.ok("load", lock_c.load(KEY).await);
    h.ensure(
        loaded
            .as_ref()
            .is_some_and(|s| s.value == b"b" && s.term == tb),
        || format!("loaded {loaded:?}, expected \"b\" with term {tb}"),
    );

    let Some(token_b) = resumed.resume_token() else {
        h.fail("the resumed leadership gives no resume token".to_owned());
    };
    h.ensure(token_b != token, || {
        "the resumed leadership gives its predecessor's token".to_owned()
    });
    h.ok("release", resumed.release().await);
    h.recorder.end("b", tb, now());
    let after = h
        .within(
            "a resume with a released lease's token",
            lock_c.resume(request("c"), &token_b),
        )
        .await;
    if let Some(other) = h.ok("resume with a released lease's token", after) {
        h.fail(format!(
            "the token of b's released lease resumed it (term {})",
            other.term()
        ));
    }
    let next = h
        .within(
            "c to acquire the released lock",
            lock_c.acquire(request("c")),
        )
        .await;
    let next = h.ok("acquire", next);
    let tc = next.term();
    h.recorder.start("c", tc, now());
    h.ensure(tc > tb, || {
        format!("the term {tc} after the release is not above the resumed {tb}")
    });
    h.recorder.end("c", tc, now());
    h.ok("release", next.release().await);
    h.finish();
}
