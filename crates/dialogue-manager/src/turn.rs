//! One conversation turn: mode → session → job → streamed answer → saved turn.

use moltbot_proto::{
    common::v1::{ChatMessage, FinishReason, SamplingParams, ToolCall, ToolChoice, Tools, Usage, tool_choice::Mode},
    dialogue::v1::{ChatEvent, ChatRequest, Delta, DialogueMode, ToolResult, TurnFinished, TurnStarted, chat_event},
    inference::v1::{ChatInput, GenerateRequest, InferenceJob, generate_event::Event, generate_request::Input},
    session::v1::{
        AppendMessagesRequest, CreateSessionRequest, GetSessionRequest, LockSessionRequest, RenewSessionLockRequest,
        UnlockSessionRequest, session_store_client::SessionStoreClient,
    },
};
use tokio::sync::mpsc::Sender;
use tonic::{Code, Status};

use crate::DialogueService;

const ROLES: &[&str] = &["system", "user", "assistant", "tool"];
/// What the session's byte cap counts of a message: its text and its images' URLs.
fn message_bytes(m: &ChatMessage) -> u64 {
    (m.content.len() + m.images.iter().map(|i| i.url.len()).sum::<usize>()) as u64
}

/// The history a job for a remote model that does not say its context window carries, counted as for a local one
/// (tokens where known, else bytes).
const REMOTE_WINDOW: usize = 128 << 10;
/// The most bytes of images from earlier turns one job carries (a queue message takes 1 MiB).
const HISTORY_IMAGE_BYTES: usize = 512 << 10;

/// Keeps the newest images of earlier turns that fit `HISTORY_IMAGE_BYTES` (none for a model without vision); a
/// message whose images are left out says so in its text, so the model knows something was shown.
fn fit_history_images(history: &mut [ChatMessage], vision: bool) {
    let mut budget = if vision { HISTORY_IMAGE_BYTES } else { 0 };
    for m in history.iter_mut().rev().filter(|m| !m.images.is_empty()) {
        let bytes: usize = m.images.iter().map(|i| i.url.len()).sum();
        if bytes <= budget {
            budget -= bytes;
            continue;
        }
        let note = match m.images.len() {
            1 => "[an image was shown here]".to_owned(),
            n => format!("[{n} images were shown here]"),
        };
        m.images.clear();
        m.content = if m.content.is_empty() { note } else { format!("{}\n{note}", m.content) };
    }
}

/// How often a queued job's model is checked for live workers while it waits for one.
const WATCH_WORKERS: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest context a worker's engine keeps (`moltbot_engine::MAX_CONTEXT`), for a model whose workers do not
/// say theirs.
const LONGEST_CONTEXT: usize = 8192;

/// How long before the caller's deadline a turn gives up, so that its caller hears a deadline rather than a
/// hang-up, and a turn that times out is never taken for one whose client left.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(500);

pub struct Turn {
    service: DialogueService,
    /// The model the request named, as its workers announced it.
    model: moltbot_proto::common::v1::ModelCard,
    request_id: String,
    user_id: String,
    session_id: String,
    mode: DialogueMode,
    /// This turn's new messages, saved with the answer.
    new_messages: Vec<ChatMessage>,
    /// What the model sees: the stored history and the new messages.
    prompt: Vec<ChatMessage>,
    sampling: SamplingParams,
    /// The functions the model may call: the client's, then the plugins the request named.
    tools: Option<Tools>,
    /// Of those, the plugins: the dialogue-manager runs the model's calls of them.
    plugins: Vec<String>,
    /// When the turn must be over: the job's timeout, or earlier when the caller's own deadline comes first. A
    /// turn that reaches it fails and saves nothing.
    deadline: tokio::time::Instant,
    /// Held from before the history is read until the turn is saved (released before the client hears the turn
    /// is done, so its next turn finds the session free) or abandoned (released on drop).
    lock: std::sync::Mutex<Option<SessionLock>>,
}

