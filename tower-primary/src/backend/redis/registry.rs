//! The candidate registry: one hash per lock, `{p:name}:candidates`, whose field per node holds
//! `<until> <registration id> <entry JSON>`. `until` is the server's `TIME` (ms) plus the
//! registrant's lease (the elector's; the default lease without one; at least 1 s, the
//! backend's shortest), written by a script, so an entry's life is counted by the server alone;
//! the registration's task refreshes it every third of the lease. Reading filters out (and
//! deletes) the entries whose `until` has passed, so a dead node's entry is gone one lease after
//! its last refresh without anybody deleting it. Every change is published on
//! `{p:name}:registry`.
//!
//! One hash rather than a key per candidate: a read is one atomic script on declared keys (no
//! index set to keep in step with expiring keys, and Redis Cluster's rule that scripts name
//! their keys holds), and per-field expiry (`HPEXPIRE`) needs Redis 7.4.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::Script;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::lock::{LockShared, RedisLock, lease_ms, new_token};
use super::{COMMAND_TIMEOUT, MIN_LEASE, NAME};
use crate::backend::{BoxFuture, Candidate, Changes, Lease, Registration, VersionChanges};
use crate::error::Error;

/// `now_ms()` and `parse(value)`: the server's time in ms; an entry's `until`, registration id
/// and JSON (`nil` for a value of another format).
const LUA_ENTRY: &str = r"
local function now_ms() local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end
local function parse(value)
  local u, reg, json = string.match(value, '^(%d+) (%S+) (.*)$')
  if not u then return nil end
  return tonumber(u), reg, json
end
";

/// KEYS: the registry hash. ARGV: node, registration id, entry JSON, lease ms, channel,
/// refresh (`1`) or put (`0`).
///
/// A put writes the entry for the lease, replacing the node's entry whoever wrote it, and
/// publishes. A refresh extends the registration's own live entry, keeping its JSON (an update
/// may have replaced it meanwhile), without publishing; it writes nothing while another live
/// registration of the node holds the field (`replaced`), and writes its entry again, and
/// publishes, when the field is gone or dead (Redis restarted or flushed, or the registrant was
/// cut off for longer than its lease). The hash itself expires two to three leases after its
/// latest write: after every entry, so that a reader finds a dead entry and announces it
/// (the elector reads at least once a lease), and not never, should all nodes be gone.
/// Returns `added`, `kept` or `replaced`.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_ENTRY}{}",
        r"
local now = now_ms()
local lease = tonumber(ARGV[4])
local old = redis.call('HGET', KEYS[1], ARGV[1])
local u, reg, json
if old then u, reg, json = parse(old) end
local live = u and u > now
local entry, reply = ARGV[3], 'added'
if ARGV[6] == '1' and live then
  if reg ~= ARGV[2] then return 'replaced' end
  entry, reply = json, 'kept'
end
redis.call('HSET', KEYS[1], ARGV[1], tostring(now + lease) .. ' ' .. ARGV[2] .. ' ' .. entry)
if redis.call('PTTL', KEYS[1]) < 2 * lease then redis.call('PEXPIRE', KEYS[1], 3 * lease) end
if reply == 'added' then redis.call('PUBLISH', ARGV[5], 'candidates') end
return reply
"
    ))
});

/// KEYS: the registry hash. ARGV: node, registration id, channel. Deletes the node's entry if
/// this registration wrote it, and publishes. Returns 1 if deleted.
static WITHDRAW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_ENTRY}{}",
        r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
local _, reg = parse(old)
if reg ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[3], 'candidates')
return 1
"
    ))
});

/// KEYS: the registry hash. ARGV: channel. Returns the JSON of the live entries; deletes the
/// dead ones (and values of another format), and publishes if it deleted any, so that every
/// watcher learns of a death that one reader found.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_ENTRY}{}",
        r"
local now = now_ms()
local all = redis.call('HGETALL', KEYS[1])
local live, gone = {}, 0
for i = 1, #all, 2 do
  local u, _, json = parse(all[i + 1])
  if u and u > now then
    live[#live + 1] = json
  else
    redis.call('HDEL', KEYS[1], all[i])
    gone = gone + 1
  end
end
if gone > 0 then redis.call('PUBLISH', ARGV[1], 'candidates') end
return live
"
    ))
});

/// What the put script answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Put {
    Added,
    Kept,
    Replaced,
}

async fn put(
    shared: &LockShared,
    node: &str,
    reg: &str,
    json: &str,
    lease_ms: u64,
    refresh: bool,
    limit: Duration,
) -> Result<Put, Error> {
    let what = if refresh {
        "refresh the registration"
    } else {
        "register"
    };
    let reply = shared
        .commands
        .run(what, limit, |mut c| {
            let keys = shared.keys.clone();
            let (node, reg, json) = (node.to_owned(), reg.to_owned(), json.to_owned());
            async move {
                PUT.key(&keys.candidates)
                    .arg(&node)
                    .arg(&reg)
                    .arg(&json)
                    .arg(lease_ms)
                    .arg(&keys.registry)
                    .arg(if refresh { "1" } else { "0" })
                    .invoke_async::<String>(&mut c)
                    .await
            }
        })
        .await?;
    match reply.as_str() {
        "added" => Ok(Put::Added),
        "kept" => Ok(Put::Kept),
        "replaced" => Ok(Put::Replaced),
        _ => Err(Error::backend_msg(
            NAME,
            format!("{what}: unexpected reply {reply:?}"),
        )),
    }
}

