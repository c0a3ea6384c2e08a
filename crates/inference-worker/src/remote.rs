//! The `remote_api` provider: a model behind an OpenAI-compatible HTTP API (OpenAI, llama.cpp's `llama-server`,
//! vLLM, another MoltBot). The worker takes jobs from the queue as for its own engine, with `max_concurrency`
//! calls in flight instead of batch slots, and turns each into one streamed `POST {endpoint_url}/chat/completions`.
//!
//! A call refused with 429 or 5xx, or one that cannot connect, is tried again (`max_retries`) before any of its
//! answer came, after an exponential backoff with jitter and never sooner than the remote's `Retry-After`. The
//! remote's errors become MoltBot's codes: its 400 is the request's fault; its 401, 403 and 404 are the operator's
//! (the key or the model name is wrong), logged as such and answered as a server error, never as the user's 401.
//! Dropping the events of a call (a cancel, the deadline) closes its connection, which ends the remote's stream.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use moltbot_config::ModelProviderConfig;
use moltbot_engine::{FinishReason, GenerationEvent, ToolCall, Usage};
use moltbot_proto::{
    ErrorCode,
    common::v1::{ChatMessage, ModelCard, tool_choice::Mode},
    inference::v1::{GenerateRequest, generate_request::Input},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The longest wait between two tries, whatever `Retry-After` says; a longer one fails the call at once.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The first backoff; it doubles with each try.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Why a remote call failed: the code the requester sees, and what to tell it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// A model served by a remote OpenAI-compatible API; cheap to clone.
#[derive(Clone)]
pub struct Remote {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    /// `{endpoint_url}/chat/completions`.
    url: String,
    /// The name clients use here, and the remote's name for the model.
    name: String,
    remote_model: String,
    api_key: String,
    organization: String,
    max_retries: u32,
    read_timeout: Duration,
    max_concurrency: usize,
    card: ModelCard,
}

impl Remote {
    pub fn new(config: &ModelProviderConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(config.connect_timeout))
            .user_agent(concat!("moltbot/", env!("CARGO_PKG_VERSION")))
            // A redirect would carry the API key elsewhere; an API that moved is the operator's to set.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let capabilities = &config.capabilities;
        let card = ModelCard {
            id: config.model_name.clone(),
            context_length: config.context_length,
            max_output_tokens: config.max_tokens,
            provider: "remote_api".into(),
            tools: capabilities.tools,
            vision: capabilities.vision,
            json_schema: capabilities.json_schema,
            aliases: vec![],
        };
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                url: format!("{}/chat/completions", config.endpoint_url().trim_end_matches('/')),
                name: config.model_name.clone(),
                remote_model: config.remote_model().to_owned(),
                api_key: config.auth.api_key.clone(),
                organization: config.auth.organization.clone(),
                max_retries: config.max_retries,
                read_timeout: Duration::from_secs(config.read_timeout),
                max_concurrency: config.max_concurrency,
                card,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Calls in flight at once.
    pub fn max_concurrency(&self) -> usize {
        self.inner.max_concurrency
    }

    pub fn card(&self) -> ModelCard {
        self.inner.card.clone()
    }

    /// Where the calls go (for the model info).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Starts a streamed call of `request` and returns its events; the last is `Finished` or an error. Dropping
    /// the receiver ends the call and closes its connection.
    pub fn generate(
        &self,
        request: GenerateRequest,
        deadline: tokio::time::Instant,
    ) -> mpsc::Receiver<Result<GenerationEvent, Failure>> {
        let (tx, rx) = mpsc::channel(64);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let call = async {
                let body = body(&inner.remote_model, request)?;
                let response = inner.send(&body, deadline).await?;
                inner.stream(response, &tx).await
            };
            // The requester went away: the call is dropped, and with it the connection.
            tokio::select! {
                () = tx.closed() => {}
                ended = call => if let Err(failure) = ended {
                    let _ = tx.send(Err(failure)).await;
                }
            }
        });
        rx
    }
}

