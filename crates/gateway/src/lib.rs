//! The gateway: MoltBot's only public surface. It turns HTTP requests into dialogue-manager `Chat` calls and
//! streams the answers back as JSON or server-sent events. **The gateway holds no conversation state and never
//! talks to Redis or the queue.**

mod auth;
mod body;
mod cache;
mod error;
mod images;
mod limits;
mod native;
mod observe;
mod openai;
mod plugins;
mod serve;
mod sessions;
mod tools;
mod web;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    http::HeaderMap,
    routing::{get, post},
};
use moltbot_config::GatewayConfig;
use moltbot_proto::{
    Replicas,
    dialogue::v1::{
        ChatEvent, ChatRequest, DialogueMode, ListModelsRequest, chat_event, dialogue_client::DialogueClient,
    },
};
use tokio::{net::TcpListener, sync::Semaphore};

pub use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    dialogue: DialogueClient<Replicas>,
    slots: Arc<Semaphore>,
    per_user: limits::UserSlots,
    /// How long turns take: when a refused client should come back.
    turn_times: Arc<limits::TurnTimes>,
    timeout: Duration,
    max_messages: usize,
    images: images::ImageLimits,
}

/// A client of the dialogue-manager at `urls` (one, or replicas separated by commas: calls take turns, and
/// one a replica never took goes to the next); it connects lazily, so the gateway starts before its backend
/// and `/ready` tells whether it is there.
pub fn dialogue_client(urls: &str, credential: &moltbot_proto::Credential) -> anyhow::Result<DialogueClient<Replicas>> {
    let channel = Replicas::lazy(urls).map_err(|e| anyhow::anyhow!("gateway.dialogue_manager_url: {e}"))?;
    let channel = channel.with_credential(credential);
    // A page of a session's messages may be large (each up to a request body); the limit is set, not inherited.
    Ok(DialogueClient::new(channel).max_decoding_message_size(moltbot_proto::MAX_MESSAGE_BYTES))
}

pub fn router(config: &GatewayConfig, dialogue: DialogueClient<Replicas>) -> Router {
    let state = AppState {
        dialogue,
        slots: Arc::new(Semaphore::new(config.max_concurrent_requests)),
        per_user: limits::UserSlots::new(config.max_concurrent_per_user),
        turn_times: Arc::default(),
        timeout: Duration::from_secs(config.request_timeout),
        max_messages: config.max_messages,
        images: images::ImageLimits::new(config),
    };
    let mut api: Router<AppState> = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/api/sessions", post(sessions::create).get(sessions::list))
        .route("/api/sessions/{id}", get(sessions::get).delete(sessions::delete).patch(sessions::update))
        .route("/api/plugins", get(plugins::list))
        .route("/api/plugins/{name}/execute", post(plugins::execute));
    // Layers run outside in: auth (which names the user), the rate limit (which counts per user), the cache.
    let mut chat: Router<AppState> = Router::new()
        .route("/api/chat", post(native::chat))
        .route("/v1/chat/completions", post(openai::chat_completions));
    if let Some(cache) = cache::ResponseCache::new(&config.cache_config, config.max_body_bytes) {
        chat = chat.route_layer(axum::middleware::from_fn_with_state(cache, cache::serve));
    }
    api = api.merge(chat);
    if let Some(limit) = limits::RateLimit::new(&config.rate_limit) {
        api = api.route_layer(axum::middleware::from_fn_with_state(limit, limits::limit));
    }
    let keys = auth::Keys::new(&config.auth.api_keys);
    if !keys.is_empty() {
        api = api.route_layer(axum::middleware::from_fn_with_state(keys, auth::require_key));
    }
    let mut public = Router::new().route("/health", get(health)).route("/ready", get(ready));
    if config.web_ui {
        public = public.merge(web::routes());
    }
    public
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "this endpoint does not take that method")
        })
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        // A body must arrive as promptly as headers must: a client that trickles it cannot hold a connection.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(Duration::from_secs(config.header_read_timeout)))
        // Outermost of the route layers: it sees every answer, refusals included, and names the route.
        .layer(axum::middleware::from_fn(observe::observe))
        .with_state(state)
}

