//! Finding the holder and sending it the request: at most one primary executes it.
//!
//! An attempt is repeated, on the next holder or the same one, only when the request cannot
//! have run: the primary's gate refused it with the `x-primary-refused` mark (no handler ran),
//! or no connection could be made (nothing was sent) — and only while the whole body can still be
//! sent. Anything else (an application's own `503`, a connection lost after the request went
//! out, a timeout waiting for the response) is the answer.

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body::Body;
use tokio::time::Instant;

use super::Forwarder;
use super::request::{self, BodyProblem, Outgoing};
use super::response;
use crate::error::BoxError;
use crate::http::header::X_PRIMARY_REFUSED;
use crate::http::require::body::Forwarded;
use crate::http::require::future::ForwardFuture;
use crate::http::require::{Origin, Refusal, usable_url};
use crate::role::{Holder, RoleHandle};

/// The first pause before a holder that refused or could not be reached is tried again (unless
/// the role changes first); it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(250);

/// What is needed to forward one request.
pub(crate) struct Job {
    pub(crate) handle: RoleHandle,
    pub(crate) trusted: Option<Arc<[Origin]>>,
    pub(crate) retry_after: u64,
}

/// How one attempt ended.
enum Attempt {
    /// The primary answered (its answer may be any status but a marked refusal).
    Answered(Response<hyper::body::Incoming>),
    /// The node's gate refused it: no handler ran.
    Refused(Response<hyper::body::Incoming>),
    /// No connection: nothing was sent.
    Unreachable(hyper_util::client::legacy::Error),
    /// The request may have reached the primary, then the exchange failed.
    Failed(hyper_util::client::legacy::Error),
    /// No response head within the response timeout.
    TimedOut,
}

