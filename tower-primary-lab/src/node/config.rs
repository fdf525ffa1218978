//! The node's configuration and how it travels in the environment.

use std::time::Duration;

use std::path::PathBuf;

use super::{
    DEFAULT_TICK, DRAIN_ON_TERM_ENV, GRACE_ENV, HOST_DIR_ENV, LEASE_ENV, LOCK_ENV, NEVER_LEAD_ENV,
    PRIORITY_ENV, READY_AT_SPAWN_ENV, SETTLE_ENV, SPAWN_ENV, TICK_ENV, WINDOW_ENV, WITNESS_ENV,
    WITNESS_EVERY_ENV,
};

/// What a node runs: backend, lock name and optional behaviours. Passed to the child through the
/// environment ([`to_env`](Self::to_env), [`from_env`](Self::from_env)).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_primary_lab::node::NodeConfig;
///
/// let config = NodeConfig::new("/run/myapp", "jobs")
///     .lease(Duration::from_secs(2))
///     .spawn_when_primary(["sleep", "30"]);
/// let env = config.to_env();
/// assert!(env.contains(&("TOWER_PRIMARY_TEST_LOCK", "jobs".to_owned())));
/// assert!(env.contains(&("TOWER_PRIMARY_TEST_SPAWN", "sleep 30".to_owned())));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeConfig {
    /// The backend string.
    pub backend: String,
    /// The lock name.
    pub lock: String,
    /// The lease, for backends that have one.
    pub lease: Option<Duration>,
    /// The grace of shutdown and step-down (the elector's default when `None`).
    pub grace: Option<Duration>,
    /// How often the singleton task ticks.
    pub tick: Duration,
    /// A command (program and arguments) the singleton task spawns at the start of every term.
    pub spawn: Option<Vec<String>>,
    /// A fenced witness to write to while primary, and how often
    /// ([`witness::write_while_primary`](tower_primary_testing::witness::write_while_primary)).
    pub witness: Option<(std::net::SocketAddr, Duration)>,
    /// The host directory: nodes that share it campaign as one host group
    /// (`TOWER_PRIMARY_HOST_DIR`, read by the elector when it is spawned).
    pub host_dir: Option<PathBuf>,
    /// The node's priority (`TOWER_PRIMARY_PRIORITY`, read by the elector; 0 when `None`).
    pub priority: Option<u64>,
    /// The elector's [settle time](tower_primary::ElectorBuilder::settle_time).
    pub settle: Option<Duration>,
    /// The elector's [handover window](tower_primary::ElectorBuilder::handover_window).
    pub window: Option<Duration>,
    /// [`never_lead`](tower_primary::ElectorBuilder::never_lead).
    pub never_lead: bool,
    /// [`ready_at_spawn`](tower_primary::ElectorBuilder::ready_at_spawn) (default `true`).
    pub ready_at_spawn: bool,
    /// On `SIGTERM`, [drain](tower_primary::Elector::drain) for up to this long before the
    /// shutdown (a deploy's stop); `None`: shut down at once.
    pub drain_on_term: Option<Duration>,
}

impl NodeConfig {
    /// A node of `lock` on `backend`, with a 100 ms tick and the elector's defaults otherwise.
    #[must_use]
    pub fn new(backend: impl Into<String>, lock: impl Into<String>) -> Self {
        NodeConfig {
            backend: backend.into(),
            lock: lock.into(),
            lease: None,
            grace: None,
            tick: DEFAULT_TICK,
            spawn: None,
            witness: None,
            host_dir: None,
            priority: None,
            settle: None,
            window: None,
            never_lead: false,
            ready_at_spawn: true,
            drain_on_term: None,
        }
    }

