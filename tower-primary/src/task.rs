//! Singleton tasks: futures that run only while this node is primary.
//!
//! Each promotion starts one supervisor per registered task, in a per-term [`TaskSet`]. The
//! supervisor calls the factory with the term's [`TermContext`], restarts it with backoff after an
//! `Err` or a panic while the term lasts, and stops after an `Ok`.
//!
//! A task is never started for a term that has ended: the supervisor checks the term and calls the
//! factory under a per-term gate held shared, and [`TaskSet::end_term`] cancels the term's token
//! under the same gate held exclusively. So either the task started before the cancellation (and
//! sees it), or the supervisor sees the term cancelled and starts nothing.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::JoinSet;

use crate::backend::BoxFuture;
use crate::backoff::Backoff;
use crate::error::{BoxError, Chain};
use crate::role::TermContext;

type Factory = dyn Fn(TermContext) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync;

pub(crate) struct TaskSpec {
    name: String,
    factory: Box<Factory>,
}

impl fmt::Debug for TaskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskSpec")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TaskSpec {
    pub(crate) fn new(
        name: String,
        factory: impl Fn(TermContext) -> BoxFuture<'static, Result<(), BoxError>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        TaskSpec {
            name,
            factory: Box::new(factory),
        }
    }
}

/// The tasks of one term.
pub(crate) struct TaskSet {
    started: usize,
    set: JoinSet<()>,
    names: Vec<(tokio::task::Id, String)>,
    /// Held shared while a task is checked and started, exclusively while the term is cancelled.
    gate: Arc<RwLock<()>>,
}

impl TaskSet {
    pub(crate) fn new() -> Self {
        TaskSet {
            started: 0,
            set: JoinSet::new(),
            names: Vec::new(),
            gate: Arc::new(RwLock::new(())),
        }
    }

    /// Cancels the term's token, ordered with every task start: no task starts after this.
    pub(crate) fn end_term(&self, ctx: &TermContext) {
        let _closed = crate::sync::write(&self.gate);
        ctx.token().cancel();
    }

    /// Starts the registered tasks not started yet in this term.
    pub(crate) fn sync(&mut self, specs: &[Arc<TaskSpec>], ctx: &TermContext) {
        if !ctx.is_valid() {
            return;
        }
        for spec in &specs[self.started.min(specs.len())..] {
            let handle = self
                .set
                .spawn(supervise(spec.clone(), ctx.clone(), self.gate.clone()));
            self.names.push((handle.id(), spec.name.clone()));
        }
        self.started = specs.len();
    }

    /// Waits until every task has returned.
    pub(crate) async fn join(&mut self) {
        while let Some(res) = self.set.join_next_with_id().await {
            let id = match &res {
                Ok((id, ())) => *id,
                Err(e) => e.id(),
            };
            self.names.retain(|(i, _)| *i != id);
        }
    }

    /// The names of the tasks still running.
    pub(crate) fn running(&self) -> Vec<String> {
        self.names.iter().map(|(_, n)| n.clone()).collect()
    }

    /// Aborts the tasks still running and waits for them to go.
    pub(crate) async fn abort(&mut self) {
        self.set.abort_all();
        self.join().await;
    }
}

async fn supervise(spec: Arc<TaskSpec>, ctx: TermContext, gate: Arc<RwLock<()>>) {
    let name = spec.name.as_str();
    let lock = ctx.lock().to_owned();
    let term = ctx.term();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    let mut restart = false;
    loop {
        if !ctx.is_valid() {
            return;
        }
        tracing::debug!(%lock, task = name, term, "singleton task starting");
        let run = {
            // The check and the start, under the gate that the term's cancellation takes too.
            let _open = crate::sync::read(&gate);
            if !ctx.is_valid() {
                tracing::debug!(%lock, task = name, term, "the term ended before the task started");
                return;
            }
            std::panic::catch_unwind(AssertUnwindSafe(|| (spec.factory)(ctx.clone())))
        };
        crate::metrics::task_started(&lock, name, restart);
        restart = true;
        let outcome = match run {
            Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
            Err(panic) => Err(panic),
        };
        if ctx.token().is_cancelled() {
            tracing::debug!(%lock, task = name, term, "singleton task ended with its term");
            return;
        }
        match outcome {
            Ok(Ok(())) => {
                tracing::debug!(%lock, task = name, term, "singleton task done for this term");
                return;
            }
            Ok(Err(err)) => {
                crate::metrics::task_failed(&lock, name, "error");
                tracing::warn!(%lock, task = name, term, error = %Chain(&*err), "singleton task failed; restarting");
            }
            Err(panic) => {
                crate::metrics::task_failed(&lock, name, "panic");
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(%lock, task = name, term, panic = %msg, "singleton task panicked; restarting");
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = ctx.cancelled() => return,
        }
    }
}
