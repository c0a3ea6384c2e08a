//! Logging set-up, Prometheus metrics, OpenTelemetry traces and the shutdown signal shared by MoltBot's services.

pub mod metrics;
pub mod trace;

use moltbot_config::{LogConfig, TelemetryConfig};
use tracing_subscriber::EnvFilter;

/// The OpenTelemetry crates' log targets (`opentelemetry`, `opentelemetry_sdk`, `opentelemetry-otlp`) all start
/// with this.
const OTEL_TARGET: &str = "opentelemetry";

/// Structured logs to stderr: text or JSON lines; `RUST_LOG` overrides the configured level. Each HTTP request's
/// lines carry its request id (the gateway's `request` span), and its trace id when traces are on.
pub fn init_logging(config: &LogConfig) {
    let _ = init(config, &TelemetryConfig::default(), "moltbot");
}

/// Logs as [`init_logging`], and traces to `telemetry.otlp_endpoint` as `service` when it is set; keep the
/// returned guard for the life of the program (dropping it sends the last spans).
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig, service: &str) -> Result<Option<trace::Tracing>, String> {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    // The OpenTelemetry SDK's own lines: its warnings and errors (a collector that refuses spans) are worth seeing.
    let filter = || {
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(format!("{},{OTEL_TARGET}=warn", log.level)))
    };
    // Colours only for a person at a terminal: a file, a pipe or a log collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    // The log level filters the log lines only: quiet logs must not cost the traces their spans.
    let fmt = if log.json { fmt.json().with_filter(filter()).boxed() } else { fmt.with_filter(filter()).boxed() };
    let registry = tracing_subscriber::registry().with(fmt);
    if telemetry.otlp_endpoint.is_empty() {
        let _ = registry.try_init();
        return Ok(None);
    }
    let (layer, tracing) = trace::layer(&telemetry.otlp_endpoint, service, telemetry.sample_ratio)?;
    // Every info span and event, but the SDK's own (which would feed the exporter its own complaints).
    let spans = tracing_subscriber::filter::Targets::new()
        .with_default(tracing::Level::INFO)
        .with_target(OTEL_TARGET, tracing_subscriber::filter::LevelFilter::OFF);
    let _ = registry.with(layer.with_filter(spans)).try_init();
    tracing::info!(endpoint = %telemetry.otlp_endpoint, service, "traces go to an OTLP collector");
    Ok(Some(tracing))
}

/// A service process's start: its logs and traces as `service` (keep the returned guard for the life of the
/// process), then its metrics port at `metrics_listen` (`key` names that setting in errors).
pub async fn start(
    config: &moltbot_config::Config,
    service: &str,
    metrics_listen: std::net::SocketAddr,
    key: &str,
) -> anyhow::Result<Option<trace::Tracing>> {
    let tracing = init(&config.log, &config.telemetry, service).map_err(anyhow::Error::msg)?;
    metrics::listen(&config.telemetry, metrics_listen, key).await?;
    Ok(tracing)
}

/// Listens on `addr`; a failure names the address, why, and the setting (`key`) that chooses it.
pub async fn bind(addr: std::net::SocketAddr, key: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e} (set {key})"))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received, stopping");
}