async fn withdraw(shared: &LockShared, node: &str, reg: &str) -> Result<bool, Error> {
    shared
        .commands
        .run("withdraw the registration", COMMAND_TIMEOUT, |mut c| {
            let keys = shared.keys.clone();
            let (node, reg) = (node.to_owned(), reg.to_owned());
            async move {
                WITHDRAW
                    .key(&keys.candidates)
                    .arg(&node)
                    .arg(&reg)
                    .arg(&keys.registry)
                    .invoke_async::<i64>(&mut c)
                    .await
            }
        })
        .await
        .map(|n| n == 1)
}

fn encode(entry: &Candidate) -> Result<String, Error> {
    serde_json::to_string(entry).map_err(|e| Error::backend(NAME, "encode the candidate entry", e))
}

impl RedisLock {
    /// [`Lock::register`](crate::backend::Lock::register): puts the entry, then refreshes it from
    /// a task of the registration's.
    pub(super) async fn register_candidate(
        &self,
        entry: Candidate,
        lease: Option<Lease>,
    ) -> Result<Box<dyn Registration>, Error> {
        let ttl = lease.unwrap_or_default().ttl().max(MIN_LEASE);
        let ms = lease_ms(ttl);
        let node = entry.node.clone();
        let reg = new_token();
        let json = encode(&entry)?;
        put(&self.shared, &node, &reg, &json, ms, false, COMMAND_TIMEOUT).await?;
        let entry = Arc::new(tokio::sync::Mutex::new(json));
        let task = tokio::spawn(refresh(
            self.shared.clone(),
            node.clone(),
            reg.clone(),
            entry.clone(),
            ms,
        ));
        Ok(Box::new(RedisRegistration {
            shared: self.shared.clone(),
            node,
            reg,
            lease_ms: ms,
            entry,
            task,
        }))
    }

    /// [`Lock::candidates`](crate::backend::Lock::candidates): the live entries. An entry that
    /// does not decode (another program's, a future version's) is skipped with a warning.
    pub(super) async fn read_candidates(&self) -> Result<Vec<Candidate>, Error> {
        let entries = self
            .shared
            .commands
            .run("read the candidates", COMMAND_TIMEOUT, |mut c| {
                let keys = self.shared.keys.clone();
                async move {
                    READ.key(&keys.candidates)
                        .arg(&keys.registry)
                        .invoke_async::<Vec<String>>(&mut c)
                        .await
                }
            })
            .await?;
        Ok(entries
            .iter()
            .filter_map(|json| match serde_json::from_str::<Candidate>(json) {
                Ok(c) => Some(c),
                Err(err) => {
                    tracing::warn!(lock = %self.shared.name, error = %err, "skipping a candidate entry that does not decode");
                    None
                }
            })
            .collect())
    }

    /// [`Lock::watch_candidates`](crate::backend::Lock::watch_candidates): the registry's
    /// channel, live before this returns.
    pub(super) async fn watch_registry(&self) -> Result<Box<dyn Changes>, Error> {
        self.shared.ensure_subscriber();
        let rx = self.shared.events.candidates.subscribe();
        self.shared.events.wait_live(&self.shared.name).await?;
        Ok(Box::new(VersionChanges(rx)) as Box<dyn Changes>)
    }
}

/// The refresh loop: every third of the lease; after a failure, again soon (the entry lives one
/// lease from its last refresh).
async fn refresh(
    shared: Arc<LockShared>,
    node: String,
    reg: String,
    entry: Arc<tokio::sync::Mutex<String>>,
    lease_ms: u64,
) {
    let every = Duration::from_millis(lease_ms / 3);
    let limit = every.clamp(Duration::from_millis(100), COMMAND_TIMEOUT);
    let retry = (every / 4).max(Duration::from_millis(50));
    let mut next = Instant::now() + every;
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        // Held across the call: an update's entry is never overwritten by an older one.
        let json = entry.lock().await;
        let res = put(&shared, &node, &reg, &json, lease_ms, true, limit).await;
        drop(json);
        match res {
            Ok(put) => {
                if put == Put::Added {
                    tracing::info!(lock = %shared.name, node = %node, "the registry had lost this node's entry; entered it again");
                }
                next = sent + every;
            }
            Err(err) => {
                tracing::debug!(lock = %shared.name, error = %err, "refreshing the registration failed; retrying");
                next = Instant::now() + retry;
            }
        }
    }
}

/// A node's entry in a Redis registry: refreshed by its task, withdrawn on drop.
struct RedisRegistration {
    shared: Arc<LockShared>,
    node: String,
    reg: String,
    lease_ms: u64,
    entry: Arc<tokio::sync::Mutex<String>>,
    task: JoinHandle<()>,
}

impl fmt::Debug for RedisRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRegistration")
            .field("lock", &self.shared.name)
            .field("node", &self.node)
            .field("lease_ms", &self.lease_ms)
            .finish_non_exhaustive()
    }
}

impl Registration for RedisRegistration {
    fn update(&self, entry: Candidate) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let json = encode(&entry)?;
            let mut current = self.entry.lock().await;
            // The wanted entry, also for the refresh to write should the registry lose it.
            current.clone_from(&json);
            put(
                &self.shared,
                &self.node,
                &self.reg,
                &json,
                self.lease_ms,
                false,
                COMMAND_TIMEOUT,
            )
            .await?;
            Ok(())
        })
    }
}

impl Drop for RedisRegistration {
    fn drop(&mut self) {
        self.task.abort();
        let (shared, node, reg) = (self.shared.clone(), self.node.clone(), self.reg.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(err) = withdraw(&shared, &node, &reg).await {
                    tracing::debug!(lock = %shared.name, error = %err, "cannot withdraw the registration; it runs out with its lease");
                }
            });
        }
    }
}
