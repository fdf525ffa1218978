//! Checks that a singleton task of your own never runs on two nodes at once.
//!
//! Three electors share one lock on the in-process [`MemoryBackend`] (with a lease). Each runs
//! the task under test, which records every run (start, and the moment it stops acting) with a
//! history [`Recorder`]. The primary steps down (a handover), then the next primary stops
//! renewing its lease (a forced failover: a hung process or a cut network looks like this to the
//! backend). The history check then shows that no two runs overlapped and that terms rose.
//!
//! ```text
//! cargo run -p tower-primary-testing --example check_a_singleton_task
//! ```
//!
//! `cargo test -p tower-primary-testing --example check_a_singleton_task` runs the same scenario
//! as a test.

use std::convert::Infallible;
use std::error::Error;
use std::time::Duration;

use tower_primary::clock::monotonic_nanos;
use tower_primary::{Elector, Lease, MemoryBackend, NodeId};
use tower_primary_testing::history::{History, Recorder};

/// Short, so that the failover takes well under a second.
const LEASE: Duration = Duration::from_millis(600);
/// A bound on every wait, so that a broken run fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

/// The code under test: a job that must run on one node at a time. It records a run when it
/// starts and when it stops acting (its term ended).
fn report_job(elector: &Elector, node: &str, runs: &Recorder) {
    let (runs, node) = (runs.clone(), node.to_owned());
    elector.singleton_task("report", move |ctx| {
        let (runs, node) = (runs.clone(), node.clone());
        async move {
            runs.start(&node, ctx.term(), monotonic_nanos());
            // The real work goes here, checking `ctx.is_valid()` before each side effect.
            ctx.cancelled().await;
            runs.end(&node, ctx.term(), monotonic_nanos());
            Ok::<_, Infallible>(())
        }
    });
}

/// Waits until the task has started `n` runs; returns the node of the latest one.
async fn run_started(runs: &Recorder, n: usize) -> Result<String, Box<dyn Error>> {
    tokio::time::timeout(PATIENCE, runs.wait_for(|h| h.periods().len() >= n))
        .await
        .map_err(|_| format!("run {n} did not start within {PATIENCE:?}"))?;
    let history = runs.history();
    let last = history.periods().last().ok_or("no run recorded")?;
    Ok(last.node.clone())
}

/// The scenario: returns the task's runs and the electors' primary periods.
async fn scenario() -> Result<(History, History), Box<dyn Error>> {
    let backend = MemoryBackend::new().with_lease();
    let (runs, periods) = (Recorder::new(), Recorder::new());
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        // One connection per node, so that faults can be injected into one node's backend.
        let connection = backend.connection();
        let elector = Elector::builder("nightly-report")
            .backend(connection.clone())
            .node(NodeId::new(name))
            .lease(Lease::new(LEASE))
            .spawn()?;
        periods.track(&elector);
        report_job(&elector, name, &runs);
        nodes.push((name, connection, elector));
    }
    let find = |name: &str| {
        nodes
            .iter()
            .find(|(n, ..)| *n == name)
            .ok_or("unknown node")
    };

    let first = run_started(&runs, 1).await?;
    println!("{first} runs the job; it steps down");
    find(&first)?.2.step_down().await?;

    let second = run_started(&runs, 2).await?;
    println!("{second} runs the job; its lease renewals stop (forced failover)");
    let faults = find(&second)?.1.faults();
    faults.stop_renewals(true);

    let third = run_started(&runs, 3).await?;
    println!("{third} runs the job");
    faults.stop_renewals(false);

    for (_, _, elector) in &nodes {
        elector.shutdown().await;
    }
    Ok((runs.history(), periods.history()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let (runs, periods) = scenario().await?;
    let (report, elector_report) = (runs.check(), periods.check());
    println!("\nthe job's runs: {runs}{report}");
    println!("the electors' primary periods: {periods}{elector_report}");
    if !report.is_ok() || !elector_report.is_ok() {
        return Err("the job ran on two nodes at once".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_job_never_runs_on_two_nodes_at_once() {
        let (runs, periods) = scenario().await.unwrap();
        assert!(runs.periods().len() >= 3, "{runs}");
        assert!(runs.periods().iter().all(|p| p.end.is_some()), "{runs}");
        runs.check().assert_ok();
        periods.check().assert_ok();
    }
}