impl Inner {
    /// Posts `body` until the remote accepts it, retrying what may pass (429, 5xx, no connection) with backoff.
    /// Each try waits for the response's head at most `read_timeout` (and never past the deadline).
    async fn send(&self, body: &Value, deadline: tokio::time::Instant) -> Result<reqwest::Response, Failure> {
        let mut attempt = 0;
        loop {
            let mut post = self.client.post(&self.url).json(body);
            if !self.api_key.is_empty() {
                post = post.bearer_auth(&self.api_key);
            }
            if !self.organization.is_empty() {
                post = post.header("OpenAI-Organization", &self.organization);
            }
            let wait = self.read_timeout.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let (failure, retry_after) = match tokio::time::timeout(wait, post.send()).await {
                Ok(Ok(response)) if response.status().is_success() => return Ok(response),
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    let retry_after = retry_after(response.headers());
                    let detail = error_message(response).await;
                    match status {
                        429 | 500 | 502 | 503 | 504 => (self.refused(status, &detail), retry_after),
                        _ => return Err(self.rejected(status, &detail)),
                    }
                }
                Ok(Err(e)) if e.is_builder() => {
                    tracing::error!(url = %self.url, error = %e.without_url(), "cannot build a request to the remote API: check model_provider.endpoint_url and auth");
                    return Err(self.misconfigured("its request cannot be made"));
                }
                Ok(Err(e)) => (self.unreachable(&e), None),
                Err(_) => (self.unreachable_after(wait), None),
            };
            let backoff = backoff(attempt).max(retry_after.unwrap_or_default());
            if attempt >= self.max_retries || backoff > MAX_BACKOFF || tokio::time::Instant::now() + backoff >= deadline
            {
                return Err(failure);
            }
            tracing::info!(url = %self.url, attempt, wait_ms = backoff.as_millis() as u64, error = %failure.message, "retrying the remote API");
            tokio::time::sleep(backoff).await;
            attempt += 1;
        }
    }

    /// The operator's error, as the requester sees it: the model, not the API's address or credentials.
    fn misconfigured(&self, why: &str) -> Failure {
        Failure::new(ErrorCode::Internal, format!("model `{}` is misconfigured on this server ({why})", self.name))
    }

    /// A refusal no retry mends: the caller's (400, 413, 422) or the operator's (401, 403, 404, other).
    fn rejected(&self, status: u16, detail: &str) -> Failure {
        match status {
            400 | 413 | 422 => {
                Failure::new(ErrorCode::InvalidArgument, format!("the model refused the request: {detail}"))
            }
            401 | 403 => {
                tracing::error!(url = %self.url, status, %detail, "the remote API refuses MoltBot's credentials: check model_provider.auth.api_key (and auth.organization)");
                self.misconfigured("its API refused the credentials")
            }
            404 => {
                tracing::error!(url = %self.url, model = %self.remote_model, %detail, "the remote API has no such model or endpoint: check model_provider.remote_model and endpoint_url");
                self.misconfigured("its API does not know it")
            }
            _ => {
                tracing::warn!(url = %self.url, status, %detail, "the remote API refused a call");
                Failure::new(
                    ErrorCode::Internal,
                    format!("the API of model `{}` answered HTTP {status}: {detail}", self.name),
                )
            }
        }
    }

    /// A refusal that may pass: rate limited (429) or failing (5xx).
    fn refused(&self, status: u16, detail: &str) -> Failure {
        tracing::warn!(url = %self.url, status, %detail, "the remote API refused a call");
        if status == 429 {
            Failure::new(
                ErrorCode::ResourceExhausted,
                format!("the API of model `{}` is rate limiting this server: {detail}", self.name),
            )
        } else {
            Failure::new(
                ErrorCode::Unavailable,
                format!("the API of model `{}` failed (HTTP {status}): {detail}", self.name),
            )
        }
    }

    /// A call that got no answer. The address is logged, not told to the requester.
    fn unreachable(&self, e: &reqwest::Error) -> Failure {
        let cause = std::error::Error::source(e).map(ToString::to_string).unwrap_or_else(|| e.to_string());
        tracing::warn!(url = %self.url, error = %cause, "the remote API is not reachable");
        let what = if e.is_timeout() { "did not answer in time" } else { "is not reachable" };
        Failure::new(ErrorCode::Unavailable, format!("the API of model `{}` {what}", self.name))
    }

    fn unreachable_after(&self, wait: Duration) -> Failure {
        tracing::warn!(url = %self.url, wait_ms = wait.as_millis() as u64, "the remote API did not answer in time");
        Failure::new(ErrorCode::Unavailable, format!("the API of model `{}` did not answer in time", self.name))
    }

    /// Reads the server-sent events of an accepted call into `tx`.
    async fn stream(
        &self,
        response: reqwest::Response,
        tx: &mpsc::Sender<Result<GenerationEvent, Failure>>,
    ) -> Result<(), Failure> {
        let mut body = response.bytes_stream();
        let mut events = Events::default();
        let mut answer = Answer::default();
        let send = async |answer_events: Vec<GenerationEvent>| {
            for event in answer_events {
                tx.send(Ok(event)).await.map_err(|_| Failure::new(ErrorCode::Cancelled, "cancelled"))?;
            }
            Ok::<_, Failure>(())
        };
        loop {
            let chunk = match tokio::time::timeout(self.read_timeout, body.next()).await {
                Err(_) => {
                    return Err(Failure::new(
                        ErrorCode::Unavailable,
                        format!(
                            "the API of model `{}` went silent for {} s mid-answer",
                            self.name,
                            self.read_timeout.as_secs()
                        ),
                    ));
                }
                // A stream that ends without `[DONE]` after its finish reason still finished.
                Ok(None) if answer.reason.is_some() => return send(answer.finish()).await,
                Ok(None) => {
                    return Err(Failure::new(
                        ErrorCode::Unavailable,
                        format!("the API of model `{}` ended the answer early", self.name),
                    ));
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(url = %self.url, error = %e.without_url(), "the remote API's answer broke off");
                    return Err(Failure::new(
                        ErrorCode::Unavailable,
                        format!("the answer of model `{}`'s API broke off", self.name),
                    ));
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            for data in events.push(&chunk)? {
                if data == "[DONE]" {
                    return send(answer.finish()).await;
                }
                if data.is_empty() {
                    continue;
                }
                let chunk: Value = serde_json::from_str(&data).map_err(|e| {
                    Failure::new(ErrorCode::Internal, format!("the remote API sent an event that is not JSON: {e}"))
                })?;
                send(answer.read(&chunk)?).await?;
            }
        }
    }
}

/// The most bytes one server-sent event may have.
const MAX_EVENT_BYTES: usize = 4 << 20;

/// Server-sent events out of a byte stream: each event's `data:` lines, joined by newlines, once a blank line
/// ends it (lines end in `\n` or `\r\n`; other fields and comments are skipped).
#[derive(Default)]
struct Events {
    buffer: Vec<u8>,
    data: Vec<String>,
}

impl Events {
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, Failure> {
        self.buffer.extend_from_slice(bytes);
        let mut out = vec![];
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(std::mem::take(&mut self.data).join("\n"));
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                self.data.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
            }
        }
        // `[DONE]` is often the last thing sent, with no blank line after it.
        if self.data.len() == 1 && self.data[0] == "[DONE]" {
            out.push(self.data.remove(0));
        }
        if self.buffer.len() + self.data.iter().map(String::len).sum::<usize>() > MAX_EVENT_BYTES {
            return Err(Failure::new(ErrorCode::Internal, "the remote API sent an event over 4 MiB"));
        }
        Ok(out)
    }
}

