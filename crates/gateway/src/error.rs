//! The gateway's one error type: an HTTP status with an OpenAI-shaped body, built from gRPC statuses too.

use axum::{
    Json,
    http::{
        HeaderValue, StatusCode,
        header::{RETRY_AFTER, WWW_AUTHENTICATE},
    },
    response::{IntoResponse, Response},
};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    /// Seconds for `Retry-After` on 429 and 503 (1 when unset).
    pub retry_after: Option<u64>,
    /// OpenAI's `error.code` where it names one (`model_not_found`); the HTTP status otherwise.
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, retry_after: None, code: None }
    }

    /// OpenAI's answer for a model this server does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                format!("the model `{}` does not exist here; GET /v1/models lists those served", shown(model)),
            )
        }
    }

    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self { param: param.map(str::to_owned), ..Self::new(StatusCode::BAD_REQUEST, message) }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "missing or unknown API key: send `Authorization: Bearer <key>` with a key from gateway.auth.api_keys",
        )
    }

    pub fn rate_limited(wait: std::time::Duration) -> Self {
        metrics::counter!("moltbot_http_refusals_total", "reason" => "rate_limit").increment(1);
        let seconds = wait.as_secs_f64().ceil() as u64;
        Self {
            retry_after: Some(seconds),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, format!("rate limit reached; retry in {seconds} s"))
        }
    }

    /// 429: the gateway has `max_concurrent_requests` in flight; come back in `retry_after` seconds.
    pub fn overloaded(retry_after: u64) -> Self {
        metrics::counter!("moltbot_http_refusals_total", "reason" => "busy").increment(1);
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, format!("too many requests in flight; retry in {retry_after} s"))
        }
    }

    pub fn timeout() -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "the request took longer than gateway.request_timeout")
    }

    /// OpenAI's `error.type` for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                "invalid_request_error"
            }
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::CONFLICT => "conflict_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::GATEWAY_TIMEOUT => "timeout_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            _ => "server_error",
        }
    }

    /// The body, also sent as an SSE event when a stream fails.
    pub fn body(&self) -> serde_json::Value {
        let code = self.code.map_or_else(|| json!(self.status.as_u16()), |code| json!(code));
        json!({ "error": { "message": self.message, "type": self.kind(), "param": self.param, "code": code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(self.retry_after.unwrap_or(1).max(1)));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub use moltbot_proto::shown;

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        let code = moltbot_proto::ErrorCode::from_grpc(s.code());
        let status = StatusCode::from_u16(code.http()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // A status the gRPC client made from a failed connection carries the transport error as its source.
        let message = match code {
            moltbot_proto::ErrorCode::Unavailable
                if std::error::Error::source(&s).is_some() || s.message().is_empty() =>
            {
                "the dialogue-manager is not reachable".to_owned()
            }
            _ => s.message().to_owned(),
        };
        let retry_after = s.metadata().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
        if s.metadata().get("moltbot-error").is_some_and(|v| v == "model_not_found") {
            return Self { message, ..Self::model_not_found("") };
        }
        // The request's field at fault, where the dialogue-manager names one.
        let param = s.metadata().get("moltbot-param").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Self { retry_after, param, ..Self::new(status, message) }
    }
}
