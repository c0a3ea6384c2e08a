//! Plugin calls by the user (`ExecutePlugin`): run within the plugin's limits and, in a session, recorded in it
//! as an assistant message with the tool call and a tool message with the result or the error.

use moltbot_plugin::{CallContext, PluginError, PluginState, Plugins};
use moltbot_proto::{
    common::v1::{ChatMessage, ToolCall},
    dialogue::v1::{
        ExecutePluginRequest, ExecutePluginResponse, ListPluginsResponse, PluginStatus,
        execute_plugin_response::Outcome,
    },
    session::v1::AppendMessagesRequest,
};
use tonic::Status;

use crate::DialogueService;

pub(crate) fn list(plugins: &Plugins) -> ListPluginsResponse {
    let plugins = plugins
        .list()
        .into_iter()
        .map(|p| {
            let (ready, disabled_reason) = match p.state {
                PluginState::Ready => (true, String::new()),
                PluginState::Disabled { reason } => (false, reason),
            };
            PluginStatus {
                name: p.name,
                version: p.version,
                description: p.description,
                parameters_json: if p.parameters.is_null() { String::new() } else { p.parameters.to_string() },
                source: p.source,
                ready,
                disabled_reason,
            }
        })
        .collect();
    ListPluginsResponse { plugins }
}

/// A plugin to run, as a request names it.
pub(crate) struct Call {
    pub name: String,
    pub arguments_json: String,
}

/// A call that ran: its id, its outcome, and the two messages that record it (the assistant's tool call and the
/// tool's answer: the result, or the error as `{"error", "code"}`).
struct Ran {
    call_id: String,
    outcome: Result<String, PluginError>,
    messages: Vec<ChatMessage>,
}

/// Runs a plugin for a user. Bad input (an unknown or disabled plugin, arguments off its schema) is the caller's
/// error; a plugin that fails, crashes or times out is a recorded outcome.
async fn call(
    service: &DialogueService,
    call: Call,
    session_id: &str,
    user_id: &str,
    request_id: &str,
) -> Result<Ran, Status> {
    let arguments: serde_json::Value = match call.arguments_json.trim() {
        "" => serde_json::json!({}),
        json => {
            serde_json::from_str(json).map_err(|e| Status::invalid_argument(format!("arguments: not JSON: {e}")))?
        }
    };
    let context = CallContext { session_id: session_id.into(), user_id: user_id.into(), request_id: request_id.into() };
    let call_id = format!("call_{}", uuid::Uuid::new_v4().simple());
    let outcome = match service.plugins.execute(&call.name, arguments.clone(), context).await {
        Ok(result) => Ok(result.to_string()),
        Err(e @ PluginError::NotFound(_)) => return Err(Status::not_found(e.to_string())),
        Err(e @ PluginError::InvalidArguments(_)) => return Err(Status::invalid_argument(e.to_string())),
        Err(e @ PluginError::Disabled { .. }) => return Err(Status::failed_precondition(e.to_string())),
        Err(e) => {
            tracing::warn!(plugin = %call.name, code = e.code(), "plugin call failed: {e}");
            Err(e)
        }
    };
    let now = crate::turn::now_ms();
    let calling = ChatMessage {
        role: "assistant".into(),
        created_at_ms: now,
        tool_calls: vec![ToolCall {
            id: call_id.clone(),
            name: call.name.clone(),
            arguments_json: arguments.to_string(),
        }],
        ..Default::default()
    };
    let content = match &outcome {
        Ok(json) => json.clone(),
        Err(e) => serde_json::json!({ "error": e.to_string(), "code": e.code() }).to_string(),
    };
    let answered = ChatMessage {
        role: "tool".into(),
        content,
        created_at_ms: now,
        tool_call_id: call_id.clone(),
        name: call.name,
        ..Default::default()
    };
    Ok(Ran { call_id, outcome, messages: vec![calling, answered] })
}

/// A plugin run as part of a chat turn (`ChatRequest.plugin`): the messages that record it.
pub(crate) async fn run(
    service: &DialogueService,
    plugin: Call,
    session_id: &str,
    user_id: &str,
    request_id: &str,
) -> Result<Vec<ChatMessage>, Status> {
    Ok(call(service, plugin, session_id, user_id, request_id).await?.messages)
}

/// A message as the model's prompt shows it. A tool call has no text of its own, so the model sees it described
/// (models whose chat templates render `tool_calls` are the tool-calling work still to come).
pub(crate) fn for_model(m: &ChatMessage) -> ChatMessage {
    let mut shown = m.clone();
    if shown.content.is_empty() && !shown.tool_calls.is_empty() {
        let calls: Vec<String> = shown
            .tool_calls
            .iter()
            .map(|c| format!("Calling the tool {} with {}.", c.name, c.arguments_json))
            .collect();
        shown.content = calls.join(" ");
    }
    shown
}

/// `ExecutePlugin`: a user's direct call, stored in their session when one is named.
pub(crate) async fn execute(
    service: &DialogueService,
    r: ExecutePluginRequest,
) -> Result<ExecutePluginResponse, Status> {
    // The session must be the caller's before anything runs (a plugin never acts in another user's session), and
    // its turn lock keeps a turn running meanwhile from interleaving with the call's two messages.
    let lock = match r.session_id.as_str() {
        "" => None,
        id => Some(crate::turn::SessionLock::acquire(service, id, &r.user_id).await?),
    };
    let plugin = Call { name: r.name, arguments_json: r.arguments_json };
    let ran = call(service, plugin, &r.session_id, &r.user_id, &r.request_id).await?;
    if let Some(lock) = lock {
        let append = AppendMessagesRequest { session_id: r.session_id, user_id: r.user_id, messages: ran.messages };
        service.sessions.clone().append_messages(append).await?;
        lock.release().await;
    }
    let call_id = ran.call_id;
    Ok(match ran.outcome {
        Ok(json) => {
            ExecutePluginResponse { call_id, outcome: Some(Outcome::ResultJson(json)), error_code: String::new() }
        }
        Err(e) => {
            ExecutePluginResponse { call_id, outcome: Some(Outcome::Error(e.to_string())), error_code: e.code().into() }
        }
    })
}
