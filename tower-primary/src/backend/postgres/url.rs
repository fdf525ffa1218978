//! Checks of a `postgres://` string before the driver reads it, so that an error names the bad
//! part (the port, a host, the database name, a parameter) instead of the whole string.

use std::str::FromStr;

use super::config::percent_decode;

/// The parameters the crate reads itself.
const OURS: [&str; 4] = ["namespace", "schema", "sslmode", "sslrootcert"];

/// The parameters passed on to the driver.
const DRIVERS: [&str; 18] = [
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslnegotiation",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// Checks `[user[:password]@][host[:port][,…]][/database]` (what follows `://`, without the
/// query), as the driver splits it: the user information ends at the first `@`.
pub(super) fn check_head(head: &str) -> Result<(), String> {
    let hosts = match head.split_once('@') {
        Some((userinfo, rest)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            if percent_decode(user).is_none() {
                return Err("user name: bad percent-encoding or not UTF-8".to_owned());
            }
            rest
        }
        None => head,
    };
    let (hosts, database) = match hosts.split_once('/') {
        Some((hosts, database)) => (hosts, Some(database)),
        None => (hosts, None),
    };
    if !hosts.is_empty() {
        for host in hosts.split(',') {
            check_host(host)?;
        }
    }
    if let Some(database) = database
        && percent_decode(database).is_none()
    {
        return Err(format!(
            "database name {database:?}: bad percent-encoding or not UTF-8"
        ));
    }
    Ok(())
}

/// Checks one `host[:port]` (IPv6 addresses in brackets).
fn check_host(host: &str) -> Result<(), String> {
    let (name, _) = super::super::host_port::split(host)?;
    if !host.starts_with('[') && percent_decode(name).is_none() {
        return Err(format!("host {name:?}: bad percent-encoding or not UTF-8"));
    }
    Ok(())
}

/// Checks one `key=value` parameter passed on to the driver: a known name, a value it accepts.
pub(super) fn check_parameter(pair: &str) -> Result<(), String> {
    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
    if !DRIVERS.contains(&key) {
        return Err(format!(
            "unknown parameter {key:?}: expected one of {}, {}",
            OURS.join(", "),
            DRIVERS.join(", ")
        ));
    }
    if tokio_postgres::Config::from_str(&format!("postgres://?{pair}")).is_ok() {
        return Ok(());
    }
    let expected = match key {
        "port" => "a number from 1 to 65535",
        "connect_timeout" | "tcp_user_timeout" | "keepalives_idle" | "keepalives_interval" => {
            "whole seconds"
        }
        "keepalives" => "0 or 1",
        "keepalives_retries" => "a count",
        "target_session_attrs" => "any or read-write",
        "channel_binding" => "disable, prefer or require",
        "load_balance_hosts" => "disable or random",
        "sslnegotiation" => "postgres or direct",
        "hostaddr" => "IP addresses",
        _ => "a valid value",
    };
    // A password is never repeated, not even a malformed one.
    if key == "password" {
        return Err(format!("parameter {key:?}: invalid value"));
    }
    Err(format!(
        "parameter {key:?}: invalid value {value:?}, expected {expected}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_name_the_bad_part() {
        for head in [
            "root@h:5432/db",
            "h",
            "",
            "/db",
            "u:p@ss@h/db",
            "[::1]:5432,h2:5433/db",
            "[::1]/db",
        ] {
            check_head(head).unwrap_or_else(|e| panic!("{head}: {e}"));
        }
        for (head, problem) in [
            (
                "root@h:notaport/db",
                r#"port "notaport" of host "h:notaport": expected a number from 1 to 65535"#,
            ),
            (
                "h:0/db",
                r#"port "0" of host "h:0": expected a number from 1 to 65535"#,
            ),
            (
                "h:5432,h2:99999/db",
                r#"port "99999" of host "h2:99999": expected a number from 1 to 65535"#,
            ),
            ("[::1/db", r#"host "[::1": unclosed '['"#),
            ("[::1]x/db", r#"host "[::1]x": expected ':port' after ']'"#),
            (
                "h/d%ZZb",
                r#"database name "d%ZZb": bad percent-encoding or not UTF-8"#,
            ),
        ] {
            assert_eq!(check_head(head).unwrap_err(), problem, "{head}");
        }
    }

    #[test]
    fn parameters_name_the_bad_one() {
        for pair in [
            "connect_timeout=3",
            "application_name=app",
            "target_session_attrs=read-write",
        ] {
            check_parameter(pair).unwrap_or_else(|e| panic!("{pair}: {e}"));
        }
        let err = check_parameter("sslmod=require").unwrap_err();
        assert!(
            err.starts_with(
                r#"unknown parameter "sslmod": expected one of namespace, schema, sslmode"#
            ),
            "{err}"
        );
        assert_eq!(
            check_parameter("connect_timeout=soon").unwrap_err(),
            r#"parameter "connect_timeout": invalid value "soon", expected whole seconds"#
        );
        assert_eq!(
            check_parameter("port=x").unwrap_err(),
            r#"parameter "port": invalid value "x", expected a number from 1 to 65535"#
        );
        assert_eq!(
            check_parameter("target_session_attrs=primary").unwrap_err(),
            r#"parameter "target_session_attrs": invalid value "primary", expected any or read-write"#
        );
    }
}
