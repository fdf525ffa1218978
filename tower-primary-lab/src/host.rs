//! Simulated hosts: one PID namespace per host, so that processes on one machine can be told
//! apart the way processes on different machines are.
//!
//! Every process on one machine shares the kernel's boot id, so a backend that proves a
//! predecessor dead by its process identity (boot id, PID namespace, pid, start time) would take
//! every node for a neighbour. A [`SimulatedHost`] is a PID namespace of its own, with its own
//! `/proc` in a mount namespace of its own (`unshare --pid --fork --mount-proc`): a node started
//! in it sees its own pids, cannot signal or see the processes of another simulated host, and
//! finds `/proc/self` naming its own pid. Every process of one simulated host — replacements
//! included — is started in that namespace ([`SimulatedHost::command`] wraps the program in
//! `nsenter --target <init> --pid --mount`), so a node that replaces a dead one on the same host
//! can see that its predecessor is gone, and one on another host cannot.
//!
//! Needs root (or `CAP_SYS_ADMIN`) and util-linux's `unshare` and `nsenter`.
//!
//! **Pids.** A node in a simulated host has two pids: its own, inside the namespace (what
//! `getpid()` returns there, what a backend records), and the one the machine sees. The parent
//! signals the machine's pid. [`SimulatedHost::command`] sets [`NODE_ID_ENV`] to the pid of the
//! `nsenter` process the parent spawned, so the node reports itself under a pid the parent knows
//! (the [`Cluster`](super::node::Cluster) keys its nodes by that pid), and
//! [`SimulatedHost::node_pid`] finds the node's own process (the child of that `nsenter`) when a
//! signal must reach it.
//!
//! Used by the `chaos` and `failover_bench` examples (`--hosts`, `--successor-host`) and by
//! [`Cluster::spawn_node_on`](super::node::Cluster::spawn_node_on).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use tower_primary_lab::host::SimulatedHost;
//!
//! let host = SimulatedHost::start("host-b").await?;
//! let mut child = host.command("/bin/sh", ["-c", "echo $$"]).spawn()?;
//! child.wait().await?; // printed a pid of the host's own namespace (its init is 1)
//! # Ok(())
//! # }
//! ```

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The environment variable that tells a node which pid to report itself as (in its events and
/// its witness writes), when that differs from its own pid (a node in a [`SimulatedHost`]).
pub const NODE_ID_ENV: &str = "TOWER_PRIMARY_TEST_NODE_ID";

/// One simulated host: a PID namespace with its own `/proc`, whose init process lives as long as
/// this value. Dropping it kills the init, and with it (the kernel's rule for a namespace's init)
/// every process of the host.
#[derive(Debug)]
pub struct SimulatedHost {
    name: String,
    /// `unshare --fork --kill-child`: its child is the namespace's init.
    unshare: Child,
    /// The init's pid as this machine sees it.
    init: u32,
}

impl SimulatedHost {
    /// Starts a new PID namespace (with `unshare --pid --fork --mount-proc --kill-child`, an
    /// idle init) and waits until it is ready.
    ///
    /// # Errors
    ///
    /// When `unshare` is missing, not permitted (not root), or its init does not come up within
    /// 10 s.
    pub async fn start(name: impl Into<String>) -> std::io::Result<Self> {
        let name = name.into();
        let mut unshare = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "--",
                "sleep",
                "infinity",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let outer = unshare
            .id()
            .ok_or_else(|| std::io::Error::other("unshare exited at once"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // The init is ready once it runs `sleep`: `/proc` is mounted by then.
            if let Some(init) = first_child(outer)
                && std::fs::read_to_string(format!("/proc/{init}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            {
                return Ok(SimulatedHost {
                    name,
                    unshare,
                    init,
                });
            }
            if let Ok(Some(status)) = unshare.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = unshare.stderr.take() {
                    use tokio::io::AsyncReadExt as _;
                    let _ = e.read_to_string(&mut err).await;
                }
                return Err(std::io::Error::other(format!(
                    "unshare --pid --fork --mount-proc failed ({status}): {} (root needed)",
                    err.trim()
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(std::io::Error::other(
                    "the simulated host's init did not start within 10 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The host's name, as given.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pid of the host's init (pid 1 inside), as this machine sees it.
    #[must_use]
    pub fn init_pid(&self) -> u32 {
        self.init
    }

    /// The inode of the host's PID namespace (`/proc/<init>/ns/pid`), which names it.
    ///
    /// # Errors
    ///
    /// When the init is gone.
    pub fn pid_namespace(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(std::fs::metadata(format!("/proc/{}/ns/pid", self.init))?.ino())
    }

    /// A command that runs `program` with `args` inside this host: `nsenter --target <init>
    /// --pid --mount --wd=<current directory>`, through `sh`, which sets [`NODE_ID_ENV`] to the
    /// pid of the process that becomes `nsenter` (the pid `spawn` returns). `nsenter` waits for
    /// the program and exits as it did (with its status, or by the same signal); signals meant
    /// for the program go to [`node_pid`](Self::node_pid).
    #[must_use]
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let wd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "{NODE_ID_ENV}=$$; export {NODE_ID_ENV}; wd=$1; shift; \
                 exec nsenter --target \"$0\" --pid --mount --wd=\"$wd\" -- \"$@\""
            ))
            .arg(self.init.to_string())
            .arg(wd)
            .arg(program.as_ref())
            .args(args);
        cmd
    }

    /// The machine's pid of the program that `nsenter` process `nsenter_pid` (a command of
    /// [`command`](Self::command)) started, once it has; `None` before or after.
    #[must_use]
    pub fn node_pid(nsenter_pid: u32) -> Option<u32> {
        first_child(nsenter_pid)
    }
}

impl Drop for SimulatedHost {
    fn drop(&mut self) {
        // The init first: the kernel then kills everything in the namespace.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.init).unwrap_or(i32::MAX)),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.unshare.start_kill();
    }
}

/// The first child of `pid` (`/proc/<pid>/task/<pid>/children`).
fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command in a simulated host runs in the host's PID namespace, sees its own `/proc`,
    /// and is told the pid the parent knows it by.
    #[tokio::test]
    async fn a_command_runs_in_the_hosts_namespace_and_knows_its_outer_pid() {
        let Some(host) = crate::servers::require(
            "a simulated host (root, unshare)",
            SimulatedHost::start("t").await,
        ) else {
            return;
        };
        let script = format!(
            "echo ${NODE_ID_ENV}; readlink /proc/self/ns/pid; echo $$; \
             sh -c 'readlink /proc/self'"
        );
        let mut cmd = host.command("sh", ["-c", script.as_str()]);
        let child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let outer = child.id().unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], outer.to_string());
        let ns = format!("pid:[{}]", host.pid_namespace().unwrap());
        assert_eq!(lines[1], ns);
        let inner: u32 = lines[2].parse().unwrap();
        assert_ne!(inner, outer);
        assert!(inner < 100, "a fresh namespace's pid: {inner}");
        // `/proc` is the namespace's own: `/proc/self` names the process's own pid there.
        let own: u32 = lines[3].parse().unwrap();
        assert!(own > inner && own < 100, "{text}");
    }
}
