//! The backend string: checked part by part, so that a mistake is named in our words before the
//! driver sees the URL, and the TLS set-up of `rediss://`.

use std::time::Duration;

use ::redis::Client;

use super::{DEFAULT_MAX_LEASE, DEFAULT_PREFIX, MIN_LEASE};
use crate::error::ConfigError;

/// What a backend string says.
pub(super) struct Parsed {
    pub(super) client: Client,
    /// The URL without password.
    pub(super) shown: String,
    /// `scheme://host:port/db`, port and database filled in: the server part of the address.
    pub(super) server: String,
    pub(super) prefix: String,
    pub(super) max_lease: Duration,
}

/// Query parameters the driver itself understands; they are passed on.
const DRIVER_PARAMETERS: [&str; 4] = ["protocol", "insecure", "lib_name", "lib_ver"];

/// Parses `redis://[user:pass@]host[:port][/db][?prefix=p][&max_lease=30s]` (or `rediss://`).
pub(super) fn parse(url: &str) -> Result<Parsed, ConfigError> {
    let shown = super::super::redact(url);
    let invalid = |problem: String| ConfigError::InvalidBackendUrl {
        url: shown.clone(),
        problem,
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(invalid(
            "no scheme: expected redis://host[:port] or rediss://host[:port]".to_owned(),
        ));
    };
    if scheme != "redis" && scheme != "rediss" {
        return Err(invalid(format!(
            "scheme {scheme:?}: expected redis:// or rediss://"
        )));
    }
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (rest, None),
    };
    match fragment {
        None => {}
        Some("insecure") if scheme == "rediss" => {}
        Some(f) => {
            return Err(invalid(format!(
                "fragment #{f}: only #insecure, with rediss://, is understood"
            )));
        }
    }
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match base.find('/') {
        Some(i) => (&base[..i], &base[i..]),
        None => (base, ""),
    };
    let (host, port) = check_authority(authority).map_err(&invalid)?;
    let db = check_database(path).map_err(&invalid)?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let server = format!("{scheme}://{host}:{}/{db}", port.unwrap_or(DEFAULT_PORT));

    let mut prefix = DEFAULT_PREFIX.to_owned();
    let mut max_lease = DEFAULT_MAX_LEASE;
    let mut passed = Vec::new();
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "prefix" => prefix = v.to_owned(),
            "max_lease" => {
                max_lease = humantime::parse_duration(v).map_err(|e| {
                    invalid(format!(
                        "parameter max_lease {v:?}: not a duration such as 30s or 2500ms ({e})"
                    ))
                })?;
                validate_max_lease(max_lease)
                    .map_err(|rule| invalid(format!("parameter max_lease {v:?} {rule}")))?;
            }
            "lease" | "ttl" => {
                return Err(invalid(format!(
                    "parameter {k}: the lease is not part of the backend string; set it on the \
                     elector"
                )));
            }
            k if DRIVER_PARAMETERS.contains(&k) => passed.push(pair),
            other => {
                return Err(invalid(format!(
                    "unknown parameter {other:?}: expected prefix, max_lease, {}",
                    DRIVER_PARAMETERS.join(", ")
                )));
            }
        }
    }
    validate_prefix(&prefix)
        .map_err(|rule| invalid(format!("parameter prefix {prefix:?} {rule}")))?;
    let mut driver_url = format!("{scheme}://{base}");
    if !passed.is_empty() {
        driver_url = format!("{driver_url}?{}", passed.join("&"));
    }
    if let Some(f) = fragment {
        driver_url = format!("{driver_url}#{f}");
    }
    // Everything the driver checks was checked above; should it still refuse, say so in
    // general words (its own messages carry its type names).
    let client = Client::open(driver_url.as_str()).map_err(|e| {
        invalid(match e.detail() {
            Some(detail) => format!("not a Redis URL the driver accepts: {detail}"),
            None => "not a Redis URL the driver accepts".to_owned(),
        })
    })?;
    if scheme == "rediss" {
        install_crypto_provider();
    }
    Ok(Parsed {
        client,
        shown,
        server,
        prefix,
        max_lease,
    })
}

