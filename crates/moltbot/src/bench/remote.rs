//! `bench remote`: what MoltBot adds in front of a remote OpenAI-compatible API. A MoltBot serving a `remote_api`
//! model is started in this process in front of each upstream (a second MoltBot, and llama.cpp's `llama-server`
//! when `cargo xtask bench remote` could start one); the same one-token chats go to the upstream directly and
//! through MoltBot, one after the other in turn, and the p50 and p99 of each are compared: whole answers, and the
//! time to the first streamed token.

use std::time::Instant;

use serde_json::{Value, json};

use super::quantile;

/// Times `n` chats each way against a second MoltBot, and against `anchor` (a llama-server) when given.
pub async fn run(n: usize, anchor: Option<&str>) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("moltbot-bench-remote-{}", std::process::id()));
    let embedded = |name: &str, models: Vec<moltbot_config::ModelProviderConfig>| {
        let mut config = moltbot_config::Config::default();
        config.model_provider.model_name = name.into();
        config.session_store.session_store_type = moltbot_config::SessionStoreType::Memory;
        config.session_store.path = dir.join("unused.redb");
        config.models = models;
        config
    };
    let upstream =
        crate::start(embedded("upstream", vec![]), tokio::net::TcpListener::bind("127.0.0.1:0").await?).await?;
    let mut upstreams = vec![("a second MoltBot", format!("http://{}", upstream.gateway_addr))];
    if let Some(anchor) = anchor {
        upstreams.push(("llama-server", anchor.trim_end_matches('/').to_owned()));
    }
    for (what, base) in upstreams {
        let remote = moltbot_config::ModelProviderConfig {
            kind: Some(moltbot_config::ProviderType::RemoteApi),
            model_name: "remote".into(),
            endpoint_url: format!("{base}/v1"),
            remote_model: "upstream".into(),
            max_tokens: 16,
            ..Default::default()
        };
        let front =
            crate::start(embedded("local", vec![remote]), tokio::net::TcpListener::bind("127.0.0.1:0").await?).await?;
        let front_base = format!("http://{}", front.gateway_addr);
        let client = reqwest::Client::new();
        let (mut direct, mut through, mut direct_first, mut through_first) = (vec![], vec![], vec![], vec![]);
        // One untimed round each way: connections made, the upstream's first prompt read.
        answer(&client, &base, "upstream", false).await?;
        answer(&client, &front_base, "remote", false).await?;
        for _ in 0..n.max(1) {
            direct.push(answer(&client, &base, "upstream", false).await?);
            through.push(answer(&client, &front_base, "remote", false).await?);
            direct_first.push(answer(&client, &base, "upstream", true).await?);
            through_first.push(answer(&client, &front_base, "remote", true).await?);
        }
        for v in [&mut direct, &mut through, &mut direct_first, &mut through_first] {
            v.sort_by(f64::total_cmp);
        }
        let ms = |v: &[f64], q| quantile(v, q) * 1e3;
        for (kind, direct, through) in
            [("one-token answer", &direct, &through), ("first streamed token", &direct_first, &through_first)]
        {
            println!(
                "remote overhead, {what}, {kind} ({n} sequential): direct p50 {:.2} ms p99 {:.2} ms; through MoltBot p50 {:.2} ms p99 {:.2} ms; MoltBot adds p50 {:.2} ms ({:.2}x), p99 {:.2} ms",
                ms(direct, 0.5),
                ms(direct, 0.99),
                ms(through, 0.5),
                ms(through, 0.99),
                ms(through, 0.5) - ms(direct, 0.5),
                ms(through, 0.5) / ms(direct, 0.5),
                ms(through, 0.99) - ms(direct, 0.99),
            );
        }
        front.stop().await?;
    }
    upstream.stop().await
}

/// One chat with a one-token answer from `model` at `base`: the seconds to the whole answer, or with `stream` to
/// the first event that carries text (or the end of the stream).
async fn answer(client: &reqwest::Client, base: &str, model: &str, stream: bool) -> anyhow::Result<f64> {
    let body = json!({
        "model": model,
        "messages": [{ "role": "user", "content": "Hi" }],
        "max_tokens": 1,
        "temperature": 0,
        "stream": stream,
    });
    let started = Instant::now();
    let mut response =
        client.post(format!("{base}/v1/chat/completions")).json(&body).send().await?.error_for_status()?;
    if !stream {
        let answer: Value = response.json().await?;
        anyhow::ensure!(answer["choices"][0]["message"].is_object(), "no answer from {base}: {answer}");
        return Ok(started.elapsed().as_secs_f64());
    }
    let (mut pending, mut first) = (String::new(), None);
    while let Some(chunk) = response.chunk().await? {
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else { continue };
            let text = serde_json::from_str::<Value>(data).ok().and_then(|event| {
                event.pointer("/choices/0/delta/content").and_then(Value::as_str).map(|t| !t.is_empty())
            });
            if first.is_none() && (data == "[DONE]" || text == Some(true)) {
                first = Some(started.elapsed().as_secs_f64());
            }
        }
    }
    // The stream was read to its end, so the next request finds the upstream idle.
    first.ok_or_else(|| anyhow::anyhow!("{base} streamed no text and no [DONE]"))
}
