//! The SessionStore conformance suite against every built-in backend, each behind its real gRPC server.

use moltbot_config::{SessionStoreConfig, SessionStoreType};
use moltbot_tests::{Server, listener};

async fn passes(config: SessionStoreConfig) {
    let backend = moltbot_session_store::open_backend(&config).await.expect("the backend opens");
    let l = listener().await;
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(moltbot_session_store::run(l, backend, stop.clone().cancelled_owned()));
    let results = moltbot_session_store::conformance::run(&endpoint).await.expect("the suite runs");
    let failures: Vec<String> =
        results.iter().filter_map(|r| r.outcome.as_ref().err().map(|why| format!("{}: {why}", r.name))).collect();
    assert!(
        results.len() >= 13 && failures.is_empty(),
        "{:?} failed:\n{}",
        config.session_store_type,
        failures.join("\n")
    );
    stop.cancel();
    serving.await.unwrap().unwrap();
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
