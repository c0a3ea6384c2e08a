//! Prometheus metrics. Every service records through the `metrics` facade into one recorder per process, and each
//! service's metrics port renders it at `GET /metrics` (Prometheus text format 0.0.4). `moltbot serve` runs every
//! service in one process, so its one port (`gateway.metrics_listen`, 8001) shows them all.
//!
//! Recording is a handle look-up and an atomic add. Figures that other parts keep as atomics (the engine's
//! queue and KV cache, the process's CPU and memory) are read when a scrape asks ([`Metrics::on_scrape`]), so
//! nothing on a hot path waits for a scrape.

use std::{
    future::Future,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Seconds: from a millisecond to two minutes (request and call latencies).
const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Seconds per output token: from a millisecond to a second.
const TOKEN_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0];
/// Token counts per request.
const TOKEN_COUNT_BUCKETS: &[f64] = &[1.0, 8.0, 32.0, 128.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0];

type Collector = Arc<dyn Fn() + Send + Sync>;

/// The process's recorder and what it reads at each scrape.
pub struct Metrics {
    handle: PrometheusHandle,
    collectors: Mutex<Vec<(u64, Collector)>>,
    process: metrics_process::Collector,
}

static INSTALLED: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, if a metrics port installed the recorder ([`listen`]); until then recording costs
/// nothing and goes nowhere (a library used without a metrics port, as in tests, records nothing).
pub fn installed() -> Option<&'static Metrics> {
    INSTALLED.get()
}

/// Calls `sample` every `period` until `stop`, while this process's metrics port is up: for gauges that cost a call
/// to read (a queue's depth, a store's count), kept off the request path.
pub async fn sample_every<F, Fut>(period: std::time::Duration, stop: tokio_util::sync::CancellationToken, mut sample: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut every = tokio::time::interval(period);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        if installed().is_some() {
            sample().await;
        }
    }
}

/// The process's metrics, installing the recorder on first use.
pub fn install() -> &'static Metrics {
    INSTALLED.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_per_output_token_seconds".into()), TOKEN_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_tokens".into()), TOKEN_COUNT_BUCKETS))
            .expect("bucket lists are not empty");
        let handle = match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder was installed first (only an embedding program can do that): render a private one.
            Err(e) => {
                tracing::warn!("metrics: {e}; MoltBot's metrics go to that recorder, and /metrics shows none");
                PrometheusBuilder::new().build_recorder().handle()
            }
        };
        // Histograms keep their samples until a scrape drains them; without scrapes, upkeep bounds them.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        });
        let process = metrics_process::Collector::new("moltbot_");
        process.describe();
        describe();
        Metrics { handle, collectors: Mutex::default(), process }
    })
}

impl Metrics {
    /// Runs `collect` before every scrape, until the returned guard is dropped: it sets gauges (or absolute
    /// counters) from figures kept elsewhere.
    #[must_use = "collecting stops when the guard is dropped"]
    pub fn on_scrape(&'static self, collect: impl Fn() + Send + Sync + 'static) -> Collecting {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.collectors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((id, Arc::new(collect)));
        Collecting { metrics: self, id }
    }

    /// The exposition: every collector run, then everything recorded.
    pub fn render(&self) -> String {
        let collectors = self.collectors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for (_, collect) in collectors {
            collect();
        }
        self.process.collect();
        let (memory_limit, cpu_limit) = limits();
        metrics::gauge!("moltbot_process_memory_limit_bytes").set(memory_limit as f64);
        metrics::gauge!("moltbot_process_cpu_limit_cores").set(cpu_limit);
        self.handle.render()
    }
}

/// A collector's registration; dropping it stops the collector (and frees what it holds).
pub struct Collecting {
    metrics: &'static Metrics,
    id: u64,
}

impl Drop for Collecting {
    fn drop(&mut self) {
        let mut collectors = self.metrics.collectors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        collectors.retain(|(id, _)| *id != self.id);
    }
}

