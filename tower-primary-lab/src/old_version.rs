//! The node binary of an older commit of this repository, for mixed-version tests: a rolling
//! upgrade runs old and new nodes on one lock, and a test proves that they never give two
//! primaries and that terms never fall.
//!
//! [`OldVersion::build`] checks the commit out once as a detached git worktree
//! (`<dir>/<commit>`, next to the build's target directory), builds its node entry
//! (`cargo build --all-features --locked --example failover_bench`, an example whose `main`
//! becomes a node in node mode, see [`node`](crate::node)) with a target directory of its
//! own (`<dir>/target`, so the old build's binaries never replace the current ones), and returns
//! the executable as an [`OldBuild`]. Its [`node_command`](OldBuild::node_command) goes to
//! [`Cluster::spawn_node_running`](crate::node::Cluster::spawn_node_running), beside
//! nodes of the current code: both speak the same node protocol (environment in, `EVENT` lines
//! out), which has not changed since 0.1.0.
//!
//! The worktree and the old target directory are kept and reused: the first build of a commit
//! compiles every dependency (minutes), later ones only check that nothing changed (seconds).
//! Within one process the build runs once (later callers get the cached result); between the
//! processes of one test run it runs once too, under a file lock (`<dir>/<commit>.lock`); the
//! build's output goes to `<dir>/<commit>.build.log`.
//!
//! A checkout without git or without the commit (a source tarball, a shallow clone) cannot build
//! an old version: [`OldVersionError::Unavailable`]. [`OldVersion::require`] then skips loudly,
//! as [`servers::require`](crate::servers::require) does for a missing server, or fails
//! under `TOWER_PRIMARY_REQUIRE_BACKENDS=1`. A failed build is [`OldVersionError::Build`], never a
//! skip.
//!
//! ```no_run
//! # async fn t() {
//! use std::path::Path;
//! use tower_primary_lab::node::{Cluster, NodeCommand, NodeConfig};
//! use tower_primary_lab::old_version::OldVersion;
//!
//! // The repository of this checkout; old versions next to its builds (an integration test
//! // finds its target directory as the parent of `env!("CARGO_TARGET_TMPDIR")`).
//! let old = OldVersion::new("be74ccc", env!("CARGO_MANIFEST_DIR"))
//!     .dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/old-versions"));
//! let Some(old) = old.require().await else {
//!     return; // skipped, loudly: no git or no such commit here
//! };
//! let config = NodeConfig::new("redis://127.0.0.1:6379?prefix=doc", "jobs");
//! let mut cluster = Cluster::new(NodeCommand::test_entry("node_entry").unwrap(), config.clone());
//! let old_pid = cluster.spawn_node_running(&old.node_command(), &config).unwrap();
//! let new_pid = cluster.spawn_node().unwrap();
//! # }
//! ```

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::node::NodeCommand;
use crate::sync::lock;

/// The example that is the node entry of 0.1.0: its `main` runs a node when
/// `TOWER_PRIMARY_TEST_NODE=1` ([`node`](crate::node)).
pub const NODE_EXAMPLE: &str = "failover_bench";

/// Why an old version could not be had.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum OldVersionError {
    /// This checkout cannot provide the commit: no `git`, not a git repository, or the commit is
    /// missing. Tests skip (loudly).
    #[error("{0}")]
    Unavailable(String),
    /// The commit is there but checking it out or building it failed.
    #[error("{0}")]
    Build(String),
}

/// An older commit of this repository whose node binary a test wants.
#[derive(Clone, Debug)]
pub struct OldVersion {
    commit: String,
    repo: PathBuf,
    dir: Option<PathBuf>,
    example: String,
}

/// A built old version: the commit and its node executable.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OldBuild {
    /// The commit (full hash).
    pub commit: String,
    /// The node executable (the example, under the old target directory).
    pub program: PathBuf,
    /// How long the checkout and build took in the call that did them (zero for a result
    /// cached in this process).
    pub took: Duration,
}

impl OldBuild {
    /// A [`NodeCommand`] that runs the old node.
    #[must_use]
    pub fn node_command(&self) -> NodeCommand {
        NodeCommand::new(&self.program)
    }
}

type Cache = Mutex<HashMap<(PathBuf, String, String), Arc<Mutex<Option<OldBuild>>>>>;

impl OldVersion {
    /// The commit `commit` (a hash, a tag, anything `git rev-parse` takes) of the repository
    /// that contains `repo` (a directory inside the checkout, usually `CARGO_MANIFEST_DIR`).
    /// Old versions live in `<repo root>/target/old-versions` unless [`dir`](Self::dir) says
    /// otherwise; the node entry is [`NODE_EXAMPLE`].
    #[must_use]
    pub fn new(commit: impl Into<String>, repo: impl Into<PathBuf>) -> Self {
        OldVersion {
            commit: commit.into(),
            repo: repo.into(),
            dir: None,
            example: NODE_EXAMPLE.to_owned(),
        }
    }

