//! `moltbot bench`: tokens per second of the engine alone and, with `--url`, of streaming chats through a
//! running gateway. `cargo xtask bench` runs it in release mode.

use std::{path::PathBuf, time::Instant};

use moltbot_engine::{DeviceChoice, Engine, EngineConfig, GenerationEvent, GenerationRequest, Prompt, SamplingParams};

mod conversation;
mod kernels;
mod remote;
mod telemetry;

#[derive(clap::Args)]
pub struct Args {
    /// A packaged model's name (`cargo xtask model --list`) or a GGUF file; the default model when unset.
    #[arg(long)]
    model: Option<String>,
    /// Tokens to generate per sequence.
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// Concurrent sequences / chats.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Where the engine runs: `cpu` (its own CPU kernels), `cuda` (the device path on CUDA device 0, --gpu-layers
    /// of its layers; needs the `cuda` build) or `candle-cpu` (the device path on candle's CPU device).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "candle-cpu"])]
    device: String,
    /// With `--device cuda`: the layers on the GPU, the rest on the CPU (all by default).
    #[arg(long, default_value_t = 999)]
    gpu_layers: usize,
    /// Also stream `concurrency` chats through the gateway at this URL (e.g. http://127.0.0.1:8000).
    #[arg(long)]
    url: Option<String>,
    /// Skip the engine measurements.
    #[arg(long)]
    http_only: bool,
    /// With --url: present this API key (`Authorization: Bearer`) on every request, for a gateway with
    /// gateway.auth.api_keys. An https URL's certificate is checked against the system's roots, or SSL_CERT_FILE.
    #[arg(long, env = "BENCH_API_KEY")]
    api_key: Option<String>,
    /// Only time what telemetry costs: `moltbot serve` with metrics off, with metrics on (scraped every second),
    /// and with metrics and traces (to an OTLP collector in this process), `repeat` rounds of each in turn, each
    /// driven as `--url` drives one; medians and ratios to "off".
    #[arg(long)]
    telemetry_overhead: bool,
    /// Only time the quantized matrix kernels, per block format, on a feed-forward layer's shape (no model).
    #[arg(long)]
    kernels: bool,
    /// Runs of each engine measurement, or rounds of the conversations with --conversation and --url; the median
    /// is printed (the machines are shared and noisy).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Also measure SessionStore gRPC operations/s through an in-process session-store on this Redis.
    #[arg(long)]
    sessions_redis: Option<String>,
    /// Start MoltBot in this process and time this many requests through the gateway and straight to the
    /// dialogue-manager (gRPC): what the gateway adds.
    #[arg(long)]
    gateway_overhead: Option<usize>,
    /// Time this many calls of a built-in plugin (calculator) and of a Python plugin process (the weather plugin
    /// in --plugins-dir), in the plugin host and through the gateway's `/api/plugins/{name}/execute`.
    #[arg(long)]
    plugin_calls: Option<usize>,
    /// The plugin directory for --plugin-calls (it must hold the `weather` plugin).
    #[arg(long)]
    plugins_dir: Option<PathBuf>,
    /// Start a MoltBot in front of a remote API (a second MoltBot, and --anchor-url when given) and time this many
    /// one-token chats to the remote directly and through MoltBot: what MoltBot adds.
    #[arg(long)]
    remote_overhead: Option<usize>,
    /// With --url: time this many single-turn and multi-turn turns one after the other and print what the session
    /// (lock, read, save) adds to a turn.
    #[arg(long)]
    mode_overhead: Option<usize>,
    /// Start MoltBot in this process (prefix caching on, then off) and time each turn of a conversation of this
    /// many turns, resending the history and with a server-side session; then `concurrency` users at once behind
    /// one long system prompt. With --url: `concurrency` such conversations at once through that MoltBot.
    #[arg(long)]
    conversation: Option<usize>,
    /// With --conversation or --url: the same conversation (history resent) and users, or the same chats,
    /// against this OpenAI-compatible server, e.g. a llama-server on the same model (`cargo xtask bench
    /// conversation` and `bench http` start one when it is built).
    #[arg(long)]
    anchor_url: Option<String>,
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, repetition_penalty: 1.0, max_tokens, ..Default::default() }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(key) = &args.api_key {
        conversation::API_KEY.set(key.clone()).expect("set once, here");
    }
    if args.kernels {
        return kernels::run(args.repeat);
    }
    if args.telemetry_overhead {
        return telemetry::run(args.concurrency, args.tokens, args.repeat).await;
    }
    if !args.http_only {
        engine(&args).await?;
    }
    if let Some(turns) = args.conversation {
        match &args.url {
            Some(url) => conversation::through(url, turns, args.concurrency, args.repeat).await?,
            None => conversation::run(turns, args.concurrency, args.anchor_url.as_deref()).await?,
        }
    } else if let Some(url) = &args.url {
        answering(url).await?;
        if let Some(turns) = args.mode_overhead {
            mode_overhead(url, turns).await?;
        } else {
            http("moltbot", url, &args).await?;
            if let Some(anchor) = &args.anchor_url {
                http("anchor", anchor, &args).await?;
            }
        }
    }
    if let Some(n) = args.plugin_calls {
        let dir = args.plugins_dir.as_deref().ok_or_else(|| anyhow::anyhow!("--plugin-calls needs --plugins-dir"))?;
        plugin_calls(n, dir).await?;
    }
    if let Some(n) = args.gateway_overhead {
        gateway_overhead(n).await?;
    }
    if let Some(n) = args.remote_overhead {
        remote::run(n, args.anchor_url.as_deref()).await?;
    }
    if let Some(redis) = &args.sessions_redis {
        session_store(redis, args.concurrency).await?;
    }
    Ok(())
}

