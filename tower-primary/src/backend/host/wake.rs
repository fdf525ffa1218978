//! One inotify instance per process for the host groups' own watches (the `.host` record, the
//! keys followers want): a process-wide `notify` watcher, one watch per host directory, with
//! subscriptions by file name prefix. Where inotify cannot be had, subscribers poll slowly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::watch;

use crate::sync::lock;

/// How often a subscriber without inotify looks again.
const SLOW_POLL: Duration = Duration::from_secs(1);

/// Subscriptions by directory: (file name prefix, sender).
type Subscribers = HashMap<PathBuf, Vec<(String, watch::Sender<u64>)>>;

struct Shared {
    subscribers: Arc<Mutex<Subscribers>>,
    /// `None` when inotify could not be had. Locked apart from `subscribers`: adding a watch
    /// waits for notify's thread, which may be delivering an event into `subscribers`.
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let subscribers: Arc<Mutex<Subscribers>> = Arc::default();
        let deliver = subscribers.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let subscribers = lock(&deliver);
            match res {
                Ok(event) if !event.kind.is_access() => {
                    for path in &event.paths {
                        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                            continue;
                        };
                        let name = name.to_string_lossy();
                        for (prefix, tx) in subscribers.get(dir).into_iter().flatten() {
                            if name.starts_with(prefix.as_str()) {
                                tx.send_modify(|n| *n = n.wrapping_add(1));
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    // A lost event: wake everyone, who then reads again.
                    for tx in subscribers.values().flatten().map(|(_, tx)| tx) {
                        tx.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "inotify is not available; host groups poll their directory every second");
                None
            }
        };
        Shared {
            subscribers,
            watcher: Mutex::new(watcher),
        }
    })
}

/// Wakes at changes of the files of a directory whose name starts with a prefix.
pub(super) struct Wake {
    rx: Option<watch::Receiver<u64>>,
}

impl Wake {
    /// Subscribes to the files of `dir` whose name starts with `prefix`.
    pub(super) fn subscribe(dir: &Path, prefix: &str) -> Wake {
        let shared = shared();
        let (tx, rx) = watch::channel(0);
        let first = {
            let mut subscribers = lock(&shared.subscribers);
            let list = subscribers.entry(dir.to_owned()).or_default();
            list.retain(|(_, tx)| tx.receiver_count() > 0);
            let first = list.is_empty();
            list.push((prefix.to_owned(), tx));
            first
        };
        let mut watcher = lock(&shared.watcher);
        let Some(watcher) = watcher.as_mut() else {
            return Wake { rx: None };
        };
        if first && let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the host directory; polling it every second");
            return Wake { rx: None };
        }
        Wake { rx: Some(rx) }
    }

    /// Resolves at the next change (or after a second, without inotify). Cancel-safe.
    pub(super) async fn changed(&mut self) {
        match &mut self.rx {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => tokio::time::sleep(SLOW_POLL).await,
        }
    }
}
