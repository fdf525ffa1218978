//! The keys of a lock and the Lua scripts that change them, with the parsing of their replies.

use std::sync::LazyLock;

use ::redis::Script;

use super::NAME;
use crate::error::Error;

/// The keys and channels of one lock.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    pub(super) lock: String,
    pub(super) holder: String,
    pub(super) term: String,
    /// The lease record: `until` (server ms) and `max_ms`; never expires.
    pub(super) lease: String,
    /// The prefix of abandoned acquisitions' tombstones.
    pub(super) abandoned: String,
    pub(super) state: String,
    pub(super) channel: String,
    /// The reservation: a string naming the node the lock is reserved for, `PX window`.
    pub(super) reserved: String,
    /// The candidate registry: a hash, node → `<until ms> <registration id> <entry JSON>`.
    pub(super) candidates: String,
    /// The registry's channel (`candidates` at every change).
    pub(super) registry: String,
    /// The keyspace channel of the lock key, and the database's expired-keys channel.
    pub(super) keyspace: String,
    pub(super) keyevent: String,
}

impl Keys {
    pub(super) fn new(prefix: &str, name: &str, info: &::redis::ConnectionInfo) -> Self {
        let tag = format!("{{{prefix}:{name}}}");
        let db = info.redis_settings().db();
        let lock = format!("{tag}:lock");
        Keys {
            keyspace: format!("__keyspace@{db}__:{lock}"),
            keyevent: format!("__keyevent@{db}__:expired"),
            holder: format!("{tag}:holder"),
            term: format!("{tag}:term"),
            lease: format!("{tag}:lease"),
            abandoned: format!("{tag}:abandoned:"),
            state: format!("{tag}:state:"),
            channel: format!("{tag}:events"),
            reserved: format!("{tag}:reserved"),
            candidates: format!("{tag}:candidates"),
            registry: format!("{tag}:registry"),
            lock,
        }
    }

    pub(super) fn state(&self, key: &str) -> String {
        format!("{}{key}", self.state)
    }

    pub(super) fn abandoned(&self, token: &str) -> String {
        format!("{}{token}", self.abandoned)
    }
}

/// `newer(a, b)`: whether the decimal string `a` is a larger number than `b` (exact for any u64,
/// where Lua's numbers are doubles).
const LUA_NEWER: &str = "local function newer(a, b) return #a > #b or (#a == #b and a > b) end\n";

/// `now_ms()`: the server's `TIME` in milliseconds (exact in a Lua double for millennia).
const LUA_NOW: &str = "local function now_ms() local t = redis.call('TIME') \
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end\n";

/// The functions the acquire and resume scripts share; their KEYS are the same: lock, holder,
/// term, lease record, tombstone.
///
/// - `evicting(allowed)`: the server's `maxmemory-policy` when it may evict keys and eviction
///   is not `allowed` (`'1'`), else `nil`.
/// - `lease_checks(lease, max, guard, now)`: the checks before a grant, on the lease record.
///   Returns a reply that stops the script (`wait`, `too_long`), or `nil`, the recorded maximum
///   lease and the recorded `until`.
/// - `regranted(lease, now)`: the reply to a retry of a request that was granted but whose reply
///   was lost; renews the lease.
/// - `next_term()`: draws a term, `max(last + 1, server TIME in µs)`, as the decimal string stored.
/// - `grant(token, lease, record, now, channel)`: with the lock key already set to `token`,
///   draws the term, writes the holder record and the lease's end, publishes `acquired`, and
///   returns the term.
const LUA_GRANT: &str = r"
local function evicting(allowed)
  if allowed == '1' then return nil end
  local policy = string.match(redis.call('INFO', 'memory'), 'maxmemory_policy:([%w%-]+)')
  if policy and policy ~= 'noeviction' then return policy end
  return nil
end
local function lease_checks(lease, max, guard, now)
  local rec = redis.call('HMGET', KEYS[4], 'until', 'max_ms')
  if not rec[1] then
    -- The record is gone (a fresh lock, FLUSHALL, a deleted key, a restart without data): a
    -- holder may act for up to the maximum lease.
    redis.call('HSET', KEYS[4], 'until', tostring(now + max), 'max_ms', tostring(math.max(max, tonumber(rec[2]) or 0)))
    return {'wait', tostring(max)}
  end
  local recorded = tonumber(rec[2])
  if recorded and lease > recorded then return {'too_long', rec[2]} end
  if not recorded or recorded < max then
    redis.call('HSET', KEYS[4], 'max_ms', tostring(max))
    recorded = max
  end
  local up = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)')) or 0
  local wait = recorded + guard - up * 1000
  if wait > 0 then return {'wait', tostring(wait)} end
  return nil, recorded, tonumber(rec[1]) or 0