/// A session's turn lock, given back when dropped, whatever ended the turn. Its lease is short and renewed while
/// the turn runs, so a dialogue-manager that dies mid-turn frees the session within one lease.
pub(crate) struct SessionLock {
    sessions: SessionStoreClient<moltbot_proto::Replicas>,
    session_id: String,
    user_id: String,
    token: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl SessionLock {
    pub(crate) async fn acquire(service: &DialogueService, session_id: &str, user_id: &str) -> Result<Self, Status> {
        let mut sessions = service.sessions.clone();
        let request = LockSessionRequest {
            session_id: session_id.to_owned(),
            user_id: user_id.to_owned(),
            lease_ms: service.session_lock_lease.as_millis() as u64,
            wait_ms: service.session_lock_wait.as_millis() as u64,
        };
        let token = sessions.lock_session(request).await?.into_inner().token;
        let lease = service.session_lock_lease;
        // Renewals are calls of the turn's trace.
        let renewal = tokio::spawn(tracing::Instrument::in_current_span(renew(
            sessions.clone(),
            unlock_request(session_id, user_id, &token),
            lease,
        )));
        Ok(Self { sessions, session_id: session_id.to_owned(), user_id: user_id.to_owned(), token, renewal })
    }
}

fn unlock_request(session_id: &str, user_id: &str, token: &str) -> UnlockSessionRequest {
    UnlockSessionRequest { session_id: session_id.to_owned(), token: token.to_owned(), user_id: user_id.to_owned() }
}

/// Renews the lock `held` names every third of its `lease` until aborted, or until the lock is found lost.
async fn renew(
    mut sessions: SessionStoreClient<moltbot_proto::Replicas>,
    held: UnlockSessionRequest,
    lease: std::time::Duration,
) {
    let session_id = &held.session_id;
    let mut every = tokio::time::interval(lease / 3);
    every.tick().await;
    loop {
        every.tick().await;
        let request = RenewSessionLockRequest {
            session_id: held.session_id.clone(),
            token: held.token.clone(),
            lease_ms: lease.as_millis() as u64,
            user_id: held.user_id.clone(),
        };
        match sessions.renew_session_lock(request).await.map(|r| r.into_inner().renewed) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%session_id, "lost a session lock (its lease ran out); another turn may overlap this one");
                return;
            }
            Err(e) => tracing::warn!(error = %e, %session_id, "could not renew a session lock; trying again"),
        }
    }
}

impl SessionLock {
    /// Gives the lock back now; a failure leaves it to the lease.
    pub(crate) async fn release(mut self) {
        self.renewal.abort();
        let request = unlock_request(&self.session_id, &self.user_id, &std::mem::take(&mut self.token));
        if let Err(e) = self.sessions.unlock_session(request).await {
            tracing::warn!(error = %e, session_id = %self.session_id, "could not release a session lock; its lease will");
        }
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        self.renewal.abort();
        if self.token.is_empty() {
            return;
        }
        let (mut sessions, request) =
            (self.sessions.clone(), unlock_request(&self.session_id, &self.user_id, &std::mem::take(&mut self.token)));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(tracing::Instrument::in_current_span(async move {
                if let Err(e) = sessions.unlock_session(request).await {
                    tracing::warn!(error = %e, "could not release a session lock; its lease will");
                }
            }));
        }
    }
}

/// Multi-turn when a session is named or the client asked for it; hybrid picks by the session id.
fn resolve_mode(requested: DialogueMode, session_id: &str) -> DialogueMode {
    match requested {
        DialogueMode::Single => DialogueMode::Single,
        DialogueMode::Multi => DialogueMode::Multi,
        DialogueMode::Hybrid | DialogueMode::Unspecified if !session_id.is_empty() => DialogueMode::Multi,
        DialogueMode::Hybrid | DialogueMode::Unspecified => DialogueMode::Single,
    }
}

