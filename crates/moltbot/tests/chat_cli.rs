//! `moltbot chat` against a running MoltBot: the real binary, stdin in, streamed answers out.

use std::{io::Write, process::Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_answers_and_keeps_the_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = moltbot_config::Config::default();
    config.model_provider.max_tokens = 8;
    config.session_store.session_store_type = moltbot_config::SessionStoreType::Persistent;
    config.session_store.path = dir.path().join("sessions.redb");
    let model = moltbot_config::default_model_path();
    assert!(model.is_file(), "model missing at {}: run `cargo xtask model`", model.display());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let moltbot = moltbot::start(config, listener).await.unwrap();
    let url = format!("http://{}", moltbot.gateway_addr);

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_moltbot"))
        .args(["chat", "--url", &url])
        .env_remove("MOLTBOT_API_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"What is 2+2?\nAnd 3+3?\n/quit\n").unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{stderr}");
    assert_eq!(stdout.lines().filter(|l| !l.trim().is_empty()).count(), 2, "two answers: {stdout}\n{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    // Both turns went into one session, which the CLI names when it leaves.
    let id = stderr.split("(session ").nth(1).and_then(|s| s.split(')').next()).expect("a session id").to_owned();
    let session: serde_json::Value =
        reqwest::get(format!("{url}/api/sessions/{id}")).await.unwrap().json().await.unwrap();
    assert_eq!(session["message_count"], 4, "{session}");
    assert_eq!(session["messages"][2]["content"], "And 3+3?");
    moltbot.stop().await.unwrap();
}
