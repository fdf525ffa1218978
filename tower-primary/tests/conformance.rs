//! The backend conformance suite (`tower_primary_testing::conformance`) against the backends
//! built into the crate, and proof that the suite catches broken backends.

mod memory {
    use tower_primary_testing::conformance::MemoryFixture;

    tower_primary_testing::conformance_tests!(MemoryFixture::new());
}

mod memory_with_lease {
    use std::time::Duration;

    use tower_primary::Lease;
    use tower_primary_testing::conformance::MemoryFixture;

    tower_primary_testing::conformance_tests!(MemoryFixture::with_lease(Lease::new(
        Duration::from_secs(1)
    )));
}

#[cfg(feature = "file")]
mod file {
    use tower_primary::FileBackend;
    use tower_primary_testing::conformance::{self, Connection};

    tower_primary_testing::conformance_tests!({
        let dir = tempfile::tempdir().expect("a temporary directory");
        conformance::from_fn(move || Connection::new(FileBackend::new(dir.path())))
    });

    /// Through the elector's state API: a value above the file backend's maximum is refused
    /// with a typed error and stores nothing; a damaged value on disk is a corrupt-record error.
    #[tokio::test]
    async fn state_values_are_bounded_and_damage_is_reported() {
        use tower_primary::backend::file::MAX_STATE_VALUE;
        use tower_primary::{Elector, Error, NodeId};

        let dir = tempfile::tempdir().expect("a temporary directory");
        let elector = Elector::builder("bounded-state")
            .backend(FileBackend::new(dir.path()))
            .node(NodeId::new("a"))
            .spawn()
            .unwrap();
        let ctx = elector.handle().wait_primary().await;
        let state = elector.state();
        let too_large = vec![0u8; MAX_STATE_VALUE + 1];
        match state.store("big", &too_large, &ctx).await {
            Err(Error::ValueTooLarge { size, max, .. }) => {
                assert_eq!(
                    (size, max),
                    (too_large.len() as u64, MAX_STATE_VALUE as u64)
                );
            }
            other => panic!("expected ValueTooLarge, got {:?}", other.err()),
        }
        assert!(state.load("big").await.unwrap().is_none());
        state.store("ok", b"value", &ctx).await.unwrap();
        assert_eq!(state.load("ok").await.unwrap().unwrap().value, b"value");

        let file = dir.path().join("bounded-state.state").join("ok");
        std::fs::write(&file, b"not a state file").unwrap();
        match state.load("ok").await {
            Err(Error::Corrupt { what, .. }) => assert!(what.contains("\"ok\""), "{what}"),
            other => panic!("expected a corrupt-record error, got {other:?}"),
        }
        elector.shutdown().await;
    }
}

/// Backends that break the contract on purpose: the suite must fail on each.
mod broken_backends_are_caught {
    use std::future::Future;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use tower_primary::backend::{
        AcquireRequest, Backend, BoxFuture, Changes, Leadership, Lock, Renewals, Stored,
    };
    use tower_primary::{ConfigError, Error, Holder, Lease, MemoryBackend};
    use tower_primary_testing::conformance::{self, Connection};

    /// Runs a check that must fail, and returns its panic message.
    async fn must_fail(check: impl Future<Output = ()> + Send + 'static) -> String {
        let err = tokio::spawn(check)
            .await
            .expect_err("the conformance check passed on a broken backend");
        assert!(err.is_panic(), "{err}");
        let panic = err.into_panic();
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default()
    }

    /// Grants every acquire at once: several primaries at a time.
    #[derive(Debug, Default)]
    struct EveryoneWins {
        terms: Arc<AtomicU64>,
    }

