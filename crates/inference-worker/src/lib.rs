//! The inference worker: serves one model through its provider (MoltBot's engine, or a remote OpenAI-compatible
//! API), announces it, takes generation jobs from the queue only when it has a free slot, streams token events
//! back (with a heartbeat every second), obeys cancels and deadlines, and serves the
//! `moltbot.inference.v1.Inference` gRPC service (model info, tokenize, direct generation).

mod drive;
pub mod remote;
mod service;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use futures::StreamExt;
use moltbot_config::{InferenceWorkerConfig, ModelProviderConfig, ProviderType};
use moltbot_engine::{DeviceChoice, Engine, EngineConfig, KvBudget};
use moltbot_queue::JobQueue;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

pub use drive::drive;
use moltbot_engine::Quantization;
pub use service::InferenceService;

/// Loads the model `provider` names on the engine, with the worker's settings.
pub fn load_engine(provider: &ModelProviderConfig, worker: &InferenceWorkerConfig) -> moltbot_engine::Result<Engine> {
    Engine::load(EngineConfig {
        name: Some(provider.model_name.clone()),
        device: match provider.gpu_layers {
            0 => DeviceChoice::Cpu,
            layers => DeviceChoice::Cuda { ordinal: 0, layers: layers as usize },
        },
        max_context: (provider.context_length > 0).then_some(provider.context_length as usize),
        max_batch_size: worker.max_batch_size,
        max_batch_tokens: worker.max_batch_tokens,
        max_step: std::time::Duration::from_millis(worker.max_step_ms.max(1)),
        kv_cache: KvBudget::Bytes(worker.kv_cache_mib << 20),
        max_waiting: worker.max_waiting,
        threads: (worker.threads > 0).then_some(worker.threads),
        max_prompt_tokens: (worker.max_prompt_tokens > 0).then_some(worker.max_prompt_tokens),
        prefix_caching: worker.prefix_caching,
        quantization: match provider.quantization.as_str() {
            "4bit" => Quantization::Bits4,
            "8bit" => Quantization::Bits8,
            _ => Quantization::None,
        },
        ..EngineConfig::new(provider.resolved_model_path())
    })
}

/// What generates a worker's answers.
#[derive(Clone)]
pub enum Provider {
    /// MoltBot's own engine, batching the worker's jobs.
    Local(Engine),
    /// An OpenAI-compatible API, called once per job.
    Remote(remote::Remote),
}

impl Provider {
    /// Loads the local model or readies the remote API's client that `config` names.
    pub fn load(config: &ModelProviderConfig, worker: &InferenceWorkerConfig) -> anyhow::Result<Self> {
        Ok(match config.provider() {
            ProviderType::LocalLlm => Self::Local(load_engine(config, worker)?),
            ProviderType::RemoteApi => Self::Remote(remote::Remote::new(config)?),
        })
    }

    /// The name clients use in `model`.
    pub fn name(&self) -> &str {
        match self {
            Self::Local(engine) => engine.name(),
            Self::Remote(remote) => remote.name(),
        }
    }

    /// Jobs the worker runs at once.
    pub fn slots(&self) -> usize {
        match self {
            Self::Local(engine) => engine.max_sequences(),
            Self::Remote(remote) => remote.max_concurrency(),
        }
    }

    /// Requests waiting inside the provider for a place (the engine's batch).
    fn waiting(&self) -> usize {
        match self {
            Self::Local(engine) => engine.stats().waiting,
            Self::Remote(_) => 0,
        }
    }

    /// What the worker announces of its model.
    pub fn card(&self, max_tokens: u32) -> moltbot_proto::common::v1::ModelCard {
        match self {
            Self::Local(engine) => moltbot_proto::common::v1::ModelCard {
                id: engine.name().to_owned(),
                context_length: engine.context_length() as u32,
                max_output_tokens: max_tokens,
                provider: "local_llm".into(),
                tools: true,
                vision: false,
                json_schema: true,
                aliases: vec![],
            },
            Self::Remote(remote) => remote.card(),
        }
    }

