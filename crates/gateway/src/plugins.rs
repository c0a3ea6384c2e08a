//! `/api/plugins`: what plugins there are, and calling one directly. The dialogue-manager runs them.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use moltbot_proto::dialogue::v1::{ExecutePluginRequest, ListPluginsRequest, execute_plugin_response::Outcome};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ApiError, AppState, DialogueHeaders};

/// `GET /api/plugins` → every plugin with its parameters' schema and state (`ready`, or `disabled` and why).
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let plugins = state.dialogue.clone().list_plugins(ListPluginsRequest {}).await?.into_inner().plugins;
    let plugins: Vec<Value> = plugins
        .into_iter()
        .map(|p| {
            let parameters: Value = serde_json::from_str(&p.parameters_json).unwrap_or(Value::Null);
            let mut shown = json!({
                "name": p.name, "object": "plugin", "version": p.version, "description": p.description,
                "parameters": parameters, "source": p.source, "state": if p.ready { "ready" } else { "disabled" },
            });
            if !p.ready {
                shown["reason"] = p.disabled_reason.into();
            }
            shown
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": plugins })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Execution {
    #[serde(default)]
    arguments: serde_json::Map<String, Value>,
    /// Record the call and its result in this session of the caller's.
    #[serde(default)]
    session_id: String,
}

/// `POST /api/plugins/{name}/execute` with `{"arguments": {...}, "session_id": "..."}` → 200 with the result;
/// a plugin that fails is 502 (504 past its timeout) with the error; either way the call is in the session.
pub async fn execute(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Extension(turn): axum::Extension<crate::observe::TurnId>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: Execution =
        if body.iter().all(u8::is_ascii_whitespace) { Execution::default() } else { crate::body::parse(&body)? };
    let dialogue = DialogueHeaders::parse(&headers)?;
    let request = ExecutePluginRequest {
        request_id: turn.0,
        user_id: dialogue.user_id,
        session_id: body.session_id,
        name: name.clone(),
        arguments_json: Value::Object(body.arguments).to_string(),
    };
    let response = state.dialogue.clone().execute_plugin(request).await?.into_inner();
    Ok(match response.outcome {
        Some(Outcome::ResultJson(json)) => {
            let result: Value = serde_json::from_str(&json).unwrap_or(Value::String(json));
            Json(json!({ "object": "plugin.result", "call_id": response.call_id, "plugin": name, "result": result }))
                .into_response()
        }
        outcome => {
            let message = match outcome {
                Some(Outcome::Error(e)) => e,
                _ => "the plugin gave no result".into(),
            };
            let status = if response.error_code == "plugin_timeout" {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            let error =
                json!({ "message": message, "type": response.error_code, "code": response.error_code, "param": null });
            (status, Json(json!({ "error": error, "call_id": response.call_id, "plugin": name }))).into_response()
        }
    })
}
