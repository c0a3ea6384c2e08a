//! Runs one generation request on the worker's provider (the engine, or a remote API) and turns its progress into
//! `GenerateEvent`s, with heartbeats.

use std::time::Duration;

use moltbot_engine::{ChatMessage, GenerationEvent, GenerationRequest, Prompt, SamplingParams};
use moltbot_proto::{
    ErrorCode,
    common::v1::{FinishReason, Usage},
    inference::v1::{
        Error as ErrorEvent, Finished, GenerateEvent, GenerateRequest, Heartbeat, Started, Token,
        generate_event::Event, generate_request::Input,
    },
};
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use crate::Worker;

pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// The code of an engine error: the caller's fault, a full engine, or the engine's own (a tokenizer or template
/// failure too).
fn code(e: &moltbot_engine::Error) -> ErrorCode {
    use moltbot_engine::Error;
    match e {
        Error::InvalidRequest(_) | Error::PromptTooLong { .. } | Error::PromptOverCap { .. } => {
            ErrorCode::InvalidArgument
        }
        Error::Overloaded { .. } => ErrorCode::ResourceExhausted,
        Error::Stopped => ErrorCode::Unavailable,
        Error::Internal(_)
        | Error::Candle(_)
        | Error::Tokenizer(_)
        | Error::Template(_)
        | Error::ModelNotFound { .. }
        | Error::ModelLoad { .. }
        | Error::UnsupportedModel(_)
        | Error::OutOfMemory(_)
        | Error::DeviceOutOfMemory(_)
        | Error::NoDevice(_) => ErrorCode::Internal,
    }
}

/// An engine error as a gRPC status.
pub(crate) fn status(e: moltbot_engine::Error) -> tonic::Status {
    code(&e).status(e.to_string())
}

fn event(e: Event) -> GenerateEvent {
    GenerateEvent { event: Some(e) }
}

/// An error event; it carries the code's gRPC number.
fn error(code: ErrorCode, message: impl Into<String>) -> GenerateEvent {
    event(Event::Error(ErrorEvent { code: code.grpc() as i32, message: message.into() }))
}

/// Translates a wire request into an engine request, applying the worker's defaults and caps.
pub fn engine_request(request: GenerateRequest, max_tokens_cap: u32) -> Result<GenerationRequest, String> {
    let (prompt, tools) = match request.input {
        Some(Input::Prompt(text)) => (Prompt::Text(text), None),
        Some(Input::Chat(chat)) => {
            // The engine has no vision encoder yet: one would turn each message's `images` into embeddings placed
            // where the template marks them, as the prompt's tokens are.
            if chat.messages.iter().any(|m| !m.images.is_empty()) {
                return Err("this model does not take images (it has no vision encoder)".into());
            }
            let tools = chat.tools.map(engine_tools).transpose()?;
            (Prompt::Chat(chat.messages.into_iter().map(engine_message).collect()), tools)
        }
        None => return Err("the request has no input".into()),
    };
    let defaults = SamplingParams::default();
    let s = request.sampling.unwrap_or_default();
    let constraint = match s.json_schema.as_deref() {
        None => None,
        Some(schema) => Some(moltbot_engine::Constraint::JsonSchema(
            serde_json::from_str(schema).map_err(|e| format!("json_schema is not JSON: {e}"))?,
        )),
    };
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_p: s.top_p.unwrap_or(defaults.top_p),
        top_k: s.top_k.unwrap_or(defaults.top_k),
        seed: s.seed,
        repetition_penalty: s.repetition_penalty.unwrap_or(defaults.repetition_penalty),
        max_tokens: s.max_tokens.unwrap_or(max_tokens_cap).min(max_tokens_cap),
        min_tokens: s.min_tokens.unwrap_or(0),
        stop: s.stop,
        constraint,
    };
    Ok(GenerationRequest { tools, ..GenerationRequest::new(prompt, sampling) })
}

fn engine_message(m: moltbot_proto::common::v1::ChatMessage) -> ChatMessage {
    let tool_calls = m
        .tool_calls
        .into_iter()
        .map(|c| moltbot_engine::ToolCall { id: c.id, name: c.name, arguments: c.arguments_json })
        .collect();
    ChatMessage { tool_calls, tool_call_id: m.tool_call_id, name: m.name, ..ChatMessage::new(m.role, m.content) }
}

