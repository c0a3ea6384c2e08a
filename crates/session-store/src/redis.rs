//! Redis backend (deadpool-redis). Layout, with `p` the configured key prefix:
//! - `p:session:<id>` — hash: id, user_id, created_at_ms, updated_at_ms, settings (JSON: metadata, system
//!   prompt, TTL), ttl (the session's lifetime in seconds, for the scripts)
//! - `p:session:<id>:messages` — list of JSON messages, oldest first
//! - `p:user:<user_id>:sessions` — sorted set of session ids by updated_at_ms
//! - `p:sessions:active` — sorted set of every user's session ids by updated_at_ms, pruned of those idle longer
//!   than `session_ttl` on each create and append (what `moltbot_sessions_active` counts)
//!
//! Every key expires `session_ttl` seconds after the last write or touch. Writes that check the owner run as
//! Lua scripts, so concurrent appends to one session never interleave half-way or revive an expired one.

use std::collections::HashMap;

use deadpool_redis::{
    Pool, Runtime,
    redis::{AsyncCommands, Script},
};
use moltbot_config::RedisConfig;

use crate::{
    Error, Limits, Result, SessionRecord, StoredMessage,
    backend::{SessionPatch, SessionSettings, now_ms},
};

/// ARGV[6]: the most sessions a user may hold; their index may still count some that expired (-1: clean it up
/// and ask again); ARGV[7]: the store's session TTL (the active set forgets sessions idle longer).
const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then return -1 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'user_id', ARGV[2], 'created_at_ms', ARGV[3], 'updated_at_ms', ARGV[3],
  'settings', ARGV[5], 'ttl', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[2], math.max(tonumber(ARGV[4]), redis.call('TTL', KEYS[2])))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[7]) * 1000)
return 1";

/// ARGV[5]: the most messages a session may hold (-2 when the append would pass it); ARGV[6]: the most bytes of
/// message text (-3 when the session already holds that many), ARGV[7]: this append's bytes (kept in the
/// session's `bytes` field); the messages from ARGV[8].
const APPEND: &str = r"
if redis.call('HGET', KEYS[1], 'user_id') ~= ARGV[1] then return -1 end
if redis.call('LLEN', KEYS[2]) + #ARGV - 7 > tonumber(ARGV[5]) then return -2 end
if tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0') >= tonumber(ARGV[6]) then return -3 end
local ttl = redis.call('HGET', KEYS[1], 'ttl') or ARGV[3]
for i = 8, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[7])
redis.call('HSET', KEYS[1], 'updated_at_ms', ARGV[2])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[3], math.max(tonumber(ttl), redis.call('TTL', KEYS[3])))
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]) * 1000)
return redis.call('LLEN', KEYS[2])";

/// Replaces the settings and restarts every TTL under the owner check.
/// Writes new settings only over the ones the caller read (ARGV[6], '' for none): a compare-and-set, so that
/// concurrent updates of one session each apply in full, one after the other.
const UPDATE: &str = r"
if redis.call('HGET', KEYS[1], 'user_id') ~= ARGV[1] then return -1 end
if (redis.call('HGET', KEYS[1], 'settings') or '') ~= ARGV[6] then return -2 end
redis.call('HSET', KEYS[1], 'updated_at_ms', ARGV[2], 'settings', ARGV[3], 'ttl', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
redis.call('EXPIRE', KEYS[3], math.max(tonumber(ARGV[4]), redis.call('TTL', KEYS[3])))
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[5])
return 1";

