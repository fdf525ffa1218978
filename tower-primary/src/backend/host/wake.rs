//! Wake-ups at changes of some files of the host directory, on the process's one inotify
//! instance ([`crate::backend::file::inotify`]). Where inotify cannot be had, subscribers poll
//! slowly.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::file::inotify::{self, Subscription};
use crate::backend::{BoxFuture, Changes};
use crate::error::Error;

/// How often a subscriber without inotify looks again.
const SLOW_POLL: Duration = Duration::from_secs(1);

/// Wakes at changes of the files of a directory whose name starts with a prefix.
pub(super) struct Wake {
    rx: Option<(watch::Receiver<u64>, Subscription)>,
}

impl Wake {
    /// Subscribes to the files of `dir` whose name starts with `prefix`.
    pub(super) fn subscribe(dir: &Path, prefix: &str) -> Wake {
        let (tx, rx) = watch::channel(0u64);
        let prefix = prefix.to_owned();
        let handler: inotify::Handler = Arc::new(move |res: &notify::Result<notify::Event>| {
            let wanted = match res {
                Ok(event) if event.kind.is_access() => false,
                Ok(event) => {
                    event.need_rescan()
                        || event.paths.iter().any(|p| {
                            p.file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with(prefix.as_str()))
                        })
                }
                Err(_) => true,
            };
            if wanted {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        });
        match inotify::subscribe(dir, handler) {
            Ok(subscription) => Wake {
                rx: Some((rx, subscription)),
            },
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the host directory; polling it every second");
                Wake { rx: None }
            }
        }
    }

    /// Resolves at the next change (or after a second, without inotify). Cancel-safe.
    pub(super) async fn changed(&mut self) {
        match &mut self.rx {
            Some((rx, _)) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => tokio::time::sleep(SLOW_POLL).await,
        }
    }
}

/// [`Changes`] that fire every second: a follower's watch of a mirror where inotify cannot be
/// had (spurious wake-ups are allowed; the reader compares).
pub(super) struct SlowPoll;

impl Changes for SlowPoll {
    fn changed(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async {
            tokio::time::sleep(SLOW_POLL).await;
            Ok(())
        })
    }
}

/// `watched`, or [`SlowPoll`] with a warning when the watch cannot be set up.
pub(super) fn or_slow_poll(
    watched: Result<Box<dyn Changes>, Error>,
    what: &str,
) -> Box<dyn Changes> {
    watched.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot watch the {what} mirror of the host group; polling it every second");
        Box::new(SlowPoll)
    })
}