    /// Sets the node's priority (`TOWER_PRIMARY_PRIORITY`).
    #[must_use]
    pub fn priority(mut self, priority: u64) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Sets the settle time.
    #[must_use]
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = Some(settle);
        self
    }

    /// Sets the handover window.
    #[must_use]
    pub fn handover_window(mut self, window: Duration) -> Self {
        self.window = Some(window);
        self
    }

    /// Makes the node one that never leads.
    #[must_use]
    pub fn never_lead(mut self) -> Self {
        self.never_lead = true;
        self
    }

    /// Whether the node is ready from spawn (default `true`); with `false` it becomes a
    /// handover target only after an [`Order::Ready`](super::Order::Ready).
    #[must_use]
    pub fn ready_at_spawn(mut self, ready: bool) -> Self {
        self.ready_at_spawn = ready;
        self
    }

    /// On `SIGTERM`, drains for up to `bound` (handing the lock over to the best eligible
    /// candidate) before shutting down.
    #[must_use]
    pub fn drain_on_term(mut self, bound: Duration) -> Self {
        self.drain_on_term = Some(bound);
        self
    }

    /// Makes the node one of the host group of `dir` (`TOWER_PRIMARY_HOST_DIR`).
    #[must_use]
    pub fn host_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.host_dir = Some(dir.into());
        self
    }

    /// Makes the node write to the [fenced witness](tower_primary_testing::witness) at `addr` every
    /// `every` while primary, as node `<pid>`.
    #[must_use]
    pub fn witness(mut self, addr: std::net::SocketAddr, every: Duration) -> Self {
        self.witness = Some((addr, every));
        self
    }

    /// Sets the lease.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Sets the grace.
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Sets how often the singleton task ticks.
    #[must_use]
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// Makes the singleton task spawn `command` (no argument may contain whitespace) at the start
    /// of every term, with its stdio on `/dev/null`; its pid is reported as `child <pid>`.
    #[must_use]
    pub fn spawn_when_primary<I, S>(mut self, command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.spawn = Some(command.into_iter().map(Into::into).collect());
        self
    }

    /// The environment variables that carry this configuration (without [`NODE_ENV`](super::NODE_ENV)).
    #[must_use]
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (tower_primary::backend::BACKEND_ENV, self.backend.clone()),
            (LOCK_ENV, self.lock.clone()),
            (TICK_ENV, humantime::format_duration(self.tick).to_string()),
        ];
        if let Some(lease) = self.lease {
            env.push((LEASE_ENV, humantime::format_duration(lease).to_string()));
        }
        if let Some(grace) = self.grace {
            env.push((GRACE_ENV, humantime::format_duration(grace).to_string()));
        }
        if let Some(spawn) = &self.spawn {
            env.push((SPAWN_ENV, spawn.join(" ")));
        }
        if let Some((addr, every)) = self.witness {
            env.push((WITNESS_ENV, addr.to_string()));
            env.push((
                WITNESS_EVERY_ENV,
                humantime::format_duration(every).to_string(),
            ));
        }
        if let Some(dir) = &self.host_dir {
            env.push((HOST_DIR_ENV, dir.display().to_string()));
        }
        if let Some(priority) = self.priority {
            env.push((PRIORITY_ENV, priority.to_string()));
        }
        let durations = [
            (SETTLE_ENV, self.settle),
            (WINDOW_ENV, self.window),
            (DRAIN_ON_TERM_ENV, self.drain_on_term),
        ];
        for (name, value) in durations {
            if let Some(d) = value {
                env.push((name, humantime::format_duration(d).to_string()));
            }
        }
        if self.never_lead {
            env.push((NEVER_LEAD_ENV, "1".to_owned()));
        }
        if !self.ready_at_spawn {
            env.push((READY_AT_SPAWN_ENV, "0".to_owned()));
        }
        env
    }

    /// Reads the configuration from this process's environment.
    ///
    /// # Errors
    ///
    /// A message naming the variable that is missing or malformed.
    pub fn from_env() -> Result<Self, String> {
        fn var(name: &str) -> Option<String> {
            std::env::var(name).ok().filter(|v| !v.trim().is_empty())
        }
        fn duration(name: &str) -> Result<Option<Duration>, String> {
            var(name)
                .map(|v| {
                    humantime::parse_duration(v.trim()).map_err(|e| format!("{name}={v:?}: {e}"))
                })
                .transpose()
        }
        let backend = var(tower_primary::backend::BACKEND_ENV)
            .ok_or_else(|| format!("{} is not set", tower_primary::backend::BACKEND_ENV))?;
        let lock = var(LOCK_ENV).ok_or_else(|| format!("{LOCK_ENV} is not set"))?;
        let spawn = var(SPAWN_ENV).map(|s| s.split_whitespace().map(str::to_owned).collect());
        let witness = match var(WITNESS_ENV) {
            Some(v) => Some((
                v.trim()
                    .parse()
                    .map_err(|e| format!("{WITNESS_ENV}={v:?}: {e}"))?,
                duration(WITNESS_EVERY_ENV)?.unwrap_or(Duration::from_millis(2)),
            )),
            None => None,
        };
        Ok(NodeConfig {
            backend: backend.trim().to_owned(),
            lock: lock.trim().to_owned(),
            lease: duration(LEASE_ENV)?,
            grace: duration(GRACE_ENV)?,
            tick: duration(TICK_ENV)?.unwrap_or(DEFAULT_TICK),
            spawn,
            witness,
            host_dir: var(HOST_DIR_ENV).map(PathBuf::from),
            priority: var(PRIORITY_ENV)
                .map(|v| {
                    v.trim()
                        .parse()
                        .map_err(|e| format!("{PRIORITY_ENV}={v:?}: {e}"))
                })
                .transpose()?,
            settle: duration(SETTLE_ENV)?,
            window: duration(WINDOW_ENV)?,
            never_lead: var(NEVER_LEAD_ENV).is_some_and(|v| v.trim() == "1"),
            ready_at_spawn: var(READY_AT_SPAWN_ENV).is_none_or(|v| v.trim() != "0"),
            drain_on_term: duration(DRAIN_ON_TERM_ENV)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn config_survives_the_environment() {
        let config = NodeConfig::new("/tmp/x", "lock-a")
            .lease(Duration::from_millis(2500))
            .grace(Duration::from_secs(1))
            .tick(Duration::from_millis(50))
            .spawn_when_primary(["sleep", "30"]);
        let env: HashMap<_, _> = config.to_env().into_iter().collect();
        assert_eq!(env[LEASE_ENV], "2s 500ms");
        assert_eq!(
            humantime::parse_duration(&env[TICK_ENV]).unwrap(),
            Duration::from_millis(50)
        );
        assert_eq!(env[SPAWN_ENV], "sleep 30");
    }

    #[test]
    fn node_mode_carries_the_preferences_in_its_environment() {
        let config = NodeConfig::new("/tmp/x", "l")
            .priority(7)
            .settle(Duration::from_millis(300))
            .handover_window(Duration::from_secs(1))
            .never_lead()
            .ready_at_spawn(false)
            .drain_on_term(Duration::from_secs(3));
        let env: HashMap<_, _> = config.to_env().into_iter().collect();
        assert_eq!(env[PRIORITY_ENV], "7");
        assert_eq!(env[SETTLE_ENV], "300ms");
        assert_eq!(env[NEVER_LEAD_ENV], "1");
        assert_eq!(env[READY_AT_SPAWN_ENV], "0");
        let plain: HashMap<_, _> = NodeConfig::new("/tmp/x", "l")
            .to_env()
            .into_iter()
            .collect();
        for name in [
            PRIORITY_ENV,
            SETTLE_ENV,
            WINDOW_ENV,
            NEVER_LEAD_ENV,
            READY_AT_SPAWN_ENV,
        ] {
            assert!(!plain.contains_key(name), "{name}");
        }
    }

    #[test]
    fn node_mode_carries_the_witness_in_its_environment() {
        use super::{NodeConfig, WITNESS_ENV, WITNESS_EVERY_ENV};
        use std::net::SocketAddr;
        use std::time::Duration;

        let addr: SocketAddr = "127.0.0.1:4567".parse().unwrap();
        let env = NodeConfig::new("/tmp/x", "l")
            .witness(addr, Duration::from_millis(3))
            .to_env();
        assert!(
            env.contains(&(WITNESS_ENV, "127.0.0.1:4567".to_owned())),
            "{env:?}"
        );
        assert!(
            env.contains(&(WITNESS_EVERY_ENV, "3ms".to_owned())),
            "{env:?}"
        );
        let env = NodeConfig::new("/tmp/x", "l").to_env();
        assert!(env.iter().all(|(k, _)| *k != WITNESS_ENV));
    }

    #[test]
    fn node_mode_carries_the_host_dir_in_its_environment() {
        let env = NodeConfig::new("redis://127.0.0.1:1", "l")
            .host_dir("/tmp/host-a")
            .to_env();
        assert!(
            env.contains(&(HOST_DIR_ENV, "/tmp/host-a".to_owned())),
            "{env:?}"
        );
        let env = NodeConfig::new("/tmp/x", "l").to_env();
        assert!(env.iter().all(|(k, _)| *k != HOST_DIR_ENV));
    }
}
