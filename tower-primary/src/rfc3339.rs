//! Wall-clock times as RFC 3339 text with milliseconds (`2026-12-06T08:42:56.123Z`), for serde:
//! `#[serde(with = "crate::rfc3339")]`, or `crate::rfc3339::option` for an `Option`. For display
//! only: no decision is ever taken on a wall-clock time read back from a record.

use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serializer, de::Error};

pub(crate) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    humantime::parse_rfc3339_weak(&s).map_err(D::Error::custom)
}

/// The same for `Option<SystemTime>`; `None` is `null`.
pub(crate) mod option {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super")] SystemTime);
        Ok(<Option<Wrap>>::deserialize(d)?.map(|Wrap(t)| t))
    }
}
