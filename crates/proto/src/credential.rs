//! The per-deployment service credential (`internal.service_token`): every internal gRPC call presents it as
//! `authorization: Bearer <token>` (`Replicas` adds it), and every MoltBot gRPC server refuses a call without it
//! (`server::serve`), health checks and reflection aside. Without a token nothing is checked: `moltbot serve`,
//! and services on loopback addresses, stay zero-config.

use std::sync::Arc;

use tonic::codegen::http::{HeaderMap, HeaderValue, header::AUTHORIZATION};

#[derive(Clone, Default)]
pub struct Credential(Option<Arc<str>>);

impl Credential {
    /// The credential `token` makes; an empty token is none. The token is visible ASCII
    /// (`internal.service_token` is checked so at start); another is never presented.
    pub fn new(token: &str) -> Self {
        Self((!token.is_empty()).then(|| Arc::from(token)))
    }

    /// No credential: calls are neither signed nor checked.
    pub fn none() -> Self {
        Self(None)
    }

    /// The `authorization` header a call presents.
    pub(crate) fn header(&self) -> Option<HeaderValue> {
        let token = self.0.as_deref()?;
        // Never indexed by HPACK, never shown by a `Debug` of the headers.
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// Whether a call with `headers` may pass: it presents the token (compared in constant time), or none is
    /// required.
    pub(crate) fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(token) = self.0.as_deref() else { return true };
        let presented =
            headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let Some(presented) = presented else { return false };
        // Every byte of the token is compared, whatever was presented: the time says nothing of how much matched.
        let (presented, token) = (presented.as_bytes(), token.as_bytes());
        let mut differ = presented.len() ^ token.len();
        for (i, t) in token.iter().enumerate() {
            differ |= usize::from(presented.get(i).copied().unwrap_or(0) ^ t);
        }
        std::hint::black_box(differ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_passes_and_no_token_checks_nothing() {
        let credential = Credential::new("s3cret-s3cret-s3cret");
        let mut headers = HeaderMap::new();
        assert!(!credential.admits(&headers));
        headers.insert(AUTHORIZATION, credential.header().unwrap());
        assert!(credential.admits(&headers));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer s3cret-s3cret-s3creT"));
        assert!(!credential.admits(&headers));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("s3cret-s3cret-s3cret"));
        assert!(!credential.admits(&headers));
        assert!(Credential::new("").admits(&HeaderMap::new()));
        assert!(Credential::none().header().is_none());
    }
}