    /// The engine, for a local model.
    pub fn engine(&self) -> Option<&Engine> {
        match self {
            Self::Local(engine) => Some(engine),
            Self::Remote(_) => None,
        }
    }
}

impl From<Engine> for Provider {
    fn from(engine: Engine) -> Self {
        Self::Local(engine)
    }
}

/// A worker: one model's provider, its identity and counters.
#[derive(Clone)]
pub struct Worker {
    pub provider: Provider,
    pub id: String,
    pub max_tokens: u32,
    /// What callers of its gRPC service must present (`internal.service_token`); none by default.
    pub credential: moltbot_proto::Credential,
    jobs: Arc<JobCounts>,
}

/// Jobs since start: finished (any outcome); of those, stopped by a cancel; of those, cancelled while they waited
/// in the queue and dropped before any work.
#[derive(Default)]
struct JobCounts {
    completed: AtomicU64,
    cancelled: AtomicU64,
    cancelled_in_queue: AtomicU64,
    /// Jobs running now.
    running: AtomicUsize,
    /// Conversations (`affinity::conversation_key`) this worker ran lately, and when.
    conversations: std::sync::Mutex<std::collections::HashMap<u64, std::time::Instant>>,
}

/// How long a conversation counts as this worker's after its last turn here (its blocks are likely still cached).
const CONVERSATION_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);

impl JobCounts {
    /// This worker runs a turn of conversation `key`.
    fn ran(&self, key: u64) {
        let mut seen = self.conversations.lock().expect("never poisoned");
        if seen.len() >= 10_000 {
            seen.retain(|_, at| at.elapsed() < CONVERSATION_MEMORY);
            if seen.len() >= 10_000 {
                seen.clear();
            }
        }
        seen.insert(key, std::time::Instant::now());
    }

    /// Whether this worker ran a turn of conversation `key` lately.
    fn ran_lately(&self, key: u64) -> bool {
        let seen = self.conversations.lock().expect("never poisoned");
        seen.get(&key).is_some_and(|at| at.elapsed() < CONVERSATION_MEMORY)
    }
}

impl Worker {
    pub fn new(provider: impl Into<Provider>, config: &InferenceWorkerConfig, max_tokens: u32) -> Self {
        let id = if config.worker_id.is_empty() {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
            format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
        } else {
            config.worker_id.clone()
        };
        Self { provider: provider.into(), id, max_tokens, credential: Default::default(), jobs: Arc::default() }
    }

    /// The worker of the model `provider` configures.
    pub fn load(provider: &ModelProviderConfig, config: &InferenceWorkerConfig) -> anyhow::Result<Self> {
        Ok(Self::new(Provider::load(provider, config)?, config, provider.max_tokens))
    }

    pub fn jobs_completed(&self) -> u64 {
        self.jobs.completed.load(Ordering::Relaxed)
    }

    pub fn jobs_cancelled(&self) -> u64 {
        self.jobs.cancelled.load(Ordering::Relaxed)
    }

    pub fn jobs_cancelled_in_queue(&self) -> u64 {
        self.jobs.cancelled_in_queue.load(Ordering::Relaxed)
    }

