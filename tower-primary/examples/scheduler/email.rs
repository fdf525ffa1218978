//! `POST /emails` (any worker queues into the outbox) and the email sender (a singleton task:
//! only the primary sends).

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lettre::message::Mailbox;
use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;
use serde_json::json;
use tower_primary::schedule::RunOnce;
use tower_primary::{BoxError, TermContext};

use super::store::{Fenced, Outbox, QueueError, Queued, Store};
use super::worker::App;
use super::{Dirs, remove_stale_tmp, write_atomic};

/// The sender of every email.
const FROM: &str = "tower-primary scheduler <scheduler@localhost>";
/// The right-hand side of every Message-ID.
const MESSAGE_ID_DOMAIN: &str = "scheduler.tower-primary.localhost";
/// The largest subject accepted (RFC 5322's line limit).
const MAX_SUBJECT: usize = 998;
/// The largest body accepted.
const MAX_BODY: usize = 256 * 1024;

/// The body of `POST /emails`.
#[derive(Deserialize)]
struct NewEmail {
    to: String,
    subject: String,
    body: String,
}

/// A new email id, `<micros>-<pid>-<seq>-<random>`: time-ordered, unique per process and call,
/// safe in file names. The random part keeps ids of different hosts apart (two containers may
/// both run their worker as pid 7).
fn new_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!(
        "{micros}-{}-{}-{:08x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// The Message-ID of email `id`: the same on every attempt, so receivers can drop a resent copy.
pub(crate) fn message_id(id: &str) -> String {
    format!("<{id}@{MESSAGE_ID_DOMAIN}>")
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

/// `POST /emails`: checks the request and queues the email into the outbox (on any worker).
pub(crate) async fn queue(State(app): State<App>, body: Bytes) -> Response {
    if !app.readiness.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            Json(json!({ "error": "not ready: the migration has not run yet" })),
        )
            .into_response();
    }
    let email: NewEmail = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(err) => {
            return bad_request(format!(
                "expected JSON {{\"to\", \"subject\", \"body\"}}: {err}"
            ));
        }
    };
    if let Err(err) = Mailbox::from_str(&email.to) {
        return bad_request(format!("bad address {:?}: {err}", email.to));
    }
    if email.subject.contains(['\r', '\n']) || email.subject.len() > MAX_SUBJECT {
        return bad_request(format!(
            "the subject must be one line of at most {MAX_SUBJECT} bytes"
        ));
    }
    if email.body.len() > MAX_BODY {
        return bad_request(format!("the body is larger than {MAX_BODY} bytes"));
    }
    let id = new_id();
    let queued = Queued {
        id: id.clone(),
        to: email.to,
        subject: email.subject,
        body: email.body,
        queued_by: std::process::id(),
    };
    match app.store.queue(&queued).await {
        Ok(()) => {
            tracing::debug!("email queued id={id} pid={}", std::process::id());
            super::prometheus::count(super::prometheus::EMAILS_ACCEPTED);
            (StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response()
        }
        Err(QueueError::Unavailable(why)) => {
            tracing::warn!("cannot queue an email: the store is unavailable: {why}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                Json(json!({
                    "error": "store_unavailable",
                    "message": format!(
                        "the email was not queued (nothing was stored): the database cannot be \
                         reached ({why}); retry later"
                    ),
                })),
            )
                .into_response()
        }
        Err(err) => {
            tracing::error!("{err}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": err.to_string() })),
            )
                .into_response()
        }
    }
}

/// The `X-Primary-Term` header: the term of the primary that built the message.
#[derive(Clone, Debug)]
struct PrimaryTermHeader(u64);

impl Header for PrimaryTermHeader {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("X-Primary-Term")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(PrimaryTermHeader(s.trim().parse()?))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.to_string())
    }
}

/// The email sender: a singleton task, so only the primary runs it.
#[derive(Clone)]
pub(crate) struct Sender {
    store: Store,
    dirs: Dirs,
    smtp: Option<AsyncSmtpTransport<Tokio1Executor>>,
    simulate_work: Duration,
}

