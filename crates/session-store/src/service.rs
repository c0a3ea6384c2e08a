//! The `SessionStore` gRPC service over a backend.

use moltbot_proto::{
    common::v1::ChatMessage,
    session::v1::{
        AppendMessagesRequest, CreateSessionRequest, DeleteSessionRequest, DeleteSessionResponse, GetSessionRequest,
        ListSessionsRequest, ListSessionsResponse, LockSessionRequest, LockSessionResponse, RenewSessionLockRequest,
        RenewSessionLockResponse, Session, TouchSessionRequest, TouchSessionResponse, UnlockSessionRequest,
        UnlockSessionResponse, UpdateSessionRequest, session_store_server::SessionStore,
    },
};
use tonic::{Request, Response, Status};

use crate::{Backend, Error, SessionPatch, SessionRecord, SessionSettings, StoredMessage, backend::now_ms};

/// Bounds on what a client may store beside the conversation.
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_BYTES: usize = 16 * 1024;
const MAX_SYSTEM_PROMPT_BYTES: usize = 64 * 1024;
const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;
/// The longest lock lease a request may ask for.
const MAX_LEASE_MS: u64 = 3_600_000;

fn check_settings(
    metadata: Option<&std::collections::HashMap<String, String>>,
    system_prompt: Option<&str>,
    ttl_seconds: Option<u64>,
) -> Result<(), Error> {
    if let Some(m) = metadata {
        let bytes: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
        if m.len() > MAX_METADATA_ENTRIES || bytes > MAX_METADATA_BYTES || m.keys().any(String::is_empty) {
            return Err(Error::InvalidArgument(format!(
                "metadata must have at most {MAX_METADATA_ENTRIES} entries with non-empty keys, {MAX_METADATA_BYTES} bytes in all"
            )));
        }
    }
    if system_prompt.is_some_and(|p| p.len() > MAX_SYSTEM_PROMPT_BYTES) {
        return Err(Error::InvalidArgument(format!("system_prompt must be at most {MAX_SYSTEM_PROMPT_BYTES} bytes")));
    }
    if ttl_seconds.is_some_and(|t| t > MAX_TTL_SECONDS) {
        return Err(Error::InvalidArgument(format!("ttl_seconds must be at most {MAX_TTL_SECONDS} (a year)")));
    }
    Ok(())
}

/// Longest id accepted for sessions and users.
const MAX_ID_LEN: usize = 128;
const VALID_ROLES: &[&str] = &["system", "user", "assistant", "tool"];

pub struct SessionStoreService {
    backend: std::sync::Arc<Backend>,
}

impl SessionStoreService {
    pub fn new(backend: std::sync::Arc<Backend>) -> Self {
        Self { backend }
    }
}

fn check_id(what: &str, id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("{what} must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9-_.@]")))
    }
}

/// An id that could never have been created names no session: NOT_FOUND, like a missing one.
fn existing_id(id: &str) -> Result<(), Error> {
    check_id("session_id", id).map_err(|_| Error::NotFound(id.to_owned()))
}

/// Where a user's session is stored: session ids are per user, so the same client-chosen id held by two users
/// names two sessions, and creating one tells nothing about the other's (no existence oracle). The owner's scope
/// is a hash of the user id, so stored keys stay within the id alphabet whatever the user id holds.
pub fn stored_id(user_id: &str, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(user_id.as_bytes());
    let scope: String = digest.iter().take(SCOPE_LEN / 2).map(|b| format!("{b:02x}")).collect();
    format!("{scope}.{id}")
}

/// The id the client knows, from a stored one.
fn client_id(stored: &str) -> String {
    match stored.split_at_checked(SCOPE_LEN) {
        Some((scope, rest)) if rest.starts_with('.') && scope.bytes().all(|b| b.is_ascii_hexdigit()) => {
            rest[1..].to_owned()
        }
        _ => stored.to_owned(),
    }
}

/// Hex digits of a user's scope.
const SCOPE_LEN: usize = 24;

/// An id as an error message shows it: unscoped, and cut to 64 characters.
pub(crate) fn shown_id(id: &str) -> String {
    moltbot_proto::shown(&client_id(id))
}

fn to_proto(r: SessionRecord) -> Session {
    Session {
        id: client_id(&r.id),
        user_id: r.user_id,
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        expires_at_ms: r.expires_at_ms,
        message_count: r.message_count,
        messages: r.messages.into_iter().map(ChatMessage::from).collect(),
        metadata: r.settings.metadata.into_iter().collect(),
        system_prompt: r.settings.system_prompt,
        ttl_seconds: r.settings.ttl_seconds,
        message_limit: 0,
        byte_limit: 0,
    }
}

#[tonic::async_trait]
impl SessionStore for SessionStoreService {
    async fn create_session(&self, request: Request<CreateSessionRequest>) -> Result<Response<Session>, Status> {
        let r = request.into_inner();
        check_id("user_id", &r.user_id)?;
        let id = if r.session_id.is_empty() { new_id() } else { r.session_id };
        check_id("session_id", &id)?;
        check_settings(Some(&r.metadata), Some(&r.system_prompt), Some(r.ttl_seconds))?;
        let settings = SessionSettings {
            metadata: r.metadata.into_iter().collect(),
            system_prompt: r.system_prompt,
            ttl_seconds: r.ttl_seconds,
        };
        let created = self.backend.create(&stored_id(&r.user_id, &id), &r.user_id, settings).await;
        if created.is_ok() {
            metrics::counter!("moltbot_sessions_created_total").increment(1);
        }
        Ok(Response::new(to_proto(created.map_err(|e| match e {
            Error::AlreadyExists(_) => Error::AlreadyExists(id),
            e => e,
        })?)))
    }

