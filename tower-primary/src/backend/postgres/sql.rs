//! The SQL the backend sends, built once per lock.
//!
//! Only numbers computed here and validated identifiers are put into the text; every value from
//! outside (names, records, state) goes in as a parameter. Statements on the lock session use the
//! simple-query protocol or unnamed statements (`query_typed`), never named prepared statements,
//! so that nothing depends on server-side statement state.
//!
//! # Mixing versions
//!
//! The holder table only grows: the columns `aux_pid` and `aux_term` (the second connection's
//! server process and the term it was recorded for) are added with `ADD COLUMN IF NOT EXISTS`,
//! nullable; the fencing bound (`lease_ms`), the process identity (`process`) and the clean
//! release mark (`released`) live in the holder JSON as optional fields. Nodes of 0.1.0 keep
//! working beside newer ones on one lock:
//!
//! - an old node reading a new row ignores the fields it does not know; its inserts name their
//!   columns, so they stay valid, and leave `aux_pid`/`aux_term` as they were — a newer node
//!   uses `aux_pid` only when `aux_term` equals the row's term. Newer holders keep taking the
//!   step-down lock that old successors wait for. An old successor does not wait for a fencing
//!   bound: beside old nodes, a holder that loses both connections at once can still overlap
//!   its successor as it could before.
//! - a new node reading an old row finds no `lease_ms`, `process` or `released`: no death
//!   certificate, so it waits the full bound (`max_fencing_bound`, by default the server's
//!   dead-peer detection, which old holders fenced their terms by).
//! - the tables `candidates` and `reservations` are new (created with `IF NOT EXISTS`; a schema
//!   that lacks them gets them from the first newer node). Old nodes never read them: they
//!   neither register nor list candidates, and they take the lock during another node's
//!   reservation like any free lock. They hear the new `registry` and `reservation`
//!   notifications on the lock's channel as holder changes and read the holder record once more.

use super::advisory_key;

/// The statements for one lock.
#[derive(Debug)]
pub(super) struct Sql {
    /// The advisory key.
    pub(super) key: i64,
    /// The NOTIFY channel of this lock.
    pub(super) channel: String,
    /// Simple query: `t` when the schema's objects exist.
    pub(super) setup_check: String,
    /// Simple query: creates the schema's objects, serialised by a transaction-level lock.
    pub(super) setup: String,
    /// Simple query: `LISTEN` on the channel.
    pub(super) listen: String,
    /// Simple query: (locks of the key this session held before, blocking lock, backend pid).
    pub(super) lock: String,
    /// Simple query: unlock once.
    pub(super) unlock: String,
    /// Simple query: unlock the key and, if a cancelled wait left it, the step-down lock.
    pub(super) give_back: String,
    /// Simple query: waits until no session holds the *step-down lock* (the two-int advisory
    /// lock of the same bits) in shared mode, i.e. until the previous holder has stepped down or
    /// its process is gone.
    pub(super) ack_wait: String,
    /// Simple query: takes the step-down lock in shared mode (second connection), `t` or `f`.
    pub(super) ack_take: String,
    /// Simple query: gives the shared step-down lock back.
    pub(super) ack_release: String,
    /// Typed: `$1` key, `$2` namespace, `$3` lock name → the last holder's JSON (the
    /// predecessor's record, read by a node that was just granted the key).
    pub(super) predecessor: String,
    /// Typed: marks the holder record of term `$2` as cleanly released (`$1` key).
    pub(super) mark_released: String,
    /// Typed: `$1` key, `$2` term, `$3` the second connection's new server process.
    pub(super) update_aux: String,
    /// Simple query with the wait in seconds appended: sleeps on the server (the session stays
    /// active, so no waiting node takes it for a stopped one).
    pub(super) sleep: String,
    /// Typed: ends the sessions of a node that holds the key while its lock session has been
    /// idle on the server for longer than `$2` milliseconds (a stopped process): that session
    /// and, when the holder row names it for the current term and it holds the step-down lock,
    /// its second connection. `$1` key → (lock sessions ended, second connections ended,
    /// holders whose activity this role cannot see).
    pub(super) end_stopped: String,
    /// Simple query: (backend pid, whether this backend holds the key).
    pub(super) held: String,
    /// Simple query: as `held`, and a new term from the sequence (its commit is durable when
    /// the sequence logs ahead).
    pub(super) held_term: String,
    /// Simple query: unlock, then NOTIFY (delivered at the end of the implicit transaction).
    pub(super) release: String,
    /// Typed: records the holder of term `$6`. `$1` key, `$2` namespace, `$3` lock name,
    /// `$4` holder JSON, `$5` channel, `$7` the second connection's server process → (term or
    /// NULL, notified, owner of the key's row).
    pub(super) acquired: String,
    /// Typed: `$1` key, `$2` namespace, `$3` lock name → the holder JSON while its session holds
    /// the key.
    pub(super) holder: String,
    /// Typed: `$1` namespace, `$2` lock name, `$3` state key → (value, term).
    pub(super) load: String,
    /// Typed: the term-guarded write; see [`Sql::new`].
    pub(super) store: String,
    /// The candidate registry and reservations.
    pub(super) registry: RegistrySql,
}