/// What an answer's chunks said so far.
#[derive(Default)]
struct Answer {
    /// Calls by index: id, name, arguments as they arrived.
    calls: Vec<(String, String, String)>,
    reason: Option<FinishReason>,
    usage: Usage,
}

impl Answer {
    /// The events one `chat.completion.chunk` brings.
    fn read(&mut self, chunk: &Value) -> Result<Vec<GenerationEvent>, Failure> {
        if let Some(error) = chunk.get("error") {
            let message = error.get("message").and_then(Value::as_str).unwrap_or("unknown error");
            return Err(Failure::new(ErrorCode::Internal, format!("the remote API failed mid-answer: {message}")));
        }
        let mut events = vec![];
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let count = |key: &str| usage.get(key).and_then(Value::as_u64).unwrap_or(0) as u32;
            let cached = usage.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_u64).unwrap_or(0);
            self.usage = Usage {
                prompt_tokens: count("prompt_tokens"),
                completion_tokens: count("completion_tokens"),
                cached_tokens: cached as u32,
            };
        }
        let Some(choice) = chunk.pointer("/choices/0") else { return Ok(events) };
        if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            events.push(GenerationEvent::Token { text: text.to_owned(), id: None });
        }
        for call in choice.pointer("/delta/tool_calls").and_then(Value::as_array).into_iter().flatten() {
            // A fragment without an index goes on with the last call.
            let last = self.calls.len().saturating_sub(1) as u64;
            let index = call.get("index").and_then(Value::as_u64).unwrap_or(last) as usize;
            if index > 1024 {
                return Err(Failure::new(ErrorCode::Internal, "the remote API sent a tool call index past 1024"));
            }
            if self.calls.len() <= index {
                self.calls.resize(index + 1, Default::default());
            }
            let (id, name, arguments) = &mut self.calls[index];
            let text = |pointer: &str| call.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            id.push_str(text("/id"));
            name.push_str(text("/function/name"));
            arguments.push_str(text("/function/arguments"));
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.reason = Some(match reason {
                "length" => FinishReason::Length,
                "tool_calls" | "function_call" => FinishReason::ToolCalls,
                _ => FinishReason::Stop,
            });
        }
        Ok(events)
    }

    /// The last events: the calls the answer made, then how it finished.
    fn finish(&mut self) -> Vec<GenerationEvent> {
        let mut events = vec![];
        let calls: Vec<ToolCall> = std::mem::take(&mut self.calls)
            .into_iter()
            .filter(|(_, name, _)| !name.is_empty())
            .map(|(id, name, arguments)| ToolCall { id, name, arguments })
            .collect();
        let mut reason = self.reason.unwrap_or(FinishReason::Stop);
        // Calls cut off by the length limit are not calls: their arguments are unfinished.
        if !calls.is_empty() && reason != FinishReason::Length {
            reason = FinishReason::ToolCalls;
            events.push(GenerationEvent::ToolCalls(calls));
        }
        events.push(GenerationEvent::Finished { reason, usage: self.usage });
        events
    }
}

