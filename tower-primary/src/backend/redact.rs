//! Passwords out of backend strings, for error messages and `Debug` output.

use crate::error::ConfigError;

/// The string with any password replaced by `***`, for error messages and `Debug` output.
///
/// Passwords are often pasted without percent-encoding, so the user information is taken to end
/// at the **last** `@` of the string (RFC 3986 would end it at the first `/`, `?` or `#`): a
/// password holding `/`, `@`, `?`, `#` or `:` is hidden whole. An `@` in a query value
/// (`?application_name=a@b`) after a head without a password (`[user@]host[:port][,…][/path]`)
/// is not taken for the end of a password; after a head with one, it is, and a little more than
/// the password is hidden. A `password=` query parameter (as PostgreSQL strings
/// may carry) is hidden too. A string without a password comes back as it is.
///
/// ```
/// use tower_primary::backend::redact;
///
/// assert_eq!(redact("redis://app:pa/ss@h:6379/0"), "redis://app:***@h:6379/0");
/// assert_eq!(
///     redact("postgres://h/db?password=x&sslmode=require"),
///     "postgres://h/db?password=***&sslmode=require"
/// );
/// assert_eq!(redact("postgres://root@127.0.0.1/test"), "postgres://root@127.0.0.1/test");
/// assert_eq!(redact("postgres://root@[::1]:5432/db?options=a@b"), "postgres://root@[::1]:5432/db?options=a@b");
/// ```
#[must_use]
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (head, tail) = match password_span(rest) {
        Some((start, end)) => (format!("{}***", &rest[..start]), &rest[end..]),
        None => (String::new(), rest),
    };
    format!("{scheme}://{head}{}", redact_password_parameters(tail))
}

/// Where the password of the user information is in `rest` (the string after `://`), if there
/// is a non-empty one: `user:password@`, the `@` being the last one that is not in a query value.
fn password_span(rest: &str) -> Option<(usize, usize)> {
    let at = rest.rfind('@')?;
    if let Some(q) = rest[..at].find('?') {
        // `head?…key=…@…`: an `@` in a query value when the head holds no password itself.
        let pair_start = rest[..at].rfind('&').filter(|a| *a > q).unwrap_or(q) + 1;
        if plain_head(&rest[..q]) && rest[pair_start..at].contains('=') {
            return None;
        }
    }
    let colon = rest[..at].find(':')?;
    // A `:` after a `/`, `?` or `#` is not in the user information.
    if rest[..colon].contains(['/', '?', '#']) || colon + 1 == at {
        return None;
    }
    Some((colon + 1, at))
}

