//! The dialogue-manager: runs one conversation turn per `Chat` call. It picks the dialogue mode (S3), loads
//! the session from the session-store, queues a generation job, streams the answer back, and saves the turn.
//! It never talks to Redis or to a worker directly: only to the session-store (gRPC) and the queue.

mod admission;
mod plugins;
mod turn;

use std::{future::Future, time::Duration};

use moltbot_config::Config;
use moltbot_proto::{
    Replicas,
    dialogue::v1::{
        ChatEvent, ChatRequest, ExecutePluginRequest, ExecutePluginResponse, ListModelsRequest, ListModelsResponse,
        ListPluginsRequest, ListPluginsResponse, dialogue_server::Dialogue,
    },
    session::v1::{
        CreateSessionRequest, DeleteSessionRequest, DeleteSessionResponse, GetSessionRequest, ListSessionsRequest,
        ListSessionsResponse, Session, UpdateSessionRequest, session_store_client::SessionStoreClient,
    },
};
use moltbot_queue::JobQueue;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

/// Connects to the session-store (one URL, or replicas separated by commas), failing fast with what to do when
/// none is there; a replica that is down at start is used once it is up.
pub async fn connect_session_store(
    urls: &str,
    credential: &moltbot_proto::Credential,
) -> anyhow::Result<SessionStoreClient<Replicas>> {
    let channel = Replicas::lazy(urls).map_err(|e| anyhow::anyhow!("dialogue_manager.session_store_url: {e}"))?;
    let channel = channel.with_credential(credential);
    let unreachable = channel.unreachable().await;
    if unreachable.len() == channel.urls().count() {
        anyhow::bail!(
            "the session-store is not reachable at {}; start it or set dialogue_manager.session_store_url",
            unreachable.join(", ")
        );
    }
    for replica in unreachable {
        tracing::warn!(%replica, "a session-store replica is not reachable yet; it is used once it is up");
    }
    // A session's history may be large; the limit is set, not inherited (jobs carry only what fits the window).
    Ok(SessionStoreClient::new(channel).max_decoding_message_size(moltbot_proto::MAX_MESSAGE_BYTES))
}

/// How long after its start a dialogue-manager listens for workers (they announce themselves every two seconds)
/// before it calls a model it has not heard of unknown.
const FIRST_ANNOUNCEMENTS: Duration = Duration::from_millis(2500);

#[derive(Clone)]
pub struct DialogueService {
    sessions: SessionStoreClient<Replicas>,
    queue: JobQueue,
    /// The model of requests that name none (`dialogue_manager.default_model`); empty: `fallback_model`.
    default_model: String,
    /// Without a default: `model_provider.model_name` while a live worker serves it, else the only model served.
    fallback_model: String,
    /// Other names of served models (`dialogue_manager.model_aliases`).
    aliases: std::sync::Arc<std::collections::BTreeMap<String, String>>,
    /// When this service started: until workers had time to announce themselves, an unknown model is waited for.
    started: tokio::time::Instant,
    /// What callers must present (`internal.service_token`).
    credential: moltbot_proto::Credential,
    job_timeout: Duration,
    worker_timeout: Duration,
    max_retries: u32,
    session_lock_wait: Duration,
    session_lock_lease: Duration,
    /// Jobs submitted and not yet started by a worker: their age tells how far behind the workers are.
    waiting: admission::ByModel,
    plugins: std::sync::Arc<moltbot_plugin::Plugins>,
    /// Generations per turn whose calls of plugins are run (`plugins.max_rounds`).
    max_rounds: u32,
}

impl DialogueService {
    pub fn new(config: &Config, sessions: SessionStoreClient<Replicas>, queue: JobQueue) -> Self {
        Self {
            sessions,
            queue,
            default_model: config.dialogue_manager.default_model.clone(),
            fallback_model: config.model_provider.model_name.clone(),
            aliases: std::sync::Arc::new(config.dialogue_manager.model_aliases.clone()),
            started: tokio::time::Instant::now(),
            credential: moltbot_proto::Credential::new(&config.internal.service_token),
            job_timeout: Duration::from_secs(config.queue.job_timeout),
            worker_timeout: Duration::from_secs(config.dialogue_manager.worker_timeout),
            max_retries: config.dialogue_manager.max_retries,
            session_lock_wait: Duration::from_secs(config.dialogue_manager.session_lock_wait),
            session_lock_lease: Duration::from_secs(config.dialogue_manager.session_lock_lease),
            waiting: admission::ByModel::new(Duration::from_secs(config.dialogue_manager.max_queue_wait)),
            plugins: Default::default(),
            max_rounds: config.plugins.max_rounds,
        }
    }

