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
    moltbot_gateway::serve(&config).await
}