fn engine_tools(t: moltbot_proto::common::v1::Tools) -> Result<moltbot_engine::Tools, String> {
    use moltbot_engine::{Tool, ToolChoice};
    use moltbot_proto::common::v1::tool_choice::Mode;
    let tools = t
        .tools
        .into_iter()
        .map(|tool| {
            let parameters = match tool.parameters_json.trim() {
                "" => serde_json::Value::Null,
                json => serde_json::from_str(json)
                    .map_err(|e| format!("tool `{}`: parameters are not JSON: {e}", tool.name))?,
            };
            Ok(Tool { name: tool.name, description: tool.description, parameters })
        })
        .collect::<Result<_, String>>()?;
    let choice = t.choice.unwrap_or_default();
    let choice = match choice.mode() {
        Mode::Auto => ToolChoice::Auto,
        Mode::None => ToolChoice::None,
        Mode::Required => ToolChoice::Required,
        Mode::Function => ToolChoice::Function(choice.function),
    };
    Ok(moltbot_engine::Tools { tools, choice, parallel: !t.single_call })
}

/// A model call's metrics, recorded when it ends: its outcome (`moltbot_model_calls_total`), duration, time to the
/// first token, mean time per output token and token counts. Dropped without an outcome, the call was cancelled
/// (by the caller, or by its client going away).
struct CallMetrics {
    model: String,
    started: std::time::Instant,
    first_token: Option<std::time::Instant>,
    last_token: Option<std::time::Instant>,
    tokens: u32,
    outcome: &'static str,
    usage: Option<Usage>,
}

impl CallMetrics {
    fn new(model: &str) -> Self {
        let started = std::time::Instant::now();
        Self {
            model: model.to_owned(),
            started,
            first_token: None,
            last_token: None,
            tokens: 0,
            outcome: "cancelled",
            usage: None,
        }
    }

    /// Notes what `event` says about the call, before it is sent.
    fn observe(&mut self, event: &GenerateEvent) {
        match &event.event {
            Some(Event::Token(_)) => {
                let now = std::time::Instant::now();
                self.first_token.get_or_insert(now);
                self.last_token = Some(now);
                self.tokens += 1;
            }
            Some(Event::Finished(f)) => (self.outcome, self.usage) = ("success", f.usage),
            Some(Event::Error(e)) => {
                self.outcome = match tonic::Code::from_i32(e.code) {
                    tonic::Code::InvalidArgument => "invalid_request",
                    tonic::Code::ResourceExhausted => "overloaded",
                    tonic::Code::DeadlineExceeded => "deadline_exceeded",
                    _ => "error",
                }
            }
            _ => {}
        }
    }
}

impl Drop for CallMetrics {
    fn drop(&mut self) {
        let model = self.model.clone();
        metrics::counter!("moltbot_model_calls_total", "model" => model.clone(), "outcome" => self.outcome)
            .increment(1);
        metrics::histogram!("moltbot_model_call_duration_seconds", "model" => model.clone())
            .record(self.started.elapsed().as_secs_f64());
        if let Some(first) = self.first_token {
            metrics::histogram!("moltbot_time_to_first_token_seconds", "model" => model.clone())
                .record((first - self.started).as_secs_f64());
            if let Some(last) = self.last_token.filter(|_| self.tokens > 1) {
                metrics::histogram!("moltbot_time_per_output_token_seconds", "model" => model.clone())
                    .record((last - first).as_secs_f64() / f64::from(self.tokens - 1));
            }
        }
        if let Some(usage) = self.usage {
            metrics::counter!("moltbot_prompt_tokens_total", "model" => model.clone())
                .increment(u64::from(usage.prompt_tokens));
            metrics::counter!("moltbot_generation_tokens_total", "model" => model.clone())
                .increment(u64::from(usage.completion_tokens));
            metrics::histogram!("moltbot_request_prompt_tokens", "model" => model.clone())
                .record(f64::from(usage.prompt_tokens));
            metrics::histogram!("moltbot_request_generation_tokens", "model" => model)
                .record(f64::from(usage.completion_tokens));
        }
    }
}

