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

    /// A slot for `user`, `None` without a cap, or 429 (come back in `retry_after` seconds) when the user has
    /// `limit` requests in flight.
    pub fn acquire(&self, user: &str, retry_after: impl FnOnce() -> u64) -> Result<Option<UserSlot>, ApiError> {
        if self.limit == 0 {
            return Ok(None);
        }
        let user = if user.is_empty() { "anonymous" } else { user };
        let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = in_flight.entry(user.to_owned()).or_default();
        if *count >= self.limit {
            metrics::counter!("moltbot_http_refusals_total", "reason" => "user_busy").increment(1);
            return Err(ApiError {
                retry_after: Some(retry_after()),
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

/// How long turns take, to tell a refused client when to come back: by then the turns in flight now have most
/// likely finished. A moving average of the turns' durations, with random jitter on top so that clients refused
/// together do not all come back at once.
#[derive(Debug, Default)]
pub struct TurnTimes {
    mean_secs: std::sync::Mutex<Option<f64>>,
}

impl TurnTimes {
    /// How much a new duration moves the average.
    const WEIGHT: f64 = 0.1;
    const MAX_RETRY_AFTER: f64 = 60.0;

    pub fn record(&self, took: std::time::Duration) {
        let mut mean = self.mean_secs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let took = took.as_secs_f64();
        *mean = Some(mean.map_or(took, |m| m + Self::WEIGHT * (took - m)));
    }

    /// Seconds for `Retry-After`: the mean turn time, plus up to half of it again at random; 1 to 60 (1 before
    /// any turn finished).
    pub fn retry_after(&self) -> u64 {
        let Some(mean) = *self.mean_secs.lock().unwrap_or_else(std::sync::PoisonError::into_inner) else {
            return 1;
        };
        let jittered = mean * (1.0 + rand::random::<f64>() / 2.0);
        jittered.ceil().clamp(1.0, Self::MAX_RETRY_AFTER) as u64
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{TurnTimes, UserSlots};

    #[test]
    fn retry_after_follows_how_long_turns_take() {
        let times = TurnTimes::default();
        assert_eq!(times.retry_after(), 1, "nothing measured yet");
        for _ in 0..100 {
            times.record(Duration::from_secs(8));
        }
        let waits: Vec<u64> = (0..200).map(|_| times.retry_after()).collect();
        assert!(waits.iter().all(|w| (8..=12).contains(w)), "8 s turns: {waits:?}");
        assert!(waits.iter().any(|&w| w != waits[0]), "refused clients are spread out: {waits:?}");
        times.record(Duration::from_secs(3600));
        assert_eq!(times.retry_after(), 60, "capped");
    }

    #[test]
    fn each_user_has_their_own_slots_given_back_on_drop() {
        let slots = UserSlots::new(2);
        let (a1, a2) = (slots.acquire("alice", || 1).unwrap(), slots.acquire("alice", || 1).unwrap());
        let refused = slots.acquire("alice", || 7).unwrap_err();
        assert_eq!((refused.status.as_u16(), refused.retry_after), (429, Some(7)));
        let b = slots.acquire("bob", || 1).unwrap();
        assert!(b.is_some(), "bob is not held back by alice");
        drop(a1);
        assert!(slots.acquire("alice", || 1).is_ok(), "a finished request frees its slot");
        drop((a2, b));
        assert!(slots.in_flight.lock().unwrap().is_empty(), "idle users are forgotten");
        assert!(UserSlots::new(0).acquire("alice", || 1).unwrap().is_none(), "0 is no cap");
    }
}
