//! Backend strings that look like URLs missing their `:` or `//` (`redis//host`, `redis:/host`):
//! refused with the URL they were probably meant to be, rather than taken as a lock directory.

use super::{passwords_in, redact};
use crate::error::ConfigError;

/// The schemes [`from_url`](super::from_url) knows.
const SCHEMES: [&str; 8] = [
    "file",
    "memory",
    "redis",
    "rediss",
    "postgres",
    "postgresql",
    "etcd",
    "etcds",
];

/// A string without `://` that starts like a URL: a known scheme followed by `//`
/// (`redis//host`) or by `:` and anything but `//` (`redis:/host`, `redis:host`). It would
/// otherwise be taken as a lock directory.
pub(super) struct Mistyped<'a> {
    scheme: &'static str,
    /// The whole string.
    given: &'a str,
    /// What follows the scheme and its separator.
    rest: &'a str,
}

pub(super) fn mistyped_url(given: &str) -> Option<Mistyped<'_>> {
    SCHEMES.iter().find_map(|&scheme| {
        let head = given.get(..scheme.len())?;
        if !head.eq_ignore_ascii_case(scheme) {
            return None;
        }
        let after = &given[scheme.len()..];
        let rest = after
            .strip_prefix("//")
            .or_else(|| after.strip_prefix(':').map(|r| r.trim_start_matches('/')))?;
        Some(Mistyped {
            scheme,
            given,
            rest,
        })
    })
}

impl Mistyped<'_> {
    /// The refusal, with the URL meant; passwords hidden in both.
    pub(super) fn error(&self) -> ConfigError {
        let meant = match self.scheme {
            "file" => format!("file:///{}", self.rest.trim_start_matches('/')),
            scheme => format!("{scheme}://{}", self.rest),
        };
        let mut url = self.given.to_owned();
        for password in passwords_in(&meant) {
            url = url.replace(password, "***");
        }
        ConfigError::InvalidBackendUrl {
            url,
            problem: format!(
                "looks like a URL without its \"://\": did you mean {}? (a lock directory \
                 named so must start with ./)",
                redact(&meant)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::from_url;
    use crate::error::ConfigError;

    #[test]
    fn strings_that_look_like_urls_without_their_colon_are_refused_with_a_hint() {
        for (typed, meant) in [
            ("redis//127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis:/127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "postgres:root@localhost/test",
                "postgres://root@localhost/test",
            ),
            ("ETCD//h:2379", "etcd://h:2379"),
            ("file:/tmp/locks", "file:///tmp/locks"),
            ("memory//x", "memory://x"),
        ] {
            let err = from_url(typed).unwrap_err();
            assert!(
                matches!(&err, ConfigError::InvalidBackendUrl { url, .. } if url.as_str() == typed),
                "{typed}: {err:?}"
            );
            assert!(
                err.to_string().contains(&format!("did you mean {meant}?")),
                "{typed}: {err}"
            );
        }
        // A password is hidden in the string shown and in the hint.
        let err = from_url("redis//app:hunter2@h:6379")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(
            err.contains("did you mean redis://app:***@h:6379?"),
            "{err}"
        );
        // Paths that merely start with a scheme's letters are still lock directories.
        #[cfg(feature = "file")]
        for path in ["./redis//x", "redis-locks", "etcdir", "/var/redis//x"] {
            assert_eq!(from_url(path).unwrap().name(), "file", "{path}");
        }
    }
}
