//! Embedded backend on redb: `persistent` keeps sessions in a file that survives restarts, `memory` keeps them
//! in RAM. A session is one JSON record; expired records read as missing, and a sweep at most once a minute (on
//! the next create) deletes them with their index entries, so the file stays bounded.

use std::{path::Path, sync::Arc};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, backends::InMemoryBackend};

use crate::{
    Error, Limits, Result, SessionRecord, StoredMessage,
    backend::{SessionPatch, SessionSettings, now_ms},
};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// Key `user_id \0 session_id`: the user's sessions.
const BY_USER: TableDefinition<&str, ()> = TableDefinition::new("sessions_by_user");

#[derive(Clone)]
pub struct EmbeddedBackend {
    db: Arc<Database>,
    /// The store's default idle lifetime in seconds.
    ttl_s: u64,
    /// Turn locks: session id → (token, lease end). One process owns an embedded store, so they live in memory.
    locks: Arc<std::sync::Mutex<std::collections::HashMap<String, (String, i64)>>>,
    /// When expired records were last swept away (ms since the epoch).
    last_sweep_ms: Arc<std::sync::atomic::AtomicI64>,
    /// Session id → when it was last created, given a turn or changed (ms), for `active`: one process owns an
    /// embedded store, so this sees every write, and counting needs no scan of the stored sessions.
    used: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
    limits: Limits,
}

/// How often creating a session also deletes expired ones.
const SWEEP_EVERY_MS: i64 = 60_000;

/// The fields a sweep needs from a record.
#[derive(serde::Deserialize)]
struct Expiry {
    user_id: String,
    expires_at_ms: i64,
}

