//! The core of `examples/status`: read a lock's holder record, check whether the holder's process
//! is alive (when it runs on this host), list the lock's candidate registry, and follow changes.
//! Works on any backend, through [`Lock::holder`], [`Lock::candidates`] and their watches (a
//! backend without a registry lists no candidates).

use std::fmt;
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tower_primary::backend::Candidate;
use tower_primary::backend::Lock;
use tower_primary::{Error, Holder};

/// What is known about the holder's process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Process {
    /// A process with the holder's pid runs on this host.
    Alive,
    /// No process with the holder's pid runs on this host: the record is stale (a lease backend
    /// keeps it until the lease runs out).
    Gone,
    /// The holder runs on another host: not checked.
    OtherHost,
    /// The check failed.
    Unknown(String),
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Process::Alive => f.write_str("alive (same host)"),
            Process::Gone => f.write_str("GONE: no such process on this host; the record is stale"),
            Process::OtherHost => f.write_str("not checked (another host)"),
            Process::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

/// This host's name, as `NodeId::from_env` records it.
pub(crate) fn this_host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Checks the holder's process with signal 0, when it runs on this host.
pub(crate) fn process_of(holder: &Holder) -> Process {
    if holder.host != this_host() {
        return Process::OtherHost;
    }
    let Ok(pid) = i32::try_from(holder.pid) else {
        return Process::Unknown(format!("pid {} out of range", holder.pid));
    };
    if pid <= 0 {
        return Process::Unknown(format!("pid {pid}"));
    }
    match kill(Pid::from_raw(pid), None) {
        // EPERM: the process exists but belongs to another user.
        Ok(()) | Err(Errno::EPERM) => Process::Alive,
        Err(Errno::ESRCH) => Process::Gone,
        Err(err) => Process::Unknown(err.to_string()),
    }
}

/// A lock's status at one instant.
#[derive(Clone, Debug)]
pub(crate) struct Status {
    pub(crate) lock: String,
    pub(crate) holder: Option<Holder>,
    /// The holder's process; `None` without a holder.
    pub(crate) process: Option<Process>,
    /// The lock's candidate registry, highest priority first.
    pub(crate) candidates: Vec<Candidate>,
}

impl Status {
    /// What `--watch` compares to decide whether to print again.
    pub(crate) fn key(&self) -> (Option<(String, u64)>, Option<Process>, Vec<Candidate>) {
        (
            self.holder.as_ref().map(|h| (h.id.clone(), h.term)),
            self.process.clone(),
            self.candidates.clone(),
        )
    }

    /// The registry as a table, the holder's entry marked with `*`.
    fn write_candidates(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.candidates.is_empty() {
            return writeln!(f, "candidates none registered");
        }
        writeln!(f, "candidates {}", self.candidates.len())?;
        let width = self
            .candidates
            .iter()
            .map(|c| c.node.len())
            .max()
            .unwrap_or(0)
            .max(4);
        writeln!(
            f,
            "    {:width$}  priority  ready  draining  yielded",
            "node"
        )?;
        let holder = self.holder.as_ref().map(|h| h.id.as_str());
        for c in &self.candidates {
            let mark = if Some(c.node.as_str()) == holder {
                '*'
            } else {
                ' '
            };
            let yes = |b: bool| if b { "yes" } else { "no" };
            writeln!(
                f,
                "  {mark} {:width$}  {:>8}  {:5}  {:8}  {}",
                c.node,
                c.priority,
                yes(c.ready),
                yes(c.draining),
                yes(c.yielded)
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "lock     {}", self.lock)?;
        let Some(h) = &self.holder else {
            writeln!(f, "holder   none (no primary)")?;
            return self.write_candidates(f);
        };
        write!(f, "holder   {} (host {}, pid {}", h.id, h.host, h.pid)?;
        if let Some(w) = h.worker {
            write!(f, ", worker {w}")?;
        }
        writeln!(f, ")")?;
        writeln!(f, "term     {}", h.term)?;
        let ago = SystemTime::now()
            .duration_since(h.since)
            .map(|d| Duration::from_secs(d.as_secs()))
            .unwrap_or_default();
        writeln!(
            f,
            "since    {} ({} ago)",
            humantime::format_rfc3339_millis(h.since),
            humantime::format_duration(ago)
        )?;
        if let Some(url) = &h.url {
            writeln!(f, "url      {url}")?;
        }
        if let Some(ms) = h.lease_ms {
            writeln!(f, "lease    {ms} ms")?;
        }
        if let Some(p) = &self.process {
            writeln!(f, "process  {p}")?;
        }
        self.write_candidates(f)
    }
}

/// Reads the status of `lock` (named `name`) now.
pub(crate) async fn probe(lock: &dyn Lock, name: &str) -> Result<Status, Error> {
    let holder = lock.holder().await?;
    let process = holder.as_ref().map(process_of);
    let mut candidates = lock.candidates().await?;
    candidates.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.node.cmp(&b.node)));
    Ok(Status {
        lock: name.to_owned(),
        holder,
        process,
        candidates,
    })
}

/// Calls `each` with the status now, then again whenever the holder (id or term), its
/// process's state or the candidate registry changes. Woken by the backend's holder and registry
/// notifications; the process (and a registrant's death a backend reports late) is re-checked
/// every `recheck`. Returns only on a backend error, or when `each` says stop.
pub(crate) async fn follow(
    lock: &dyn Lock,
    name: &str,
    recheck: Duration,
    mut each: impl FnMut(&Status) -> bool,
) -> Result<(), Error> {
    // Subscribe first, then read: no change in between is lost.
    let mut changes = lock.watch_holder().await?;
    let mut registry = lock.watch_candidates().await?;
    let mut last = None;
    loop {
        let status = probe(lock, name).await?;
        let key = status.key();
        if last.as_ref() != Some(&key) {
            if !each(&status) {
                return Ok(());
            }
            last = Some(key);
        }
        tokio::select! {
            res = changes.changed() => res?,
            res = registry.changed() => res?,
            () = tokio::time::sleep(recheck) => {}
        }
    }
}
