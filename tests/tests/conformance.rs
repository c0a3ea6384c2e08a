//! The SessionStore conformance suite against every built-in backend, each behind its real gRPC server.

use moltbot_config::{SessionStoreConfig, SessionStoreType};
use moltbot_tests::{Server, listener};

/// A session-store on `config`'s backend behind its real gRPC server; stops when the guard drops.
async fn serve(config: &SessionStoreConfig) -> (String, tokio_util::sync::DropGuard) {
    let backend = moltbot_session_store::open_backend(config).await.expect("the backend opens");
    let l = listener().await;
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(moltbot_session_store::run(
        l,
        backend,
        moltbot_proto::Credential::none(),
        stop.clone().cancelled_owned(),
    ));
    (endpoint, stop.drop_guard())
}

async fn passes(config: SessionStoreConfig) {
    let (endpoint, _serving) = serve(&config).await;
    let results = moltbot_session_store::conformance::run(&endpoint, &moltbot_proto::Credential::none())
        .await
        .expect("the suite runs");
    let failures: Vec<String> =
        results.iter().filter_map(|r| r.outcome.as_ref().err().map(|why| format!("{}: {why}", r.name))).collect();
    assert!(
        results.len() >= 13 && failures.is_empty(),
        "{:?} failed:\n{}",
        config.session_store_type,
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_conforms() {
    let redis = Server::redis();
    let mut config = SessionStoreConfig { session_store_type: SessionStoreType::Redis, ..Default::default() };
    config.redis.url = redis.redis_url();
    passes(config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_conforms() {
    passes(SessionStoreConfig { session_store_type: SessionStoreType::Memory, ..Default::default() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.redb");
    passes(SessionStoreConfig { session_store_type: SessionStoreType::Persistent, path, ..Default::default() }).await;
}

/// The per-user and per-session caps, on every backend: refused with what to do, nothing half-written.
async fn caps_hold(mut config: SessionStoreConfig) {
    use moltbot_proto::{
        common::v1::ChatMessage,
        session::v1::{AppendMessagesRequest, CreateSessionRequest, GetSessionRequest},
    };
    config.max_sessions_per_user = 3;
    config.max_session_messages = 4;
    config.max_session_bytes = 100;
    let (endpoint, _serving) = serve(&config).await;
    let mut store =
        moltbot_dialogue_manager::connect_session_store(&endpoint, &moltbot_proto::Credential::none()).await.unwrap();
    let create = |user: &str| CreateSessionRequest { user_id: user.into(), ..Default::default() };
    let mut first = String::new();
    for i in 0..3 {
        let id = store.create_session(create("capped")).await.expect("under the cap").into_inner().id;
        if i == 0 {
            first = id;
        }
    }
    let refused = store.create_session(create("capped")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("max_sessions_per_user"), "{}", refused.message());
    store.create_session(create("someone-else")).await.expect("another user has their own cap");

    let turn = |n: usize| AppendMessagesRequest {
        session_id: first.clone(),
        user_id: "capped".into(),
        messages: (0..n)
            .map(|_| ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() })
            .collect(),
    };
    store.append_messages(turn(3)).await.expect("3 of 4");
    let refused = store.append_messages(turn(2)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("start a new session"), "{}", refused.message());
    let get = GetSessionRequest { session_id: first.clone(), user_id: "capped".into(), ..Default::default() };
    assert_eq!(store.get_session(get).await.unwrap().into_inner().message_count, 3, "a refused append wrote nothing");
    store.append_messages(turn(1)).await.expect("exactly at the cap");

    // Bytes: a session that holds the cap's worth of text takes no more; the append that reaches it is kept.
    let id = store.create_session(create("bytes")).await.unwrap().into_inner().id;
    let text = |content: &str| AppendMessagesRequest {
        session_id: id.clone(),
        user_id: "bytes".into(),
        messages: vec![ChatMessage { role: "user".into(), content: content.into(), ..Default::default() }],
    };
    store.append_messages(text(&"x".repeat(60))).await.expect("60 of 100 bytes");
    store.append_messages(text(&"y".repeat(60))).await.expect("under the cap before it: kept, now 120 bytes");
    let refused = store.append_messages(text("z")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("max_session_bytes"), "{}", refused.message());
    let get = GetSessionRequest { session_id: id, user_id: "bytes".into(), ..Default::default() };
    let session = store.get_session(get).await.unwrap().into_inner();
    assert_eq!((session.message_count, session.byte_limit), (2, 100), "a refused append wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_holds_its_caps() {
    let redis = Server::redis();
    let mut config = SessionStoreConfig { session_store_type: SessionStoreType::Redis, ..Default::default() };
    config.redis.url = redis.redis_url();
    caps_hold(config).await;
    caps_hold(SessionStoreConfig { session_store_type: SessionStoreType::Memory, ..Default::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.redb");
    caps_hold(SessionStoreConfig { session_store_type: SessionStoreType::Persistent, path, ..Default::default() })
        .await;
}
