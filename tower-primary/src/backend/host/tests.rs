//! Unit tests of host groups.
