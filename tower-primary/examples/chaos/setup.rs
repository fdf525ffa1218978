//! The backend under test: which server, whether the tool started it (and so may restart it),
//! and the backend string of each node slot (through its own TCP proxy where there is a
//! connection to cut).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use tower_primary_lab::proxy::TcpProxy;
use tower_primary_lab::servers::{EtcdServer, PostgresServer, RedisServer, TempDir};

use crate::nemesis::FaultKind;

/// A server the tool started, which the `restart` fault may kill and start again.
#[derive(Debug)]
pub(crate) enum OwnServer {
    Redis(RedisServer),
    Etcd(EtcdServer),
    Postgres(PostgresServer),
}

impl OwnServer {
    pub(crate) fn kill(&mut self) {
        match self {
            OwnServer::Redis(s) => s.kill(),
            OwnServer::Etcd(s) => s.kill(),
            OwnServer::Postgres(s) => s.kill(),
        }
    }

    pub(crate) async fn restart(&mut self) -> Result<(), String> {
        match self {
            OwnServer::Redis(s) => s.restart().await,
            OwnServer::Etcd(s) => s.restart().await,
            OwnServer::Postgres(s) => s.restart().await,
        }
    }

    /// `FLUSHALL` on a Redis server.
    pub(crate) async fn flush(&self) -> Result<(), String> {
        match self {
            OwnServer::Redis(s) => s.flush_all().await,
            _ => Err("FLUSHALL is a Redis command".to_owned()),
        }
    }
}

/// The backend of one run.
#[derive(Debug)]
pub(crate) struct Setup {
    /// `file`, `redis`, `postgres` or `etcd`.
    pub(crate) kind: &'static str,
    /// What to print about it.
    pub(crate) description: String,
    /// The lease the nodes use (lease backends), or `None`.
    pub(crate) lease: Option<Duration>,
    /// The server the tool started, if any.
    pub(crate) server: Option<OwnServer>,
    /// The proxies, when the nodes reach the server through proxies: one per node slot, or
    /// with host groups one per host (the processes of a host group must name one server
    /// address); slot `s` uses proxy `s % proxies.len()` ([`proxy_of`](Self::proxy_of)).
    pub(crate) proxies: Vec<TcpProxy>,
    /// The backend string of each slot.
    pub(crate) node_backends: Vec<String>,
    /// The lease of each slot (lease backends): `lease`, or with `lease-change` in the mix,
    /// [`OTHER_LEASE`] times it on every second slot.
    pub(crate) node_leases: Vec<Option<Duration>>,
    /// PostgreSQL: a connection string for the tool's own queries (`kill-conns`), and the
    /// `application_name` prefix of each slot's sessions.
    pub(crate) admin_url: Option<String>,
    pub(crate) app_names: Vec<String>,
    /// Faults that do not apply here, with the reason.
    pub(crate) skipped: Vec<(FaultKind, String)>,
    _dir: Option<TempDir>,
}

/// The default lease of lease backends: short, so that failovers happen often.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(2);

/// With `lease-change`, every second slot runs this many times the lease: a rolling lease
/// change caught halfway.
pub(crate) const OTHER_LEASE: f64 = 2.5;

impl Setup {
    /// The proxy slot `slot` reaches the server through, if any.
    pub(crate) fn proxy_of(&self, slot: usize) -> Option<&TcpProxy> {
        self.proxies.get(slot % self.proxies.len().max(1))
    }

