//! What the library's own unit tests share (the workspace's lab crate serves the integration
//! tests; unit tests cannot use it, as its copy of the library would be another crate).

/// The PostgreSQL server of the tests: `DATABASE_URL`, else the local one.
#[cfg(feature = "postgres")]
pub(crate) fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned())
}

/// `Some(value)`, or `None` after a loud "SKIPPED" message when the server `what` is not there;
/// a panic instead when `TOWER_PRIMARY_REQUIRE_BACKENDS=1` (CI) forbids skipping.
#[cfg(feature = "postgres")]
pub(crate) fn require<T, E: std::fmt::Display>(what: &str, res: Result<T, E>) -> Option<T> {
    match res {
        Ok(v) => Some(v),
        Err(e) => {
            let msg = format!("{what} is not available: {e}");
            let required = std::env::var("TOWER_PRIMARY_REQUIRE_BACKENDS")
                .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
            assert!(
                !required,
                "{msg} (and TOWER_PRIMARY_REQUIRE_BACKENDS=1 forbids skipping)"
            );
            eprintln!(
                "\n==============================\nSKIPPED: {msg}\n==============================\n"
            );
            None
        }
    }
}