/// The request body OpenAI's chat completions take.
fn body(model: &str, request: GenerateRequest) -> Result<Value, Failure> {
    let chat = match request.input {
        Some(Input::Chat(chat)) => chat,
        Some(Input::Prompt(_)) => {
            return Err(Failure::new(
                ErrorCode::InvalidArgument,
                "a raw text prompt needs a local model; send chat messages to a remote one",
            ));
        }
        None => return Err(Failure::new(ErrorCode::InvalidArgument, "the request has no input")),
    };
    let mut body = json!({
        "model": model,
        "messages": chat.messages.iter().map(message).collect::<Vec<_>>(),
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let s = request.sampling.unwrap_or_default();
    let fields = [
        ("temperature", s.temperature.map(|t| json!(t))),
        ("top_p", s.top_p.map(|p| json!(p))),
        ("seed", s.seed.map(|seed| json!(seed))),
        ("max_tokens", s.max_tokens.map(|n| json!(n))),
        ("stop", (!s.stop.is_empty()).then(|| json!(s.stop))),
    ];
    for (key, value) in fields {
        if let Some(value) = value {
            body[key] = value;
        }
    }
    if let Some(schema) = s.json_schema.as_deref() {
        let schema: Value = serde_json::from_str(schema)
            .map_err(|e| Failure::new(ErrorCode::InvalidArgument, format!("json_schema is not JSON: {e}")))?;
        body["response_format"] =
            json!({ "type": "json_schema", "json_schema": { "name": "response", "schema": schema } });
    }
    if let Some(tools) = chat.tools.filter(|t| !t.tools.is_empty()) {
        let parameters = |json: &str| serde_json::from_str::<Value>(json).unwrap_or(json!({ "type": "object" }));
        body["tools"] = tools
            .tools
            .iter()
            .map(|t| {
                json!({ "type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": parameters(&t.parameters_json),
                } })
            })
            .collect();
        let choice = tools.choice.unwrap_or_default();
        body["tool_choice"] = match choice.mode() {
            Mode::Auto => json!("auto"),
            Mode::None => json!("none"),
            Mode::Required => json!("required"),
            Mode::Function => json!({ "type": "function", "function": { "name": choice.function } }),
        };
        if tools.single_call {
            body["parallel_tool_calls"] = json!(false);
        }
    }
    Ok(body)
}

/// One message as OpenAI's `messages[]` item.
fn message(m: &ChatMessage) -> Value {
    let mut out = json!({ "role": m.role, "content": moltbot_proto::common::content_json(m) });
    if !m.tool_calls.is_empty() {
        out["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments_json } }))
            .collect();
        if m.content.is_empty() {
            out["content"] = Value::Null;
        }
    }
    if !m.tool_call_id.is_empty() {
        out["tool_call_id"] = json!(m.tool_call_id);
    }
    if !m.name.is_empty() && m.role == "tool" {
        out["name"] = json!(m.name);
    }
    out
}

/// `Retry-After` in seconds (the HTTP-date form is rare from APIs and read as none).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let seconds = value.trim().parse::<f64>().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// The wait before try `attempt + 1`: 250 ms doubling, with up to half of it again as jitter so that many workers
/// refused at once do not come back at once.
fn backoff(attempt: u32) -> Duration {
    let base = FIRST_BACKOFF.saturating_mul(1 << attempt.min(8));
    base + base.mul_f64(rand::random::<f64>() * 0.5)
}

/// The remote's own words on an error: OpenAI's `error.message`, else the start of the body (read for at most
/// 5 s and 64 KiB).
async fn error_message(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = response.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() > 64 << 10 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    let text = String::from_utf8_lossy(&body);
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| text.into_owned());
    match message.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use moltbot_proto::common::v1::{SamplingParams, Tool, ToolChoice, Tools};
    use moltbot_proto::inference::v1::ChatInput;

    use super::*;

    #[test]
    fn a_request_becomes_openais_body_with_only_standard_fields() {
        let call =
            moltbot_proto::common::v1::ToolCall { id: "c1".into(), name: "f".into(), arguments_json: "{}".into() };
        let messages = vec![
            ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() },
            ChatMessage { role: "assistant".into(), tool_calls: vec![call], ..Default::default() },
            ChatMessage {
                role: "tool".into(),
                content: "42".into(),
                tool_call_id: "c1".into(),
                name: "f".into(),
                ..Default::default()
            },
        ];
        let tools = Tools {
            tools: vec![Tool {
                name: "f".into(),
                description: "d".into(),
                parameters_json: "{\"type\":\"object\"}".into(),
            }],
            choice: Some(ToolChoice { mode: Mode::Required.into(), function: String::new() }),
            single_call: true,
        };
        let request = GenerateRequest {
            input: Some(Input::Chat(ChatInput { messages, tools: Some(tools) })),
            sampling: Some(SamplingParams {
                temperature: Some(0.0),
                top_k: Some(5),
                max_tokens: Some(7),
                ..Default::default()
            }),
            ..Default::default()
        };
        let body = body("remote-name", request).unwrap();
        assert_eq!(body["model"], "remote-name");
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 7);
        assert!(body.get("top_k").is_none(), "OpenAI refuses fields it does not know");
        assert_eq!(body["messages"][1]["content"], Value::Null);
        assert_eq!(body["messages"][1]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(body["messages"][2]["tool_call_id"], "c1");
        assert_eq!(body["tool_choice"], "required");
        assert_eq!(body["parallel_tool_calls"], false);
        let prompt = GenerateRequest { input: Some(Input::Prompt("x".into())), ..Default::default() };
        assert_eq!(body_code(prompt), ErrorCode::InvalidArgument);
    }

    fn body_code(request: GenerateRequest) -> ErrorCode {
        body("m", request).unwrap_err().code
    }

    #[test]
    fn chunks_become_tokens_calls_and_the_finish_with_usage() {
        let mut answer = Answer::default();
        let events = answer.read(&json!({ "choices": [{ "delta": { "content": "Hel" } }] })).unwrap();
        assert!(matches!(&events[..], [GenerationEvent::Token { text, .. }] if text == "Hel"));
        let call = |i: u64, id: &str, name: &str, args: &str| {
            json!({ "choices": [{ "delta": { "tool_calls": [
                { "index": i, "id": id, "function": { "name": name, "arguments": args } }
            ] } }] })
        };
        answer.read(&call(0, "a", "weather", "{\"ci")).unwrap();
        answer.read(&call(0, "", "", "ty\":1}")).unwrap();
        answer.read(&json!({ "choices": [{ "delta": {}, "finish_reason": "tool_calls" }] })).unwrap();
        answer.read(&json!({ "choices": [], "usage": { "prompt_tokens": 9, "completion_tokens": 4 } })).unwrap();
        let end = answer.finish();
        assert!(
            matches!(&end[0], GenerationEvent::ToolCalls(calls) if calls[0].arguments == "{\"city\":1}" && calls[0].name == "weather")
        );
        assert!(matches!(
            &end[1],
            GenerationEvent::Finished { reason: FinishReason::ToolCalls, usage } if usage.prompt_tokens == 9 && usage.completion_tokens == 4
        ));
        let failed = Answer::default().read(&json!({ "error": { "message": "boom" } })).unwrap_err();
        assert!(failed.message.contains("boom"));
    }

    #[test]
    fn events_are_read_across_chunks_and_line_endings() {
        let mut events = Events::default();
        assert!(events.push(b"data: {\"a\"").unwrap().is_empty(), "half a line is kept");
        assert_eq!(events.push(b":1}\r\n\r\n: a comment\n\ndata: x\ndata: y\n\n").unwrap(), ["{\"a\":1}", "x\ny"]);
        assert!(events.push(b"data:\n\n").unwrap() == [""], "an empty event is an empty string");
        assert_eq!(events.push(b"data: [DONE]").unwrap(), Vec::<String>::new(), "no newline yet");
        assert_eq!(events.push(b"\n").unwrap(), ["[DONE]"], "[DONE] needs no blank line after it");
        let mut endless = Events::default();
        assert!(endless.push(&vec![b'x'; MAX_EVENT_BYTES + 1]).is_err());
    }

    #[test]
    fn a_bad_retry_after_is_none_not_a_panic() {
        let mut headers = reqwest::header::HeaderMap::new();
        for value in ["1e20", "-1", "NaN", "inf"] {
            headers.insert(reqwest::header::RETRY_AFTER, value.parse().unwrap());
            assert_eq!(retry_after(&headers), None, "{value}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_retry_after_is_read_in_seconds() {
        for attempt in 0..4 {
            let base = FIRST_BACKOFF * (1 << attempt);
            let wait = backoff(attempt);
            assert!(wait >= base && wait <= base.mul_f64(1.5), "{wait:?} for try {attempt}");
        }
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(reqwest::header::RETRY_AFTER, "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }
}