    /// Takes jobs from the queue until `shutdown` is cancelled, then lets the running jobs finish.
    pub async fn consume(self, queue: JobQueue, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (model, max) = (self.provider.name().to_owned(), self.provider.slots());
        let mut consumer = queue.consumer(&model).await?;
        let slots = Arc::new(Semaphore::new(max));
        tracing::info!(worker_id = %self.id, %model, slots = max, "taking jobs");
        let offers = queue.offers(&model, &self.id).await?;
        let no_more_offers = CancellationToken::new();
        let offers =
            offers.map(|offers| tokio::spawn(self.clone().take_offers(offers, slots.clone(), no_more_offers.clone())));
        let announcing = tokio::spawn(self.clone().announce(queue.clone()));
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit?,
            };
            // Not raced with `shutdown`: a pull already asked of the queue is seen through (`next_job`).
            let job = match consumer.next_job(&shutdown).await {
                Ok(Some(job)) => job,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take a job; retrying in 1 s");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    }
                }
            };
            let worker = self.clone();
            tokio::spawn(async move {
                worker.run_job(job).await;
                drop(permit);
            });
        }
        // Drain: no more offers, and running jobs finish (their requesters are waiting for them) before the worker
        // goes. An offer cut short goes unanswered; its requester queues the job.
        announcing.abort();
        no_more_offers.cancel();
        if let Some(offers) = offers {
            // An offer being answered is seen through; an answered one holds its slot until its job ends.
            let _ = offers.await;
        }
        tracing::info!(worker_id = %self.id, "stopping: taking no more jobs, finishing the running ones");
        let _ = slots.acquire_many(max as u32).await;
        tracing::info!(worker_id = %self.id, "stopped");
        Ok(())
    }

    /// Tells the dialogue-managers every two seconds that this worker is alive and what it serves, so they route
    /// and offer it jobs.
    async fn announce(self, queue: JobQueue) {
        let card = self.provider.card(self.max_tokens);
        // A dialogue-manager that just connected asks for an announcement at once.
        let mut hellos = queue.hellos().await.ok().flatten().unwrap_or_else(|| futures::stream::pending().boxed());
        loop {
            if let Err(error) = queue.announce(&card, &self.id).await {
                tracing::debug!(%error, "cannot announce this worker");
            }
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                Some(()) = hellos.next() => {}
            }
        }
    }

    /// Takes the jobs offered to this worker directly while it has a free slot and nothing waits in its engine:
    /// any turn of a conversation it ran lately (it likely holds the prefix), and a new conversation only while
    /// it runs fewer jobs than a quarter of its slots, so that conversations that all prefer it still spread.
    /// Declined offers go to the shared queue.
    async fn take_offers(self, mut offers: moltbot_queue::Offers, slots: Arc<Semaphore>, stop: CancellationToken) {
        let max = self.provider.slots();
        loop {
            let offer = tokio::select! {
                () = stop.cancelled() => return,
                offer = offers.next() => match offer { Some(offer) => offer, None => return },
            };
            let known = offer.conversation().is_some_and(|key| self.jobs.ran_lately(key));
            // Jobs running, not slots taken: the pull loop holds a slot while it waits for a job.
            let light = self.jobs.running.load(Ordering::Relaxed) < max.div_ceil(4);
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) if self.provider.waiting() == 0 && (known || light) => permit,
                _ => {
                    offer.decline().await;
                    continue;
                }
            };
            match offer.accept().await {
                Ok(job) => {
                    let worker = self.clone();
                    tokio::spawn(async move {
                        worker.run_job(job).await;
                        drop(permit);
                    });
                }
                Err(error) => tracing::warn!(%error, "cannot take an offered job; its requester queues it"),
            }
        }
    }

    async fn run_job(&self, received: moltbot_queue::ReceivedJob) {
        let Some(request) = received.job.request.clone() else {
            return;
        };
        if let Some(key) = moltbot_queue::affinity::conversation_key(&request) {
            self.jobs.ran(key);
        }
        self.jobs.running.fetch_add(1, Ordering::Relaxed);
        let cancelled = if received.cancelled.is_cancelled() {
            tracing::info!(request_id = %request.request_id, "dropping a job cancelled while it waited in the queue");
            self.jobs.cancelled_in_queue.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            self.generate(request, &received).await
        };
        if cancelled {
            self.jobs.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        self.jobs.completed.fetch_add(1, Ordering::Relaxed);
        self.jobs.running.fetch_sub(1, Ordering::Relaxed);
    }

    /// Generates `request` and publishes its events; returns whether a cancel stopped it.
    async fn generate(
        &self,
        request: moltbot_proto::inference::v1::GenerateRequest,
        received: &moltbot_queue::ReceivedJob,
    ) -> bool {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let driver = drive(self.clone(), request, received.job.deadline_ms, received.cancelled.clone(), tx);
        let forward = async {
            while let Some(event) = rx.recv().await {
                if let Err(e) = received.publish(event).await {
                    tracing::warn!(error = %e, "cannot publish an event; cancelling the job");
                    received.cancelled.cancel();
                    break;
                }
            }
        };
        let (cancelled, ()) = tokio::join!(driver, forward);
        cancelled
    }
}