/// Serves the gateway on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: &GatewayConfig,
    dialogue: DialogueClient<Replicas>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    if config.auth.api_keys.is_empty() && !addr.ip().is_loopback() {
        anyhow::bail!(
            "the gateway listens on {addr}, beyond this machine, without API keys; set gateway.auth.api_keys \
             (e.g. MOLTBOT_GATEWAY__AUTH__API_KEYS='[\"<a long random key>\"]') or listen on 127.0.0.1"
        );
    }
    tracing::info!(%addr, auth = !config.auth.api_keys.is_empty(), "gateway listening");
    let limits = serve::Limits {
        max_connections: config.max_connections,
        header_read_timeout: Duration::from_secs(config.header_read_timeout),
    };
    serve::serve(listener, router(config, dialogue), limits, shutdown).await?;
    Ok(())
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready when the dialogue-manager answers.
async fn ready(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let mut dialogue = state.dialogue.clone();
    tokio::time::timeout(Duration::from_secs(3), dialogue.list_models(ListModelsRequest {}))
        .await
        .map_err(|_| ApiError::unavailable("the dialogue-manager did not answer in time"))??;
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

/// Marks a streamed response for proxies: Nginx buffers a response unless it says `X-Accel-Buffering: no` (behind a
/// default Nginx the first token came after 2.3–2.6 s instead of 0.8 s, in bursts).
pub(crate) fn unbuffered(response: &mut axum::response::Response) {
    response.headers_mut().insert("x-accel-buffering", axum::http::HeaderValue::from_static("no"));
}

/// The conversation headers: `X-Session-Id`, `X-Dialogue-Mode`, `X-User-Id`.
struct DialogueHeaders {
    session_id: String,
    mode: Option<DialogueMode>,
    user_id: String,
}

impl DialogueHeaders {
    fn parse(headers: &HeaderMap) -> Result<Self, ApiError> {
        let text = |name: &str| -> Result<String, ApiError> {
            headers
                .get(name)
                .map(|v| v.to_str().map(|s| s.trim().to_owned()))
                .transpose()
                .map_err(|_| ApiError::bad_request(format!("header {name} is not valid text"), Some(name)))
                .map(Option::unwrap_or_default)
        };
        let mode = match text("x-dialogue-mode")?.to_ascii_lowercase().as_str() {
            "" => None,
            "single" => Some(DialogueMode::Single),
            "multi" => Some(DialogueMode::Multi),
            "hybrid" => Some(DialogueMode::Hybrid),
            other => {
                return Err(ApiError::bad_request(
                    format!("X-Dialogue-Mode `{}` is not one of single, multi, hybrid", error::shown(other)),
                    Some("X-Dialogue-Mode"),
                ));
            }
        };
        Ok(Self { session_id: text("x-session-id")?, mode, user_id: text("x-user-id")? })
    }
}

/// A started dialogue turn: the admission slots (the gateway's and the user's) are held until the stream ends,
/// and how long it took is recorded then, by how it ended (`moltbot_chat_duration_seconds`).
struct TurnStream {
    stream: tonic::Streaming<ChatEvent>,
    /// How the turn ended so far: `abandoned` until it finishes or fails (a client that went away mid-answer).
    outcome: &'static str,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _user_slot: Option<limits::UserSlot>,
    deadline: tokio::time::Instant,
    started: tokio::time::Instant,
    turn_times: Arc<limits::TurnTimes>,
}

impl Drop for TurnStream {
    fn drop(&mut self) {
        self.turn_times.record(self.started.elapsed());
        metrics::histogram!("moltbot_chat_duration_seconds", "outcome" => self.outcome)
            .record(self.started.elapsed().as_secs_f64());
    }
}

impl TurnStream {
    async fn next(&mut self) -> Result<Option<ChatEvent>, ApiError> {
        let next = match tokio::time::timeout_at(self.deadline, self.stream.message()).await {
            Ok(message) => message.map_err(ApiError::from),
            Err(_) => Err(ApiError::timeout()),
        };
        match &next {
            Ok(Some(ChatEvent { event: Some(chat_event::Event::Finished(_)) })) => self.outcome = "completed",
            // The stream ended without the turn's end.
            Ok(None) if self.outcome == "abandoned" => self.outcome = "error",
            Ok(_) => {}
            Err(e) => self.outcome = failed_turn(e),
        }
        next
    }
}

/// The outcome label of a turn that failed with `error`.
fn failed_turn(error: &ApiError) -> &'static str {
    match error.status {
        axum::http::StatusCode::GATEWAY_TIMEOUT => "timeout",
        status if status.is_client_error() => "refused",
        _ => "error",
    }
}

