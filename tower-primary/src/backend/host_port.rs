//! `host[:port]` of a backend string, IPv6 addresses in brackets: one splitter and one wording
//! of its errors for every backend's parser (each then checks the host name its own way).

/// Splits `hostport` into the host (brackets kept off an IPv6 address) and the port, checked to
/// be 1 to 65535. The error names the part that is wrong, as users read it.
pub(crate) fn split(hostport: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Err(format!("host {hostport:?}: unclosed '['"));
        };
        match after {
            "" => (addr, None),
            _ => (
                addr,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| format!("host {hostport:?}: expected ':port' after ']'"))?,
                ),
            ),
        }
    } else {
        match hostport.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    let port = match port {
        None => None,
        Some(text) => match text.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => {
                return Err(format!(
                    "port {text:?} of host {hostport:?}: expected a number from 1 to 65535"
                ));
            }
        },
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn hosts_ports_and_ipv6_addresses_split_or_say_what_is_wrong() {
        assert_eq!(split("h"), Ok(("h", None)));
        assert_eq!(split("h:5432"), Ok(("h", Some(5432))));
        assert_eq!(split("[::1]"), Ok(("::1", None)));
        assert_eq!(split("[::1]:6379"), Ok(("::1", Some(6379))));
        for (given, problem) in [
            (
                "h:x",
                r#"port "x" of host "h:x": expected a number from 1 to 65535"#,
            ),
            (
                "h:0",
                r#"port "0" of host "h:0": expected a number from 1 to 65535"#,
            ),
            (
                "h:",
                r#"port "" of host "h:": expected a number from 1 to 65535"#,
            ),
            ("[::1", r#"host "[::1": unclosed '['"#),
            ("[::1]x", r#"host "[::1]x": expected ':port' after ']'"#),
        ] {
            assert_eq!(split(given), Err(problem.to_owned()), "{given}");
        }
    }
}