impl Forwarder {
    /// Forwards `req` to the holder (see the module docs).
    pub(crate) fn forward<B>(self: &Arc<Self>, job: Job, req: Request<B>) -> ForwardFuture
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let this = self.clone();
        Box::pin(async move { this.run(job, req).await })
    }

    async fn run<B>(&self, job: Job, req: Request<B>) -> Response<Forwarded>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let Job {
            mut handle,
            trusted,
            retry_after,
        } = job;
        if request::is_upgrade(&req) {
            let refusal = Refusal::forwarding(
                "upgrade_not_forwarded",
                None,
                None,
                "protocol upgrades (WebSocket) and CONNECT are not forwarded to the primary; \
                 connect to the primary itself"
                    .to_owned(),
            );
            return response::refuse(StatusCode::NOT_IMPLEMENTED, &refusal);
        }
        let (mut parts, body) = req.into_parts();
        let outgoing = match request::prepare(&parts, body, &self.settings).await {
            Ok(outgoing) => outgoing,
            Err(BodyProblem::TooLarge) => return self.too_large(),
            Err(BodyProblem::Unreadable(err)) => {
                let refusal = Refusal::forwarding(
                    "bad_request_body",
                    None,
                    None,
                    format!("the request body could not be read: {err}"),
                );
                return response::refuse(StatusCode::BAD_REQUEST, &refusal);
            }
        };
        let node = HeaderValue::from_str(handle.node().id())
            .unwrap_or_else(|_| HeaderValue::from_static("unnamed"));
        request::rewrite_headers(&mut parts, &self.settings, &node);

        let deadline = Instant::now() + self.settings.wait_for_holder;
        let mut pause = FIRST_PAUSE;
        // The last holder that could not take the request, for the final refusal.
        let mut last: Option<Holder> = None;
        loop {
            let target = handle.holder().and_then(|holder| {
                let url = usable_url(&holder, trusted.as_deref(), "forward")?;
                let uri = url.join(path_and_query(&parts.uri)).parse::<Uri>().ok()?;
                Some((holder, uri))
            });
            let mut tried = false;
            if let Some((holder, uri)) = target {
                tried = true;
                match self.attempt(&parts, uri, &outgoing).await {
                    Attempt::Answered(res) => return response::pass_on(res, &holder),
                    Attempt::Refused(res) if !outgoing.retryable() => {
                        // Refused, but the body is gone: pass the refusal on (nothing ran).
                        return response::pass_on(res, &holder);
                    }
                    Attempt::Refused(_) => {
                        tracing::debug!(holder = %holder.id, "the holder refused a forwarded request; waiting for the next");
                    }
                    Attempt::Unreachable(err) if outgoing.retryable() => {
                        tracing::debug!(holder = %holder.id, error = %err, "the holder cannot be reached; waiting for the next");
                    }
                    Attempt::Unreachable(err) | Attempt::Failed(err) => {
                        if outgoing.too_large() {
                            return self.too_large();
                        }
                        return self.failed(&holder, &err);
                    }
                    Attempt::TimedOut => return self.timed_out(&holder),
                }
                last = Some(holder);
            }
            let now = Instant::now();
            if now >= deadline {
                return self.no_holder(&handle, last, retry_after);
            }
            // Wake on a role change, or after a pause to try the same holder again (a node
            // about to publish its new role, a connection refused during a restart).
            let wake = if tried {
                (now + pause).min(deadline)
            } else {
                deadline
            };
            tokio::select! {
                _ = handle.changed() => {}
                () = tokio::time::sleep_until(wake) => {}
            }
            if tried {
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }

    async fn attempt(&self, parts: &Parts, uri: Uri, outgoing: &Outgoing) -> Attempt {
        let mut req = Request::new(outgoing.body());
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers.clone();
        let sent = tokio::time::timeout(self.settings.response_timeout, self.client.request(req));
        match sent.await {
            Err(_) => Attempt::TimedOut,
            Ok(Err(err)) if err.is_connect() => Attempt::Unreachable(err),
            Ok(Err(err)) => Attempt::Failed(err),
            Ok(Ok(res))
                if res.status() == StatusCode::SERVICE_UNAVAILABLE
                    && res.headers().contains_key(X_PRIMARY_REFUSED) =>
            {
                Attempt::Refused(res)
            }
            Ok(Ok(res)) => Attempt::Answered(res),
        }
    }

    fn too_large(&self) -> Response<Forwarded> {
        let max = self.settings.max_body.unwrap_or(u64::MAX);
        let refusal = Refusal::forwarding(
            "body_too_large",
            None,
            None,
            format!("the request body is longer than the forwarder's maximum of {max} bytes"),
        );
        response::refuse(StatusCode::PAYLOAD_TOO_LARGE, &refusal)
    }

    fn failed(
        &self,
        holder: &Holder,
        err: &hyper_util::client::legacy::Error,
    ) -> Response<Forwarded> {
        tracing::warn!(
            holder = %holder.id,
            term = holder.term,
            error = %error_chain(err),
            "a forwarded request failed after it was sent; answering 502"
        );
        let refusal = Refusal::forwarding(
            "forward_failed",
            Some(holder.clone()),
            None,
            format!(
                "the request was sent to the primary {} (term {}), then the exchange failed \
                 before its response: {}; it was not retried, and may or may not have run",
                holder.id,
                holder.term,
                error_chain(err)
            ),
        );
        response::refuse(StatusCode::BAD_GATEWAY, &refusal)
    }

    fn timed_out(&self, holder: &Holder) -> Response<Forwarded> {
        tracing::warn!(
            holder = %holder.id,
            term = holder.term,
            timeout = ?self.settings.response_timeout,
            "the primary sent no response head in time; answering 504"
        );
        let refusal = Refusal::forwarding(
            "forward_timeout",
            Some(holder.clone()),
            None,
            format!(
                "the primary {} (term {}) sent no response within {:?}; the request was not \
                 retried, and may or may not have run",
                holder.id, holder.term, self.settings.response_timeout
            ),
        );
        response::refuse(StatusCode::GATEWAY_TIMEOUT, &refusal)
    }

    fn no_holder(
        &self,
        handle: &RoleHandle,
        last: Option<Holder>,
        retry_after: u64,
    ) -> Response<Forwarded> {
        let wait = self.settings.wait_for_holder;
        tracing::info!(
            last = last.as_ref().map(|h| h.id.as_str()),
            ?wait,
            "no holder took a forwarded request within the wait; answering 503"
        );
        let (error, message) = match &last {
            Some(h) => (
                "not_primary",
                format!(
                    "no primary of lock {:?} took the request within {wait:?}; the last one tried \
                     was {} (term {}), which refused it or could not be reached; nothing ran",
                    handle.lock(),
                    h.id,
                    h.term
                ),
            ),
            None => (
                "no_primary",
                format!(
                    "no primary of lock {:?} that requests can be forwarded to was known within \
                     {wait:?}; nothing ran",
                    handle.lock()
                ),
            ),
        };
        let refusal =
            Refusal::forwarding(error, last, Some(retry_after.saturating_mul(1000)), message);
        response::refuse(StatusCode::SERVICE_UNAVAILABLE, &refusal)
    }
}

/// The request's path and query, `/` when it has none.
pub(crate) fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query()
        .map(|pq| pq.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/")
}

/// An error with its sources, as one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