impl AppState {
    /// Admits the request (429 when the gateway or the user has too many in flight) and starts the turn on the
    /// dialogue-manager.
    async fn start_turn(&self, request: ChatRequest) -> Result<TurnStream, ApiError> {
        if request.messages.len() > self.max_messages {
            return Err(ApiError::bad_request(
                format!(
                    "{} messages are more than this server takes in one request ({}, gateway.max_messages)",
                    request.messages.len(),
                    self.max_messages
                ),
                Some("messages"),
            ));
        }
        self.images.check(&request.messages)?;
        let user_slot = self.per_user.acquire(&request.user_id, || self.turn_times.retry_after())?;
        let slot =
            self.slots.clone().try_acquire_owned().map_err(|_| ApiError::overloaded(self.turn_times.retry_after()))?;
        let mut dialogue = self.dialogue.clone();
        let started = tokio::time::Instant::now();
        let deadline = started + self.timeout;
        // The dialogue-manager learns the deadline (grpc-timeout) and ends the turn just before it, saving nothing.
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.timeout);
        let stream = tokio::time::timeout_at(deadline, dialogue.chat(request))
            .await
            .map_err(|_| ApiError::timeout())
            .and_then(|started| started.map_err(ApiError::from))
            // Refused by the dialogue-manager before it began (too many waiting, no such session, …): timed too.
            .inspect_err(|error| {
                metrics::histogram!("moltbot_chat_duration_seconds", "outcome" => failed_turn(error))
                    .record(started.elapsed().as_secs_f64());
            })?;
        let turn_times = self.turn_times.clone();
        Ok(TurnStream {
            stream: stream.into_inner(),
            outcome: "abandoned",
            _slot: slot,
            _user_slot: user_slot,
            deadline,
            started,
            turn_times,
        })
    }
}

/// Sampling fields shared by `/api/chat` and `/v1/chat/completions`; unknown fields are ignored as OpenAI
/// clients send many.
#[derive(Debug, Default, serde::Deserialize)]
struct SamplingFields {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<u64>,
    repetition_penalty: Option<f32>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    /// End-of-text is held back until this many tokens were generated (vLLM's extension).
    min_tokens: Option<u32>,
    stop: Option<StopField>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    // Accepted by OpenAI and not (yet) by MoltBot: refused by name rather than silently dropped.
    logit_bias: Option<serde_json::Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<serde_json::Value>,
    response_format: Option<serde_json::Value>,
}

/// Stop strings a request may give and their longest length in bytes (the engine refuses more too).
const MAX_STOP_STRINGS: usize = 4;
const MAX_STOP_BYTES: usize = 256;

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

