//! `bench conversation`: what the prefix cache does for chats. A conversation of N turns (short user turns,
//! 32-token answers) streamed through the OpenAI API, once with the client resending its history and once with a
//! server-side session (`X-Session-Id`), on MoltBot with prefix caching on and off, and with the history resent to
//! an anchor server (`llama-server`) given by URL; then N users arriving together behind one long system prompt.
//! Prints each turn's time to first token and the prompt tokens the cache supplied.

use std::time::Instant;

use serde_json::{Value, json};

use super::quantile;

/// One streamed chat completion.
pub(super) struct Streamed {
    /// Seconds to the first piece of content.
    pub ttft: f64,
    pub text: String,
    /// The final `usage` object, `Null` when the server sent none.
    pub usage: Value,
    /// The `X-Session-Id` response header.
    pub session: Option<String>,
    /// Chunks that carried content (about one per token), for servers that send no usage.
    pub pieces: u64,
}

/// Streams one chat completion from `base`'s `/v1/chat/completions`.
pub(super) async fn stream_chat(
    client: &reqwest::Client,
    base: &str,
    mut body: Value,
    headers: &[(&str, &str)],
) -> anyhow::Result<Streamed> {
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let mut request = client.post(format!("{base}/v1/chat/completions")).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let sent = Instant::now();
    let mut response = request.send().await?.error_for_status()?;
    let session = response.headers().get("x-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (mut ttft, mut text, mut usage, mut pieces) = (None, String::new(), Value::Null, 0);
    let mut parser = crate::sse::SseParser::default();
    while let Some(chunk) = response.chunk().await? {
        for event in parser.push(&chunk) {
            let Ok(value) = serde_json::from_str::<Value>(&event.data) else { continue };
            if let Some(piece) = value["choices"][0]["delta"]["content"].as_str().filter(|c| !c.is_empty()) {
                ttft.get_or_insert_with(|| sent.elapsed().as_secs_f64());
                text.push_str(piece);
                pieces += 1;
            }
            if value["usage"].is_object() {
                usage = value["usage"].clone();
            }
        }
    }
    Ok(Streamed { ttft: ttft.unwrap_or_else(|| sent.elapsed().as_secs_f64()), text, usage, session, pieces })
}

/// The API key every benchmark request presents (`--api-key`), when the gateway wants one.
pub(super) static API_KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// An HTTP client that opens a connection per request: some servers (llama-server among them) close kept-alive
/// connections after a few requests, which a pooled client can hit mid-send; on the loopback a connection costs
/// nothing next to a turn.
pub(super) fn fresh_connections() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = API_KEY.get() {
        let value = format!("Bearer {key}").parse().expect("an API key fit for a header");
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .default_headers(headers)
        .build()
        .expect("a default HTTP client")
}

/// How the client keeps the conversation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keeping {
    /// The client resends the whole history every turn (every OpenAI client).
    History,
    /// The server keeps it: `X-Dialogue-Mode: multi` on the first turn, `X-Session-Id` after.
    Session,
}

/// One turn's figures.
#[derive(Clone, Copy, Default)]
struct Turn {
    ttft: f64,
    prompt_tokens: u64,
    cached_tokens: u64,
}

const ANSWER_TOKENS: u32 = 32;

/// The first model `base` serves (`/v1/models`).
async fn model_name(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let models: Value = client.get(format!("{base}/v1/models")).send().await?.error_for_status()?.json().await?;
    models["data"][0]["id"].as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("{base} lists no model"))
}

