//! Nodes on a runtime and thread of their own, which a check can pause, resume and kill.

use tokio::sync::{mpsc, oneshot};

use super::Fixture;
use super::harness::{Harness, primary_recorded};
use crate::history::Recorder;
use tower_primary::clock::Timestamp;
use tower_primary::role::{RoleHandle, TermContext};
use tower_primary::{Elector, ElectorBuilder};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NodeCommand {
    /// Stop polling the runtime.
    Pause,
    /// Poll it again.
    Resume,
    /// Shut the runtime down without releasing anything.
    Kill,
    /// Shut the elector down gracefully, then the runtime.
    Shutdown,
}

/// When a thread node's runtime stopped being polled, and its deadline then.
#[derive(Clone, Copy, Debug)]
pub(super) struct Frozen {
    pub(super) at: Timestamp,
    pub(super) deadline: Option<Timestamp>,
}

pub(super) struct ThreadNode {
    pub(super) id: String,
    pub(super) recorder: Recorder,
    pub(super) handle: RoleHandle,
    pub(super) commands: mpsc::UnboundedSender<(NodeCommand, oneshot::Sender<Frozen>)>,
}

impl ThreadNode {
    pub(super) async fn primary(&self) -> TermContext {
        primary_recorded(&self.id, &self.handle, &self.recorder).await
    }

    pub(super) async fn command<F: Fixture + ?Sized>(
        &self,
        h: &Harness<'_, F>,
        command: NodeCommand,
    ) -> Frozen {
        let (tx, rx) = oneshot::channel();
        if self.commands.send((command, tx)).is_err() {
            h.fail(format!("the node thread is gone; cannot {command:?} it"));
        }
        match h
            .within(&format!("the node thread to {command:?}"), rx)
            .await
        {
            Ok(frozen) => frozen,
            Err(_) => h.fail(format!("the node thread died during {command:?}")),
        }
    }
}

pub(super) fn run_thread_node(
    builder: ElectorBuilder,
    recorder: Recorder,
    setup: impl FnOnce(&Elector),
    ready: oneshot::Sender<Result<RoleHandle, String>>,
    mut commands: mpsc::UnboundedReceiver<(NodeCommand, oneshot::Sender<Frozen>)>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            let _ = ready.send(Err(err.to_string()));
            return;
        }
    };
    let elector = match runtime.block_on(async { builder.spawn() }) {
        Ok(elector) => elector,
        Err(err) => {
            let _ = ready.send(Err(err.to_string()));
            runtime.shutdown_background();
            return;
        }
    };
    // Registered before the campaign is first polled.
    recorder.track(&elector);
    setup(&elector);
    let handle = elector.handle();
    let clock = handle.clock();
    let _ = ready.send(Ok(handle.clone()));
    let mut running = true;
    loop {
        let next = if running {
            runtime.block_on(commands.recv())
        } else {
            commands.blocking_recv()
        };
        // The runtime is not polled from here until the next `block_on`.
        let Some((command, reply)) = next else { break };
        let frozen = Frozen {
            at: clock.now(),
            deadline: handle.deadline(),
        };
        match command {
            NodeCommand::Pause => running = false,
            NodeCommand::Resume => running = true,
            NodeCommand::Kill => {
                // Drops every task, the leadership among them, without running them again.
                runtime.shutdown_background();
                drop(elector);
                let _ = reply.send(frozen);
                return;
            }
            NodeCommand::Shutdown => {
                runtime.block_on(elector.shutdown());
                runtime.shutdown_background();
                drop(elector);
                let _ = reply.send(frozen);
                return;
            }
        }
        let _ = reply.send(frozen);
    }
    // The test is gone.
    runtime.shutdown_background();
    drop(elector);
}
