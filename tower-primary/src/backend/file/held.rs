//! A held lock, its release, and the loss check of a term.

use super::*;

/// A held flock with its term. Dropping it releases: the holder record (if ours) is deleted,
/// then the file is unlocked and closed (on tokio's blocking pool when dropped inside a runtime).
pub(super) struct HeldLock {
    pub(super) inner: Arc<Inner>,
    pub(super) file: Option<Arc<File>>,
    pub(super) id: FileId,
    pub(super) term: u64,
    pub(super) record: Holder,
}

/// Whether the lock still holds, and whether the holder record needs rewriting.
pub(super) enum Check {
    Held { repair: bool },
    Lost(String),
}

/// Checks, for the holder of `term` on the file `id`, that the path still names the locked
/// file and that the holder record names this holder. Blocking file I/O.
pub(super) fn check(inner: &Inner, id: FileId, term: u64, holder: &str) -> Check {
    let path = &inner.paths.lock;
    match fs::symlink_metadata(path) {
        Ok(m) if FileId::of(&m) == id => {}
        Ok(m) => {
            return Check::Lost(format!(
                "the lock file {} was replaced: the path names inode {} on device {}, not the \
                 locked inode {}",
                path.display(),
                m.ino(),
                m.dev(),
                id.ino
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Check::Lost(format!(
                "the lock file {} was deleted (the locked inode {} is no longer linked there)",
                path.display(),
                id.ino
            ));
        }
        Err(e) => {
            return Check::Lost(format!(
                "cannot check the lock file {}: {e}",
                path.display()
            ));
        }
    }
    let problem = match inner.read_holder() {
        Ok(Record::Found(h)) if h.id == holder && h.term == term => {
            return Check::Held { repair: false };
        }
        Ok(Record::Found(h)) if h.term > term => {
            return Check::Lost(format!(
                "a holder record with a newer term appeared (term {}, holder {:?})",
                h.term, h.id
            ));
        }
        Ok(Record::Found(h)) => format!("it names {:?} with term {}", h.id, h.term),
        Ok(Record::Missing) => "it is missing".to_owned(),
        Ok(Record::Corrupt(problem)) => format!("it is corrupt: {problem}"),
        Err(e) => {
            tracing::warn!(lock = %inner.name, error = %e, "cannot read the holder record");
            return Check::Held { repair: false };
        }
    };
    tracing::warn!(
        lock = %inner.name,
        path = %inner.paths.holder.display(),
        term,
        "the holder record does not name this primary ({problem}); rewriting it"
    );
    Check::Held { repair: true }
}

impl HeldLock {
    /// Ends the term (no state write starts under it any more) and takes the lock out of
    /// `self`, still held; `None` if that was done before.
    pub(super) fn end(&mut self) -> Option<Releasing> {
        let file = self.file.take()?;
        self.inner.end_term(self.term);
        Some(Releasing {
            inner: self.inner.clone(),
            file: Some(file),
            id: self.id,
            term: self.term,
            holder: self.record.id.clone(),
            here: false,
        })
    }

    /// Releases: waits (without blocking the runtime) for the writes still in flight under the
    /// term, then deletes the record and unlocks on the blocking pool.
    pub(super) async fn release(&mut self) -> Result<(), Error> {
        let Some(releasing) = self.end() else {
            return Ok(());
        };
        releasing.inner.writes_done().await;
        blocking("releases the lock", move || releasing.finish()).await
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        // Dropping the `Releasing` finishes the release (see its `Drop`).
        drop(self.end());
    }
}

/// A lock whose term has ended, still held until [`finish`](Self::finish) (or drop) deletes the
/// holder record, if it is ours, and unlocks. Blocking file I/O.
pub(super) struct Releasing {
    pub(super) inner: Arc<Inner>,
    pub(super) file: Option<Arc<File>>,
    pub(super) id: FileId,
    pub(super) term: u64,
    pub(super) holder: String,
    /// Finish on the thread that drops it, even inside a runtime.
    pub(super) here: bool,
}

impl Releasing {
    pub(super) fn finish(mut self) -> Result<(), Error> {
        self.finish_now()
    }

    pub(super) fn finish_now(&mut self) -> Result<(), Error> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let inner = &self.inner;
        inner.disk("release");
        // While still holding: delete the record if it is ours (or damaged, and the lock file
        // is still ours), so nobody reads it as current after the unlock.
        let ours = match inner.read_holder() {
            Ok(Record::Found(h)) => h.id == self.holder && h.term == self.term,
            Ok(Record::Corrupt(_)) => inner.path_names(self.id),
            Ok(Record::Missing) | Err(_) => false,
        };
        let removed = if ours {
            match fs::remove_file(&inner.paths.holder) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            Ok(())
        };
        // A write still in flight (only after a drop, which does not wait) holds another
        // reference: the lock is then freed when it is done.
        let unlocked = match Arc::try_unwrap(file) {
            Ok(file) => file.unlock(),
            Err(_) => Ok(()),
        };
        tracing::debug!(lock = %inner.name, term = self.term, "released the file lock");
        removed.map_err(|e| {
            inner.io(
                format!(
                    "cannot delete the holder record {}",
                    inner.paths.holder.display()
                ),
                e,
            )
        })?;
        unlocked.map_err(|e| inner.io(format!("cannot unlock {}", inner.paths.lock.display()), e))
    }
}

impl Drop for Releasing {
    fn drop(&mut self) {
        if self.file.is_none() {
            return;
        }
        // Dropped inside a runtime (a leadership dropped, a release cancelled): finish off its
        // threads, after the writes in flight. If that task never runs (the runtime is shutting
        // down), its copy finishes where it is dropped.
        if !self.here
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let rest = Releasing {
                inner: self.inner.clone(),
                file: self.file.take(),
                id: self.id,
                term: self.term,
                holder: std::mem::take(&mut self.holder),
                here: true,
            };
            runtime.spawn(async move {
                rest.inner.clone().writes_done().await;
                let _ = blocking("releases the lock", move || rest.finish()).await;
            });
            return;
        }
        // Errors are logged by `finish_now`; the file is closed (and so unlocked) in any case.
        let _ = self.finish_now();
    }
}

