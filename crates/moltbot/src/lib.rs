//! The embedded shape: every MoltBot service in one process, with the same service code as the distributed
//! shape, an in-process queue instead of NATS, and (by default) the embedded durable session store instead
//! of Redis. Internal gRPC servers listen on ephemeral loopback ports.

pub mod bench;
pub mod chat;
pub mod soak;
pub mod sse;

use std::net::SocketAddr;

use moltbot_config::Config;
use moltbot_queue::JobQueue;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running embedded MoltBot.
pub struct Embedded {
    pub gateway_addr: SocketAddr,
    /// The in-process dialogue-manager's gRPC address (loopback, ephemeral port).
    pub dialogue_url: String,
    /// Each in-process inference worker's gRPC address: `model_provider`'s, then one per entry of `models`.
    pub worker_urls: Vec<String>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Embedded {
    /// Stops every service gracefully and reports the first failure.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }

    /// Resolves when a service stops on its own (a failure) or after `stop` was asked.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        let (result, _, rest) = futures::future::select_all(self.tasks.drain(..)).await;
        self.tasks = rest;
        result?
    }
}

async fn loopback() -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    Ok((listener, url))
}

/// Starts every service; the gateway listens on `gateway`.
pub async fn start(config: Config, gateway: TcpListener) -> anyhow::Result<Embedded> {
    let shutdown = CancellationToken::new();
    let stopped = |token: &CancellationToken| {
        let token = token.clone();
        async move { token.cancelled().await }
    };
    let mut tasks = vec![];

    let backend = moltbot_session_store::open_backend(&config.session_store).await?;
    let (listener, session_url) = loopback().await?;
    // The deployment's credential, when the configuration sets one (on loopback it needs none).
    let credential = moltbot_proto::Credential::new(&config.internal.service_token);
    tasks.push(tokio::spawn(moltbot_session_store::run(listener, backend, credential.clone(), stopped(&shutdown))));

    // A worker per model: `model_provider`, and each of `models` beside it.
    let queue = JobQueue::local(config.queue.max_pending_jobs);
    let mut worker_urls = vec![];
    for (i, provider) in std::iter::once(&config.model_provider).chain(&config.models).enumerate() {
        let mut worker_config = config.inference_worker.clone();
        if worker_config.worker_id.is_empty() {
            worker_config.worker_id = if i == 0 { "embedded".into() } else { format!("embedded-{i}") };
        } else if i > 0 {
            worker_config.worker_id = format!("{}-{i}", worker_config.worker_id);
        }
        let mut worker = moltbot_inference_worker::Worker::load(provider, &worker_config)?;
        worker.credential = credential.clone();
        // Known to the dialogue-manager before the first request (the worker goes on announcing itself).
        queue.announce(&worker.provider.card(worker.max_tokens), &worker.id).await?;
        let (listener, url) = loopback().await?;
        worker_urls.push(url);
        tasks.push(tokio::spawn(moltbot_inference_worker::run(listener, worker, queue.clone(), stopped(&shutdown))));
    }

    let sessions = moltbot_dialogue_manager::connect_session_store(&session_url, &credential).await?;
    let plugins = moltbot_plugin::Plugins::load(&config.plugins).await?;
    let dialogue = moltbot_dialogue_manager::DialogueService::new(&config, sessions, queue).with_plugins(plugins);
    let (listener, dialogue_url) = loopback().await?;
    tasks.push(tokio::spawn(moltbot_dialogue_manager::run(listener, dialogue, stopped(&shutdown))));

    let gateway_addr = gateway.local_addr()?;
    let client = moltbot_gateway::dialogue_client(&dialogue_url, &credential)?;
    let dm_url = dialogue_url.clone();
    let gateway_config = config.gateway.clone();
    let stop = stopped(&shutdown);
    tasks.push(tokio::spawn(async move { moltbot_gateway::run(gateway, &gateway_config, client, stop).await }));
    Ok(Embedded { gateway_addr, dialogue_url: dm_url, worker_urls, shutdown, tasks })
}
