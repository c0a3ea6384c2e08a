//! What the gateway tells operators about each request: a request id (the client's `X-Request-Id`, or a new one)
//! that goes back in the response and on to the dialogue-manager, the job and every service's logs; one access-log
//! line; the request's span (a child of the client's `traceparent`, when it sends one); and the request metrics (`moltbot_http_requests_total`, `moltbot_http_request_duration_seconds`).

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    http::HeaderValue,
    middleware::Next,
    response::Response,
};
use tracing::Instrument;

pub const REQUEST_ID: &str = "x-request-id";

/// Tokens a response reports (set by the non-streaming chat handlers), for the access log.
#[derive(Debug, Clone, Copy)]
pub struct Tokens {
    pub prompt: u32,
    pub completion: u32,
}

impl Tokens {
    pub fn of(usage: &moltbot_proto::common::v1::Usage) -> Self {
        Self { prompt: usage.prompt_tokens, completion: usage.completion_tokens }
    }
}

/// The user an API key stood for (set by the auth layer on its response): the access log's user, where a client's
/// own `X-User-Id` would not be.
#[derive(Debug, Clone)]
pub struct AuthenticatedUser(pub HeaderValue);

/// A client's request id is kept when it is short printable ASCII; otherwise one is made.
fn request_id(request: &Request) -> HeaderValue {
    request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| (1..=128).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic()))
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).expect("a UUID is a valid header value")
        })
}

/// The id the turn and its job go by (an extension of every request, for the handlers): unique, whatever a client sends (it keys the job on the queue, so two
/// clients sending the same `X-Request-Id` must not meet), and starting with the client's id so logs find it.
#[derive(Debug, Clone)]
pub struct TurnId(pub String);

/// Methods as labels: any other a client sends is `other`, so no client can make series without end.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

pub async fn observe(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let given = request.headers().get(REQUEST_ID).cloned();
    let id = request_id(&request);
    // The client's own id (when kept) goes back as it came; the turn gets a unique one that starts with it.
    let shown = id.to_str().unwrap_or_default().to_owned();
    let turn = if given.as_ref() == Some(&id) { format!("{shown}-{}", uuid::Uuid::new_v4().simple()) } else { shown };
    request.headers_mut().insert(REQUEST_ID, id.clone());
    request.extensions_mut().insert(TurnId(turn.clone()));
    let method = method_label(request.method()).to_owned();
    // The route's pattern (`/api/sessions/{id}`), so that ids in paths do not make a series each.
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let user = request.headers().get("x-user-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    // Probes (every few seconds from a load balancer or the kubelet) start no traces: their span is below info.
    let span = if matches!(route.as_str(), "/health" | "/ready") {
        tracing::debug_span!("probe", request_id = %turn, %route, trace_id = tracing::field::Empty)
    } else {
        tracing::info_span!("request", request_id = %turn, %method, %route, trace_id = tracing::field::Empty)
    };
    // A client's `traceparent` makes this request a span of its trace.
    moltbot_telemetry::trace::adopt(&span, &moltbot_telemetry::trace::from_headers(request.headers()));
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    response.headers_mut().insert(REQUEST_ID, id);
    let status = response.status().as_u16();
    metrics::counter!("moltbot_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("moltbot_http_request_duration_seconds", "method" => method.clone(), "route" => route.clone())
        .record(elapsed.as_secs_f64());
    let tokens = response.extensions().get::<Tokens>().copied();
    let user = match response.extensions().get::<AuthenticatedUser>() {
        Some(AuthenticatedUser(key_user)) => key_user.to_str().unwrap_or_default().to_owned(),
        None => user,
    };
    let latency_ms = elapsed.as_secs_f64() * 1e3;
    span.in_scope(|| {
        tracing::info!(
            target: "moltbot::access",
            status,
            latency_ms = format_args!("{latency_ms:.1}"),
            user = %user,
            prompt_tokens = tokens.map(|t| t.prompt),
            completion_tokens = tokens.map(|t| t.completion),
            "{method} {route} {status}"
        );
    });
    response
}