/// The port of `redis://host` without one (also for `rediss://`, as the driver does).
const DEFAULT_PORT: u16 = 6379;

/// Checks `[user[:pass]@]host[:port]`; returns the host (without brackets) and the port.
fn check_authority(authority: &str) -> Result<(&str, Option<u16>), String> {
    let hostport = match authority.rfind('@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    let (host, port) = super::super::host_port::split(hostport)?;
    if host.is_empty() {
        return Err("missing host: expected redis://host[:port][/db]".to_owned());
    }
    if matches!(host, "0.0.0.0" | "::" | "0:0:0:0:0:0:0:0") {
        return Err(format!(
            "host {host}: a wildcard address names no server; give the server's address"
        ));
    }
    Ok((host, port))
}

/// Checks the path: nothing, `/`, or `/<database index>`; returns the index (0 when none).
fn check_database(path: &str) -> Result<u32, String> {
    let db = path.trim_start_matches('/');
    if db.is_empty() {
        return Ok(0);
    }
    if let Ok(index) = db.parse::<u32>() {
        return Ok(index);
    }
    Err(format!(
        "database {db:?}: must be a database index (a number: 0, 1, ...)"
    ))
}

/// The driver builds the TLS configuration of `rediss://` with rustls's process-wide crypto
/// provider; install ring, the provider this crate enables, unless the application installed
/// one of its own.
fn install_crypto_provider() {
    if ::rustls::crypto::CryptoProvider::get_default().is_none() {
        // Refused only when another thread installed one first, which is as good. rustls
        // 0.23.48 deprecates the ring provider (no post-quantum key exchange); this crate
        // keeps ring, which builds with a plain C compiler (aws-lc-rs also needs cmake).
        #[allow(deprecated)]
        let _ = ::rustls::crypto::ring::default_provider().install_default();
    }
}

pub(super) fn validate_max_lease(max: Duration) -> Result<(), &'static str> {
    if max < MIN_LEASE {
        return Err("must be at least the shortest lease, 1 s");
    }
    if max > Duration::from_secs(86_400) {
        return Err("must be at most a day");
    }
    Ok(())
}

