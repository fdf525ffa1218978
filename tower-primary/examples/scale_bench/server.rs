//! The bench's own server, and what it says about its clients: how many connections, how many
//! requests so far, how many connections it refused.

use std::time::Duration;

use tower_primary_lab::servers::{EtcdServer, PostgresServer, RedisServer};

/// The database the nodes use on the bench's PostgreSQL cluster, so that the bench's own
/// queries (in `postgres`) are not counted with theirs.
const PG_DATABASE: &str = "bench";

/// The role the nodes log in as on the bench's PostgreSQL cluster.
const PG_ROLE: &str = "bench";

/// `max_connections` of the bench's PostgreSQL cluster (the machine's server has 100).
pub(crate) const PG_MAX_CONNECTIONS: u32 = 300;

/// One server the bench started, on free ports.
pub(crate) enum Server {
    Redis(RedisServer),
    Postgres(PostgresServer),
    Etcd(EtcdServer),
}

impl Server {
    /// Starts a server for `kind` (`redis`, `postgres`, `etcd`).
    pub(crate) async fn start(kind: &str) -> Result<Server, String> {
        match kind {
            "redis" => Ok(Server::Redis(RedisServer::start().await?)),
            "etcd" => Ok(Server::Etcd(EtcdServer::start().await?)),
            "postgres" => {
                let setting = format!("max_connections={PG_MAX_CONNECTIONS}");
                let pg = PostgresServer::start_with(&[&setting]).await?;
                let server = Server::Postgres(pg);
                // The nodes log in as a role of their own, not a superuser: the connections
                // PostgreSQL keeps for superusers stay free for the bench's own queries when the
                // nodes have taken every other one.
                // (CREATE DATABASE cannot share a batch: it runs outside any transaction.)
                server
                    .pg_query(&format!("CREATE ROLE {PG_ROLE} LOGIN"))
                    .await?;
                server
                    .pg_query(&format!("CREATE DATABASE {PG_DATABASE} OWNER {PG_ROLE}"))
                    .await?;
                Ok(server)
            }
            other => Err(format!(
                "unknown backend {other:?} (redis, postgres or etcd)"
            )),
        }
    }

    /// What to print about it.
    pub(crate) fn describe(&self) -> String {
        match self {
            Server::Redis(s) => format!("redis, its own redis-server at {}", s.addr()),
            Server::Etcd(s) => format!("etcd, its own etcd at {}", s.addr()),
            Server::Postgres(s) => format!(
                "postgres, its own throwaway cluster at {} (max_connections {PG_MAX_CONNECTIONS})",
                s.addr()
            ),
        }
    }

    /// The port clients connect to.
    pub(crate) fn port(&self) -> u16 {
        match self {
            Server::Redis(s) => s.addr().port(),
            Server::Etcd(s) => s.addr().port(),
            Server::Postgres(s) => s.addr().port(),
        }
    }

    /// The backend string of the nodes of host `host` (PostgreSQL: the host in the
    /// `application_name`, `scale-h<host>`). On Redis the maximum lease is the bench's lease:
    /// a fresh server makes the first candidate wait that long (the restart guard), not the
    /// backend's default maximum.
    pub(crate) fn node_url(&self, host: usize, lease: Duration) -> String {
        match self {
            Server::Redis(s) => format!("{}?max_lease={}ms", s.url(), lease.as_millis()),
            Server::Etcd(s) => s.url(),
            Server::Postgres(s) => format!(
                "postgres://{PG_ROLE}@{}/{PG_DATABASE}?application_name=scale-h{host}",
                s.addr()
            ),
        }
    }