/// The statements of the candidate registry and of reservations (see [`super::registry`]).
#[derive(Debug)]
pub(super) struct RegistrySql {
    /// Typed: enters or replaces a candidate row tied to this session. `$1` namespace, `$2` lock
    /// name, `$3` node, `$4` entry JSON, `$5` registration id, `$6` channel → (written, notified).
    pub(super) upsert: String,
    /// Typed: withdraws registration `$4` of node `$3` (`$1` namespace, `$2` lock name, `$5`
    /// channel) → (deleted, notified).
    pub(super) withdraw: String,
    /// Typed: `$1` namespace, `$2` lock name → (node, entry JSON, live) of every row.
    pub(super) list: String,
    /// Typed: deletes the rows of ended sessions not written in the last 10 s (`$1` namespace,
    /// `$2` lock name).
    pub(super) reap: String,
    /// Typed: the term-guarded reservation. `$1` key, `$2` term, `$3` namespace, `$4` lock name,
    /// `$5` node, `$6` window in ms, `$7` channel → (written, notified, holder term).
    pub(super) reserve: String,
    /// Typed, on a lock session just granted the key: consumes a reservation for this node or an
    /// expired one, and reports a live one for another node. `$1` key, `$2` namespace, `$3` lock
    /// name, `$4` this node, `$5` channel → (reserved node, milliseconds left, notified).
    pub(super) check_reserved: String,
}

/// `pg_locks` rows of the session advisory lock on `key` (the bigint form: `classid` holds the
/// high 32 bits, `objid` the low ones, `objsubid` is 1), granted, in this database.
fn lock_rows(key: i64) -> String {
    let bits = u64::from_ne_bytes(key.to_ne_bytes());
    let hi = bits >> 32;
    let lo = bits & 0xffff_ffff;
    format!(
        "pg_catalog.pg_locks l WHERE l.locktype = 'advisory' \
         AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database()) \
         AND l.classid = '{hi}'::oid AND l.objid = '{lo}'::oid AND l.objsubid = 1 AND l.granted"
    )
}

