//! `POST /emails` (any worker queues into the outbox) and the email sender (a singleton task:
//! only the primary sends).

use std::path::{Path, PathBuf};
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
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower_primary::schedule::RunOnce;
use tower_primary::{BoxError, TermContext};

use super::worker::App;
use super::{Dirs, append_line, remove_stale_tmp, write_atomic};

/// The sender of every email.
const FROM: &str = "tower-primary scheduler <scheduler@localhost>";
/// The right-hand side of every Message-ID.
const MESSAGE_ID_DOMAIN: &str = "scheduler.tower-primary.localhost";
/// How often the sender looks at the outbox when it is empty.
const POLL: Duration = Duration::from_millis(200);
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

/// An email in the outbox, `<outbox>/<id>.json`.
#[derive(Serialize, Deserialize)]
struct Queued {
    id: String,
    to: String,
    subject: String,
    body: String,
    queued_by: u32,
}

/// A new email id: time-ordered, unique per process and call, safe in file names.
fn new_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!(
        "{micros}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
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
            Json(json!({ "error": "not ready: the state folders are being prepared" })),
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
    let written = match serde_json::to_vec(&queued) {
        Ok(bytes) => write_atomic(&app.dirs.outbox().join(format!("{id}.json")), &bytes).await,
        Err(err) => Err(std::io::Error::other(err)),
    };
    match written {
        Ok(()) => {
            tracing::debug!("email queued id={id} pid={}", std::process::id());
            super::prometheus::count(super::prometheus::EMAILS_ACCEPTED);
            (StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response()
        }
        Err(err) => {
            tracing::error!("cannot queue an email: {err}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": format!("cannot queue the email: {err}") })),
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
    dirs: Dirs,
    smtp: Option<AsyncSmtpTransport<Tokio1Executor>>,
    simulate_work: Duration,
}

impl Sender {
    /// `smtp`: send over SMTP to this URL instead of writing `sent/<id>.eml`.
    pub(crate) fn new(
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
            dirs,
            smtp,
            simulate_work,
        })
    }

    /// Runs for one term: waits for the migration, then sends the outbox, oldest first, until
    /// the term ends.
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
        tracing::info!(
            "email sender started term={} pid={}",
            ctx.term(),
            std::process::id()
        );
        let mut idle = false;
        loop {
            let pending = self.pending().await?;
            if pending.is_empty() {
                if !idle {
                    idle = true;
                    tracing::info!(
                        "email sender idle term={} pid={} outbox=0",
                        ctx.term(),
                        std::process::id()
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(POLL) => {}
                    () = ctx.cancelled() => return Ok(()),
                }
                continue;
            }
            idle = false;
            for (id, path) in pending {
                if !ctx.is_valid() {
                    return Ok(());
                }
                self.send(&id, &path, &ctx).await?;
            }
        }
    }

    /// The queued emails, oldest first.
    async fn pending(&self) -> std::io::Result<Vec<(String, PathBuf)>> {
        let mut found = Vec::new();
        let mut entries = tokio::fs::read_dir(self.dirs.outbox()).await?;
        while let Some(entry) = entries.next_entry().await? {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !id.starts_with('.') {
                found.push((id.to_owned(), entry.path()));
            }
        }
        found.sort_by(|a, b| id_order(&a.0).cmp(&id_order(&b.0)));
        Ok(found)
    }

    /// Delivers one email: build, deliver, record, then remove it from the outbox. A primary
    /// killed between delivering and removing leaves it queued: the next primary delivers it
    /// again, with the same Message-ID.
    async fn send(&self, id: &str, path: &Path, ctx: &TermContext) -> Result<(), BoxError> {
        let pid = std::process::id();
        let term = ctx.term();
        let queued: Queued = match tokio::fs::read(path).await {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(q) => q,
                Err(err) => return self.give_up(id, path, &format!("unreadable: {err}")).await,
            },
            // Another term removed it after delivering it: nothing to do.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err.into()),
        };
        let message_id = message_id(id);
        let message = Message::builder()
            .message_id(Some(message_id.clone()))
            .from(FROM.parse()?)
            .to(match queued.to.parse() {
                Ok(to) => to,
                Err(err) => return self.give_up(id, path, &format!("bad address: {err}")).await,
            })
            .subject(queued.subject)
            .header(ContentType::TEXT_PLAIN)
            .header(PrimaryTermHeader(term))
            .body(queued.body)?;
        // --simulate-work: half before the delivery (a slow SMTP exchange)...
        let half = self.simulate_work / 2;
        if !half.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(half) => {}
                () = ctx.cancelled() => return Ok(()),
            }
        }
        // Deliver only while the term lasts (a fenced write: a stale primary stops here).
        if !ctx.is_valid() {
            return Ok(());
        }
        match &self.smtp {
            Some(smtp) => {
                if let Err(err) = smtp.send(message).await {
                    if err.is_permanent() {
                        return self.give_up(id, path, &format!("refused: {err}")).await;
                    }
                    return Err(err.into());
                }
            }
            None => {
                let eml = self.dirs.sent().join(format!("{id}.eml"));
                write_atomic(&eml, &message.formatted()).await?;
            }
        }
        append_line(
            &self.dirs.deliveries_log(),
            &format!("{id} term={term} pid={pid} message-id={message_id}"),
        )
        .await?;
        // ...and half before the email leaves the outbox: the window in which a crash makes it
        // go out again. Delivered is delivered: finish even if the term ends meanwhile.
        if !half.is_zero() {
            tokio::time::sleep(half).await;
        }
        match tokio::fs::remove_file(path).await {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err.into()),
        }
        tracing::info!("email sent id={id} term={term} pid={pid}");
        super::prometheus::count(super::prometheus::EMAILS_SENT);
        Ok(())
    }

    /// Moves an email that can never be sent to `failed/`, so it does not block the rest.
    async fn give_up(&self, id: &str, path: &Path, why: &str) -> Result<(), BoxError> {
        tracing::error!("email failed id={id} pid={}: {why}", std::process::id());
        tokio::fs::rename(path, self.dirs.failed().join(format!("{id}.json"))).await?;
        Ok(())
    }
}

/// Sorts ids `<micros>-<pid>-<seq>` by time, then pid and sequence.
fn id_order(id: &str) -> (u128, u32, u64, &str) {
    let mut parts = id.splitn(3, '-');
    let mut next = || parts.next().unwrap_or("");
    (
        next().parse().unwrap_or(u128::MAX),
        next().parse().unwrap_or(u32::MAX),
        next().parse().unwrap_or(u64::MAX),
        id,
    )
}
