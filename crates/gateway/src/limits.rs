//! Per-user limits: a rate (a GCRA bucket per user, `governor`) and requests in flight. The user is the API key's
//! (auth sets `X-User-Id`) or, without auth, the `X-User-Id` the client sends.

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

/// Requests in flight per user, so that one user cannot hold every slot of the gateway.
#[derive(Clone)]
pub struct UserSlots {
    limit: usize,
    in_flight: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// One of a user's slots, given back when dropped.
#[derive(Debug)]
pub struct UserSlot {
    user: String,
    in_flight: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl UserSlots {
    /// `limit` 0: no cap.
    pub fn new(limit: usize) -> Self {
        Self { limit, in_flight: Arc::default() }
    }

    /// A slot for `user`, `None` without a cap, or 429 when the user has `limit` requests in flight.
    pub fn acquire(&self, user: &str) -> Result<Option<UserSlot>, ApiError> {
        if self.limit == 0 {
            return Ok(None);
        }
        let user = if user.is_empty() { "anonymous" } else { user };
        let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = in_flight.entry(user.to_owned()).or_default();
        if *count >= self.limit {
            return Err(ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "you have {} requests in flight, this server's limit per user \
                         (gateway.max_concurrent_per_user); retry when one has finished",
                        self.limit
                    ),
                )
            });
        }
        *count += 1;
        Ok(Some(UserSlot { user: user.to_owned(), in_flight: self.in_flight.clone() }))
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = in_flight.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::UserSlots;

    #[test]
    fn each_user_has_their_own_slots_given_back_on_drop() {
        let slots = UserSlots::new(2);
        let (a1, a2) = (slots.acquire("alice").unwrap(), slots.acquire("alice").unwrap());
        assert_eq!(slots.acquire("alice").unwrap_err().status.as_u16(), 429);
        let b = slots.acquire("bob").unwrap();
        assert!(b.is_some(), "bob is not held back by alice");
        drop(a1);
        assert!(slots.acquire("alice").is_ok(), "a finished request frees its slot");
        drop((a2, b));
        assert!(slots.in_flight.lock().unwrap().is_empty(), "idle users are forgotten");
        assert!(UserSlots::new(0).acquire("alice").unwrap().is_none(), "0 is no cap");
    }
}
