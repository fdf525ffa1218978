//! Run-once jobs: [`Elector::run_once`] and [`RunOnce`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::check_key;
use crate::backoff::Backoff;
use crate::elector::{Elector, StateStore};
use crate::error::{BoxError, ConfigError, Error};
use crate::role::TermContext;

/// A job that runs to completion once per version, on whichever node is primary; see
/// [`Elector::run_once`]. Cheap to clone; every node can [`wait`](Self::wait) for it.
#[derive(Clone, Debug)]
pub struct RunOnce {
    name: Arc<str>,
    version: Arc<str>,
    done: watch::Receiver<bool>,
}

impl RunOnce {
    /// The job's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version that must be completed.
    #[must_use]
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether the version has been completed (by any node).
    #[must_use]
    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// Waits until the version has been completed (by any node).
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe.
    pub async fn wait(&self) {
        let mut done = self.done.clone();
        // The sender lives as long as the watcher task, which ends only once done is set.
        let _ = done.wait_for(|d| *d).await;
    }
}

impl Elector {
    /// Runs `job` to completion once per `version` (e.g. database migrations), on whichever node
    /// is primary, and records completion under `once:<name>` through the
    /// [state API](Elector::state). Every node can [`wait`](RunOnce::wait) for it.
    ///
    /// If the primary dies mid-job, the next primary runs it again from the start: **the job must
    /// be idempotent**. `Err` or a panic restarts it with backoff while the term lasts.
    ///
    /// The record keeps every completed version (the latest 100), so each version runs once even
    /// when versions mix: during a rolling deploy, a primary still running the old code does not
    /// run the old version again after the new one completed.
    ///
    /// # Examples
    ///
    /// ```
    /// # use tower_primary::{Elector, MemoryBackend};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let elector = Elector::builder("app").backend(MemoryBackend::new()).spawn()?;
    /// let migrations = elector.run_once("migrate", "v3", |ctx| async move {
    ///     // CREATE TABLE IF NOT EXISTS ... (idempotent), fenced by ctx.term()
    ///     Ok::<_, std::io::Error>(())
    /// })?;
    /// migrations.wait().await;
    /// assert!(migrations.is_done());
    /// # elector.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidStateKey`] when `once:<name>` is not a valid state key, or the
    /// version is empty or has a line break.
    pub fn run_once<F, Fut, E>(
        &self,
        name: &str,
        version: &str,
        job: F,
    ) -> Result<RunOnce, ConfigError>
    where
        F: Fn(TermContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let key: Arc<str> = format!("once:{name}").into();
        check_key(&key)?;
        if version.is_empty() || version.contains(['\n', '\r']) {
            return Err(ConfigError::InvalidStateKey {
                key: key.to_string(),
                rule: "the version must be one line, not empty",
            });
        }
        let version: Arc<str> = version.into();
        let (done_tx, done) = watch::channel(false);
        let done_tx = Arc::new(done_tx);
        let state = self.state();

        tokio::spawn(watch_done(
            state.clone(),
            key.clone(),
            version.clone(),
            done_tx.clone(),
            self.clone_stopped(),
        ));

        let job = Arc::new(job);
        let task_version = version.clone();
        self.singleton_task(key.to_string(), move |ctx| {
            let (state, key, version, done_tx, job) = (
                state.clone(),
                key.clone(),
                task_version.clone(),
                done_tx.clone(),
                job.clone(),
            );
            async move {
                if completed(&state, &key, &version).await? {
                    done_tx.send_replace(true);
                    return Ok::<_, BoxError>(());
                }
                tracing::info!(job = %key, %version, term = ctx.term(), "running");
                job(ctx.clone()).await.map_err(Into::into)?;
                match record(&state, &key, &version, &ctx).await {
                    Ok(()) => {
                        tracing::info!(job = %key, %version, term = ctx.term(), "completed");
                        done_tx.send_replace(true);
                        Ok(())
                    }
                    // The term ended before it could record completion: the next primary runs it.
                    Err(Error::StaleTerm { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        });
        Ok(RunOnce {
            name: name.into(),
            version,
            done,
        })
    }
}

/// How many completed versions the record keeps.
const KEEP_VERSIONS: usize = 100;

/// The completed versions in a record: one a line, oldest first.
fn versions(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b'\n').filter(|v| !v.is_empty())
}

async fn completed(state: &StateStore, key: &str, version: &str) -> Result<bool, Error> {
    Ok(state
        .load(key)
        .await?
        .is_some_and(|s| versions(&s.value).any(|v| v == version.as_bytes())))
}

/// Adds `version` to the record, under the term of `ctx`.
async fn record(
    state: &StateStore,
    key: &str,
    version: &str,
    ctx: &TermContext,
) -> Result<(), Error> {
    let stored = state.load(key).await?.map(|s| s.value).unwrap_or_default();
    let mut all: Vec<&[u8]> = versions(&stored)
        .filter(|v| *v != version.as_bytes())
        .collect();
    all.push(version.as_bytes());
    let from = all.len().saturating_sub(KEEP_VERSIONS);
    let value = all[from..].join(&b'\n');
    state.store(key, &value, ctx).await
}

/// Follows the completion record on every node until the version is done or the elector stops.
async fn watch_done(
    state: StateStore,
    key: Arc<str>,
    version: Arc<str>,
    done: Arc<watch::Sender<bool>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        // A subscription that delivered a change, or outlived a re-check, was healthy: the next
        // failure starts the backoff afresh. One that fails at once (a broken directory watch,
        // say) is retried later and later, never in a tight loop.
        let mut healthy = false;
        let attempt = async {
            let mut changes = state.watch(&key).await?;
            loop {
                if completed(&state, &key, &version).await? {
                    return Ok::<_, Error>(());
                }
                // A slow re-check as a safety net under the notification.
                match tokio::time::timeout(Duration::from_secs(5), changes.changed()).await {
                    Ok(Ok(())) | Err(_) => healthy = true,
                    Ok(Err(err)) => return Err(err),
                }
            }
        };
        let res = tokio::select! {
            res = attempt => res,
            () = done.closed() => return,
            _ = stopped.wait_for(|s| *s) => return,
        };
        if healthy {
            backoff.reset();
        }
        match res {
            Ok(()) => {
                done.send_replace(true);
                return;
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(job = %key, error = %err, retry_in = ?delay, "cannot follow the run-once record; subscribing again");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
            }
        }
    }
}
