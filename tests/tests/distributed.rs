//! The distributed shape: real redis-server and nats-server -js processes, and every service as its own
//! server on its own port — session-store on Redis, inference workers pulling from JetStream, the
//! dialogue-manager and the gateway — talking over gRPC and NATS.

use std::time::Duration;

mod hosts;

use moltbot_config::QueueConfig;
use moltbot_proto::inference::v1::{
    GenerateEvent, GetModelInfoRequest, Started, Token, generate_event::Event, inference_client::InferenceClient,
};
use moltbot_queue::{JobQueue, NatsQueue};
use moltbot_tests::{Cluster, sse_data, two_turn_conversation};
use redis::AsyncCommands;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_turns_through_redis_and_nats_with_two_workers() {
    let cluster = Cluster::start(2, |_| {}).await;
    let http = &cluster.http;
    let session = two_turn_conversation(http).await;

    // The session is in Redis, readable by anyone who looks: both questions and both answers, in order.
    let redis = redis::Client::open(cluster.redis.redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    // Ids are per user: the key holds the owner's scope.
    let key = format!("moltbot:session:{}", moltbot_session_store::stored_id("alice", &session));
    let owner: String = conn.hget(&key, "user_id").await.unwrap();
    assert_eq!(owner, "alice");
    let stored: Vec<String> = conn.lrange(format!("{key}:messages"), 0, -1).await.unwrap();
    let stored: Vec<serde_json::Value> = stored.iter().map(|m| serde_json::from_str(m).unwrap()).collect();
    let roles: Vec<&str> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(stored[0]["content"], "What is 2+2?");
    assert_eq!(stored[2]["content"], "And 3+3?");
    let ttl: i64 = conn.ttl(&key).await.unwrap();
    assert!(ttl > 0 && ttl <= 1800, "sessions expire (ttl {ttl})");

    // Concurrent conversations spread over both workers: each is offered to the worker it hashes to, which takes
    // new conversations only while lightly loaded, and the rest go to the shared queue, pulled by free slots.
    let bodies: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"messages":[{{"role":"user","content":"Count to five, chat {i}."}}],"max_tokens":12}}"#))
        .collect();
    let chats = bodies.iter().map(|body| http.post("/v1/chat/completions", &[], body));
    for (status, _, answer) in futures::future::join_all(chats).await {
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["object"], "chat.completion");
    }
    let infos = cluster.workers_when(|w| w.iter().map(|w| w.jobs_completed).sum::<u64>() >= 10).await;
    let jobs: Vec<u64> = infos.iter().map(|w| w.jobs_completed).collect();
    assert!(jobs.iter().all(|&n| n >= 1), "every worker takes jobs: {jobs:?}");
    // Finished jobs publish nothing more: no cancel for a job that ended (only abandoned ones get one).
    let cancels = remembered_cancels(&cluster).await;
    assert_eq!(cancels, 0, "{cancels} cancels were published for finished jobs");
    cluster.stop().await;
}