impl Sender {
    /// `smtp`: send over SMTP to this URL instead of writing `sent/<id>.eml`.
    pub(crate) fn new(
        store: Store,
        dirs: Dirs,
        smtp: Option<&str>,
        simulate_work: Duration,
    ) -> Result<Self, BoxError> {
        let smtp = match smtp {
            Some(url) => Some(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| format!("--smtp {url:?}: {e}"))?
                    .timeout(Some(Duration::from_secs(30)))
                    .build(),
            ),
            None => None,
        };
        Ok(Sender {
            store,
            dirs,
            smtp,
            simulate_work,
        })
    }

    /// Runs for one term: waits for the migration, then sends the outbox, oldest first, until
    /// the term ends or the store's guard row says a newer primary has written.
    pub(crate) async fn run(self, ctx: TermContext, migration: RunOnce) -> Result<(), BoxError> {
        // The term's end first: a sender whose term ended while it waited does not start.
        tokio::select! {
            biased;
            () = ctx.cancelled() => return Ok(()),
            () = migration.wait() => {}
        }
        // Only the primary writes sent/: what a killed primary left half-written goes.
        remove_stale_tmp(&self.dirs.sent()).await;
        if !ctx.is_valid() {
            return Ok(());
        }
        let mut outbox = self.store.outbox(&ctx).await?;
        tracing::info!(
            "email sender started term={} pid={}",
            ctx.term(),
            std::process::id()
        );
        let mut idle = false;
        loop {
            let pending = outbox.pending().await?;
            if pending.is_empty() {
                if !idle {
                    idle = true;
                    tracing::info!(
                        "email sender idle term={} pid={} outbox=0",
                        ctx.term(),
                        std::process::id()
                    );
                }
                outbox.wait(&ctx).await;
                if !ctx.is_valid() {
                    return Ok(());
                }
                continue;
            }
            idle = false;
            for email in pending {
                if !ctx.is_valid() {
                    return Ok(());
                }
                let outcome = match email {
                    Ok(email) => self.send(&mut outbox, email, &ctx).await?,
                    Err((id, why)) => outbox.give_up(&ctx, &id, &why).await?,
                };
                if let Fenced::Refused { newer } = outcome {
                    tracing::warn!(
                        "fence refused what=email term={} newer={newer} pid={} (a newer primary \
                         has written: this term's sender stops)",
                        ctx.term(),
                        std::process::id()
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Delivers one email (outside any transaction), then records the delivery and takes it out
    /// of the outbox (fenced by the term). A primary killed between the two leaves it queued:
    /// the next primary delivers it again, with the same Message-ID.
    async fn send(
        &self,
        outbox: &mut Outbox,
        queued: Queued,
        ctx: &TermContext,
    ) -> Result<Fenced, BoxError> {
        let (pid, term) = (std::process::id(), ctx.term());
        let id = queued.id.clone();
        let message_id = message_id(&id);
        let to = match queued.to.parse() {
            Ok(to) => to,
            Err(err) => {
                return self
                    .give_up(outbox, ctx, &id, &format!("bad address: {err}"))
                    .await;
            }
        };
        let message = Message::builder()
            .message_id(Some(message_id.clone()))
            .from(FROM.parse()?)
            .to(to)
            .subject(queued.subject)
            .header(ContentType::TEXT_PLAIN)
            .header(PrimaryTermHeader(term))
            .body(queued.body)?;
        // --simulate-work: half before the delivery (a slow SMTP exchange); the store spends the
        // other half between the delivery and its record.
        let half = self.simulate_work / 2;
        if !half.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(half) => {}
                () = ctx.cancelled() => return Ok(Fenced::Written),
            }
        }
        // Deliver only while the term lasts (the store's fence guards the record).
        if !ctx.is_valid() {
            return Ok(Fenced::Written);
        }
        match &self.smtp {
            Some(smtp) => {
                if let Err(err) = smtp.send(message).await {
                    if err.is_permanent() {
                        return self
                            .give_up(outbox, ctx, &id, &format!("refused: {err}"))
                            .await;
                    }
                    return Err(err.into());
                }
            }
            None => {
                let eml = self.dirs.sent().join(self.store.eml_name(&id, term));
                write_atomic(&eml, &message.formatted()).await?;
            }
        }
        // Delivered is delivered: record it even if the term ended meanwhile; the fence decides.
        let fenced = match outbox.delivered(ctx, &id, &message_id).await {
            Ok(f) => f,
            Err(err) => {
                // The session may have been ended under us (a stop past the idle timeout): try
                // once more on a new one. The guard row refuses it if a newer term has written.
                tracing::warn!(
                    "email record failed id={id} term={term} pid={pid}: {err}; retrying"
                );
                *outbox = self.store.outbox(ctx).await?;
                outbox.delivered(ctx, &id, &message_id).await?
            }
        };
        if fenced == Fenced::Written {
            // Counted before the line that says so: a reader of the log finds it counted.
            super::prometheus::count(super::prometheus::EMAILS_SENT);
            tracing::info!("email sent id={id} term={term} pid={pid}");
        }
        Ok(fenced)
    }

    async fn give_up(
        &self,
        outbox: &mut Outbox,
        ctx: &TermContext,
        id: &str,
        why: &str,
    ) -> Result<Fenced, BoxError> {
        tracing::error!("email failed id={id} pid={}: {why}", std::process::id());
        outbox.give_up(ctx, id, why).await
    }
}