/// The value at quantile `q` of sorted `values`.
fn quantile(values: &[f64], q: f64) -> f64 {
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// `n` calls, one after the other, of the calculator (built in) and the weather plugin (a Python process over
/// gRPC): in the plugin host, then through the gateway of an embedded MoltBot; p50 and p99 of each.
async fn plugin_calls(n: usize, dir: &std::path::Path) -> anyhow::Result<()> {
    use moltbot_plugin::{CallContext, PluginState, Plugins};
    let config = moltbot_config::PluginsConfig { dir: dir.to_owned(), ..Default::default() };
    let plugins = Plugins::load(&config).await?;
    if let Some(off) =
        plugins.list().into_iter().find(|p| p.name.starts_with("weather") && p.state != PluginState::Ready)
    {
        anyhow::bail!("the weather plugin did not load: {:?}", off.state);
    }
    let calls = [
        ("calculator", serde_json::json!({ "expression": "(2 + 3) * 4" })),
        ("weather", serde_json::json!({ "location": "Paris" })),
    ];
    let summary = |name: &str, place: &str, mut secs: Vec<f64>| {
        secs.sort_by(f64::total_cmp);
        println!(
            "plugin {name} ({place}): p50 {:.3} ms, p99 {:.3} ms over {} calls",
            quantile(&secs, 0.5) * 1e3,
            quantile(&secs, 0.99) * 1e3,
            secs.len()
        );
    };
    let n = n.max(10);
    for (name, arguments) in &calls {
        let mut secs = vec![];
        for k in 0..n + 10 {
            let t = Instant::now();
            plugins.execute(name, arguments.clone(), CallContext::default()).await?;
            if k >= 10 {
                secs.push(t.elapsed().as_secs_f64());
            }
        }
        summary(name, "plugin host", secs);
    }
    drop(plugins);
    let state = std::env::temp_dir().join(format!("moltbot-bench-{}", std::process::id()));
    let mut config = moltbot_config::Config::default();
    config.session_store.session_store_type = moltbot_config::SessionStoreType::Memory;
    config.session_store.path = state.join("unused.redb");
    config.plugins.dir = dir.to_owned();
    let moltbot = crate::start(config, tokio::net::TcpListener::bind("127.0.0.1:0").await?).await?;
    let http = reqwest::Client::new();
    for (name, arguments) in &calls {
        let url = format!("http://{}/api/plugins/{name}/execute", moltbot.gateway_addr);
        let body = serde_json::json!({ "arguments": arguments });
        let mut secs = vec![];
        for k in 0..n + 10 {
            let t = Instant::now();
            http.post(&url).json(&body).send().await?.error_for_status()?.bytes().await?;
            if k >= 10 {
                secs.push(t.elapsed().as_secs_f64());
            }
        }
        summary(name, "HTTP, gateway → dialogue-manager → plugin", secs);
    }
    moltbot.stop().await?;
    Ok(())
}

/// Conversations of 20 turns (read the session, save two messages) by `concurrency` clients for 5 s, through
/// the SessionStore gRPC service on Redis; prints operations/s and their latency.
async fn session_store(redis_url: &str, concurrency: usize) -> anyhow::Result<()> {
    use moltbot_proto::session::v1::{
        AppendMessagesRequest, CreateSessionRequest, DeleteSessionRequest, GetSessionRequest,
    };
    let mut config = moltbot_config::SessionStoreConfig {
        session_store_type: moltbot_config::SessionStoreType::Redis,
        ..Default::default()
    };
    config.redis.url = redis_url.to_owned();
    config.redis.pool_size = concurrency.max(1);
    let backend = moltbot_session_store::open_backend(&config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    let none = moltbot_proto::Credential::none();
    let server =
        tokio::spawn(moltbot_session_store::run(listener, backend, none.clone(), stop.clone().cancelled_owned()));
    let client = moltbot_dialogue_manager::connect_session_store(&url, &none).await?;
    let until = Instant::now() + std::time::Duration::from_secs(5);
    let workers = (0..concurrency.max(1)).map(|w| {
        let mut client = client.clone();
        async move {
            let mut latencies = vec![];
            let user_id = format!("bench-{w}");
            while Instant::now() < until {
                let create = CreateSessionRequest { user_id: user_id.clone(), ..Default::default() };
                let id = client.create_session(create).await?.into_inner().id;
                for turn in 0..20 {
                    let t = Instant::now();
                    let get =
                        GetSessionRequest { session_id: id.clone(), user_id: user_id.clone(), ..Default::default() };
                    client.get_session(get).await?;
                    latencies.push(t.elapsed().as_secs_f64());
                    let message = |role: &str| moltbot_proto::common::v1::ChatMessage {
                        role: role.into(),
                        content: format!("message {turn} of a benchmark conversation"),
                        ..Default::default()
                    };
                    let t = Instant::now();
                    let messages = vec![message("user"), message("assistant")];
                    let append = AppendMessagesRequest { session_id: id.clone(), user_id: user_id.clone(), messages };
                    client.append_messages(append).await?;
                    latencies.push(t.elapsed().as_secs_f64());
                }
                client.delete_session(DeleteSessionRequest { session_id: id, user_id: user_id.clone() }).await?;
            }
            anyhow::Ok(latencies)
        }
    });
    let started = Instant::now();
    let results = futures::future::join_all(workers).await;
    let secs = started.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?.concat();
    latencies.sort_by(f64::total_cmp);
    println!(
        "session-store over gRPC on Redis, {concurrency} clients: {:.0} ops/s (reads and appends of 20-turn conversations); latency p50 {:.2} ms, p99 {:.2} ms",
        latencies.len() as f64 / secs,
        quantile(&latencies, 0.5) * 1e3,
        quantile(&latencies, 0.99) * 1e3
    );
    stop.cancel();
    server.await??;
    Ok(())
}

/// Sequential requests through the gateway and straight to the dialogue-manager: `ListModels` (no model work:
/// HTTP, JSON and the extra hop only) and a one-token single-turn chat.
async fn gateway_overhead(n: usize) -> anyhow::Result<()> {
    use moltbot_proto::dialogue::v1::{ChatRequest, DialogueMode, ListModelsRequest, dialogue_client::DialogueClient};
    let dir = std::env::temp_dir().join(format!("moltbot-bench-{}", std::process::id()));
    let mut config = moltbot_config::Config::default();
    config.session_store.session_store_type = moltbot_config::SessionStoreType::Memory;
    config.session_store.path = dir.join("unused.redb");
    let moltbot = crate::start(config, tokio::net::TcpListener::bind("127.0.0.1:0").await?).await?;
    let url = format!("http://{}", moltbot.gateway_addr);
    let http = reqwest::Client::new();
    let mut dm = DialogueClient::connect(moltbot.dialogue_url.clone()).await?;
    let chat_body = serde_json::json!({ "message": "Hi", "max_tokens": 1, "temperature": 0 });
    let chat_request = || ChatRequest {
        mode: DialogueMode::Single.into(),
        messages: vec![moltbot_proto::common::v1::ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
            ..Default::default()
        }],
        sampling: Some(moltbot_proto::common::v1::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (mut via_gateway, mut direct, mut chat_gateway, mut chat_direct) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n.max(1) {
        let t = Instant::now();
        http.get(format!("{url}/v1/models")).send().await?.error_for_status()?.bytes().await?;
        via_gateway.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        dm.list_models(ListModelsRequest {}).await?;
        direct.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        http.post(format!("{url}/api/chat")).json(&chat_body).send().await?.error_for_status()?.bytes().await?;
        chat_gateway.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut stream = dm.chat(chat_request()).await?.into_inner();
        while stream.message().await?.is_some() {}
        chat_direct.push(t.elapsed().as_secs_f64());
    }
    for v in [&mut via_gateway, &mut direct, &mut chat_gateway, &mut chat_direct] {
        v.sort_by(f64::total_cmp);
    }
    let ms = |v: &[f64], q| quantile(v, q) * 1e3;
    for (what, gw, dm) in [("list models", &via_gateway, &direct), ("one-token chat", &chat_gateway, &chat_direct)] {
        println!(
            "gateway overhead, {what} ({n} sequential): through the gateway p50 {:.2} ms p99 {:.2} ms; dialogue-manager direct p50 {:.2} ms p99 {:.2} ms; the gateway adds p50 {:.2} ms, p99 {:.2} ms",
            ms(gw, 0.5),
            ms(gw, 0.99),
            ms(dm, 0.5),
            ms(dm, 0.99),
            ms(gw, 0.5) - ms(dm, 0.5),
            ms(gw, 0.99) - ms(dm, 0.99)
        );
    }
    moltbot.stop().await
}

/// Sequential turns with the same one-message prompt and a one-token answer: single-turn, then multi-turn in a
/// fresh session (created beforehand, untimed), so the difference is what the session costs a turn.
async fn mode_overhead(url: &str, turns: usize) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let body = serde_json::json!({ "message": "Hi", "max_tokens": 1, "temperature": 0 });
    let (mut single, mut multi) = (vec![], vec![]);
    for _ in 0..turns.max(1) {
        let t = Instant::now();
        let request = client.post(format!("{url}/api/chat")).header("x-dialogue-mode", "single").json(&body);
        request.send().await?.error_for_status()?.bytes().await?;
        single.push(t.elapsed().as_secs_f64());
        let session: serde_json::Value =
            client.post(format!("{url}/api/sessions")).send().await?.error_for_status()?.json().await?;
        let id = session["id"].as_str().unwrap_or_default().to_owned();
        let t = Instant::now();
        let request = client.post(format!("{url}/api/chat")).header("x-session-id", &id).json(&body);
        request.send().await?.error_for_status()?.bytes().await?;
        multi.push(t.elapsed().as_secs_f64());
        client.delete(format!("{url}/api/sessions/{id}")).send().await?;
    }
    single.sort_by(f64::total_cmp);
    multi.sort_by(f64::total_cmp);
    let ms = |v: &[f64], q| quantile(v, q) * 1e3;
    println!(
        "turn latency over {turns} turns: single-turn p50 {:.1} ms p99 {:.1} ms; multi-turn p50 {:.1} ms p99 {:.1} ms; the session adds p50 {:.1} ms, p99 {:.1} ms",
        ms(&single, 0.5),
        ms(&single, 0.99),
        ms(&multi, 0.5),
        ms(&multi, 0.99),
        ms(&multi, 0.5) - ms(&single, 0.5),
        ms(&multi, 0.99) - ms(&single, 0.99)
    );
    Ok(())
}

async fn engine(args: &Args) -> anyhow::Result<()> {
    let model_path = args.model.as_deref().map_or_else(moltbot_config::default_model_path, moltbot_config::model_file);
    let model_path = model_path.as_path();
    // Without the prefix cache: every run computes its whole prompt (`bench conversation` measures the cache).
    let device = match args.device.as_str() {
        "cuda" => DeviceChoice::Cuda { ordinal: 0, layers: args.gpu_layers },
        "candle-cpu" => DeviceChoice::CandleCpu,
        _ => DeviceChoice::Cpu,
    };
    let config = EngineConfig {
        device,
        max_batch_size: args.concurrency.max(16),
        prefix_caching: false,
        ..EngineConfig::new(model_path)
    };
    let engine = Engine::load(config)?;
    let file_mib = std::fs::metadata(model_path).map_or(0, |m| m.len() >> 20);
    println!(
        "model: {} ({}, {file_mib} MiB file) on {}; RSS after loading: {} MiB, weights in memory: {} MiB",
        model_path.display(),
        engine.metadata().architecture,
        engine.device(),
        rss_mib("VmRSS:"),
        engine.weight_bytes() >> 20
    );
    engine.submit(GenerationRequest::new(Prompt::Text("Hi".into()), greedy(2)))?.collect().await?;
    let repeat = args.repeat.max(1);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_else(|| "unknown".into());
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    println!(
        "CPU: {cpu}; {threads} threads; engine kernels: {} (MOLTBOT_ENGINE_NO_AVX512=1 forces AVX2)",
        moltbot_engine::kernels::simd_level()
    );
    println!("engine figures are medians of {repeat} runs each (--repeat)");

    // Prompt processing: time to the first token of a prompt of exactly n tokens.
    let words = "the quick brown fox jumps over the lazy dog while a bird sings ".repeat(80);
    let ids = engine.tokenizer().encode(&words)?;
    for n in [64, 512] {
        let prompt = engine.tokenizer().decode(&ids[..n], false)?;
        let mut rates = vec![];
        let mut prompt_tokens = 0;
        for _ in 0..repeat {
            let start = Instant::now();
            let mut g = engine.submit(GenerationRequest::new(Prompt::Text(prompt.clone()), greedy(1)))?;
            prompt_tokens = g.prompt_tokens;
            while let Some(event) = g.next().await {
                if matches!(event, GenerationEvent::Finished { .. } | GenerationEvent::Failed(_)) {
                    break;
                }
            }
            rates.push(f64::from(prompt_tokens) / start.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "engine prompt processing, {prompt_tokens} tokens: {:.1} tok/s (runs from {:.1} to {:.1})",
            quantile(&rates, 0.5),
            rates[0],
            rates[rates.len() - 1]
        );
    }

    // Decode: n sequences together, short prompts, `tokens` each; time from the first token to the last.
    let mut counts = vec![1, 4, 16, args.concurrency];
    counts.sort_unstable();
    counts.dedup();
    for n in counts {
        let mut rates = vec![];
        for _ in 0..repeat {
            let runs: Vec<_> = (0..n)
                .map(|i| {
                    let r = GenerationRequest::new(Prompt::Text(format!("Story number {i}:")), greedy(args.tokens));
                    engine.submit(r)
                })
                .collect::<Result<_, _>>()?;
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
                        GenerationEvent::Token { .. } | GenerationEvent::ToolCalls(_) => {}
                    }
                }
            }
            let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64()).max(1e-9);
            rates.push(f64::from(tokens.saturating_sub(n as u32)) / secs);
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "engine decode, {n} sequences: {:.1} tok/s aggregate (runs from {:.1} to {:.1})",
            quantile(&rates, 0.5),
            rates[0],
            rates[rates.len() - 1]
        );
    }
    ttft_under_load(&engine, &ids[..64], args).await?;
    // The peak through prompts and decoding (what llama-bench's peak RSS covers), before the constrained run
    // builds the vocabulary's grammar tables and the follow-up turns load a second engine.
    let stats = engine.stats();
    println!(
        "peak RSS: {} MiB through the prompt and decode runs (KV cache: {} blocks of {} positions, {} preemptions)",
        peak_rss_mib(),
        stats.kv_blocks_total,
        moltbot_engine::model::BLOCK_SIZE,
        stats.preemptions
    );
    constrained_decode(&engine, args.tokens, repeat).await?;
    println!("peak RSS: {} MiB with the constrained run's grammar tables (built on first use)", peak_rss_mib());
    drop(engine);
    follow_up(model_path, &ids, repeat).await?;
    Ok(())
}