impl Sql {
    /// The statements for `lock` in `namespace`, with the tables in `schema` (a validated
    /// lower-case identifier).
    pub(super) fn new(schema: &str, namespace: &str, lock: &str) -> Self {
        let key = advisory_key(namespace, lock);
        let s = format!("\"{schema}\"");
        let channel = format!(
            "tower_primary_{:016x}",
            u64::from_ne_bytes(key.to_ne_bytes())
        );
        let rows = lock_rows(key);
        let bits = u64::from_ne_bytes(key.to_ne_bytes());
        let hi = i32::from_ne_bytes(u32::try_from(bits >> 32).unwrap_or(0).to_ne_bytes());
        let lo = i32::from_ne_bytes(u32::try_from(bits & 0xffff_ffff).unwrap_or(0).to_ne_bytes());
        let setup_key = advisory_key("", &format!("setup:{schema}"));
        Sql {
            key,
            setup_check: format!(
                "SELECT to_regclass('{s}.holders') IS NOT NULL AND to_regclass('{s}.state') IS NOT NULL \
                 AND to_regclass('{s}.terms') IS NOT NULL \
                 AND to_regclass('{s}.candidates') IS NOT NULL \
                 AND to_regclass('{s}.reservations') IS NOT NULL \
                 AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                   WHERE a.attrelid = to_regclass('{s}.holders') AND a.attname = 'aux_term' \
                   AND NOT a.attisdropped)"
            ),
            setup: format!(
                "BEGIN; SELECT pg_advisory_xact_lock({setup_key}); \
                 CREATE SCHEMA IF NOT EXISTS {s}; \
                 CREATE SEQUENCE IF NOT EXISTS {s}.terms AS bigint MINVALUE 1; \
                 CREATE TABLE IF NOT EXISTS {s}.holders ( \
                   key bigint PRIMARY KEY, \
                   namespace text NOT NULL, \
                   lock_name text NOT NULL, \
                   term bigint NOT NULL, \
                   backend_pid integer NOT NULL, \
                   holder jsonb NOT NULL, \
                   acquired_at timestamptz NOT NULL DEFAULT now()); \
                 ALTER TABLE {s}.holders ADD COLUMN IF NOT EXISTS aux_pid integer, \
                   ADD COLUMN IF NOT EXISTS aux_term bigint; \
                 CREATE TABLE IF NOT EXISTS {s}.state ( \
                   namespace text NOT NULL, \
                   lock_name text NOT NULL, \
                   state_key text NOT NULL, \
                   value bytea NOT NULL, \
                   term bigint NOT NULL, \
                   updated_at timestamptz NOT NULL DEFAULT now(), \
                   PRIMARY KEY (namespace, lock_name, state_key)); \
                 CREATE TABLE IF NOT EXISTS {s}.candidates ( \
                   namespace text NOT NULL, \
                   lock_name text NOT NULL, \
                   node text NOT NULL, \
                   entry jsonb NOT NULL, \
                   registration bigint NOT NULL, \
                   backend_pid integer NOT NULL, \
                   backend_start timestamptz, \
                   updated_at timestamptz NOT NULL DEFAULT now(), \
                   PRIMARY KEY (namespace, lock_name, node)); \
                 CREATE TABLE IF NOT EXISTS {s}.reservations ( \
                   key bigint PRIMARY KEY, \
                   namespace text NOT NULL, \
                   lock_name text NOT NULL, \
                   node text NOT NULL, \
                   until timestamptz NOT NULL, \
                   term bigint NOT NULL); \
                 COMMIT"
            ),
            listen: format!("LISTEN \"{channel}\""),
            // The count is taken before the lock (an aggregate in FROM is computed before the
            // target list): a dedicated session never holds the key before asking for it, a
            // pooled server connection may, on behalf of another client.
            lock: format!(
                "SELECT b.n, pg_advisory_lock({key}), pg_backend_pid() \
                 FROM (SELECT count(*) AS n FROM {rows} AND l.pid = pg_backend_pid()) b"
            ),
            unlock: format!("SELECT pg_advisory_unlock({key})"),
            give_back: format!(
                "SELECT pg_advisory_unlock({key}); \
                 SELECT pg_advisory_unlock({hi}, {lo}) FROM pg_catalog.pg_locks l \
                 WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.objsubid = 2 \
                 AND l.classid = '{}'::oid AND l.objid = '{}'::oid AND l.mode = 'ExclusiveLock'",
                bits >> 32,
                bits & 0xffff_ffff
            ),
            ack_wait: format!(
                "SELECT pg_advisory_lock({hi}, {lo}); SELECT pg_advisory_unlock({hi}, {lo})"
            ),
            ack_take: format!("SELECT pg_try_advisory_lock_shared({hi}, {lo})"),
            ack_release: format!("SELECT pg_advisory_unlock_shared({hi}, {lo})"),
            held: format!(
                "SELECT pg_backend_pid(), EXISTS (SELECT 1 FROM {rows} AND l.pid = pg_backend_pid())"
            ),
            held_term: format!(
                "SELECT pg_backend_pid(), EXISTS (SELECT 1 FROM {rows} AND l.pid = pg_backend_pid()), \
                 nextval('{s}.terms')"
            ),
            release: format!("SELECT pg_advisory_unlock({key}); NOTIFY \"{channel}\", 'released'"),
            // The row need not survive a server crash (which ends every session and so every
            // term), so its commit does not wait for the disk: that keeps an fsync out of every
            // failover. The term's durability comes from `held_term`.
            acquired: format!(
                "WITH c AS (SELECT set_config('synchronous_commit', 'off', true)), \
                 up AS ( \
                   INSERT INTO {s}.holders AS h (key, namespace, lock_name, term, backend_pid, holder, acquired_at, aux_pid, aux_term) \
                   SELECT $1, $2, $3, $6, pg_backend_pid(), jsonb_set($4::jsonb, '{{term}}', to_jsonb($6::bigint)), now(), $7, $6 FROM c \
                   ON CONFLICT (key) DO UPDATE SET term = EXCLUDED.term, backend_pid = EXCLUDED.backend_pid, \
                     holder = EXCLUDED.holder, acquired_at = EXCLUDED.acquired_at, \
                     aux_pid = EXCLUDED.aux_pid, aux_term = EXCLUDED.aux_term \
                   WHERE h.namespace = EXCLUDED.namespace AND h.lock_name = EXCLUDED.lock_name \
                   RETURNING h.term), \
                 n AS (SELECT pg_notify($5, 'holder') FROM up) \
                 SELECT (SELECT term FROM up), (SELECT count(*) FROM n), \
                   (SELECT o.namespace || '/' || o.lock_name FROM {s}.holders o WHERE o.key = $1)"
            ),
            predecessor: format!(
                "SELECT h.holder::text FROM {s}.holders h \
                 WHERE h.key = $1 AND h.namespace = $2 AND h.lock_name = $3"
            ),
            // Written before the unlock (or, after a loss, once the node has stepped down);
            // never durable on its own: a lost mark only costs the successor its wait.
            mark_released: format!(
                "WITH c AS (SELECT set_config('synchronous_commit', 'off', true)) \
                 UPDATE {s}.holders h SET holder = jsonb_set(h.holder, '{{released}}', 'true') \
                 FROM c WHERE h.key = $1 AND h.term = $2"
            ),
            update_aux: format!(
                "UPDATE {s}.holders SET aux_pid = $3 WHERE key = $1 AND term = $2 AND aux_term = $2"
            ),
            sleep: "SELECT pg_sleep(".to_owned(),
            end_stopped: format!(
                "WITH t AS ( \
                   SELECT l.pid FROM {rows} AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a \
                     WHERE a.pid = l.pid AND a.state = 'idle' \
                     AND clock_timestamp() - a.state_change > $2::bigint * interval '1 millisecond')), \
                 x AS (SELECT t.pid, pg_terminate_backend(t.pid) AS ok FROM t), \
                 y AS (SELECT pg_terminate_backend(h.aux_pid) AS ok FROM {s}.holders h JOIN x ON h.backend_pid = x.pid \
                   WHERE h.key = $1 AND h.aux_term = h.term AND h.aux_pid IS NOT NULL \
                   AND EXISTS (SELECT 1 FROM pg_catalog.pg_locks d WHERE d.locktype = 'advisory' \
                     AND d.pid = h.aux_pid AND d.objsubid = 2 AND d.granted AND d.mode = 'ShareLock' \
                     AND d.classid = '{hi_oid}'::oid AND d.objid = '{lo_oid}'::oid)) \
                 SELECT (SELECT count(*) FROM x WHERE x.ok), (SELECT count(*) FROM y WHERE y.ok), \
                   (SELECT count(*) FROM {rows} AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a \
                     WHERE a.pid = l.pid AND a.state IS NOT NULL))",
                hi_oid = bits >> 32,
                lo_oid = bits & 0xffff_ffff
            ),
            holder: format!(
                "SELECT h.holder::text FROM {s}.holders h \
                 WHERE h.key = $1 AND h.namespace = $2 AND h.lock_name = $3 \
                 AND EXISTS (SELECT 1 FROM {rows} AND l.pid = h.backend_pid)"
            ),
            load: format!(
                "SELECT value, term FROM {s}.state WHERE namespace = $1 AND lock_name = $2 AND state_key = $3"
            ),
            // The holder row is locked FOR SHARE while its session still holds the key and its
            // term is ours; a successor's acquisition updates that row, so it waits for this
            // write to commit (or this write sees the new term and writes nothing). A newer term's
            // value is never overwritten.
            // `$1` key, `$2` term, `$3` namespace, `$4` lock name, `$5` state key, `$6` value,
            // `$7` channel → (written, notified, holder term, stored term).
            store: format!(
                "WITH h AS ( \
                   SELECT h.term FROM {s}.holders h \
                   WHERE h.key = $1 AND h.term = $2 AND h.namespace = $3 AND h.lock_name = $4 \
                   AND EXISTS (SELECT 1 FROM {rows} AND l.pid = h.backend_pid) \
                   FOR SHARE OF h), \
                 w AS ( \
                   INSERT INTO {s}.state AS st (namespace, lock_name, state_key, value, term, updated_at) \
                   SELECT $3, $4, $5, $6, h.term, now() FROM h \
                   ON CONFLICT (namespace, lock_name, state_key) DO UPDATE \
                     SET value = EXCLUDED.value, term = EXCLUDED.term, updated_at = EXCLUDED.updated_at \
                   WHERE st.term <= EXCLUDED.term \
                   RETURNING 1), \
                 n AS (SELECT pg_notify($7, 'state:' || $5) FROM w) \
                 SELECT (SELECT count(*) FROM w), (SELECT count(*) FROM n), \
                   (SELECT o.term FROM {s}.holders o WHERE o.key = $1), \
                   (SELECT o.term FROM {s}.state o WHERE o.namespace = $3 AND o.lock_name = $4 AND o.state_key = $5)"
            ),
            registry: RegistrySql::new(&s, &rows),
            channel,
        }
    }
}

