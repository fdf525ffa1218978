//! Parsing of `etcd://` and `etcds://` backend strings, by hand: a list of hosts is
//! not a URL the `url` crate accepts.

use crate::backend::redact;
use crate::error::ConfigError;

/// The port etcd clients use when none is given.
pub(super) const DEFAULT_PORT: u16 = 2379;

/// What an `etcd://` string says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Parsed {
    /// `host:port` (IPv6 hosts in brackets).
    pub(super) endpoints: Vec<String>,
    /// `etcds://`.
    pub(super) tls: bool,
    /// User name and password, percent-decoded.
    pub(super) user: Option<(String, String)>,
    /// The `prefix` query parameter, checked.
    pub(super) prefix: Option<String>,
}

/// Parses `etcd[s]://[user[:password]@]host[:port][,host[:port]…][/][?prefix=…]`.
pub(super) fn parse(url: &str) -> Result<Parsed, ConfigError> {
    let invalid = |problem: String| ConfigError::InvalidBackendUrl {
        url: redact(url),
        problem,
    };
    let (tls, rest) = if let Some(rest) = url.strip_prefix("etcd://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("etcds://") {
        (true, rest)
    } else {
        return Err(invalid("expected etcd:// or etcds://".to_owned()));
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let authority = match rest.split_once('/') {
        Some((a, "")) => a,
        Some(_) => {
            return Err(invalid(
                "etcd strings take no path; set the key prefix with ?prefix=…".to_owned(),
            ));
        }
        None => rest,
    };
    let (user, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (name, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let name = decode(name).map_err(|p| invalid(format!("user name: {p}")))?;
            // The password is never repeated, not even in the message about it.
            let password = decode(password)
                .map_err(|_| invalid("the password is not valid percent-encoding".to_owned()))?;
            if name.is_empty() {
                return Err(invalid("empty user name before '@'".to_owned()));
            }
            (Some((name, password)), hosts)
        }
        None => (None, authority),
    };
    let mut endpoints = Vec::new();
    for host in hosts.split(',') {
        endpoints.push(endpoint(host).map_err(&invalid)?);
    }
    let mut prefix = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "prefix" => {
                let v = decode(v).map_err(|p| invalid(format!("prefix: {p}")))?;
                prefix = Some(check_prefix(&v).map_err(|p| invalid(format!("prefix: {p}")))?);
            }
            "" => return Err(invalid(format!("parameter {pair:?} has no name"))),
            other => {
                return Err(invalid(format!(
                    "unknown parameter {other:?} (etcd strings take only `prefix`)"
                )));
            }
        }
    }
    Ok(Parsed {
        endpoints,
        tls,
        user,
        prefix,
    })
}

/// Checks one `host[:port]` and returns it as `host:port`.
pub(super) fn endpoint(host: &str) -> Result<String, String> {
    let host = host.trim();
    if host.is_empty() {
        return Err("empty host in the host list".to_owned());
    }
    let (name, port) = super::super::host_port::split(host)?;
    let name = if host.starts_with('[') {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(format!("invalid IPv6 address in host {host:?}"));
        }
        format!("[{name}]")
    } else {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(format!("invalid host name {name:?}"));
        }
        name.to_owned()
    };
    let port = port.unwrap_or(DEFAULT_PORT);
    Ok(format!("{name}:{port}"))
}

/// Checks a key prefix: 1 to 200 bytes of `[A-Za-z0-9._:/-]`; slashes at either end are dropped.
pub(super) fn check_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() || trimmed.len() > 200 {
        return Err("must be 1 to 200 bytes (slashes at either end do not count)".to_owned());
    }
    if !trimmed
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
    {
        return Err("may only hold ASCII letters, digits, '.', '_', ':', '/' and '-'".to_owned());
    }
    if trimmed.contains("//") {
        return Err("must not hold an empty segment (\"//\")".to_owned());
    }
    Ok(trimmed.to_owned())
}

