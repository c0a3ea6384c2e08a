//! The chat page at `/`: static files compiled into the binary, so the gateway needs nothing on disk.
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
/// Vendored from npm (web/vendor, licences beside them): marked 18.2.1 renders answers' Markdown, DOMPurify 3.5.0
/// sanitizes the HTML before the page shows it.
const MARKED_JS: &str = include_str!("../web/vendor/marked.js");
const PURIFY_JS: &str = include_str!("../web/vendor/purify.js");

/// Only the page's own files run or load, and no other site may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { file("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/assets/app.js", get(|| async { file("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/app.css", get(|| async { file("text/css; charset=utf-8", APP_CSS) }))
        .route("/assets/marked.js", get(|| async { file("text/javascript; charset=utf-8", MARKED_JS) }))
        .route("/assets/purify.js", get(|| async { file("text/javascript; charset=utf-8", PURIFY_JS) }))
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