end
local function regranted(lease, now)
  redis.call('PEXPIRE', KEYS[1], lease)
  redis.call('PEXPIRE', KEYS[2], lease)
  local u = tonumber(redis.call('HGET', KEYS[4], 'until'))
  if not u or u < now + lease then redis.call('HSET', KEYS[4], 'until', tostring(now + lease)) end
  return {'granted', redis.call('HGET', KEYS[2], 'term'), redis.call('HGET', KEYS[4], 'max_ms') or ''}
end
local function next_term()
  local t = redis.call('TIME')
  local stamp = t[1] .. string.format('%06d', tonumber(t[2]))
  local last = redis.call('GET', KEYS[3])
  if last and not newer(stamp, last) then
    redis.call('INCR', KEYS[3])
  else
    redis.call('SET', KEYS[3], stamp)
  end
  return redis.call('GET', KEYS[3])
end
local function grant(token, lease, record, now, channel)
  local term = next_term()
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'token', token, 'term', term, 'lease_ms', tostring(lease), 'record', record)
  redis.call('PEXPIRE', KEYS[2], lease)
  local u = tonumber(redis.call('HGET', KEYS[4], 'until'))
  if not u or u < now + lease then redis.call('HSET', KEYS[4], 'until', tostring(now + lease)) end
  redis.call('PUBLISH', channel, 'acquired ' .. term)
  return term
end
";

/// `ours(token, term)`: whether the lock key (`KEYS[1]`) holds `token` and the holder record
/// (`KEYS[2]`) the term `term`, both as the client sent them: the check of every script a holder
/// runs, so that a late request of a term that was resumed under a newer one is refused.
const LUA_OURS: &str = "local function ours(token, term) \
return redis.call('GET', KEYS[1]) == token and redis.call('HGET', KEYS[2], 'term') == term end\n";

/// KEYS: lock, holder, term, lease record, this token's tombstone, reservation. ARGV: token,
/// lease ms, record JSON, maximum lease ms, channel, eviction allowed (`1`/`0`), restart guard
/// ms, node id.
///
/// A live reservation for another node refuses the grant (`reserved`, with its `PTTL`); a
/// reservation for this node is consumed by the grant.
/// Returns `{"granted", term, max ms}`, `{"held", pttl, holder lease ms}`, `{"reserved", pttl,
/// node}`, `{"wait", ms}`, `{"policy", maxmemory-policy}`, `{"too_long", max ms}` or
/// `{"abandoned"}`.
pub(super) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NEWER}{LUA_NOW}{LUA_GRANT}{}",
        r"
if redis.call('EXISTS', KEYS[5]) == 1 then return {'abandoned'} end
local policy = evicting(ARGV[6])
if policy then return {'policy', policy} end
local lease = tonumber(ARGV[2])
local now = now_ms()
local mine = redis.call('GET', KEYS[1])
-- Granted by an earlier try of this acquisition whose reply was lost.
if mine == ARGV[1] then return regranted(lease, now) end
if mine then
  return {'held', tostring(redis.call('PTTL', KEYS[1])), redis.call('HGET', KEYS[2], 'lease_ms') or ''}
end
local reserved = redis.call('GET', KEYS[6])
if reserved and reserved ~= ARGV[8] then
  return {'reserved', tostring(redis.call('PTTL', KEYS[6])), reserved}
end
local stop, recorded, u = lease_checks(lease, tonumber(ARGV[4]), tonumber(ARGV[7]), now)
if stop then return stop end
if now < u then return {'wait', tostring(u - now)} end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', lease) then
  return {'held', tostring(redis.call('PTTL', KEYS[1])), ''}
end
if reserved then redis.call('DEL', KEYS[6]) end
local term = grant(ARGV[1], lease, ARGV[3], now, ARGV[5])
return {'granted', term, tostring(recorded)}
"
    ))
});

/// KEYS: lock, holder, term, lease record, the new token's tombstone (and the reservation,
/// unused). ARGV: the resumed token, its term, the new token, lease ms, record JSON, maximum
/// lease ms, channel, eviction allowed (`1`/`0`), restart guard ms (and the node id, unused).
/// A resumption continues a held lease, so a reservation neither stops nor is consumed by it.
///
/// Only while the lock key holds the resumed token and the holder record its term: the lock key
/// passes to the new token, a new term is drawn as at acquisition, the holder record is rewritten
/// and the lease starts again. The checks of acquisition apply (eviction, the holder's lease,
/// the maximum lease, the restart guard), but not the wait for the lease's end: the lease being
/// resumed is that end. Returns `{"granted", term, max ms}`, `{"gone"}` (the lease is not the
/// token's any more), `{"lease", holder lease ms}` (another lease than this node's), `{"wait",
/// ms}`, `{"policy", maxmemory-policy}`, `{"too_long", max ms}` or `{"abandoned"}`.
pub(super) static RESUME: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NEWER}{LUA_NOW}{LUA_GRANT}{}",
        r"
