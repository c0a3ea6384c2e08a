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

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, installing the recorder on first use. Until then, recording costs nothing and goes
/// nowhere (a library used without a metrics port records nothing).
pub fn install() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_per_output_token_seconds".into()), TOKEN_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_tokens".into()), TOKEN_COUNT_BUCKETS))
            .expect("bucket lists are not empty");
        let handle = match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder was installed first (only an embedding program can do that): render a private one.
            Err(e) => {
                tracing::warn!("metrics: {e}; /metrics shows only what MoltBot keeps itself");
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
                let body = tokio::task::spawn_blocking(|| install().render()).await.unwrap_or_default();
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
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

/// Help texts and units, once: what an operator reads beside each series.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("moltbot_http_requests_total", "HTTP requests answered, by method, route and status");
    describe_histogram!(
        "moltbot_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency until the response head (a stream's end is in moltbot_chat_duration_seconds)"
    );
    describe_counter!(
        "moltbot_http_refusals_total",
        "HTTP requests refused before any work, by reason (rate_limit, busy, user_busy)"
    );
    describe_histogram!("moltbot_chat_duration_seconds", Unit::Seconds, "Chat turns end to end at the gateway");
    describe_counter!("moltbot_response_cache_total", "Response-cache look-ups, by result (hit, miss)");
    describe_counter!("moltbot_grpc_requests_total", "gRPC calls answered, by service, method and code");
    describe_histogram!("moltbot_grpc_request_duration_seconds", Unit::Seconds, "gRPC call latency");
    describe_counter!(
        "moltbot_model_calls_total",
        "Generation jobs run by a worker, by model and outcome (success; cancelled; invalid_request; overloaded, \
         deadline_exceeded and error are failures)"
    );
    describe_histogram!("moltbot_model_call_duration_seconds", Unit::Seconds, "Generation jobs end to end");
    describe_histogram!(
        "moltbot_time_to_first_token_seconds",
        Unit::Seconds,
        "From a worker taking a job to its first token"
    );
    describe_histogram!(
        "moltbot_time_per_output_token_seconds",
        Unit::Seconds,
        "Mean time between a job's output tokens, one sample per job"
    );
    describe_counter!("moltbot_prompt_tokens_total", "Prompt tokens of finished jobs");
    describe_counter!("moltbot_generation_tokens_total", "Tokens generated by finished jobs");
    describe_histogram!("moltbot_request_prompt_tokens", "Prompt tokens per job");
    describe_histogram!("moltbot_request_generation_tokens", "Generated tokens per job");
    describe_gauge!("moltbot_engine_running_sequences", "Sequences in the engine's batch");
    describe_gauge!("moltbot_engine_waiting_sequences", "Sequences waiting for a place in the engine's batch");
    describe_gauge!("moltbot_engine_kv_blocks", "KV-cache blocks, by state (used, free, cached: free with a prefix)");
    describe_counter!("moltbot_engine_preemptions_total", "Sequences evicted from the batch when the KV cache ran out");
    describe_counter!("moltbot_engine_steps_total", "Forward passes of the engine's batch");
    describe_counter!("moltbot_engine_step_sequences_total", "Sequences over all steps (divide by steps: batch size)");
    describe_counter!("moltbot_engine_step_tokens_total", "Tokens over all steps (divide by steps: tokens per step)");
    describe_counter!(
        "moltbot_engine_prefix_cache_tokens_total",
        "Prompt tokens looked up in the prefix cache, by result"
    );
    describe_gauge!(
        "moltbot_process_memory_limit_bytes",
        Unit::Bytes,
        "Memory this process may use (cgroup or machine)"
    );
    describe_gauge!("moltbot_process_cpu_limit_cores", "CPU cores this process may use (cgroup quota or machine)");
}

/// Binds `addr` and serves the metrics there in the background for the life of the process; `key` is the
/// configuration key to name when the address cannot be bound.
pub async fn listen(addr: std::net::SocketAddr, key: &str) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} for metrics: {e} (set {key})")))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, std::future::pending()).await {
            tracing::error!("the metrics server stopped: {e}");
        }
    });
    Ok(bound)
}
