//! The client side of the server's connections, from the kernel's socket table (`ss`): which
//! process owns each established connection to the server's port, and how many data segments it
//! has sent (each request is at least one), to share the server's request count out over hosts.

use std::collections::HashMap;

/// One established TCP connection to the server.
#[derive(Clone, Debug)]
pub(crate) struct Socket {
    /// The owning process (this machine's pid), when `ss` could tell.
    pub(crate) pid: Option<u32>,
    /// The client's port.
    pub(crate) local_port: u16,
    /// `data_segs_out`: segments with data the client has sent.
    pub(crate) segs_out: u64,
}

/// Every established connection to `127.0.0.1:<port>` (the client sides), from `ss -tinpH`.
pub(crate) async fn client_sockets(port: u16) -> Result<Vec<Socket>, String> {
    let filter = format!("( dport = :{port} )");
    let output = tokio::process::Command::new("ss")
        .args(["-tinpH", "state", "established", &filter])
        .output()
        .await
        .map_err(|e| format!("cannot run ss (iproute2): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "ss failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(parse(&String::from_utf8_lossy(&output.stdout)))
}

/// Parses `ss -tinpH` output: a line per socket (`Recv-Q Send-Q local peer users:(…)`), each
/// followed by an indented line of TCP information.
fn parse(text: &str) -> Vec<Socket> {
    let mut sockets: Vec<Socket> = Vec::new();
    for line in text.lines() {
        if line.starts_with(|c: char| c.is_whitespace()) {
            if let Some(last) = sockets.last_mut() {
                last.segs_out = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("data_segs_out:"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(local) = words.get(2) else { continue };
        let local_port = local
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let pid = line
            .find("pid=")
            .and_then(|i| line[i + 4..].split([',', ')']).next())
            .and_then(|p| p.parse().ok());
        sockets.push(Socket {
            pid,
            local_port,
            segs_out: 0,
        });
    }
    sockets
}

/// Segments sent per connection (keyed by the client's port), to take deltas over a window.
pub(crate) fn segments_by_port(sockets: &[Socket]) -> HashMap<u16, u64> {
    sockets.iter().map(|s| (s.local_port, s.segs_out)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ss_output_is_read() {
        let text = "0 0 127.0.0.1:45678 127.0.0.1:6379 users:((\"scale_bench\",pid=4321,fd=9))\n\
                    \t cubic wscale:7,7 rto:204 data_segs_out:12 data_segs_in:11 send 1Mbps\n\
                    0 0 127.0.0.1:45680 127.0.0.1:6379\n\
                    \t cubic data_segs_out:3\n";
        let s = super::parse(text);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].pid, s[0].local_port, s[0].segs_out),
            (Some(4321), 45678, 12)
        );
        assert_eq!((s[1].pid, s[1].segs_out), (None, 3));
    }
}
