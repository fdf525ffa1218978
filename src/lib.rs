//! tower-primary: run it once, across workers and replicas.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod clock;
mod backoff;
mod elector;
pub mod error;
pub mod role;
mod task;
pub mod testing;

pub use crate::clock::Clock;
pub use crate::elector::{Elector, ElectorBuilder, Lease, terminate_signal, State};
pub use crate::error::{BoxError, ConfigError, Error};
pub use crate::role::{Holder, InFlight, NodeId, Role, RoleHandle, TermContext};

#[cfg(feature = "file")]
pub use crate::backend::file::FileLock;
pub use crate::backend::memory::MemoryBackend;
