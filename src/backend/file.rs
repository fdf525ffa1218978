//! File backend (stub, being written).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{Backend, Lock};
use crate::error::ConfigError;

/// Locks in a directory (stub).
#[derive(Clone, Debug)]
pub struct FileLock {
    dir: PathBuf,
}

impl FileLock {
    /// Locks in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileLock { dir: dir.into() }
    }
}

impl Backend for FileLock {
    fn name(&self) -> &'static str {
        "file"
    }
    fn min_lease(&self) -> Option<Duration> {
        None
    }
    fn lock(&self, _name: &str) -> Result<Arc<dyn Lock>, ConfigError> {
        Err(ConfigError::LockDir { path: self.dir.clone(), problem: "not implemented".into() })
    }
}