impl Turn {
    /// Validates the request and loads what the turn needs. Errors here reach the client as the call's status.
    /// `budget` is the time the caller gives the call (its gRPC deadline), if it said.
    pub async fn prepare(
        service: DialogueService,
        mut request: ChatRequest,
        budget: Option<std::time::Duration>,
    ) -> Result<Self, Status> {
        // The caller gives up at its deadline: end a little before, so that the caller hears why.
        let time = budget.map_or(service.job_timeout, |b| b.saturating_sub(DEADLINE_MARGIN).min(service.job_timeout));
        let deadline = tokio::time::Instant::now() + time;
        if request.messages.is_empty() {
            return Err(Status::invalid_argument("messages must contain at least one message"));
        }
        if let Some(m) = request.messages.iter().find(|m| !ROLES.contains(&m.role.as_str())) {
            return Err(Status::invalid_argument(format!("messages: role `{}` is not one of {ROLES:?}", m.role)));
        }
        let model = service.model(&request.model).await?;
        // Refused while this model's workers are behind.
        service.waiting.of(&model.id).admit().inspect_err(|_| {
            metrics::counter!("moltbot_turn_refusals_total").increment(1);
        })?;
        // The tools are checked before anything happens (a session made, a plugin run).
        let tools = tools(&service, request.tools.take(), &request.plugins)?;
        if tools.as_ref().is_some_and(|t| !t.tools.is_empty()) && !model.tools {
            return Err(Status::invalid_argument(format!(
                "tools: model `{}` does not call functions; leave out tools and plugins, or use a model that does",
                model.id
            )));
        }
        if !model.vision && request.messages.iter().any(|m| !m.images.is_empty()) {
            let mut status = Status::invalid_argument(format!(
                "model `{}` does not take images; send text only, or use a model with vision (GET /v1/models shows \
                 capabilities)",
                model.id
            ));
            status.metadata_mut().insert("moltbot-param", "messages".parse().expect("ASCII"));
            return Err(status);
        }
        if request.sampling.as_ref().is_some_and(|s| s.json_schema.is_some()) && !model.json_schema {
            return Err(Status::invalid_argument(format!(
                "response_format: model `{}` does not follow a JSON schema here",
                model.id
            )));
        }
        // A turn whose model may call plugins adds a call and a result, at least, for each round.
        let plugin_messages = if request.plugins.is_empty() { 0 } else { 2 * service.max_rounds as usize };
        let mode = resolve_mode(request.mode(), &request.session_id);
        let user_id = crate::user_or_anonymous(request.user_id);
        let mut sessions = service.sessions.clone();
        let (session_id, history, lock) = match mode {
            DialogueMode::Multi if request.session_id.is_empty() => {
                let created = sessions
                    .create_session(CreateSessionRequest { user_id: user_id.clone(), ..Default::default() })
                    .await?
                    .into_inner();
                (created.id, vec![], None)
            }
            DialogueMode::Multi => {
                // One turn at a time per session: the lock comes before the read, so this turn sees the last.
                let lock = SessionLock::acquire(&service, &request.session_id, &user_id).await?;
                let session = sessions
                    .get_session(GetSessionRequest {
                        session_id: request.session_id.clone(),
                        user_id: user_id.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                // A full session refuses the turn now, not after the answer was generated for nothing.
                let after = session.message_count as usize + request.messages.len() + 1 + plugin_messages;
                if session.message_limit > 0 && after > session.message_limit as usize {
                    return Err(Status::failed_precondition(format!(
                        "session {} is full: this turn would take it to {after} messages, past the {} this server \
                         keeps in one session (session_store.max_session_messages); start a new session",
                        session.id, session.message_limit
                    )));
                }
                let bytes: u64 = session.messages.iter().map(message_bytes).sum();
                if session.byte_limit > 0 && bytes >= session.byte_limit {
                    return Err(Status::failed_precondition(format!(
                        "session {} is full: it holds {bytes} bytes of messages, the most this server keeps in one \
                         session is {} (session_store.max_session_bytes); start a new session",
                        session.id, session.byte_limit
                    )));
                }
                // The session's system prompt leads unless the turn brings its own.
                let mut history = session.messages;
                if !session.system_prompt.is_empty() && !request.messages.iter().any(|m| m.role == "system") {
                    let system =
                        ChatMessage { role: "system".into(), content: session.system_prompt, ..Default::default() };
                    history.insert(0, system);
                }
                (session.id, history, Some(lock))
            }
            _ => (String::new(), vec![], None),
        };
        let mut sampling = request.sampling.unwrap_or_default();
        let max_tokens = if model.max_output_tokens > 0 { model.max_output_tokens } else { u32::MAX };
        if let Some(asked) = sampling.max_tokens.filter(|&n| n > max_tokens) {
            return Err(Status::invalid_argument(format!(
                "max_tokens {asked} is above model `{}`'s limit of {max_tokens} (model_provider.max_tokens)",
                model.id
            )));
        }
        sampling.max_tokens = sampling.max_tokens.or((max_tokens < u32::MAX).then_some(max_tokens));
        let request_id =
            if request.request_id.is_empty() { uuid::Uuid::new_v4().to_string() } else { request.request_id };
        let mut new_messages = request.messages;
        if let Some(call) = request.plugin {
            let call = crate::plugins::Call { name: call.name, arguments_json: call.arguments_json };
            let ran = crate::plugins::run(&service, call, &session_id, &user_id, &request_id).await?;
            new_messages.extend(ran);
        }
        let window = match (model.context_length, model.provider.as_str()) {
            (0, "remote_api") => REMOTE_WINDOW,
            (0, _) => LONGEST_CONTEXT,
            (n, _) => n as usize,
        };
        let mut history = within_window(history, &new_messages, window);
        fit_history_images(&mut history, model.vision);
        let prompt = history.into_iter().chain(new_messages.iter().cloned()).collect();
        let plugins = request.plugins;
        Ok(Self {
            service,
            model,
            request_id,
            user_id,
            session_id,
            mode,
            new_messages,
            prompt,
            sampling,
            tools,
            plugins,
            deadline,
            lock: std::sync::Mutex::new(lock),
        })
    }

    /// Streams the turn to `out`; a closed `out` (client gone) cancels the job.
    pub async fn run(mut self, out: Sender<Result<ChatEvent, Status>>) {
        if let Err(status) = self.generate(&out).await {
            tracing::info!(request_id = %self.request_id, code = ?status.code(), message = status.message(), "turn failed");
            let _ = out.send(Err(status)).await;
        }
    }

    /// Generates the answer. When the model calls plugins, the dialogue-manager runs the calls, adds them and their
    /// results to the turn, and generates again: at most `plugins.max_rounds` rounds of calls, and then the model
    /// must answer in text. Calls of the client's functions end the turn.
    async fn generate(&mut self, out: &Sender<Result<ChatEvent, Status>>) -> Result<(), Status> {
        let send = |event| emit(out, event);
        let mut total = Usage::default();
        let mut round = 0;
        // Every job of the turn has an attempt number of its own: the queue tells jobs apart by request id and
        // attempt (JetStream drops a repeated one as a duplicate), and later rounds are new jobs.
        let mut attempt = 0;
        loop {
            let tools = self.tools_for(round, round >= self.service.max_rounds);
            let generated = match self.round(out, tools, round == 0, &mut attempt).await? {
                Round::Done(generated) => generated,
                Round::Stopped { text, message_tokens } => return self.stopped(text, &message_tokens).await,
            };
            attempt += 1;
            let Generated { text, usage, finish_reason, calls, mut message_tokens } = generated;
            total.prompt_tokens += usage.prompt_tokens;
            total.completion_tokens += usage.completion_tokens;
            total.cached_tokens += usage.cached_tokens;
            let (mut plugin_calls, client_calls): (Vec<ToolCall>, Vec<ToolCall>) =
                calls.into_iter().partition(|c| self.plugins.contains(&c.name));
            if plugin_calls.is_empty() {
                let answer = Answer { text, calls: client_calls, tokens: usage.completion_tokens };
                return self.finish(answer, total, &message_tokens, finish_reason, &send).await;
            }
            // The model's calls of plugins, and their results, join the turn; it goes on with them in view.
            for call in &mut plugin_calls {
                call.id = crate::plugins::call_id();
            }
            let calling = ChatMessage {
                role: "assistant".into(),
                content: text,
                created_at_ms: now_ms(),
                tokens: usage.completion_tokens,
                tool_calls: plugin_calls.clone(),
                ..Default::default()
            };
            // Counts of the messages this round adds, for a turn saved before a next round counts them.
            message_tokens.push(calling.tokens);
            self.add(calling);
            // Every call is run and answered even when the client goes away meanwhile, so the session never keeps
            // a call without its result.
            let mut gone = false;
            for call in plugin_calls {
                let (answer, failed) = crate::plugins::run_for_model(
                    &self.service,
                    &call,
                    &self.session_id,
                    &self.user_id,
                    &self.request_id,
                )
                .await;
                let content = answer.content.clone();
                message_tokens.push(0);
                self.add(answer);
                let result = ToolResult { call: Some(call), content, failed };
                gone = gone || send(chat_event::Event::ToolResult(result)).await.is_err();
            }
            if gone {
                return self.stopped(String::new(), &message_tokens).await;
            }
            if !client_calls.is_empty() {
                // Calls of the client's own functions end the turn, after the plugins' results.
                let answer = Answer { text: String::new(), calls: client_calls, tokens: 0 };
                return self.finish(answer, total, &message_tokens, FinishReason::ToolCalls, &send).await;
            }
            round += 1;
        }
    }

    /// A message of the turn, which the model sees from the next generation on and the session keeps.
    fn add(&mut self, message: ChatMessage) {
        self.prompt.push(message.clone());
        self.new_messages.push(message);
    }

    /// The tools of generation `round`: the request's choice first, then the model's own (`auto`); after the `last`
    /// round of plugin calls, the model may not call.
    fn tools_for(&self, round: u32, last: bool) -> Option<Tools> {
        let mut tools = self.tools.clone()?;
        if round > 0 {
            tools.choice = None;
        }
        if last && !self.plugins.is_empty() {
            tools.choice = Some(ToolChoice { mode: Mode::None.into(), function: String::new() });
        }
        Some(tools)
    }

    /// One generation, with retries while no worker has answered, counted by its outcome as the turn saw it
    /// (`moltbot_model_requests_total`: the S9 success rate, including calls no worker ever took).
    async fn round(
        &self,
        out: &Sender<Result<ChatEvent, Status>>,
        tools: Option<Tools>,
        announce: bool,
        attempt: &mut u32,
    ) -> Result<Round, Status> {
        let result = self.attempts(out, tools, announce, attempt).await;
        let outcome = match &result {
            Ok(Round::Done(_)) => "success",
            // A caller gone at its deadline timed out (as `stopped` tells it).
            Ok(Round::Stopped { .. }) if tokio::time::Instant::now() + DEADLINE_MARGIN >= self.deadline => {
                "deadline_exceeded"
            }
            Ok(Round::Stopped { .. }) => "cancelled",
            Err(failed) => failed.outcome,
        };
        let model = self.model.id.clone();
        metrics::counter!("moltbot_model_requests_total", "model" => model, "outcome" => outcome).increment(1);
        result.map_err(|failed| failed.status)
    }

    /// Records how long a job waited for a worker (`moltbot_queue_wait_seconds`): until a worker's first event, or
    /// until the turn gave up on it (deadline, client gone), so a stalled queue shows as long waits, not none.
    fn waited(&self, submitted: &mut Option<std::time::Instant>) {
        if let Some(submitted) = submitted.take() {
            let model = self.model.id.clone();
            metrics::histogram!("moltbot_queue_wait_seconds", "model" => model).record(submitted.elapsed());
        }
    }

    async fn attempts(
        &self,
        out: &Sender<Result<ChatEvent, Status>>,
        tools: Option<Tools>,
        announce: bool,
        attempt: &mut u32,
    ) -> Result<Round, Failed> {
        let send = |event| emit(out, event);
        let deadline = self.deadline;
        let deadline_ms = now_ms() + deadline.saturating_duration_since(tokio::time::Instant::now()).as_millis() as i64;
        let (first, mut retries) = (*attempt, 0);
        let mut text = String::new();
        'attempts: loop {
            let job = InferenceJob {
                request: Some(GenerateRequest {
                    request_id: self.request_id.clone(),
                    model: self.model.id.clone(),
                    input: Some(Input::Chat(ChatInput { messages: self.prompt.clone(), tools: tools.clone() })),
                    sampling: Some(self.sampling.clone()),
                    trace_context: moltbot_telemetry::trace::current(),
                }),
                deadline_ms,
                attempt: *attempt,
                reply_subject: String::new(),
            };
            let mut events = self.service.queue.submit(job).await.map_err(queue_failure)?;
            let mut submitted = Some(std::time::Instant::now());
            let mut waiting = self.service.waiting.of(&self.model.id).join();
            let mut started = false;
            let mut message_tokens = vec![];
            loop {
                // Before a worker starts the job it may wait in the queue until the deadline; after, the worker
                // must show signs of life (events or heartbeats) every `worker_timeout`.
                // While it waits, the model's workers are watched: when all are gone, none will take it.
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let wait = if started { self.service.worker_timeout } else { WATCH_WORKERS }.min(left);
                let asked = tokio::time::Instant::now();
                // A client that goes away while the job waits in the queue cancels it there, before any work.
                let next = tokio::select! {
                    next = events.next_within(wait) => next,
                    () = out.closed() => {
                        self.waited(&mut submitted);
                        return Ok(Round::Stopped { text, message_tokens });
                    }
                };
                let Some(event) = next else {
                    if !started && tokio::time::Instant::now() < deadline && asked.elapsed() >= wait {
                        if let moltbot_queue::Lookup::Gone(_) = self.service.queue.lookup(&self.model.id) {
                            self.waited(&mut submitted);
                            let status = crate::no_worker(&format!(
                                "no inference worker of model `{}` is live any more; retry when one is back",
                                self.model.id
                            ));
                            return Err(Failed { outcome: "no_worker", status });
                        }
                        continue;
                    }
                    if !started {
                        let status = Status::deadline_exceeded("no worker took the request before its deadline");
                        self.waited(&mut submitted);
                        return Err(Failed { outcome: "no_worker", status });
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Status::deadline_exceeded("the answer was not finished before the deadline").into());
                    }
                    if text.is_empty() && retries < self.service.max_retries {
                        (retries, *attempt) = (retries + 1, *attempt + 1);
                        tracing::warn!(request_id = %self.request_id, attempt = *attempt, "worker went silent before answering; queueing again");
                        continue 'attempts;
                    }
                    let status =
                        Status::unavailable("the inference worker stopped responding mid-answer; retry the request");
                    return Err(Failed { outcome: "worker_lost", status });
                };
                let event = event
                    .map_err(|e| Failed { outcome: "queue_unavailable", status: Status::unavailable(e.to_string()) })?
                    .event;
                // A worker's first word on the job (it started, or refused it) ends the job's wait in the queue.
                self.waited(&mut submitted);
                match event {
                    Some(Event::Started(s)) => {
                        if !started && *attempt == first && announce {
                            send(chat_event::Event::Started(TurnStarted {
                                session_id: self.session_id.clone(),
                                mode: self.mode.into(),
                                model: self.model.id.clone(),
                                prompt_tokens: s.prompt_tokens,
                            }))
                            .await?;
                        }
                        started = true;
                        waiting.leave();
                        message_tokens = s.message_tokens.clone();
                        tracing::debug!(
                            request_id = %self.request_id, worker_id = %s.worker_id, prompt_tokens = s.prompt_tokens,
                            trimmed_messages = s.trimmed_messages, "job started"
                        );
                    }
                    Some(Event::Token(t)) => {
                        if t.text.is_empty() {
                            continue;
                        }
                        if send(chat_event::Event::Delta(Delta { text: t.text.clone() })).await.is_err() {
                            return Ok(Round::Stopped { text, message_tokens });
                        }
                        text.push_str(&t.text);
                    }
                    Some(Event::Heartbeat(_)) | None => {}
                    Some(Event::Error(e)) => {
                        return Err(Status::new(Code::from(e.code), e.message).into());
                    }
                    Some(Event::Finished(f)) => {
                        let finish_reason = f.finish_reason();
                        let usage = f.usage.unwrap_or_default();
                        let calls = f.tool_calls;
                        return Ok(Round::Done(Generated { text, usage, finish_reason, calls, message_tokens }));
                    }
                }
            }
        }
    }

