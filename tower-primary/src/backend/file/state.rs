//! State values: loads, and stores checked against the live term.

use super::*;

impl Inner {
    pub(super) fn load(&self, key: &str) -> Result<Option<Stored>, Error> {
        self.disk("load");
        match self.read_state(key) {
            Ok(Record::Found(s)) => Ok(Some(s)),
            Ok(Record::Missing) => Ok(None),
            Ok(Record::Corrupt(problem)) => {
                tracing::warn!(
                    lock = %self.name,
                    key,
                    problem,
                    "corrupt state value; the next store replaces it"
                );
                Err(Error::Corrupt {
                    backend: NAME,
                    what: format!(
                        "state value {key:?} of lock {:?} ({})",
                        self.name,
                        self.state_path(key).display()
                    ),
                    problem,
                })
            }
            Err(e) => Err(self.io(
                format!(
                    "cannot read the state value {}",
                    self.state_path(key).display()
                ),
                e,
            )),
        }
    }

    pub(super) fn store(self: &Arc<Self>, key: &str, value: &[u8], term: u64) -> Result<(), Error> {
        if value.len() > MAX_STATE_VALUE {
            return Err(Error::ValueTooLarge {
                backend: NAME,
                key: key.to_owned(),
                size: value.len() as u64,
                max: MAX_STATE_VALUE as u64,
            });
        }
        // The guard keeps the lock held until the write is done, so a write that passed the
        // check finishes before any other term can hold the lock.
        let (guard, live_term) = match self.write_guard(term) {
            Ok(guard) => (Some(guard), None),
            Err(live_term) => (None, live_term),
        };
        let holds = guard.as_ref().is_some_and(|g| {
            let holds = self.path_names(g.id);
            if !holds {
                tracing::warn!(lock = %self.name, term, "the lock file was deleted or replaced; refusing the state write");
            }
            holds
        });
        let stored = match self.read_state(key) {
            Ok(Record::Found(s)) => Some(s.term),
            Ok(Record::Missing) => None,
            Ok(Record::Corrupt(problem)) => {
                tracing::warn!(lock = %self.name, key, problem, "corrupt state value; it is overwritten");
                None
            }
            Err(e) => {
                return Err(self.io(
                    format!(
                        "cannot read the state value {}",
                        self.state_path(key).display()
                    ),
                    e,
                ));
            }
        };
        let newer = stored.filter(|t| *t > term);
        if !holds || newer.is_some() {
            return Err(Error::StaleTerm {
                lock: self.name.clone(),
                term,
                current: newer.or(live_term),
            });
        }
        self.disk("store");
        ensure_state_dir(&self.paths.state_dir).map_err(|e| {
            self.io(
                format!(
                    "cannot create the state directory {}",
                    self.paths.state_dir.display()
                ),
                e,
            )
        })?;
        let written = write_atomic(
            &self.paths.state_dir,
            OsStr::new(key),
            &encode_state(value, term),
            true,
        )
        .map_err(|e| {
            self.io(
                format!(
                    "cannot write the state value {}",
                    self.state_path(key).display()
                ),
                e,
            )
        });
        drop(guard);
        written
    }
}
