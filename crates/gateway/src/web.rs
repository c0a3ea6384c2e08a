//! The chat page at `/`: three static files compiled into the binary, so the gateway needs nothing on disk.
//! The page is a client of the public API like any other (`web/app.js`): it lists the caller's sessions,
//! streams `/api/chat`, and sends the API key its user gives it. Serving it needs no key; every call it makes
//! does.

use axum::{
    Router,
    http::{HeaderName, HeaderValue, header},
    response::IntoResponse,
    routing::get,
};

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const APP_CSS: &str = include_str!("../web/app.css");

/// Only the page's own files run or load, and no other site may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { file("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/assets/app.js", get(|| async { file("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/app.css", get(|| async { file("text/css; charset=utf-8", APP_CSS) }))
}

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    let headers: [(HeaderName, HeaderValue); 5] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        // The files change with the binary: revalidate rather than keep a stale page after an upgrade.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
    ];
    (headers, body)
}
