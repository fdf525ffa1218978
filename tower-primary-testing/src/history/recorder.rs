//! The recorder: a history shared between tasks and threads, and electors tracked into it.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::{Event, History, Report};
use tower_primary::clock::Timestamp;
use tower_primary::elector::Elector;

/// A [`History`] shared between the tasks and threads that record into it.
///
/// Clones share one history. [`track`](Self::track) records an elector's periods;
/// [`wait_for`](Self::wait_for) waits until the history satisfies a condition.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

#[derive(Default)]
struct RecorderInner {
    history: Mutex<History>,
    version: watch::Sender<u64>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("history", &*self.lock())
            .finish()
    }
}

impl Recorder {
    /// A recorder with an empty history.
    #[must_use]
    pub fn new() -> Self {
        Recorder::default()
    }

    /// Applies an event; see [`History::apply`].
    pub fn apply(&self, event: &Event) {
        self.update(|h| h.apply(event));
    }

    /// See [`History::start`].
    pub fn start(&self, node: &str, term: u64, at: u64) {
        self.update(|h| h.start(node, term, at));
    }

    /// See [`History::end`] (which also says whether a period was ended).
    pub fn end(&self, node: &str, term: u64, at: u64) {
        self.update(|h| {
            h.end(node, term, at);
        });
    }

    /// See [`History::extend_deadline`].
    pub fn extend_deadline(&self, node: &str, term: u64, deadline: u64) {
        self.update(|h| h.extend_deadline(node, term, deadline));
    }

    /// See [`History::write`].
    pub fn write(&self, node: &str, term: u64, at: u64) {
        self.update(|h| h.write(node, term, at));
    }

    /// A copy of the history so far.
    #[must_use]
    pub fn history(&self) -> History {
        self.lock().clone()
    }

    /// Checks the history so far.
    #[must_use]
    pub fn check(&self) -> Report {
        self.lock().check()
    }

    /// Panics if the history so far has anything wrong; see [`History::assert_ok`].
    ///
    /// # Panics
    ///
    /// When the history is not ok.
    #[track_caller]
    pub fn assert_ok(&self) {
        self.history().assert_ok();
    }

    /// Waits until `condition` holds for the history.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe.
    pub async fn wait_for(&self, mut condition: impl FnMut(&History) -> bool) {
        let mut rx = self.inner.version.subscribe();
        loop {
            if condition(&self.lock()) {
                return;
            }
            // The sender lives in `inner`, which `self` keeps alive.
            let _ = rx.changed().await;
        }
    }

    /// Records the primary periods of `elector` from now on; see [`track`].
    pub fn track(&self, elector: &Elector) {
        let recorder = self.clone();
        track(elector, move |event| recorder.apply(&event));
    }

    fn update(&self, f: impl FnOnce(&mut History)) {
        f(&mut self.lock());
        self.inner.version.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        // Every update leaves the history consistent before it could panic.
        crate::sync::lock(&self.inner.history)
    }
}

/// Reports the primary periods of `elector` to `sink` as [`Event`]s, from now on.
///
/// It registers a [singleton task](Elector::singleton_task) that, in every term:
/// - sends [`Event::primary`] when it starts (just after the node became primary);
/// - on lease backends, sends [`Event::deadline`] whenever the term's deadline moves (sampled
///   every 1/20 of the lease, at most every 50 ms);
/// - sends [`Event::secondary`] when the term's context is cancelled, which the elector does
///   after `is_primary()` turned false and before it releases the lock.
///
/// So a recorded period lies within the time the node held the lock, and a successor's
/// recorded start comes after the recorded end: overlaps found in a correct run are real. A
/// period of a node that is killed or paused gets no end: add one, or its deadline, yourself
/// (the [conformance suite](crate::conformance) does).
///
/// Times are read on the elector's [`Clock`](tower_primary::Clock): give every elector of one history the
/// same clock value.
///
/// # Examples
///
/// A node process printing its events for the test that runs it:
///
/// ```
/// # use tower_primary::{Elector, MemoryBackend};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_primary::Error> {
/// let elector = Elector::builder("jobs").backend(MemoryBackend::new()).spawn()?;
/// tower_primary_testing::history::track(&elector, |event| println!("{event}"));
/// # elector.handle().wait_primary().await;
/// # elector.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub fn track(elector: &Elector, sink: impl Fn(Event) + Send + Sync + 'static) {
    let sink = Arc::new(sink);
    let handle = elector.handle();
    elector.singleton_task("tower-primary-history", move |ctx| {
        let sink = sink.clone();
        let handle = handle.clone();
        async move {
            let clock = handle.clock();
            let node = handle.node().id().to_owned();
            let term = ctx.term();
            let start = clock.now();
            if !ctx.is_valid() {
                return Ok::<(), std::convert::Infallible>(());
            }
            sink(Event::primary(&node, term, start.as_nanos()));
            let sample = handle.holder().and_then(|h| h.lease_ms).map(|ms| {
                (Duration::from_millis(ms) / 20)
                    .clamp(Duration::from_millis(1), Duration::from_millis(50))
            });
            let mut reported = Timestamp::ZERO;
            let report = |reported: &mut Timestamp| {
                if let Some(deadline) = handle.deadline()
                    && deadline != Timestamp::NEVER
                    && deadline > *reported
                    && ctx.is_valid()
                {
                    *reported = deadline;
                    sink(Event::deadline(&node, term, deadline.as_nanos()));
                }
            };
            report(&mut reported);
            match sample {
                Some(every) => loop {
                    tokio::select! {
                        () = ctx.cancelled() => break,
                        () = tokio::time::sleep(every) => report(&mut reported),
                    }
                },
                None => ctx.cancelled().await,
            }
            sink(Event::secondary(&node, term, clock.now().as_nanos()));
            Ok(())
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recorder_tracks_periods_of_electors() {
        use tower_primary::{MemoryBackend, NodeId};

        let recorder = Recorder::new();
        let backend = MemoryBackend::new();
        let a = Elector::builder("history-a")
            .backend(backend.clone())
            .node(NodeId::new("a"))
            .spawn()
            .unwrap();
        recorder.track(&a);
        let b = Elector::builder("history-a")
            .backend(backend.connection())
            .node(NodeId::new("b"))
            .spawn()
            .unwrap();
        recorder.track(&b);
        let ta = a.handle().wait_primary().await.term();
        recorder
            .wait_for(|h| h.periods().iter().any(|p| p.node == "a"))
            .await;
        a.shutdown().await;
        let tb = b.handle().wait_primary().await.term();
        b.shutdown().await;
        let h = recorder.history();
        assert_eq!(h.terms(), vec![ta, tb]);
        assert!(h.periods().iter().all(|p| p.end.is_some()), "{h}");
        h.assert_ok();
    }
}