    async fn finish<F, Fut>(
        &self,
        answer: Answer,
        usage: Usage,
        message_tokens: &[u32],
        finish_reason: FinishReason,
        send: &F,
    ) -> Result<(), Status>
    where
        F: Fn(chat_event::Event) -> Fut,
        Fut: std::future::Future<Output = Result<(), Status>>,
    {
        let Answer { text, mut calls, tokens } = answer;
        for call in &mut calls {
            call.id = crate::plugins::call_id();
        }
        let answer = self.save(Some((text, calls, tokens)), message_tokens).await?;
        let lock = self.lock.lock().ok().and_then(|mut held| held.take());
        if let Some(lock) = lock {
            lock.release().await;
        }
        send(chat_event::Event::Finished(TurnFinished {
            message: Some(answer),
            usage: Some(usage),
            finish_reason: finish_reason.into(),
        }))
        .await
    }

    /// Ends a turn whose client went away after `text` of the answer. Its job is cancelled when the caller drops
    /// the job's events. The answer stays in the session as far as it was streamed, as a chat app's stop button
    /// leaves it; an answer stopped before its first word leaves nothing.
    async fn stopped(&self, text: String, message_tokens: &[u32]) -> Result<(), Status> {
        // A caller that went away at its deadline timed out rather than hung up: a failed turn saves nothing.
        if tokio::time::Instant::now() + DEADLINE_MARGIN >= self.deadline {
            return Err(Status::deadline_exceeded("the answer was not finished before the deadline"));
        }
        // Plugins the model called are kept with their results even when no answer followed.
        if !text.is_empty() {
            self.save(Some((text, vec![], 0)), message_tokens).await?;
        } else if self.new_messages.iter().any(|m| m.role == "tool") {
            self.save(None, message_tokens).await?;
        }
        Err(Status::cancelled("the client went away"))
    }