/// Generates `request` and sends its events to `out` until it finishes, fails, passes `deadline_ms` (0: none),
/// `cancelled` fires, or `out` is closed. Returns whether it stopped because of a cancel. It runs in a `generate`
/// span of the turn's trace, with `prefill` (waiting for a place in the batch, then the prompt) and `decode`
/// spans inside.
pub async fn drive(
    worker: Worker,
    request: GenerateRequest,
    deadline_ms: i64,
    cancelled: CancellationToken,
    out: Sender<GenerateEvent>,
) -> bool {
    let span = tracing::info_span!(
        "generate",
        request_id = %request.request_id,
        model = %worker.provider.name(),
        worker_id = %worker.id,
        trace_id = tracing::field::Empty,
        prompt_tokens = tracing::field::Empty,
        completion_tokens = tracing::field::Empty,
    );
    moltbot_telemetry::trace::adopt(&span, &request.trace_context);
    tracing::Instrument::instrument(generate(worker, request, deadline_ms, cancelled, out), span).await
}

async fn generate(
    worker: Worker,
    request: GenerateRequest,
    deadline_ms: i64,
    cancelled: CancellationToken,
    out: Sender<GenerateEvent>,
) -> bool {
    let request_id = request.request_id.clone();
    let mut call = CallMetrics::new(worker.provider.name());
    // Every event goes out through here, so the metrics see what the caller sees.
    let send = async |call: &mut CallMetrics, event: GenerateEvent| {
        call.observe(&event);
        out.send(event).await
    };
    let now_ms =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    if deadline_ms > 0 && now_ms() > deadline_ms {
        tracing::info!(%request_id, "dropping a job past its deadline");
        let _ = send(
            &mut call,
            error(ErrorCode::DeadlineExceeded, "the request's deadline passed while it waited in the queue"),
        )
        .await;
        return false;
    }
    if !request.model.is_empty() && request.model != worker.provider.name() {
        let message =
            format!("model `{}` is not served by this worker (it serves `{}`)", request.model, worker.provider.name());
        let _ = send(&mut call, error(ErrorCode::InvalidArgument, message)).await;
        return false;
    }
    let deadline = if deadline_ms > 0 {
        tokio::time::Instant::now() + Duration::from_millis((deadline_ms - now_ms()).max(0) as u64)
    } else {
        tokio::time::Instant::now() + Duration::from_secs(24 * 3600)
    };
    let (mut source, started) = match &worker.provider {
        crate::Provider::Local(engine) => {
            match prepare(engine.clone(), worker.max_tokens, request, &cancelled, deadline).await {
                Prepared::Ready(generation, message_tokens) => {
                    let started = Started {
                        worker_id: worker.id.clone(),
                        prompt_tokens: generation.prompt_tokens,
                        trimmed_messages: generation.trimmed_messages,
                        message_tokens,
                    };
                    (Source::Local(generation), started)
                }
                Prepared::Failed(code, message) => {
                    let _ = send(&mut call, error(code, message)).await;
                    return false;
                }
                Prepared::Cancelled => {
                    tracing::info!(%request_id, "cancelled while its prompt was prepared");
                    return true;
                }
            }
        }
        // The remote counts the prompt; the usage at the end says how many tokens it had.
        crate::Provider::Remote(remote) => {
            let started = Started { worker_id: worker.id.clone(), ..Default::default() };
            (Source::Remote(remote.generate(request, deadline)), started)
        }
    };
    let prompt_tokens = started.prompt_tokens;
    if send(&mut call, event(Event::Started(started))).await.is_err() {
        return false;
    }
    let mut phase = Some(tracing::info_span!("prefill", prompt_tokens));
    let mut decoding = false;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;
    let mut tool_calls = vec![];
    loop {
        let (next, last) = tokio::select! {
            e = source.next() => match e {
                Some(Ok(GenerationEvent::Token { text, id })) => (event(Event::Token(Token { text, token_id: id })), false),
                Some(Ok(GenerationEvent::ToolCalls(calls))) => {
                    tool_calls = calls
                        .into_iter()
                        .map(|c| moltbot_proto::common::v1::ToolCall { id: c.id, name: c.name, arguments_json: c.arguments })
                        .collect();
                    continue;
                }
                Some(Ok(GenerationEvent::Finished { reason, usage })) => {
                    let finish_reason = match reason {
                        moltbot_engine::FinishReason::Stop => FinishReason::Stop,
                        moltbot_engine::FinishReason::Length => FinishReason::Length,
                        moltbot_engine::FinishReason::Cancelled => FinishReason::Cancelled,
                        moltbot_engine::FinishReason::ToolCalls => FinishReason::ToolCalls,
                    };
                    let usage = Usage {
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                        cached_tokens: usage.cached_tokens,
                    };
                    let tool_calls = std::mem::take(&mut tool_calls);
                    (event(Event::Finished(Finished { finish_reason: finish_reason.into(), usage: Some(usage), tool_calls })), true)
                }
                Some(Ok(GenerationEvent::Failed(message))) => (error(ErrorCode::Internal, message), true),
                Some(Err(failure)) => (error(failure.code, failure.message), true),
                None => (error(ErrorCode::Internal, "the engine stopped"), true),
            },
            _ = heartbeat.tick() => (event(Event::Heartbeat(Heartbeat { worker_id: worker.id.clone() })), false),
            () = cancelled.cancelled() => {
                tracing::info!(%request_id, "cancelled");
                return true;
            }
            () = tokio::time::sleep_until(deadline) => {
                (error(ErrorCode::DeadlineExceeded, "the request's deadline passed during generation"), true)
            }
        };
        if !decoding && matches!(next.event, Some(Event::Token(_))) {
            // The first token: the prompt is read; each span ends when dropped.
            decoding = true;
            drop(phase.take());
            phase = Some(tracing::info_span!("decode"));
        }
        if let Some(Event::Finished(f)) = &next.event {
            drop(phase.take());
            let usage = f.usage.unwrap_or_default();
            tracing::Span::current().record("prompt_tokens", usage.prompt_tokens);
            tracing::Span::current().record("completion_tokens", usage.completion_tokens);
        }
        if send(&mut call, next).await.is_err() {
            return true;
        }
        if last {
            return false;
        }
    }
}

