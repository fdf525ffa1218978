//! Unit tests of the file backend: directory checks, handovers, cancelled and stalled
//! operations, damaged records, terms, the holder record and state values, the candidate
//! registry and reservations.

use std::future::Future;
use std::time::Instant;

use futures_util::FutureExt as _;

use super::*;
use crate::role::NodeId;

mod dir;
mod disk;
mod grant;
mod inode;
mod records;
mod registry;
mod reserve;
mod waiter;

pub(super) use disk::SlowDisk;

const PATIENCE: Duration = Duration::from_secs(10);

fn req(id: &str) -> AcquireRequest {
    AcquireRequest::new(NodeId::new(id))
}

fn open(dir: &Path, name: &str) -> DirLock {
    FileBackend::new(dir).open(name).unwrap()
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Waits until a test counter reaches `n`.
async fn counted(tx: &watch::Sender<u64>, n: u64, what: &str) {
    let mut rx = tx.subscribe();
    within(what, rx.wait_for(|v| *v >= n)).await.unwrap();
}

fn lock_dir_problem(result: Result<Arc<dyn Lock>, ConfigError>) -> String {
    match result {
        Err(ConfigError::LockDir { problem, .. }) => problem,
        other => panic!("expected a lock directory error, got {other:?}"),
    }
}

/// Captures warnings, also from the acquiring thread (it inherits the dispatcher).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }
}
