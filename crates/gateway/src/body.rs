//! JSON request bodies whose errors name the parameter at fault, also for fields that several request types
//! share through `#[serde(flatten)]` (where serde loses the path).

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::{StatusCode, header::CONTENT_TYPE},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ApiError;

/// The body as `T`; 415 unless it is declared JSON, 413 past the size limit, 400 naming the bad field.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let declared = request.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let media = declared.split(';').next().unwrap_or_default().trim();
        if media != "application/json" && !media.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the body as JSON, with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        parse(&bytes).map(JsonBody)
    }
}

/// Parses `bytes` as `T`. When a value has the wrong type, the first top-level field that fails on its own is
/// named as the parameter.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}"), None))?;
    T::deserialize(&value).map_err(|e| {
        let param = value.as_object().and_then(|fields| {
            fields.iter().find_map(|(key, v)| {
                let alone = Value::Object([(key.clone(), v.clone())].into_iter().collect());
                T::deserialize(&alone).is_err().then(|| key.clone())
            })
        });
        match param {
            Some(param) => ApiError::bad_request(format!("{param}: {e}"), Some(&param)),
            None => ApiError::bad_request(format!("the body is not a valid request: {e}"), None),
        }
    })
}