    async fn update_session(&self, request: Request<UpdateSessionRequest>) -> Result<Response<Session>, Status> {
        let r = request.into_inner();
        existing_id(&r.session_id)?;
        check_settings(r.set_metadata.then_some(&r.metadata), r.system_prompt.as_deref(), r.ttl_seconds)?;
        let patch = SessionPatch {
            metadata: r.set_metadata.then(|| r.metadata.into_iter().collect()),
            system_prompt: r.system_prompt,
            ttl_seconds: r.ttl_seconds,
        };
        Ok(Response::new(to_proto(
            self.backend.update(&stored_id(&r.user_id, &r.session_id), &r.user_id, patch).await?,
        )))
    }

    async fn get_session(&self, request: Request<GetSessionRequest>) -> Result<Response<Session>, Status> {
        let r = request.into_inner();
        existing_id(&r.session_id)?;
        let mut record = self.backend.get(&stored_id(&r.user_id, &r.session_id), &r.user_id).await?;
        if r.message_offset > 0 || r.message_limit > 0 {
            let limit = if r.message_limit == 0 { usize::MAX } else { r.message_limit as usize };
            record.messages = record.messages.into_iter().skip(r.message_offset as usize).take(limit).collect();
        }
        let mut session = to_proto(record);
        let limits = self.backend.limits();
        (session.message_limit, session.byte_limit) = (limits.session_messages, limits.session_bytes);
        Ok(Response::new(session))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let r = request.into_inner();
        check_id("user_id", &r.user_id)?;
        let limit = if r.limit == 0 { 100 } else { r.limit.min(1000) } as usize;
        // Listed without the heavy fields: a page of sessions stays small whatever their prompts hold.
        let sessions = self
            .backend
            .list(&r.user_id, r.offset as usize, limit)
            .await?
            .into_iter()
            .map(|mut record| {
                record.settings.system_prompt.clear();
                to_proto(record)
            })
            .collect();
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn append_messages(&self, request: Request<AppendMessagesRequest>) -> Result<Response<Session>, Status> {
        let r = request.into_inner();
        existing_id(&r.session_id)?;
        if r.messages.is_empty() {
            return Err(Error::InvalidArgument("messages must not be empty".into()).into());
        }
        let now = now_ms();
        let messages = r
            .messages
            .into_iter()
            .map(|m| {
                if !VALID_ROLES.contains(&m.role.as_str()) {
                    return Err(Error::InvalidArgument(format!("role `{}` is not one of {VALID_ROLES:?}", m.role)));
                }
                let created_at_ms = if m.created_at_ms > 0 { m.created_at_ms } else { now };
                Ok(StoredMessage { created_at_ms, ..StoredMessage::from(m) })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(to_proto(
            self.backend.append(&stored_id(&r.user_id, &r.session_id), &r.user_id, messages).await?,
        )))
    }

    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let r = request.into_inner();
        existing_id(&r.session_id)?;
        let deleted = self.backend.delete(&stored_id(&r.user_id, &r.session_id), &r.user_id).await?;
        Ok(Response::new(DeleteSessionResponse { deleted }))
    }

    async fn touch_session(
        &self,
        request: Request<TouchSessionRequest>,
    ) -> Result<Response<TouchSessionResponse>, Status> {
        let r = request.into_inner();
        existing_id(&r.session_id)?;
        let expires_at_ms = self.backend.touch(&stored_id(&r.user_id, &r.session_id), &r.user_id).await?;
        Ok(Response::new(TouchSessionResponse { expires_at_ms }))
    }

    async fn lock_session(
        &self,
        request: Request<LockSessionRequest>,
    ) -> Result<Response<LockSessionResponse>, Status> {
        let r = request.into_inner();
        existing_id(&r.session_id)?;
        let id = stored_id(&r.user_id, &r.session_id);
        // Only the owner of a live session may take its lock; its messages are not needed for that.
        self.backend.meta(&id, &r.user_id).await?;
        let token = new_id();
        let lease_ms = if r.lease_ms == 0 { 60_000 } else { r.lease_ms.min(MAX_LEASE_MS) };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(r.wait_ms.min(600_000));
        // Polls with a growing, jittered pause: turns are seconds long, so a few probes per turn are enough.
        let mut pause = std::time::Duration::from_millis(5);
        loop {
            if self.backend.try_lock(&id, &token, lease_ms).await? {
                return Ok(Response::new(LockSessionResponse { token }));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::Busy(r.session_id).into());
            }
            let jitter = std::time::Duration::from_micros(rand::random_range(0..=pause.as_micros() as u64 / 2));
            tokio::time::sleep((pause + jitter).min(deadline - now)).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
        }
    }

    async fn unlock_session(
        &self,
        request: Request<UnlockSessionRequest>,
    ) -> Result<Response<UnlockSessionResponse>, Status> {
        let r = request.into_inner();
        let released = self.backend.unlock(&stored_id(&r.user_id, &r.session_id), &r.token).await?;
        Ok(Response::new(UnlockSessionResponse { released }))
    }

    async fn renew_session_lock(
        &self,
        request: Request<RenewSessionLockRequest>,
    ) -> Result<Response<RenewSessionLockResponse>, Status> {
        let r = request.into_inner();
        if r.lease_ms == 0 {
            return Err(Status::invalid_argument("lease_ms must be at least 1"));
        }
        let id = stored_id(&r.user_id, &r.session_id);
        let renewed = self.backend.renew_lock(&id, &r.token, r.lease_ms.min(MAX_LEASE_MS)).await?;
        Ok(Response::new(RenewSessionLockResponse { renewed }))
    }
}

/// A new session id or lock token: 128 bits from the operating system's CSPRNG-seeded generator, as 32
/// lowercase hex digits (URL-safe).
pub fn new_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