/// One term of a file lock.
pub(super) struct FileLeadership {
    pub(super) held: HeldLock,
    pub(super) watch: Option<Arc<DirWatch>>,
    pub(super) entry: Option<watch::Receiver<u64>>,
    pub(super) lost: Option<String>,
}

impl fmt::Debug for FileLeadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLeadership")
            .field("lock", &self.held.inner.name)
            .field("term", &self.held.term)
            .field("inode", &self.held.id.ino)
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl FileLeadership {
    /// Subscribes again if the directory watch broke (or never started).
    pub(super) async fn renew_watch(&mut self) {
        if self.watch.as_ref().is_some_and(|w| !w.signals.is_broken()) {
            return;
        }
        let inner = self.held.inner.clone();
        if let Ok(w) = blocking("watches the lock directory", move || inner.dir_watch()).await {
            self.entry = Some(w.signals.entry.subscribe());
            self.watch = Some(w);
        }
    }

    /// Checks the lock and repairs the holder record, off the runtime.
    pub(super) async fn check(&self) -> Check {
        let inner = self.held.inner.clone();
        let (id, term, record) = (self.held.id, self.held.term, self.held.record.clone());
        let checked = blocking("checks the lock file", move || {
            let checked = check(&inner, id, term, &record.id);
            if let Check::Held { repair: true } = checked
                && let Err(e) = inner.rewrite_holder(term, id, &record)
            {
                tracing::warn!(lock = %inner.name, error = %e, "the holder record rewrite failed");
            }
            Ok(checked)
        })
        .await;
        checked.unwrap_or_else(|e| {
            // The check could not run (the runtime is shutting down): the next round retries.
            tracing::warn!(lock = %self.held.inner.name, error = %e, "cannot check the lock file");
            Check::Held { repair: false }
        })
    }
}

impl Leadership for FileLeadership {
    fn term(&self) -> u64 {
        self.held.term
    }

    fn holder(&self) -> &Holder {
        &self.held.record
    }

    fn renewals(&self) -> Option<Renewals> {
        None
    }

    fn lost(&mut self) -> BoxFuture<'_, Error> {
        Box::pin(async move {
            loop {
                if let Some(reason) = &self.lost {
                    return Error::Lost {
                        lock: self.held.inner.name.clone(),
                        reason: reason.clone(),
                    };
                }
                self.renew_watch().await;
                if let Some(rx) = &mut self.entry {
                    rx.borrow_and_update();
                }
                if let Check::Lost(reason) = self.check().await {
                    self.held.inner.end_term(self.held.term);
                    self.lost = Some(reason);
                    continue;
                }
                let entry = &mut self.entry;
                let changed = async {
                    if let Some(rx) = entry
                        && rx.changed().await.is_ok()
                    {
                        return;
                    }
                    // No watch (or its sender is gone): the safety net alone.
                    std::future::pending::<()>().await;
                };
                tokio::select! {
                    () = changed => {}
                    () = tokio::time::sleep(SAFETY_NET) => {}
                }
            }
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move { self.held.release().await })
    }

    fn reserve<'a>(
        &'a mut self,
        node: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.reserve_for(node, window))
    }
}