/// A candidate row is live while the session that wrote it is: its server process with its
/// start time (a role that may not see another role's `backend_start` compares the process id
/// only).
const LIVE: &str = "EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = c.backend_pid \
     AND (a.backend_start = c.backend_start OR a.backend_start IS NULL))";

impl RegistrySql {
    /// `s`: the quoted schema; `rows`: the `pg_locks` rows of the key.
    fn new(s: &str, rows: &str) -> Self {
        RegistrySql {
            upsert: format!(
                "WITH c AS (SELECT set_config('synchronous_commit', 'off', true)), \
                 up AS ( \
                   INSERT INTO {s}.candidates AS r (namespace, lock_name, node, entry, registration, \
                     backend_pid, backend_start, updated_at) \
                   SELECT $1, $2, $3, $4::jsonb, $5, pg_backend_pid(), \
                     (SELECT a.backend_start FROM pg_catalog.pg_stat_activity a WHERE a.pid = pg_backend_pid()), \
                     now() FROM c \
                   ON CONFLICT (namespace, lock_name, node) DO UPDATE SET entry = EXCLUDED.entry, \
                     registration = EXCLUDED.registration, backend_pid = EXCLUDED.backend_pid, \
                     backend_start = EXCLUDED.backend_start, updated_at = EXCLUDED.updated_at \
                   RETURNING 1), \
                 n AS (SELECT pg_notify($6, 'registry') FROM up) \
                 SELECT (SELECT count(*) FROM up), (SELECT count(*) FROM n)"
            ),
            withdraw: format!(
                "WITH d AS (DELETE FROM {s}.candidates c WHERE c.namespace = $1 AND c.lock_name = $2 \
                   AND c.node = $3 AND c.registration = $4 RETURNING 1), \
                 n AS (SELECT pg_notify($5, 'registry') FROM d) \
                 SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM n)"
            ),
            list: format!(
                "SELECT c.node, c.entry::text, {LIVE} FROM {s}.candidates c \
                 WHERE c.namespace = $1 AND c.lock_name = $2"
            ),
            // A row rewritten while this runs is checked again as rewritten (its new
            // `updated_at`), so a session that re-registers is never deleted.
            reap: format!(
                "DELETE FROM {s}.candidates c WHERE c.namespace = $1 AND c.lock_name = $2 \
                 AND c.updated_at < now() - interval '10 seconds' AND NOT {LIVE}"
            ),
            // As a state write: only while the term's session holds the key, the holder row
            // locked FOR SHARE (a successor's acquisition waits for this write). Timed by the
            // server's clock from this statement's start.
            reserve: format!(
                "WITH c AS (SELECT set_config('synchronous_commit', 'off', true)), \
                 h AS ( \
                   SELECT h.term FROM {s}.holders h \
                   WHERE h.key = $1 AND h.term = $2 AND h.namespace = $3 AND h.lock_name = $4 \
                   AND EXISTS (SELECT 1 FROM {rows} AND l.pid = h.backend_pid) \
                   FOR SHARE OF h), \
                 w AS ( \
                   INSERT INTO {s}.reservations AS r (key, namespace, lock_name, node, until, term) \
                   SELECT $1, $3, $4, $5, now() + $6::bigint * interval '1 millisecond', h.term FROM h, c \
                   ON CONFLICT (key) DO UPDATE SET namespace = EXCLUDED.namespace, \
                     lock_name = EXCLUDED.lock_name, node = EXCLUDED.node, until = EXCLUDED.until, \
                     term = EXCLUDED.term \
                   RETURNING 1), \
                 n AS (SELECT pg_notify($7, 'reservation') FROM w) \
                 SELECT (SELECT count(*) FROM w), (SELECT count(*) FROM n), \
                   (SELECT o.term FROM {s}.holders o WHERE o.key = $1)"
            ),
            // One reading of the server's clock for the whole statement (a CTE with a volatile
            // function is evaluated once).
            check_reserved: format!(
                "WITH t AS (SELECT clock_timestamp() AS now, \
                   set_config('synchronous_commit', 'off', true)), \
                 r AS (SELECT r.node, r.until FROM {s}.reservations r, t \
                   WHERE r.key = $1 AND r.namespace = $2 AND r.lock_name = $3 \
                   AND r.node <> $4 AND r.until > t.now), \
                 d AS (DELETE FROM {s}.reservations x USING t WHERE x.key = $1 \
                   AND (x.node = $4 OR x.until <= t.now) RETURNING x.node = $4 AS mine), \
                 n AS (SELECT pg_notify($5, 'reservation') FROM d WHERE d.mine) \
                 SELECT (SELECT r.node FROM r), \
                   (SELECT ceil(extract(epoch FROM r.until - t.now) * 1000)::bigint FROM r, t), \
                   (SELECT count(*) FROM n)"
            ),
        }
    }
}