pub(super) fn validate_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() || prefix.len() > 64 {
        return Err("must be 1 to 64 characters");
    }
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err("may only hold ASCII letters, digits, '.', '_', ':' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{DEFAULT_MAX_LEASE, DEFAULT_PREFIX, RedisBackend};
    use crate::backend::Backend;
    use std::time::Duration;

    #[test]
    fn urls_keep_crate_parameters_and_passwords_to_themselves() {
        let b = RedisBackend::new("redis://u:hunter2@127.0.0.1:6380/3?prefix=app.1").unwrap();
        assert_eq!(b.prefix(), "app.1");
        let info = b.client.get_connection_info();
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.redis_settings().password(), Some("hunter2"));
        assert!(!format!("{b:?}").contains("hunter2"));

        for bad in [
            "redis://u:hunter2@h/1?lease=5s",
            "redis://u:hunter2@h/1?nope=1",
            "redis://u:hunter2@h/1?prefix=a{b}",
            "redis://u:hunter2@h/notadb",
            "http://u:hunter2@h/1",
        ] {
            let err = RedisBackend::new(bad).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{bad}: {err}");
            assert!(err.starts_with("invalid backend string"), "{bad}: {err}");
        }
        assert_eq!(
            RedisBackend::new("rediss://h:6379").unwrap().prefix(),
            DEFAULT_PREFIX
        );
    }

    #[test]
    fn the_address_names_server_database_and_prefix_and_no_credentials() {
        let b = RedisBackend::new("redis://u:hunter2@127.0.0.1/3?prefix=app&max_lease=5s").unwrap();
        assert_eq!(b.address(), "redis://127.0.0.1:6379/3?prefix=app");
        let b = RedisBackend::new("rediss://:hunter2@[::1]:6380#insecure").unwrap();
        assert_eq!(b.address(), "rediss://[::1]:6380/0?prefix=tower-primary");
        let b = RedisBackend::new("redis://h:6379/0").unwrap();
        assert_eq!(
            b.with_prefix("p").unwrap().address(),
            RedisBackend::new("redis://h?prefix=p").unwrap().address()
        );
    }

    #[test]
    fn max_lease_comes_from_the_url_or_the_builder() {
        let b = RedisBackend::new("redis://h/1").unwrap();
        assert_eq!(b.max_lease(), Some(DEFAULT_MAX_LEASE));
        let b = RedisBackend::new("redis://h/1?max_lease=2500ms&prefix=x").unwrap();
        assert_eq!(b.max_lease(), Some(Duration::from_millis(2500)));
        for bad in ["redis://h/1?max_lease=500ms", "redis://h/1?max_lease=soon"] {
            let err = RedisBackend::new(bad).unwrap_err().to_string();
            assert!(err.contains("max_lease"), "{bad}: {err}");
        }
        assert!(b.clone().with_max_lease(Duration::from_millis(10)).is_err());
        assert_eq!(
            b.with_max_lease(Duration::from_secs(9))
                .unwrap()
                .max_lease(),
            Some(Duration::from_secs(9))
        );
    }

    #[test]
    fn each_bad_part_of_the_url_is_named_in_our_words() {
        let problem = |url: &str| match RedisBackend::new(url) {
            Err(crate::ConfigError::InvalidBackendUrl { problem, .. }) => problem,
            other => panic!("{url}: {other:?}"),
        };
        assert_eq!(
            problem("redis://"),
            "missing host: expected redis://host[:port][/db]"
        );
        assert_eq!(
            problem("redis://u:pw@:6379/1"),
            "missing host: expected redis://host[:port][/db]"
        );
        assert_eq!(
            problem("redis://h:99999"),
            "port \"99999\" of host \"h:99999\": expected a number from 1 to 65535"
        );
        assert_eq!(
            problem("redis://h:abc/1"),
            "port \"abc\" of host \"h:abc\": expected a number from 1 to 65535"
        );
        assert_eq!(
            problem("redis://h/notadb"),
            "database \"notadb\": must be a database index (a number: 0, 1, ...)"
        );
        assert_eq!(
            problem("redis://h/-1"),
            "database \"-1\": must be a database index (a number: 0, 1, ...)"
        );
        assert_eq!(
            problem("redis://h/1?nope=1"),
            "unknown parameter \"nope\": expected prefix, max_lease, protocol, insecure, \
             lib_name, lib_ver"
        );
        assert_eq!(
            problem("redis://h/1?max_lease=soon"),
            "parameter max_lease \"soon\": not a duration such as 30s or 2500ms (expected number \
             at 0)"
        );
        assert_eq!(
            problem("redis://h/1?max_lease=500ms"),
            "parameter max_lease \"500ms\" must be at least the shortest lease, 1 s"
        );
        assert_eq!(
            problem("http://h/1"),
            "scheme \"http\": expected redis:// or rediss://"
        );
        assert_eq!(
            problem("h:6379"),
            "no scheme: expected redis://host[:port] or rediss://host[:port]"
        );
        assert_eq!(
            problem("redis://0.0.0.0:6379"),
            "host 0.0.0.0: a wildcard address names no server; give the server's address"
        );
        assert_eq!(
            problem("redis://h#insecure"),
            "fragment #insecure: only #insecure, with rediss://, is understood"
        );
        // IPv6 addresses and the driver's own fragment still parse.
        assert!(RedisBackend::new("redis://[::1]:6379/2").is_ok());
        assert!(RedisBackend::new("rediss://h:6380#insecure").is_ok());
        // Never the driver's type names.
        for bad in ["redis://", "redis://h:x", "redis://h/x", "redis://[::1"] {
            let err = RedisBackend::new(bad).unwrap_err().to_string();
            assert!(
                !err.contains("InvalidClientConfig") && !err.contains(" - "),
                "{bad}: {err}"
            );
        }
    }
}
