//! [`StateStore`]: the state API of one lock.

use std::sync::Arc;

use crate::backend::{Changes, Lock, Stored};
use crate::error::Error;
use crate::role::TermContext;

/// The state API of one lock, from [`Elector::state`](super::Elector::state): small values kept by the backend, which
/// only the term holding the lock may write.
///
/// # Examples
///
/// ```
/// # use tower_primary::{Elector, MemoryBackend};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_primary::Error> {
/// let elector = Elector::builder("jobs").backend(MemoryBackend::new()).spawn()?;
/// let ctx = elector.handle().wait_primary().await;
/// let state = elector.state();
/// state.store("last-run", b"2026-11-30", &ctx).await?;
/// let stored = state.load("last-run").await?.unwrap();
/// assert_eq!(stored.value, b"2026-11-30");
/// assert_eq!(stored.term, ctx.term());
/// # elector.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StateStore {
    lock: Arc<dyn Lock>,
}

impl StateStore {
    pub(super) fn new(lock: Arc<dyn Lock>) -> Self {
        StateStore { lock }
    }

    /// Loads a value and the term that wrote it.
    ///
    /// # Errors
    ///
    /// An invalid key, or the backend's error.
    pub async fn load(&self, key: &str) -> Result<Option<Stored>, Error> {
        crate::backend::validate_key(key)?;
        self.lock.load(key).await
    }

    /// Stores a value under the term of `ctx`.
    ///
    /// # Errors
    ///
    /// [`Error::StaleTerm`] if the term has ended or a newer term wrote the key; an invalid key;
    /// the backend's error.
    pub async fn store(&self, key: &str, value: &[u8], ctx: &TermContext) -> Result<(), Error> {
        crate::backend::validate_key(key)?;
        if !ctx.is_valid() {
            return Err(Error::StaleTerm {
                lock: ctx.lock().to_owned(),
                term: ctx.term(),
                current: None,
            });
        }
        self.lock.store(key, value, ctx.term()).await
    }

    /// A subscription to changes of `key`.
    ///
    /// # Errors
    ///
    /// An invalid key, or the backend's error.
    pub async fn watch(&self, key: &str) -> Result<Box<dyn Changes>, Error> {
        crate::backend::validate_key(key)?;
        self.lock.watch_key(key).await
    }
}