if redis.call('EXISTS', KEYS[5]) == 1 then return {'abandoned'} end
local policy = evicting(ARGV[8])
if policy then return {'policy', policy} end
local lease = tonumber(ARGV[4])
local now = now_ms()
local mine = redis.call('GET', KEYS[1])
-- Resumed by an earlier try of this resumption whose reply was lost.
if mine == ARGV[3] then return regranted(lease, now) end
if mine ~= ARGV[1] or redis.call('HGET', KEYS[2], 'term') ~= ARGV[2] then return {'gone'} end
local theirs = redis.call('HGET', KEYS[2], 'lease_ms')
if theirs and theirs ~= ARGV[4] then return {'lease', theirs} end
local stop, recorded = lease_checks(lease, tonumber(ARGV[6]), tonumber(ARGV[9]), now)
if stop then return stop end
redis.call('SET', KEYS[1], ARGV[3], 'XX', 'PX', lease)
local term = grant(ARGV[3], lease, ARGV[5], now, ARGV[7])
return {'granted', term, tostring(recorded)}
"
    ))
});

/// KEYS: lock, holder, lease record. ARGV: token, lease ms, term. Returns 1 if renewed, 0 if
/// the lock key or the term is not ours.
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NOW}{LUA_OURS}{}",
        r"
if ours(ARGV[1], ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  local ends = now_ms() + tonumber(ARGV[2])
  local u = tonumber(redis.call('HGET', KEYS[3], 'until'))
  if not u or u < ends then redis.call('HSET', KEYS[3], 'until', tostring(ends)) end
  return 1
end
return 0
",
    ))
});

/// KEYS: lock, holder, lease record, this token's tombstone. ARGV: token, channel, tombstone ms
/// (`0`: none), term (empty: whichever term the token holds, for an abandoned request whose
/// term is unknown; its token is its own). Returns 1 if released, 0 if not ours. With a
/// tombstone, a later acquisition or resumption request carrying this token is refused.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NOW}{}",
        r"
if ARGV[3] ~= '0' then redis.call('SET', KEYS[4], '1', 'PX', ARGV[3]) end
local term = redis.call('HGET', KEYS[2], 'term') or ''
if redis.call('GET', KEYS[1]) == ARGV[1] and (ARGV[4] == '' or term == ARGV[4]) then
  redis.call('DEL', KEYS[1], KEYS[2])
  -- Ours, so the recorded lease is ours: successors need not wait for it.
  redis.call('HSET', KEYS[3], 'until', tostring(now_ms()))
  redis.call('PUBLISH', ARGV[2], 'released ' .. term)
  return 1
end
return 0
",
    ))
});

/// KEYS: lock, holder, reservation. ARGV: token, term, node, window ms. Only while the lock
/// key holds `token` and the holder record `term`: reserves the lock for `node` for the window
/// (replacing any earlier reservation). Returns `{"ok"}` or `{"stale", the holder's term or
/// ""}`.
pub(super) static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_OURS}{}",
        r"
if not ours(ARGV[1], ARGV[2]) then
  return {'stale', redis.call('HGET', KEYS[2], 'term') or ''}
end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
return {'ok'}
"
    ))
});

/// KEYS: lock, holder, state. ARGV: token, term, value, channel, state key.
/// Returns `{"ok"}` or `{"stale", the holder's or the value's newer term, or ""}`.
pub(super) static STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_NEWER}{LUA_OURS}{}",
        r"
if not ours(ARGV[1], ARGV[2]) then
  return {'stale', redis.call('HGET', KEYS[2], 'term') or ''}
end
local stored = redis.call('HGET', KEYS[3], 'term')
if stored and newer(stored, ARGV[2]) then return {'stale', stored} end
redis.call('HSET', KEYS[3], 'value', ARGV[3], 'term', ARGV[2])
redis.call('PUBLISH', ARGV[4], 'state ' .. ARGV[5])
return {'ok'}
"
    ))
});

pub(super) fn parse_term(what: &str, s: &str) -> Result<u64, Error> {
    s.parse().map_err(|_| Error::Corrupt {
        backend: NAME,
        what: what.to_owned(),
        problem: format!("term {s:?} is not a number"),
    })
}

pub(super) fn unexpected(what: &str, reply: &[String]) -> Error {
    Error::backend_msg(NAME, format!("{what}: unexpected reply {reply:?}"))
}

/// What the acquire or the resume script answered.
pub(super) enum Reply {
    Granted {
        term: u64,
        max_ms: Option<u64>,
    },
    Held {
        pttl_ms: i64,
        lease_ms: Option<u64>,
    },
    /// Reserved for another node, for `pttl_ms` more.
    Reserved {
        pttl_ms: i64,
    },
    /// Resume: the lease is no longer the token's.
    Gone,
    /// Resume: the holder's lease (ms) differs from this node's.
    OtherLease(u64),
    Wait(u64),
    Policy(String),
    TooLong(u64),
    Abandoned,
}