impl SamplingFields {
    fn to_proto(&self) -> Result<moltbot_proto::common::v1::SamplingParams, ApiError> {
        let check = |ok: bool, param: &str, why: &str| {
            if ok { Ok(()) } else { Err(ApiError::bad_request(format!("{param} {why}"), Some(param))) }
        };
        if let Some(t) = self.temperature {
            check((0.0..=2.0).contains(&t), "temperature", "must be between 0 and 2")?;
        }
        if let Some(p) = self.top_p {
            check(p > 0.0 && p <= 1.0, "top_p", "must be greater than 0 and at most 1")?;
        }
        if let Some(r) = self.repetition_penalty {
            check(r > 0.0 && r <= 10.0, "repetition_penalty", "must be greater than 0 and at most 10")?;
        }
        // OpenAI's additive penalties have no faithful counterpart in this engine; zero (their default) is fine.
        for (param, value) in
            [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)]
        {
            check(
                value.is_none_or(|v| v == 0.0),
                param,
                "is not supported; use repetition_penalty (1.0 = off, 1.1 = mild)",
            )?;
        }
        let empty = |v: &Option<serde_json::Value>| match v {
            None | Some(serde_json::Value::Null) => true,
            Some(serde_json::Value::Object(o)) => o.is_empty(),
            Some(_) => false,
        };
        check(empty(&self.logit_bias), "logit_bias", "is not supported")?;
        check(self.logprobs != Some(true), "logprobs", "is not supported")?;
        check(empty(&self.top_logprobs), "top_logprobs", "is not supported")?;
        let json_schema = response_format(self.response_format.as_ref())?;
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if let Some(m) = max_tokens {
            check(m > 0, "max_tokens", "must be at least 1")?;
        }
        let stop = match &self.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        check(
            stop.len() <= MAX_STOP_STRINGS && stop.iter().all(|s| !s.is_empty() && s.len() <= MAX_STOP_BYTES),
            "stop",
            "takes at most 4 non-empty strings of at most 256 bytes each",
        )?;
        if let Some(min) = self.min_tokens {
            check(max_tokens.is_none_or(|max| min <= max), "min_tokens", "must not be above max_tokens")?;
        }
        Ok(moltbot_proto::common::v1::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty,
            max_tokens,
            stop,
            min_tokens: self.min_tokens,
            json_schema,
        })
    }
}

/// OpenAI's `response_format`: `text` (the default), `json_object`, or `json_schema` with its `schema`; the JSON
/// Schema the answer must follow, encoded as JSON.
fn response_format(format: Option<&serde_json::Value>) -> Result<Option<String>, ApiError> {
    let Some(format) = format.filter(|f| !f.is_null()) else { return Ok(None) };
    let bad = |why: &str, param: &str| Err(ApiError::bad_request(why.to_owned(), Some(param)));
    match format["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(r#"{"type":"object"}"#.into())),
        Some("json_schema") => match &format["json_schema"]["schema"] {
            schema @ serde_json::Value::Object(_) => Ok(Some(schema.to_string())),
            _ => bad(
                "response_format.json_schema.schema must be a JSON Schema object",
                "response_format.json_schema.schema",
            ),
        },
        _ => bad("response_format.type must be `text`, `json_object` or `json_schema`", "response_format.type"),
    }
}

/// A chat message as clients send it: `content` is text or OpenAI's list of parts; an assistant message may carry
/// `tool_calls`, and a `tool` message answers one (`tool_call_id`).
#[derive(Debug, Default, serde::Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<serde_json::Value>,
    #[serde(default)]
    tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

fn to_proto_messages(messages: Vec<InMessage>) -> Result<Vec<moltbot_proto::common::v1::ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must contain at least one message", Some("messages")));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}].content");
            let mut images = vec![];
            let content = match m.content {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => s,
                Some(serde_json::Value::Array(parts)) => {
                    let mut texts = vec![];
                    for part in &parts {
                        match content_part(part).map_err(|why| ApiError::bad_request(why, Some(&param)))? {
                            Part::Text(text) => texts.push(text),
                            Part::Image(image) => images.push(image),
                        }
                    }
                    texts.join("\n")
                }
                Some(_) => {
                    return Err(ApiError::bad_request("content must be a string or a list of parts", Some(&param)));
                }
            };
            if !images.is_empty() && m.role != "user" {
                return Err(ApiError::bad_request("only a user message shows images", Some(&param)));
            }
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool" | "developer") {
                let param = format!("messages[{i}].role");
                return Err(ApiError::bad_request(
                    format!("role `{}` is not one of system, user, assistant, tool", m.role),
                    Some(&param),
                ));
            }
            let tool_calls = match (&m.tool_calls, m.role.as_str()) {
                (None, _) => vec![],
                (Some(calls), "assistant") => tools::calls_from_json(calls, &format!("messages[{i}].tool_calls"))?,
                (Some(_), _) => {
                    let param = format!("messages[{i}].tool_calls");
                    return Err(ApiError::bad_request("only an assistant message has tool_calls", Some(&param)));
                }
            };
            let tool_call_id = m.tool_call_id.unwrap_or_default();
            if m.role == "tool" && tool_call_id.is_empty() {
                let param = format!("messages[{i}].tool_call_id");
                return Err(ApiError::bad_request("a tool message names the call it answers", Some(&param)));
            }
            let role = if m.role == "developer" { "system".to_owned() } else { m.role };
            let name = m.name.unwrap_or_default();
            Ok(moltbot_proto::common::v1::ChatMessage {
                role,
                content,
                tool_calls,
                tool_call_id,
                name,
                images,
                ..Default::default()
            })
        })
        .collect()
}

