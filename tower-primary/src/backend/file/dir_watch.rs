//! The inotify watch on the lock directory and the state directory.

use super::*;

/// An inotify watch on the lock directory and the state directory, shared by the subscriptions
/// of one `Lock` object (on the process's one inotify instance, [`super::inotify`]).
pub(super) struct DirWatch {
    pub(super) signals: Arc<Signals>,
    pub(super) _subscriptions: Vec<super::inotify::Subscription>,
}

impl DirWatch {
    pub(super) fn start(paths: &Paths) -> Result<Arc<DirWatch>, Error> {
        ensure_state_dir(&paths.state_dir).map_err(|e| {
            Error::backend(
                NAME,
                format!(
                    "cannot create the state directory {}",
                    paths.state_dir.display()
                ),
                e,
            )
        })?;
        let signals = Arc::new(Signals {
            dir: paths.dir.clone(),
            state_dir: paths.state_dir.clone(),
            lock_file: paths.lock_file.clone(),
            holder_file: paths.holder_file.clone(),
            state_name: paths.state_name.clone(),
            entry: watch::channel(0).0,
            keys: Mutex::new(HashMap::new()),
            broken: AtomicBool::new(false),
        });
        let handler = signals.clone();
        let handler: super::inotify::Handler = Arc::new(move |res| handler.on_event(res));
        let mut subscriptions = Vec::new();
        for dir in [&paths.dir, &paths.state_dir] {
            let subscription = super::inotify::subscribe(dir, handler.clone()).map_err(|e| {
                Error::backend_msg(NAME, format!("cannot watch {}: {e}", dir.display()))
            })?;
            subscriptions.push(subscription);
        }
        Ok(Arc::new(DirWatch {
            signals,
            _subscriptions: subscriptions,
        }))
    }
}

/// Where the watch thread reports changes.
pub(super) struct Signals {
    pub(super) dir: PathBuf,
    pub(super) state_dir: PathBuf,
    pub(super) lock_file: OsString,
    pub(super) holder_file: OsString,
    pub(super) state_name: OsString,
    /// Bumped when the lock file or the holder record changes.
    pub(super) entry: watch::Sender<u64>,
    /// Bumped when a state value changes, per key.
    pub(super) keys: Mutex<HashMap<OsString, watch::Sender<u64>>>,
    /// The watch stopped (the directory went away, or inotify failed): subscribers must renew.
    pub(super) broken: AtomicBool,
}

impl Signals {
    pub(super) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    pub(super) fn bump_all(&self) {
        self.entry.send_modify(bump);
        for tx in lock(&self.keys).values() {
            tx.send_modify(bump);
        }
    }

    pub(super) fn break_all(&self) {
        self.broken.store(true, Ordering::Release);
        self.bump_all();
    }

    pub(super) fn subscribe_key(&self, key: &str) -> watch::Receiver<u64> {
        let mut keys = lock(&self.keys);
        keys.retain(|_, tx| tx.receiver_count() > 0);
        keys.entry(OsString::from(key))
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Runs on notify's thread.
    pub(super) fn on_event(&self, res: &notify::Result<notify::Event>) {
        let event = match res {
            Ok(e) => e,
            Err(err) => {
                tracing::warn!(backend = NAME, dir = %self.dir.display(), error = %err, "the lock directory watch failed");
                self.break_all();
                return;
            }
        };
        if event.need_rescan() {
            self.bump_all();
            return;
        }
        // Opens and closes (every read, every probe) change nothing.
        if event.kind.is_access() {
            return;
        }
        let gone = matches!(
            event.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
        );
        for path in &event.paths {
            if *path == self.dir || *path == self.state_dir {
                if gone {
                    self.break_all();
                    return;
                }
                continue;
            }
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                continue;
            };
            if parent == self.dir {
                if name == self.lock_file || name == self.holder_file {
                    self.entry.send_modify(bump);
                } else if name == self.state_name && gone {
                    self.break_all();
                    return;
                }
            } else if parent == self.state_dir
                && let Some(tx) = lock(&self.keys).get(name)
            {
                tx.send_modify(bump);
            }
        }
    }
}

/// A subscription to the holder record or a state value.
pub(super) struct DirChanges {
    pub(super) watch: Arc<DirWatch>,
    pub(super) rx: watch::Receiver<u64>,
}

impl DirChanges {
    pub(super) fn broken(&self) -> Error {
        Error::backend_msg(
            NAME,
            format!(
                "the watch on {} ended (the directory was removed or inotify failed); subscribe again",
                self.watch.signals.dir.display()
            ),
        )
    }
}

impl Changes for DirChanges {
    fn changed(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if self.watch.signals.is_broken() {
                return Err(self.broken());
            }
            if self.rx.changed().await.is_err() {
                // The sender lives in `Signals`, which this subscription keeps alive.
                std::future::pending::<()>().await;
            }
            if self.watch.signals.is_broken() {
                return Err(self.broken());
            }
            Ok(())
        })
    }
}