    /// Appends the turn (its messages and the `answer`: text, the calls of the client's functions, and its tokens,
    /// 0 when not counted) to a multi turn's session, and returns the answer.
    async fn save(
        &self,
        answer: Option<(String, Vec<ToolCall>, u32)>,
        message_tokens: &[u32],
    ) -> Result<ChatMessage, Status> {
        let kept = answer.is_some();
        let (content, tool_calls, tokens) = answer.unwrap_or_default();
        let answer = ChatMessage {
            role: "assistant".into(),
            content,
            created_at_ms: now_ms(),
            tokens,
            tool_calls,
            ..Default::default()
        };
        if self.mode == DialogueMode::Multi {
            // The worker counted every prompt message; this turn's own are the last ones.
            let counts = message_tokens.iter().rev().take(self.new_messages.len()).rev();
            let mut new_messages = self.new_messages.clone();
            if message_tokens.len() >= new_messages.len() {
                for (m, &tokens) in new_messages.iter_mut().zip(counts) {
                    m.tokens = tokens;
                }
            }
            let messages = new_messages.into_iter().chain(kept.then(|| answer.clone())).collect();
            let request =
                AppendMessagesRequest { session_id: self.session_id.clone(), user_id: self.user_id.clone(), messages };
            self.service.sessions.clone().append_messages(request).await?;
        }
        Ok(answer)
    }
}