/// Percent-decodes `s` into UTF-8.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a '%' not followed by two hex digits".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 once percent-decoded".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> Parsed {
        parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn problem(url: &str) -> String {
        match parse(url) {
            Err(ConfigError::InvalidBackendUrl { problem, .. }) => problem,
            other => panic!("{url}: expected an invalid-string error, got {other:?}"),
        }
    }

    #[test]
    fn host_lists_ports_and_tls_are_parsed() {
        let p = ok("etcd://127.0.0.1:2379");
        assert_eq!(p.endpoints, ["127.0.0.1:2379"]);
        assert!(!p.tls);
        assert_eq!(p.user, None);
        assert_eq!(p.prefix, None);

        let p = ok("etcds://a.example:2379,b.example,[::1]:23790,[fe80::1]/");
        assert!(p.tls);
        assert_eq!(
            p.endpoints,
            [
                "a.example:2379",
                "b.example:2379",
                "[::1]:23790",
                "[fe80::1]:2379"
            ]
        );
    }

    #[test]
    fn user_password_and_prefix_are_decoded() {
        let p = ok("etcd://root:p%40ss%3Aword@h1:1,h2:2?prefix=/apps/billing/");
        assert_eq!(p.user, Some(("root".to_owned(), "p@ss:word".to_owned())));
        assert_eq!(p.endpoints, ["h1:1", "h2:2"]);
        assert_eq!(p.prefix.as_deref(), Some("apps/billing"));
        let p = ok("etcd://alice@h?prefix=x");
        assert_eq!(p.user, Some(("alice".to_owned(), String::new())));
    }

    #[test]
    fn malformed_strings_are_refused_with_the_reason() {
        assert!(problem("etcd://").contains("empty host"));
        assert!(problem("etcd://a,,b").contains("empty host"));
        assert!(problem("etcd://h:0").contains(r#"port "0" of host "h:0""#));
        assert!(problem("etcd://h:99999").contains(r#"port "99999" of host "h:99999""#));
        assert!(problem("etcd://h:x").contains(r#"port "x" of host "h:x""#));
        assert!(problem("etcd://h/db").contains("no path"));
        assert!(problem("etcd://[::1").contains("unclosed"));
        assert!(problem("etcd://[::1]x").contains("':port'"));
        assert!(problem("etcd://h?namespace=x").contains("unknown parameter"));
        assert!(problem("etcd://h?prefix=").contains("1 to 200"));
        assert!(problem("etcd://h?prefix=a//b").contains("empty segment"));
        assert!(problem("etcd://h?prefix=a%20b").contains("may only hold"));
        assert!(problem("etcd://h%20x").contains("invalid host"));
        assert!(problem("etcd://:pw@h").contains("empty user"));
        assert!(problem("redis://h").contains("etcd://"));
    }

    /// The whole problem, as users read it.
    #[test]
    fn problems_name_the_bad_part() {
        for (url, expected) in [
            (
                "etcd://h:x",
                r#"port "x" of host "h:x": expected a number from 1 to 65535"#,
            ),
            (
                "etcd://a:1,b:70000",
                r#"port "70000" of host "b:70000": expected a number from 1 to 65535"#,
            ),
            (
                "etcd://h?prefix=x&lease=5s",
                r#"unknown parameter "lease" (etcd strings take only `prefix`)"#,
            ),
            ("etcd://h?=x", r#"parameter "=x" has no name"#),
            ("etcd://h%20x", r#"invalid host name "h%20x""#),
            ("etcd://[::1", r#"host "[::1": unclosed '['"#),
        ] {
            assert_eq!(problem(url), expected, "{url}");
        }
        let err = parse("etcd://root:hunter2@h:x").unwrap_err().to_string();
        assert_eq!(
            err,
            r#"invalid backend string "etcd://root:***@h:x": port "x" of host "h:x": expected a number from 1 to 65535"#
        );
    }

    #[test]
    fn errors_never_repeat_the_password() {
        for url in [
            "etcd://root:hunter2@h:0",
            "etcd://root:hunter2%zz@h",
            "etcd://root:hunter2@h/path",
        ] {
            let msg = parse(url).unwrap_err().to_string();
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }
}
