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
    let input = "/help\nWhat is 2+2?\n/plugins\n/run calculator {\"expression\": \"6*7\"}\n/bogus\nAnd 3+3?\n/use nope\nOne more?\n/quit\n";
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 3, "two answers and a tool result: {stdout}\n{stderr}");
    assert!(lines.iter().any(|l| l.starts_with("[tool result]") && l.contains("42")), "{stdout}");
    // The plugins `/use` names go with the next message: one the server does not have is refused, storing nothing.
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert!(errors.len() == 1 && errors[0].contains("no plugin is called `nope`"), "{stderr}");
    assert!(stderr.contains("(the model may call nope)"), "{stderr}");
    // The commands were answered here, not sent to the model.
    for shown in ["/run NAME {JSON}", "calculator(expression)", "[tool call] calculator", "/bogus is not a command"] {
        assert!(stderr.contains(shown), "`{shown}` missing: {stderr}");
    }
    // Both turns went into one session, which the CLI names when it leaves.
    let id = stderr.split("(session ").nth(1).and_then(|s| s.split(')').next()).expect("a session id").to_owned();
    let session: serde_json::Value =
        reqwest::get(format!("{url}/api/sessions/{id}")).await.unwrap().json().await.unwrap();
    assert_eq!(session["message_count"], 6, "{session}");
    assert_eq!(session["messages"][3]["role"], "tool", "the plugin call is in the conversation: {session}");
    assert_eq!(session["messages"][4]["content"], "And 3+3?");

    // Ctrl-C at the prompt does not end the program: it says how to leave, and the next line still works.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_moltbot"))
        .args(["chat", "--url", &url])
        .env_remove("MOLTBOT_API_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = vec![0u8; 256];
    let n = tokio::io::AsyncReadExt::read(&mut stderr, &mut seen).await.unwrap();
    assert!(String::from_utf8_lossy(&seen[..n]).contains("Chatting with"));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"/help\n/quit\n").await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    let mut rest = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut rest).await.unwrap();
    assert!(output.status.success(), "Ctrl-C ended the program: {:?} {rest}", output.status);
    assert!(rest.contains("/quit or Ctrl-D leaves") && rest.contains("/run NAME"), "{rest}");
    moltbot.stop().await.unwrap();
}
