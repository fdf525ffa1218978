//! [`ElectorBuilder::spawn_checked`](super::ElectorBuilder::spawn_checked): waiting for the
//! backend's first answer.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Elector;
use crate::error::Error;

/// What the campaign tells the waiting `spawn_checked`: `Ok` once the backend has answered (this
/// node is primary, or has read another node's holder record), else each error it met.
type Answer = Result<(), Error>;

/// The campaign's end of the check. Silent once the check is over.
pub(super) struct FirstAnswer {
    tx: Option<mpsc::UnboundedSender<Answer>>,
}

/// A connected pair: the campaign's end, and the waiter's.
pub(super) fn first_answer() -> (FirstAnswer, mpsc::UnboundedReceiver<Answer>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (FirstAnswer { tx: Some(tx) }, rx)
}

impl FirstAnswer {
    /// The backend has answered: the check is over.
    pub(super) fn answered(slot: &mut Option<FirstAnswer>) {
        if let Some(mut this) = slot.take()
            && let Some(tx) = this.tx.take()
        {
            let _ = tx.send(Ok(()));
        }
    }

    /// A failed call; handed over while somebody still waits for the first answer.
    pub(super) fn failed(slot: &mut Option<FirstAnswer>, err: Error) {
        let Some(tx) = slot.as_ref().and_then(|this| this.tx.as_ref()) else {
            return;
        };
        if tx.send(Err(err)).is_err() {
            // The waiter is gone (cancelled, or done): stop reporting.
            *slot = None;
        }
    }
}

/// Waits for the first answer of `elector`'s campaign, up to `timeout`; on an error, shuts the
/// campaign down before returning it.
pub(super) async fn wait(
    elector: Elector,
    mut answers: mpsc::UnboundedReceiver<Answer>,
    backend: &'static str,
    timeout: Duration,
) -> Result<Elector, Error> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    let err = loop {
        match tokio::time::timeout_at(deadline, answers.recv()).await {
            Ok(Some(Ok(()))) => return Ok(elector),
            Ok(Some(Err(err))) if err.misconfiguration().is_some() => break err,
            // Retried by the campaign; kept in case it is the last one.
            Ok(Some(Err(err))) => last = Some(err),
            // The campaign ended without an answer: it cannot have, as this holds the elector.
            Ok(None) => break elector.shut_down_error(),
            Err(_) => {
                break last.unwrap_or_else(|| {
                    Error::backend_msg(backend, format!("no answer within {timeout:?}"))
                });
            }
        }
    };
    elector.shutdown().await;
    Err(err)
}
