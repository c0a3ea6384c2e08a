//! The embedded shape (`moltbot serve`): every service in one process, in-process queue, embedded store.

use moltbot_tests::{Http, listener, test_config, two_turn_conversation};

/// path, headers, body, expected status, a word the error message must contain
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, u16, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_turns_survive_a_restart_and_bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let moltbot = moltbot::start(config.clone(), listener().await).await.unwrap();
    let http = Http::new(moltbot.gateway_addr);

    assert_eq!(http.get("/health").await, (200, serde_json::json!({ "status": "ok" })));
    assert_eq!(http.get("/ready").await.0, 200);
    let (status, models) = http.get("/v1/models").await;
    assert_eq!((status, models["data"][0]["id"].as_str()), (200, Some("smollm2-135m-instruct")));

    let session = two_turn_conversation(&http).await;

    // Bad input, each with its status and a message that names the problem.
    let cases: &[Case] = &[
        ("/v1/chat/completions", &[], "{not json", 400, "JSON"),
        ("/v1/chat/completions", &[], r#"{"messages":[]}"#, 400, "messages"),
        ("/v1/chat/completions", &[], r#"{"model":"gpt-9","messages":[{"role":"user","content":"hi"}]}"#, 404, "gpt-9"),
        ("/v1/chat/completions", &[], r#"{"messages":[{"role":"wizard","content":"hi"}]}"#, 400, "role"),
        (
            "/v1/chat/completions",
            &[],
            r#"{"messages":[{"role":"user","content":"hi"}],"temperature":9}"#,
            400,
            "temperature",
        ),
        ("/api/chat", &[("x-session-id", "no-such-session")], r#"{"message":"hi"}"#, 404, "no-such-session"),
        ("/api/chat", &[("x-dialogue-mode", "sideways")], r#"{"message":"hi"}"#, 400, "X-Dialogue-Mode"),
        // Another user's session is not found, not forbidden: its existence is not revealed.
        ("/api/chat", &[("x-session-id", &session), ("x-user-id", "mallory")], r#"{"message":"hi"}"#, 404, "not found"),
    ];
    for (path, headers, body, status, needle) in cases {
        let (got, _, error) = http.post(path, headers, body).await;
        assert_eq!(got, *status, "{path} {body}: {error}");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{path} {body}: `{message}` should mention `{needle}`");
    }
    // Just over the 1 MiB limit. The gateway answers 413 without reading the rest and closes the connection,
    // so a client still writing can see a broken pipe instead of the answer (HTTP/1.1 has no way around that
    // race); such a transport error is retried, and some attempt must show the 413.
    let huge = format!(r#"{{"message":"{}"}}"#, "a".repeat(1024 * 1024 + 1024));
    let mut too_large = None;
    for _ in 0..5 {
        match http.try_post("/api/chat", &[], &huge).await {
            Ok((status, _, _)) => {
                too_large = Some(status);
                break;
            }
            Err(e) => eprintln!("oversized body: transport error, retrying: {e}"),
        }
    }
    assert_eq!(too_large, Some(413));

    // Stop and start again on the same store: the conversation is still there.
    moltbot.stop().await.unwrap();
    let moltbot = moltbot::start(config, listener().await).await.unwrap();
    let http = Http::new(moltbot.gateway_addr);
    let (status, _, third) = http
        .post(
            "/api/chat",
            &[("x-user-id", "alice"), ("x-session-id", &session)],
            r#"{"message":"Thanks!","max_tokens":4}"#,
        )
        .await;
    assert_eq!(status, 200, "{third}");
    assert!(third["usage"]["prompt_tokens"].as_u64().unwrap() > 60, "history was lost across the restart: {third}");
    moltbot.stop().await.unwrap();
}

#[tokio::test]
async fn a_missing_model_file_says_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.model_provider.model_path = dir.path().join("missing.gguf");
    let err = moltbot::start(config, listener().await).await.err().expect("start-up fails");
    let message = format!("{err:#}");
    assert!(message.contains("ModelLoadError") && message.contains("cargo xtask model"), "{message}");
}
