//! The response cache (S11 `cache_config`): a finished answer to a single-turn request with deterministic
//! sampling (temperature 0, or a seed) is kept in memory (moka, weighed by body size, with a TTL) and served
//! again with `X-Cache: HIT`. The key is the route, the request body (canonical JSON), the configured headers
//! (`Authorization` by default) and the caller's user, so a hit never crosses API keys or users. Streams,
//! multi-turn requests, sampled answers and turns that run plugins are never cached.

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes, to_bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header::CONTENT_TYPE},
    middleware::Next,
    response::{IntoResponse, Response},
};
use moltbot_config::CacheConfig;
use serde_json::Value;
use sha2::{Digest, Sha256};

use moltbot_proto::dialogue::v1::DialogueMode;

use crate::{ApiError, DialogueHeaders};

#[derive(Clone)]
pub struct ResponseCache {
    entries: moka::future::Cache<[u8; 32], Arc<(HeaderValue, Bytes)>>,
    include_headers: Arc<Vec<String>>,
    max_body: usize,
}

impl ResponseCache {
    /// `None` when the cache is off.
    pub fn new(config: &CacheConfig, max_body: usize) -> Option<Self> {
        if !config.enabled {
            return None;
        }
        let entries = moka::future::Cache::builder()
            .max_capacity(config.max_size.saturating_mul(1024 * 1024))
            .weigher(|_, v: &Arc<(HeaderValue, Bytes)>| u32::try_from(v.1.len() + 64).unwrap_or(u32::MAX))
            .time_to_live(Duration::from_secs(config.ttl.max(1)))
            .build();
        let include_headers = config.include_headers.iter().map(|h| h.to_ascii_lowercase()).collect();
        Some(Self { entries, include_headers: Arc::new(include_headers), max_body })
    }

    /// The key of a cacheable request; `None` when its answer must come from the model.
    fn key(&self, path: &str, headers: &HeaderMap, dialogue: &DialogueHeaders, body: &Value) -> Option<[u8; 32]> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let single = match dialogue.mode {
            Some(DialogueMode::Single) => true,
            Some(DialogueMode::Multi) => false,
            _ => dialogue.session_id.is_empty() && body["session_id"].is_null(),
        };
        let deterministic = body["temperature"].as_f64() == Some(0.0) || body["seed"].is_u64();
        // A plugin does something each time it runs (and its answer may change): a turn that runs one is never
        // served from the cache.
        let runs_plugins = !body["plugin"].is_null() || body["plugins"].as_array().is_some_and(|p| !p.is_empty());
        if !single || !deterministic || runs_plugins || body["stream"].as_bool() == Some(true) {
            return None;
        }
        let mut hash = Sha256::new();
        for part in [path, &body.to_string(), header("x-user-id")] {
            hash.update(part.len().to_le_bytes());
            hash.update(part.as_bytes());
        }
        for name in self.include_headers.iter() {
            let value = header(name);
            hash.update(value.len().to_le_bytes());
            hash.update(value.as_bytes());
        }
        Some(hash.finalize().into())
    }
}

fn with_cache_header(mut response: Response, value: &'static str) -> Response {
    response.headers_mut().insert("x-cache", HeaderValue::from_static(value));
    response
}

/// Serves a cached answer, or runs the request and keeps its answer when it may. Headers are checked before the
/// cache is asked, so a request the handler would refuse is never answered from it.
pub async fn serve(State(cache): State<ResponseCache>, request: Request, next: Next) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let dialogue = DialogueHeaders::parse(&parts.headers)?;
    let bytes = to_bytes(body, cache.max_body).await.map_err(|_| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "the request body is larger than gateway.max_body_bytes")
    })?;
    let key = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| cache.key(parts.uri.path(), &parts.headers, &dialogue, &v));
    let Some(key) = key else {
        return Ok(next.run(Request::from_parts(parts, Body::from(bytes))).await);
    };
    if let Some(hit) = cache.entries.get(&key).await {
        metrics::counter!("moltbot_response_cache_total", "result" => "hit").increment(1);
        let (content_type, body) = (hit.0.clone(), hit.1.clone());
        return Ok(with_cache_header(([(CONTENT_TYPE, content_type)], body).into_response(), "HIT"));
    }
    metrics::counter!("moltbot_response_cache_total", "result" => "miss").increment(1);
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    if response.status() != StatusCode::OK {
        return Ok(with_cache_header(response, "MISS"));
    }
    let (parts, body) = response.into_parts();
    let body =
        to_bytes(body, usize::MAX).await.map_err(|e| ApiError::unavailable(format!("the answer broke off: {e}")))?;
    let content_type = parts.headers.get(CONTENT_TYPE).cloned().unwrap_or(HeaderValue::from_static("application/json"));
    cache.entries.insert(key, Arc::new((content_type, body.clone()))).await;
    Ok(with_cache_header(Response::from_parts(parts, Body::from(body)), "MISS"))
}