impl EmbeddedBackend {
    pub fn open(path: &Path, ttl: u64, limits: Limits) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Storage(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| Error::Storage(format!("cannot open {}: {e}", path.display())))?;
        Self::init(db, ttl, limits)
    }

    pub fn in_memory(ttl: u64, limits: Limits) -> Result<Self> {
        let db = Database::builder().create_with_backend(InMemoryBackend::new()).map_err(storage)?;
        Self::init(db, ttl, limits)
    }

    fn init(db: Database, ttl: u64, limits: Limits) -> Result<Self> {
        let tx = db.begin_write().map_err(storage)?;
        tx.open_table(SESSIONS).map_err(storage)?;
        tx.open_table(BY_USER).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(Self {
            db: Arc::new(db),
            ttl_s: ttl,
            locks: Default::default(),
            last_sweep_ms: Default::default(),
            used: Default::default(),
            limits,
        })
    }

    /// Runs blocking redb work off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database, u64) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (db, ttl) = (self.db.clone(), self.ttl_s);
        tokio::task::spawn_blocking(move || f(&db, ttl)).await.map_err(|e| Error::Storage(e.to_string()))?
    }

    pub async fn create(&self, id: &str, user_id: &str, settings: SessionSettings) -> Result<SessionRecord> {
        let (id, user_id) = (id.to_owned(), user_id.to_owned());
        let now = now_ms();
        let last = self.last_sweep_ms.load(std::sync::atomic::Ordering::Relaxed);
        let sweep = now - last >= SWEEP_EVERY_MS
            && self
                .last_sweep_ms
                .compare_exchange(last, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
                .is_ok();
        let limits = self.limits;
        self.blocking(move |db, ttl| {
            let tx = db.begin_write().map_err(storage)?;
            if sweep {
                sweep_expired(&tx)?;
            }
            // At the cap, expired sessions may still be counted: sweep them, then count again.
            let cap = limits.sessions_per_user as usize;
            let mut held = sessions_of(&tx, &user_id)?;
            if held >= cap {
                sweep_user(&tx, &user_id)?;
                held = sessions_of(&tx, &user_id)?;
            }
            if held >= cap {
                return Err(limits.too_many_sessions());
            }
            let record = {
                let mut sessions = tx.open_table(SESSIONS).map_err(storage)?;
                match sessions.get(id.as_str()).map_err(storage)?.map(|v| decode(v.value())).transpose()? {
                    Some(old) if old.expires_at_ms > now_ms() => return Err(Error::AlreadyExists(id)),
                    // An expired session under this id leaves its owner's index before the id is used again.
                    Some(old) => {
                        tx.open_table(BY_USER)
                            .map_err(storage)?
                            .remove(user_key(&old.user_id, &id).as_str())
                            .map_err(storage)?;
                    }
                    None => {}
                }
                let now = now_ms();
                let record = SessionRecord {
                    id: id.clone(),
                    user_id: user_id.clone(),
                    created_at_ms: now,
                    updated_at_ms: now,
                    expires_at_ms: now + settings.lifetime_s(ttl) as i64 * 1000,
                    message_count: 0,
                    messages: vec![],
                    settings,
                };
                sessions.insert(id.as_str(), encode(&record)?.as_slice()).map_err(storage)?;
                tx.open_table(BY_USER)
                    .map_err(storage)?
                    .insert(user_key(&user_id, &id).as_str(), ())
                    .map_err(storage)?;
                record
            };
            tx.commit().map_err(storage)?;
            Ok(record)
        })
        .await
        .inspect(|record| self.used(record))
    }

    /// Notes that `record` was just written.
    fn used(&self, record: &SessionRecord) {
        self.used.lock().expect("never poisoned").insert(record.id.clone(), record.updated_at_ms);
    }

    pub async fn get(&self, id: &str, user_id: &str) -> Result<SessionRecord> {
        let (id, user_id) = (id.to_owned(), user_id.to_owned());
        self.blocking(move |db, _| {
            let tx = db.begin_read().map_err(storage)?;
            let sessions = tx.open_table(SESSIONS).map_err(storage)?;
            let record = sessions.get(id.as_str()).map_err(storage)?.map(|v| decode(v.value())).transpose()?;
            owned(live(record), &id, &user_id)
        })
        .await
    }

    /// One JSON record holds a session and its messages, so this decodes it whole and drops the messages.
    pub async fn meta(&self, id: &str, user_id: &str) -> Result<SessionRecord> {
        let mut record = self.get(id, user_id).await?;
        record.messages.clear();
        Ok(record)
    }

    pub async fn list(&self, user_id: &str, offset: usize, limit: usize) -> Result<Vec<SessionRecord>> {
        let user_id = user_id.to_owned();
        self.blocking(move |db, _| {
            let tx = db.begin_read().map_err(storage)?;
            let sessions = tx.open_table(SESSIONS).map_err(storage)?;
            let by_user = tx.open_table(BY_USER).map_err(storage)?;
            let (from, to) = user_range(&user_id);
            let mut out = vec![];
            for entry in by_user.range(from.as_str()..to.as_str()).map_err(storage)? {
                let key = entry.map_err(storage)?.0.value().to_owned();
                let id = &key[from.len()..];
                let record = live(sessions.get(id).map_err(storage)?.map(|v| decode(v.value())).transpose()?);
                // The index may lag behind an id used again: only the user's own live sessions are theirs.
                if let Some(mut s) = record.filter(|r| r.user_id == user_id) {
                    s.messages.clear();
                    out.push(s);
                }
            }
            out.sort_by_key(|s| std::cmp::Reverse(s.updated_at_ms));
            Ok(out.into_iter().skip(offset).take(limit).collect())
        })
        .await
    }

    pub async fn append(&self, id: &str, user_id: &str, messages: Vec<StoredMessage>) -> Result<SessionRecord> {
        let limits = self.limits;
        self.modify(id, user_id, move |record| {
            if record.messages.len() + messages.len() > limits.session_messages as usize {
                return Err(limits.too_many_messages(&record.id));
            }
            if crate::text_bytes(record.messages.iter().flat_map(StoredMessage::texts)) >= limits.session_bytes {
                return Err(limits.too_many_bytes(&record.id));
            }
            record.messages.extend(messages);
            record.message_count = record.messages.len() as u32;
            Ok(())
        })
        .await
    }

    pub async fn update(&self, id: &str, user_id: &str, patch: SessionPatch) -> Result<SessionRecord> {
        self.modify(id, user_id, move |record| {
            record.settings.apply(patch);
            Ok(())
        })
        .await
    }

    /// Changes the user's live session with `change` in one write transaction and restarts its lifetime.
    /// redb runs one write transaction at a time, so concurrent changes to a session serialize here.
    async fn modify(
        &self,
        id: &str,
        user_id: &str,
        change: impl FnOnce(&mut SessionRecord) -> Result<()> + Send + 'static,
    ) -> Result<SessionRecord> {
        let (id, user_id) = (id.to_owned(), user_id.to_owned());
        self.blocking(move |db, ttl| {
            let tx = db.begin_write().map_err(storage)?;
            let record = {
                let mut sessions = tx.open_table(SESSIONS).map_err(storage)?;
                let current = sessions.get(id.as_str()).map_err(storage)?.map(|v| decode(v.value())).transpose()?;
                let mut record = owned(live(current), &id, &user_id)?;
                change(&mut record)?;
                let now = now_ms();
                record.updated_at_ms = now;
                record.expires_at_ms = now + record.settings.lifetime_s(ttl) as i64 * 1000;
                sessions.insert(id.as_str(), encode(&record)?.as_slice()).map_err(storage)?;
                record
            };
            tx.commit().map_err(storage)?;
            Ok(record)
        })
        .await
        .inspect(|record| self.used(record))
    }

    pub async fn delete(&self, id: &str, user_id: &str) -> Result<bool> {
        let forget = id.to_owned();
        let (id, user_id) = (id.to_owned(), user_id.to_owned());
        self.blocking(move |db, _| {
            let tx = db.begin_write().map_err(storage)?;
            let deleted = {
                let mut sessions = tx.open_table(SESSIONS).map_err(storage)?;
                let current = sessions.get(id.as_str()).map_err(storage)?.map(|v| decode(v.value())).transpose()?;
                match current {
                    Some(r) if r.user_id == user_id => {
                        sessions.remove(id.as_str()).map_err(storage)?;
                        tx.open_table(BY_USER)
                            .map_err(storage)?
                            .remove(user_key(&user_id, &id).as_str())
                            .map_err(storage)?;
                        true
                    }
                    _ => false,
                }
            };
            tx.commit().map_err(storage)?;
            Ok(deleted)
        })
        .await
        .inspect(|&deleted| {
            if deleted {
                self.used.lock().expect("never poisoned").remove(&forget);
            }
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub async fn touch(&self, id: &str, user_id: &str) -> Result<i64> {
        Ok(self.append(id, user_id, vec![]).await?.expires_at_ms)
    }

    /// Sessions created, given a turn or changed in the last `window_ms` (since this process opened the store).
    pub async fn active(&self, window_ms: i64) -> Result<u64> {
        let since = now_ms() - window_ms;
        let mut used = self.used.lock().expect("never poisoned");
        used.retain(|_, at| *at >= since);
        Ok(used.len() as u64)
    }
}

/// How many sessions `user_id`'s index holds (expired ones too, until swept).
fn sessions_of(tx: &redb::WriteTransaction, user_id: &str) -> Result<usize> {
    let by_user = tx.open_table(BY_USER).map_err(storage)?;
    let (from, to) = user_range(user_id);
    Ok(by_user.range(from.as_str()..to.as_str()).map_err(storage)?.count())
}

/// Deletes `user_id`'s expired sessions and their index entries (a user at the cap: only their own records are read).
fn sweep_user(tx: &redb::WriteTransaction, user_id: &str) -> Result<()> {
    let now = now_ms();
    let ids: Vec<String> = {
        let by_user = tx.open_table(BY_USER).map_err(storage)?;
        let (from, to) = user_range(user_id);
        let keys = by_user.range(from.as_str()..to.as_str()).map_err(storage)?;
        keys.map(|k| k.map(|(k, _)| k.value()[from.len()..].to_owned())).collect::<Result<_, _>>().map_err(storage)?
    };
    let mut sessions = tx.open_table(SESSIONS).map_err(storage)?;
    let mut by_user = tx.open_table(BY_USER).map_err(storage)?;
    for id in ids {
        let record =
            sessions.get(id.as_str()).map_err(storage)?.and_then(|v| serde_json::from_slice::<Expiry>(v.value()).ok());
        match record {
            Some(e) if e.user_id == user_id && e.expires_at_ms > now => continue,
            Some(e) if e.user_id == user_id => {
                sessions.remove(id.as_str()).map_err(storage)?;
            }
            // Missing, or the id's record is someone else's: the entry is stale.
            _ => {}
        }
        by_user.remove(user_key(user_id, &id).as_str()).map_err(storage)?;
    }
    Ok(())
}

/// Deletes every expired session and its index entry; returns how many went.
fn sweep_expired(tx: &redb::WriteTransaction) -> Result<usize> {
    let now = now_ms();
    let mut sessions = tx.open_table(SESSIONS).map_err(storage)?;
    let mut expired = vec![];
    for entry in sessions.iter().map_err(storage)? {
        let (id, value) = entry.map_err(storage)?;
        match serde_json::from_slice::<Expiry>(value.value()) {
            Ok(e) if e.expires_at_ms <= now => expired.push((id.value().to_owned(), e.user_id)),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, id = id.value(), "an unreadable session record; leaving it"),
        }
    }
    let mut by_user = tx.open_table(BY_USER).map_err(storage)?;
    for (id, user_id) in &expired {
        sessions.remove(id.as_str()).map_err(storage)?;
        by_user.remove(user_key(user_id, id).as_str()).map_err(storage)?;
    }
    if !expired.is_empty() {
        tracing::debug!(sessions = expired.len(), "deleted expired sessions");
    }
    Ok(expired.len())
}

/// The `BY_USER` keys of `user_id`'s sessions lie in `from..to`; `from` is also the prefix before each id.
fn user_range(user_id: &str) -> (String, String) {
    (format!("{user_id}\0"), format!("{user_id}\u{1}"))
}

fn user_key(user_id: &str, id: &str) -> String {
    format!("{user_id}\0{id}")
}

fn live(record: Option<SessionRecord>) -> Option<SessionRecord> {
    record.filter(|r| r.expires_at_ms > now_ms())
}

fn owned(record: Option<SessionRecord>, id: &str, user_id: &str) -> Result<SessionRecord> {
    record.filter(|r| r.user_id == user_id).ok_or_else(|| Error::NotFound(id.into()))
}

fn encode(record: &SessionRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|e| Error::Storage(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<SessionRecord> {
    serde_json::from_slice(bytes).map_err(|e| Error::Storage(format!("corrupt session record: {e}")))
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

impl EmbeddedBackend {
    pub async fn try_lock(&self, id: &str, token: &str, lease_ms: u64) -> Result<bool> {
        let now = now_ms();
        let mut locks = self.locks.lock().map_err(|_| Error::Storage("the lock table is poisoned".into()))?;
        locks.retain(|_, (_, until)| *until > now);
        if locks.contains_key(id) {
            return Ok(false);
        }
        locks.insert(id.to_owned(), (token.to_owned(), now + lease_ms.max(1) as i64));
        Ok(true)
    }

    pub async fn unlock(&self, id: &str, token: &str) -> Result<bool> {
        let mut locks = self.locks.lock().map_err(|_| Error::Storage("the lock table is poisoned".into()))?;
        let held = locks.get(id).is_some_and(|(t, until)| t == token && *until > now_ms());
        if held {
            locks.remove(id);
        }
        Ok(held)
    }

    pub async fn renew_lock(&self, id: &str, token: &str, lease_ms: u64) -> Result<bool> {
        let now = now_ms();
        let mut locks = self.locks.lock().map_err(|_| Error::Storage("the lock table is poisoned".into()))?;
        match locks.get_mut(id) {
            Some((held, until)) if held == token && *until > now => {
                *until = now + lease_ms.max(1) as i64;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;

    fn rows(backend: &EmbeddedBackend) -> (u64, u64) {
        let tx = backend.db.begin_read().unwrap();
        (tx.open_table(SESSIONS).unwrap().len().unwrap(), tx.open_table(BY_USER).unwrap().len().unwrap())
    }

    #[tokio::test]
    async fn expired_sessions_leave_every_table_and_never_list_for_another_user() {
        let backend = EmbeddedBackend::in_memory(
            1800,
            Limits { sessions_per_user: 100, session_messages: 100, session_bytes: 1 << 20 },
        )
        .unwrap();
        let short = SessionSettings { ttl_seconds: 1, ..Default::default() };
        backend.create("gone", "alice", short.clone()).await.unwrap();
        backend.create("kept", "alice", SessionSettings::default()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        // The id comes free once expired; its old owner's index entry goes with it.
        backend.create("gone", "bob", SessionSettings::default()).await.unwrap();
        let alices: Vec<String> = backend.list("alice", 0, 10).await.unwrap().into_iter().map(|s| s.id).collect();
        assert_eq!(alices, ["kept"]);
        assert_eq!(rows(&backend), (2, 2));
        // A sweep deletes what expired, so the store does not grow with dead sessions.
        backend.create("brief", "carol", short).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        backend.last_sweep_ms.store(0, std::sync::atomic::Ordering::Relaxed);
        backend.create("next", "carol", SessionSettings::default()).await.unwrap();
        assert_eq!(rows(&backend), (3, 3), "kept, bob's gone, next");
        // Used in the last minute: gone (twice), kept, brief (since expired), next; a deleted one is not.
        backend.delete("kept", "alice").await.unwrap();
        assert_eq!(backend.active(60_000).await.unwrap(), 3, "the sessions used in the last minute");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(backend.active(10).await.unwrap(), 0, "none used in the last 10 ms");
    }
}