    /// Prepares `backend` (`file`, `redis`, `postgres`, `etcd` or a backend string) for `nodes`
    /// slots.
    pub(crate) async fn new(
        backend: &str,
        nodes: usize,
        proxy_count: usize,
        lease: Option<Duration>,
        faults: &[FaultKind],
    ) -> Result<Setup, String> {
        let tag = format!("chaos{}", std::process::id());
        let mut admin_url: Option<String> = None;
        let (kind, url, server, mut description) = match backend {
            "file" => {
                let dir = TempDir::new("chaos").map_err(|e| format!("temporary directory: {e}"))?;
                let path = dir.path().display().to_string();
                let mut setup = file_setup(&path, nodes);
                setup.description = format!("file, locks in {path} (a fresh temporary directory)");
                setup._dir = Some(dir);
                return Ok(setup);
            }
            "redis" => {
                let redis = RedisServer::start()
                    .await
                    .map_err(|e| format!("cannot start redis-server: {e}"))?;
                let url = redis.url();
                let d = format!("redis, its own redis-server at {}", redis.addr());
                ("redis", url, Some(OwnServer::Redis(redis)), d)
            }
            "etcd" => {
                let etcd = EtcdServer::start()
                    .await
                    .map_err(|e| format!("cannot start etcd: {e}"))?;
                let url = etcd.url();
                let d = format!("etcd, its own etcd at {}", etcd.addr());
                ("etcd", url, Some(OwnServer::Etcd(etcd)), d)
            }
            "postgres" => {
                let pg = PostgresServer::start()
                    .await
                    .map_err(|e| format!("cannot start a PostgreSQL cluster: {e}"))?;
                let url = format!("{}?namespace={tag}", pg.url());
                let d = format!("postgres, its own throwaway cluster at {}", pg.addr());
                admin_url = Some(pg.url());
                ("postgres", url, Some(OwnServer::Postgres(pg)), d)
            }
            other => {
                let kind = match other.split_once("://").map(|(s, _)| s) {
                    None | Some("file") => {
                        let path = other.strip_prefix("file://").unwrap_or(other);
                        let mut setup = file_setup(path, nodes);
                        setup.description = format!("file, locks in {path}");
                        return Ok(setup);
                    }
                    Some("memory") => {
                        return Err(
                            "memory:// lives inside one process; the nodes are separate processes"
                                .into(),
                        );
                    }
                    Some("redis" | "rediss") => "redis",
                    Some("postgres" | "postgresql") => "postgres",
                    Some("etcd" | "etcds") => "etcd",
                    Some(s) => return Err(format!("unknown backend scheme {s:?}")),
                };
                (
                    kind,
                    other.to_owned(),
                    None,
                    format!("{kind}, {}", redact(other)),
                )
            }
        };
        let lease = match kind {
            "redis" | "etcd" => Some(lease.unwrap_or(DEFAULT_LEASE)),
            _ => lease,
        };
        if let Some(l) = lease {
            description.push_str(&format!(", lease {}", humantime::format_duration(l)));
        }
        let mut skipped = Vec::new();
        if server.is_none() {
            skipped.push((
                FaultKind::Restart,
                "the tool restarts only servers it started itself (give `--backend redis`, \
                 `postgres` or `etcd` without a URL)"
                    .to_owned(),
            ));
        }
        if kind != "redis" {
            skipped.push((FaultKind::Flush, "FLUSHALL is a Redis fault".to_owned()));
            skipped.push((
                FaultKind::LeaseChange,
                "a lease change with a restart without data is a Redis fault".to_owned(),
            ));
        } else if server.is_none() {
            let why = "the tool flushes and restarts only a Redis server it started itself \
                       (give `--backend redis`)";
            skipped.push((FaultKind::Flush, why.to_owned()));
            skipped.push((FaultKind::LeaseChange, why.to_owned()));
        }
        let mut app_names = Vec::new();
        let mut url = url;
        if kind == "postgres" {
            if !cfg!(feature = "postgres") {
                skipped.push((
                    FaultKind::KillConns,
                    "built without the `postgres` feature".to_owned(),
                ));
            } else if url.contains("application_name=") {
                skipped.push((
                    FaultKind::KillConns,
                    "the URL sets application_name, by which the tool finds a node's sessions"
                        .to_owned(),
                ));
            } else {
                // Each slot's sessions carry the slot in their application_name.
                app_names = (0..nodes).map(|s| format!("{tag}-n{}", s + 1)).collect();
                if admin_url.is_none() {
                    admin_url = Some(url.split('?').next().unwrap_or(&url).to_owned());
                }
                if !url.contains('?') {
                    url.push('?');
                } else {
                    url.push('&');
                }
                url.push_str("application_name=");
            }
        } else {
            skipped.push((
                FaultKind::KillConns,
                "pg_terminate_backend is a PostgreSQL fault".to_owned(),
            ));
        }
        let mut proxies = Vec::new();
        let node_backends = match proxied(&url) {
            Ok((upstream, before, after)) => {
                for _ in 0..proxy_count.clamp(1, nodes.max(1)) {
                    let proxy = TcpProxy::start(upstream)
                        .await
                        .map_err(|e| format!("cannot start a TCP proxy: {e}"))?;
                    proxies.push(proxy);
                }
                (0..nodes)
                    .map(|slot| format!("{before}{}{after}", proxies[slot % proxies.len()].addr()))
                    .collect()
            }
            Err(why) => {
                skipped.push((FaultKind::Drop, why.clone()));
                skipped.push((FaultKind::LeaseChange, why.clone()));
                skipped.push((FaultKind::Cut, why));
                vec![url.clone(); nodes]
            }
        };
        let node_backends: Vec<String> = node_backends
            .into_iter()
            .enumerate()
            .map(|(slot, b)| match app_names.get(slot) {
                Some(name) => format!("{b}{name}"),
                None => b,
            })
            .collect();
        let mixed = faults.contains(&FaultKind::LeaseChange)
            && skipped.iter().all(|(k, _)| *k != FaultKind::LeaseChange);
        let node_leases: Vec<Option<Duration>> = (0..nodes)
            .map(|slot| match lease {
                Some(l) if mixed && slot % 2 == 1 => Some(l.mul_f64(OTHER_LEASE)),
                other => other,
            })
            .collect();
        // On the tool's own Redis, the maximum lease is the longest lease of the run, so that a
        // flush or a restart without data costs that lease (+ 1 s), not the backend's default
        // maximum.
        let longest = node_leases.iter().flatten().max().copied();
        let node_backends = match longest {
            Some(l) if kind == "redis" && server.is_some() => node_backends
                .into_iter()
                .map(|b| {
                    let sep = if b.contains('?') { '&' } else { '?' };
                    format!("{b}{sep}max_lease={}ms", l.as_millis())
                })
                .collect(),
            _ => node_backends,
        };
        if mixed && let Some(l) = lease {
            description.push_str(&format!(
                " (every second node {}: a rolling lease change)",
                humantime::format_duration(l.mul_f64(OTHER_LEASE))
            ));
        }
        Ok(Setup {
            kind,
            description,
            lease,
            server,
            proxies,
            node_backends,
            node_leases,
            admin_url,
            app_names,
            skipped,
            _dir: None,
        })
    }