/// Whether `head` reads as `[user@]host[:port][,host[:port]…][/path]` with no password.
fn plain_head(head: &str) -> bool {
    let authority = head.split('/').next().unwrap_or_default();
    let hosts = match authority.rsplit_once('@') {
        Some((user, hosts)) if !user.contains(':') => hosts,
        Some(_) => return false,
        None => authority,
    };
    hosts.split(',').all(|host| {
        let (name, port) = if let Some(v6) = host.strip_prefix('[') {
            match v6.split_once(']') {
                Some((addr, after))
                    if addr
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') =>
                {
                    match after.strip_prefix(':') {
                        Some(port) => ("", Some(port)),
                        None if after.is_empty() => ("", None),
                        None => return false,
                    }
                }
                _ => return false,
            }
        } else {
            match host.split_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (host, None),
            }
        };
        name.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'%'))
            && port.is_none_or(|p| p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// `password=…` parameters (after `?` or `&`) with their values replaced by `***`; a value runs
/// to the next `&`.
fn redact_password_parameters(text: &str) -> String {
    const KEY: &str = "password=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(KEY) {
        let starts_parameter =
            rest[..i].ends_with(['?', '&']) || (i == 0 && out.ends_with(['?', '&']));
        out.push_str(&rest[..i + KEY.len()]);
        rest = &rest[i + KEY.len()..];
        if starts_parameter {
            let end = rest.find('&').unwrap_or(rest.len());
            if end > 0 {
                out.push_str("***");
            }
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// The passwords `redact` hides in `url`, and the pieces of each between the characters that
/// parsers split at (`/ ? # @ : & =`), longest first: other code (a driver, a query parser) may
/// quote a piece in its message.
pub(crate) fn passwords_in(url: &str) -> Vec<&str> {
    const KEY: &str = "password=";
    let Some((_, rest)) = url.split_once("://") else {
        return Vec::new();
    };
    let mut whole = Vec::new();
    if let Some((start, end)) = password_span(rest) {
        whole.push(&rest[start..end]);
    }
    let mut query = rest;
    while let Some(i) = query.find(KEY) {
        let starts_parameter = query[..i].ends_with(['?', '&']);
        query = &query[i + KEY.len()..];
        if starts_parameter {
            whole.push(&query[..query.find('&').unwrap_or(query.len())]);
        }
    }
    let mut found: Vec<&str> = whole
        .iter()
        .flat_map(|p| std::iter::once(*p).chain(p.split(['/', '?', '#', '@', ':', '&', '='])))
        // Shorter pieces would mask ordinary words of a message.
        .filter(|p| p.len() >= 3)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.len()));
    found.dedup();
    found
}

/// A configuration error about `url` with every password of `url` masked in its message.
pub(crate) fn without_passwords(url: &str, err: ConfigError) -> ConfigError {
    match err {
        ConfigError::InvalidBackendUrl {
            url: shown,
            problem,
        } => {
            let mut problem = problem;
            for password in passwords_in(url) {
                problem = problem.replace(password, "***");
            }
            ConfigError::InvalidBackendUrl {
                url: shown,
                problem,
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_what_is_not_a_password() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://user@host/0", "redis://user@host/0"),
            (
                "postgres://root@127.0.0.1:5432/test",
                "postgres://root@127.0.0.1:5432/test",
            ),
            (
                "etcd://a:2379,b:2379?prefix=x",
                "etcd://a:2379,b:2379?prefix=x",
            ),
            ("/var/lib/app", "/var/lib/app"),
            ("file:///run/app", "file:///run/app"),
            ("redis://u:pw@h:1/0", "redis://u:***@h:1/0"),
            ("redis://u:pa/ss@h/0", "redis://u:***@h/0"),
            ("redis://:pw@h", "redis://:***@h"),
            ("postgres://u:p@w@h/db", "postgres://u:***@h/db"),
            (
                "postgres://h/db?user=u&password=pw&sslmode=require",
                "postgres://h/db?user=u&password=***&sslmode=require",
            ),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    /// `:***` only where a password is: never after a user alone, an IPv6 host or a port, nor
    /// for an `@` in a query value.
    #[test]
    fn redaction_adds_nothing_where_there_is_no_password() {
        for url in [
            "postgres://root@h:5432/db",
            "postgres://root@[::1]:5432/db",
            "postgres://[::1]:5432/db",
            "redis://[fe80::1%25eth0]:6379/0",
            "etcd://[::1]:2379,[::2]:2379?prefix=x",
            "postgres://root@h:5432/db?application_name=ops@host",
            "postgres://h:5432/db?options=a@b:c",
            "postgres://root@[::1]:5432/db?sslrootcert=/etc/a@b.pem&sslmode=require",
            "etcd://h1:2379,h2:2379?prefix=team@x",
            "postgres://u:@h/db",
            "postgres:///db?host=/run/postgresql",
        ] {
            assert_eq!(redact(url), url, "{url}");
            assert!(
                passwords_in(url).is_empty(),
                "{url}: {:?}",
                passwords_in(url)
            );
        }
    }

    #[test]
    fn redaction_hides_the_password_in_every_host_form() {
        for (url, shown) in [
            ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
            (
                "postgres://u:pw@[::1]:5432/db",
                "postgres://u:***@[::1]:5432/db",
            ),
            ("etcd://u:pw@[::1]:2379,h:1", "etcd://u:***@[::1]:2379,h:1"),
            ("redis://:pw@[::1]", "redis://:***@[::1]"),
            ("postgres://u:p?x@h/db", "postgres://u:***@h/db"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }
}