    /// Where the worktrees, the old target directory, the lock and the logs live.
    #[must_use]
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// The example that is the old commit's node entry (default [`NODE_EXAMPLE`]).
    #[must_use]
    pub fn example(mut self, name: impl Into<String>) -> Self {
        self.example = name.into();
        self
    }

    /// Checks the commit out and builds its node entry, once per process and once between the
    /// processes of a run (see the [module docs](self)). Blocks for as long as the build takes:
    /// in async code use [`build`](Self::build).
    ///
    /// # Errors
    ///
    /// [`OldVersionError::Unavailable`] when git or the commit is missing;
    /// [`OldVersionError::Build`] when the checkout or the build fails (with the end of the
    /// build's log).
    pub fn build_blocking(&self) -> Result<OldBuild, OldVersionError> {
        static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
        let key = (self.repo.clone(), self.commit.clone(), self.example.clone());
        let slot = lock(CACHE.get_or_init(Cache::default))
            .entry(key)
            .or_default()
            .clone();
        // One build at a time per version in this process; the others wait and reuse it.
        let mut slot = lock(&slot);
        if let Some(built) = &*slot {
            return Ok(OldBuild {
                took: Duration::ZERO,
                ..built.clone()
            });
        }
        let built = self.checkout_and_build()?;
        *slot = Some(built.clone());
        Ok(built)
    }

    /// [`build_blocking`](Self::build_blocking) on tokio's blocking pool.
    ///
    /// # Errors
    ///
    /// As [`build_blocking`](Self::build_blocking).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub async fn build(&self) -> Result<OldBuild, OldVersionError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build_blocking())
            .await
            .unwrap_or_else(|e| Err(OldVersionError::Build(format!("the build panicked: {e}"))))
    }

    /// [`build`](Self::build) for a test: `None` after a loud `SKIPPED` message when this
    /// checkout cannot provide the commit ([`servers::require`](crate::servers::require),
    /// which fails instead under `TOWER_PRIMARY_REQUIRE_BACKENDS=1`).
    ///
    /// # Panics
    ///
    /// When the build fails, or the commit is unavailable and backends are required.
    pub async fn require(&self) -> Option<OldBuild> {
        match self.build().await {
            Err(e @ OldVersionError::Unavailable(_)) => crate::servers::require::<OldBuild, _>(
                &format!("tower-primary at {}", self.commit),
                Err(e),
            ),
            // A checkout that has the commit but cannot build it is broken: never a skip.
            built => Some(built.unwrap_or_else(|e| panic!("{e}"))),
        }
    }

    fn checkout_and_build(&self) -> Result<OldBuild, OldVersionError> {
        let start = Instant::now();
        let unavailable = OldVersionError::Unavailable;
        let root = git(&self.repo, &["rev-parse", "--show-toplevel"]).map_err(|e| {
            unavailable(format!(
                "no git checkout at {} to build commit {} from: {e}",
                self.repo.display(),
                self.commit
            ))
        })?;
        let root = PathBuf::from(root);
        let full = git(
            &root,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{}^{{commit}}", self.commit),
            ],
        )
        .map_err(|_| {
            unavailable(format!(
                "commit {} is not in the repository at {} (a shallow clone? `git fetch --unshallow`)",
                self.commit,
                root.display()
            ))
        })?;
        let dir = self
            .dir
            .clone()
            .unwrap_or_else(|| root.join("target").join("old-versions"));
        let build_err = |what: &str, e: &dyn std::fmt::Display| {
            OldVersionError::Build(format!("commit {}: {what}: {e}", self.commit))
        };
        std::fs::create_dir_all(&dir).map_err(|e| build_err(&format!("{}", dir.display()), &e))?;
        let name: String = self
            .commit
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        // Between processes: one checkout and one build at a time; the rest wait, then find
        // everything fresh.
        let lock_path = dir.join(format!("{name}.lock"));
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| build_err(&format!("{}", lock_path.display()), &e))?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| build_err(&format!("lock {}", lock_path.display()), &e))?;

        let worktree = dir.join(&name);
        self.checkout(&root, &worktree, &full)
            .map_err(|e| build_err("check out", &e))?;
        let log = dir.join(format!("{name}.build.log"));
        let program = self.cargo_build(&worktree, &dir.join("target"), &log)?;
        Ok(OldBuild {
            commit: full,
            program,
            took: start.elapsed(),
        })
    }

    /// A detached worktree of `full` at `worktree`, reused when it is already there.
    fn checkout(&self, root: &Path, worktree: &Path, full: &str) -> Result<(), String> {
        if worktree.exists() {
            if git(worktree, &["rev-parse", "HEAD"]).is_ok_and(|head| head == full) {
                return Ok(());
            }
            std::fs::remove_dir_all(worktree)
                .map_err(|e| format!("remove the stale {}: {e}", worktree.display()))?;
        }
        // A worktree directory removed by hand is still registered until pruned.
        git(root, &["worktree", "prune"])?;
        let path = worktree.to_str().ok_or("the worktree path is not UTF-8")?;
        git(root, &["worktree", "add", "--detach", path, full])?;
        Ok(())
    }

    fn cargo_build(
        &self,
        worktree: &Path,
        target: &Path,
        log: &Path,
    ) -> Result<PathBuf, OldVersionError> {
        let build_err = |e: String| OldVersionError::Build(format!("commit {}: {e}", self.commit));
        let log_file =
            File::create(log).map_err(|e| build_err(format!("{}: {e}", log.display())))?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(worktree)
            .args(["build", "--all-features", "--locked", "--example"])
            .arg(&self.example)
            .args(["--message-format=json-render-diagnostics"])
            .env("CARGO_TARGET_DIR", target)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        // What `cargo test` sets for the running test describes this package, not the old one;
        // a jobserver of the outer build is not ours to use.
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_MAKEFLAGS",
                    "MAKEFLAGS",
                    "MFLAGS",
                ]
                .contains(&key)
            {
                cmd.env_remove(key);
            }
        }
        eprintln!(
            "building tower-primary at {} (example {}) in {} (log: {})",
            self.commit,
            self.example,
            worktree.display(),
            log.display()
        );
        let mut child = cmd
            .spawn()
            .map_err(|e| build_err(format!("cannot run {}: {e}", Path::new(&cargo).display())))?;
        let mut program = None;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(exe) = executable_of(&line, &self.example) {
                    program = Some(exe);
                }
            }
        }
        let status = child.wait().map_err(|e| build_err(format!("cargo: {e}")))?;
        match program {
            Some(program) if status.success() => Ok(program),
            _ => Err(build_err(format!(
                "`cargo build --all-features --locked --example {}` in {} failed ({status}); \
                 the end of {}:\n{}",
                self.example,
                worktree.display(),
                log.display(),
                tail(log, 40)
            ))),
        }
    }
}