    /// The longest lease of any slot.
    pub(crate) fn max_lease(&self) -> Option<Duration> {
        self.node_leases.iter().flatten().max().copied()
    }

    /// Ends every session of `slot`'s node on the server (`pg_terminate_backend`), found by
    /// the slot's `application_name`: its lock session and its second connection. Returns how
    /// many were ended.
    #[cfg(feature = "postgres")]
    pub(crate) async fn terminate_sessions(&self, slot: usize) -> Result<u64, String> {
        let (Some(url), Some(name)) = (&self.admin_url, self.app_names.get(slot)) else {
            return Err("no application_name for this slot".to_owned());
        };
        let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
        let (client, connection) = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| "connecting took over 5 s".to_owned())?
            .map_err(|e| format!("connect: {e}"))?;
        let conn = tokio::spawn(connection);
        let pattern = format!("{name} %");
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name LIKE $1 AND pid <> pg_backend_pid()",
                &[&pattern],
            )
            .await
            .map_err(|e| format!("pg_terminate_backend: {e}"));
        drop(client);
        let _ = conn.await;
        let n: i64 = row?.get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Without the `postgres` feature there is no PostgreSQL node to end the sessions of.
    #[cfg(not(feature = "postgres"))]
    pub(crate) async fn terminate_sessions(&self, _slot: usize) -> Result<u64, String> {
        Err("built without the `postgres` feature".to_owned())
    }

    /// Whether `kind` applies here.
    pub(crate) fn applies(&self, kind: FaultKind) -> bool {
        self.skipped.iter().all(|(k, _)| *k != kind)
    }
}

