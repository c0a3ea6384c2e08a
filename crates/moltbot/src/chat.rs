//! `moltbot chat`: an interactive terminal chat against a running gateway. Answers stream as they are
//! generated; the first turn starts a session and later turns continue it. Commands (`/help` lists them) are
//! handled here, never sent to the model. Ctrl-C stops the answer being written (the session keeps what came);
//! `/quit` or end of input leaves.

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
    /// Plugins the model may call, separated by commas (also `/use` in the chat); the server runs the calls and
    /// each is shown with its result.
    #[arg(long, value_delimiter = ',')]
    plugins: Vec<String>,
}

pub async fn run(mut args: Args) -> anyhow::Result<()> {
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
    eprintln!("Chatting with {} — /help lists the commands, Ctrl-C stops an answer, /quit leaves.", args.url);
    loop {
        eprint!("> ");
        let line = tokio::select! {
            line = lines.recv() => line,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("\n(/quit or Ctrl-D leaves)");
                continue;
            }
        };
        let Some(raw) = line.transpose()? else { break };
        let line = raw.trim();
        // A line that starts with a space is a message even when it starts with a slash after that.
        let (command, rest) = match raw.starts_with(char::is_whitespace) {
            true if !line.is_empty() => ("", line),
            _ => line.split_once(char::is_whitespace).unwrap_or((line, "")),
        };
        let done = match command {
            "" if !rest.is_empty() => {
                turn(&client, &args, session.as_deref(), rest).await.map(|id| session = id.or(session.take()))
            }
            "" => continue,
            "/quit" | "/exit" => break,
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            "/new" => {
                session = None;
                eprintln!("(a new conversation)");
                continue;
            }
            "/plugins" => plugins(&client, &args).await,
            "/use" => {
                args.plugins = rest.split([',', ' ']).filter(|p| !p.is_empty()).map(str::to_owned).collect();
                match args.plugins.is_empty() {
                    true => eprintln!("(the model calls no plugins)"),
                    false => eprintln!("(the model may call {})", args.plugins.join(", ")),
                }
                continue;
            }
            "/run" => run_plugin(&client, &args, session.as_deref(), rest.trim()).await,
            unknown if unknown.starts_with('/') => {
                eprintln!(
                    "{unknown} is not a command; /help lists them (start a message with a space to send a slash)"
                );
                continue;
            }
            _ => turn(&client, &args, session.as_deref(), line).await.map(|id| session = id.or(session.take())),
        };
        if let Err(e) = done {
            eprintln!("error: {e:#}");
        }
    }
    if let Some(id) = session {
        eprintln!("(session {id})");
    }
    Ok(())
}

const HELP: &str = "\
/help                 this list
/new                  start a new conversation
/plugins              the plugins and their parameters
/run NAME {JSON}      run a plugin with these arguments (recorded in the conversation)
/use NAME,...         let the model call these plugins (/use alone: none)
/quit                 leave (also Ctrl-D)
Ctrl-C stops the answer being written; anything else is sent to the model.";

fn request(client: &reqwest::Client, args: &Args, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    let request = client.request(method, format!("{}{path}", args.url.trim_end_matches('/')));
    match &args.api_key {
        Some(key) => request.bearer_auth(key),
        None => request,
    }
}

/// The body of a successful response, or the error the gateway gave.
async fn json_or_error(response: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{status}: {}", body["error"]["message"].as_str().unwrap_or("no details"));
    }
    Ok(body)
}

/// `/plugins`: each plugin, its parameters, and why a disabled one is off.
async fn plugins(client: &reqwest::Client, args: &Args) -> anyhow::Result<()> {
    let listed = json_or_error(request(client, args, reqwest::Method::GET, "/api/plugins").send().await?).await?;
    for p in listed["data"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default();
        if p["state"] == "ready" {
            let params: Vec<&str> = p["parameters"]["properties"]
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            eprintln!("{name}({}) — {}", params.join(", "), p["description"].as_str().unwrap_or_default());
        } else {
            eprintln!("{name} (disabled) — {}", p["reason"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// `/run NAME {JSON}`: runs a plugin in the conversation and shows the call and its result.
async fn run_plugin(client: &reqwest::Client, args: &Args, session: Option<&str>, rest: &str) -> anyhow::Result<()> {
    let (name, arguments) = rest.split_once(char::is_whitespace).unwrap_or((rest, "{}"));
    anyhow::ensure!(!name.is_empty(), "/run needs a plugin name: /run calculator {{\"expression\": \"6*7\"}}");
    let arguments: serde_json::Value = serde_json::from_str(arguments.trim())
        .map_err(|e| anyhow::anyhow!("the arguments are not JSON ({e}): /run {name} {{\"key\": \"value\"}}"))?;
    let body = serde_json::json!({ "arguments": arguments, "session_id": session.unwrap_or_default() });
    eprintln!("[tool call] {name}({arguments})");
    let path = format!("/api/plugins/{name}/execute");
    let answer = json_or_error(request(client, args, reqwest::Method::POST, &path).json(&body).send().await?).await?;
    println!("[tool result] {}", answer["result"]);
    Ok(())
}

/// Sends one message and prints the answer as it streams, until it ends or Ctrl-C stops it; returns the session
/// id the gateway named.
async fn turn(
    client: &reqwest::Client,
    args: &Args,
    session: Option<&str>,
    message: &str,
) -> anyhow::Result<Option<String>> {
    let request = request(client, args, reqwest::Method::POST, "/api/chat")
        .json(&serde_json::json!({ "message": message.trim(), "stream": true, "plugins": args.plugins }));
    let request = match session {
        Some(id) => request.header("x-session-id", id),
        None => request.header("x-dialogue-mode", "multi"),
    };
    let mut response = request.send().await?;
    if !response.status().is_success() {
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        anyhow::bail!("{status}: {}", body["error"]["message"].as_str().unwrap_or("no details"));
    }
    let (mut events, mut session_id) = (crate::sse::SseParser::default(), None);
    let mut out = std::io::stdout();
    loop {
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk?,
            // Dropping the response closes the stream: the gateway cancels the job, the session keeps what came.
            _ = tokio::signal::ctrl_c() => {
                writeln!(out)?;
                eprintln!("(stopped)");
                return Ok(session_id);
            }
        };
        let Some(chunk) = chunk else { break };
        for event in events.push(&chunk) {
            let value: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
            match event.event.as_str() {
                "start" => session_id = value["session_id"].as_str().map(str::to_owned),
                "delta" => {
                    write!(out, "{}", value["text"].as_str().unwrap_or_default())?;
                    out.flush()?;
                }
                "tool" => {
                    // A plugin the model called, on a line of its own: the call, then what it gave back.
                    let function = &value["tool_call"]["function"];
                    let name = function["name"].as_str().unwrap_or_default();
                    let arguments = function["arguments"].as_str().unwrap_or_default();
                    let outcome = if value["failed"] == true { "failed" } else { "returned" };
                    writeln!(
                        out,
                        "\n[{name}({arguments}) {outcome} {}]",
                        value["content"].as_str().unwrap_or_default()
                    )?;
                }
                "error" => anyhow::bail!("{}", value["error"]["message"].as_str().unwrap_or("the answer failed")),
                _ => {}
            }
        }
    }
    writeln!(out)?;
    Ok(session_id)
}
