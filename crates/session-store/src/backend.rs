//! The storage backends behind the service, and the session record they keep.

use serde::{Deserialize, Serialize};

use crate::{Result, embedded::EmbeddedBackend, redis::RedisBackend};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub role: String,
    pub content: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub user_id: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub expires_at_ms: i64,
    pub message_count: u32,
    /// Empty when listed.
    pub messages: Vec<StoredMessage>,
}

pub enum Backend {
    Redis(RedisBackend),
    /// `memory` and `persistent`: redb in memory or on disk.
    Embedded(EmbeddedBackend),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Backend::Redis($b) => $e,
            Backend::Embedded($b) => $e,
        }
    };
}

impl Backend {
    pub async fn create(&self, id: &str, user_id: &str) -> Result<SessionRecord> {
        dispatch!(self, b => b.create(id, user_id).await)
    }

    /// `NotFound` also when the session belongs to someone else: its existence is not revealed.
    pub async fn get(&self, id: &str, user_id: &str) -> Result<SessionRecord> {
        dispatch!(self, b => b.get(id, user_id).await)
    }

    /// The user's live sessions, most recently updated first, without their messages.
    pub async fn list(&self, user_id: &str, offset: usize, limit: usize) -> Result<Vec<SessionRecord>> {
        dispatch!(self, b => b.list(user_id, offset, limit).await)
    }

    pub async fn append(&self, id: &str, user_id: &str, messages: Vec<StoredMessage>) -> Result<SessionRecord> {
        dispatch!(self, b => b.append(id, user_id, messages).await)
    }

    pub async fn delete(&self, id: &str, user_id: &str) -> Result<bool> {
        dispatch!(self, b => b.delete(id, user_id).await)
    }

    pub async fn touch(&self, id: &str, user_id: &str) -> Result<i64> {
        dispatch!(self, b => b.touch(id, user_id).await)
    }

    /// Takes session `id`'s lock for `lease_ms` with `token` unless someone holds it; true when taken.
    pub async fn try_lock(&self, id: &str, token: &str, lease_ms: u64) -> Result<bool> {
        dispatch!(self, b => b.try_lock(id, token, lease_ms).await)
    }

    /// Releases the lock if `token` still holds it; true when it did.
    pub async fn unlock(&self, id: &str, token: &str) -> Result<bool> {
        dispatch!(self, b => b.unlock(id, token).await)
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
