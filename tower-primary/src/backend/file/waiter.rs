//! The waiter thread of a lock object: waits in `flock`, takes the term, hands the grant over.

use super::*;

/// An acquire waiting for the waiter thread of its lock object.
pub(super) struct Pending {
    pub(super) req: AcquireRequest,
    pub(super) tx: oneshot::Sender<Result<HeldLock, Error>>,
    /// The acquirer's tracing context, for what the waiter thread logs for it.
    pub(super) dispatch: tracing::Dispatch,
    pub(super) span: tracing::Span,
}

/// The waiter thread of a lock object and the acquires it serves, oldest first.
#[derive(Default)]
pub(super) struct Waiting {
    /// A waiter thread runs; it ends when no acquire waits any more.
    pub(super) running: bool,
    pub(super) queue: VecDeque<Pending>,
}

impl Inner {
    /// Queues an acquire for the waiter thread, starting it if none runs. One thread per lock
    /// object waits in `flock` for all its acquires, so acquires that are given up while the
    /// lock is held elsewhere do not leave a blocked thread each: the next acquire takes over
    /// the waiting thread.
    pub(super) fn enqueue(self: &Arc<Self>, pending: Pending) -> Result<(), Error> {
        let mut waiting = lock(&self.waiting);
        waiting.queue.retain(|p| !p.tx.is_closed());
        waiting.queue.push_back(pending);
        if waiting.running {
            return Ok(());
        }
        let inner = self.clone();
        // A dedicated thread, not `spawn_blocking`: a task blocked in flock would keep a dropped
        // tokio runtime from shutting down.
        match std::thread::Builder::new()
            .name("tower-primary-flock".to_owned())
            .spawn(move || inner.serve())
        {
            Ok(_) => {
                waiting.running = true;
                Ok(())
            }
            Err(e) => {
                waiting.queue.pop_back();
                Err(self.io("cannot start the lock waiting thread".to_owned(), e))
            }
        }
    }

    /// Whether an acquire still waits.
    pub(super) fn anyone_waiting(&self) -> bool {
        lock(&self.waiting).queue.iter().any(|p| !p.tx.is_closed())
    }

    /// The oldest acquire that still waits, taken off the queue.
    pub(super) fn next_waiting(&self) -> Option<Pending> {
        let mut waiting = lock(&self.waiting);
        while let Some(p) = waiting.queue.pop_front() {
            if !p.tx.is_closed() {
                return Some(p);
            }
        }
        None
    }

    /// The waiter thread: serves the queued acquires one after the other, and ends when none is
    /// left.
    pub(super) fn serve(self: Arc<Self>) {
        loop {
            let context = {
                let mut waiting = lock(&self.waiting);
                waiting.queue.retain(|p| !p.tx.is_closed());
                match waiting.queue.front() {
                    Some(p) => (p.dispatch.clone(), p.span.clone()),
                    None => {
                        waiting.running = false;
                        return;
                    }
                }
            };
            let (dispatch, span) = context;
            tracing::dispatcher::with_default(&dispatch, || span.in_scope(|| self.serve_one()));
        }
    }

    /// Waits for the lock, and hands it with a new term to the oldest acquire still waiting. A
    /// grant that nobody waits for any more is unlocked at once.
    pub(super) fn serve_one(self: &Arc<Self>) {
        match self.wait_for_lock() {
            Ok(Some((file, id))) => {
                let Some(pending) = self.next_waiting() else {
                    tracing::debug!(lock = %self.name, "the acquire was given up while waiting; unlocking the grant");
                    return;
                };
                // Read while holding: only a holder writes the record.
                if let Some(reserved) = self.reserved_for_another(&pending.req) {
                    tracing::debug!(lock = %self.name, reserved_for = %reserved.node, "the lock is reserved for another node; waiting for the reservation");
                    drop(file);
                    lock(&self.waiting).queue.push_front(pending);
                    self.deferred.send_modify(bump);
                    self.await_reservation(&reserved);
                    return;
                }
                let granted = self.take_term(file, id, &pending.req);
                if granted.is_ok() {
                    self.consume_reservation();
                }
                let to_sync = granted
                    .as_ref()
                    .ok()
                    .and_then(|h| h.file.as_deref()?.try_clone().ok());
                // If the acquirer is gone, the grant comes back and is dropped here, which
                // deletes its holder record and unlocks.
                let _ = pending.tx.send(granted);
                if let Some(file) = to_sync {
                    sync_term(&file, &self.name);
                }
            }
            Ok(None) => {}
            Err(e) => {
                if let Some(pending) = self.next_waiting() {
                    let _ = pending.tx.send(Err(e));
                }
            }
        }
    }

