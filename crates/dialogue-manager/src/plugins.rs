//! Plugin calls by the user (`ExecutePlugin`): run within the plugin's limits and, in a session, recorded in it
//! as an assistant message with the tool call and a tool message with the result or the error.

use moltbot_plugin::{CallContext, PluginError, PluginState, Plugins};
use moltbot_proto::{
    common::v1::{ChatMessage, ToolCall},
    dialogue::v1::{
        ExecutePluginRequest, ExecutePluginResponse, ListPluginsResponse, PluginStatus,
        execute_plugin_response::Outcome,
    },
    session::v1::{AppendMessagesRequest, GetSessionRequest},
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

pub(crate) async fn execute(
    service: &DialogueService,
    r: ExecutePluginRequest,
) -> Result<ExecutePluginResponse, Status> {
    let arguments: serde_json::Value = match r.arguments_json.trim() {
        "" => serde_json::json!({}),
        json => {
            serde_json::from_str(json).map_err(|e| Status::invalid_argument(format!("arguments: not JSON: {e}")))?
        }
    };
    // The session must be the caller's before anything runs: a plugin never acts in another user's session.
    if !r.session_id.is_empty() {
        let get = GetSessionRequest {
            session_id: r.session_id.clone(),
            user_id: r.user_id.clone(),
            message_offset: 0,
            message_limit: 1,
        };
        service.sessions.clone().get_session(get).await?;
    }
    let call =
        CallContext { session_id: r.session_id.clone(), user_id: r.user_id.clone(), request_id: r.request_id.clone() };
    let call_id = format!("call_{}", uuid::Uuid::new_v4().simple());
    let outcome = match service.plugins.execute(&r.name, arguments.clone(), call).await {
        Ok(result) => Ok(result.to_string()),
        Err(e @ PluginError::NotFound(_)) => return Err(Status::not_found(e.to_string())),
        Err(e @ PluginError::InvalidArguments(_)) => return Err(Status::invalid_argument(e.to_string())),
        Err(e @ PluginError::Disabled { .. }) => return Err(Status::failed_precondition(e.to_string())),
        Err(e) => {
            tracing::warn!(plugin = %r.name, code = e.code(), "plugin call failed: {e}");
            Err(e)
        }
    };
    if !r.session_id.is_empty() {
        let now = crate::turn::now_ms();
        let calling = ChatMessage {
            role: "assistant".into(),
            created_at_ms: now,
            tool_calls: vec![ToolCall {
                id: call_id.clone(),
                name: r.name.clone(),
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
            name: r.name.clone(),
            ..Default::default()
        };
        let append =
            AppendMessagesRequest { session_id: r.session_id, user_id: r.user_id, messages: vec![calling, answered] };
        service.sessions.clone().append_messages(append).await?;
    }
    Ok(match outcome {
        Ok(json) => {
            ExecutePluginResponse { call_id, outcome: Some(Outcome::ResultJson(json)), error_code: String::new() }
        }
        Err(e) => {
            ExecutePluginResponse { call_id, outcome: Some(Outcome::Error(e.to_string())), error_code: e.code().into() }
        }
    })
}
