//! The default store: folders and logs under `--state-dir` (one host, or a shared volume).
//!
//! `outbox/<id>.json` (queued), `sent/<id>.eml` (delivered), `failed/<id>.json`,
//! `deliveries.log` (`<id> term=<t> pid=<p> message-id=<…>`), `reports/<slot>.txt` and
//! `runs.log` (`report <slot> term=… pid=… start=… end=…`). The folders are made by every process
//! at start-up. Writes are not fenced by the store: the jobs check their term just before each
//! write (a stale primary of one host stops within the backend's fencing bound).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tower_primary::{BoxError, TermContext};

use super::super::{Dirs, append_line, remove_stale_tmp, write_atomic};
use super::{Counts, QueueError, Queued, ReportRecord};

/// The migration's version.
pub(crate) const MIGRATION: &str = "state-folders-v1";
/// How often the sender looks at the outbox when it is empty.
pub(crate) const POLL: Duration = Duration::from_millis(200);

/// The folders under `--state-dir`.
#[derive(Clone)]
pub(crate) struct FileStore {
    dirs: Dirs,
    /// `--simulate-work`: half of it is spent between recording a delivery and removing the
    /// email from the outbox (the window in which a crash makes it go out again).
    simulate_work: Duration,
}

impl FileStore {
    /// Makes the folders (every process, at start-up).
    pub(crate) async fn open(dirs: Dirs, simulate_work: Duration) -> std::io::Result<Self> {
        for dir in [dirs.outbox(), dirs.sent(), dirs.failed(), dirs.reports()] {
            tokio::fs::create_dir_all(dir).await?;
        }
        Ok(FileStore {
            dirs,
            simulate_work,
        })
    }

    /// Nothing to prepare any more: every process makes the folders at start-up. (The job
    /// stays, so that readiness means the same with either store.)
    pub(crate) async fn migrate(&self, ctx: &TermContext) -> Result<(), BoxError> {
        tracing::info!(
            "migration done version={MIGRATION} term={} pid={}",
            ctx.term(),
            std::process::id()
        );
        Ok(())
    }

    /// The folders exist (a deleted state folder makes the worker unready).
    pub(crate) async fn check(&self) -> Result<(), String> {
        for dir in [self.dirs.outbox(), self.dirs.sent()] {
            tokio::fs::metadata(&dir)
                .await
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(())
    }

    pub(crate) async fn queue(&self, email: &Queued) -> Result<(), QueueError> {
        let bytes = serde_json::to_vec(email).map_err(|e| QueueError::Other(e.to_string()))?;
        write_atomic(&self.path(&email.id), &bytes)
            .await
            .map_err(|e| QueueError::Other(e.to_string()))
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dirs.outbox().join(format!("{id}.json"))
    }

    /// The queued emails, oldest first; an unreadable one as `Err((id, why))`.
    pub(crate) async fn pending(&self) -> std::io::Result<Vec<Result<Queued, (String, String)>>> {
        let mut ids = Vec::new();
        let mut entries = tokio::fs::read_dir(self.dirs.outbox()).await?;
        while let Some(entry) = entries.next_entry().await? {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !id.starts_with('.') {
                ids.push(id.to_owned());
            }
        }
        ids.sort_by(|a, b| id_order(a).cmp(&id_order(b)));
        let mut found = Vec::new();
        for id in ids {
            match tokio::fs::read(self.path(&id)).await {
                Ok(bytes) => found.push(
                    serde_json::from_slice(&bytes).map_err(|e| (id, format!("unreadable: {e}"))),
                ),
                // Another term removed it after delivering it: nothing to do.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        Ok(found)
    }

    /// Appends to `deliveries.log`, then removes the email from the outbox.
    pub(crate) async fn delivered(
        &self,
        term: u64,
        id: &str,
        message_id: &str,
    ) -> std::io::Result<()> {
        append_line(
            &self.dirs.deliveries_log(),
            &format!(
                "{id} term={term} pid={} message-id={message_id}",
                std::process::id()
            ),
        )
        .await?;
        // Delivered is delivered: finish even if the term ends meanwhile.
        let half = self.simulate_work / 2;
        if !half.is_zero() {
            tokio::time::sleep(half).await;
        }
        remove(&self.path(id)).await
    }

    /// Moves an email that can never be sent to `failed/`.
    pub(crate) async fn give_up(&self, id: &str) -> std::io::Result<()> {
        tokio::fs::rename(self.path(id), self.dirs.failed().join(format!("{id}.json"))).await
    }

    /// Whether `runs.log` records a scheduled run of `slot`.
    pub(crate) async fn report_done(&self, slot: &str) -> std::io::Result<bool> {
        let text = match tokio::fs::read_to_string(self.dirs.runs_log()).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(text.lines().any(|line| {
            let mut words = line.split(' ');
            words.next() == Some("report")
                && words.next() == Some(slot)
                && !line.ends_with(" manual=true")
        }))
    }

    /// Writes `reports/<slot>.txt`, then appends the run to `runs.log`.
    pub(crate) async fn record_report(&self, run: &ReportRecord<'_>) -> std::io::Result<()> {
        // Only the primary's report job writes reports/, one run at a time.
        remove_stale_tmp(&self.dirs.reports()).await;
        let slot = run.slot;
        let name = if run.manual {
            format!("{slot}-manual.txt")
        } else {
            format!("{slot}.txt")
        };
        write_atomic(&self.dirs.reports().join(name), run.body.as_bytes()).await?;
        let mut line = format!(
            "report {slot} term={} pid={} start={} end={}",
            run.term,
            std::process::id(),
            run.start_ns,
            run.end_ns
        );
        if run.manual {
            line.push_str(" manual=true");
        }
        append_line(&self.dirs.runs_log(), &line).await
    }

    pub(crate) async fn counts(&self) -> Counts {
        Counts {
            queued: count(&self.dirs.outbox(), ".json").await,
            sent: count(&self.dirs.sent(), ".eml").await,
            failed: count(&self.dirs.failed(), ".json").await,
        }
    }
}

async fn remove(path: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_file(path).await {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Sorts ids `<micros>-<pid>-<seq>-<random>` by time, then pid and sequence.
fn id_order(id: &str) -> (u128, u32, u64, &str) {
    let mut parts = id.split('-');
    let mut next = || parts.next().unwrap_or("");
    (
        next().parse().unwrap_or(u128::MAX),
        next().parse().unwrap_or(u32::MAX),
        next().parse().unwrap_or(u64::MAX),
        id,
    )
}

/// How many files in `dir` end with `ext` (hidden temporary files left out).
pub(crate) async fn count(dir: &Path, ext: &str) -> u64 {
    let mut n = 0;
    if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(e)) = entries.next_entry().await {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(ext) && !name.starts_with('.') {
                n += 1;
            }
        }
    }
    n
}
