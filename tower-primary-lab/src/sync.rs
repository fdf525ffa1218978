//! Poison-tolerant locking, in one place.
//!
//! Every critical section in this crate leaves its data consistent before anything in it can
//! panic (each one stores whole values, or pushes, clones or bumps), so the data behind a
//! poisoned lock is still consistent, and a panic in one test task must not hide what the others
//! saw.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, ignoring poison (see the module docs).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