/// Sends an event of the turn to its caller; a caller gone is a cancelled turn.
async fn emit(out: &Sender<Result<ChatEvent, Status>>, event: chat_event::Event) -> Result<(), Status> {
    out.send(Ok(ChatEvent { event: Some(event) })).await.map_err(|_| Status::cancelled("the client went away"))
}

/// The turn's last message: the answer's text, the calls of the client's functions, and its tokens.
struct Answer {
    text: String,
    calls: Vec<ToolCall>,
    tokens: u32,
}

/// What one generation came to.
enum Round {
    Done(Generated),
    /// The client went away after `text`.
    Stopped {
        text: String,
        message_tokens: Vec<u32>,
    },
}

struct Generated {
    text: String,
    usage: Usage,
    finish_reason: FinishReason,
    /// The calls the answer made (no ids yet).
    calls: Vec<ToolCall>,
    message_tokens: Vec<u32>,
}

/// The request's tools: the client's functions, then the named plugins (their names must not clash), and a forced
/// choice naming one of them.
fn tools(service: &DialogueService, client: Option<Tools>, plugins: &[String]) -> Result<Option<Tools>, Status> {
    let mut tools = client.unwrap_or_default();
    for plugin in crate::plugins::as_tools(&service.plugins, plugins)? {
        if tools.tools.iter().any(|t| t.name == plugin.name) {
            return Err(Status::invalid_argument(format!(
                "tools: `{}` is both a function of the request and a plugin; rename the function",
                plugin.name
            )));
        }
        tools.tools.push(plugin);
    }
    let choice = tools.choice.clone().unwrap_or_default();
    if choice.mode() == Mode::Function && !tools.tools.iter().any(|t| t.name == choice.function) {
        return Err(Status::invalid_argument(format!(
            "tool_choice: `{}` is not one of the request's tools or plugins",
            choice.function
        )));
    }
    if choice.mode() == Mode::Required && tools.tools.is_empty() {
        return Err(Status::invalid_argument("tool_choice: `required` needs at least one tool"));
    }
    Ok((!tools.tools.is_empty()).then_some(tools))
}

