//! The server side of a test binary that re-executes itself as an HTTP server process
//! (`tests/http.rs`, `tests/forward.rs`).

use std::future::Future;

/// Runs `serve` on a two-thread runtime until the process is killed or its parent goes away
/// (the parent's end of our stdin closes: then the process exits).
pub(crate) fn serve_until_stdin_closes(serve: impl Future<Output = ()>) {
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(serve);
}