/// One turn through `/v1/chat/completions`: the answer's text and its usage (prompt and cached tokens).
async fn turn(
    http: &moltbot_tests::Http,
    headers: &[(&str, &str)],
    messages: &serde_json::Value,
) -> (String, u64, u64, String) {
    let body = serde_json::json!({ "messages": messages, "max_tokens": 16, "temperature": 0 }).to_string();
    let (status, response_headers, answer) = http.post("/v1/chat/completions", headers, &body).await;
    assert_eq!(status, 200, "{answer}");
    let session = response_headers.get("x-session-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let usage = &answer["usage"];
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    (
        text,
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap(),
        session,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversations_turns_go_to_the_worker_that_holds_its_prefix() {
    let mut cluster = Cluster::start(2, |_| {}).await;
    // The client resends its history, as every OpenAI client does: each turn after the first finds the previous
    // one's prompt in its worker's cache (less the block where the answer joins, tokenized anew).
    let mut messages = vec![serde_json::json!({ "role": "system", "content": "You are a patient maths tutor." })];
    let mut last_prompt = 0;
    for question in ["What is 2+2?", "And 3+3?", "And 4+4?", "And 5+5?"] {
        messages.push(serde_json::json!({ "role": "user", "content": question }));
        let (text, prompt, cached, _) = turn(&cluster.http, &[], &serde_json::json!(messages)).await;
        assert!(
            cached + 32 >= last_prompt,
            "{question}: {cached} of {prompt} prompt tokens cached; the last turn had {last_prompt}"
        );
        last_prompt = prompt;
        messages.push(serde_json::json!({ "role": "assistant", "content": text }));
    }
    let infos = cluster.workers_when(|w| w.iter().map(|w| w.jobs_completed).sum::<u64>() >= 4).await;
    let jobs: Vec<u64> = infos.iter().map(|w| w.jobs_completed).collect();
    assert!(jobs.contains(&4), "all four turns ran on one worker: {jobs:?}");
    // The same with the history in a server-side session.
    let new = serde_json::json!([{ "role": "user", "content": "Name a prime number." }]);
    let (_, mut last_prompt, _, session) = turn(&cluster.http, &[("x-dialogue-mode", "multi")], &new).await;
    for question in ["Another one?", "And one more?"] {
        let message = serde_json::json!([{ "role": "user", "content": question }]);
        let (_, prompt, cached, _) = turn(&cluster.http, &[("x-session-id", &session)], &message).await;
        assert!(cached + 32 >= last_prompt, "session, {question}: {cached} of {prompt} cached; last {last_prompt}");
        last_prompt = prompt;
    }
    // The worker that holds the first conversation stops: its next turn goes to the other one at once.
    let infos = cluster.worker_info().await;
    let holder = infos.iter().position(|w| w.jobs_completed >= 4).expect("the first conversation's worker");
    let addr = cluster.worker_urls[holder].trim_start_matches("http://").parse().unwrap();
    cluster.stop_service(addr).await;
    messages.push(serde_json::json!({ "role": "user", "content": "And 6+6?" }));
    let started = std::time::Instant::now();
    let (text, _, _, _) = turn(&cluster.http, &[], &serde_json::json!(messages)).await;
    assert!(!text.is_empty());
    assert!(started.elapsed() < Duration::from_secs(10), "the turn waited for the stopped worker");
    cluster.stop().await;
}

/// How many cancels the `MOLTBOT_CANCELS` stream holds.
async fn remembered_cancels(cluster: &Cluster) -> u64 {
    let client = async_nats::connect(cluster.nats.nats_url()).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("MOLTBOT_CANCELS").await.expect("the cancel stream");
    stream.info().await.expect("stream info").state.messages
}

/// Takes the next job like a worker would, reports it started (and optionally a token), then "dies":
/// no more events, no heartbeats.
async fn take_job_and_die(nats_url: &str, model: &str, token: Option<&str>) {
    let config = QueueConfig { nats_url: nats_url.into(), max_pending_jobs: 64, ..Default::default() };
    let queue = JobQueue::nats(&config).await.unwrap();
    // It announces itself as workers do, so the dialogue-manager knows the model is served.
    let card = moltbot_proto::common::v1::ModelCard { id: model.into(), max_output_tokens: 200, ..Default::default() };
    queue.announce(&card, "doomed").await.unwrap();
    let mut consumer = queue.consumer(model).await.unwrap();
    let running = tokio_util::sync::CancellationToken::new();
    let job = tokio::time::timeout(Duration::from_secs(30), consumer.next_job(&running))
        .await
        .expect("the doomed worker got no job within 30 s")
        .unwrap()
        .expect("a job, not a stop");
    let started = Started { worker_id: "doomed".into(), prompt_tokens: 1, ..Default::default() };
    job.publish(GenerateEvent { event: Some(Event::Started(started)) }).await.unwrap();
    if let Some(text) = token {
        let token = Token { text: text.into(), token_id: Some(1) };
        job.publish(GenerateEvent { event: Some(Event::Token(token)) }).await.unwrap();
    }
    // What it sent reached NATS before it "died" (dropping its connection would lose unsent events).
    job.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_before_answering_is_replaced_and_one_that_dies_mid_answer_is_a_503() {
    // Single-slot workers, so that a busy live worker leaves the next job to the doomed one.
    let mut cluster = Cluster::start(0, |c| {
        c.dialogue_manager.worker_timeout = 2;
        c.inference_worker.max_batch_size = 1;
        c.model_provider.max_tokens = 200;
    })
    .await;
    let (nats, model) = (cluster.nats.nats_url(), cluster.config.model_provider.model_name.clone());
    let body = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":4}"#;

    // Dies before streaming anything: the dialogue-manager queues the job again and a live worker answers.
    let doomed = tokio::spawn({
        let (nats, model) = (nats.clone(), model.clone());
        async move { take_job_and_die(&nats, &model, None).await }
    });
    let http = cluster.http.clone();
    let request = http.post("/v1/chat/completions", &[], body);
    let (result, _) = tokio::join!(request, async {
        doomed.await.unwrap();
        cluster.add_worker("rescuer").await;
    });
    let (status, _, answer) = result;
    assert_eq!(status, 200, "{answer}");
    assert!(!answer["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{answer}");

    // Dies after streaming a token: the answer cannot be completed, so the client gets a clear 503 — within
    // the worker timeout, not a hang. The live (single-slot) worker is made busy first: a streaming response
    // only starts once a worker has reported the job started, so after `send` it cannot take the next job.
    // 200 tokens by construction: the live worker stays busy while the doomed one takes the next job, whatever the
    // model would have said.
    let long = r#"{"messages":[{"role":"user","content":"Tell a long story."}],"max_tokens":200,"min_tokens":200,"stream":true}"#;
    let busy = cluster.http.stream("/v1/chat/completions", long).await;
    assert_eq!(busy.status(), 200);
    let stream_body = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":4,"stream":true}"#;
    let request = cluster.http.post("/v1/chat/completions", &[], stream_body);
    let ((status, _, streamed), ()) = tokio::join!(request, take_job_and_die(&nats, &model, Some("Hel")));
    assert!(busy.text().await.unwrap().contains("[DONE]"), "the live worker finishes its own answer");
    assert_eq!(status, 200, "streaming had begun: {streamed}");
    let events = sse_data(streamed.as_str().unwrap());
    let error = events.iter().find(|e| e.contains("\"error\"")).expect("an error event ends the stream");
    assert!(error.contains("503") && error.contains("stopped responding"), "{error}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_generation_and_its_session_keeps_what_it_saw() {
    let cluster = Cluster::start(1, |c| c.model_provider.max_tokens = 3000).await;
    let (status, session) = cluster.http.call("POST", "/api/sessions", &[], None).await;
    assert_eq!(status, 201, "{session}");
    let id = session["id"].as_str().unwrap();
    // 3000 tokens by construction (min_tokens) take far longer than this test waits: only a cancel can end the
    // job early.
    let body = format!(
        r#"{{"session_id":"{id}","message":"Count from 1 to 1000, separated by commas.","max_tokens":3000,"min_tokens":3000,"stream":true,"temperature":0,"repetition_penalty":1.0}}"#
    );
    let mut response = cluster.http.stream("/api/chat", &body).await;
    assert_eq!(response.status(), 200);
    // Read a few tokens, then hang up.
    let mut seen = String::new();
    while seen.matches("event: delta").count() < 4 {
        seen.push_str(&String::from_utf8_lossy(&response.chunk().await.unwrap().expect("more of the stream")));
    }
    drop(response);
    let worker = cluster.first_worker_when(|w| w.jobs_completed == 1 && w.kv_blocks_free == w.kv_blocks_total).await;
    assert_eq!((worker.jobs_completed, worker.jobs_cancelled), (1, 1), "the worker should stop for a departed client");
    assert_eq!(worker.kv_blocks_free, worker.kv_blocks_total, "the cancelled sequence's KV blocks are freed");
    assert_eq!((worker.running, worker.waiting), (0, 0));

    // The stopped turn stays in the session: the question and the answer as far as it was streamed.
    let (status, session) = cluster.http.get(&format!("/api/sessions/{id}")).await;
    assert_eq!(status, 200, "{session}");
    let messages = session["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{session}");
    assert_eq!(messages[0]["content"], "Count from 1 to 1000, separated by commas.");
    let answer = messages[1]["content"].as_str().unwrap();
    let streamed: String = moltbot_tests::sse_data(&seen)
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok()?["text"].as_str().map(str::to_owned))
        .collect();
    assert!(answer.starts_with(&streamed) && answer.len() < 3000, "saw {streamed:?}, kept {answer:?}");
    // Its lock is gone: the session takes the next turn at once.
    let next = format!(r#"{{"session_id":"{id}","message":"Stop.","max_tokens":2}}"#);
    let (status, _, answer) = cluster.http.post("/api/chat", &[], &next).await;
    assert_eq!(status, 200, "{answer}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_while_its_job_waits_cancels_it_before_any_work() {
    let cluster = Cluster::start(1, |c| {
        c.model_provider.max_tokens = 3000;
        c.inference_worker.max_batch_size = 1;
    })
    .await;
    let counting = r#"{"message":"Count from 1 to 1000, separated by commas.","max_tokens":3000,"min_tokens":3000,"stream":true,"temperature":0,"repetition_penalty":1.0}"#;
    // The worker's one slot is busy, so the next job waits in the queue; its client hangs up there.
    let mut busy = cluster.http.stream("/api/chat", counting).await;
    busy.chunk().await.unwrap().expect("the first answer has begun");
    let waiting = cluster.http.stream("/api/chat", counting).await;
    assert_eq!(waiting.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(waiting);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = cluster.worker_info().await;
    assert_eq!((info[0].running, info[0].jobs_completed), (1, 0), "the second job still waits in the queue");
    // The slot frees; the worker takes the waiting job and drops it at once.
    drop(busy);
    let worker = cluster.first_worker_when(|w| w.jobs_completed == 2).await;
    assert_eq!(
        (worker.jobs_completed, worker.jobs_cancelled, worker.jobs_cancelled_in_queue),
        (2, 2, 1),
        "both jobs end by cancel, the second before any work"
    );

    // The same on /v1, whose streamed response has not even begun while its job waits: the client hangs up
    // before it has a status line.
    let mut busy = cluster.http.stream("/api/chat", counting).await;
    busy.chunk().await.unwrap().expect("the third answer has begun");
    let http = cluster.http.clone();
    let openai = r#"{"messages":[{"role":"user","content":"Count to 1000."}],"max_tokens":3000,"min_tokens":3000,"stream":true}"#;
    let waiting = tokio::spawn(async move { http.stream("/v1/chat/completions", openai).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    waiting.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(busy);
    let worker = cluster.first_worker_when(|w| w.jobs_completed == 4).await;
    assert_eq!((worker.jobs_completed, worker.jobs_cancelled_in_queue), (4, 2));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_that_outlasts_its_lock_lease_keeps_the_session_to_itself() {
    // A one-second lease, renewed every third of a second; the first turn runs for several.
    let cluster = Cluster::start(1, |c| {
        c.model_provider.max_tokens = 300;
        c.dialogue_manager.session_lock_lease = 1;
    })
    .await;
    let (status, session) = cluster.http.call("POST", "/api/sessions", &[], None).await;
    assert_eq!(status, 201, "{session}");
    let id = session["id"].as_str().unwrap().to_owned();
    let count = "Count from 1 to 1000, separated by commas.";
    // 300 tokens by construction, whatever the machine's kernels make of the count.
    let long = format!(
        r#"{{"session_id":"{id}","message":"{count}","max_tokens":300,"min_tokens":300,"temperature":0,"repetition_penalty":1.0}}"#
    );
    let http = cluster.http.clone();
    let first = tokio::spawn(async move { http.post("/api/chat", &[], &long).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let short = format!(r#"{{"session_id":"{id}","message":"Stop.","max_tokens":2}}"#);
    let (status, _, second) = cluster.http.post("/api/chat", &[], &short).await;
    assert_eq!(status, 200, "{second}");
    let (status, _, first) = first.await.unwrap();
    assert_eq!((status, first["finish_reason"].as_str()), (200, Some("length")), "{first}");
    // The second turn waited for the first to be saved: the session holds them in order, not interleaved.
    let (_, session) = cluster.http.get(&format!("/api/sessions/{id}")).await;
    let contents: Vec<&str> =
        session["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    let expected =
        [count, first["message"]["content"].as_str().unwrap(), "Stop.", second["message"]["content"].as_str().unwrap()];
    assert_eq!(contents, expected);
    cluster.stop().await;
}

#[tokio::test]
async fn unreachable_redis_and_nats_fail_start_up_with_the_fix() {
    // A deployment's credentials ride in the addresses; the messages name the user, never the password.
    let mut config = moltbot_config::Config::default();
    config.session_store.redis.url = format!("redis://moltbot:hunter2@127.0.0.1:{}", moltbot_tests::free_port());
    let err =
        moltbot_session_store::open_backend(&config.session_store).await.err().expect("redis is down").to_string();
    assert!(err.contains("not reachable") && err.contains("redis-server"), "{err}");
    assert!(err.contains("moltbot:***@") && !err.contains("hunter2"), "{err}");
    config.queue.nats_url = format!("nats://worker:hunter2@127.0.0.1:{}", moltbot_tests::free_port());
    let err = NatsQueue::connect(&config.queue).await.err().expect("nats is down").to_string();
    assert!(err.contains("not reachable") && err.contains("nats-server -js"), "{err}");
    assert!(err.contains("worker:***@") && !err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_turns_on_one_session_are_serialized_and_none_is_lost() {
    let cluster = Cluster::start(1, |c| {
        // A small window keeps each turn's prompt short however long the conversation grows: the history is
        // trimmed to its newest turns, which this test exercises too.
        c.model_provider.context_length = 160;
        c.model_provider.max_tokens = 2;
        c.gateway.max_concurrent_requests = 64;
        c.gateway.max_concurrent_per_user = 64;
        c.gateway.request_timeout = 600;
        c.dialogue_manager.session_lock_wait = 600;
    })
    .await;
    let alice = [("x-user-id", "alice"), ("x-dialogue-mode", "multi")];
    let (status, _, first) = cluster.http.post("/api/chat", &alice, r#"{"message":"Hi","max_tokens":1}"#).await;
    assert_eq!(status, 200, "{first}");
    let session = first["session_id"].as_str().unwrap().to_owned();

    let turns = (1..50).map(|i| {
        let (http, session) = (cluster.http.clone(), session.clone());
        tokio::spawn(async move {
            let headers = [("x-user-id", "alice"), ("x-session-id", session.as_str())];
            let body = format!(r#"{{"message":"Turn {i}","temperature":0}}"#);
            http.post("/api/chat", &headers, &body).await
        })
    });
    let mut longest_prompt = 0;
    for turn in futures::future::join_all(turns).await {
        let (status, _, body) = turn.unwrap();
        assert_eq!(status, 200, "{body}");
        longest_prompt = longest_prompt.max(body["usage"]["prompt_tokens"].as_u64().unwrap());
    }
    // Turns read the history only once the previous turn is saved: later turns see many earlier ones (until the
    // window trims them). Without the lock, all would have read the same one-turn history at once.
    assert!(longest_prompt > 100, "no turn saw the turns before it: at most {longest_prompt} prompt tokens");

    let info = cluster.first_worker_when(|w| w.jobs_completed >= 50).await;
    assert_eq!(info.jobs_completed, 50);
    let mut store = moltbot_dialogue_manager::connect_session_store(&cluster.session_store_url, &cluster.credential())
        .await
        .unwrap();
    let request = moltbot_proto::session::v1::GetSessionRequest {
        session_id: session,
        user_id: "alice".into(),
        ..Default::default()
    };
    let messages = store.get_session(request).await.unwrap().into_inner().messages;
    assert_eq!(messages.len(), 100, "every turn saved exactly once");
    let mut seen = std::collections::BTreeSet::new();
    for (k, pair) in messages.chunks_exact(2).enumerate() {
        assert_eq!((pair[0].role.as_str(), pair[1].role.as_str()), ("user", "assistant"), "turn {k} interleaved");
        assert!(seen.insert(pair[0].content.clone()), "{} saved twice", pair[0].content);
    }
    assert!(seen.contains("Hi") && (1..50).all(|i| seen.contains(&format!("Turn {i}"))));
    cluster.stop().await;
}

/// Alice's first turn, which starts a session; returns its id.
async fn alice_starts(cluster: &Cluster) -> String {
    let headers = [("x-user-id", "alice"), ("x-dialogue-mode", "multi")];
    let (status, _, first) = cluster.http.post("/api/chat", &headers, r#"{"message":"Hi","max_tokens":2}"#).await;
    assert_eq!(status, 200, "{first}");
    first["session_id"].as_str().expect("a session id").to_owned()
}

/// One `/api/chat` turn of alice's in `session`; returns the status and body.
async fn alice_says(cluster: &Cluster, session: &str, message: &str) -> (u16, serde_json::Value) {
    let headers = [("x-user-id", "alice"), ("x-session-id", session)];
    let body = serde_json::json!({ "message": message, "max_tokens": 2 }).to_string();
    let (status, _, body) = cluster.http.post("/api/chat", &headers, &body).await;
    (status, body)
}

#[tokio::test]
async fn a_session_lives_while_it_is_used_and_expires_when_idle() {
    let cluster = Cluster::start(1, |c| c.session_store.session_ttl = 4).await;
    let session = alice_starts(&cluster).await;
    // Two turns 2.5 s apart: together longer than the 4 s TTL, each within it (with room for a busy machine), so
    // the TTL slides.
    for message in ["Still here", "And again"] {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let (status, body) = alice_says(&cluster, &session, message).await;
        assert_eq!(status, 200, "an active session expired: {body}");
    }
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let (status, body) = alice_says(&cluster, &session, "Anyone?").await;
    assert_eq!(status, 404, "an idle session must expire, not start over: {body}");
    assert_eq!(body["error"]["type"], "not_found_error", "{body}");
    cluster.stop().await;
}

#[tokio::test]
async fn sessions_survive_a_redis_crash_with_aof() {
    let mut cluster = Cluster::start(1, |_| {}).await;
    let session = alice_starts(&cluster).await;
    assert_eq!(alice_says(&cluster, &session, "Second").await.0, 200);

    cluster.redis.crash_and_restart();
    // The session-store's pooled connections died with Redis; the pool replaces them on the next calls.
    let mut store = moltbot_dialogue_manager::connect_session_store(&cluster.session_store_url, &cluster.credential())
        .await
        .unwrap();
    let request = moltbot_proto::session::v1::GetSessionRequest {
        session_id: session.clone(),
        user_id: "alice".into(),
        ..Default::default()
    };
    let mut messages = None;
    for _ in 0..50 {
        match store.get_session(request.clone()).await {
            Ok(s) => {
                messages = Some(s.into_inner().messages);
                break;
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("the session is gone after the restart: {status}"),
        }
    }
    let messages = messages.expect("the session-store reconnects to Redis");
    let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(messages.len(), 4, "{contents:?}");
    assert_eq!((contents[0], contents[2]), ("Hi", "Second"));
    let (status, body) = alice_says(&cluster, &session, "Third").await;
    assert_eq!(status, 200, "{body}");
    cluster.stop().await;
}

#[tokio::test]
async fn the_sessions_api_pages_and_hides_other_users_sessions() {
    let cluster = Cluster::start(1, |_| {}).await;
    let http = &cluster.http;
    let (alice, bob) = ([("x-user-id", "alice")], [("x-user-id", "bob")]);
    let (status, created) = http.call("POST", "/api/sessions", &alice, None).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.len() >= 32 && id.chars().all(|c| c.is_ascii_hexdigit()), "128 random bits, URL-safe: {id}");
    assert_eq!(created["messages"], serde_json::json!([]));
    let (status, _) = http.call("POST", "/api/sessions", &alice, Some(r#"{"id":"alice-notes"}"#)).await;
    assert_eq!(status, 201);
    let (status, body) = http.call("POST", "/api/sessions", &alice, Some(r#"{"id":"alice-notes"}"#)).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = http.call("POST", "/api/sessions", &alice, Some("{not json")).await;
    assert_eq!(status, 400, "{body}");

    let (status, hello) = alice_says(&cluster, &id, "Hello").await;
    assert_eq!(status, 200, "{hello}");
    assert_eq!(alice_says(&cluster, &id, "Goodbye").await.0, 200);
    let path = format!("/api/sessions/{id}");
    let (status, session) = http.call("GET", &path, &alice, None).await;
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["message_count"], 4);
    let roles: Vec<&str> =
        session["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    let (_, page) = http.call("GET", &format!("{path}?offset=2&limit=1"), &alice, None).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["messages"][0]["content"], "Goodbye");
    assert_eq!(page["message_count"], 4, "the count is the whole session's");
    let (status, body) = http.call("GET", &format!("{path}?limit=0"), &alice, None).await;
    assert_eq!(status, 400, "{body}");

    // Most recently used first, paged.
    let (_, listed) = http.call("GET", "/api/sessions", &alice, None).await;
    let ids: Vec<&str> = listed["sessions"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id.as_str(), "alice-notes"], "{listed}");
    let (_, second) = http.call("GET", "/api/sessions?offset=1&limit=1", &alice, None).await;
    assert_eq!(second["sessions"][0]["id"], "alice-notes");

    // Bob sees nothing of Alice's: every route answers as if the session did not exist.
    let (_, listed) = http.call("GET", "/api/sessions", &bob, None).await;
    assert_eq!(listed["sessions"], serde_json::json!([]));
    assert_eq!(http.call("GET", &path, &bob, None).await.0, 404);
    assert_eq!(http.call("DELETE", &path, &bob, None).await.0, 404);
    let bob_in_alices = [("x-user-id", "bob"), ("x-session-id", id.as_str())];
    let (status, _, body) = http.post("/api/chat", &bob_in_alices, r#"{"message":"Hi"}"#).await;
    assert_eq!(status, 404, "{body}");
    let openai = r#"{"messages":[{"role":"user","content":"Hi"}]}"#;
    let (status, _, body) = http.post("/v1/chat/completions", &bob_in_alices, openai).await;
    assert_eq!(status, 404, "{body}");

    // Settings: metadata, a system prompt that leads every turn, and the session's own lifetime.
    let body = r#"{"id":"alice-brief","metadata":{"topic":"maths"},"system_prompt":"Answer in one word.","ttl":600}"#;
    let (status, brief) = http.call("POST", "/api/sessions", &alice, Some(body)).await;
    assert_eq!(status, 201, "{brief}");
    assert_eq!(
        (&brief["metadata"]["topic"], &brief["system_prompt"], &brief["ttl"]),
        (&"maths".into(), &"Answer in one word.".into(), &600.into())
    );
    let (status, with_prompt) = alice_says(&cluster, "alice-brief", "Hello").await;
    assert_eq!(status, 200, "{with_prompt}");
    // The same first message, but the session's system prompt replaced the template's default one.
    assert_ne!(
        with_prompt["usage"]["prompt_tokens"], hello["usage"]["prompt_tokens"],
        "the system prompt was not used"
    );
    let (_, plain) = http.call("GET", &path, &alice, None).await;
    let first_plain = plain["messages"][0]["tokens"].as_u64().unwrap();
    assert!(first_plain > 0 && plain["messages"][1]["tokens"].as_u64().unwrap() > 0, "token counts: {plain}");
    let (_, stored) = http.call("GET", "/api/sessions/alice-brief", &alice, None).await;
    assert_eq!(stored["message_count"], 2, "the system prompt is a setting, not a stored message: {stored}");
    let patch = r#"{"metadata":{"stage":"two"},"ttl":1}"#;
    let (status, patched) = http.call("PATCH", "/api/sessions/alice-brief", &alice, Some(patch)).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        (&patched["metadata"], &patched["system_prompt"]),
        (&serde_json::json!({"stage":"two"}), &"Answer in one word.".into())
    );
    let (status, body) = http.call("PATCH", "/api/sessions/alice-brief", &alice, Some(r#"{"ttl":"soon"}"#)).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("ttl")), "{body}");
    assert_eq!(http.call("PATCH", "/api/sessions/alice-brief", &bob, Some(patch)).await.0, 404);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(http.call("GET", "/api/sessions/alice-brief", &alice, None).await.0, 404, "the 1 s TTL applies");

    assert_eq!(http.call("DELETE", &path, &alice, None).await.0, 204);
    assert_eq!(http.call("GET", &path, &alice, None).await.0, 404);
    assert_eq!(http.call("DELETE", &path, &alice, None).await.0, 404);
    assert_eq!(alice_says(&cluster, &id, "Still there?").await.0, 404, "a deleted session never restarts");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moltbot_rides_out_a_nats_restart_and_fails_fast_while_nats_is_down() {
    let mut cluster = Cluster::start(2, |_| {}).await;
    let hi = r#"{"message":"Hi","max_tokens":2}"#;
    let (status, _, body) = cluster.http.post("/api/chat", &[], hi).await;
    assert_eq!(status, 200, "{body}");

    cluster.nats.kill();
    // The clients notice the lost connection at once (the socket closes); a turn then fails fast.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = std::time::Instant::now();
    let (status, _, body) = cluster.http.post("/api/chat", &[], hi).await;
    assert_eq!(status, 503, "{body}");
    assert!(asked.elapsed() < Duration::from_secs(3), "a 503 after {:?}", asked.elapsed());

    // NATS comes back on the same store: the dialogue-manager and both workers reconnect by themselves, for as
    // long as it took (here longer than the old limit of three attempts).
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.nats.start_again();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = cluster.http.post("/api/chat", &[], hi).await;
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {status} 30 s after NATS came back: {body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let chats = (0..6).map(|_| cluster.http.post("/api/chat", &[], hi));
    for (status, _, body) in futures::future::join_all(chats).await {
        assert_eq!(status, 200, "after the restart: {body}");
    }
    let infos = cluster.workers_when(|w| w.iter().map(|w| w.jobs_completed).sum::<u64>() >= 8).await;
    let jobs: Vec<u64> = infos.iter().map(|w| w.jobs_completed).collect();
    assert!(jobs.iter().sum::<u64>() >= 8 && jobs.iter().all(|&n| n > 0), "both workers took jobs again: {jobs:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_longer_than_a_queue_message_keeps_answering() {
    let cluster = Cluster::start(1, |_| {}).await;
    let session = alice_starts(&cluster).await;
    // 2.4 MB of stored history, more than twice NATS's 1 MiB message limit: no model could see it all.
    let mut store = moltbot_dialogue_manager::connect_session_store(&cluster.session_store_url, &cluster.credential())
        .await
        .unwrap();
    let long = "many words ".repeat(20_000);
    for _ in 0..12 {
        let message = |role: &str, content: &str, tokens| moltbot_proto::common::v1::ChatMessage {
            role: role.into(),
            content: content.into(),
            tokens,
            ..Default::default()
        };
        let request = moltbot_proto::session::v1::AppendMessagesRequest {
            session_id: session.clone(),
            user_id: "alice".into(),
            messages: vec![message("user", &long, 40_000), message("assistant", "Noted.", 3)],
        };
        store.append_messages(request).await.unwrap();
    }
    let (status, body) = alice_says(&cluster, &session, "And now?").await;
    assert_eq!(status, 200, "{body}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_fast_and_moltbot_recovers_without_a_restart() {
    let mut cluster = Cluster::start(1, |_| {}).await;
    let session = alice_starts(&cluster).await;
    assert_eq!(alice_says(&cluster, &session, "Before").await.0, 200);

    cluster.redis.kill();
    for _ in 0..3 {
        // A turn that needs its session fails at once with 503 ...
        let asked = std::time::Instant::now();
        let (status, body) = alice_says(&cluster, &session, "During").await;
        assert_eq!(status, 503, "{body}");
        assert!(asked.elapsed() < Duration::from_secs(3), "a 503 after {:?}", asked.elapsed());
        // ... while single-turn chats, which need no storage, go on.
        let (status, _, body) = cluster.http.post("/api/chat", &[], r#"{"message":"Hi","max_tokens":2}"#).await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    // Redis comes back (with its append-only file): the same processes carry on, and nothing acknowledged is lost.
    cluster.redis.start_again();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        let (status, body) = alice_says(&cluster, &session, "After").await;
        if status == 200 || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 200, "{body}");
    let (status, stored) =
        cluster.http.call("GET", &format!("/api/sessions/{session}"), &[("x-user-id", "alice")], None).await;
    assert_eq!(status, 200, "{stored}");
    let questions: Vec<&str> = stored["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(questions, ["Hi", "Before", "After"], "the failed turns saved nothing, the others everything");
    cluster.stop().await;
}

/// One client's conversation under load: turns on its own session until `stop`, every other one streamed.
/// Returns the session, the turns answered, and every failure seen (status and body, or transport error).
async fn converse_until(
    http: moltbot_tests::Http,
    client: usize,
    stop: tokio_util::sync::CancellationToken,
) -> (String, usize, Vec<String>) {
    let session = format!("rolling-{client}");
    let create = serde_json::json!({ "id": session }).to_string();
    let (status, _, created) = http.post("/api/sessions", &[("x-user-id", "roller")], &create).await;
    assert_eq!(status, 201, "{created}");
    let (mut turns, mut failures) = (0, vec![]);
    while !stop.is_cancelled() {
        let stream = turns % 2 == 1;
        let body = serde_json::json!({
            "session_id": session, "message": format!("Turn {turns}: name a colour."),
            "max_tokens": 6, "min_tokens": 6, "stream": stream,
        })
        .to_string();
        let headers = [("x-user-id", "roller"), ("x-dialogue-mode", "multi")];
        match http.try_post("/api/chat", &headers, &body).await {
            Ok((200, _, answer)) if !stream && answer["finish_reason"] == "length" => turns += 1,
            Ok((200, _, serde_json::Value::String(events)))
                if stream && events.contains("event: done") && !events.contains("event: error") =>
            {
                turns += 1
            }
            Ok((status, _, answer)) => failures.push(format!("turn {turns} (stream {stream}): {status} {answer}")),
            Err(e) => failures.push(format!("turn {turns} (stream {stream}): {e}")),
        }
    }
    (session, turns, failures)
}

/// R6: every service restarted one replica at a time (as a rolling update does: SIGTERM, drain, start) while
/// clients keep talking through Nginx. No request fails, and every answered turn is in its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_service_under_load_fails_no_request() {
    use moltbot_tests::Role;
    let mut cluster = Cluster::start_replicated(2, 2, |_| {}).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..4).map(|i| tokio::spawn(converse_until(cluster.http.clone(), i, stop.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let order = |role: &Role| match role {
        Role::SessionStore => 0,
        Role::Worker(_) => 1,
        Role::DialogueManager => 2,
        Role::Gateway => 3,
    };
    let mut services = cluster.services();
    services.sort_by_key(|(role, _)| order(role));
    for (role, addr) in services {
        let drained = cluster.restart(addr).await;
        eprintln!("restarted {role:?} at {addr}: drained in {drained:?}");
        // The next replica goes only once this one serves again, as a rolling update waits for readiness.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let mut store = moltbot_dialogue_manager::connect_session_store(&cluster.session_store_url, &cluster.credential())
        .await
        .unwrap();
    let mut total = 0;
    for client in clients {
        let (session, turns, failures) = client.await.unwrap();
        assert!(failures.is_empty(), "{} requests failed during the rolling restart: {failures:#?}", failures.len());
        let request = moltbot_proto::session::v1::GetSessionRequest {
            session_id: session.clone(),
            user_id: "roller".into(),
            ..Default::default()
        };
        let stored = store.get_session(request).await.unwrap().into_inner().message_count;
        assert_eq!(stored as usize, 2 * turns, "{session}: {turns} turns answered, {stored} messages stored");
        total += turns;
    }
    eprintln!("{total} turns answered during the rolling restart, none failed");
    assert!(total >= 20, "the clients kept talking through the restarts ({total} turns)");
    cluster.stop().await;
}

/// R7: a turn past its deadline is a 504 at the deadline, and the worker stops generating it within a second
/// (the job carries its deadline, and the dialogue-manager cancels it when it gives up just before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_past_its_deadline_is_a_504_and_its_worker_stops_within_a_second() {
    let cluster = Cluster::start(1, |c| {
        c.gateway.request_timeout = 2;
        c.model_provider.max_tokens = 3000;
    })
    .await;
    let long = r#"{"message":"Count to 1000.","max_tokens":3000,"min_tokens":3000}"#;
    let asked = std::time::Instant::now();
    let (status, _, error) = cluster.http.post("/api/chat", &[], long).await;
    let answered = asked.elapsed();
    assert_eq!(status, 504, "{error}");
    assert!(answered < Duration::from_secs(4), "the 504 came {answered:?} after the request (deadline 2 s)");
    let info = cluster.first_worker_when(|w| w.jobs_completed == 1 && w.kv_blocks_free == w.kv_blocks_total).await;
    let stopped = asked.elapsed().saturating_sub(answered);
    // Ended by its cancel or by the deadline the job carries, whichever the worker saw first; 3000 tokens take
    // far longer than 2 s.
    assert_eq!(info.jobs_completed, 1, "the job ended: {info:?}");
    assert_eq!(info.kv_blocks_free, info.kv_blocks_total, "its cache blocks are free again: {info:?}");
    assert!(stopped < Duration::from_secs(1), "the worker still ran the job {stopped:?} after the 504");
    cluster.stop().await;
}

/// Turns whose model calls a plugin run one job per round through JetStream, several turns at once on one worker
/// with a small batch (so later rounds often wait in the shared queue rather than go straight to a free slot):
/// every round's job is run — none is taken for a duplicate of the turn's earlier one, which would leave its turn
/// waiting to its deadline — and every turn answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_rounds_through_nats_each_run_their_own_job() {
    let cluster = Cluster::start(1, |c| {
        c.inference_worker.max_batch_size = 2;
        c.model_provider.max_tokens = 64;
        c.plugins.max_rounds = 1;
    })
    .await;
    let http = &cluster.http;
    let turns = (0..6).map(|i| {
        let body = serde_json::json!({
            "message": format!("Calculate {i}*7."), "max_tokens": 64, "temperature": 0,
            "plugins": ["calculator"], "tool_choice": "required",
        })
        .to_string();
        async move { http.post("/api/chat", &[], &body).await }
    });
    let mut rounds = 0;
    for (status, _, answer) in futures::future::join_all(turns).await {
        assert_eq!(status, 200, "{answer}");
        // A call the model did not finish within max_tokens ends as text: that turn had one round.
        let results = answer["tool_results"].as_array().unwrap();
        rounds += 1 + results.len() as u64;
    }
    assert!(rounds > 6, "some turn called the calculator");
    // The worker counts a job once its last event is published, which can be just after its turn answered.
    let jobs = cluster.first_worker_when(|w| w.jobs_completed >= rounds).await.jobs_completed;
    assert_eq!(jobs, rounds, "every round's job ran");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_are_served_at_once_and_one_whose_workers_are_gone_is_a_fast_503() {
    // The second model is a remote API (a MoltBot of its own) behind a worker of this cluster.
    let (upstream, upstream_http, _dir) =
        moltbot_tests::embedded(|c| c.model_provider.model_name = "upstream".into()).await;
    let mut cluster = Cluster::start(1, |_| {}).await;
    let endpoint = format!("{}/v1", upstream_http.base);
    cluster.add_worker_serving("remote-0", moltbot_tests::remote_api("remote", &endpoint, "upstream", 24)).await;
    let local = cluster.config.model_provider.model_name.clone();
    // Workers announce themselves every two seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ids = loop {
        let (_, models) = cluster.http.get("/v1/models").await;
        let ids: Vec<String> =
            models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
        if ids.len() == 2 || std::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ids, ["remote", local.as_str()]);
    let chat = |model: &str| {
        serde_json::json!({ "model": model, "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 3 })
            .to_string()
    };
    for model in ["remote", local.as_str(), "remote"] {
        let (status, _, body) = cluster.http.post("/v1/chat/completions", &[], &chat(model)).await;
        assert_eq!((status, body["model"].as_str()), (200, Some(model)), "{body}");
    }
    // Each model's worker ran its own requests: the local worker one, the remote worker (and the upstream) two.
    let infos = cluster.workers_when(|w| w[0].jobs_completed == 1 && w[1].jobs_completed == 2).await;
    assert_eq!((infos[0].jobs_completed, infos[1].jobs_completed), (1, 2));
    assert_eq!(infos[1].architecture, "remote_api");
    assert_eq!(moltbot_tests::worker_when(&upstream.worker_urls[0], |w| w.jobs_completed == 2).await.jobs_completed, 2);

    // The remote model's only worker stops. A request that came just after waits in the queue only until the
    // dialogue-manager misses the worker's announcements (7 s), then is refused (503); later ones at once.
    let addr = cluster.worker_urls[1].trim_start_matches("http://").parse().unwrap();
    cluster.stop_service(addr).await;
    for limit in [Duration::from_secs(15), Duration::from_secs(2)] {
        let asked = std::time::Instant::now();
        let (status, headers, body) = cluster.http.post("/v1/chat/completions", &[], &chat("remote")).await;
        assert_eq!(status, 503, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("no inference worker"), "{body}");
        assert!(headers.contains_key("retry-after"));
        assert!(asked.elapsed() < limit, "the refusal took {:?}", asked.elapsed());
    }
    let (_, models) = cluster.http.get("/v1/models").await;
    assert_eq!(models["data"].as_array().unwrap().len(), 1, "a model no worker serves is not listed: {models}");
    let (status, _, body) = cluster.http.post("/v1/chat/completions", &[], &chat(&local)).await;
    assert_eq!(status, 200, "{body}");
    cluster.stop().await;
    upstream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_services_take_calls_only_with_the_deployments_credential() {
    use moltbot_proto::{Credential, Replicas, dialogue::v1::ListModelsRequest, session::v1::ListSessionsRequest};
    let secret = "a-long-deployment-secret";
    let cluster = Cluster::start(1, |c| c.internal.service_token = secret.into()).await;
    // The services present it to each other: a turn goes through every one of them.
    let (status, _, body) = cluster.http.post("/api/chat", &[], r#"{"message":"Hi","max_tokens":2}"#).await;
    assert_eq!(status, 200, "{body}");
    let list = || ListSessionsRequest { user_id: "alice".into(), ..Default::default() };
    let store = |credential: Credential| {
        let url = cluster.session_store_url.clone();
        async move { moltbot_dialogue_manager::connect_session_store(&url, &credential).await.unwrap() }
    };
    assert!(store(Credential::new(secret)).await.list_sessions(list()).await.is_ok());
    // Anyone else is refused, before the service sees the call: no credential, or a wrong one of the same length.
    for credential in [Credential::none(), Credential::new("a-long-deployment-secreT")] {
        let refused = store(credential.clone()).await.list_sessions(list()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let worker = Replicas::lazy(&cluster.worker_urls[0]).unwrap().with_credential(&credential);
        let refused = InferenceClient::new(worker).get_model_info(GetModelInfoRequest {}).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let dialogue = moltbot_gateway::dialogue_client(&cluster.dialogue_manager_url(), &credential).unwrap();
        let refused = dialogue.clone().list_models(ListModelsRequest {}).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }
    // Health checks and reflection need none: orchestrators and tools like grpcurl use them.
    let channel = tonic::transport::Endpoint::from_shared(cluster.session_store_url.clone()).unwrap().connect().await;
    let channel = channel.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(serving.into_inner().status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    let listed = moltbot_tests::listed_services!(v1alpha, &cluster.session_store_url);
    assert!(
        listed.contains(&"moltbot.session.v1.SessionStore".to_owned()),
        "reflection without the credential: {listed:?}"
    );
    cluster.stop().await;

    // Beyond loopback without a credential, no internal service starts, and each says what to set.
    let mut config = moltbot_tests::test_config(std::path::Path::new("/nonexistent"));
    let beyond = || -> std::net::SocketAddr { ([0, 0, 0, 0], moltbot_tests::free_port()).into() };
    config.session_store.listen = beyond();
    config.dialogue_manager.listen = beyond();
    config.inference_worker.listen = beyond();
    let within = Duration::from_secs(10);
    let refusals = [
        ("session_store.listen", tokio::time::timeout(within, moltbot_session_store::serve(&config)).await),
        ("dialogue_manager.listen", tokio::time::timeout(within, moltbot_dialogue_manager::serve(&config)).await),
        ("inference_worker.listen", tokio::time::timeout(within, moltbot_inference_worker::serve(&config)).await),
    ];
    for (key, refused) in refusals {
        let refused = refused.expect("refused at once, not served").unwrap_err().to_string();
        assert!(refused.contains("internal.service_token") && refused.contains(key), "{refused}");
    }
}

/// The data stores as deploy/k8s runs them: Redis with only its ACL user, NATS with the users and subject
/// permissions of `nats/auth.conf`. MoltBot works within those rights (a conversation, a cancelled stream: the
/// server logs no violation), and a client without them is turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_nats_as_deployed_serve_moltbot_and_refuse_clients_without_the_rights() {
    let cluster = Cluster::start_as_deployed(1, |c| c.model_provider.max_tokens = 3000).await;
    two_turn_conversation(&cluster.http).await;
    // A stream the client leaves: the dialogue-manager publishes a cancel, the worker hears it.
    let body = r#"{"message":"Count from 1 to 1000.","max_tokens":3000,"min_tokens":3000,"stream":true}"#;
    let mut response = cluster.http.stream("/api/chat", body).await;
    assert_eq!(response.status(), 200);
    response.chunk().await.unwrap().expect("the stream starts");
    drop(response);
    let worker = cluster.first_worker_when(|w| w.jobs_cancelled == 1 && w.running == 0).await;
    assert_eq!(worker.jobs_cancelled, 1);
    let log = cluster.nats.file("nats.log");
    assert!(!log.contains("Violation"), "MoltBot needed a right that auth.conf does not give:\n{log}");

    // NATS: a worker's user cannot read answers (other users' conversations) nor queue jobs; no user, no entry.
    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let as_user =
        |user: &str| async_nats::ConnectOptions::with_user_and_password(user.into(), cluster.nats.nats_password(user));
    let worker = as_user("worker")
        .event_callback(move |event| {
            let errors = errors_tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = errors.send(e.to_string());
                }
            }
        })
        .connect(cluster.nats.nats_url())
        .await
        .expect("the worker user connects");
    let mut answers = worker.subscribe("moltbot.events.>").await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), errors.recv()).await.expect("refused in time");
    let refused = refused.unwrap().to_lowercase();
    assert!(refused.contains("permissions violation") && refused.contains("moltbot.events.>"), "{refused}");
    let manager = as_user("dialogue-manager").connect(cluster.nats.nats_url()).await.unwrap();
    manager.publish("moltbot.events.someone-else", "secret".into()).await.unwrap();
    manager.flush().await.unwrap();
    let heard = tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut answers)).await;
    assert!(!matches!(heard, Ok(Some(_))), "the worker user read an answer: {heard:?}");
    worker.publish("moltbot.jobs.smollm2-135m-instruct", "job".into()).await.unwrap();
    worker.flush().await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), errors.recv()).await.expect("refused in time");
    assert!(refused.unwrap().to_lowercase().contains("moltbot.jobs"), "publishing a job as a worker");
    let anonymous = async_nats::connect(cluster.nats.nats_url()).await.expect_err("a client without a user got in");
    assert_eq!(anonymous.kind(), async_nats::ConnectErrorKind::AuthorizationViolation, "{anonymous}");

    // Redis: no default user; the ACL user reaches only moltbot:* keys and no admin command.
    let mut anonymous = redis::Client::open(cluster.redis.redis_url()).unwrap();
    let refused = redis::cmd("GET").arg("moltbot:x").query::<Option<String>>(&mut anonymous).unwrap_err();
    assert!(refused.to_string().contains("NOAUTH"), "{refused}");
    let mut moltbot = redis::Client::open(cluster.redis.redis_url_as_deployed()).unwrap().get_connection().unwrap();
    assert!(redis::cmd("KEYS").arg("moltbot:*").query::<Vec<String>>(&mut moltbot).is_err(), "KEYS is dangerous");
    let refused = redis::cmd("GET").arg("other:key").query::<Option<String>>(&mut moltbot).unwrap_err();
    assert!(refused.to_string().to_lowercase().contains("no permissions"), "{refused}");
    for command in [&["CONFIG", "GET", "dir"][..], &["FLUSHALL"], &["SCRIPT", "FLUSH"], &["FUNCTION", "LIST"]] {
        let refused = redis::cmd(command[0]).arg(&command[1..]).query::<redis::Value>(&mut moltbot).unwrap_err();
        assert!(refused.to_string().to_lowercase().contains("no permissions"), "{command:?}: {refused}");
    }
    let sessions: i64 = redis::cmd("ZCARD").arg("moltbot:sessions:active").query(&mut moltbot).unwrap();
    assert!(sessions >= 1, "the conversations above are stored under the ACL user");
    cluster.stop().await;
}