    /// How the requests are counted.
    pub(crate) fn requests_source(&self) -> &'static str {
        match self {
            Server::Redis(_) => {
                "MONITOR: the commands clients sent (not those a script ran), but INFO, CLIENT \
                 and MONITOR"
            }
            Server::Postgres(_) => {
                "pg_stat_database: xact_commit + xact_rollback of the nodes' database"
            }
            Server::Etcd(_) => {
                "/metrics: grpc_server_msg_received_total (every request message, keepalive \
                 stream messages included)"
            }
        }
    }

    /// The requests the server has counted so far.
    pub(crate) async fn requests(&self) -> Result<f64, String> {
        match self {
            Server::Redis(s) => redis_requests(s.addr()).map(|n| n as f64),
            Server::Postgres(_) => {
                let v = self
                    .pg_value(&format!(
                        "SELECT (xact_commit + xact_rollback)::text FROM pg_stat_database \
                         WHERE datname = '{PG_DATABASE}'"
                    ))
                    .await?;
                v.parse().map_err(|e| format!("xact count {v:?}: {e}"))
            }
            Server::Etcd(s) => {
                let metrics = etcd_metrics(s).await?;
                Ok(metrics
                    .lines()
                    .filter(|l| l.starts_with("grpc_server_msg_received_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum())
            }
        }
    }

    /// The client connections the server has now, the bench's own left out (etcd: the
    /// established TCP connections to its client port, from the kernel's socket table).
    pub(crate) async fn connections(&self, client_side: usize) -> Result<usize, String> {
        match self {
            Server::Redis(_) => {
                let list = self.redis_query(&["CLIENT", "LIST"]).await?;
                // The bench's own connections: the one running CLIENT LIST, and the one in
                // MONITOR mode (flag O) that counts the requests.
                Ok(list
                    .lines()
                    .filter(|l| !l.contains("cmd=client|list"))
                    .filter(|l| {
                        !l.split(' ')
                            .any(|f| f.starts_with("flags=") && f.contains('O'))
                    })
                    .count())
            }
            Server::Postgres(_) => {
                let v = self
                    .pg_value(&format!(
                        "SELECT count(*)::text FROM pg_stat_activity \
                         WHERE datname = '{PG_DATABASE}' AND backend_type = 'client backend'"
                    ))
                    .await?;
                v.parse().map_err(|e| format!("count {v:?}: {e}"))
            }
            Server::Etcd(_) => Ok(client_side),
        }
    }

    /// Connections the server refused so far, where it counts them (Redis:
    /// `rejected_connections`, over `maxclients`); `None` where the nodes' logs tell.
    pub(crate) async fn refused(&self) -> Result<Option<f64>, String> {
        match self {
            Server::Redis(_) => {
                let stats = self.redis_info("stats").await?;
                Ok(stats
                    .lines()
                    .find_map(|l| l.strip_prefix("rejected_connections:"))
                    .and_then(|v| v.trim().parse().ok()))
            }
            _ => Ok(None),
        }
    }

    async fn redis_info(&self, section: &str) -> Result<String, String> {
        self.redis_query(&["INFO", section]).await
    }

    async fn redis_query(&self, args: &[&str]) -> Result<String, String> {
        let Server::Redis(s) = self else {
            return Err("not a Redis server".to_owned());
        };
        let client = redis::Client::open(s.url()).map_err(|e| e.to_string())?;
        // A loaded machine (a thousand nodes starting) answers slowly: more than the client's
        // default timeouts.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(30)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        let mut con = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("connecting to Redis: {e}"))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async::<String>(&mut con)
            .await
            .map_err(|e| format!("{}: {e}", args.join(" ")))
    }

    async fn pg_query(&self, sql: &str) -> Result<(), String> {
        let client = self.pg_client().await?;
        client.batch_execute(sql).await.map_err(|e| {
            format!(
                "{sql}: {}",
                e.as_db_error()
                    .map_or_else(|| e.to_string(), ToString::to_string)
            )
        })
    }

    async fn pg_value(&self, sql: &str) -> Result<String, String> {
        let client = self.pg_client().await?;
        let row = client
            .query_one(sql, &[])
            .await
            .map_err(|e| format!("{sql}: {e}"))?;
        row.try_get(0).map_err(|e| format!("{sql}: {e}"))
    }

    /// A connection of the bench's own, to the `postgres` database.
    async fn pg_client(&self) -> Result<tokio_postgres::Client, String> {
        let Server::Postgres(s) = self else {
            return Err("not a PostgreSQL server".to_owned());
        };
        let url = s.url();
        let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
        let (client, connection) = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| "connecting to PostgreSQL took over 10 s".to_owned())?
            .map_err(|e| format!("connect: {e}"))?;
        tokio::spawn(connection);
        Ok(client)
    }
}

/// etcd's `/metrics` page (Prometheus text), from its client port.
async fn etcd_metrics(s: &EtcdServer) -> Result<String, String> {
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("http://{}/metrics", s.addr())
        .parse()
        .map_err(|e| format!("{e}"))?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| "etcd /metrics took over 10 s".to_owned())?
        .map_err(|e| format!("etcd /metrics: {e}"))?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("etcd /metrics: {e}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|e| format!("etcd /metrics: {e}"))
}

/// The requests Redis has received from clients since the first call, counted from `MONITOR`
/// (`redis-cli monitor`, kept running): `INFO commandstats` would also count every command a
/// script runs, five or more per renewal. Lines of commands a script ran name `lua` as their
/// client; the bench's own INFO and CLIENT queries are left out.
fn redis_requests(addr: std::net::SocketAddr) -> Result<u64, String> {
    use std::io::BufRead as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, OnceLock};

    static COUNT: OnceLock<Result<Arc<AtomicU64>, String>> = OnceLock::new();
    let count = COUNT.get_or_init(|| {
        let mut child = std::process::Command::new("redis-cli")
            .args([
                "-h",
                &addr.ip().to_string(),
                "-p",
                &addr.port().to_string(),
                "monitor",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-cli monitor: {e}"))?;
        let stdout = child.stdout.take().ok_or("redis-cli monitor: no stdout")?;
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // `<time> [<db> <client>] "<COMMAND>" ...`
                let Some((client, command)) = line
                    .split_once('[')
                    .and_then(|(_, rest)| rest.split_once("] "))
                else {
                    continue;
                };
                let own = ["\"INFO\"", "\"CLIENT\"", "\"MONITOR\""]
                    .iter()
                    .any(|c| command.starts_with(c));
                if !client.ends_with(" lua") && !own {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = child.wait();
        });
        Ok(count)
    });
    match count {
        Ok(c) => Ok(c.load(Ordering::Relaxed)),
        Err(e) => Err(e.clone()),
    }
}
