//! Which process holds a lock, precisely enough to tell later whether it is gone:
//! [`ProcessIdentity`].
//!
//! A pid alone is not enough: pids are reused, PID namespaces (containers) number their
//! processes from 1, and two hosts share nothing. A [`ProcessIdentity`] adds the kernel's boot id,
//! the PID namespace and the process's start time, so that a node on the **same host** can prove
//! that another node's process has ended ([`ProcessIdentity::wait_gone`]). Backends record it in
//! the [`Holder`](crate::Holder) record; a successor that finds its predecessor's process gone
//! may skip waiting for it.
//!
//! Linux only (it reads `/proc`); elsewhere [`ProcessIdentity::current`] is `None`, and nothing
//! is ever certified gone.
//!
//! # Examples
//!
//! ```
//! use tower_primary::process::ProcessIdentity;
//!
//! if let Some(me) = ProcessIdentity::current() {
//!     assert_eq!(me.pid, std::process::id());
//!     // This process is running: it is not gone.
//!     assert!(me.same_host(&me));
//!     assert!(!me.is_gone());
//! }
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One process on one running kernel, as stored in a holder record:
/// `{"boot_id", "pid_ns", "pid", "start_time"}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProcessIdentity {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): new at every boot.
    pub boot_id: String,
    /// The inode of the process's PID namespace (`/proc/self/ns/pid`).
    pub pid_ns: u64,
    /// The process id, as seen in that namespace.
    pub pid: u32,
    /// The process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`), so
    /// that a reused pid is not mistaken for the same process.
    pub start_time: u64,
}

impl ProcessIdentity {
    /// This process, or `None` where `/proc` cannot tell (not Linux, `/proc` not mounted).
    #[must_use]
    pub fn current() -> Option<Self> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let pid = std::process::id();
        let (start_time, _) = stat_of(pid)?;
        Some(ProcessIdentity {
            boot_id: boot_id.trim().to_owned(),
            pid_ns: own_pid_ns()?,
            pid,
            start_time,
        })
    }

    /// Whether `other` ran on this process's host, where its pid means the same process: the
    /// same boot id and PID namespace, and this process's `/proc` belongs to its own PID
    /// namespace (`/proc/self` names this process's pid; a `/proc` mounted for another namespace
    /// would show other processes under the same numbers). The host name is never used.
    #[must_use]
    pub fn same_host(&self, other: &ProcessIdentity) -> bool {
        self.boot_id == other.boot_id && self.pid_ns == other.pid_ns && proc_is_own()
    }

    /// Whether this process has ended, as seen from a process on the same host (check
    /// [`same_host`](Self::same_host) first): no process has its pid (`kill(pid, 0)` fails with
    /// `ESRCH`), the pid now names a process that started at another time, or it is a zombie.
    /// `false` whenever that cannot be told.
    #[must_use]
    pub fn is_gone(&self) -> bool {
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        if pid <= 0 {
            return false;
        }
        let pid = nix::unistd::Pid::from_raw(pid);
        if nix::sys::signal::kill(pid, None) == Err(nix::errno::Errno::ESRCH) {
            return true;
        }
        match stat_of(self.pid) {
            Some((start_time, state)) => start_time != self.start_time || state == 'Z',
            // The process went between kill(2) and the read.
            None => nix::sys::signal::kill(pid, None) == Err(nix::errno::Errno::ESRCH),
        }
    }

    /// Waits up to `within` for this process to end ([`is_gone`](Self::is_gone), checked every
    /// millisecond); `true` once it has. A killed process closes its sockets before it has
    /// finished exiting, so a server may report it gone a moment before the kernel does.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn wait_gone(&self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        loop {
            if self.is_gone() {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The inode of this process's PID namespace.
fn own_pid_ns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Whether `/proc` shows this process's PID namespace.
fn proc_is_own() -> bool {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse::<u32>().ok()))
        == Some(std::process::id())
}

/// The start time and state of `pid`, from `/proc/<pid>/stat`.
fn stat_of(pid: u32) -> Option<(u64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Field 3 (state) and field 22 (start time) of a `stat` line; the command (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(u64, char)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), field 22 is the 19th.
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_records_carry_the_process_and_the_release_mark_optionally() {
        // A record of an older version: no process, not released.
        let old = r#"{"id":"a","host":"h","pid":7,"worker":null,"url":null,"term":3,
            "since":"2026-12-06T05:00:00.000Z","lease_ms":null}"#;
        let h: crate::Holder = serde_json::from_str(old).unwrap();
        assert_eq!((&h.process, h.released), (&None, false));
        // Without them, a record is written as before.
        let json = serde_json::to_value(&h).unwrap();
        assert!(json.get("process").is_none() && json.get("released").is_none());
        let mut h = h;
        h.process = Some(ProcessIdentity {
            boot_id: "b".to_owned(),
            pid_ns: 4_026_531_836,
            pid: 7,
            start_time: 99,
        });
        h.released = true;
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(json["process"]["pid_ns"], 4_026_531_836_u64);
        assert_eq!(json["released"], true);
        let back: crate::Holder = serde_json::from_value(json).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn stat_lines_are_read_after_the_command() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(line), Some((98765, 'S')));
        assert_eq!(parse_stat("42 (x) Z"), None);
    }

    #[test]
    fn a_reaped_child_is_gone_and_a_live_one_is_not() {
        let Some(me) = ProcessIdentity::current() else {
            return;
        };
        assert!(!me.is_gone());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let (start_time, _) = stat_of(child.id()).unwrap();
        let id = ProcessIdentity {
            pid: child.id(),
            start_time,
            ..me.clone()
        };
        assert!(me.same_host(&id));
        assert!(!id.is_gone());
        // Another start time under the same pid: a reused pid.
        let reused = ProcessIdentity {
            start_time: start_time + 1,
            ..id.clone()
        };
        assert!(reused.is_gone());
        child.kill().unwrap();
        // A zombie (not yet reaped) is gone already.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(rt.block_on(id.wait_gone(Duration::from_secs(5))));
        child.wait().unwrap();
        assert!(id.is_gone());
        let other_boot = ProcessIdentity {
            boot_id: "another".to_owned(),
            ..me
        };
        assert!(!other_boot.same_host(&id));
    }
}
