//! `remote_api` models: a MoltBot in front of another OpenAI-compatible server (a second MoltBot, which speaks the
//! protocol as OpenAI does, started here), its local model beside them, routed by the `model` each request names.

use std::time::{Duration, Instant};

use moltbot_config::ModelProviderConfig;
use moltbot_tests::{embedded, free_port, remote_api as remote, sse_data, worker_when};
use serde_json::{Value, json};

fn chat(model: &str, content: &str, max_tokens: u32) -> String {
    json!({ "model": model, "messages": [{ "role": "user", "content": content }], "max_tokens": max_tokens, "temperature": 0 })
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_models_are_served_beside_the_local_one_each_request_by_the_model_it_named() {
    let (upstream, upstream_http, _a) = embedded(|c| {
        c.model_provider.model_name = "upstream".into();
        c.model_provider.max_tokens = 1000;
    })
    .await;
    let endpoint = format!("{}/v1", upstream_http.base);
    let (front, http, _b) = embedded(|c| {
        c.models = vec![
            remote("remote-small", &endpoint, "upstream", 1000),
            remote("remote-misnamed", &endpoint, "no-such-model", 8),
            remote("remote-down", &format!("http://127.0.0.1:{}/v1", free_port()), "x", 8),
        ];
        c.dialogue_manager.model_aliases.insert("gpt-4o-mini".into(), "remote-small".into());
    })
    .await;
    let (local_worker, upstream_worker) = (&front.worker_urls[0], &upstream.worker_urls[0]);

    // Every served model is listed, with where it runs and what it takes.
    let (status, models) = http.get("/v1/models").await;
    assert_eq!(status, 200, "{models}");
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["remote-down", "remote-misnamed", "remote-small", "smollm2-135m-instruct"]);
    let card = |id: &str| models["data"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap().clone();
    assert_eq!(card("remote-small")["provider"], "remote_api");
    assert_eq!(card("remote-small")["aliases"], json!(["gpt-4o-mini"]));
    assert_eq!(card("remote-small")["capabilities"], json!({ "tools": true, "vision": false, "json_schema": true }));
    assert_eq!(card("smollm2-135m-instruct")["provider"], "local_llm");
    assert!(card("smollm2-135m-instruct")["context_length"].as_u64().unwrap() >= 2048);
    let (status, one) = http.get("/v1/models/gpt-4o-mini").await;
    assert_eq!((status, one["id"].as_str()), (200, Some("remote-small")), "an alias finds its model");

    // Through an alias to the remote: the upstream's worker ran it, the local one did not.
    let (status, _, answer) = http.post("/v1/chat/completions", &[], &chat("gpt-4o-mini", "What is 2+2?", 6)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model"], "remote-small");
    let usage = &answer["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5, "the remote's usage comes back: {usage}");
    assert!((1..=6).contains(&usage["completion_tokens"].as_u64().unwrap()), "{usage}");
    assert!(!answer["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{answer}");
    assert_eq!(worker_when(upstream_worker, |w| w.jobs_completed == 1).await.jobs_completed, 1);
    // The local model answers its own requests.
    let (status, _, local) = http.post("/v1/chat/completions", &[], &chat("smollm2-135m-instruct", "Hi", 4)).await;
    assert_eq!((status, local["model"].as_str()), (200, Some("smollm2-135m-instruct")), "{local}");
    assert_eq!(worker_when(local_worker, |w| w.jobs_completed == 1).await.jobs_completed, 1);
    assert_eq!(worker_when(upstream_worker, |_| true).await.jobs_completed, 1, "the local model's turn stayed here");

    // A request that names no model (the web UI, /api/chat) gets model_provider's, though several are served.
    let (status, _, plain) = http.post("/api/chat", &[], r#"{"message":"Hi","max_tokens":2}"#).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(worker_when(local_worker, |w| w.jobs_completed == 2).await.jobs_completed, 2);

    // Streamed through the remote: the same greedy answer as the remote gives directly, then the usage.
    let body = json!({
        "model": "remote-small", "messages": [{ "role": "user", "content": "Name a color." }], "max_tokens": 8,
        "temperature": 0, "stream": true, "stream_options": { "include_usage": true },
    });
    let streamed = http.stream("/v1/chat/completions", &body.to_string()).await.text().await.unwrap();
    let events = sse_data(&streamed);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{streamed}");
    let chunks: Vec<Value> = events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(chunks.iter().any(|c| c["usage"]["completion_tokens"].as_u64().is_some_and(|n| n > 0)), "{streamed}");
    let direct = upstream_http.post("/v1/chat/completions", &[], &chat("upstream", "Name a color.", 8)).await.2;
    assert_eq!(text, direct["choices"][0]["message"]["content"].as_str().unwrap(), "{streamed}");

    // What goes wrong: an unknown model is OpenAI's 404; a remote that does not know its model is the operator's
    // error (500, logged), not the user's 404; a remote that is down is a 503 within seconds.
    let (status, _, unknown) = http.post("/v1/chat/completions", &[], &chat("gpt-9", "Hi", 4)).await;
    assert_eq!((status, unknown["error"]["code"].as_str()), (404, Some("model_not_found")), "{unknown}");
    assert_eq!(unknown["error"]["param"], "model");
    let (status, _, misnamed) = http.post("/v1/chat/completions", &[], &chat("remote-misnamed", "Hi", 4)).await;
    assert_eq!(status, 500, "{misnamed}");
    assert!(misnamed["error"]["message"].as_str().unwrap().contains("misconfigured"), "{misnamed}");
    let started = Instant::now();
    let (status, _, down) = http.post("/v1/chat/completions", &[], &chat("remote-down", "Hi", 4)).await;
    assert_eq!(status, 503, "{down}");
    assert!(down["error"]["message"].as_str().unwrap().contains("not reachable"), "{down}");
    assert!(started.elapsed() < Duration::from_secs(10), "a remote that is down took {:?}", started.elapsed());

    // A client that goes away mid-answer: the call to the remote is closed, and the remote stops generating.
    // A long answer asked for: the client leaves long before it could end.
    let body = json!({
        "model": "remote-small", "stream": true, "max_tokens": 1000, "temperature": 0,
        "messages": [{ "role": "user", "content": "Count from one to one thousand in words." }],
    });
    let before = worker_when(upstream_worker, |_| true).await;
    let mut response = http.stream("/v1/chat/completions", &body.to_string()).await;
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 3 {
        seen.push_str(&String::from_utf8_lossy(&response.chunk().await.unwrap().expect("more of the stream")));
    }
    drop(response);
    let after = worker_when(upstream_worker, |w| w.jobs_cancelled > before.jobs_cancelled && w.running == 0).await;
    assert_eq!(after.jobs_cancelled, before.jobs_cancelled + 1, "the remote's job was cancelled");
    assert_eq!(after.running, 0);

    // The official OpenAI Python client, through MoltBot to the remote model: plain, streamed, structured output,
    // the whole tool flow, and errors as the client's own exceptions.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/openai_client.py");
    let output = tokio::process::Command::new("python3").args([script, &http.base, "remote-small"]).output().await;
    let output = output.expect("python3 runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && stdout.contains("openai client: ok"), "{stdout}\n{stderr}");

    front.stop().await.unwrap();
    upstream.stop().await.unwrap();
}

/// OpenAI's streamed answer of `text`, with usage, as server-sent events.
fn sse_answer(text: &str) -> ([(&'static str, &'static str); 1], String) {
    let chunk = |delta: Value, finish: Value| {
        let choices = json!([{ "index": 0, "delta": delta, "finish_reason": finish }]);
        format!("data: {}\n\n", json!({ "object": "chat.completion.chunk", "choices": choices }))
    };
    let usage = json!({ "choices": [], "usage": { "prompt_tokens": 90, "completion_tokens": 5 } });
    let sse = [
        chunk(json!({ "role": "assistant", "content": "" }), Value::Null),
        chunk(json!({ "content": text }), Value::Null),
        chunk(json!({}), json!("stop")),
        format!("data: {usage}\n\ndata: [DONE]\n\n"),
    ];
    ([("content-type", "text/event-stream")], sse.concat())
}

/// Serves `app` on a free loopback port; its OpenAI base URL.
async fn serve(app: axum::Router) -> String {
    let listener = moltbot_tests::listener().await;
    let endpoint = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    endpoint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_rate_limits_is_retried_after_its_retry_after() {
    // An API that refuses each model's first call with 429 and `Retry-After: 1`, and every call of `busy`; it
    // notes when each call came.
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Instant)>::new()));
    let noted = calls.clone();
    let api = move |axum::Json(body): axum::Json<Value>| {
        let noted = noted.clone();
        async move {
            let model = body["model"].as_str().unwrap_or_default().to_owned();
            let mut calls = noted.lock().unwrap();
            let first = !calls.iter().any(|(m, _)| *m == model);
            calls.push((model.clone(), Instant::now()));
            if first || model == "busy" {
                let error = json!({ "error": { "message": "slow down", "type": "rate_limit_error" } });
                let refused = (axum::http::StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], error.to_string());
                return axum::response::IntoResponse::into_response(refused);
            }
            axum::response::IntoResponse::into_response(sse_answer("ok"))
        }
    };
    let endpoint = serve(axum::Router::new().route("/v1/chat/completions", axum::routing::post(api))).await;
    let (front, http, _b) = embedded(|c| {
        c.models = vec![
            remote("patient", &endpoint, "patient", 8),
            ModelProviderConfig { max_retries: 0, ..remote("impatient", &endpoint, "busy", 8) },
        ];
    })
    .await;
    // Refused at first: the worker waits what the remote asked (not its own first backoff of 250 ms), then passes.
    let (status, _, body) = http.post("/v1/chat/completions", &[], &chat("patient", "Hi", 2)).await;
    assert_eq!((status, body["choices"][0]["message"]["content"].as_str()), (200, Some("ok")), "{body}");
    let times: Vec<Instant> = calls.lock().unwrap().iter().map(|(_, at)| *at).collect();
    assert_eq!(times.len(), 2, "one refusal, one answer");
    assert!(times[1] - times[0] >= Duration::from_millis(1000), "retried after {:?}", times[1] - times[0]);
    // Without retries the remote's 429 reaches the client as a 429 with Retry-After.
    let (status, headers, body) = http.post("/v1/chat/completions", &[], &chat("impatient", "Hi", 2)).await;
    assert_eq!(status, 429, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(body["error"]["message"].as_str().unwrap().contains("rate limiting"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("slow down"), "the remote's own words: {body}");
    front.stop().await.unwrap();
}

/// A 1×1 PNG.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

/// An OpenAI-compatible chat-completions server with vision, standing in for one (no vision model's weights can be
/// fetched here). It keeps every request body it gets, and streams back how many images it saw.
async fn vision_api() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = seen.clone();
    let chat = move |axum::Json(body): axum::Json<Value>| {
        let kept = kept.clone();
        async move {
            let images = body["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["content"].as_array())
                .flatten()
                .filter(|part| part["type"] == "image_url")
                .count();
            kept.lock().unwrap().push(body);
            sse_answer(&format!("I see {images} image(s)."))
        }
    };
    let endpoint = serve(axum::Router::new().route("/v1/chat/completions", axum::routing::post(chat))).await;
    (endpoint, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_reach_a_vision_model_intact_stay_with_the_session_and_a_text_model_refuses_them() {
    let (endpoint, seen) = vision_api().await;
    let (front, http, _dir) = embedded(|c| {
        let vision = moltbot_config::Capabilities { vision: true, ..Default::default() };
        c.models = vec![ModelProviderConfig { capabilities: vision, ..remote("vision", &endpoint, "gpt-4o", 64) }];
        c.gateway.max_images = 2;
    })
    .await;
    let image = format!("data:image/png;base64,{PNG}");
    let parts = json!([
        { "type": "text", "text": "What is this?" },
        { "type": "image_url", "image_url": { "url": image, "detail": "low" } },
    ]);
    let ask = |model: &str, content: &Value| {
        json!({ "model": model, "messages": [{ "role": "user", "content": content }], "max_tokens": 8 }).to_string()
    };
    let multi = [("x-dialogue-mode", "multi")];
    let (status, headers, answer) = http.post("/v1/chat/completions", &multi, &ask("vision", &parts)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "I see 1 image(s).");
    assert_eq!(answer["usage"]["prompt_tokens"], 90);
    // The vision API got the request's parts as they were sent: the text, then the image, byte for byte.
    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(first["model"], "gpt-4o");
    assert_eq!(first["messages"].as_array().unwrap().last().unwrap()["content"], parts);

    // The session keeps the image: the next turn shows it to the model again, and the session API returns it.
    let session = headers["x-session-id"].to_str().unwrap().to_owned();
    let next = [("x-session-id", session.as_str())];
    let (status, _, answer) = http.post("/v1/chat/completions", &next, &ask("vision", &json!("And now?"))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "I see 1 image(s).");
    let second = seen.lock().unwrap()[1].clone();
    assert_eq!(second["messages"][0]["content"], parts, "the stored image came back intact: {second}");
    let (status, stored) = http.get(&format!("/api/sessions/{session}")).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["messages"][0]["content"], parts, "{stored}");

    // The same session with a text-only model: it gets a note where the image was, and answers.
    let local = [("x-session-id", session.as_str())];
    let (status, _, answer) =
        http.post("/v1/chat/completions", &local, &ask("smollm2-135m-instruct", &json!("Describe it."))).await;
    assert_eq!(status, 200, "{answer}");

    // A text-only model refuses images, naming the model; the gateway's limits hold.
    let (status, _, refused) = http.post("/v1/chat/completions", &[], &ask("smollm2-135m-instruct", &parts)).await;
    assert_eq!((status, refused["error"]["param"].as_str()), (400, Some("messages")), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("`smollm2-135m-instruct` does not take images"));
    let image_part = json!({ "type": "image_url", "image_url": { "url": image } });
    let three = json!([image_part, image_part, image_part]);
    let (status, _, refused) = http.post("/v1/chat/completions", &[], &ask("vision", &three)).await;
    assert_eq!((status, refused["error"]["param"].as_str()), (400, Some("messages")), "{refused}");
    let remote_url = json!([{ "type": "image_url", "image_url": { "url": "https://example.com/cat.png" } }]);
    let (status, _, refused) = http.post("/v1/chat/completions", &[], &ask("vision", &remote_url)).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "messages[0].content.image_url[0]");
    assert_eq!(seen.lock().unwrap().len(), 2, "no refused request reached the vision API");
    front.stop().await.unwrap();
}
