//! Throwaway backend servers for tests and the chaos tool: a `redis-server`, an `etcd` or a
//! PostgreSQL cluster of their own on free ports, which a test may kill and restart, and the rule
//! for skipping when a server is absent.
//!
//! Backend tests call [`require`] when a server cannot be had: it prints a loud `SKIPPED` line, or
//! panics when `TOWER_PRIMARY_REQUIRE_BACKENDS=1` (as in CI), so a missing server never passes
//! silently.
//!
//! ```no_run
//! # async fn t() {
//! use tower_primary_lab::servers::{self, RedisServer};
//!
//! let Some(mut redis) = servers::require("redis", RedisServer::start().await) else { return };
//! let url = redis.url(); // redis://127.0.0.1:<port>
//! redis.kill();          // SIGKILL, data lost (no persistence)
//! redis.restart().await.unwrap(); // same port, empty
//! # }
//! ```

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable that turns skipped backend tests into failures.
pub const REQUIRE_ENV: &str = "TOWER_PRIMARY_REQUIRE_BACKENDS";

/// Whether backend tests must fail instead of skipping (`TOWER_PRIMARY_REQUIRE_BACKENDS=1`).
#[must_use]
pub fn backends_required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Unwraps a server (or anything a backend test needs); when it is an error, prints a loud
/// `SKIPPED` message and returns `None`, or panics if [`backends_required`].
///
/// # Panics
///
/// When `res` is an error and `TOWER_PRIMARY_REQUIRE_BACKENDS=1`.
pub fn require<T, E: fmt::Display>(what: &str, res: Result<T, E>) -> Option<T> {
    match res {
        Ok(v) => Some(v),
        Err(e) => {
            let msg = format!("{what} is not available: {e}");
            assert!(
                !backends_required(),
                "{msg} (and {REQUIRE_ENV}=1 forbids skipping)"
            );
            eprintln!(
                "\n==============================\nSKIPPED: {msg}\n==============================\n"
            );
            None
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; racy only against other processes).
///
/// # Errors
///
/// When no port can be bound.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/tower-primary-<prefix>-<pid>-<n>`.
    ///
    /// # Errors
    ///
    /// When it cannot be created.
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "tower-primary-{prefix}-{}-{}-{}",
            std::process::id(),
            tower_primary::clock::monotonic_nanos(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Waits until `ready` holds, checking every 20 ms up to `limit` (a server has no readiness
/// event to await).
fn wait_ready(
    what: &str,
    child: &mut Child,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited during start-up: {status}"));
        }
        if start.elapsed() > limit {
            return Err(format!("{what} not ready after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `request` and returns whatever comes back within a short timeout.
fn exchange(addr: SocketAddr, request: &[u8]) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(request).ok()?;
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn spawn(program: &str, args: &[String], log: &Path) -> Result<Child, String> {
    let log = std::fs::File::create(log).map_err(|e| format!("log file: {e}"))?;
    let err = log.try_clone().map_err(|e| format!("log file: {e}"))?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run `{program}` ({e}); install it (Debian: see .ci/run)"))
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A `redis-server` of the test's own, without persistence, on a free port.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    /// Extra `redis-server` arguments, kept across restarts.
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one and waits until it answers `PING`.
    ///
    /// # Errors
    ///
    /// When `redis-server` is missing or does not come up.
    pub async fn start() -> Result<Self, String> {
        Self::start_with(&[]).await
    }

    /// Starts one with extra `redis-server` arguments (kept across [`restart`](Self::restart)),
    /// e.g. `["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"]`.
    ///
    /// # Errors
    ///
    /// When `redis-server` is missing, refuses the arguments or does not come up.
    pub async fn start_with(extra: &[&str]) -> Result<Self, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let dir = TempDir::new("redis").map_err(|e| e.to_string())?;
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.restart().await?;
        Ok(server)
    }

    /// `redis://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILLs the server (its data is lost: no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child);
        }
    }

    /// Deletes every key on the server (`FLUSHALL`), as an administrator's mistake would.
    ///
    /// # Errors
    ///
    /// When the server does not answer `+OK`.
    pub async fn flush_all(&self) -> Result<(), String> {
        let addr = self.addr();
        let reply = tokio::task::spawn_blocking(move || exchange(addr, b"FLUSHALL\r\n"))
            .await
            .map_err(|e| e.to_string())?;
        match reply {
            Some(r) if r.starts_with("+OK") => Ok(()),
            Some(r) => Err(format!("FLUSHALL: {}", r.trim())),
            None => Err("FLUSHALL: no answer".to_owned()),
        }
    }

    /// Starts the server again on the same port (empty), killing it first if it runs.
    ///
    /// # Errors
    ///
    /// When it does not come up.
    pub async fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.path().display().to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain(self.extra.iter().cloned())
        .collect();
        let log = self.dir.path().join("redis.log");
        let mut child = spawn("redis-server", &args, &log)?;
        let addr = self.addr();
        let ready = tokio::task::spawn_blocking(move || {
            let res = wait_ready("redis-server", &mut child, Duration::from_secs(10), || {
                // A server with `--requirepass` answers `-NOAUTH`: up, too.
                exchange(addr, b"PING\r\n")
                    .is_some_and(|r| r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
            });
            (child, res)
        })
        .await
        .map_err(|e| e.to_string())?;
        self.child = Some(ready.0);
        ready.1
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An `etcd` of the test's own, with a temporary data directory, on free ports.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: TempDir,
    tls: Option<EtcdTls>,
}

/// TLS of an [`EtcdServer`]: its certificate and key, and the plain port of the health check.
#[derive(Debug)]
struct EtcdTls {
    cert: PathBuf,
    key: PathBuf,
    health_port: u16,
}

impl EtcdServer {
    /// Starts one and waits until `/health` says it is healthy.
    ///
    /// # Errors
    ///
    /// When `etcd` is missing or does not come up.
    pub async fn start() -> Result<Self, String> {
        let client_port = free_port().map_err(|e| e.to_string())?;
        let peer_port = free_port().map_err(|e| e.to_string())?;
        let dir = TempDir::new("etcd").map_err(|e| e.to_string())?;
        let mut server = EtcdServer {
            child: None,
            client_port,
            peer_port,
            dir,
            tls: None,
        };
        server.restart().await?;
        Ok(server)
    }

    /// Starts one that serves clients over TLS on [`addr`](Self::addr), with this certificate and
    /// key (PEM files; the certificate must name `127.0.0.1`), and waits until it is healthy (the
    /// health check uses a second, plain listener).
    ///
    /// # Errors
    ///
    /// When `etcd` is missing or does not come up.
    pub async fn start_tls(cert: &Path, key: &Path) -> Result<Self, String> {
        let client_port = free_port().map_err(|e| e.to_string())?;
        let peer_port = free_port().map_err(|e| e.to_string())?;
        let health_port = free_port().map_err(|e| e.to_string())?;
        let dir = TempDir::new("etcd").map_err(|e| e.to_string())?;
        let mut server = EtcdServer {
            child: None,
            client_port,
            peer_port,
            dir,
            tls: Some(EtcdTls {
                cert: cert.to_owned(),
                key: key.to_owned(),
                health_port,
            }),
        };
        server.restart().await?;
        Ok(server)
    }

    /// `etcd://127.0.0.1:<port>` (`etcds://` for a TLS server).
    #[must_use]
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// SIGKILLs the server (its data directory stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child);
        }
    }

    /// Starts the server again with the same ports and data directory.
    ///
    /// # Errors
    ///
    /// When it does not come up.
    pub async fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let listen = match &self.tls {
            // The health check speaks plain HTTP: on a second, plain listener.
            Some(tls) => format!("{client},http://127.0.0.1:{}", tls.health_port),
            None => client.clone(),
        };
        let mut args: Vec<String> = vec![
            "--name".into(),
            "test".into(),
            "--data-dir".into(),
            self.dir.path().join("data").display().to_string(),
            "--listen-client-urls".into(),
            listen,
            "--advertise-client-urls".into(),
            client,
            "--listen-peer-urls".into(),
            peer.clone(),
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
            "--initial-cluster".into(),
            format!("test={peer}"),
        ];
        let mut addr = self.addr();
        if let Some(tls) = &self.tls {
            args.extend([
                "--cert-file".into(),
                tls.cert.display().to_string(),
                "--key-file".into(),
                tls.key.display().to_string(),
            ]);
            addr = SocketAddr::from(([127, 0, 0, 1], tls.health_port));
        }
        let log = self.dir.path().join("etcd.log");
        let mut child = spawn("etcd", &args, &log)?;
        let ready = tokio::task::spawn_blocking(move || {
            let res = wait_ready("etcd", &mut child, Duration::from_secs(20), || {
                exchange(addr, b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    .is_some_and(|r| r.contains("\"health\":\"true\""))
            });
            (child, res)
        })
        .await
        .map_err(|e| e.to_string())?;
        self.child = Some(ready.0);
        ready.1
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The PostgreSQL server tests use: `DATABASE_URL`, or the machine's
/// `postgres://root@127.0.0.1:5432/test`.
#[must_use]
pub fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned())
}

/// A `pgbouncer` of the test's own in front of a PostgreSQL server, on a free port, with one
/// server connection per pool (`default_pool_size = 1`) and trust authentication for one user.
///
/// PgBouncer refuses to run as root: as root it is started with `runuser -u postgres`.
#[derive(Debug)]
pub struct PgBouncer {
    child: Option<Child>,
    port: u16,
    _dir: TempDir,
}

impl PgBouncer {
    /// Starts one forwarding every database to `upstream` as `user`, in `pool_mode`
    /// (`session`, `transaction` or `statement`), and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// When `pgbouncer` is missing or does not come up.
    pub async fn start(upstream: SocketAddr, user: &str, pool_mode: &str) -> Result<Self, String> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};

        let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("pgbouncer");
        let port = free_port().map_err(|e| e.to_string())?;
        let dir = TempDir::new("pgbouncer").map_err(|e| e.to_string())?;
        let config = dir.path().join("pgbouncer.ini");
        let users = dir.path().join("users.txt");
        std::fs::write(&users, format!("\"{user}\" \"\"\n")).map_err(|e| e.to_string())?;
        std::fs::write(
            &config,
            format!(
                "[databases]\n* = host={} port={}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
                 pool_mode = {pool_mode}\ndefault_pool_size = 1\nmax_client_conn = 100\n\
                 ignore_startup_parameters = extra_float_digits,options\n",
                upstream.ip(),
                upstream.port(),
                users.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        for path in [dir.path(), &config, &users] {
            let mode = if path.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| e.to_string())?;
        }
        let as_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let config = config.display().to_string();
        let log = dir.path().join("pgbouncer.log");
        let mut child = if as_root {
            let args = ["-u", "postgres", "--", program, &config].map(str::to_owned);
            spawn("runuser", &args, &log)?
        } else {
            spawn(program, &[config], &log)?
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let ready = tokio::task::spawn_blocking(move || {
            let res = wait_ready("pgbouncer", &mut child, Duration::from_secs(10), || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            (child, res)
        })
        .await
        .map_err(|e| e.to_string())?;
        let mut bouncer = PgBouncer {
            child: Some(ready.0),
            port,
            _dir: dir,
        };
        if let Err(e) = ready.1 {
            bouncer.kill();
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{e}; log: {}", log.trim()));
        }
        Ok(bouncer)
    }

    /// The address clients connect to.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Stops it: `SIGTERM` (which `runuser` passes on to PgBouncer), then waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A PostgreSQL cluster of the test's own (`initdb` in a temporary directory, trust
/// authentication, `fsync` off) on a free port of 127.0.0.1, which a test may kill and restart:
/// for faults that a shared server must not suffer. Its data survives a restart.
///
/// `initdb` refuses to run as root: as root the cluster belongs to the `postgres` user and its
/// programs run with `runuser -u postgres`. The programs are looked up in
/// `/usr/lib/postgresql/<version>/bin` (the newest), then in `PATH`.
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    bin: PathBuf,
    as_root: bool,
    running: bool,
    dir: TempDir,
    /// Extra server settings (`name=value`), kept across restarts.
    settings: Vec<String>,
}

impl PostgresServer {
    /// Creates the cluster and starts it.
    ///
    /// # Errors
    ///
    /// When the PostgreSQL server programs are missing or the cluster does not come up.
    pub async fn start() -> Result<Self, String> {
        Self::start_with(&[]).await
    }

    /// Creates the cluster and starts it with extra server settings (`name=value`, each passed as
    /// `-c name=value`, kept across [`restart`](Self::restart)), e.g. `["max_connections=300"]`.
    ///
    /// # Errors
    ///
    /// When the PostgreSQL server programs are missing or the cluster does not come up.
    pub async fn start_with(settings: &[&str]) -> Result<Self, String> {
        use std::os::unix::fs::MetadataExt;

        let port = free_port().map_err(|e| e.to_string())?;
        let dir = TempDir::new("postgres").map_err(|e| e.to_string())?;
        let as_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let mut server = PostgresServer {
            port,
            bin: postgres_bin_dir(),
            as_root,
            running: false,
            dir,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
        };
        if as_root {
            server.run(
                "chown",
                &["-R", "postgres:postgres", &server.dir_str()],
                false,
            )?;
        }
        let data = server.data_dir();
        let initdb = server.bin.join("initdb").display().to_string();
        server.run(
            &initdb,
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
            true,
        )?;
        server.restart().await?;
        Ok(server)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`): every session
    /// ends without a goodbye; the data stays.
    pub fn kill(&mut self) {
        if std::mem::take(&mut self.running) {
            let pg_ctl = self.bin.join("pg_ctl").display().to_string();
            let data = self.data_dir();
            let _ = self.run(
                &pg_ctl,
                &["-D", &data, "-m", "immediate", "-w", "stop"],
                true,
            );
        }
    }

    /// Starts the server again on the same port with the same data, killing it first if it
    /// runs, and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// When it does not come up.
    pub async fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let data = self.data_dir();
        let log = self.dir.path().join("postgres.log").display().to_string();
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir_str()
        );
        for setting in &self.settings {
            options.push_str(" -c ");
            options.push_str(setting);
        }
        let args: Vec<String> = [
            "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let (program, args) = self.command(&pg_ctl, &args);
        let output = tokio::task::spawn_blocking(move || Command::new(program).args(args).output())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot run pg_ctl ({e}); install postgresql (Debian)"))?;
        if !output.status.success() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "pg_ctl start failed: {}{}; log: {}",
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim(),
                log.trim()
            ));
        }
        self.running = true;
        Ok(())
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn dir_str(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// The program and arguments, through `runuser -u postgres` as root.
    fn command(&self, program: &str, args: &[String]) -> (String, Vec<String>) {
        if self.as_root {
            let mut all = vec!["-u".to_owned(), "postgres".to_owned(), "--".to_owned()];
            all.push(program.to_owned());
            all.extend(args.iter().cloned());
            ("runuser".to_owned(), all)
        } else {
            (program.to_owned(), args.to_vec())
        }
    }

    fn run(&self, program: &str, args: &[&str], as_postgres: bool) -> Result<(), String> {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let (program, args) = if as_postgres {
            self.command(program, &args)
        } else {
            (program.to_owned(), args)
        };
        let output = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run `{program}` ({e}); install postgresql (Debian)"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`{program} {}` failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb`, else the bare names (`PATH`).
fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redis_server_starts_answers_and_restarts_empty() {
        let Some(mut redis) = require("redis-server", RedisServer::start().await) else {
            return;
        };
        let set = exchange(redis.addr(), b"SET k v\r\n").unwrap_or_default();
        assert!(set.starts_with("+OK"), "{set}");
        redis.restart().await.unwrap();
        let get = exchange(redis.addr(), b"GET k\r\n").unwrap_or_default();
        assert!(get.starts_with("$-1"), "data survived a restart: {get}");
        redis.kill();
        assert!(exchange(redis.addr(), b"PING\r\n").is_none());
    }

    #[tokio::test]
    async fn postgres_server_starts_and_restarts_with_its_data() {
        let Some(mut pg) = require("postgres (initdb)", PostgresServer::start().await) else {
            return;
        };
        assert!(TcpStream::connect_timeout(&pg.addr(), Duration::from_secs(1)).is_ok());
        let pid_file = pg.dir.path().join("data").join("postmaster.pid");
        let first = std::fs::read_to_string(&pid_file).unwrap();
        pg.kill();
        assert!(TcpStream::connect_timeout(&pg.addr(), Duration::from_millis(200)).is_err());
        pg.restart().await.unwrap();
        let second = std::fs::read_to_string(&pid_file).unwrap();
        assert_ne!(
            first.lines().next(),
            second.lines().next(),
            "same postmaster"
        );
        assert!(
            pg.url()
                .ends_with(&format!(":{}/postgres", pg.addr().port()))
        );
    }

    #[test]
    fn require_skips_loudly_or_fails() {
        let got = std::panic::catch_unwind(|| require::<(), _>("nothing", Err("absent")));
        if backends_required() {
            assert!(got.is_err());
        } else {
            assert_eq!(got.ok(), Some(None));
        }
    }
}
