//! The TCP connections a process holds, read from `/proc`: how many connections a node keeps to a
//! server. Tests that promise "this process makes no backend calls" count them, whatever the
//! server (Redis, PostgreSQL, etcd), without asking the server to name its clients.
//!
//! ```no_run
//! use tower_primary_lab::sockets::established_to;
//!
//! let n = established_to(std::process::id(), 6379).unwrap();
//! println!("{n} connection(s) to port 6379");
//! ```

use std::collections::HashSet;

use procfs::net::TcpState;
use procfs::process::{FDTarget, Process};

fn io(e: procfs::ProcError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The number of established TCP connections (IPv4 and IPv6) of process `pid` whose remote port
/// is `port`, from the process's file descriptors and its network namespace's socket tables.
///
/// # Errors
///
/// When `/proc/<pid>` cannot be read (the process is gone, or belongs to another user without
/// the rights to read it).
pub fn established_to(pid: u32, port: u16) -> std::io::Result<usize> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    let process = Process::new(pid).map_err(io)?;
    let sockets: HashSet<u64> = process
        .fd()
        .map_err(io)?
        .filter_map(|fd| match fd.ok()?.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect();
    let mut entries = process.tcp().map_err(io)?;
    entries.extend(process.tcp6().map_err(io)?);
    Ok(entries
        .iter()
        .filter(|e| {
            e.state == TcpState::Established
                && e.remote_address.port() == port
                && sockets.contains(&e.inode)
        })
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_this_process_connections_to_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        assert_eq!(established_to(me, port).unwrap(), 0);
        let a = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _b = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        // The accepted ends have `port` as their local port, not their remote one.
        let _accepted = listener.accept().unwrap();
        assert_eq!(established_to(me, port).unwrap(), 2);
        drop(a);
        assert_eq!(established_to(me, port).unwrap(), 1);
    }
}