/// One stream's decode tokens/s on the same chat prompt without and with a JSON Schema constraint (a list that
/// cannot end before `tokens`, so both runs generate `tokens` tokens): what computing each token's mask costs.
async fn constrained_decode(engine: &Engine, tokens: u32, repeat: usize) -> anyhow::Result<()> {
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "cities": { "type": "array", "items": { "type": "string" }, "minItems": 200 } },
        "required": ["cities"],
    });
    let mut medians = vec![];
    for constraint in [None, Some(moltbot_engine::Constraint::JsonSchema(schema))] {
        let mut rates = vec![];
        for _ in 0..repeat {
            let prompt =
                Prompt::Chat(vec![moltbot_engine::ChatMessage::new("user", "List cities of the world as JSON.")]);
            let sampling = SamplingParams { constraint: constraint.clone(), ..greedy(tokens) };
            let mut g = engine.submit(GenerationRequest::new(prompt, sampling))?;
            let (mut first, mut count) = (None, 0u32);
            while let Some(event) = g.next().await {
                match event {
                    GenerationEvent::Token { id: Some(_), .. } => {
                        first.get_or_insert_with(Instant::now);
                        count += 1;
                    }
                    GenerationEvent::Finished { .. } | GenerationEvent::Failed(_) => break,
                    GenerationEvent::Token { .. } | GenerationEvent::ToolCalls(_) => {}
                }
            }
            let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64()).max(1e-9);
            rates.push(f64::from(count.saturating_sub(1)) / secs);
        }
        rates.sort_by(f64::total_cmp);
        medians.push(quantile(&rates, 0.5));
    }
    println!(
        "engine decode, 1 sequence, JSON Schema constraint: {:.1} tok/s against {:.1} unconstrained ({:.2}x)",
        medians[1],
        medians[0],
        medians[1] / medians[0].max(1e-9)
    );
    Ok(())
}