    impl Backend for EveryoneWins {
        fn name(&self) -> &'static str {
            "everyone-wins"
        }
        fn min_lease(&self) -> Option<Duration> {
            None
        }
        fn lock(&self, _name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
            Ok(Arc::new(EveryoneWinsLock {
                terms: self.terms.clone(),
            }))
        }
    }

    #[derive(Debug)]
    struct EveryoneWinsLock {
        terms: Arc<AtomicU64>,
    }

    struct Never;

    impl Changes for Never {
        fn changed(&mut self) -> BoxFuture<'_, Result<(), Error>> {
            Box::pin(std::future::pending())
        }
    }

    #[derive(Debug)]
    struct Granted(Holder);

    impl Leadership for Granted {
        fn term(&self) -> u64 {
            self.0.term
        }
        fn holder(&self) -> &Holder {
            &self.0
        }
        fn renewals(&self) -> Option<Renewals> {
            None
        }
        fn lost(&mut self) -> BoxFuture<'_, Error> {
            Box::pin(std::future::pending())
        }
        fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
            Box::pin(async { Ok(()) })
        }
    }

    impl Lock for EveryoneWinsLock {
        fn acquire(
            &self,
            req: AcquireRequest,
        ) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
            let term = self.terms.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move { Ok(Box::new(Granted(req.holder(term))) as Box<dyn Leadership>) })
        }
        fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
            Box::pin(async { Ok(None) })
        }
        fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
            Box::pin(async { Ok(Box::new(Never) as Box<dyn Changes>) })
        }
        fn load<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
            Box::pin(async { Ok(None) })
        }
        fn store<'a>(
            &'a self,
            _key: &'a str,
            _value: &'a [u8],
            _term: u64,
        ) -> BoxFuture<'a, Result<(), Error>> {
            Box::pin(async { Ok(()) })
        }
        fn watch_key<'a>(
            &'a self,
            _key: &'a str,
        ) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
            Box::pin(async { Ok(Box::new(Never) as Box<dyn Changes>) })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_primaries_at_once_are_caught() {
        let terms = Arc::new(AtomicU64::new(0));
        let fixture = conformance::from_fn(move || {
            Connection::new(EveryoneWins {
                terms: terms.clone(),
            })
        });
        let msg = must_fail(async move {
            conformance::single_primary_among_candidates(&fixture).await;
        })
        .await;
        assert!(msg.contains("expected exactly one primary"), "{msg}");
    }

    /// The memory backend, with one thing changed by `Twist`.
    #[derive(Debug)]
    struct Twisted {
        inner: MemoryBackend,
        twist: Twist,
    }

    #[derive(Clone, Copy, Debug)]
    enum Twist {
        /// Every leadership reports term 1.
        TermStuckAtOne,
        /// Stores with a stale term report success (and change nothing).
        StaleStoresSucceed,
        /// `acquire` runs on in the background after its future is dropped, and a grant that
        /// arrives then is kept forever.
        LeakDroppedGrants,
        /// `release` gives nothing back: the lock stays until the lease expires.
        ReleaseDoesNothing,
    }

    impl Backend for Twisted {
        fn name(&self) -> &'static str {
            "twisted-memory"
        }
        fn min_lease(&self) -> Option<Duration> {
            self.inner.min_lease()
        }
        fn lock(&self, name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
            Ok(Arc::new(TwistedLock {
                inner: self.inner.lock(name)?,
                twist: self.twist,
            }))
        }
    }

    #[derive(Debug)]
    struct TwistedLock {
        inner: Arc<dyn Lock>,
        twist: Twist,
    }

    #[derive(Debug)]
    struct TermOne(Box<dyn Leadership>);

    /// A leadership whose release only drops it (a lease backend then waits for expiry).
    #[derive(Debug)]
    struct DropOnRelease(Box<dyn Leadership>);

    impl Leadership for DropOnRelease {
        fn term(&self) -> u64 {
            self.0.term()
        }
        fn holder(&self) -> &Holder {
            self.0.holder()
        }
        fn renewals(&self) -> Option<Renewals> {
            self.0.renewals()
        }
        fn lost(&mut self) -> BoxFuture<'_, Error> {
            self.0.lost()
        }
        fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
            drop(self);
            Box::pin(async { Ok(()) })
        }
    }

    impl Leadership for TermOne {
        fn term(&self) -> u64 {
            1
        }
        fn holder(&self) -> &Holder {
            self.0.holder()
        }
        fn renewals(&self) -> Option<Renewals> {
            self.0.renewals()
        }
        fn lost(&mut self) -> BoxFuture<'_, Error> {
            self.0.lost()
        }
        fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
            self.0.release()
        }
    }

    impl Lock for TwistedLock {
        fn acquire(
            &self,
            req: AcquireRequest,
        ) -> BoxFuture<'_, Result<Box<dyn Leadership>, Error>> {
            if let Twist::LeakDroppedGrants = self.twist {
                let inner = self.inner.clone();
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let granted = inner.acquire(req).await;
                    if let Err(Ok(leadership)) = tx.send(granted) {
                        // Nobody waits any more: the grant leaks.
                        std::mem::forget(leadership);
                    }
                });
                return Box::pin(async move {
                    rx.await
                        .unwrap_or_else(|_| Err(Error::backend_msg("twisted-memory", "gone")))
                });
            }
            Box::pin(async move {
                let granted = self.inner.acquire(req).await?;
                Ok(match self.twist {
                    Twist::TermStuckAtOne => Box::new(TermOne(granted)) as Box<dyn Leadership>,
                    Twist::ReleaseDoesNothing => Box::new(DropOnRelease(granted)),
                    Twist::StaleStoresSucceed | Twist::LeakDroppedGrants => granted,
                })
            })
        }
        fn holder(&self) -> BoxFuture<'_, Result<Option<Holder>, Error>> {
            self.inner.holder()
        }
        fn watch_holder(&self) -> BoxFuture<'_, Result<Box<dyn Changes>, Error>> {
            self.inner.watch_holder()
        }
        fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, Error>> {
            self.inner.load(key)
        }
        fn store<'a>(
            &'a self,
            key: &'a str,
            value: &'a [u8],
            term: u64,
        ) -> BoxFuture<'a, Result<(), Error>> {
            Box::pin(async move {
                match (self.inner.store(key, value, term).await, self.twist) {
                    (Err(Error::StaleTerm { .. }), Twist::StaleStoresSucceed) => Ok(()),
                    (res, _) => res,
                }
            })
        }
        fn watch_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Changes>, Error>> {
            self.inner.watch_key(key)
        }
    }

    fn twisted(twist: Twist) -> impl conformance::Fixture + Send + Sync + 'static {
        twisted_store(MemoryBackend::new(), twist)
    }

    fn twisted_store(
        store: MemoryBackend,
        twist: Twist,
    ) -> conformance::FnFixture<impl Fn() -> Connection + Send + Sync + 'static> {
        conformance::from_fn(move || {
            Connection::new(Twisted {
                inner: store.connection(),
                twist,
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn terms_that_do_not_rise_are_caught() {
        let fixture = twisted(Twist::TermStuckAtOne);
        let msg = must_fail(async move {
            conformance::terms_rise_over_handovers(&fixture).await;
        })
        .await;
        assert!(msg.contains("is not above"), "{msg}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn stale_stores_that_succeed_are_caught() {
        let fixture = twisted(Twist::StaleStoresSucceed);
        let msg = must_fail(async move {
            conformance::state_api_guards_terms(&fixture).await;
        })
        .await;
        assert!(msg.contains("expected a StaleTerm error"), "{msg}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn grants_leaked_by_dropped_acquires_are_caught() {
        let fixture = twisted(Twist::LeakDroppedGrants);
        let fixture = fixture_with_timeout(fixture, Duration::from_secs(3));
        let msg = must_fail(async move {
            conformance::dropped_acquire_does_not_leak_the_lock(&fixture).await;
        })
        .await;
        assert!(
            msg.contains("timed out") || msg.contains("a dropped acquire took the free lock"),
            "{msg}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_release_that_waits_for_the_lease_is_caught() {
        let fixture = twisted_store(MemoryBackend::new().with_lease(), Twist::ReleaseDoesNothing)
            .with_lease(Lease::new(Duration::from_secs(1)));
        let msg = must_fail(async move {
            conformance::handover_on_step_down(&fixture).await;
        })
        .await;
        assert!(
            msg.contains("release() must free the lock at once"),
            "{msg}"
        );
    }

    /// The same fixture, waiting at most `timeout`.
    fn fixture_with_timeout(
        fixture: impl conformance::Fixture + Send + Sync + 'static,
        timeout: Duration,
    ) -> impl conformance::Fixture + Send + Sync + 'static {
        struct Bounded<F>(F, Duration);
        impl<F: conformance::Fixture> conformance::Fixture for Bounded<F> {
            fn connect(&self) -> Connection {
                self.0.connect()
            }
            fn lease(&self) -> Option<Lease> {
                self.0.lease()
            }
            fn timeout(&self) -> Duration {
                self.1
            }
        }
        Bounded(fixture, timeout)
    }
}