    /// The plugins this service runs (none until given; `moltbot_plugin::Plugins::load` loads the configured ones).
    pub fn with_plugins(mut self, plugins: moltbot_plugin::Plugins) -> Self {
        self.plugins = std::sync::Arc::new(plugins);
        self
    }

    /// The model `name` stands for: the one it is an alias of, or itself.
    fn unaliased(&self, name: &str) -> String {
        self.aliases.get(name).cloned().unwrap_or_else(|| name.to_owned())
    }

    /// The model of a request that names none, among the models `served`: `dialogue_manager.default_model`, else
    /// `model_provider.model_name` while it is served, else the only model served.
    fn default_name(&self, served: &[moltbot_proto::common::v1::ModelCard]) -> Option<String> {
        if !self.default_model.is_empty() {
            return Some(self.unaliased(&self.default_model));
        }
        let fallback = served.iter().find(|m| m.id == self.fallback_model);
        fallback
            .or(match served {
                [only] => Some(only),
                _ => None,
            })
            .map(|m| m.id.clone())
    }

    /// The model a request's `model` names (an alias, or empty for the default), as its workers announced it.
    /// An unknown model is `NOT_FOUND` (with `moltbot-error: model_not_found`, which the gateway answers as
    /// OpenAI does); a model whose workers are all gone is `UNAVAILABLE` at once, not a job no one takes.
    pub(crate) async fn model(&self, asked: &str) -> Result<moltbot_proto::common::v1::ModelCard, Status> {
        loop {
            let listening = self.started.elapsed() < FIRST_ANNOUNCEMENTS;
            let name = if asked.is_empty() {
                let served = self.queue.models();
                match self.default_name(&served) {
                    Some(name) => name,
                    None if served.is_empty() && listening => String::new(),
                    None if served.is_empty() => {
                        return Err(no_worker("no model is being served: no inference worker is live"));
                    }
                    None => {
                        let names: Vec<_> = served.iter().map(|m| m.id.as_str()).collect();
                        return Err(Status::invalid_argument(format!(
                            "model is required: this server serves {}",
                            names.join(", ")
                        )));
                    }
                }
            } else {
                self.unaliased(asked)
            };
            match self.queue.lookup(&name) {
                moltbot_queue::Lookup::Live(card) => return Ok(card),
                _ if listening => tokio::time::sleep(Duration::from_millis(100)).await,
                moltbot_queue::Lookup::Gone(card) => {
                    return Err(no_worker(&format!(
                        "no inference worker of model `{}` is live; retry when one is back",
                        card.id
                    )));
                }
                moltbot_queue::Lookup::Unknown => {
                    let served: Vec<_> = self.queue.models().into_iter().map(|m| m.id).collect();
                    let named = if asked.is_empty() { name.as_str() } else { asked };
                    let mut status = Status::not_found(format!(
                        "model `{}` does not exist; served: {}",
                        moltbot_proto::shown(named),
                        if served.is_empty() { "none".into() } else { served.join(", ") }
                    ));
                    status.metadata_mut().insert("moltbot-error", "model_not_found".parse().expect("ASCII"));
                    return Err(status);
                }
            }
        }
    }
}

/// UNAVAILABLE, retry in a few seconds.
pub(crate) fn no_worker(message: &str) -> Status {
    let mut status = Status::unavailable(message);
    status.metadata_mut().insert("retry-after", "5".parse().expect("ASCII"));
    status
}

#[tonic::async_trait]
impl Dialogue for DialogueService {
    type ChatStream = ReceiverStream<Result<ChatEvent, Status>>;

