//! A term of a host group's candidate: the inner leadership with the candidate lock, and its
//! release: to the backend, or to a sibling process at exit.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::candidacy::Candidacy;
use super::lock::Group;
use super::record::Read;
use super::wake::Wake;
use super::{HANDOVER_BOUND, passes_on};
use crate::backend::{AcquireRequest, BoxFuture, Leadership, Lease, Release, Renewals};
use crate::error::Error;
use crate::role::Holder;

/// Attempts to take the candidate lock back after a handover nobody took.
const TAKE_BACK_ATTEMPTS: u32 = 10;

/// The candidate's term.
pub(super) struct HostLeadership {
    group: Arc<Group>,
    /// Always `Some` until a release takes it.
    inner: Option<Box<dyn Leadership>>,
    file: Option<Box<dyn Leadership>>,
    candidacy: Option<Candidacy>,
    req: AcquireRequest,
}

impl fmt::Debug for HostLeadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostLeadership")
            .field("group", &self.group)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl HostLeadership {
    pub(super) fn new(
        group: Arc<Group>,
        inner: Box<dyn Leadership>,
        file: Box<dyn Leadership>,
        candidacy: Candidacy,
        req: AcquireRequest,
    ) -> Self {
        HostLeadership {
            group,
            inner: Some(inner),
            file: Some(file),
            candidacy: Some(candidacy),
            req,
        }
    }

    fn inner(&self) -> &dyn Leadership {
        self.inner
            .as_deref()
            .expect("a host leadership holds its inner leadership until released")
    }
}

impl Leadership for HostLeadership {
    fn term(&self) -> u64 {
        self.inner().term()
    }

    fn holder(&self) -> &Holder {
        self.inner().holder()
    }

    fn renewals(&self) -> Option<Renewals> {
        self.inner().renewals()
    }

    fn implied_lease(&self) -> Option<Lease> {
        self.inner().implied_lease()
    }

    fn lost(&mut self) -> BoxFuture<'_, Error> {
        Box::pin(async move {
            let (Some(inner), Some(file), Some(candidacy)) =
                (&mut self.inner, &mut self.file, &self.candidacy)
            else {
                return std::future::pending().await;
            };
            tokio::select! {
                lost = inner.lost() => lost,
                lost = file.lost() => lost,
                lost = candidacy.lost() => lost,
            }
        })
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        self.release_for(Release::StepDown)
    }

    /// The inner leadership's reservation: the reserved node is the candidate of another group
    /// (or another node), named in the inner registry.
    fn reserve<'a>(
        &'a mut self,
        node: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            match self.inner.as_deref_mut() {
                Some(inner) => inner.reserve(node, window).await,
                None => Err(Error::Lost {
                    lock: self.group.files.lock.clone(),
                    reason: "the term was released".to_owned(),
                }),
            }
        })
    }

    fn release_for(mut self: Box<Self>, why: Release) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            let (Some(inner), Some(file), Some(candidacy)) =
                (self.inner.take(), self.file.take(), self.candidacy.take())
            else {
                return Ok(());
            };
            let group = self.group.clone();
            if passes_on(why)
                && let Some(token) = inner.resume_token()
            {
                let g = group.clone();
                let sibling =
                    tokio::task::spawn_blocking(move || g.files.live_sibling(g.me.as_ref()))
                        .await
                        .unwrap_or(false);
                if sibling {
                    return hand_over(group, inner, file, candidacy, self.req.clone(), token).await;
                }
            }
            // To the backend: the lease, then the record, then the candidate lock.
            let released = inner.release().await;
            let _ = candidacy
                .write_host(group.record(&self.req, None, false))
                .await;
            drop(candidacy);
            let _ = file.release().await;
            released
        })
    }
}

/// Passes the lease to a sibling: marks `.host` released, stops renewing, lets the candidate
/// lock go, and waits for a sibling to rewrite `.host`. If nobody does within
/// [`HANDOVER_BOUND`], takes the candidate lock back and releases the lease to the backend.
async fn hand_over(
    group: Arc<Group>,
    inner: Box<dyn Leadership>,
    file: Box<dyn Leadership>,
    candidacy: Candidacy,
    req: AcquireRequest,
    token: String,
) -> Result<(), Error> {
    let lock = group.files.lock.clone();
    let marked = candidacy
        .write_host(group.record(&req, Some(&*inner), true))
        .await;
    if let Err(e) = marked {
        tracing::warn!(%lock, error = %e, "cannot mark the lease released for a sibling; releasing it to the backend");
        let released = inner.release().await;
        drop(candidacy);
        let _ = file.release().await;
        return released;
    }
    let term = inner.term();
    // Dropped, not released: the renewals stop and the lease stays for the sibling to resume.
    drop(inner);
    drop(candidacy);
    let mut wake = Wake::subscribe(&group.files.dir, &group.files.host_name.to_string_lossy());
    let _ = file.release().await;
    let taken = tokio::time::timeout(HANDOVER_BOUND, async {
        while !taken_over(&group, &token).await {
            wake.changed().await;
        }
    })
    .await
    .is_ok();
    if taken {
        tracing::info!(%lock, term, "passed the lease to a sibling process");
        return Ok(());
    }
    tracing::info!(%lock, term, bound = ?HANDOVER_BOUND, "no sibling took the lease over; releasing it to the backend");
    take_back(&group, req, &token).await
}

/// Whether `.host` no longer carries this process's released mark with `token`.
async fn taken_over(group: &Arc<Group>, token: &str) -> bool {
    let g = group.clone();
    let token = token.to_owned();
    tokio::task::spawn_blocking(move || match g.files.read_host() {
        Ok(Read::Found(r)) => {
            !(r.released && r.candidate == g.me && r.token.as_deref() == Some(token.as_str()))
        }
        _ => false,
    })
    .await
    .unwrap_or(false)
}

/// Takes the candidate lock back after a handover nobody took, and releases the lease to the
/// backend (resuming it first: the leadership was dropped), unless a sibling took it meanwhile.
async fn take_back(group: &Arc<Group>, req: AcquireRequest, token: &str) -> Result<(), Error> {
    let lock = &group.files.lock;
    for _ in 0..TAKE_BACK_ATTEMPTS {
        let candidate = group.candidate_lock();
        let grant = tokio::time::timeout(
            HANDOVER_BOUND,
            candidate.acquire(req.clone().with_lease(None)),
        )
        .await;
        let file = match grant {
            Ok(grant) => grant?,
            Err(_) if taken_over(group, token).await => return Ok(()),
            Err(_) => continue,
        };
        if taken_over(group, token).await {
            let _ = file.release().await;
            return Ok(());
        }
        let released = match group.inner.resume(req.clone(), token).await {
            Ok(Some(l)) => l.release().await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        let g = group.clone();
        let record = group.record(&req, None, false);
        let _ = tokio::task::spawn_blocking(move || g.files.write_host(&record)).await;
        let _ = file.release().await;
        return released;
    }
    tracing::warn!(%lock, "could not take the candidate lock back after a handover; the lease runs out on the server");
    Err(Error::backend_msg(
        group.backend,
        "the lease passed on at exit was neither taken over nor released; it runs out on the server",
    ))
}