/// One of OpenAI's content parts.
enum Part {
    Text(String),
    Image(moltbot_proto::common::v1::Image),
}

/// A content part: `{"type":"text","text":…}` or `{"type":"image_url","image_url":{"url":…,"detail":…}}` (the
/// URL alone as `image_url` is taken too).
fn content_part(part: &serde_json::Value) -> Result<Part, &'static str> {
    let text = |key: &str| part.pointer(key).and_then(serde_json::Value::as_str);
    match part.get("type").and_then(serde_json::Value::as_str) {
        Some("text") => text("/text").map(|t| Part::Text(t.to_owned())).ok_or("a text part has `text`"),
        Some("image_url") => {
            let url = text("/image_url/url").or(text("/image_url")).ok_or("an image_url part has `image_url.url`")?;
            let detail = text("/image_url/detail").unwrap_or_default();
            Ok(Part::Image(moltbot_proto::common::v1::Image { url: url.to_owned(), detail: detail.to_owned() }))
        }
        _ => Err("content parts are `text` or `image_url`"),
    }
}

/// A whole answer, for non-streaming responses.
struct Answer {
    started: moltbot_proto::dialogue::v1::TurnStarted,
    finished: moltbot_proto::dialogue::v1::TurnFinished,
    /// The plugins the model called within the turn, and their results.
    tool_results: Vec<moltbot_proto::dialogue::v1::ToolResult>,
}

impl TurnStream {
    async fn collect(mut self) -> Result<Answer, ApiError> {
        use moltbot_proto::dialogue::v1::chat_event::Event;
        let mut started = None;
        let mut tool_results = vec![];
        while let Some(event) = self.next().await? {
            match event.event {
                Some(Event::Started(s)) => started = Some(s),
                Some(Event::Finished(finished)) => {
                    return Ok(Answer { started: started.unwrap_or_default(), finished, tool_results });
                }
                Some(Event::ToolResult(result)) => tool_results.push(result),
                Some(Event::Delta(_)) | None => {}
            }
        }
        Err(ApiError::unavailable("the dialogue-manager ended the answer early"))
    }
}

/// A turn's token counts as OpenAI writes them; `prompt_tokens_details.cached_tokens` counts the prompt tokens
/// the prefix cache supplied.
fn usage_json(usage: &moltbot_proto::common::v1::Usage) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": usage.cached_tokens },
    })
}

fn finish_reason(reason: i32) -> &'static str {
    use moltbot_proto::common::v1::FinishReason;
    match FinishReason::try_from(reason).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        _ => "stop",
    }
}

fn mode_name(mode: i32) -> &'static str {
    match DialogueMode::try_from(mode).unwrap_or(DialogueMode::Unspecified) {
        DialogueMode::Multi => "multi",
        DialogueMode::Single => "single",
        _ => "hybrid",
    }
}

/// The gateway as its own process (the `moltbot-gateway` binary, `moltbot run gateway`): telemetry, its metrics
/// port, a (lazy) connection to the dialogue-manager, HTTP on `gateway.listen` until SIGTERM.
pub async fn serve(config: &moltbot_config::Config) -> anyhow::Result<()> {
    let metrics = config.gateway.metrics_listen;
    let _tracing = moltbot_telemetry::start(config, "moltbot-gateway", metrics, "gateway.metrics_listen").await?;
    let credential = moltbot_proto::Credential::new(&config.internal.service_token);
    let dialogue = dialogue_client(&config.gateway.dialogue_manager_url, &credential)?;
    let listener = moltbot_telemetry::bind(config.gateway.listen, "gateway.listen").await?;
    run(listener, &config.gateway, dialogue, moltbot_telemetry::shutdown_signal()).await
}
