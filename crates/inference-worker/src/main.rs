//! The inference-worker binary: parse config → load the model → connect to NATS → serve until SIGTERM.

use std::path::PathBuf;

use clap::Parser;

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
    moltbot_inference_worker::serve(&config).await
}