    /// Locks the file the path names, waiting (blocking) as long as needed.
    /// `None` when no acquire waits any more.
    pub(super) fn wait_for_lock(&self) -> Result<Option<(File, FileId)>, Error> {
        let path = &self.paths.lock;
        for attempt in 1..=MAX_GRANT_ATTEMPTS {
            let file = open_lock_file(path)
                .map_err(|e| self.io(format!("cannot open the lock file {}", path.display()), e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    tracing::debug!(lock = %self.name, "the lock is held; waiting for it");
                    self.blocked.send_modify(bump);
                    loop {
                        match file.lock() {
                            Ok(()) => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                return Err(self.io(
                                    format!("cannot lock the lock file {}", path.display()),
                                    e,
                                ));
                            }
                        }
                    }
                }
                Err(TryLockError::Error(e)) => {
                    return Err(self.io(format!("cannot lock the lock file {}", path.display()), e));
                }
            }
            if !self.anyone_waiting() {
                tracing::debug!(lock = %self.name, "the acquire was given up while waiting; unlocking the grant");
                return Ok(None);
            }
            let held = FileId::of(&file.metadata().map_err(|e| {
                self.io(
                    format!("cannot inspect the lock file {}", path.display()),
                    e,
                )
            })?);
            let now = match fs::symlink_metadata(path) {
                Ok(m) if FileId::of(&m) == held => return Ok(Some((file, held))),
                Ok(m) => format!("the path now names inode {}", m.ino()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => "the path was deleted".to_owned(),
                Err(e) => {
                    return Err(
                        self.io(format!("cannot check the lock file {}", path.display()), e)
                    );
                }
            };
            tracing::warn!(
                lock = %self.name,
                path = %path.display(),
                locked_inode = held.ino,
                attempt,
                "granted a lock on a file that was deleted or replaced ({now}); waiting again on \
                 the file the path names"
            );
            drop(file);
            self.stale_grants.send_modify(bump);
        }
        Err(Error::backend_msg(
            NAME,
            format!(
                "the lock file {} keeps being replaced; giving up for now",
                path.display()
            ),
        ))
    }

    /// While holding: computes, stores and syncs the term, then writes the holder record.
    pub(super) fn take_term(
        self: &Arc<Self>,
        file: File,
        id: FileId,
        req: &AcquireRequest,
    ) -> Result<HeldLock, Error> {
        let term = self.next_term(&file)?;
        write_term(&file, term).map_err(|e| {
            self.io(
                format!("cannot write the term to {}", self.paths.lock.display()),
                e,
            )
        })?;
        // From here on, dropping `held` deletes our holder record and unlocks.
        let file = Arc::new(file);
        let held = HeldLock {
            inner: self.clone(),
            file: Some(file.clone()),
            id,
            term,
            record: stored_form({
                let mut record = req.holder(term);
                // Lets a reader tell whether this process is gone, and whether it can tell.
                record.process = crate::process::ProcessIdentity::current();
                record
            }),
        };
        self.write_holder(&held.record)?;
        *lock(&self.live) = Some(Live { term, id, file });
        tracing::debug!(lock = %self.name, term, "acquired the file lock");
        Ok(held)
    }

    /// `max(highest readable stored term + 1, wall-clock µs)`.
    pub(super) fn next_term(&self, file: &File) -> Result<u64, Error> {
        let mut stored = 0u64;
        match read_term(file) {
            Ok(Ok(t)) => stored = stored.max(t.unwrap_or(0)),
            Ok(Err(problem)) => tracing::warn!(
                lock = %self.name,
                path = %self.paths.lock.display(),
                problem,
                "corrupt term in the lock file; using the holder record, the state values and \
                 the wall clock instead"
            ),
            Err(e) => tracing::warn!(
                lock = %self.name,
                path = %self.paths.lock.display(),
                error = %e,
                "cannot read the term from the lock file; using the holder record, the state \
                 values and the wall clock instead"
            ),
        }
        match self.read_holder() {
            Ok(Record::Found(h)) => stored = stored.max(h.term),
            Ok(Record::Missing) => {}
            Ok(Record::Corrupt(problem)) => tracing::warn!(
                lock = %self.name,
                path = %self.paths.holder.display(),
                problem,
                "corrupt holder record; its term is not used"
            ),
            Err(e) => tracing::warn!(
                lock = %self.name,
                path = %self.paths.holder.display(),
                error = %e,
                "cannot read the holder record; its term is not used"
            ),
        }
        stored = stored.max(self.max_state_term());
        let next = stored.checked_add(1).ok_or_else(|| Error::Corrupt {
            backend: NAME,
            what: format!("term of lock {:?}", self.name),
            problem: "the stored term is u64::MAX and cannot be increased".to_owned(),
        })?;
        Ok(next.max(wall_micros()))
    }

    /// The highest term among the state values (only their headers are read).
    pub(super) fn max_state_term(&self) -> u64 {
        let Ok(entries) = fs::read_dir(&self.paths.state_dir) else {
            return 0;
        };
        let mut max = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(key) = name.to_str() else { continue };
            if validate_key(key).is_err() {
                continue;
            }
            let header = read_prefix(&entry.path(), MAX_STATE_HEADER)
                .map(|b| b.and_then(|b| parse_state_header(&b)));
            match header {
                Ok(Ok((term, _, _))) => max = max.max(term),
                Ok(Err(problem)) => tracing::warn!(
                    lock = %self.name,
                    key,
                    problem,
                    "corrupt state value; its term is not used"
                ),
                Err(e) => {
                    tracing::warn!(lock = %self.name, key, error = %e, "cannot read a state value");
                }
            }
        }
        max
    }
}
