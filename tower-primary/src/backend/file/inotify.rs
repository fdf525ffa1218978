//! One inotify instance per process: a process-wide `notify` watcher that every directory watch
//! of the file backend and of host groups shares. inotify instances are scarce (128 per user by
//! default), and a host of 60 workers with a watcher per lock object would use most of them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use notify::{RecursiveMode, Watcher as _};

use crate::sync::lock;

/// Called on notify's thread with every event in (or on) the subscribed directory, and with
/// every error.
pub(in crate::backend) type Handler = Arc<dyn Fn(&notify::Result<notify::Event>) + Send + Sync>;

type Handlers = HashMap<PathBuf, Vec<(u64, Handler)>>;

struct Shared {
    handlers: Arc<Mutex<Handlers>>,
    /// Locked before `handlers` and never by notify's thread: adding a watch waits for that
    /// thread, which may be delivering an event.
    watcher: Mutex<Result<notify::RecommendedWatcher, String>>,
    next_id: AtomicU64,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let handlers: Arc<Mutex<Handlers>> = Arc::default();
        let deliver = handlers.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let targets: Vec<Handler> = {
                let handlers = lock(&deliver);
                match &res {
                    Ok(event) if !event.paths.is_empty() => {
                        let mut targets = Vec::new();
                        for path in &event.paths {
                            for dir in [Some(path.as_path()), path.parent()].into_iter().flatten() {
                                for (_, h) in handlers.get(dir).into_iter().flatten() {
                                    targets.push(h.clone());
                                }
                            }
                        }
                        targets
                    }
                    // A rescan without paths, or an error: everyone hears of it.
                    _ => handlers
                        .values()
                        .flatten()
                        .map(|(_, h)| h.clone())
                        .collect(),
                }
            };
            for handler in targets {
                handler(&res);
            }
        })
        .map_err(|e| e.to_string());
        Shared {
            handlers,
            watcher: Mutex::new(watcher),
            next_id: AtomicU64::new(0),
        }
    })
}

/// A subscription to the events of one directory; dropping it ends it (and the directory's
/// watch, when it was the last one).
pub(in crate::backend) struct Subscription {
    dir: PathBuf,
    id: u64,
}

/// Subscribes `handler` to the events of `dir` (not recursive).
pub(in crate::backend) fn subscribe(dir: &Path, handler: Handler) -> Result<Subscription, String> {
    let shared = shared();
    let mut watcher = lock(&shared.watcher);
    let watcher = watcher.as_mut().map_err(|e| e.clone())?;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    lock(&shared.handlers)
        .entry(dir.to_owned())
        .or_default()
        .push((id, handler));
    // Watched again at every subscription: a directory that was removed and created again
    // needs a new watch, and watching a watched directory changes nothing.
    if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
        remove(&shared.handlers, dir, id);
        return Err(e.to_string());
    }
    Ok(Subscription {
        dir: dir.to_owned(),
        id,
    })
}

/// Removes a handler; `true` when it was the directory's last.
fn remove(handlers: &Mutex<Handlers>, dir: &Path, id: u64) -> bool {
    let mut handlers = lock(handlers);
    let Some(list) = handlers.get_mut(dir) else {
        return false;
    };
    list.retain(|(i, _)| *i != id);
    if list.is_empty() {
        handlers.remove(dir);
        true
    } else {
        false
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let shared = shared();
        let mut watcher = lock(&shared.watcher);
        if remove(&shared.handlers, &self.dir, self.id)
            && let Ok(watcher) = watcher.as_mut()
        {
            // Fails when the directory is gone (its watch went with it): nothing to undo.
            let _ = watcher.unwatch(&self.dir);
        }
    }
}
