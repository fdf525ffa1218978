//! Test helpers that users may reuse: the history checker, the backend conformance suite and
//! multi-process node helpers.

pub mod conformance;
pub mod history;
pub mod node;
pub mod proxy;
pub mod servers;