fn file_setup(path: &str, nodes: usize) -> Setup {
    Setup {
        kind: "file",
        description: String::new(),
        lease: None,
        server: None,
        proxies: Vec::new(),
        node_backends: vec![path.to_owned(); nodes],
        node_leases: vec![None; nodes],
        admin_url: None,
        app_names: Vec::new(),
        skipped: vec![
            (
                FaultKind::Cut,
                "the file backend has no connection to cut".to_owned(),
            ),
            (
                FaultKind::Drop,
                "the file backend has no connection to drop".to_owned(),
            ),
            (
                FaultKind::Restart,
                "the file backend has no server".to_owned(),
            ),
            (
                FaultKind::KillConns,
                "the file backend has no sessions".to_owned(),
            ),
            (
                FaultKind::Flush,
                "the file backend has no server".to_owned(),
            ),
            (
                FaultKind::LeaseChange,
                "the file backend has no lease".to_owned(),
            ),
        ],
        _dir: None,
    }
}

/// Splits `url` around its `host:port`: the server's address, and what comes before and after
/// it, so a proxy's address can take its place. Errors say why no proxy can stand in.
fn proxied(url: &str) -> Result<(SocketAddr, String, String), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "not a URL".to_owned())?;
    if matches!(scheme, "rediss" | "etcds") {
        return Err(format!(
            "{scheme}:// uses TLS, whose host name check a proxy on 127.0.0.1 would break"
        ));
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let hostport = &authority[host_start..];
    if hostport.contains(',') {
        return Err("the URL names several servers; cut needs one".to_owned());
    }
    if hostport.is_empty() {
        return Err("the URL names no host (a Unix socket?)".to_owned());
    }
    let has_port = match hostport.rfind(']') {
        Some(close) => hostport[close..].contains(':'),
        None => hostport.contains(':'),
    };
    let default_port = match scheme {
        "redis" => 6379,
        "postgres" | "postgresql" => 5432,
        "etcd" => 2379,
        _ => return Err(format!("no default port for {scheme}://")),
    };
    let target = if has_port {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    };
    let upstream = target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolves to nothing"))?;
    let before = format!("{scheme}://{}", &authority[..host_start]);
    let after = rest[end..].to_owned();
    Ok((upstream, before, after))
}

/// The URL without its password.
pub(crate) use tower_primary::backend::redact;

impl Setup {
    /// Skips the faults of host groups where they do not apply: without host groups (the file
    /// backend, `--host-groups off`), and the host kill with fewer than two simulated hosts.
    pub(crate) fn skip_host_faults(&mut self, groups: bool, simulated_hosts: usize) {
        if !groups {
            let why = "no host groups (the file backend, or --host-groups off)";
            for kind in [
                FaultKind::WorkerKill,
                FaultKind::HostKill,
                FaultKind::StopCandidate,
            ] {
                self.skipped.push((kind, why.to_owned()));
            }
        } else if simulated_hosts < 2 {
            self.skipped.push((
                FaultKind::HostKill,
                "a host kill needs at least two simulated hosts (--hosts)".to_owned(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_takes_the_place_of_host_and_port() {
        let (addr, before, after) =
            proxied("postgres://root:pw@127.0.0.1:5432/test?namespace=x").unwrap();
        assert_eq!(addr, "127.0.0.1:5432".parse().unwrap());
        assert_eq!(before, "postgres://root:pw@");
        assert_eq!(after, "/test?namespace=x");
        let (addr, before, after) = proxied("redis://127.0.0.1").unwrap();
        assert_eq!(addr.port(), 6379);
        assert_eq!((before.as_str(), after.as_str()), ("redis://", ""));
        assert!(proxied("etcd://127.0.0.1:1,127.0.0.1:2").is_err());
        assert!(proxied("rediss://127.0.0.1:6379").is_err());
        assert_eq!(
            redact("postgres://u:secret@h:1/db"),
            "postgres://u:***@h:1/db"
        );
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
