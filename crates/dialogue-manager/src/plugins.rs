//! Plugin calls by the user (`ExecutePlugin`): run within the plugin's limits and, in a session, recorded in it
//! as an assistant message with the tool call and a tool message with the result or the error.

use moltbot_plugin::{CallContext, PluginError, PluginState, Plugins};
use moltbot_proto::{
    common::v1::{ChatMessage, Tool, ToolCall},
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

/// A call's arguments: a JSON object, or nothing (none).
fn arguments(json: &str) -> Result<serde_json::Value, String> {
    match json.trim() {
        "" => Ok(serde_json::json!({})),
        json => serde_json::from_str(json).map_err(|e| format!("arguments: not JSON: {e}")),
    }
}

fn context(session_id: &str, user_id: &str, request_id: &str) -> CallContext {
    CallContext { session_id: session_id.into(), user_id: user_id.into(), request_id: request_id.into() }
}

/// A new tool call id, in OpenAI's form.
pub(crate) fn call_id() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

/// The tool message that answers call `id` of plugin `name`: the result, or the error as `{"error", "code"}`.
fn answer(id: &str, name: &str, outcome: &Result<String, PluginError>) -> ChatMessage {
    let content = match outcome {
        Ok(json) => json.clone(),
        Err(e) => serde_json::json!({ "error": e.to_string(), "code": e.code() }).to_string(),
    };
    ChatMessage {
        role: "tool".into(),
        content,
        created_at_ms: crate::turn::now_ms(),
        tool_call_id: id.into(),
        name: name.into(),
        ..Default::default()
    }
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
    let arguments = arguments(&call.arguments_json).map_err(Status::invalid_argument)?;
    let call_id = call_id();
    let context = context(session_id, user_id, request_id);
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
    let calling = ChatMessage {
        role: "assistant".into(),
        created_at_ms: crate::turn::now_ms(),
        tool_calls: vec![ToolCall {
            id: call_id.clone(),
            name: call.name.clone(),
            arguments_json: arguments.to_string(),
        }],
        ..Default::default()
    };
    let answered = answer(&call_id, &call.name, &outcome);
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

/// The plugins a request lets the model call, as tools; each must be loaded and ready.
pub(crate) fn as_tools(plugins: &Plugins, names: &[String]) -> Result<Vec<Tool>, Status> {
    let loaded = plugins.list();
    names
        .iter()
        .map(|name| {
            let plugin = loaded
                .iter()
                .find(|p| &p.name == name)
                .ok_or_else(|| Status::invalid_argument(format!("plugins: no plugin is called `{name}`")))?;
            if let PluginState::Disabled { reason } = &plugin.state {
                return Err(Status::failed_precondition(format!("plugins: the plugin `{name}` is disabled: {reason}")));
            }
            let parameters_json =
                if plugin.parameters.is_null() { String::new() } else { plugin.parameters.to_string() };
            Ok(Tool { name: name.clone(), description: plugin.description.clone(), parameters_json })
        })
        .collect()
}

/// Runs a call the model made of a plugin. Every failure, bad arguments included, is the tool's error, which the
/// model sees in the returned tool message.
pub(crate) async fn run_for_model(
    service: &DialogueService,
    call: &ToolCall,
    session_id: &str,
    user_id: &str,
    request_id: &str,
) -> (ChatMessage, bool) {
    let outcome = match arguments(&call.arguments_json) {
        Ok(arguments) => {
            let context = context(session_id, user_id, request_id);
            service.plugins.execute(&call.name, arguments, context).await.map(|result| result.to_string())
        }
        Err(why) => Err(PluginError::InvalidArguments(why)),
    };
    if let Err(e) = &outcome {
        tracing::info!(plugin = %call.name, code = e.code(), "a plugin the model called failed: {e}");
    }
    (answer(&call.id, &call.name, &outcome), outcome.is_err())
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
