//! `POST /api/chat`: MoltBot's own chat API. The mode is hybrid unless `X-Dialogue-Mode` says otherwise: a session
//! id (`X-Session-Id`, or `session_id` in the body) continues that session, none answers single-turn. Start a
//! conversation with `X-Dialogue-Mode: multi` (or `POST /api/sessions`) to get a session id.

use std::convert::Infallible;

use axum::{
    Json,
    extract::State,
    http::HeaderMap,
    response::{
        IntoResponse, Response, Sse,
        sse::{Event, KeepAlive},
    },
};
use moltbot_proto::dialogue::v1::{ChatRequest, DialogueMode, chat_event};
use serde::Deserialize;
use serde_json::json;

use crate::{
    ApiError, AppState, DialogueHeaders, InMessage, SamplingFields, finish_reason, mode_name, to_proto_messages,
    tools::calls_json,
};

#[derive(Debug, Deserialize)]
pub struct NativeChat {
    /// One user message; shorthand for `messages: [{role: user, content}]`.
    message: Option<String>,
    messages: Option<Vec<InMessage>>,
    session_id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    /// Run this plugin before the model answers; the call and its result are part of the turn.
    plugin: Option<PluginField>,
    #[serde(flatten)]
    sampling: SamplingFields,
    #[serde(flatten)]
    tools: crate::tools::ToolFields,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginField {
    name: String,
    #[serde(default)]
    arguments: serde_json::Map<String, serde_json::Value>,
}

pub async fn chat(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Extension(turn): axum::Extension<crate::observe::TurnId>,
    crate::body::JsonBody(body): crate::body::JsonBody<NativeChat>,
) -> Result<Response, ApiError> {
    let dh = DialogueHeaders::parse(&headers)?;
    let messages = match (body.message, body.messages) {
        (Some(text), None) => to_proto_messages(vec![InMessage {
            role: "user".into(),
            content: Some(text.into()),
            ..Default::default()
        }])?,
        (None, Some(messages)) => to_proto_messages(messages)?,
        _ => {
            return Err(ApiError::bad_request("give either `message` or `messages`", Some("message")));
        }
    };
    let (tools, plugins) = body.tools.to_proto()?;
    let request = ChatRequest {
        request_id: turn.0,
        user_id: dh.user_id,
        session_id: if dh.session_id.is_empty() { body.session_id.unwrap_or_default() } else { dh.session_id },
        mode: dh.mode.unwrap_or(DialogueMode::Hybrid).into(),
        model: body.model.unwrap_or_default(),
        messages,
        sampling: Some(body.sampling.to_proto()?),
        plugin: body.plugin.map(|p| moltbot_proto::dialogue::v1::PluginCall {
            name: p.name,
            arguments_json: serde_json::Value::Object(p.arguments).to_string(),
        }),
        tools,
        plugins,
    };
    let mut turn = state.start_turn(request).await?;
    if !body.stream {
        let answer = turn.collect().await?;
        let mut body = answer_json(&answer.started, &answer.finished);
        body["tool_results"] = answer.tool_results.iter().map(tool_result_json).collect();
        let mut response = Json(body).into_response();
        response.extensions_mut().insert(crate::observe::Tokens::of(&answer.finished.usage.unwrap_or_default()));
        return Ok(response);
    }
    let events = sse_from_task(move |tx| async move {
        let mut started = Default::default();
        loop {
            let event = match turn.next().await {
                Ok(Some(event)) => event.event,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Event::default().event("error").json_data(e.body()).unwrap_or_default()).await;
                    break;
                }
            };
            let sse = match event {
                Some(chat_event::Event::Started(s)) => {
                    let data = json!({ "session_id": s.session_id, "mode": mode_name(s.mode), "model": s.model });
                    started = s;
                    Event::default().event("start").json_data(data)
                }
                Some(chat_event::Event::Delta(d)) => {
                    Event::default().event("delta").json_data(json!({ "text": d.text }))
                }
                Some(chat_event::Event::Finished(f)) => {
                    Event::default().event("done").json_data(answer_json(&started, &f))
                }
                Some(chat_event::Event::ToolResult(r)) => {
                    Event::default().event("tool").json_data(tool_result_json(&r))
                }
                None => continue,
            };
            if tx.send(sse.unwrap_or_default()).await.is_err() {
                break;
            }
        }
    });
    let mut response = events.into_response();
    crate::unbuffered(&mut response);
    Ok(response)
}

fn answer_json(
    s: &moltbot_proto::dialogue::v1::TurnStarted,
    f: &moltbot_proto::dialogue::v1::TurnFinished,
) -> serde_json::Value {
    let message = f.message.clone().unwrap_or_default();
    let usage = f.usage.unwrap_or_default();
    json!({
        "session_id": (!s.session_id.is_empty()).then_some(&s.session_id),
        "mode": mode_name(s.mode),
        "model": s.model,
        "message": if message.tool_calls.is_empty() {
            json!({ "role": message.role, "content": message.content })
        } else {
            json!({ "role": message.role, "content": message.content, "tool_calls": calls_json(&message.tool_calls, false) })
        },
        "finish_reason": finish_reason(f.finish_reason),
        "usage": crate::usage_json(&usage),
    })
}

/// A plugin the model called within the turn: the call in OpenAI's shape, and what it gave back.
fn tool_result_json(r: &moltbot_proto::dialogue::v1::ToolResult) -> serde_json::Value {
    let call = r.call.clone().unwrap_or_default();
    json!({ "tool_call": calls_json(&[call], false)[0], "content": r.content, "failed": r.failed })
}

/// An SSE response fed by a task. The task is dropped the moment the client goes away (the body, and with it the
/// channel, closes), even while it waits for a first token: that drops the turn, which cancels its job. A comment
/// line every 15 s keeps proxies from closing a stream that waits in the queue.
pub(crate) fn sse_from_task<F, Fut>(produce: F) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let watch = tx.clone();
    let produce = produce(tx);
    tokio::spawn(async move {
        tokio::select! {
            () = produce => {}
            () = watch.closed() => {}
        }
    });
    let events = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok);
    Sse::new(events).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
}
