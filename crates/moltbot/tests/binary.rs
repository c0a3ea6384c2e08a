//! The real `moltbot` binary: `moltbot chat` against a running MoltBot (stdin in, streamed answers out), and
//! `moltbot serve` as an operator watches it (its metrics port, its traces).

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

/// The value of the first series of `name` whose labels include `labels`, in a Prometheus text exposition.
fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        let wanted = labels.iter().all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")));
        (series_name == name && wanted).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exposes_metrics_that_agree_with_the_requests() {
    let dir = tempfile::tempdir().unwrap();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (port, metrics_port) = (free(), free());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_moltbot"))
        .arg("serve")
        .env("MOLTBOT_GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
        .env("MOLTBOT_GATEWAY__METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("MOLTBOT_SESSION_STORE__PATH", dir.path().join("sessions.redb"))
        .env("MOLTBOT_MODEL_PROVIDER__MAX_TOKENS", "256")
        .env("MOLTBOT_LOG__LEVEL", "info")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ready = std::time::Instant::now();
    while !client.get(format!("{base}/ready")).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(ready.elapsed().as_secs() < 120, "moltbot serve did not become ready");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let chat = |body: serde_json::Value| client.post(format!("{base}/v1/chat/completions")).json(&body);

    // A chat the model answers, under the client's request id.
    let response = chat(serde_json::json!({ "messages": [{ "role": "user", "content": "Say hi" }], "max_tokens": 5 }))
        .header("x-request-id", "req-metrics-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-metrics-1", "the client's request id comes back");
    let answer: serde_json::Value = response.json().await.unwrap();
    let usage = &answer["usage"];
    // Malformed JSON: refused by the gateway, no model call; a request id is made for it.
    let malformed = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    assert!(!malformed.headers()["x-request-id"].is_empty());
    // A prompt longer than the model's context: the worker refuses the call.
    let long = chat(serde_json::json!({ "messages": [{ "role": "user", "content": "word ".repeat(20_000) }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 400, "{}", long.text().await.unwrap());

    // A method of the client's own making is not a label value of its own.
    let odd = reqwest::Method::from_bytes(b"RANDOM123").unwrap();
    client.request(odd, format!("{base}/health")).send().await.unwrap();

    // The worker counts a call just after its last event: scraped again until both calls are in.
    let waiting = std::time::Instant::now();
    let exposition = loop {
        let response = client.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().await.unwrap();
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
        let text = response.text().await.unwrap();
        let calls = sample(&text, "moltbot_model_call_duration_seconds_count", &[]).unwrap_or_default();
        if calls >= 2.0 || waiting.elapsed().as_secs() > 10 {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&exposition, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{exposition}"))
    };
    let route = ("route", "/v1/chat/completions");
    assert_eq!(get("moltbot_http_requests_total", &[route, ("status", "200")]), 1.0);
    assert_eq!(get("moltbot_http_requests_total", &[route, ("status", "400")]), 2.0);
    assert_eq!(get("moltbot_http_request_duration_seconds_count", &[route, ("method", "POST")]), 3.0);
    assert!(!exposition.contains("RANDOM123"));
    assert_eq!(get("moltbot_http_requests_total", &[("method", "other")]), 1.0);
    assert_eq!(get("moltbot_model_calls_total", &[("outcome", "success")]), 1.0);
    assert_eq!(get("moltbot_model_calls_total", &[("outcome", "invalid_request")]), 1.0);
    assert_eq!(get("moltbot_model_call_duration_seconds_count", &[]), 2.0);
    assert_eq!(get("moltbot_time_to_first_token_seconds_count", &[]), 1.0);
    assert_eq!(get("moltbot_generation_tokens_total", &[]), usage["completion_tokens"].as_f64().unwrap());
    assert_eq!(get("moltbot_prompt_tokens_total", &[]), usage["prompt_tokens"].as_f64().unwrap());
    // Both chats that reached the dialogue-manager.
    assert_eq!(get("moltbot_chat_duration_seconds_count", &[("outcome", "completed")]), 1.0);
    assert_eq!(get("moltbot_chat_duration_seconds_count", &[("outcome", "refused")]), 1.0);
    assert!(get("moltbot_grpc_requests_total", &[("method", "Chat"), ("code", "Ok")]) >= 2.0);
    assert!(get("moltbot_engine_kv_blocks", &[("state", "free")]) > 0.0);
    assert_eq!(get("moltbot_queue_pending_jobs", &[]), 0.0);
    assert!(get("moltbot_engine_steps_total", &[]) >= 1.0);
    assert!(get("moltbot_engine_step_tokens_total", &[]) >= usage["prompt_tokens"].as_f64().unwrap());
    assert!(get("moltbot_process_resident_memory_bytes", &[]) > 0.0);
    get("moltbot_process_cpu_seconds_total", &[]);
    assert!(get("moltbot_process_memory_limit_bytes", &[]) > 0.0);

    // The exposition passes Prometheus's own linter.
    promtool_check_metrics(&exposition);

    // A client that goes away mid-answer: its turn counts as abandoned, its model call as cancelled.
    let mut streaming = chat(serde_json::json!({
        "messages": [{ "role": "user", "content": "Count to a hundred" }], "max_tokens": 200, "stream": true,
    }))
    .send()
    .await
    .unwrap();
    streaming.chunk().await.unwrap().expect("the answer has begun");
    drop(streaming);
    let waiting = std::time::Instant::now();
    let exposition = loop {
        let text = client.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().await.unwrap();
        let text = text.text().await.unwrap();
        if sample(&text, "moltbot_model_calls_total", &[("outcome", "cancelled")]).is_some() {
            break text;
        }
        assert!(waiting.elapsed().as_secs() < 20, "no cancelled model call:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&exposition, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{exposition}"))
    };
    assert_eq!(get("moltbot_chat_duration_seconds_count", &[("outcome", "abandoned")]), 1.0);
    assert_eq!(get("moltbot_model_requests_total", &[("outcome", "cancelled")]), 1.0);
    assert_eq!(get("moltbot_model_calls_total", &[("outcome", "cancelled")]), 1.0);

    // One access-log line per request, with its request id.
    child.start_kill().unwrap();
    let output = child.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    let line = log
        .lines()
        .find(|l| l.contains("req-metrics-1") && l.contains("moltbot::access"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("POST /v1/chat/completions 200"), "{line}");
    assert!(line.contains(&format!("completion_tokens={}", usage["completion_tokens"])), "{line}");
}

/// Prometheus's own linter passes `exposition`.
fn promtool_check_metrics(exposition: &str) {
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package: apt-get install -y prometheus)");
    promtool.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// An OTLP/gRPC trace collector for the test (the OpenTelemetry protocol's own service): keeps every span.
#[derive(Clone, Default)]
struct Collector(std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let spans = request.into_inner().resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(Default::default()))
    }
}

impl Collector {
    /// A collector serving on a free loopback port, and its endpoint.
    async fn start() -> (Self, String) {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tonic::transport::Server::builder().add_service(TraceServiceServer::new(collector.clone()));
        tokio::spawn(server.serve_with_incoming(incoming));
        (collector, endpoint)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_is_one_trace_across_every_service_under_the_clients_traceparent() {
    let (collector, otlp) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_moltbot"))
        .arg("serve")
        .env("MOLTBOT_GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
        .env("MOLTBOT_GATEWAY__METRICS_LISTEN", "127.0.0.1:0")
        .env("MOLTBOT_SESSION_STORE__PATH", dir.path().join("sessions.redb"))
        .env("MOLTBOT_TELEMETRY__OTLP_ENDPOINT", &otlp)
        // Send spans every 100 ms instead of every 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        // Quiet logs (but the gateway's request lines): the log level must not take spans from the traces.
        .env("MOLTBOT_LOG__LEVEL", "warn,moltbot_gateway=info,moltbot::access=info")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ready = std::time::Instant::now();
    while !client.get(format!("{base}/ready")).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(ready.elapsed().as_secs() < 120, "moltbot serve did not become ready");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .header("traceparent", format!("00-{trace}-{parent}-01"))
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "Say hi" }], "max_tokens": 4 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // The gateway's request, the dialogue-manager's call and turn, and the worker's generation, with its prefill
    // and decode, arrive at the collector as one trace, each under the one before.
    let wanted = ["request", "moltbot.dialogue.v1.Dialogue/Chat", "turn", "generate", "prefill", "decode"];
    let waiting = std::time::Instant::now();
    let spans = loop {
        let spans: Vec<_> = collector.0.lock().unwrap().iter().filter(|s| hex(&s.trace_id) == trace).cloned().collect();
        if wanted.iter().all(|name| spans.iter().any(|s| s.name == *name)) {
            break spans;
        }
        let names: Vec<_> = spans.iter().map(|s| s.name.clone()).collect();
        assert!(waiting.elapsed().as_secs() < 30, "spans of the trace so far: {names:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let span = |name: &str| spans.iter().find(|s| s.name == name).unwrap();
    assert_eq!(hex(&span("request").parent_span_id), parent, "the request is a child of the client's span");
    let chat = span("moltbot.dialogue.v1.Dialogue/Chat");
    assert_eq!(chat.parent_span_id, span("request").span_id, "the dialogue-manager's call is the request's child");
    assert_eq!(span("turn").parent_span_id, chat.span_id, "the turn is the call's child");
    assert_eq!(span("generate").parent_span_id, span("turn").span_id, "the generation is the turn's child");
    assert_eq!(span("prefill").parent_span_id, span("generate").span_id);
    assert_eq!(span("decode").parent_span_id, span("generate").span_id);
    assert!(span("prefill").end_time_unix_nano <= span("decode").start_time_unix_nano);

    // The request's log lines name the trace.
    child.start_kill().unwrap();
    let output = child.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.lines().any(|l| l.contains("moltbot::access") && l.contains(&format!("trace_id={trace}"))), "{log}");
}

/// One MoltBot service run apart by `moltbot run SERVICE`, its log in a file; killed when dropped.
struct Apart {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Apart {
    fn start(service: &str, env: &[(String, String)], dir: &std::path::Path) -> Self {
        let log = dir.join(format!("{service}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_moltbot"))
            .args(["run", service])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("MOLTBOT_LOG__LEVEL", "warn")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }
}

impl Apart {
    /// Waits until the service accepts connections on `port` (the next one may need it at start-up).
    async fn listening(mut self, port: u16) -> Self {
        let started = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            let exited = self.child.try_wait().unwrap();
            assert!(exited.is_none() && started.elapsed().as_secs() < 120, "{} did not start", self.log.display());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self
    }
}

impl Drop for Apart {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {}:\n{}", self.log.display(), std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// The distributed shape as an operator runs it: Redis, NATS and each service its own process. After a chat each
/// service's own metrics port shows its part of it, and the chat is one trace with spans from every service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_apart_each_export_their_metrics_and_join_one_trace() {
    let (redis, nats) = (moltbot_tests::Server::redis(), moltbot_tests::Server::nats());
    let (collector, otlp) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let free = moltbot_tests::free_port;
    let services = ["session-store", "inference-worker", "dialogue-manager", "gateway"];
    let ports: Vec<(u16, u16)> = services.iter().map(|_| (free(), free())).collect();
    let [(store, _), _, (manager, _), (gateway, _)] = ports[..] else { unreachable!() };
    let mut env: Vec<(String, String)> = vec![
        ("MOLTBOT_SESSION_STORE__SESSION_STORE_TYPE".into(), "redis".into()),
        ("MOLTBOT_SESSION_STORE__REDIS__URL".into(), redis.redis_url()),
        ("MOLTBOT_QUEUE__NATS_URL".into(), nats.nats_url()),
        ("MOLTBOT_DIALOGUE_MANAGER__SESSION_STORE_URL".into(), format!("http://127.0.0.1:{store}")),
        ("MOLTBOT_GATEWAY__DIALOGUE_MANAGER_URL".into(), format!("http://127.0.0.1:{manager}")),
        ("MOLTBOT_MODEL_PROVIDER__MAX_TOKENS".into(), "8".into()),
        ("MOLTBOT_TELEMETRY__OTLP_ENDPOINT".into(), otlp),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    for (service, (port, metrics)) in services.iter().zip(&ports) {
        let key = service.to_uppercase().replace('-', "_");
        env.push((format!("MOLTBOT_{key}__LISTEN"), format!("127.0.0.1:{port}")));
        env.push((format!("MOLTBOT_{key}__METRICS_LISTEN"), format!("127.0.0.1:{metrics}")));
    }
    // In order: the dialogue-manager refuses to start without its session-store.
    let mut _running = vec![];
    for (service, (port, _)) in services.iter().zip(&ports) {
        _running.push(Apart::start(service, &env, dir.path()).listening(*port).await);
    }

    let base = format!("http://127.0.0.1:{gateway}");
    let client = reqwest::Client::new();
    let ready = std::time::Instant::now();
    while !client.get(format!("{base}/ready")).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(ready.elapsed().as_secs() < 120, "the gateway did not become ready");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A multi-turn chat (a session in Redis) under the client's trace, and at the same time another chat that a
    // careless client sends with the same X-Request-Id: each is its own job on NATS, and each is answered.
    let (trace, parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let chat = |body: serde_json::Value| {
        client.post(format!("{base}/v1/chat/completions")).header("x-request-id", "same-id").json(&body)
    };
    let hi = serde_json::json!({ "messages": [{ "role": "user", "content": "Say hi" }], "max_tokens": 5 });
    let bye = serde_json::json!({ "messages": [{ "role": "user", "content": "Say bye" }], "max_tokens": 5 });
    let traced = chat(hi).header("traceparent", format!("00-{trace}-{parent}-01")).header("x-dialogue-mode", "multi");
    let (first, second) = tokio::join!(traced.send(), chat(bye).send());
    let mut completion = 0.0;
    for response in [first.unwrap(), second.unwrap()] {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-request-id"], "same-id");
        let answer: serde_json::Value = response.json().await.unwrap();
        completion += answer["usage"]["completion_tokens"].as_f64().unwrap();
    }
    // A prompt longer than the model's context: the worker refuses it, and both sides count the refusal.
    let long = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "word ".repeat(20_000) }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 400);

    // A worker counts a call just after its last event, which may be after the answer arrived: scraped again
    // until its three calls are in.
    let waiting = std::time::Instant::now();
    let scraped = loop {
        let mut scraped = vec![];
        for (_, metrics) in &ports {
            let url = format!("http://127.0.0.1:{metrics}/metrics");
            scraped.push(client.get(url).send().await.unwrap().text().await.unwrap());
        }
        let calls: f64 = ["success", "invalid_request"]
            .iter()
            .filter_map(|outcome| sample(&scraped[1], "moltbot_model_calls_total", &[("outcome", outcome)]))
            .sum();
        if calls >= 3.0 || waiting.elapsed().as_secs() > 10 {
            break scraped;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    for (service, text) in services.iter().zip(&scraped) {
        promtool_check_metrics(text);
        assert!(sample(text, "moltbot_process_resident_memory_bytes", &[]).is_some_and(|v| v > 0.0), "{service}");
    }
    let [store_m, worker_m, manager_m, gateway_m] = &scraped[..] else { unreachable!() };
    let get = |text: &str, name: &str, labels: &[(&str, &str)]| {
        sample(text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
    };
    // The gateway: HTTP requests and turns; no engine of its own.
    let route = ("route", "/v1/chat/completions");
    assert_eq!(get(gateway_m, "moltbot_http_requests_total", &[route, ("status", "200")]), 2.0);
    assert_eq!(get(gateway_m, "moltbot_http_requests_total", &[route, ("status", "400")]), 1.0);
    assert_eq!(get(gateway_m, "moltbot_chat_duration_seconds_count", &[("outcome", "completed")]), 2.0);
    assert_eq!(get(gateway_m, "moltbot_chat_duration_seconds_count", &[("outcome", "refused")]), 1.0);
    assert!(!gateway_m.contains("moltbot_engine_") && !gateway_m.contains("moltbot_model_calls_total"));
    // The dialogue-manager: both model calls as the turns saw them, and how long each waited for a worker.
    assert_eq!(get(manager_m, "moltbot_model_requests_total", &[("outcome", "success")]), 2.0);
    assert_eq!(get(manager_m, "moltbot_model_requests_total", &[("outcome", "invalid_request")]), 1.0);
    assert_eq!(get(manager_m, "moltbot_queue_wait_seconds_count", &[]), 3.0);
    assert!(get(manager_m, "moltbot_grpc_requests_total", &[("method", "Chat")]) >= 3.0);
    get(manager_m, "moltbot_queue_pending_jobs", &[]);
    // The session-store: the session the multi turn made, and its calls.
    assert_eq!(get(store_m, "moltbot_sessions_created_total", &[]), 1.0);
    assert!(get(store_m, "moltbot_grpc_requests_total", &[("method", "AppendMessages"), ("code", "Ok")]) >= 1.0);
    // The store counts its sessions in use every 10 s.
    let (store_metrics, counting) = (ports[0].1, std::time::Instant::now());
    loop {
        let url = format!("http://127.0.0.1:{store_metrics}/metrics");
        let text = client.get(url).send().await.unwrap().text().await.unwrap();
        if sample(&text, "moltbot_sessions_active", &[]) == Some(1.0) {
            break;
        }
        assert!(counting.elapsed().as_secs() < 20, "the session is not counted as active:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    // The worker: its calls, the tokens the answer's usage names, its engine.
    assert_eq!(get(worker_m, "moltbot_model_calls_total", &[("outcome", "success")]), 2.0);
    assert_eq!(get(worker_m, "moltbot_model_calls_total", &[("outcome", "invalid_request")]), 1.0);
    assert_eq!(get(worker_m, "moltbot_generation_tokens_total", &[]), completion);
    assert!(get(worker_m, "moltbot_engine_kv_blocks", &[("state", "free")]) > 0.0);
    assert!(!worker_m.contains("moltbot_http_requests_total"));

    // One trace: the gateway's request, the dialogue-manager's call and turn, the session-store's calls, the
    // worker's generation with its prefill and decode, each from its own process.
    let waiting = std::time::Instant::now();
    let spans = loop {
        let spans: Vec<_> = collector.0.lock().unwrap().iter().filter(|s| hex(&s.trace_id) == trace).cloned().collect();
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        let wanted = ["request", "moltbot.dialogue.v1.Dialogue/Chat", "turn", "generate", "prefill", "decode"];
        if wanted.iter().all(|n| names.contains(n))
            && names.iter().filter(|n| n.starts_with("moltbot.session.v1.SessionStore/")).count() >= 2
        {
            break spans;
        }
        assert!(waiting.elapsed().as_secs() < 30, "spans of the trace so far: {names:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let span = |name: &str| spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no span {name}"));
    let chat = span("moltbot.dialogue.v1.Dialogue/Chat");
    assert_eq!(hex(&span("request").parent_span_id), parent);
    assert_eq!(chat.parent_span_id, span("request").span_id, "the dialogue-manager's call is the request's child");
    assert_eq!(span("turn").parent_span_id, chat.span_id);
    assert_eq!(span("generate").parent_span_id, span("turn").span_id, "the job carried the turn's context");
    let store_calls = spans.iter().filter(|s| s.name.starts_with("moltbot.session.v1.SessionStore/"));
    assert!(store_calls.clone().all(|s| s.parent_span_id == span("turn").span_id), "the session-store's calls");
    assert!(store_calls.count() >= 2, "the turn read and saved its session");
}