const DELETE: &str = r"
if redis.call('HGET', KEYS[1], 'user_id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1";

/// How long a Redis command may take before it counts as failed, and how long connecting may take.
const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How often an update re-reads settings that another update changed under it.
const UPDATE_TRIES: usize = 32;

/// Deletes the lock only for the token that holds it.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Extends the lock's lease only for the token that holds it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0";

pub struct RedisBackend {
    pool: Pool,
    prefix: String,
    ttl: u64,
    limits: Limits,
}

impl RedisBackend {
    pub async fn connect(config: &RedisConfig, ttl: u64, limits: Limits) -> Result<Self> {
        let unreachable =
            |message: String| Error::RedisUnreachable { url: moltbot_config::redact_url(&config.url), message };
        // The redis client answers "timed out" after 500 ms by default, which a busy machine's scheduler alone can
        // exceed: a reply gets RESPONSE_TIMEOUT, and a dead Redis still fails fast (its socket closes at once).
        let connection = deadpool_redis::redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECTION_TIMEOUT));
        let manager = deadpool_redis::Manager::new_with_config(config.url.as_str(), connection)
            .map_err(|e| unreachable(e.to_string()))?;
        let pool = deadpool_redis::Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        let mut conn = tokio::time::timeout(std::time::Duration::from_secs(5), pool.get())
            .await
            .map_err(|_| unreachable("no answer within 5 s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let _: String =
            deadpool_redis::redis::cmd("PING").query_async(&mut conn).await.map_err(|e| unreachable(e.to_string()))?;
        Ok(Self { pool, prefix: config.key_prefix.clone(), ttl, limits })
    }

    fn session_key(&self, id: &str) -> String {
        format!("{}:session:{id}", self.prefix)
    }

    fn messages_key(&self, id: &str) -> String {
        format!("{}:session:{id}:messages", self.prefix)
    }

    fn lock_key(&self, id: &str) -> String {
        format!("{}:lock:{id}", self.prefix)
    }

    fn user_key(&self, user_id: &str) -> String {
        format!("{}:user:{user_id}:sessions", self.prefix)
    }

    fn active_key(&self) -> String {
        format!("{}:sessions:active", self.prefix)
    }

    /// Sessions written or touched in the last `window_ms`.
    pub async fn active(&self, window_ms: i64) -> Result<u64> {
        let since = now_ms() - window_ms;
        self.conn().await?.zcount(self.active_key(), since, "+inf").await.map_err(storage)
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection> {
        self.pool.get().await.map_err(|e| Error::Storage(format!("redis: {e}")))
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub async fn create(&self, id: &str, user_id: &str, settings: SessionSettings) -> Result<SessionRecord> {
        let cap = self.limits.sessions_per_user;
        let create = || async {
            Script::new(CREATE)
                .key(self.session_key(id))
                .key(self.user_key(user_id))
                .key(self.active_key())
                .arg(id)
                .arg(user_id)
                .arg(now_ms())
                .arg(settings.lifetime_s(self.ttl))
                .arg(encode_settings(&settings)?)
                .arg(cap)
                .arg(self.ttl)
                .invoke_async::<i64>(&mut self.conn().await?)
                .await
                .map_err(storage)
        };
        let mut created = create().await?;
        if created == -1 {
            // Listing drops the index entries of sessions that expired; then the count is true.
            self.list(user_id, 0, cap as usize).await?;
            created = create().await?;
        }
        if created == -1 {
            return Err(self.limits.too_many_sessions());
        }
        if created == 0 {
            return Err(Error::AlreadyExists(id.into()));
        }
        self.get(id, user_id).await
    }

    pub async fn get(&self, id: &str, user_id: &str) -> Result<SessionRecord> {
        let mut record = self.meta(id, user_id).await?;
        let raw: Vec<String> = self.conn().await?.lrange(self.messages_key(id), 0, -1).await.map_err(storage)?;
        record.messages = raw
            .iter()
            .map(|m| serde_json::from_str(m).map_err(|e| Error::Storage(e.to_string())))
            .collect::<Result<_>>()?;
        record.message_count = record.messages.len() as u32;
        Ok(record)
    }

    /// The session without its messages; `NotFound` when missing or not the user's.
    pub async fn meta(&self, id: &str, user_id: &str) -> Result<SessionRecord> {
        let mut conn = self.conn().await?;
        let (hash, count, pttl): (HashMap<String, String>, u32, i64) = deadpool_redis::redis::pipe()
            .hgetall(self.session_key(id))
            .llen(self.messages_key(id))
            .pttl(self.session_key(id))
            .query_async(&mut conn)
            .await
            .map_err(storage)?;
        if hash.get("user_id").map(String::as_str) != Some(user_id) {
            return Err(Error::NotFound(id.into()));
        }
        let int = |k: &str| hash.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        let settings = decode_settings(hash.get("settings").map(String::as_str))?;
        Ok(SessionRecord {
            id: id.into(),
            user_id: user_id.into(),
            created_at_ms: int("created_at_ms"),
            updated_at_ms: int("updated_at_ms"),
            expires_at_ms: now_ms() + pttl.max(0),
            message_count: count,
            messages: vec![],
            settings,
        })
    }

    pub async fn list(&self, user_id: &str, offset: usize, limit: usize) -> Result<Vec<SessionRecord>> {
        let (first, last) = (offset as isize, (offset + limit) as isize - 1);
        let ids: Vec<String> =
            self.conn().await?.zrevrange(self.user_key(user_id), first, last).await.map_err(storage)?;
        let mut sessions = Vec::with_capacity(ids.len());
        for id in ids {
            match self.meta(&id, user_id).await {
                Ok(s) => sessions.push(s),
                Err(Error::NotFound(_)) => {
                    let _: () = self.conn().await?.zrem(self.user_key(user_id), &id).await.map_err(storage)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(sessions)
    }

    pub async fn append(&self, id: &str, user_id: &str, messages: Vec<StoredMessage>) -> Result<SessionRecord> {
        let script = Script::new(APPEND);
        let mut invocation = script.key(self.session_key(id));
        invocation
            .key(self.messages_key(id))
            .key(self.user_key(user_id))
            .key(self.active_key())
            .arg(user_id)
            .arg(now_ms())
            .arg(self.ttl)
            .arg(id)
            .arg(self.limits.session_messages)
            .arg(self.limits.session_bytes)
            .arg(crate::text_bytes(messages.iter().flat_map(crate::backend::StoredMessage::texts)));
        for m in &messages {
            invocation.arg(serde_json::to_string(m).map_err(|e| Error::Storage(e.to_string()))?);
        }
        let len: i64 = invocation.invoke_async(&mut self.conn().await?).await.map_err(storage)?;
        if len == -2 {
            return Err(self.limits.too_many_messages(id));
        }
        if len == -3 {
            return Err(self.limits.too_many_bytes(id));
        }
        if len < 0 {
            return Err(Error::NotFound(id.into()));
        }
        self.get(id, user_id).await
    }

    pub async fn update(&self, id: &str, user_id: &str, patch: SessionPatch) -> Result<SessionRecord> {
        // Read, apply, and write only if nobody wrote in between; else read again.
        for _ in 0..UPDATE_TRIES {
            let (owner, seen): (Option<String>, Option<String>) = deadpool_redis::redis::cmd("HMGET")
                .arg(self.session_key(id))
                .arg("user_id")
                .arg("settings")
                .query_async(&mut self.conn().await?)
                .await
                .map_err(storage)?;
            if owner.as_deref() != Some(user_id) {
                return Err(Error::NotFound(id.into()));
            }
            let mut settings = decode_settings(seen.as_deref())?;
            settings.apply(patch.clone());
            let updated: i64 = Script::new(UPDATE)
                .key(self.session_key(id))
                .key(self.messages_key(id))
                .key(self.user_key(user_id))
                .key(self.active_key())
                .arg(user_id)
                .arg(now_ms())
                .arg(encode_settings(&settings)?)
                .arg(settings.lifetime_s(self.ttl))
                .arg(id)
                .arg(seen.unwrap_or_default())
                .invoke_async(&mut self.conn().await?)
                .await
                .map_err(storage)?;
            match updated {
                -1 => return Err(Error::NotFound(id.into())),
                -2 => continue,
                _ => return self.get(id, user_id).await,
            }
        }
        Err(Error::Storage(format!("session {id}: {UPDATE_TRIES} concurrent updates in a row won the race; retry")))
    }

    pub async fn delete(&self, id: &str, user_id: &str) -> Result<bool> {
        let deleted: i64 = Script::new(DELETE)
            .key(self.session_key(id))
            .key(self.messages_key(id))
            .key(self.user_key(user_id))
            .key(self.active_key())
            .arg(user_id)
            .arg(id)
            .invoke_async(&mut self.conn().await?)
            .await
            .map_err(storage)?;
        Ok(deleted == 1)
    }

    pub async fn touch(&self, id: &str, user_id: &str) -> Result<i64> {
        // Appending nothing refreshes every TTL under the same ownership check.
        let record = self.append(id, user_id, vec![]).await?;
        Ok(record.expires_at_ms)
    }
}

impl RedisBackend {
    /// `SET key token NX PX lease`: atomic, and the lease frees the lock of a holder that died.
    pub async fn try_lock(&self, id: &str, token: &str, lease_ms: u64) -> Result<bool> {
        let set: Option<String> = deadpool_redis::redis::cmd("SET")
            .arg(self.lock_key(id))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(lease_ms.max(1))
            .query_async(&mut self.conn().await?)
            .await
            .map_err(storage)?;
        Ok(set.is_some())
    }

    pub async fn unlock(&self, id: &str, token: &str) -> Result<bool> {
        let deleted: i64 = Script::new(UNLOCK)
            .key(self.lock_key(id))
            .arg(token)
            .invoke_async(&mut self.conn().await?)
            .await
            .map_err(storage)?;
        Ok(deleted == 1)
    }

    pub async fn renew_lock(&self, id: &str, token: &str, lease_ms: u64) -> Result<bool> {
        let renewed: i64 = Script::new(RENEW)
            .key(self.lock_key(id))
            .arg(token)
            .arg(lease_ms.max(1))
            .invoke_async(&mut self.conn().await?)
            .await
            .map_err(storage)?;
        Ok(renewed == 1)
    }
}

/// A session's settings as its hash keeps them: JSON, absent for a session created before settings existed.
fn decode_settings(json: Option<&str>) -> Result<SessionSettings> {
    json.map_or(Ok(SessionSettings::default()), |json| {
        serde_json::from_str(json).map_err(|e| Error::Storage(format!("corrupt settings: {e}")))
    })
}

fn encode_settings(settings: &SessionSettings) -> Result<String> {
    serde_json::to_string(settings).map_err(|e| Error::Storage(e.to_string()))
}

fn storage(e: deadpool_redis::redis::RedisError) -> Error {
    Error::Storage(format!("redis: {e}"))
}
