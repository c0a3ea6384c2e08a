//! The distributed shape: real redis-server and nats-server -js processes, and every service as its own
//! server on its own port — session-store on Redis, two inference workers pulling from JetStream, the
//! dialogue-manager and the gateway — talking over gRPC and NATS.

use moltbot_proto::inference::v1::{GetModelInfoRequest, inference_client::InferenceClient};
use moltbot_queue::{JobQueue, NatsQueue};
use moltbot_tests::{Http, Server, listener, test_config, two_turn_conversation};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_turns_through_redis_and_nats_with_two_workers() {
    let (redis_server, nats_server) = (Server::redis(), Server::nats());
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.session_store.session_store_type = moltbot_config::SessionStoreType::Redis;
    config.session_store.redis.url = redis_server.redis_url();
    config.queue.nats_url = nats_server.nats_url();
    let stop = CancellationToken::new();
    let stopped = || {
        let stop = stop.clone();
        async move { stop.cancelled().await }
    };
    let mut tasks = vec![];

    let backend = moltbot_session_store::open_backend(&config.session_store)
        .await
        .unwrap();
    let session_listener = listener().await;
    let session_url = format!("http://{}", session_listener.local_addr().unwrap());
    tasks.push(tokio::spawn(moltbot_session_store::run(
        session_listener,
        backend,
        stopped(),
    )));

    let mut worker_urls = vec![];
    for name in ["worker-a", "worker-b"] {
        let mut worker_config = config.inference_worker.clone();
        worker_config.worker_id = name.into();
        let engine = moltbot_inference_worker::load_engine(&config).unwrap();
        let worker = moltbot_inference_worker::Worker::new(
            engine,
            &worker_config,
            config.model_provider.max_tokens,
        );
        let queue = JobQueue::nats(&config.queue.nats_url, 64).await.unwrap();
        let l = listener().await;
        worker_urls.push(format!("http://{}", l.local_addr().unwrap()));
        tasks.push(tokio::spawn(moltbot_inference_worker::run(
            l,
            worker,
            queue,
            stopped(),
        )));
    }

    let sessions = moltbot_dialogue_manager::connect_session_store(&session_url)
        .await
        .unwrap();
    let queue = JobQueue::nats(&config.queue.nats_url, 64).await.unwrap();
    let dialogue = moltbot_dialogue_manager::DialogueService::new(&config, sessions, queue);
    let dm_listener = listener().await;
    let dm_url = format!("http://{}", dm_listener.local_addr().unwrap());
    tasks.push(tokio::spawn(moltbot_dialogue_manager::run(
        dm_listener,
        dialogue,
        stopped(),
    )));

    let gw_listener = listener().await;
    let http = Http::new(gw_listener.local_addr().unwrap());
    let client = moltbot_gateway::dialogue_client(&dm_url).unwrap();
    let gateway_config = config.gateway.clone();
    let gw_stop = stopped();
    tasks.push(tokio::spawn(async move {
        moltbot_gateway::run(gw_listener, &gateway_config, client, gw_stop).await
    }));

    let session = two_turn_conversation(&http).await;

    // The session is in Redis, readable by anyone who looks: both questions and both answers, in order.
    let redis = redis::Client::open(redis_server.redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let owner: String = conn
        .hget(format!("moltbot:session:{session}"), "user_id")
        .await
        .unwrap();
    assert_eq!(owner, "alice");
    let stored: Vec<String> = conn
        .lrange(format!("moltbot:session:{session}:messages"), 0, -1)
        .await
        .unwrap();
    let stored: Vec<serde_json::Value> = stored
        .iter()
        .map(|m| serde_json::from_str(m).unwrap())
        .collect();
    let roles: Vec<&str> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(stored[0]["content"], "What is 2+2?");
    assert_eq!(stored[2]["content"], "And 3+3?");
    let ttl: i64 = conn
        .ttl(format!("moltbot:session:{session}"))
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 1800, "sessions expire (ttl {ttl})");

    // Concurrent chats spread over both workers: each pulls only when it has a free slot.
    let body = r#"{"messages":[{"role":"user","content":"Count to five."}],"max_tokens":12}"#;
    let chats = (0..6).map(|_| http.post("/v1/chat/completions", &[], body));
    for (status, _, answer) in futures::future::join_all(chats).await {
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["object"], "chat.completion");
    }
    for url in &worker_urls {
        let mut client = InferenceClient::connect(url.clone()).await.unwrap();
        let info = client
            .get_model_info(GetModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(
            info.jobs_completed >= 1,
            "{} took no job: {info:?}",
            info.worker_id
        );
    }

    stop.cancel();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn unreachable_redis_and_nats_fail_start_up_with_the_fix() {
    let mut config = moltbot_config::Config::default();
    config.session_store.redis.url = format!("redis://127.0.0.1:{}", moltbot_tests::free_port());
    let err = moltbot_session_store::open_backend(&config.session_store)
        .await
        .err()
        .expect("redis is down")
        .to_string();
    assert!(
        err.contains("not reachable") && err.contains("redis-server"),
        "{err}"
    );
    let url = format!("nats://127.0.0.1:{}", moltbot_tests::free_port());
    let err = NatsQueue::connect(&url, 8)
        .await
        .err()
        .expect("nats is down")
        .to_string();
    assert!(
        err.contains("not reachable") && err.contains("nats-server -js"),
        "{err}"
    );
}