/// The part of a stored `history` that can matter to a model with a `window`-token context: leading system
/// messages and the newest whole turns (from a user message on) whose stored token counts, with the new
/// messages', fit. The worker fits the prompt exactly; this only keeps a long conversation from sending its whole
/// past in every job (NATS has a payload limit). A message stored without a count counts its bytes, which no
/// tokenizer exceeds.
fn within_window(history: Vec<ChatMessage>, new: &[ChatMessage], window: usize) -> Vec<ChatMessage> {
    let cost = |m: &ChatMessage| if m.tokens > 0 { m.tokens as usize } else { m.content.len() };
    let system = history.iter().take_while(|m| m.role == "system").count();
    let mut budget = window.saturating_sub(new.iter().chain(&history[..system]).map(cost).sum::<usize>());
    let mut start = history.len();
    while start > system && cost(&history[start - 1]) <= budget {
        budget -= cost(&history[start - 1]);
        start -= 1;
    }
    if start == system {
        return history;
    }
    // A turn is kept whole or not at all: start at a user message.
    while start < history.len() && history[start].role != "user" {
        start += 1;
    }
    let mut history = history;
    history.drain(system..start);
    history
}

/// A model call that failed: the caller's status, and the outcome it is counted under.
struct Failed {
    outcome: &'static str,
    status: Status,
}