/// A conversation's next turn: 32 new prompt tokens after a cached prefix of 64 and of 1024 tokens (the prefix is
/// read once beforehand; each run's new tokens differ). Median time to the first token of each, and their ratio:
/// what attending to a long history adds when only the new turn is computed. llama-bench's `pp32 @ d64` and
/// `pp32 @ d1024` are the anchor.
async fn follow_up(model_path: &std::path::Path, ids: &[u32], repeat: usize) -> anyhow::Result<()> {
    let engine = Engine::load(EngineConfig { prefix_caching: true, ..EngineConfig::new(model_path) })?;
    let others =
        engine.tokenizer().encode(&"a small red hen finds seven grains of wheat near an old mill ".repeat(200))?;
    let mut medians = vec![];
    for depth in [64, 1024] {
        let prefix = engine.tokenizer().decode(&ids[..depth], false)?;
        engine.submit(GenerationRequest::new(Prompt::Text(prefix.clone()), greedy(1)))?.collect().await?;
        let (mut secs, mut cached) = (vec![], 0);
        for r in 0..repeat.min(others.len() / 32) {
            let new = engine.tokenizer().decode(&others[r * 32..(r + 1) * 32], false)?;
            let start = Instant::now();
            let g = engine.submit(GenerationRequest::new(Prompt::Text(prefix.clone() + &new), greedy(1)))?;
            let (_, _, usage) = g.collect().await?;
            secs.push(start.elapsed().as_secs_f64());
            cached = usage.cached_tokens;
        }
        secs.sort_by(f64::total_cmp);
        let median = quantile(&secs, 0.5);
        println!(
            "engine follow-up turn, 32 new tokens after {depth} cached ({cached} reused): {:.1} ms (runs from {:.1} to {:.1})",
            median * 1e3,
            secs[0] * 1e3,
            secs[secs.len() - 1] * 1e3
        );
        medians.push(median);
    }
    println!("engine follow-up turn: after 1024 cached tokens {:.2}x the time after 64", medians[1] / medians[0]);
    Ok(())
}

