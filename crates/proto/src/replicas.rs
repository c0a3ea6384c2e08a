//! A gRPC client channel over several replicas of one service: each call goes to the next replica in turn, and
//! a call that a replica never took (its connection was refused, or it was draining and refused the stream) is
//! sent to the next one. That is what lets a replica restart under load without a failed request: while it
//! drains, its running calls finish and new ones go elsewhere.
//!
//! Only calls that provably never reached a server are resent, so a call is never run twice. Request bodies are
//! buffered to be resendable; MoltBot's services take one request message per call (no client streaming).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::BodyExt;
use tonic::{
    body::Body,
    codegen::http::{Request, Response},
    transport::{Channel, Endpoint},
};
use tower::{Service, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Clients of one service's replicas; cheap to clone.
#[derive(Clone)]
pub struct Replicas {
    channels: Arc<[Replica]>,
    next: Arc<AtomicUsize>,
}

struct Replica {
    url: String,
    endpoint: Endpoint,
    channel: Channel,
}

/// A list of replica URLs that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("`{url}` is not a valid URL: {message}")]
pub struct BadUrl {
    pub url: String,
    pub message: String,
}

impl Replicas {
    /// Channels to `urls`, one URL or several separated by commas; they connect on first use, so a service can
    /// start before what it calls.
    pub fn lazy(urls: &str) -> Result<Self, BadUrl> {
        let channels = split(urls)
            .map(|url| {
                let endpoint = Endpoint::from_shared(url.to_owned())
                    .map_err(|e| BadUrl { url: url.to_owned(), message: e.to_string() })?;
                let endpoint = endpoint.connect_timeout(Duration::from_secs(5));
                Ok(Replica { url: url.to_owned(), channel: endpoint.connect_lazy(), endpoint })
            })
            .collect::<Result<Vec<_>, BadUrl>>()?;
        if channels.is_empty() {
            return Err(BadUrl { url: urls.to_owned(), message: "no URL given".into() });
        }
        Ok(Self { channels: channels.into(), next: Arc::default() })
    }

    /// The replicas' URLs.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(|replica| replica.url.as_str())
    }

    /// Connects to each replica now: those that cannot be reached, each as "URL (why)".
    pub async fn unreachable(&self) -> Vec<String> {
        let mut down = vec![];
        for replica in self.channels.iter() {
            if let Err(e) = replica.endpoint.connect().await {
                down.push(format!("{} ({})", replica.url, chain(&e)));
            }
        }
        down
    }
}

/// The URLs in a comma-separated list, trimmed, empty entries skipped.
pub fn split(urls: &str) -> impl Iterator<Item = &str> {
    urls.split(',').map(str::trim).filter(|url| !url.is_empty())
}

impl Service<Request<Body>> for Replicas {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each replica's own readiness is awaited in `call`, on the replica the call goes to.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let replicas = self.clone();
        Box::pin(async move {
            let count = replicas.channels.len();
            let first = replicas.next.fetch_add(1, Ordering::Relaxed);
            if count == 1 {
                return send(&replicas.channels[0].channel, request).await;
            }
            let (head, body) = request.into_parts();
            let body = body.collect().await?.to_bytes();
            for attempt in 0..count {
                let Replica { url, channel, .. } = &replicas.channels[(first + attempt) % count];
                let request = Request::from_parts(head.clone(), Body::new(http_body_util::Full::new(body.clone())));
                match send(channel, request).await {
                    Err(error) if attempt + 1 < count && never_reached(&*error) => {
                        tracing::info!(%url, error = %chain(&*error), "replica not reachable; trying the next");
                    }
                    sent => return sent,
                }
            }
            unreachable!("the last attempt returns")
        })
    }
}

async fn send(channel: &Channel, request: Request<Body>) -> Result<Response<Body>, BoxError> {
    Ok(channel.clone().ready().await?.call(request).await?)
}

/// Whether `error` proves the request never reached a server: the connection was refused or could not be made
/// in time; the server refused the stream (`REFUSED_STREAM`) or went away gracefully before it (a `GOAWAY`
/// without error covers only streams it did not take, which is how a draining server turns calls away); or the
/// connection closed before the request was written.
fn never_reached(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            let graceful_go_away = h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
            return graceful_go_away || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled) {
            return true;
        }
        source = e.source();
    }
    false
}

/// An error with its sources, for logs.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
