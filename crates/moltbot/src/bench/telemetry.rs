//! `bench telemetry`: what metrics and traces cost a chat. `moltbot serve` runs three ways in turn (metrics off;
//! metrics on, scraped every second; metrics and traces, sent to an OTLP collector in this process), each driven
//! with the streaming chats of `bench http`; the medians of `repeat` rounds, and their ratios to "off".

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

/// Counts the spans it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize =
            request.into_inner().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.0.fetch_add(spans as u64, Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

const MODES: [&str; 3] = ["off", "metrics", "metrics+traces"];

pub async fn run(concurrency: usize, tokens: u32, repeat: usize) -> anyhow::Result<()> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // (mode, concurrency) → (tokens/s, time-to-first-token p99) of each round.
    let mut figures: std::collections::BTreeMap<(usize, usize), Vec<(f64, f64)>> = Default::default();
    for _ in 0..repeat.max(1) {
        for (m, mode) in MODES.iter().enumerate() {
            let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let mut env = vec![("MOLTBOT_GATEWAY__METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))];
            match *mode {
                "off" => env.push(("MOLTBOT_TELEMETRY__METRICS", "false".into())),
                "metrics+traces" => env.push(("MOLTBOT_TELEMETRY__OTLP_ENDPOINT", otlp.clone())),
                _ => {}
            }
            let (server, base) = crate::soak::serve(&env).await?;
            // Prometheus scrapes every 15 s by default; every second is the harder case.
            let scraper = (*mode != "off").then(|| {
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    loop {
                        let _ = client.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().await;
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                })
            });
            for run in super::http_runs(&base, concurrency, tokens).await? {
                figures.entry((m, run.concurrency)).or_default().push((run.tokens as f64 / run.secs, run.ttft_p99));
            }
            if let Some(scraper) = scraper {
                scraper.abort();
            }
            server.stop();
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("telemetry overhead: medians of {} rounds, each mode in turn", repeat.max(1));
    for c in [1, concurrency] {
        let of = |m: usize| {
            let runs = figures.get(&(m, c)).cloned().unwrap_or_default();
            (median(runs.iter().map(|r| r.0).collect()), median(runs.iter().map(|r| r.1).collect()))
        };
        let (base_rate, base_p99) = of(0);
        for (m, mode) in MODES.iter().enumerate() {
            let (rate, p99) = of(m);
            println!(
                "{mode:>15}, {c:>2} concurrent chat(s): {rate:.1} tok/s ({:.3}x), time to first token p99 {p99:.3} s ({:.2}x)",
                rate / base_rate,
                p99 / base_p99
            );
        }
    }
    println!("spans received by the collector: {}", collector.0.load(Relaxed));
    Ok(())
}
