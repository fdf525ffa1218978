//! Which URLs a node may advertise and the gate may send clients to: advertised URLs and trusted
//! origins. Below both the elector (which checks the URL a node advertises) and the gate (which
//! checks a holder's URL again before redirecting to it); public as
//! [`http::require::Origin`](crate::http::require::Origin).

use std::fmt;
use std::str::FromStr;

use http::Uri;
use http::uri::Scheme;

use crate::error::ConfigError;

/// An HTTP origin: `http` or `https`, a host and a port, nothing else.
///
/// The entries of
/// [`RequirePrimaryLayer::trusted_origins`](crate::RequirePrimaryLayer::trusted_origins). Parsed
/// with [`http::Uri`]; the host is compared without regard to case and a missing port is the
/// scheme's default, so `http://Web-1` and `http://web-1:80` are the same origin.
///
/// # Examples
///
/// ```
/// use tower_primary::http::require::Origin;
///
/// let origin: Origin = "http://10.0.0.7:8080".parse()?;
/// assert_eq!(origin.to_string(), "http://10.0.0.7:8080");
/// let origin: Origin = "HTTPS://Primary.Example:443/".parse()?;
/// assert_eq!(origin.to_string(), "https://primary.example");
///
/// // Not an origin: a path, user information, another scheme.
/// assert!("http://10.0.0.7:8080/app".parse::<Origin>().is_err());
/// assert!("http://admin@10.0.0.7".parse::<Origin>().is_err());
/// let err = "ftp://10.0.0.7".parse::<Origin>().unwrap_err();
/// assert!(err.to_string().starts_with("invalid origin \"ftp://10.0.0.7\""));
/// # Ok::<_, tower_primary::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    https: bool,
    /// Lower case; IPv6 addresses keep their brackets.
    host: String,
    /// The effective port: the scheme's default when none was given.
    port: u16,
}

impl Origin {
    /// Parses an origin: `http://host[:port]` or `https://host[:port]`, optionally followed by
    /// `/`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidUrl`] with setting `"origin"` and the rule the string broke.
    pub fn parse(origin: &str) -> Result<Origin, ConfigError> {
        let invalid = |rule| ConfigError::InvalidUrl {
            setting: "origin",
            url: origin.to_owned(),
            rule,
        };
        let url = AdvertisedUrl::parse(origin).map_err(invalid)?;
        if !url.prefix.is_empty() {
            return Err(invalid("an origin has no path"));
        }
        Ok(url.origin)
    }

    /// `"http"` or `"https"`.
    #[must_use]
    pub fn scheme(&self) -> &str {
        if self.https { "https" } else { "http" }
    }

    /// The host, in lower case (an IPv6 address in brackets).
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port: the one given, or the scheme's default (80, 443).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    fn default_port(https: bool) -> u16 {
        if https { 443 } else { 80 }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.host)?;
        if self.port != Origin::default_port(self.https) {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

impl FromStr for Origin {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Origin::parse(s)
    }
}

impl TryFrom<&str> for Origin {
    type Error = ConfigError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Origin::parse(s)
    }
}

/// A URL a node may advertise: an origin and an optional path prefix, which redirects put in
/// front of the request's path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AdvertisedUrl {
    pub(crate) origin: Origin,
    /// `scheme://authority` as given (validated), for the `Location`.
    base: String,
    /// Empty, or `/segment…` without a trailing slash.
    prefix: String,
}

/// The rule every advertised URL must follow, as error messages state it.
pub(crate) const ADVERTISED_URL_RULE: &str =
    "must be an absolute http:// or https:// URL: a host, an optional port and path prefix";

