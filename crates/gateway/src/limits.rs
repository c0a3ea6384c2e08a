//! Per-user rate limiting (a GCRA bucket per user, `governor`): the user is the API key's (auth sets
//! `X-User-Id`) or, without auth, the `X-User-Id` the client sends.

use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock};
use moltbot_config::RateLimitConfig;

use crate::ApiError;

#[derive(Clone)]
pub struct RateLimit {
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    seen: Arc<AtomicU64>,
}

impl RateLimit {
    /// `None` when the limit is off.
    pub fn new(config: &RateLimitConfig) -> Option<Self> {
        let per_minute = NonZeroU32::new(config.requests_per_minute)?;
        let burst = NonZeroU32::new(config.burst).unwrap_or(per_minute);
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        Some(Self { limiter: Arc::new(DefaultKeyedRateLimiter::keyed(quota)), seen: Arc::default() })
    }
}

/// Lets the request through, or answers 429 with the wait in `Retry-After`.
pub async fn limit(State(limit): State<RateLimit>, request: Request, next: Next) -> Result<Response, ApiError> {
    let user = request.headers().get("x-user-id").and_then(|v| v.to_str().ok()).unwrap_or("anonymous").to_owned();
    // Users who went quiet are forgotten now and then, so the table does not grow without bound.
    if limit.seen.fetch_add(1, Relaxed) % 4096 == 4095 {
        limit.limiter.retain_recent();
    }
    if let Err(not_until) = limit.limiter.check_key(&user) {
        let wait = not_until.wait_time_from(limit.limiter.clock().now());
        return Err(ApiError::rate_limited(wait));
    }
    Ok(next.run(request).await)
}
