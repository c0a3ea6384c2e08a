//! API keys: `Authorization: Bearer <key>`, compared in constant time. Each key is its own user: the caller's
//! user id is derived from the key (a hash, so it survives reordering the key list, and logs never show a key)
//! and replaces any `X-User-Id` the client sent.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderValue, header::AUTHORIZATION},
    middleware::Next,
    response::Response,
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ApiError;

/// The accepted keys, each with the user id it stands for.
#[derive(Clone)]
pub struct Keys(Arc<Vec<(Vec<u8>, HeaderValue)>>);

impl Keys {
    pub fn new(keys: &[String]) -> Self {
        Self(Arc::new(keys.iter().map(|k| (k.trim().as_bytes().to_vec(), user_for(k.trim()))).collect()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The user of `presented`, checking every key so the time taken does not tell which one nearly matched.
    fn user(&self, presented: &[u8]) -> Option<HeaderValue> {
        let mut found = None;
        for (key, user) in self.0.iter() {
            if bool::from(key.as_slice().ct_eq(presented)) {
                found = Some(user.clone());
            }
        }
        found
    }
}

/// `key-` and the first 16 hex digits of the key's SHA-256.
fn user_for(key: &str) -> HeaderValue {
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    HeaderValue::from_str(&format!("key-{hex}")).expect("hex is a valid header value")
}

/// The credentials of `Bearer <key>`; the scheme's name is case-insensitive (RFC 9110 §11.1).
fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, key) = authorization.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Lets a request through with its key's user as `X-User-Id`, or answers 401.
pub async fn require_key(State(keys): State<Keys>, mut request: Request, next: Next) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .map(|k| k.as_bytes().to_vec());
    let user = presented.and_then(|k| keys.user(&k)).ok_or_else(ApiError::unauthorized)?;
    request.headers_mut().insert("x-user-id", user.clone());
    let mut response = next.run(request).await;
    response.extensions_mut().insert(crate::observe::AuthenticatedUser(user));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::bearer;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer k1", "bearer k1", "BEARER k1", "BeArEr   k1 "] {
            assert_eq!(bearer(header), Some("k1"), "{header}");
        }
        for header in ["Basic k1", "Bearerk1", "k1", ""] {
            assert_eq!(bearer(header), None, "{header}");
        }
    }
}