/// A conversation of `turns` turns; `topic` makes its first message differ from other runs'.
async fn conversation(
    base: &str,
    turns: usize,
    keeping: Keeping,
    topic: impl std::fmt::Display,
) -> anyhow::Result<Vec<Turn>> {
    let client = fresh_connections();
    let model = model_name(&client, base).await?;
    let (mut history, mut session, mut figures) = (vec![], None::<String>, vec![]);
    for k in 1..=turns {
        let message =
            json!({ "role": "user", "content": format!("{topic} {k}: tell me one short fact about the number {k}.") });
        history.push(message.clone());
        let messages = if keeping == Keeping::History { history.clone() } else { vec![message] };
        let body = json!({ "model": model, "messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0 });
        let headers: Vec<(&str, &str)> = match (&session, keeping) {
            (Some(id), _) => vec![("x-session-id", id)],
            (None, Keeping::Session) => vec![("x-dialogue-mode", "multi")],
            (None, Keeping::History) => vec![],
        };
        let streamed = stream_chat(&client, base, body, &headers).await?;
        if keeping == Keeping::Session && session.is_none() {
            session = Some(streamed.session.clone().ok_or_else(|| anyhow::anyhow!("no X-Session-Id came back"))?);
        }
        history.push(json!({ "role": "assistant", "content": streamed.text }));
        figures.push(Turn {
            ttft: streamed.ttft,
            prompt_tokens: streamed.usage["prompt_tokens"].as_u64().unwrap_or(0),
            cached_tokens: streamed.usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
        });
    }
    Ok(figures)
}

/// `users` chats at once behind one ~600-token system prompt: each one's time to first token and cached tokens.
async fn shared_prompt(base: &str, users: usize) -> anyhow::Result<Vec<Turn>> {
    let client = fresh_connections();
    let model = model_name(&client, base).await?;
    let system = "You are the assistant of a mountain hut. Guests ask about routes, weather, meals and beds; answer \
                  in one friendly sentence, mention safety when the weather turns, and never invent prices. "
        .repeat(15);
    let chats = (0..users).map(|u| {
        let client = client.clone();
        let body = json!({
            "model": model, "max_tokens": ANSWER_TOKENS, "temperature": 0,
            "messages": [{ "role": "system", "content": system }, { "role": "user", "content": format!("Guest {u}: is breakfast served early?") }],
        });
        async move {
            let streamed = stream_chat(&client, base, body, &[("x-dialogue-mode", "single")]).await?;
            anyhow::Ok(Turn {
                ttft: streamed.ttft,
                prompt_tokens: streamed.usage["prompt_tokens"].as_u64().unwrap_or(0),
                cached_tokens: streamed.usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
            })
        }
    });
    futures::future::join_all(chats).await.into_iter().collect()
}

/// MoltBot, embedded in this process, with prefix caching on or off.
async fn start_moltbot(caching: bool) -> anyhow::Result<(crate::Embedded, String)> {
    let mut config = moltbot_config::Config::default();
    config.session_store.session_store_type = moltbot_config::SessionStoreType::Memory;
    config.inference_worker.prefix_caching = caching;
    let moltbot = crate::start(config, tokio::net::TcpListener::bind("127.0.0.1:0").await?).await?;
    let url = format!("http://{}", moltbot.gateway_addr);
    Ok((moltbot, url))
}

/// The last turn's time to first token, and the median of the last three, against the median of turns 2–4 (one
/// turn is noisy on a shared machine).
fn growth(figures: &[Turn]) -> String {
    let median = |turns: &[Turn]| {
        let mut v: Vec<f64> = turns.iter().map(|t| t.ttft).collect();
        v.sort_by(f64::total_cmp);
        quantile(&v, 0.5)
    };
    let (early, late) = (median(&figures[1..4]), median(&figures[figures.len() - 3..]));
    let last = figures.last().map_or(0.0, |t| t.ttft);
    format!(
        "turn {}: {last:.3} s; median of the last three {late:.3} s against turns 2-4 {early:.3} s: ratio {:.2}",
        figures.len(),
        late / early.max(1e-9)
    )
}

fn hit_rate(figures: &[Turn]) -> String {
    let (cached, prompt) = figures.iter().fold((0, 0), |(c, p), t| (c + t.cached_tokens, p + t.prompt_tokens));
    format!("{cached} of {prompt} prompt tokens from the cache ({:.0} %)", 100.0 * cached as f64 / prompt.max(1) as f64)
}

/// `conversations` conversations at once through a running MoltBot at `url` (the distributed shape that `cargo
/// xtask bench conversation --workers 2` starts), first resending their histories, then with server-side sessions:
/// each turn's median time to first token, and how much of each prompt the cache supplied after the first turn
/// (every turn that reaches a worker not holding its conversation's blocks computes its whole history again).
pub async fn through(url: &str, turns: usize, conversations: usize, rounds: usize) -> anyhow::Result<()> {
    let (turns, rounds) = (turns.max(4), rounds.max(1));
    println!(
        "{conversations} conversations of {turns} turns at once through {url}, {ANSWER_TOKENS}-token answers; \
         {rounds} rounds of each (every round's conversations are new), the median of all of them per turn"
    );
    for (keeping, name) in [(Keeping::History, "history"), (Keeping::Session, "session")] {
        let mut runs: Vec<Vec<Turn>> = vec![];
        for round in 0..rounds {
            let round = (0..conversations).map(|c| conversation(url, turns, keeping, format!("{name}-{round}-{c}")));
            runs.extend(futures::future::try_join_all(round).await?);
        }
        let medians: Vec<Turn> = (0..turns)
            .map(|k| {
                let mut ttfts: Vec<f64> = runs.iter().map(|r| r[k].ttft).collect();
                ttfts.sort_by(f64::total_cmp);
                let (prompt, cached) =
                    runs.iter().fold((0, 0), |(p, c), r| (p + r[k].prompt_tokens, c + r[k].cached_tokens));
                Turn { ttft: quantile(&ttfts, 0.5), prompt_tokens: prompt, cached_tokens: cached }
            })
            .collect();
        println!(
            "{name}: turn | median time to first token (s) | prompt tokens of all {} | from the cache",
            runs.len()
        );
        for (k, t) in medians.iter().enumerate() {
            println!("{:>4} | {:.3} | {} | {}", k + 1, t.ttft, t.prompt_tokens, t.cached_tokens);
        }
        println!("{name}: {}; turns 2-{turns}: {}", growth(&medians), hit_rate(&medians[1..]));
    }
    Ok(())
}

pub async fn run(turns: usize, users: usize, anchor: Option<&str>) -> anyhow::Result<()> {
    let turns = turns.max(4);
    let mut columns: Vec<(String, Vec<Turn>)> = vec![];
    let mut crowds: Vec<(String, Vec<Turn>)> = vec![];
    for caching in [true, false] {
        let (moltbot, url) = start_moltbot(caching).await?;
        let state = if caching { "on" } else { "off" };
        for (keeping, name) in [(Keeping::History, "history"), (Keeping::Session, "session")] {
            let figures = conversation(&url, turns, keeping, name).await?;
            columns.push((format!("moltbot {name}, cache {state}"), figures));
        }
        crowds.push((format!("moltbot, cache {state}"), shared_prompt(&url, users).await?));
        moltbot.stop().await?;
    }
    if let Some(anchor) = anchor {
        columns.push(("anchor history".into(), conversation(anchor, turns, Keeping::History, "history").await?));
        crowds.push(("anchor".into(), shared_prompt(anchor, users).await?));
    }
    println!(
        "{turns}-turn conversation, {ANSWER_TOKENS}-token answers: time to first token (s) of each turn (prompt tokens \
         computed; the anchor reports none)"
    );
    print!("turn");
    for (name, _) in &columns {
        print!(" | {name}");
    }
    println!();
    for k in 0..turns {
        print!("{:>4}", k + 1);
        for (_, figures) in &columns {
            let t = figures[k];
            print!(" | {:.3} ({})", t.ttft, t.prompt_tokens.saturating_sub(t.cached_tokens));
        }
        println!();
    }
    for (name, figures) in &columns {
        println!("{name}: {}; {}", growth(figures), hit_rate(figures));
    }
    println!("{users} users at once behind one long system prompt (single-turn):");
    for (name, figures) in &crowds {
        let mut ttfts: Vec<f64> = figures.iter().map(|t| t.ttft).collect();
        ttfts.sort_by(f64::total_cmp);
        let computed: u64 = figures.iter().map(|t| t.prompt_tokens - t.cached_tokens.min(t.prompt_tokens)).sum();
        println!(
            "{name}: time to first token p50 {:.3} s, p99 {:.3} s; prompt tokens computed {computed}; {}",
            quantile(&ttfts, 0.5),
            quantile(&ttfts, 0.99),
            hit_rate(figures)
        );
    }
    Ok(())
}
