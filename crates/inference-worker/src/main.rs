//! The inference-worker binary: parse config → load the model → connect to NATS → serve until SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use moltbot_queue::JobQueue;

#[derive(Parser)]
#[command(version, about = "MoltBot inference worker (gRPC + NATS job queue)")]
struct Args {
    /// YAML configuration file (see config/config.example.yaml).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = moltbot_config::Config::load(args.config.as_deref())?;
    let _tracing = moltbot_telemetry::init(&config.log, &config.telemetry, "moltbot-inference-worker")
        .map_err(anyhow::Error::msg)?;
    moltbot_telemetry::metrics::listen(
        &config.telemetry,
        config.inference_worker.metrics_listen,
        "inference_worker.metrics_listen",
    )
    .await?;
    let engine = moltbot_inference_worker::load_engine(&config)?;
    let worker =
        moltbot_inference_worker::Worker::new(engine, &config.inference_worker, config.model_provider.max_tokens);
    let queue = JobQueue::nats(&config.queue.nats_url, config.queue.max_pending_jobs).await?;
    let listen = config.inference_worker.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e} (set inference_worker.listen)"))?;
    moltbot_inference_worker::run(listener, worker, queue, moltbot_telemetry::shutdown_signal()).await
}
