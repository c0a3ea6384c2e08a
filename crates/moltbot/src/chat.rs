//! `moltbot chat`: an interactive terminal chat against a running gateway. Answers stream as they are
//! generated; the first turn starts a session and later turns continue it. `/new` starts over, `/quit` (or
//! end of input) leaves.

use std::io::{BufRead, Write};

#[derive(clap::Args)]
pub struct Args {
    /// The gateway.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// An API key, when the gateway asks for one (also read from MOLTBOT_API_KEY).
    #[arg(long, env = "MOLTBOT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Continue this session instead of starting one.
    #[arg(long)]
    session: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut session = args.session.clone();
    // Lines come from a plain thread: a blocked terminal read must not hold up the runtime.
    let (tx, mut lines) = tokio::sync::mpsc::channel::<std::io::Result<String>>(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    eprintln!("Chatting with {} — /new starts over, /quit leaves.", args.url);
    loop {
        eprint!("> ");
        let Some(line) = lines.recv().await.transpose()? else { break };
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/new" => {
                session = None;
                eprintln!("(a new conversation)");
                continue;
            }
            message => match turn(&client, &args, session.as_deref(), message).await {
                Ok(id) => session = id.or(session),
                Err(e) => eprintln!("error: {e:#}"),
            },
        }
    }
    if let Some(id) = session {
        eprintln!("(session {id})");
    }
    Ok(())
}

/// Sends one message and prints the answer as it streams; returns the session id the gateway named.
async fn turn(
    client: &reqwest::Client,
    args: &Args,
    session: Option<&str>,
    message: &str,
) -> anyhow::Result<Option<String>> {
    let mut request = client
        .post(format!("{}/api/chat", args.url.trim_end_matches('/')))
        .json(&serde_json::json!({ "message": message, "stream": true }));
    request = match session {
        Some(id) => request.header("x-session-id", id),
        None => request.header("x-dialogue-mode", "multi"),
    };
    if let Some(key) = &args.api_key {
        request = request.bearer_auth(key);
    }
    let mut response = request.send().await?;
    if !response.status().is_success() {
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        anyhow::bail!("{status}: {}", body["error"]["message"].as_str().unwrap_or("no details"));
    }
    let (mut events, mut session_id) = (crate::sse::SseParser::default(), None);
    let mut out = std::io::stdout();
    while let Some(chunk) = response.chunk().await? {
        for event in events.push(&chunk) {
            let value: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
            match event.event.as_str() {
                "start" => session_id = value["session_id"].as_str().map(str::to_owned),
                "delta" => {
                    write!(out, "{}", value["text"].as_str().unwrap_or_default())?;
                    out.flush()?;
                }
                "error" => anyhow::bail!("{}", value["error"]["message"].as_str().unwrap_or("the answer failed")),
                _ => {}
            }
        }
    }
    writeln!(out)?;
    Ok(session_id)
}
