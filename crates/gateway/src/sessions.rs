//! `/api/sessions`: create, read (messages paginated), list (paginated), update, delete. Every call goes to the
//! dialogue-manager, which asks the session-store; a session is visible only to its user (`X-User-Id`), and
//! anyone else's session is a 404 like a missing one.

use std::collections::HashMap;

use axum::{
    Json,
    extract::{FromRequestParts, Path, Query, State},
    http::{HeaderMap, StatusCode, request::Parts},
    response::{IntoResponse, Response},
};
use moltbot_proto::session::v1::{
    CreateSessionRequest, DeleteSessionRequest, GetSessionRequest, ListSessionsRequest, Session, UpdateSessionRequest,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ApiError, AppState, DialogueHeaders};

/// A page: `limit` items (default 100, at most 1000) after skipping `offset`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    limit: Option<u32>,
    offset: Option<u32>,
}

impl Page {
    fn limit(&self) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(100),
            Some(n @ 1..=1000) => Ok(n),
            Some(_) => Err(ApiError::bad_request("limit must be between 1 and 1000", Some("limit"))),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    /// A client-chosen id (1-128 of [A-Za-z0-9-_.@]); a random 128-bit one when absent.
    id: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, String>,
    #[serde(default)]
    system_prompt: String,
    /// Idle lifetime in seconds; the configured `session_ttl` when absent.
    ttl: Option<u64>,
}

/// `PATCH` fields: each one present replaces what the session has (`metadata` as a whole).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionUpdate {
    metadata: Option<HashMap<String, String>>,
    system_prompt: Option<String>,
    ttl: Option<u64>,
}

/// The session id in the path; a path that is not valid text gets the same JSON 400 as any other bad input.
pub struct SessionId(String);

impl<S: Send + Sync> FromRequestParts<S> for SessionId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(e) => Err(ApiError::bad_request(format!("the session id in the path: {}", e.body_text()), Some("id"))),
        }
    }
}

/// A JSON body, where an empty one means all defaults.
fn json_body<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) { Ok(T::default()) } else { crate::body::parse(body) }
}

fn session_json(s: Session, with_messages: bool) -> Value {
    let mut body = json!({
        "id": s.id,
        "object": "session",
        "user_id": s.user_id,
        "created_at_ms": s.created_at_ms,
        "updated_at_ms": s.updated_at_ms,
        "expires_at_ms": s.expires_at_ms,
        "message_count": s.message_count,
        "metadata": s.metadata,
        "system_prompt": s.system_prompt,
        "ttl": (s.ttl_seconds > 0).then_some(s.ttl_seconds),
    });
    if with_messages {
        body["messages"] = s
            .messages
            .into_iter()
            .map(|m| {
                // With images, the content is OpenAI's parts: the text, then the images.
                let content = moltbot_proto::common::content_json(&m);
                let mut shown =
                    json!({ "role": m.role, "content": content, "created_at_ms": m.created_at_ms, "tokens": m.tokens });
                if !m.tool_calls.is_empty() {
                    // OpenAI's shape: the arguments stay a JSON string.
                    let calls: Vec<Value> = m
                        .tool_calls
                        .iter()
                        .map(|c| json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments_json } }))
                        .collect();
                    shown["tool_calls"] = calls.into();
                }
                if !m.tool_call_id.is_empty() {
                    shown["tool_call_id"] = m.tool_call_id.into();
                    shown["name"] = m.name.into();
                }
                shown
            })
            .collect();
    }
    body
}

/// `POST /api/sessions` → 201 and the new session. The body is optional.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: NewSession = json_body(&body)?;
    let user_id = DialogueHeaders::parse(&headers)?.user_id;
    let request = CreateSessionRequest {
        user_id,
        session_id: body.id.unwrap_or_default(),
        metadata: body.metadata,
        system_prompt: body.system_prompt,
        ttl_seconds: body.ttl.unwrap_or(0),
    };
    let session = state.dialogue.clone().create_session(request).await?.into_inner();
    Ok((StatusCode::CREATED, Json(session_json(session, true))).into_response())
}

/// `GET /api/sessions/{id}?limit=&offset=` → the session with a page of its messages, oldest first.
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    SessionId(id): SessionId,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page.map_err(|e| ApiError::bad_request(e.body_text(), None))?;
    let request = GetSessionRequest {
        session_id: id,
        user_id: DialogueHeaders::parse(&headers)?.user_id,
        message_offset: page.offset.unwrap_or(0),
        message_limit: page.limit()?,
    };
    let session = state.dialogue.clone().get_session(request).await?.into_inner();
    let (offset, limit) = (page.offset.unwrap_or(0), page.limit()?);
    let mut body = session_json(session, true);
    body["offset"] = offset.into();
    body["limit"] = limit.into();
    Ok(Json(body))
}

/// `GET /api/sessions?limit=&offset=` → `{"sessions": [...]}`, the caller's, most recently used first.
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page.map_err(|e| ApiError::bad_request(e.body_text(), None))?;
    let request = ListSessionsRequest {
        user_id: DialogueHeaders::parse(&headers)?.user_id,
        limit: page.limit()?,
        offset: page.offset.unwrap_or(0),
    };
    let sessions = state.dialogue.clone().list_sessions(request).await?.into_inner().sessions;
    // Listed without their system prompts (GET /api/sessions/{id} has them): a page stays small.
    let sessions: Vec<Value> = sessions
        .into_iter()
        .map(|s| {
            let mut listed = session_json(s, false);
            listed.as_object_mut().map(|o| o.remove("system_prompt"));
            listed
        })
        .collect();
    Ok(Json(
        json!({ "object": "list", "sessions": sessions, "offset": page.offset.unwrap_or(0), "limit": page.limit()? }),
    ))
}

/// `PATCH /api/sessions/{id}` → the updated session (without messages); its lifetime restarts.
pub async fn update(
    State(state): State<AppState>,
    headers: HeaderMap,
    SessionId(id): SessionId,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: SessionUpdate = json_body(&body)?;
    if body.ttl == Some(0) {
        return Err(ApiError::bad_request("ttl must be at least 1 second", Some("ttl")));
    }
    let request = UpdateSessionRequest {
        session_id: id,
        user_id: DialogueHeaders::parse(&headers)?.user_id,
        set_metadata: body.metadata.is_some(),
        metadata: body.metadata.unwrap_or_default(),
        system_prompt: body.system_prompt,
        ttl_seconds: body.ttl,
    };
    let session = state.dialogue.clone().update_session(request).await?.into_inner();
    Ok(Json(session_json(session, false)))
}

/// `DELETE /api/sessions/{id}` → 204, or 404 when there is no such session of the caller's.
pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    SessionId(id): SessionId,
) -> Result<StatusCode, ApiError> {
    let request = DeleteSessionRequest { session_id: id.clone(), user_id: DialogueHeaders::parse(&headers)?.user_id };
    if state.dialogue.clone().delete_session(request).await?.into_inner().deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("session {} not found", crate::error::shown(&id))))
    }
}
