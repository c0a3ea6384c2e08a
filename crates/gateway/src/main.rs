//! The gateway binary: parse config → connect (lazily) to the dialogue-manager → serve HTTP until SIGTERM.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "MoltBot gateway (HTTP, OpenAI-compatible)")]
struct Args {
    /// YAML configuration file (see config/config.example.yaml).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = moltbot_config::Config::load(args.config.as_deref())?;
    let _tracing =
        moltbot_telemetry::init(&config.log, &config.telemetry, "moltbot-gateway").map_err(anyhow::Error::msg)?;
    moltbot_telemetry::metrics::listen(&config.telemetry, config.gateway.metrics_listen, "gateway.metrics_listen")
        .await?;
    let dialogue = moltbot_gateway::dialogue_client(&config.gateway.dialogue_manager_url)?;
    let listen = config.gateway.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e} (set gateway.listen)"))?;
    moltbot_gateway::run(listener, &config.gateway, dialogue, moltbot_telemetry::shutdown_signal()).await
}