pub(super) fn parse_reply(reply: &[String]) -> Result<Reply, Error> {
    let number = |s: &String| s.parse::<u64>().map_err(|_| unexpected("acquire", reply));
    match reply {
        [kind, term, rest @ ..] if kind == "granted" => Ok(Reply::Granted {
            term: parse_term("term", term)?,
            max_ms: rest.first().and_then(|m| m.parse().ok()),
        }),
        [kind, pttl, lease] if kind == "held" => Ok(Reply::Held {
            pttl_ms: pttl.parse().map_err(|_| unexpected("acquire", reply))?,
            lease_ms: lease.parse().ok(),
        }),
        [kind, pttl, _node] if kind == "reserved" => Ok(Reply::Reserved {
            pttl_ms: pttl.parse().map_err(|_| unexpected("acquire", reply))?,
        }),
        [kind, ms, ..] if kind == "wait" => Ok(Reply::Wait(number(ms)?)),
        [kind, policy] if kind == "policy" => Ok(Reply::Policy(policy.clone())),
        [kind, max] if kind == "too_long" => Ok(Reply::TooLong(number(max)?)),
        [kind] if kind == "abandoned" => Ok(Reply::Abandoned),
        [kind] if kind == "gone" => Ok(Reply::Gone),
        [kind, ms] if kind == "lease" => Ok(Reply::OtherLease(number(ms)?)),
        _ => Err(unexpected("acquire", reply)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::RedisBackend;
    use super::*;

    #[test]
    fn keys_share_one_hash_tag_and_name_the_database() {
        let b = RedisBackend::new("redis://h/2?prefix=p").unwrap();
        let k = Keys::new("p", "jobs", b.client.get_connection_info());
        assert_eq!(k.lock, "{p:jobs}:lock");
        assert_eq!(k.holder, "{p:jobs}:holder");
        assert_eq!(k.term, "{p:jobs}:term");
        assert_eq!(k.lease, "{p:jobs}:lease");
        assert_eq!(k.abandoned("t0"), "{p:jobs}:abandoned:t0");
        assert_eq!(k.state("x.y"), "{p:jobs}:state:x.y");
        assert_eq!(k.channel, "{p:jobs}:events");
        assert_eq!(k.reserved, "{p:jobs}:reserved");
        assert_eq!(k.candidates, "{p:jobs}:candidates");
        assert_eq!(k.registry, "{p:jobs}:registry");
        assert_eq!(k.keyspace, "__keyspace@2__:{p:jobs}:lock");
        assert_eq!(k.keyevent, "__keyevent@2__:expired");
    }

    #[test]
    fn acquire_replies_are_parsed() {
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(matches!(
            parse_reply(&s(&["granted", "1796022380000063", "30000"])),
            Ok(Reply::Granted {
                term: 1_796_022_380_000_063,
                max_ms: Some(30_000)
            })
        ));
        assert!(matches!(
            parse_reply(&s(&["granted", "7", ""])),
            Ok(Reply::Granted {
                term: 7,
                max_ms: None
            })
        ));
        assert!(matches!(
            parse_reply(&s(&["held", "1234", "2000"])),
            Ok(Reply::Held {
                pttl_ms: 1234,
                lease_ms: Some(2000)
            })
        ));
        assert!(matches!(
            parse_reply(&s(&["held", "-1", ""])),
            Ok(Reply::Held {
                pttl_ms: -1,
                lease_ms: None
            })
        ));
        assert!(matches!(
            parse_reply(&s(&["reserved", "1500", "b"])),
            Ok(Reply::Reserved { pttl_ms: 1500 })
        ));
        assert!(matches!(
            parse_reply(&s(&["wait", "900"])),
            Ok(Reply::Wait(900))
        ));
        assert!(matches!(
            parse_reply(&s(&["policy", "volatile-lru"])),
            Ok(Reply::Policy(p)) if p == "volatile-lru"
        ));
        assert!(matches!(
            parse_reply(&s(&["too_long", "5000"])),
            Ok(Reply::TooLong(5000))
        ));
        assert!(matches!(
            parse_reply(&s(&["abandoned"])),
            Ok(Reply::Abandoned)
        ));
        assert!(matches!(parse_reply(&s(&["gone"])), Ok(Reply::Gone)));
        assert!(matches!(
            parse_reply(&s(&["lease", "2000"])),
            Ok(Reply::OtherLease(2000))
        ));
        assert!(parse_reply(&s(&["what"])).is_err());
        assert!(parse_reply(&s(&["wait", "soon"])).is_err());
    }
}
