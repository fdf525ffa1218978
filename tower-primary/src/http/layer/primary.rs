//! [`PrimaryLayer`]: the layer that owns an elector and puts its role into every request.

use std::fmt;
use std::sync::{Arc, Mutex};

use tower_layer::Layer;

use super::add_role::AddRole;
use crate::elector::{Elector, ElectorBuilder, Prepared};
use crate::error::ConfigError;
use crate::sync::lock;

/// Owns an [`Elector`] and puts its [`RoleHandle`](crate::RoleHandle) into every request. See the
/// [module docs](super).
///
/// [`new`](Self::new) checks the configuration at once; the lock is claimed (the elector
/// spawned) when the layer first builds a service, or when [`elector`](Self::elector) is first
/// called. axum calls [`Layer::layer`] once per route: the claim happens once, and every clone of
/// the layer shares the one elector, which [`elector`](Self::elector) hands out for singleton
/// tasks and graceful shutdown.
///
/// For an elector of your own, or [`RoleHandle::fixed`](crate::RoleHandle::fixed) in tests, use
/// [`AddRoleLayer`](super::AddRoleLayer).
#[derive(Clone, Debug)]
#[must_use]
pub struct PrimaryLayer {
    claim: Arc<Claim>,
}

const INTERRUPTED: &str = "tower-primary: an earlier attempt to claim the lock panicked";

/// A validated elector that is spawned by the first `layer()` (or `elector()`) call.
struct Claim {
    lock: String,
    state: Mutex<ClaimState>,
}

enum ClaimState {
    Pending(Box<Prepared>),
    Claimed(Elector),
    /// Spawning failed; the message is repeated to every later caller.
    Failed(String),
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &*lock(&self.state) {
            ClaimState::Pending(_) => "pending",
            ClaimState::Claimed(_) => "claimed",
            ClaimState::Failed(_) => "failed",
        };
        f.debug_struct("Claim")
            .field("lock", &self.lock)
            .field("state", &state)
            .finish()
    }
}

impl Claim {
    /// Spawns the elector the first time; returns the same one every time after.
    fn elector(&self, caller: &'static str) -> Elector {
        let mut state = lock(&self.state);
        if let ClaimState::Claimed(elector) = &*state {
            return elector.clone();
        }
        if let ClaimState::Failed(msg) = &*state {
            panic!("{msg}");
        }
        if tokio::runtime::Handle::try_current().is_err() {
            // Checked before the prepared elector is consumed, so a later call inside a runtime
            // can still claim.
            let err = ConfigError::NoRuntime { what: caller };
            panic!(
                "tower-primary: {err}: the layer claims the lock {:?} when it first builds a \
                 service; build the router inside the runtime (e.g. in `#[tokio::main]`)",
                self.lock
            );
        }
        let ClaimState::Pending(prepared) =
            std::mem::replace(&mut *state, ClaimState::Failed(INTERRUPTED.to_owned()))
        else {
            unreachable!("claimed and failed states returned above");
        };
        match prepared.spawn() {
            Ok(elector) => {
                *state = ClaimState::Claimed(elector.clone());
                elector
            }
            Err(err) => {
                let msg = format!(
                    "tower-primary: cannot claim the lock {:?}: {err}",
                    self.lock
                );
                *state = ClaimState::Failed(msg.clone());
                drop(state);
                panic!("{msg}");
            }
        }
    }
}

impl PrimaryLayer {
    /// A layer that owns the elector `builder` describes. The configuration is checked now (as
    /// [`ElectorBuilder::spawn`] checks it); the elector is spawned when the layer first builds a
    /// service, or when [`elector`](Self::elector) is first called, once for all clones.
    ///
    /// # Errors
    ///
    /// The [`ConfigError`] that [`ElectorBuilder::spawn`] would return, except
    /// [`ConfigError::NoRuntime`]: no runtime is needed until the first service is built.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_primary::{Elector, MemoryBackend, PrimaryLayer};
    ///
    /// // Outside a runtime: only the configuration is checked.
    /// let layer = PrimaryLayer::new(
    ///     Elector::builder("jobs")
    ///         .backend(MemoryBackend::new())
    ///         .advertise("http://10.0.0.7:8080"),
    /// )?;
    /// assert!(!layer.is_claimed());
    ///
    /// let err = PrimaryLayer::new(Elector::builder("no/slashes")).unwrap_err();
    /// assert!(err.to_string().starts_with("invalid lock name"));
    /// # Ok::<_, tower_primary::ConfigError>(())
    /// ```
    ///
    /// With the file backend, the zero-setup choice for the workers of one host:
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use tower_primary::{Elector, FileBackend, PrimaryLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// // The directory is checked now.
    /// let primary = PrimaryLayer::new(Elector::builder("my-app").backend(FileBackend::new(dir.path())))?;
    /// let app: Router = Router::new()
    ///     .route("/health/role", get(tower_primary::http::health::role))
    ///     .layer(primary.clone()); // claims the lock
    /// let elector = primary.elector();
    /// elector.handle().wait_primary().await; // the only node here
    /// # elector.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(builder: ElectorBuilder) -> Result<Self, ConfigError> {
        let prepared = builder.prepare()?;
        Ok(PrimaryLayer {
            claim: Arc::new(Claim {
                lock: prepared.lock_name().to_owned(),
                state: Mutex::new(ClaimState::Pending(Box::new(prepared))),
            }),
        })
    }

    /// The elector this layer owns, spawned now if no service has been built yet.
    ///
    /// Use it to add [singleton tasks](Elector::singleton_task) and to wire graceful shutdown
    /// ([`Elector::shutdown_signal`]).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, when the elector has not been spawned yet; or if spawning it
    /// failed (e.g. the lock directory was removed after the layer was built).
    #[must_use]
    pub fn elector(&self) -> Elector {
        self.claim.elector("PrimaryLayer::elector")
    }

    /// Whether the lock has been claimed: once a service has been built or
    /// [`elector`](Self::elector) called.
    #[must_use]
    pub fn is_claimed(&self) -> bool {
        matches!(*lock(&self.claim.state), ClaimState::Claimed(_))
    }
}

impl<S> Layer<S> for PrimaryLayer {
    type Service = AddRole<S>;

    /// # Panics
    ///
    /// Outside a tokio runtime when the lock has not been claimed yet, with a message that says
    /// so.
    fn layer(&self, inner: S) -> Self::Service {
        AddRole::new(inner, self.claim.elector("PrimaryLayer::layer").handle())
    }
}
