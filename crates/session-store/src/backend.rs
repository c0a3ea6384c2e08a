//! The storage backends behind the service, and the session record they keep.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Result, embedded::EmbeddedBackend, redis::RedisBackend};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub role: String,
    pub content: String,
    pub created_at_ms: i64,
    #[serde(default)]
    pub tokens: u32,
    /// An assistant message's tool (plugin) calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<StoredToolCall>,
    /// A tool message: the call it answers, and the tool that answered.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tool_call_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// A user message's images: their URLs (`data:` URLs inline, within the gateway's size cap) and `detail`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<StoredImage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredImage {
    pub url: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl StoredMessage {
    /// What the session's byte cap counts of this message: its text and its images' URLs.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.content.as_str()).chain(self.images.iter().map(|i| i.url.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredToolCall {
    pub id: String,
    pub name: String,
    pub arguments_json: String,
}

impl From<moltbot_proto::common::v1::ChatMessage> for StoredMessage {
    fn from(m: moltbot_proto::common::v1::ChatMessage) -> Self {
        let tool_calls = m
            .tool_calls
            .into_iter()
            .map(|c| StoredToolCall { id: c.id, name: c.name, arguments_json: c.arguments_json })
            .collect();
        Self {
            role: m.role,
            content: m.content,
            created_at_ms: m.created_at_ms,
            tokens: m.tokens,
            tool_calls,
            tool_call_id: m.tool_call_id,
            name: m.name,
            images: m.images.into_iter().map(|i| StoredImage { url: i.url, detail: i.detail }).collect(),
        }
    }
}

impl From<StoredMessage> for moltbot_proto::common::v1::ChatMessage {
    fn from(m: StoredMessage) -> Self {
        let tool_calls = m
            .tool_calls
            .into_iter()
            .map(|c| moltbot_proto::common::v1::ToolCall { id: c.id, name: c.name, arguments_json: c.arguments_json })
            .collect();
        Self {
            role: m.role,
            content: m.content,
            created_at_ms: m.created_at_ms,
            tokens: m.tokens,
            tool_calls,
            tool_call_id: m.tool_call_id,
            name: m.name,
            images: m
                .images
                .into_iter()
                .map(|i| moltbot_proto::common::v1::Image { url: i.url, detail: i.detail })
                .collect(),
        }
    }
}

/// What a client may set on a session: at creation, and later through an update.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionSettings {
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub system_prompt: String,
    /// Idle lifetime in seconds; 0: the store's `session_ttl`.
    #[serde(default)]
    pub ttl_seconds: u64,
}

/// An update: `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct SessionPatch {
    pub metadata: Option<BTreeMap<String, String>>,
    pub system_prompt: Option<String>,
    pub ttl_seconds: Option<u64>,
}

impl SessionSettings {
    pub fn apply(&mut self, patch: SessionPatch) {
        if let Some(m) = patch.metadata {
            self.metadata = m;
        }
        if let Some(p) = patch.system_prompt {
            self.system_prompt = p;
        }
        if let Some(t) = patch.ttl_seconds {
            self.ttl_seconds = t;
        }
    }

    /// The idle lifetime in seconds: the session's own, or the store's `default_s`.
    pub fn lifetime_s(&self, default_s: u64) -> u64 {
        if self.ttl_seconds > 0 { self.ttl_seconds } else { default_s }
    }
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
    #[serde(default, flatten)]
    pub settings: SessionSettings,
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
    pub async fn create(&self, id: &str, user_id: &str, settings: SessionSettings) -> Result<SessionRecord> {
        dispatch!(self, b => b.create(id, user_id, settings).await)
    }

    /// Changes a session's settings and restarts its lifetime; `NotFound` as for `get`.
    pub async fn update(&self, id: &str, user_id: &str, patch: SessionPatch) -> Result<SessionRecord> {
        dispatch!(self, b => b.update(id, user_id, patch).await)
    }

    /// `NotFound` also when the session belongs to someone else: its existence is not revealed.
    pub async fn get(&self, id: &str, user_id: &str) -> Result<SessionRecord> {
        dispatch!(self, b => b.get(id, user_id).await)
    }

    /// The user's live sessions, most recently updated first, without their messages.
    /// The session without its messages; `NotFound` as for `get`.
    pub async fn meta(&self, id: &str, user_id: &str) -> Result<SessionRecord> {
        dispatch!(self, b => b.meta(id, user_id).await)
    }

    pub async fn list(&self, user_id: &str, offset: usize, limit: usize) -> Result<Vec<SessionRecord>> {
        dispatch!(self, b => b.list(user_id, offset, limit).await)
    }

    pub async fn append(&self, id: &str, user_id: &str, messages: Vec<StoredMessage>) -> Result<SessionRecord> {
        dispatch!(self, b => b.append(id, user_id, messages).await)
    }

    pub async fn delete(&self, id: &str, user_id: &str) -> Result<bool> {
        dispatch!(self, b => b.delete(id, user_id).await)
    }

    /// What one user and one session may hold.
    pub fn limits(&self) -> crate::Limits {
        dispatch!(self, b => b.limits())
    }

    pub async fn touch(&self, id: &str, user_id: &str) -> Result<i64> {
        dispatch!(self, b => b.touch(id, user_id).await)
    }

    /// How many sessions were written or touched (a turn, a read) in the last `window_ms`.
    pub async fn active(&self, window_ms: i64) -> Result<u64> {
        dispatch!(self, b => b.active(window_ms).await)
    }

    /// Takes session `id`'s lock for `lease_ms` with `token` unless someone holds it; true when taken.
    pub async fn try_lock(&self, id: &str, token: &str, lease_ms: u64) -> Result<bool> {
        dispatch!(self, b => b.try_lock(id, token, lease_ms).await)
    }

    /// Releases the lock if `token` still holds it; true when it did.
    pub async fn unlock(&self, id: &str, token: &str) -> Result<bool> {
        dispatch!(self, b => b.unlock(id, token).await)
    }

    /// Sets the lease of the lock `token` holds to `lease_ms` from now; false when `token` no longer holds it.
    pub async fn renew_lock(&self, id: &str, token: &str, lease_ms: u64) -> Result<bool> {
        dispatch!(self, b => b.renew_lock(id, token, lease_ms).await)
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
