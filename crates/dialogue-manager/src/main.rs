//! The dialogue-manager binary: parse config → connect the session-store and NATS → serve until SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use moltbot_queue::JobQueue;

#[derive(Parser)]
#[command(version, about = "MoltBot dialogue-manager service (gRPC)")]
struct Args {
    /// YAML configuration file (see config/config.example.yaml).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = moltbot_config::Config::load(args.config.as_deref())?;
    let _tracing = moltbot_telemetry::init(&config.log, &config.telemetry, "moltbot-dialogue-manager")
        .map_err(anyhow::Error::msg)?;
    moltbot_telemetry::metrics::listen(
        &config.telemetry,
        config.dialogue_manager.metrics_listen,
        "dialogue_manager.metrics_listen",
    )
    .await?;
    let sessions = moltbot_dialogue_manager::connect_session_store(&config.dialogue_manager.session_store_url).await?;
    let queue = JobQueue::nats(&config.queue.nats_url, config.queue.max_pending_jobs).await?;
    let plugins = moltbot_plugin::Plugins::load(&config.plugins).await?;
    let service = moltbot_dialogue_manager::DialogueService::new(&config, sessions, queue).with_plugins(plugins);
    let listen = config.dialogue_manager.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e} (set dialogue_manager.listen)"))?;
    moltbot_dialogue_manager::run(listener, service, moltbot_telemetry::shutdown_signal()).await
}