/// The engine's figures as metrics, read at each scrape (its step loop only bumps atomics).
fn engine_metrics(
    metrics: &'static moltbot_telemetry::metrics::Metrics,
    engine: Engine,
) -> moltbot_telemetry::metrics::Collecting {
    metrics.on_scrape(move || {
        let s = engine.stats();
        let model = engine.name().to_owned();
        let gauge =
            |name: &'static str, value: usize| metrics::gauge!(name, "model" => model.clone()).set(value as f64);
        gauge("moltbot_engine_running_sequences", s.running);
        gauge("moltbot_engine_waiting_sequences", s.waiting);
        for (state, blocks) in [
            ("used", s.kv_blocks_total - s.kv_blocks_free),
            ("free", s.kv_blocks_free.saturating_sub(s.kv_blocks_cached)),
            ("cached", s.kv_blocks_cached),
        ] {
            metrics::gauge!("moltbot_engine_kv_blocks", "model" => model.clone(), "state" => state).set(blocks as f64);
        }
        let counter =
            |name: &'static str, value: u64| metrics::counter!(name, "model" => model.clone()).absolute(value);
        counter("moltbot_engine_preemptions_total", s.preemptions);
        counter("moltbot_engine_steps_total", s.steps);
        counter("moltbot_engine_step_sequences_total", s.step_sequences);
        counter("moltbot_engine_step_tokens_total", s.step_tokens);
        for (result, tokens) in
            [("hit", s.prefix_hit_tokens), ("miss", s.prefix_lookup_tokens.saturating_sub(s.prefix_hit_tokens))]
        {
            metrics::counter!("moltbot_engine_prefix_cache_tokens_total", "model" => model.clone(), "result" => result)
                .absolute(tokens);
        }
    })
}

/// Serves the worker: the gRPC service on `listener` and the queue consumer, until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    worker: Worker,
    queue: JobQueue,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let engine = worker.provider.engine().cloned();
    let _engine_metrics =
        moltbot_telemetry::metrics::installed().zip(engine).map(|(metrics, engine)| engine_metrics(metrics, engine));
    let consumer = tokio::spawn(worker.clone().consume(queue, stop.clone()));
    let worker_credential = worker.credential.clone();
    let service = moltbot_proto::inference::v1::inference_server::InferenceServer::new(InferenceService::new(worker));
    let grpc = moltbot_proto::server::serve(listener, service, worker_credential, {
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });
    let served = grpc.await;
    stop.cancel();
    consumer.await??;
    Ok(served?)
}

/// An inference worker as its own process (the `moltbot-inference-worker` binary, `moltbot run
/// inference-worker`): telemetry, its metrics port, the model, NATS, gRPC until SIGTERM.
pub async fn serve(config: &moltbot_config::Config) -> anyhow::Result<()> {
    config.internal.guard(config.inference_worker.listen, "inference_worker.listen")?;
    let (service, metrics) = ("moltbot-inference-worker", config.inference_worker.metrics_listen);
    let _tracing = moltbot_telemetry::start(config, service, metrics, "inference_worker.metrics_listen").await?;
    let mut worker = Worker::load(&config.model_provider, &config.inference_worker)?;
    worker.credential = moltbot_proto::Credential::new(&config.internal.service_token);
    let queue = JobQueue::nats(&config.queue).await?;
    let listener = moltbot_telemetry::bind(config.inference_worker.listen, "inference_worker.listen").await?;
    run(listener, worker, queue, moltbot_telemetry::shutdown_signal()).await
}
