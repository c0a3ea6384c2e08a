//! `moltbot bench`: tokens per second of the engine alone and, with `--url`, of streaming chats through a
//! running gateway. `cargo xtask bench` runs it in release mode.

use std::{path::PathBuf, time::Instant};

use moltbot_engine::{Engine, EngineConfig, GenerationEvent, GenerationRequest, Prompt, SamplingParams};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model; the default model when unset.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens to generate per sequence.
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// Concurrent sequences / chats.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Also stream `concurrency` chats through the gateway at this URL (e.g. http://127.0.0.1:8000).
    #[arg(long)]
    url: Option<String>,
    /// Skip the engine measurements.
    #[arg(long)]
    http_only: bool,
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, repetition_penalty: 1.0, max_tokens, ..Default::default() }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if !args.http_only {
        engine(&args).await?;
    }
    if let Some(url) = &args.url {
        http(url, &args).await?;
    }
    Ok(())
}

async fn engine(args: &Args) -> anyhow::Result<()> {
    let model_path = args.model.clone().unwrap_or_else(moltbot_config::default_model_path);
    let engine =
        Engine::load(EngineConfig { max_batch_size: args.concurrency.max(16), ..EngineConfig::new(model_path) })?;
    engine.submit(GenerationRequest { prompt: Prompt::Text("Hi".into()), sampling: greedy(2) })?.collect().await?;

    // Prompt processing: time to the first token of a prompt of exactly n tokens.
    let words = "the quick brown fox jumps over the lazy dog while a bird sings ".repeat(80);
    let ids = engine.tokenizer().encode(&words)?;
    for n in [64, 512] {
        let prompt = engine.tokenizer().decode(&ids[..n], false)?;
        let start = Instant::now();
        let mut g = engine.submit(GenerationRequest { prompt: Prompt::Text(prompt), sampling: greedy(1) })?;
        let prompt_tokens = g.prompt_tokens;
        while let Some(event) = g.next().await {
            if matches!(event, GenerationEvent::Finished { .. } | GenerationEvent::Failed(_)) {
                break;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "engine prompt processing, {prompt_tokens} tokens: {secs:.3} s = {:.1} tok/s",
            f64::from(prompt_tokens) / secs
        );
    }

    // Decode: n sequences together, short prompts, `tokens` each; time from the first token to the last.
    for n in [1, 4, args.concurrency] {
        let runs: Vec<_> = (0..n)
            .map(|i| {
                let r = GenerationRequest {
                    prompt: Prompt::Text(format!("Story number {i}:")),
                    sampling: greedy(args.tokens),
                };
                engine.submit(r)
            })
            .collect::<Result<_, _>>()?;
        let start = Instant::now();
        let mut first = None;
        let mut tokens = 0u32;
        for mut g in runs {
            while let Some(event) = g.next().await {
                match event {
                    GenerationEvent::Token { id: Some(_), .. } => {
                        first.get_or_insert_with(Instant::now);
                        tokens += 1;
                    }
                    GenerationEvent::Finished { .. } | GenerationEvent::Failed(_) => break,
                    GenerationEvent::Token { .. } => {}
                }
            }
        }
        let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64()).max(1e-9);
        let ttft = first.map_or(0.0, |f| (f - start).as_secs_f64());
        println!(
            "engine decode, {n} sequences: {tokens} tokens, {:.1} tok/s aggregate; first token after {ttft:.3} s",
            f64::from(tokens.saturating_sub(n as u32)) / secs
        );
    }
    ttft_under_load(&engine, &ids[..64], args).await?;
    let stats = engine.stats();
    println!(
        "peak RSS: {} MiB (KV cache: {} blocks of {} positions, {} preemptions)",
        peak_rss_mib(),
        stats.kv_blocks_total,
        moltbot_engine::model::BLOCK_SIZE,
        stats.preemptions
    );
    Ok(())
}

/// Time to the first token of a `prompt` submitted while `concurrency - 1` sequences are decoding, so it
/// joins a running batch (chunked prefill beside decode) instead of waiting for a place.
async fn ttft_under_load(engine: &Engine, prompt: &[u32], args: &Args) -> anyhow::Result<()> {
    let busy = args.concurrency.saturating_sub(1).max(1);
    let mut load: Vec<_> = (0..busy)
        .map(|i| {
            let r = GenerationRequest { prompt: Prompt::Text(format!("Tale {i}:")), sampling: greedy(args.tokens * 4) };
            engine.submit(r)
        })
        .collect::<Result<_, _>>()?;
    for g in &mut load {
        g.next().await;
    }
    let prompt = engine.tokenizer().decode(prompt, false)?;
    let start = Instant::now();
    let mut g = engine.submit(GenerationRequest { prompt: Prompt::Text(prompt), sampling: greedy(1) })?;
    let prompt_tokens = g.prompt_tokens;
    g.next().await;
    let ttft = start.elapsed().as_secs_f64();
    println!(
        "engine time to first token under load, {prompt_tokens}-token prompt beside {busy} decoding sequences: {ttft:.3} s"
    );
    Ok(())
}

/// The process's peak resident memory (Linux), 0 elsewhere.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok()))
        })
        .flatten()
        .map_or(0, |kb| kb / 1024)
}

async fn http(url: &str, args: &Args) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let start = Instant::now();
    let chats = (0..args.concurrency).map(|i| {
        let client = client.clone();
        let body = serde_json::json!({
            "messages": [{ "role": "user", "content": format!("Tell me a story about the number {i}.") }],
            "max_tokens": args.tokens, "temperature": 0, "stream": true, "stream_options": { "include_usage": true },
        });
        let url = format!("{url}/v1/chat/completions");
        async move {
            let sent = Instant::now();
            let mut response = client.post(url).json(&body).send().await?.error_for_status()?;
            let (mut ttft, mut tokens, mut buffer) = (None, 0u64, String::new());
            while let Some(chunk) = response.chunk().await? {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let event: String = buffer.drain(..end + 2).collect();
                    let Some(data) = event.strip_prefix("data: ") else { continue };
                    let Ok(value) = serde_json::from_str::<serde_json::Value>(data.trim()) else { continue };
                    if value["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                        ttft.get_or_insert_with(|| sent.elapsed());
                    }
                    if let Some(n) = value["usage"]["completion_tokens"].as_u64() {
                        tokens = n;
                    }
                }
            }
            anyhow::Ok((ttft.unwrap_or_else(|| sent.elapsed()), tokens))
        }
    });
    let results = futures::future::join_all(chats).await.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let secs = start.elapsed().as_secs_f64();
    let tokens: u64 = results.iter().map(|r| r.1).sum();
    let mut ttfts: Vec<f64> = results.iter().map(|r| r.0.as_secs_f64()).collect();
    ttfts.sort_by(f64::total_cmp);
    let pick = |q: f64| ttfts[((ttfts.len() - 1) as f64 * q).round() as usize];
    println!(
        "http streaming, {} concurrent chats: {tokens} tokens in {secs:.3} s = {:.1} tok/s aggregate; time to first token p50 {:.3} s, p99 {:.3} s",
        args.concurrency,
        tokens as f64 / secs,
        pick(0.5),
        pick(0.99)
    );
    Ok(())
}
