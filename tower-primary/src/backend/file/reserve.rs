//! Reservations: `<dir>/<name>.reserved` names the node that the holder hands the lock to.
//!
//! - **Reserve**: the holder writes the record atomically (temporary file, `rename`) while it
//!   holds the lock with that term, checked like a state write: `{node, until_ns, term, boot}`,
//!   `until_ns` on this host's `CLOCK_BOOTTIME` and `boot` the kernel's boot id, so a record of
//!   an earlier boot (whose clock started again) reads as expired.
//! - **Grant**: the waiter thread reads the record while it holds the `flock`, so no holder can
//!   write it meanwhile. A live reservation for another node: it unlocks at once, gives the
//!   acquire back to the queue, and waits for the record to change (inotify on the lock
//!   directory) or to expire, then waits in `flock` again: never a `flock` loop. The reserved
//!   node, or anybody once the record expired, deletes it and takes the lock under a new term.

use serde::{Deserialize, Serialize};

use super::*;

/// A larger reservation record is corrupt.
const MAX_RESERVATION_BYTES: u64 = 4096;

/// The reservation record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Reservation {
    pub(super) node: String,
    /// `CLOCK_BOOTTIME` nanoseconds at which it runs out.
    pub(super) until_ns: u64,
    /// The term that wrote it.
    pub(super) term: u64,
    /// The kernel's boot id when written.
    #[serde(default)]
    pub(super) boot: String,
}

/// The kernel's boot id, read once; empty where it cannot be read.
pub(super) fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
}

fn boot_now() -> u64 {
    crate::Clock::system().now().as_nanos()
}

impl Reservation {
    /// How long it still runs; `None` once it ran out (or it is of another boot).
    pub(super) fn remaining(&self) -> Option<Duration> {
        let now = boot_now();
        (self.boot == boot_id() && now < self.until_ns)
            .then(|| Duration::from_nanos(self.until_ns - now))
    }
}

fn parse_reservation(bytes: &[u8]) -> Result<Reservation, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

impl Inner {
    fn read_reservation(&self) -> io::Result<Record<Reservation>> {
        read_record(
            &self.paths.reserved,
            MAX_RESERVATION_BYTES,
            parse_reservation,
        )
    }

    /// Writes the reservation for `node`, if `term` holds the lock on the file `id` through this
    /// object. Blocking file I/O.
    pub(super) fn write_reservation(
        self: &Arc<Self>,
        term: u64,
        id: FileId,
        node: &str,
        window: Duration,
    ) -> Result<(), Error> {
        let guard = self.write_guard(term).map_err(|current| Error::StaleTerm {
            lock: self.name.clone(),
            term,
            current,
        })?;
        if guard.id != id || !self.path_names(guard.id) {
            return Err(Error::Lost {
                lock: self.name.clone(),
                reason: format!(
                    "the lock file {} was deleted or replaced; refusing the reservation",
                    self.paths.lock.display()
                ),
            });
        }
        let record = Reservation {
            node: node.to_owned(),
            until_ns: boot_now()
                .saturating_add(u64::try_from(window.as_nanos()).unwrap_or(u64::MAX)),
            term,
            boot: boot_id().to_owned(),
        };
        let json = serde_json::to_vec(&record)
            .map_err(|e| Error::backend(NAME, "cannot encode the reservation", e))?;
        // Not fsynced: a reservation does not outlive its boot.
        let written = write_atomic(&self.paths.dir, &self.paths.reserved_file, &json, false)
            .map_err(|e| {
                self.io(
                    format!(
                        "cannot write the reservation {}",
                        self.paths.reserved.display()
                    ),
                    e,
                )
            });
        drop(guard);
        tracing::debug!(lock = %self.name, term, node, ?window, "reserved the lock");
        written
    }

    /// While holding the lock for `req`: the live reservation for another node, if there is
    /// one. A reservation for `req`'s node, an expired or a damaged one is `None`.
    pub(super) fn reserved_for_another(&self, req: &AcquireRequest) -> Option<Reservation> {
        match self.read_reservation() {
            Ok(Record::Found(r)) if r.node != req.node.id() && r.remaining().is_some() => Some(r),
            Ok(Record::Corrupt(problem)) => {
                tracing::warn!(lock = %self.name, path = %self.paths.reserved.display(), problem, "corrupt reservation record; ignored");
                None
            }
            Err(e) => {
                tracing::warn!(lock = %self.name, path = %self.paths.reserved.display(), error = %e, "cannot read the reservation record; ignored");
                None
            }
            _ => None,
        }
    }

    /// While holding the lock under a new term: deletes the reservation (consumed, expired or
    /// damaged).
    pub(super) fn consume_reservation(&self) {
        match fs::remove_file(&self.paths.reserved) {
            Ok(()) => tracing::debug!(lock = %self.name, "consumed the reservation"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(lock = %self.name, error = %e, "cannot delete the reservation record");
            }
        }
    }

    /// After giving a grant back because of `reserved`: waits (on the waiter thread) until the
    /// record changes or runs out, or no acquire waits any more.
    pub(super) fn await_reservation(&self, reserved: &Reservation) {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let name = self.paths.reserved_file.clone();
        let tx = Mutex::new(tx);
        let handler: super::inotify::Handler = Arc::new(move |res| {
            let touched = match res {
                Ok(event) => {
                    event.need_rescan()
                        || (!event.kind.is_access()
                            && event
                                .paths
                                .iter()
                                .any(|p| p.file_name() == Some(name.as_os_str())))
                }
                Err(_) => true,
            };
            if touched {
                let _ = lock(&tx).send(());
            }
        });
        // Subscribed before the record is read again: no change in between is missed.
        let subscription = super::inotify::subscribe(&self.paths.dir, handler)
            .map_err(|e| {
                tracing::warn!(lock = %self.name, error = %e, "cannot watch the reservation record; checking it every 50 ms");
            })
            .ok();
        loop {
            match self.read_reservation() {
                Ok(Record::Found(now)) if now == *reserved => {}
                _ => return,
            }
            let Some(remaining) = reserved.remaining() else {
                return;
            };
            if !self.anyone_waiting() {
                return;
            }
            let poll = if subscription.is_some() {
                SAFETY_NET
            } else {
                Duration::from_millis(50)
            };
            // A timeout re-checks whether anybody still waits, and the expiry.
            let _ = rx.recv_timeout(remaining.min(poll));
        }
    }
}

impl FileLeadership {
    pub(super) async fn reserve_for(&mut self, node: &str, window: Duration) -> Result<(), Error> {
        if let Some(reason) = &self.lost {
            return Err(Error::Lost {
                lock: self.held.inner.name.clone(),
                reason: reason.clone(),
            });
        }
        let inner = self.held.inner.clone();
        let (term, id, node) = (self.held.term, self.held.id, node.to_owned());
        blocking("writes the reservation", move || {
            inner.write_reservation(term, id, &node, window)
        })
        .await
    }
}
