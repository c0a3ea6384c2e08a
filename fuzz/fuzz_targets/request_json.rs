//! Any request body on any chat or session route: the gateway answers with a status below 500 (the
//! dialogue-manager behind it is unreachable, so what passes validation is a 503) and an error body in the
//! API's JSON shape. It never panics.
#![no_main]

use std::sync::OnceLock;

use axum::{body::Body, http::Request};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/chat"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/api/sessions"),
    ("PATCH", "/api/sessions/fuzz"),
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fuzz_target!(|input: &[u8]| {
    let Some((&route, body)) = input.split_first() else { return };
    let (method, path) = ROUTES[route as usize % ROUTES.len()];
    runtime().block_on(async {
        let config = moltbot_config::GatewayConfig::default();
        // Nothing listens on port 1: a request that passes validation gets 503.
        let client = moltbot_gateway::dialogue_client("http://127.0.0.1:1").unwrap();
        let app = moltbot_gateway::router(&config, client);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .header("x-user-id", "fuzz")
            .body(Body::from(body.to_vec()))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert!(status.as_u16() < 500 || status.as_u16() == 503, "{status}: {}", String::from_utf8_lossy(&bytes));
        if !status.is_success() {
            let error: serde_json::Value = serde_json::from_slice(&bytes).expect("an error body in JSON");
            assert!(error["error"]["message"].is_string(), "{error}");
        }
    });
});