/// Serves `GET /metrics` (and `GET /health`) on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    install();
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|| async {
                // Rendering walks every series: off the async workers.
                match tokio::task::spawn_blocking(|| install().render()).await {
                    Ok(body) => (
                        axum::http::StatusCode::OK,
                        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        body,
                    ),
                    // A failed collector must not pass for an empty, healthy scrape.
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!("the metrics could not be rendered: {e}"),
                    ),
                }
            }),
        )
        .route("/health", axum::routing::get(|| async { "ok" }));
    tracing::info!(%addr, "metrics listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// The memory and CPU this process may use: the cgroup's limits (a container's), else the machine's.
fn limits() -> (u64, f64) {
    static LIMITS: OnceLock<(u64, f64)> = OnceLock::new();
    *LIMITS.get_or_init(|| {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let memory = read("/sys/fs/cgroup/memory.max")
            .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            // cgroup v1 writes "no limit" as a number near 2^63.
            .filter(|&v| v < 1 << 60)
            .or_else(|| {
                let meminfo = read("/proc/meminfo")?;
                let kib = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
                Some(kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
            })
            .unwrap_or(0);
        let quota = read("/sys/fs/cgroup/cpu.max").and_then(|v| {
            let (quota, period) = v.trim().split_once(' ')?;
            Some(quota.parse::<f64>().ok()? / period.parse::<f64>().ok()?)
        });
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) as f64;
        (memory, quota.map_or(cores, |q| q.min(cores)))
    })
}

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric MoltBot's services record: name, kind, whether it counts seconds or bytes, and the help text an
/// operator reads beside it. Dashboards and alert rules may name only these (tested), plus the process figures
/// in [`PROCESS`].
pub const METRICS: &[(&str, Kind, Option<metrics::Unit>, &str)] = {
    use Kind::{Counter, Gauge, Histogram};
    use metrics::Unit::{Bytes, Seconds};
    &[
        ("moltbot_http_requests_total", Counter, None, "HTTP requests answered, by method, route and status"),
        (
            "moltbot_http_request_duration_seconds",
            Histogram,
            Some(Seconds),
            "HTTP request latency until the response head (a stream's end is in moltbot_chat_duration_seconds)",
        ),
        (
            "moltbot_http_refusals_total",
            Counter,
            None,
            "HTTP requests refused before any work, by reason (rate_limit, busy, user_busy)",
        ),
        (
            "moltbot_chat_duration_seconds",
            Histogram,
            Some(Seconds),
            "Chat turns end to end at the gateway, by outcome (completed; abandoned: the client went away \
             mid-answer; refused; timeout; error)",
        ),
        ("moltbot_response_cache_total", Counter, None, "Response-cache look-ups, by result (hit, miss)"),
        ("moltbot_grpc_requests_total", Counter, None, "gRPC calls answered, by service, method and code"),
        (
            "moltbot_queue_pending_jobs",
            Gauge,
            None,
            "Generation jobs queued and not yet taken by a worker (NATS: the job stream's messages), seen by a dialogue-manager",
        ),
        (
            "moltbot_turn_refusals_total",
            Counter,
            None,
            "Chat turns a dialogue-manager refused because too many waited for a worker",
        ),
        (
            "moltbot_model_requests_total",
            Counter,
            None,
            "Model calls of chat turns, by model and outcome as the dialogue-manager saw them (success; cancelled; \
             invalid_request; the rest are failures: queue_full, queue_unavailable, no_worker, worker_lost, \
             overloaded, deadline_exceeded, error)",
        ),
        (
            "moltbot_queue_wait_seconds",
            Histogram,
            Some(Seconds),
            "From a dialogue-manager queueing a job to a worker's first event on it (or to the turn giving up on \
             it: its deadline, its client gone)",
        ),
        ("moltbot_sessions_created_total", Counter, None, "Sessions created in the session store"),
        (
            "moltbot_sessions_active",
            Gauge,
            None,
            "Sessions created, given a turn or changed in the last 5 minutes (the whole store's count, every 10 s)",
        ),
        (
            "moltbot_grpc_request_duration_seconds",
            Histogram,
            Some(Seconds),
            "gRPC call latency until the response head",
        ),
        (
            "moltbot_model_calls_total",
            Counter,
            None,
            "Generation jobs run by a worker, by model and outcome (success; cancelled; invalid_request; overloaded, \
             deadline_exceeded and error are failures)",
        ),
        ("moltbot_model_call_duration_seconds", Histogram, Some(Seconds), "Generation jobs end to end"),
        (
            "moltbot_time_to_first_token_seconds",
            Histogram,
            Some(Seconds),
            "From a worker taking a job to its first token",
        ),
        (
            "moltbot_time_per_output_token_seconds",
            Histogram,
            Some(Seconds),
            "Mean time between a job's output tokens, one sample per job",
        ),
        ("moltbot_prompt_tokens_total", Counter, None, "Prompt tokens of finished jobs"),
        ("moltbot_generation_tokens_total", Counter, None, "Tokens generated by finished jobs"),
        ("moltbot_request_prompt_tokens", Histogram, None, "Prompt tokens per job"),
        ("moltbot_request_generation_tokens", Histogram, None, "Generated tokens per job"),
        ("moltbot_engine_running_sequences", Gauge, None, "Sequences in the engine's batch"),
        ("moltbot_engine_waiting_sequences", Gauge, None, "Sequences waiting for a place in the engine's batch"),
        (
            "moltbot_engine_kv_blocks",
            Gauge,
            None,
            "KV-cache blocks, by state (used; free; cached: free to take, holding a prefix until then)",
        ),
        (
            "moltbot_engine_preemptions_total",
            Counter,
            None,
            "Sequences evicted from the batch when the KV cache ran out",
        ),
        ("moltbot_engine_steps_total", Counter, None, "Forward passes of the engine's batch"),
        (
            "moltbot_engine_step_sequences_total",
            Counter,
            None,
            "Sequences over all steps (divided by steps: the mean batch size)",
        ),
        (
            "moltbot_engine_step_tokens_total",
            Counter,
            None,
            "Tokens over all steps (divided by steps: the mean tokens per step)",
        ),
        (
            "moltbot_engine_prefix_cache_tokens_total",
            Counter,
            None,
            "Prompt tokens looked up in the prefix cache, by result (hit, miss)",
        ),
        (
            "moltbot_process_memory_limit_bytes",
            Gauge,
            Some(Bytes),
            "Memory this process may use (its cgroup's limit, else the machine's)",
        ),
        (
            "moltbot_process_cpu_limit_cores",
            Gauge,
            None,
            "CPU cores this process may use (its cgroup's quota, else the machine's)",
        ),
    ]
};

/// The process figures (`metrics-process`, with MoltBot's prefix).
pub const PROCESS: &[&str] = &[
    "moltbot_process_cpu_seconds_total",
    "moltbot_process_resident_memory_bytes",
    "moltbot_process_virtual_memory_bytes",
    "moltbot_process_open_fds",
    "moltbot_process_max_fds",
    "moltbot_process_threads",
    "moltbot_process_start_time_seconds",
];

/// Help texts and units, once: what an operator reads beside each series.
fn describe() {
    for &(name, kind, unit, help) in METRICS {
        match (kind, unit) {
            (Kind::Counter, Some(unit)) => metrics::describe_counter!(name, unit, help),
            (Kind::Counter, None) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(unit)) => metrics::describe_gauge!(name, unit, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(unit)) => metrics::describe_histogram!(name, unit, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
    }
}

/// Binds `addr` and serves the metrics there in the background for the life of the process, when
/// `telemetry.metrics` is on; `key` is the configuration key to name when the address cannot be bound.
pub async fn listen(
    config: &moltbot_config::TelemetryConfig,
    addr: std::net::SocketAddr,
    key: &str,
) -> std::io::Result<Option<std::net::SocketAddr>> {
    if !config.metrics {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} for metrics: {e} (set {key})")))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, std::future::pending()).await {
            tracing::error!("the metrics server stopped: {e}");
        }
    });
    Ok(Some(bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(path: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(path)
    }

    /// The metric names a text refers to (`moltbot_…`), a histogram's series (`_bucket`, `_count`, `_sum`) by its
    /// own name.
    fn names_in(text: &str) -> Vec<String> {
        let histograms: Vec<&str> = METRICS.iter().filter(|m| m.1 == Kind::Histogram).map(|m| m.0).collect();
        text.match_indices("moltbot_")
            .map(|(at, _)| {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|base| histograms.contains(base)))
                    .map_or(name.clone(), str::to_owned)
            })
            .collect()
    }

    fn known(name: &str) -> bool {
        METRICS.iter().any(|m| m.0 == name) || PROCESS.contains(&name)
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for &(name, kind, unit, help) in METRICS {
            assert!(name.starts_with("moltbot_") && !help.is_empty(), "{name}");
            assert_eq!(kind == Kind::Counter, name.ends_with("_total"), "{name}: only counters end in _total");
            if unit == Some(metrics::Unit::Seconds) {
                assert!(name.ends_with("_seconds"), "{name}");
            }
            if unit == Some(metrics::Unit::Bytes) {
                assert!(name.ends_with("_bytes"), "{name}");
            }
        }
    }

    #[test]
    fn the_dashboard_queries_only_metrics_the_services_export() {
        let text = std::fs::read_to_string(deploy("grafana/moltbot.json")).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
        let panels = dashboard["panels"].as_array().unwrap();
        assert!(panels.len() >= 10, "a panel for each thing an operator watches");
        let mut ids = std::collections::HashSet::new();
        for panel in panels {
            assert!(ids.insert(panel["id"].as_u64().unwrap()), "panel ids are unique");
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{}", panel["title"]);
            for target in targets {
                let expr = target["expr"].as_str().unwrap();
                let names = names_in(expr);
                assert!(!names.is_empty(), "{expr}");
                for name in names {
                    assert!(known(&name), "panel {}: {name} is not a metric MoltBot exports", panel["title"]);
                }
            }
        }
        // The four thresholds operators are told to watch each have a panel.
        for needle in
            ["moltbot_http_request_duration_seconds_bucket", "moltbot_model_requests_total", "cpu_seconds", "resident"]
        {
            assert!(text.contains(needle), "{needle}");
        }
    }

    #[test]
    fn prometheus_config_and_alert_rules_pass_promtool() {
        let rules = std::fs::read_to_string(deploy("prometheus/alerts.yaml")).unwrap();
        for name in names_in(&rules) {
            assert!(known(&name), "alerts.yaml: {name} is not a metric MoltBot exports");
        }
        for args in [
            &["check", "config", "prometheus.yaml"][..],
            &["check", "rules", "alerts.yaml"],
            // Every alert fires for series that break its threshold and stays quiet for healthy ones.
            &["test", "rules", "alerts_test.yaml"],
        ] {
            let out = std::process::Command::new("promtool")
                .args(args)
                .current_dir(deploy("prometheus"))
                .output()
                .expect("promtool (Debian's prometheus package: apt-get install -y prometheus)");
            assert!(
                out.status.success(),
                "promtool {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
