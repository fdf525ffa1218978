//! A TCP proxy that can stall or cut a node's connection to a backend server, for fault tests
//! and the chaos tool.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tower_primary_lab::proxy::TcpProxy;
//!
//! // An echo server to stand for the backend.
//! let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let upstream = server.local_addr()?;
//! tokio::spawn(async move {
//!     let (mut s, _) = server.accept().await.unwrap();
//!     let mut buf = [0u8; 4];
//!     while let Ok(n) = s.read(&mut buf).await {
//!         if n == 0 || s.write_all(&buf[..n]).await.is_err() { break; }
//!     }
//! });
//!
//! let proxy = TcpProxy::start(upstream).await?;
//! let mut client = tokio::net::TcpStream::connect(proxy.addr()).await?;
//! client.write_all(b"ping").await?;
//! let mut buf = [0u8; 4];
//! client.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"ping");
//!
//! proxy.stall(); // bytes are held from now on, connections stay open
//! client.write_all(b"held").await?;
//! let held = tokio::time::timeout(std::time::Duration::from_millis(100), client.read(&mut buf)).await;
//! assert!(held.is_err(), "a stalled proxy passed bytes");
//! proxy.resume(); // the held bytes go through
//! client.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"held");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Pass,
    Stall,
}

/// A TCP proxy between nodes and a server; see the [module docs](self).
///
/// Runs on the tokio runtime it was started on; dropping it closes every connection.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Cancelled to cut every current connection (both sides).
    cut_all: Arc<watch::Sender<CancellationToken>>,
    /// Cancelled to close the server side of every current connection, leaving the client side
    /// open and silent (what a server's keepalive timeout does to a partitioned client).
    cut_upstream: Arc<watch::Sender<CancellationToken>>,
    shutdown: CancellationToken,
    /// Connections open now (accepted, not yet closed on the client side).
    open: Arc<AtomicUsize>,
}

impl fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("mode", &*self.mode.borrow())
            .finish()
    }
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`.
    ///
    /// # Errors
    ///
    /// When no port can be bound.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let cut_all = Arc::new(watch::channel(CancellationToken::new()).0);
        let cut_upstream = Arc::new(watch::channel(CancellationToken::new()).0);
        let shutdown = CancellationToken::new();
        let open = Arc::new(AtomicUsize::new(0));
        let accept = Accept {
            listener,
            upstream,
            mode: mode.subscribe(),
            cut_all: cut_all.clone(),
            cut_upstream: cut_upstream.clone(),
            shutdown: shutdown.clone(),
            open: open.clone(),
        };
        tokio::spawn(accept.run());
        Ok(TcpProxy {
            addr,
            upstream,
            mode,
            cut_all,
            cut_upstream,
            shutdown,
            open,
        })
    }

    /// How many client connections are open through the proxy now: whether its node talks to
    /// the server at all (a host group's followers do not).
    #[must_use]
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The address nodes connect to.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's address.
    #[must_use]
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Holds every byte in both directions from now on; connections stay open.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Passes bytes again, the held ones first.
    pub fn resume(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    /// Closes every current connection on both sides. New connections are accepted.
    pub fn cut(&self) {
        self.cut_all.send_replace(CancellationToken::new()).cancel();
    }

    /// Closes the server side of every current connection and leaves the client side open and
    /// silent, as a server that gave up on a partitioned client would.
    pub fn cut_upstream(&self) {
        self.cut_upstream
            .send_replace(CancellationToken::new())
            .cancel();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct Accept {
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    cut_all: Arc<watch::Sender<CancellationToken>>,
    cut_upstream: Arc<watch::Sender<CancellationToken>>,
    shutdown: CancellationToken,
    open: Arc<AtomicUsize>,
}

/// Counts one open connection while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Accept {
    async fn run(self) {
        loop {
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => return,
                a = self.listener.accept() => a,
            };
            let Ok((client, _)) = accepted else { continue };
            let conn = Connection {
                mode: self.mode.clone(),
                all: self.cut_all.borrow().child_token(),
                upstream_cut: self.cut_upstream.borrow().child_token(),
                shutdown: self.shutdown.clone(),
            };
            let upstream = self.upstream;
            self.open.fetch_add(1, Ordering::Relaxed);
            let open = Open(self.open.clone());
            tokio::spawn(async move {
                let _open = open;
                if let Ok(server) = TcpStream::connect(upstream).await {
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    conn.run(client, server).await;
                }
            });
        }
    }
}

struct Connection {
    mode: watch::Receiver<Mode>,
    all: CancellationToken,
    upstream_cut: CancellationToken,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, client: TcpStream, server: TcpStream) {
        let (mut client_r, mut client_w) = client.into_split();
        let (mut server_r, mut server_w) = server.into_split();
        let pumps = async {
            tokio::join!(
                pump(&mut client_r, &mut server_w, self.mode.clone()),
                pump(&mut server_r, &mut client_w, self.mode.clone()),
            );
        };
        tokio::select! {
            () = pumps => return,
            () = self.all.cancelled() => return,
            () = self.shutdown.cancelled() => return,
            () = self.upstream_cut.cancelled() => {}
        }
        drop((server_r, server_w));
        // The client side stays open and hears nothing until a full cut or the proxy goes.
        tokio::select! {
            () = self.all.cancelled() => {}
            () = self.shutdown.cancelled() => {}
        }
        drop((client_r, client_w));
    }
}

async fn pump<R, W>(from: &mut R, to: &mut W, mut mode: watch::Receiver<Mode>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if mode.wait_for(|m| *m == Mode::Pass).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
