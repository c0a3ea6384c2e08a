//! The dialogue-manager binary: parse config → connect the session-store and NATS → serve until SIGTERM.

use std::path::PathBuf;

use clap::Parser;

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
    moltbot_dialogue_manager::serve(&config).await
}