impl AdvertisedUrl {
    /// Checks `url`; the error is the rule it broke.
    pub(crate) fn parse(url: &str) -> Result<AdvertisedUrl, &'static str> {
        let uri = Uri::try_from(url).map_err(|_| ADVERTISED_URL_RULE)?;
        let https = match uri.scheme() {
            Some(s) if *s == Scheme::HTTPS => true,
            Some(s) if *s == Scheme::HTTP => false,
            _ => return Err(ADVERTISED_URL_RULE),
        };
        let authority = uri.authority().ok_or(ADVERTISED_URL_RULE)?;
        if authority.as_str().contains('@') {
            return Err("must not carry user information (user@ or user:password@)");
        }
        let host = authority.host();
        if host.is_empty() {
            return Err("must name a host");
        }
        // What `Uri` accepts but a port is not: `host:`, `host:99999`, `host:0`.
        let port = match authority.as_str().strip_prefix(host) {
            Some("") => None,
            Some(rest) => match authority.port_u16() {
                Some(p) if p != 0 && rest == format!(":{p}") => Some(p),
                _ => return Err("the port must be a number from 1 to 65535"),
            },
            None => return Err(ADVERTISED_URL_RULE),
        };
        // `Uri` drops a fragment silently; a URL that had one was not meant as a base.
        if uri.query().is_some() || url.contains('#') {
            return Err("must not have a query or a fragment");
        }
        let prefix = uri.path().trim_end_matches('/');
        Ok(AdvertisedUrl {
            origin: Origin {
                https,
                host: host.to_ascii_lowercase(),
                port: port.unwrap_or(Origin::default_port(https)),
            },
            base: format!("{}://{}", if https { "https" } else { "http" }, authority),
            prefix: prefix.to_owned(),
        })
    }

    /// This URL with the request's path and query appended.
    pub(crate) fn join(&self, path_and_query: &str) -> String {
        format!("{}{}{path_and_query}", self.base, self.prefix)
    }
}

/// Checks the URL given to [`ElectorBuilder::advertise`](crate::ElectorBuilder::advertise).
pub(crate) fn check_advertised(url: &str) -> Result<(), ConfigError> {
    AdvertisedUrl::parse(url)
        .map(drop)
        .map_err(|rule| ConfigError::InvalidUrl {
            setting: "advertise",
            url: url.to_owned(),
            rule,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_urls_keep_an_origin_and_a_path_prefix() {
        for (url, origin, joined) in [
            (
                "http://10.0.0.7:8080",
                "http://10.0.0.7:8080",
                "http://10.0.0.7:8080/a?b=1",
            ),
            (
                "http://10.0.0.7:8080/",
                "http://10.0.0.7:8080",
                "http://10.0.0.7:8080/a?b=1",
            ),
            (
                "https://P.example/app/",
                "https://p.example",
                "https://P.example/app/a?b=1",
            ),
            (
                "http://[::1]:8080",
                "http://[::1]:8080",
                "http://[::1]:8080/a?b=1",
            ),
            ("http://web-1:80", "http://web-1", "http://web-1:80/a?b=1"),
        ] {
            let parsed = AdvertisedUrl::parse(url).unwrap();
            assert_eq!(parsed.origin.to_string(), origin, "{url}");
            assert_eq!(parsed.join("/a?b=1"), joined, "{url}");
        }
    }

    #[test]
    fn anything_but_an_http_origin_and_a_path_is_refused() {
        for url in [
            "",
            "/admin",
            "//evil.example",
            "web-1:8080",
            "javascript:alert(1)",
            "ftp://web-1",
            "http://",
            "http://user@web-1",
            "http://user:pw@web-1:8080",
            "http://web-1:",
            "http://web-1:0",
            "http://web-1:65536",
            "http://web-1:8080/?a=1",
            "http://web-1:8080/#top",
            "http://web-1:8080/a b",
            "http://web-1\r\n:8080",
        ] {
            assert!(AdvertisedUrl::parse(url).is_err(), "{url:?} accepted");
        }
    }

    #[test]
    fn origins_compare_by_effective_port_and_lower_case_host() {
        let a: Origin = "http://Web-1".parse().unwrap();
        let b: Origin = "http://web-1:80/".parse().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, "https://web-1".parse::<Origin>().unwrap());
        assert_ne!(a, "http://web-1:8080".parse::<Origin>().unwrap());
    }
}