/// Where a job's answer comes from.
enum Source {
    Local(moltbot_engine::Generation),
    Remote(tokio::sync::mpsc::Receiver<Result<GenerationEvent, crate::remote::Failure>>),
}

impl Source {
    async fn next(&mut self) -> Option<Result<GenerationEvent, crate::remote::Failure>> {
        match self {
            Self::Local(generation) => generation.next().await.map(Ok),
            Self::Remote(events) => events.recv().await,
        }
    }
}

/// A local job made ready for the engine, or why not.
enum Prepared {
    Ready(moltbot_engine::Generation, Vec<u32>),
    Failed(ErrorCode, String),
    Cancelled,
}

/// Counts, fits and tokenizes the conversation and queues it in the engine. That is CPU work of its own: it runs
/// off the async runtime, and a cancel or the deadline ends the wait for it (the engine then drops the request it
/// queued).
async fn prepare(
    engine: moltbot_engine::Engine,
    max_tokens: u32,
    request: GenerateRequest,
    cancelled: &CancellationToken,
    deadline: tokio::time::Instant,
) -> Prepared {
    let prepare = tokio::task::spawn_blocking(move || {
        // Stored history already carries its counts; only new messages are tokenized here.
        let count = |m: &moltbot_proto::common::v1::ChatMessage| match m.tokens {
            0 => engine.tokenizer().encode_text(&m.content).map_or(0, |t| t.len() as u32),
            known => known,
        };
        let message_tokens: Vec<u32> = match &request.input {
            Some(Input::Chat(chat)) => chat.messages.iter().map(count).collect(),
            _ => vec![],
        };
        engine_request(request, max_tokens)
            .map_err(|message| (ErrorCode::InvalidArgument, message))
            .and_then(|r| engine.submit(r).map_err(|e| (code(&e), e.to_string())))
            .map(|generation| (generation, message_tokens))
    });
    tokio::select! {
        prepared = prepare => match prepared {
            Ok(Ok((generation, message_tokens))) => Prepared::Ready(generation, message_tokens),
            Ok(Err((code, message))) => Prepared::Failed(code, message),
            Err(e) => Prepared::Failed(ErrorCode::Internal, format!("preparing the prompt failed: {e}")),
        },
        () = cancelled.cancelled() => Prepared::Cancelled,
        () = tokio::time::sleep_until(deadline) => Prepared::Failed(
            ErrorCode::DeadlineExceeded,
            "the request's deadline passed while its prompt was prepared".into(),
        ),
    }
}
