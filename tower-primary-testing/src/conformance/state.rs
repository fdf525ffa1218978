//! The check of the term-guarded state API.

use super::Fixture;
use super::harness::{Harness, shutdown_all};
use tower_primary::error::Error;

/// The state API: the primary stores under its term and every node loads the value
/// with that term; `watch_key` wakes on a change; after a handover, writes with the old term —
/// through the elector's [`StateStore`](tower_primary::StateStore) and through [`Lock::store`](tower_primary::backend::Lock::store) on the old holder's
/// and on another connection — fail with [`Error::StaleTerm`] and change nothing; a write with
/// a term that never held the lock fails too; the new term's value is never overwritten by an
/// older term.
///
/// # Panics
///
/// When the backend breaks the contract.
pub async fn state_api_guards_terms<F: Fixture + ?Sized>(fixture: &F) {
    const KEY: &str = "conformance-key";
    const OTHER: &str = "conformance-other";
    let h = Harness::new(fixture, "state_api_guards_terms");
    let a = h.spawn("a");
    let ctx_a = h.within("a to become primary", a.primary()).await;
    let ta = ctx_a.term();
    let b = h.follower("b", "a", ta).await;
    let (state_a, state_b) = (a.elector.state(), b.elector.state());

    let loaded = h.ok("load", state_b.load(KEY).await);
    h.ensure(loaded.is_none(), || {
        format!("a fresh lock's key loaded as {loaded:?}")
    });
    let mut watch = h.ok("watch", state_b.watch(KEY).await);
    h.ok(
        "store by the primary",
        state_a.store(KEY, b"one", &ctx_a).await,
    );
    let woke = h
        .within("watch_key to wake after a store", watch.changed())
        .await;
    h.ok("Changes::changed()", woke);
    for (who, state) in [("a", &state_a), ("b", &state_b)] {
        let loaded = h.ok("load", state.load(KEY).await);
        h.ensure(
            loaded
                .as_ref()
                .is_some_and(|s| s.value == b"one" && s.term == ta),
            || format!("{who} loaded {loaded:?}, expected \"one\" with term {ta}"),
        );
    }
    let other = h.connect();
    let other_lock = h.lock(&other);
    let loaded = h.ok("load", other_lock.load(KEY).await);
    h.ensure(
        loaded
            .as_ref()
            .is_some_and(|s| s.value == b"one" && s.term == ta),
        || format!("another connection loaded {loaded:?}, expected \"one\" with term {ta}"),
    );

    // Handover to b.
    let mut watch_a = h.ok("watch", state_a.watch(KEY).await);
    h.ok("step_down", a.elector.step_down().await);
    let ctx_b = h.within("b to become primary", b.primary()).await;
    let tb = ctx_b.term();
    h.ensure(tb > ta, || format!("b's term {tb} is not above a's {ta}"));

    let stale = |res: Result<(), Error>, how: &str| {
        h.ensure(matches!(res, Err(Error::StaleTerm { .. })), || {
            format!("{how} returned {res:?}, expected a StaleTerm error")
        });
    };
    stale(
        state_a.store(KEY, b"stale", &ctx_a).await,
        &format!("StateStore::store with the old term {ta}"),
    );
    let a_lock = h.lock(&a.conn);
    stale(
        a_lock.store(KEY, b"stale", ta).await,
        &format!("Lock::store on the old holder's connection with its old term {ta}"),
    );
    stale(
        other_lock.store(KEY, b"stale", ta).await,
        &format!("Lock::store on another connection with the old term {ta}"),
    );
    stale(
        other_lock.store(OTHER, b"stale", ta).await,
        &format!("Lock::store of a new key with the old term {ta}"),
    );
    stale(
        other_lock.store(OTHER, b"future", tb + 1000).await,
        &format!(
            "Lock::store with the term {} that never held the lock",
            tb + 1000
        ),
    );
    let loaded = h.ok("load", state_b.load(KEY).await);
    h.ensure(
        loaded
            .as_ref()
            .is_some_and(|s| s.value == b"one" && s.term == ta),
        || {
            format!(
                "after refused stale writes the key loaded as {loaded:?}, expected \"one\" \
                 with term {ta}"
            )
        },
    );

    h.ok(
        "store by the new primary",
        state_b.store(KEY, b"two", &ctx_b).await,
    );
    h.within(
        "watch_key on the old primary to wake after the new primary's store",
        async {
            loop {
                h.ok("Changes::changed()", watch_a.changed().await);
                let loaded = h.ok("load", state_a.load(KEY).await);
                if loaded.is_some_and(|s| s.term == tb) {
                    return;
                }
            }
        },
    )
    .await;
    stale(
        a_lock.store(KEY, b"stale", ta).await,
        &format!("Lock::store over term {tb}'s value with the old term {ta}"),
    );
    let loaded = h.ok("load", other_lock.load(KEY).await);
    h.ensure(
        loaded
            .as_ref()
            .is_some_and(|s| s.value == b"two" && s.term == tb),
        || format!("term {tb}'s value was changed by an older term: loaded {loaded:?}"),
    );
    let loaded = h.ok("load", other_lock.load(OTHER).await);
    h.ensure(loaded.is_none(), || {
        format!("a refused write of a new key left {loaded:?}")
    });
    shutdown_all(&[a, b]).await;
    h.finish();
}
