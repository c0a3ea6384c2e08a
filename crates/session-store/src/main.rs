//! The session-store binary: parse config → open the backend → serve until SIGTERM.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "MoltBot session-store service (gRPC)")]
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
        moltbot_telemetry::init(&config.log, &config.telemetry, "moltbot-session-store").map_err(anyhow::Error::msg)?;
    moltbot_telemetry::metrics::listen(
        &config.telemetry,
        config.session_store.metrics_listen,
        "session_store.metrics_listen",
    )
    .await?;
    let backend = moltbot_session_store::open_backend(&config.session_store).await?;
    let listener = tokio::net::TcpListener::bind(config.session_store.listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {}: {e} (set session_store.listen)", config.session_store.listen)
    })?;
    moltbot_session_store::run(listener, backend, moltbot_telemetry::shutdown_signal()).await
}