/// A worker's error, or the turn's own, counted by its code.
impl From<Status> for Failed {
    fn from(status: Status) -> Self {
        let outcome = match status.code() {
            Code::Cancelled => "cancelled",
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => "invalid_request",
            Code::ResourceExhausted => "overloaded",
            Code::DeadlineExceeded => "deadline_exceeded",
            _ => "error",
        };
        Self { outcome, status }
    }
}

fn queue_failure(e: moltbot_queue::Error) -> Failed {
    match e {
        moltbot_queue::Error::Full(_) => {
            Failed { outcome: "queue_full", status: Status::resource_exhausted(e.to_string()) }
        }
        moltbot_queue::Error::TooLarge { .. } => Status::invalid_argument(e.to_string()).into(),
        _ => Failed { outcome: "queue_unavailable", status: Status::unavailable(e.to_string()) },
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use moltbot_proto::common::v1::ChatMessage;

    use super::within_window;

    fn message(role: &str, tokens: u32) -> ChatMessage {
        ChatMessage { role: role.into(), content: format!("{role} {tokens}"), tokens, ..Default::default() }
    }

    fn roles_and_tokens(messages: &[ChatMessage]) -> Vec<(String, u32)> {
        messages.iter().map(|m| (m.role.clone(), m.tokens)).collect()
    }

    #[test]
    fn a_history_within_the_window_goes_whole() {
        let history =
            vec![message("system", 10), message("assistant", 5), message("user", 10), message("assistant", 10)];
        assert_eq!(within_window(history.clone(), &[message("user", 10)], 100), history);
    }

    #[test]
    fn the_oldest_whole_turns_stay_behind_and_the_system_prompt_stays() {
        let history = vec![
            message("system", 10),
            message("user", 40),
            message("assistant", 40),
            message("user", 20),
            message("assistant", 20),
        ];
        // 100 - 10 (new) - 10 (system) = 80: the newest turn (40) fits, the one before (80) does not.
        let kept = within_window(history, &[message("user", 10)], 100);
        assert_eq!(roles_and_tokens(&kept), [("system".into(), 10), ("user".into(), 20), ("assistant".into(), 20)]);
    }

    #[test]
    fn a_turn_is_never_cut_in_half() {
        let history =
            vec![message("user", 50), message("assistant", 10), message("tool", 10), message("assistant", 10)];
        // 35 tokens would fit the last three messages, but they are half a turn: nothing of it goes.
        assert!(within_window(history, &[message("user", 5)], 40).is_empty());
    }

    #[test]
    fn messages_without_counts_count_their_bytes() {
        let uncounted = ChatMessage { role: "user".into(), content: "x".repeat(1000), ..Default::default() };
        let history = vec![uncounted, message("assistant", 1)];
        assert!(within_window(history, &[message("user", 1)], 500).is_empty());
    }
}