/// Time to the first token of a `prompt` submitted while `concurrency - 1` sequences are decoding, so it
/// joins a running batch (chunked prefill beside decode) instead of waiting for a place.
async fn ttft_under_load(engine: &Engine, prompt: &[u32], args: &Args) -> anyhow::Result<()> {
    let busy = args.concurrency.saturating_sub(1).max(1);
    let mut load: Vec<_> = (0..busy)
        .map(|i| {
            let r = GenerationRequest::new(Prompt::Text(format!("Tale {i}:")), greedy(args.tokens * 4));
            engine.submit(r)
        })
        .collect::<Result<_, _>>()?;
    for g in &mut load {
        g.next().await;
    }
    let prompt = engine.tokenizer().decode(prompt, false)?;
    let start = Instant::now();
    let mut g = engine.submit(GenerationRequest::new(Prompt::Text(prompt), greedy(1)))?;
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
    rss_mib("VmHWM:")
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS:` now, `VmHWM:` the peak), in MiB.
fn rss_mib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(key).map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok()))
        })
        .flatten()
        .map_or(0, |kb| kb / 1024)
}

/// Streams chats through `url`'s OpenAI API: four one after the other, then `concurrency` at once; prints
/// aggregate tokens/s and time to first token for each.
/// Fails with what to do when nothing answers at `url` (the benches that drive a running MoltBot).
async fn answering(url: &str) -> anyhow::Result<()> {
    let client = conversation::fresh_connections();
    match client.get(format!("{url}/v1/models")).send().await {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => {
            anyhow::bail!("{url}/v1/models answered {}: is a MoltBot gateway listening there?", response.status())
        }
        Err(e) => anyhow::bail!(
            "no MoltBot answers at {url} ({e}): start one in another terminal (`cargo xtask run`, or \
             `cargo xtask dev` for the distributed shape), or pass --url"
        ),
    }
}

/// One `http_runs` figure: streaming chats at a concurrency.
struct HttpRun {
    concurrency: usize,
    rounds: usize,
    tokens: u64,
    secs: f64,
    ttft_p50: f64,
    ttft_p99: f64,
}

async fn http(name: &str, url: &str, args: &Args) -> anyhow::Result<()> {
    for run in http_runs(url, args.concurrency, args.tokens).await? {
        let HttpRun { concurrency, rounds, tokens, secs, ttft_p50, ttft_p99 } = run;
        println!(
            "{name} http streaming, {concurrency} concurrent chat(s) x {rounds}: {tokens} tokens in {secs:.3} s = {:.1} tok/s aggregate; time to first token p50 {ttft_p50:.3} s, p99 {ttft_p99:.3} s",
            tokens as f64 / secs,
        );
    }
    Ok(())
}

/// Streams chats of `max_tokens` through `url`'s OpenAI API: four one after the other, then `concurrency` at once.
async fn http_runs(url: &str, concurrency: usize, max_tokens: u32) -> anyhow::Result<Vec<HttpRun>> {
    let client = conversation::fresh_connections();
    let mut runs = vec![];
    for (concurrency, rounds) in [(1, 4), (concurrency, 1)] {
        let (mut tokens, mut ttfts, start) = (0u64, vec![], Instant::now());
        for round in 0..rounds {
            let chats = (0..concurrency).map(|i| {
                let client = client.clone();
                let body = serde_json::json!({
                    "messages": [{ "role": "user", "content": format!("Tell me a story about the number {}.", round * concurrency + i) }],
                    "max_tokens": max_tokens, "temperature": 0,
                });
                async move { conversation::stream_chat(&client, url, body, &[]).await }
            });
            for streamed in futures::future::join_all(chats).await {
                let streamed = streamed?;
                tokens += streamed.usage["completion_tokens"].as_u64().unwrap_or(streamed.pieces);
                ttfts.push(streamed.ttft);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        ttfts.sort_by(f64::total_cmp);
        runs.push(HttpRun {
            concurrency,
            rounds,
            tokens,
            secs,
            ttft_p50: quantile(&ttfts, 0.5),
            ttft_p99: quantile(&ttfts, 0.99),
        });
    }
    Ok(runs)
}