    async fn chat(&self, request: Request<ChatRequest>) -> Result<Response<Self::ChatStream>, Status> {
        let budget = moltbot_proto::grpc_timeout::read(request.metadata().as_ref());
        let span = tracing::info_span!(
            "turn",
            request_id = %request.get_ref().request_id,
            session_id = %request.get_ref().session_id,
            trace_id = tracing::field::Empty
        );
        // A child of the call's span, which joined the caller's trace; the trace id goes into the turn's log lines.
        moltbot_telemetry::trace::adopt(&span, &Default::default());
        let turn = turn::Turn::prepare(self.clone(), request.into_inner(), budget).instrument(span.clone()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(turn.run(tx).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let mut models = self.queue.models();
        // Just started: the workers have not all been heard yet.
        while models.is_empty() && self.started.elapsed() < FIRST_ANNOUNCEMENTS {
            tokio::time::sleep(Duration::from_millis(100)).await;
            models = self.queue.models();
        }
        for card in &mut models {
            card.aliases =
                self.aliases.iter().filter(|(_, model)| **model == card.id).map(|(a, _)| a.clone()).collect();
        }
        let default_model = self.default_name(&models).unwrap_or_default();
        Ok(Response::new(ListModelsResponse { models, default_model }))
    }

    async fn create_session(&self, request: Request<CreateSessionRequest>) -> Result<Response<Session>, Status> {
        let mut r = request.into_inner();
        r.user_id = user_or_anonymous(r.user_id);
        self.sessions.clone().create_session(r).await
    }

    async fn get_session(&self, request: Request<GetSessionRequest>) -> Result<Response<Session>, Status> {
        let mut r = request.into_inner();
        r.user_id = user_or_anonymous(r.user_id);
        self.sessions.clone().get_session(r).await
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let mut r = request.into_inner();
        r.user_id = user_or_anonymous(r.user_id);
        self.sessions.clone().list_sessions(r).await
    }

    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let mut r = request.into_inner();
        r.user_id = user_or_anonymous(r.user_id);
        self.sessions.clone().delete_session(r).await
    }

    async fn update_session(&self, request: Request<UpdateSessionRequest>) -> Result<Response<Session>, Status> {
        let mut r = request.into_inner();
        r.user_id = user_or_anonymous(r.user_id);
        self.sessions.clone().update_session(r).await
    }

    async fn list_plugins(&self, _: Request<ListPluginsRequest>) -> Result<Response<ListPluginsResponse>, Status> {
        Ok(Response::new(plugins::list(&self.plugins)))
    }

    async fn execute_plugin(
        &self,
        request: Request<ExecutePluginRequest>,
    ) -> Result<Response<ExecutePluginResponse>, Status> {
        let mut r = request.into_inner();
        r.user_id = user_or_anonymous(r.user_id);
        Ok(Response::new(plugins::execute(self, r).await?))
    }
}

/// Requests without a user belong to the anonymous user.
pub(crate) fn user_or_anonymous(user_id: String) -> String {
    if user_id.is_empty() { "anonymous".to_owned() } else { user_id }
}

/// Serves the dialogue service on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    service: DialogueService,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (queue, credential) = (service.queue.clone(), service.credential.clone());
    // The queue's depth as a metric, every 5 s while the service runs.
    let depth = tokio_util::sync::CancellationToken::new();
    let _stop_depth = depth.clone().drop_guard();
    tokio::spawn(moltbot_telemetry::metrics::sample_every(Duration::from_secs(5), depth, move || {
        let queue = queue.clone();
        async move {
            if let Ok(pending) = queue.pending().await {
                metrics::gauge!("moltbot_queue_pending_jobs").set(pending as f64);
            }
        }
    }));
    let server = moltbot_proto::dialogue::v1::dialogue_server::DialogueServer::new(service);
    Ok(moltbot_proto::server::serve(listener, server, credential, shutdown).await?)
}

/// The dialogue-manager as its own process (the `moltbot-dialogue-manager` binary, `moltbot run
/// dialogue-manager`): telemetry, its metrics port, the session-store and NATS, gRPC until SIGTERM.
pub async fn serve(config: &moltbot_config::Config) -> anyhow::Result<()> {
    config.internal.guard(config.dialogue_manager.listen, "dialogue_manager.listen")?;
    let (service, metrics) = ("moltbot-dialogue-manager", config.dialogue_manager.metrics_listen);
    let _tracing = moltbot_telemetry::start(config, service, metrics, "dialogue_manager.metrics_listen").await?;
    let credential = moltbot_proto::Credential::new(&config.internal.service_token);
    let sessions = connect_session_store(&config.dialogue_manager.session_store_url, &credential).await?;
    let queue = JobQueue::nats(&config.queue).await?;
    let plugins = moltbot_plugin::Plugins::load(&config.plugins).await?;
    let service = DialogueService::new(config, sessions, queue).with_plugins(plugins);
    let listener = moltbot_telemetry::bind(config.dialogue_manager.listen, "dialogue_manager.listen").await?;
    run(listener, service, moltbot_telemetry::shutdown_signal()).await
}
