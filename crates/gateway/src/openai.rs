//! `POST /v1/chat/completions`, `GET /v1/models` and `GET /v1/models/{id}`, compatible with the official OpenAI clients. Without
//! conversation headers a request is single-turn: the client sends the whole conversation, as with OpenAI.

use axum::{
    Json,
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response, sse::Event},
};
use moltbot_proto::dialogue::v1::{ChatRequest, DialogueMode, ListModelsRequest, chat_event};
use serde::Deserialize;
use serde_json::json;

use crate::{
    ApiError, AppState, DialogueHeaders, InMessage, SamplingFields, finish_reason, native::sse_from_task,
    to_proto_messages, tools::calls_json as tool_calls_json,
};

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    model: Option<String>,
    messages: Option<Vec<InMessage>>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    #[serde(flatten)]
    sampling: SamplingFields,
    #[serde(flatten)]
    tools: crate::tools::ToolFields,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Extension(turn): axum::Extension<crate::observe::TurnId>,
    crate::body::JsonBody(body): crate::body::JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let dh = DialogueHeaders::parse(&headers)?;
    if body.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported", Some("n")));
    }
    let messages = to_proto_messages(
        body.messages.ok_or_else(|| ApiError::bad_request("messages is required", Some("messages")))?,
    )?;
    let (tools, plugins) = body.tools.to_proto()?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let request = ChatRequest {
        request_id: turn.0,
        user_id: dh.user_id,
        session_id: dh.session_id,
        mode: dh.mode.unwrap_or(DialogueMode::Hybrid).into(),
        model: body.model.unwrap_or_default(),
        messages,
        sampling: Some(body.sampling.to_proto()?),
        plugin: None,
        tools,
        plugins,
    };
    let mut turn = state.start_turn(request).await?;
    let created = unix_now();
    if !body.stream {
        let answer = turn.collect().await?;
        let message = answer.finished.message.unwrap_or_default();
        let usage = answer.finished.usage.unwrap_or_default();
        let mut response = Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": answer.started.model,
            "choices": [{
                "index": 0,
                "message": message_json(&message),
                "finish_reason": finish_reason(answer.finished.finish_reason),
                "logprobs": null,
            }],
            "usage": crate::usage_json(&usage),
        }))
        .into_response();
        response.extensions_mut().insert(crate::observe::Tokens::of(&usage));
        session_header(&mut response, &answer.started.session_id);
        return Ok(response);
    }
    // The first event tells the session (if any) so it can go into a header before the body starts.
    let first = turn.next().await?;
    let (model, session_id) = match first.as_ref().and_then(|e| e.event.as_ref()) {
        Some(chat_event::Event::Started(s)) => (s.model.clone(), s.session_id.clone()),
        _ => (String::new(), String::new()),
    };
    let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
    let events = sse_from_task(move |tx| async move {
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null }],
            })
        };
        let send = |value: serde_json::Value| {
            let tx = tx.clone();
            async move { tx.send(Event::default().json_data(value).unwrap_or_default()).await.is_ok() }
        };
        if !send(chunk(json!({ "role": "assistant", "content": "" }), None)).await {
            return;
        }
        loop {
            let event = match turn.next().await {
                Ok(Some(event)) => event.event,
                Ok(None) => break,
                Err(e) => {
                    send(e.body()).await;
                    return;
                }
            };
            match event {
                Some(chat_event::Event::Delta(d)) => {
                    if !send(chunk(json!({ "content": d.text }), None)).await {
                        return;
                    }
                }
                Some(chat_event::Event::Finished(f)) => {
                    let calls = f.message.as_ref().map(|m| m.tool_calls.as_slice()).unwrap_or_default();
                    if !calls.is_empty()
                        && !send(chunk(json!({ "tool_calls": tool_calls_json(calls, true) }), None)).await
                    {
                        return;
                    }
                    send(chunk(json!({}), Some(finish_reason(f.finish_reason)))).await;
                    if include_usage {
                        let usage = f.usage.unwrap_or_default();
                        let mut last = chunk(json!({}), None);
                        last["choices"] = json!([]);
                        last["usage"] = crate::usage_json(&usage);
                        send(last).await;
                    }
                    break;
                }
                // Plugins the server ran are not the client's calls: OpenAI's shapes have no place for them.
                Some(chat_event::Event::Started(_) | chat_event::Event::ToolResult(_)) | None => {}
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    let mut response = events.into_response();
    session_header(&mut response, &session_id);
    crate::unbuffered(&mut response);
    Ok(response)
}

/// The answer as OpenAI's `message`: `content` is null when the answer is only calls.
fn message_json(message: &moltbot_proto::common::v1::ChatMessage) -> serde_json::Value {
    if message.tool_calls.is_empty() {
        return json!({ "role": "assistant", "content": message.content });
    }
    let content = (!message.content.is_empty()).then_some(&message.content);
    json!({ "role": "assistant", "content": content, "tool_calls": tool_calls_json(&message.tool_calls, false) })
}

fn session_header(response: &mut Response, session_id: &str) {
    if !session_id.is_empty()
        && let Ok(value) = session_id.parse()
    {
        response.headers_mut().insert("x-session-id", value);
    }
}

pub async fn models(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let models = state.dialogue.clone().list_models(ListModelsRequest {}).await?.into_inner().models;
    let data: Vec<_> = models.iter().map(model_json).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `GET /v1/models/{id}`: one served model (the OpenAI clients' `models.retrieve`), or OpenAI's 404
/// `model_not_found`.
pub async fn model(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let models = state.dialogue.clone().list_models(ListModelsRequest {}).await?.into_inner().models;
    let model =
        models.iter().find(|m| m.id == id || m.aliases.contains(&id)).ok_or_else(|| ApiError::model_not_found(&id))?;
    Ok(Json(model_json(model)))
}

/// OpenAI's model object, with what MoltBot knows beside: the context window, the longest answer, where the model
/// runs, what a request may use, and its other names.
fn model_json(model: &moltbot_proto::common::v1::ModelCard) -> serde_json::Value {
    json!({
        "id": model.id,
        "object": "model",
        "created": 0,
        "owned_by": "moltbot",
        "context_length": model.context_length,
        "max_output_tokens": model.max_output_tokens,
        "provider": model.provider,
        "capabilities": { "tools": model.tools, "vision": model.vision, "json_schema": model.json_schema },
        "aliases": model.aliases,
    })
}