/// The executable of `example` in a line of cargo's JSON messages.
fn executable_of(line: &str, example: &str) -> Option<PathBuf> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg["reason"] != "compiler-artifact" || msg["target"]["name"] != example {
        return None;
    }
    let kinds = msg["target"]["kind"].as_array()?;
    if !kinds.iter().any(|k| k == "example") {
        return None;
    }
    msg["executable"].as_str().map(PathBuf::from)
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `git -C dir args`; its trimmed stdout, or a message with its stderr.
fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "`git {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_executable_is_found_in_cargos_messages() {
        let line = r#"{"reason":"compiler-artifact","target":{"kind":["example"],"name":"failover_bench"},"executable":"/t/debug/examples/failover_bench"}"#;
        assert_eq!(
            executable_of(line, "failover_bench"),
            Some(PathBuf::from("/t/debug/examples/failover_bench"))
        );
        let lib = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"failover_bench"},"executable":null}"#;
        assert_eq!(executable_of(lib, "failover_bench"), None);
        assert_eq!(executable_of(line, "chaos"), None);
        assert_eq!(executable_of("Compiling x", "chaos"), None);
    }

    #[test]
    fn a_directory_outside_git_is_unavailable_not_a_build_failure() {
        let dir = crate::servers::TempDir::new("old-version").unwrap();
        let err = OldVersion::new("be74ccc", dir.path())
            .build_blocking()
            .unwrap_err();
        assert!(matches!(err, OldVersionError::Unavailable(_)), "{err}");
    }

    #[tokio::test]
    async fn require_skips_an_unavailable_commit_unless_backends_are_required() {
        let dir = crate::servers::TempDir::new("old-version").unwrap();
        let old = OldVersion::new("be74ccc", dir.path());
        if crate::servers::backends_required() {
            let joined = tokio::spawn(async move { old.require().await }).await;
            assert!(joined.is_err_and(|e| e.is_panic()));
        } else {
            assert!(old.require().await.is_none());
        }
    }

    #[test]
    fn a_missing_commit_is_unavailable() {
        let err = OldVersion::new(
            "0000000000000000000000000000000000000bad",
            env!("CARGO_MANIFEST_DIR"),
        )
        .build_blocking();
        // Without git at all this is unavailable too.
        assert!(
            matches!(err, Err(OldVersionError::Unavailable(_))),
            "{err:?}"
        );
    }
}
