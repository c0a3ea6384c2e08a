//! A gRPC client channel over several replicas of one service: each call goes to the next replica in turn, and
//! a call that a replica never took (its connection was refused, or it was draining and refused the stream) is
//! sent to the next one. That is what lets a replica restart under load without a failed request: while it
//! drains, its running calls finish and new ones go elsewhere.
//!
//! Only calls that provably never reached a server are resent, so a call is never run twice, and a resent call
//! carries what is left of its deadline (`grpc-timeout`), not the whole. A replica that could not be connected
//! to is passed over for a few seconds while another is up. Request bodies are buffered to be resendable;
//! MoltBot's services take one request message per call (no client streaming). With one URL a call is tried up
//! to three times, briefly apart, as a load balancer behind that URL may reach another replica next time.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
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
    /// The deployment's credential, presented on every call (`authorization`).
    credential: Option<tonic::codegen::http::HeaderValue>,
}

struct Replica {
    url: String,
    endpoint: Endpoint,
    channel: Channel,
    /// Until when calls pass this replica over: it could not be connected to.
    down_until: std::sync::Mutex<Option<Instant>>,
}

/// How long a replica that could not be connected to is passed over while another is up: longer than a connect
/// attempt may take, so one that drops connections silently stalls at most one call at a time.
const PASS_OVER: Duration = Duration::from_secs(6);
/// Attempts of a call to a single URL, and the pause before each retry.
const SINGLE_URL_ATTEMPTS: usize = 3;
const SINGLE_URL_PAUSE: Duration = Duration::from_millis(100);

impl Replica {
    fn is_down(&self) -> bool {
        self.down_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some_and(|t| t > Instant::now())
    }

    fn mark(&self, down: bool) {
        *self.down_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            down.then(|| Instant::now() + PASS_OVER);
    }
}

/// A list of replica URLs that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("`{url}` is not a valid URL: {message}")]
pub struct BadUrl {
    pub url: String,
    pub message: String,
}

impl Replicas {
    /// Every call presents `credential` (the deployment's `internal.service_token`).
    pub fn with_credential(mut self, credential: &crate::Credential) -> Self {
        self.credential = credential.header();
        self
    }

    /// Channels to `urls`, one URL or several separated by commas; they connect on first use, so a service can
    /// start before what it calls.
    pub fn lazy(urls: &str) -> Result<Self, BadUrl> {
        let channels = split(urls)
            .map(|url| {
                let endpoint = Endpoint::from_shared(url.to_owned())
                    .map_err(|e| BadUrl { url: url.to_owned(), message: e.to_string() })?;
                let endpoint = endpoint.connect_timeout(Duration::from_secs(5));
                let channel = endpoint.connect_lazy();
                Ok(Replica { url: url.to_owned(), channel, endpoint, down_until: Default::default() })
            })
            .collect::<Result<Vec<_>, BadUrl>>()?;
        if channels.is_empty() {
            return Err(BadUrl { url: urls.to_owned(), message: "no URL given".into() });
        }
        Ok(Self { channels: channels.into(), next: Arc::default(), credential: None })
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

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // The callee's spans join the caller's trace.
        moltbot_telemetry::trace::inject(request.headers_mut());
        if let Some(credential) = &self.credential {
            request.headers_mut().insert(tonic::codegen::http::header::AUTHORIZATION, credential.clone());
        }
        let replicas = self.clone();
        Box::pin(async move {
            let started = Instant::now();
            let count = replicas.channels.len();
            let attempts = if count == 1 { SINGLE_URL_ATTEMPTS } else { count };
            let first = replicas.next.fetch_add(1, Ordering::Relaxed);
            // Replicas in the order this call tries them: those up take turns, those passed over come last.
            let (up, down): (Vec<&Replica>, Vec<&Replica>) = replicas.channels.iter().partition(|r| !r.is_down());
            let turn = if up.is_empty() { 0 } else { first % up.len() };
            let order: Vec<&Replica> = up[turn..].iter().chain(&up[..turn]).chain(&down).copied().collect();
            let (head, body) = request.into_parts();
            let body = body.collect().await?.to_bytes();
            let budget = crate::grpc_timeout::read(&head.headers);
            for attempt in 0..attempts {
                let replica = order[attempt % count];
                let mut head = head.clone();
                let left = budget.map(|budget| budget.saturating_sub(started.elapsed()));
                if let Some(left) = left {
                    head.headers.insert(crate::grpc_timeout::HEADER, crate::grpc_timeout::value(left));
                }
                let request = Request::from_parts(head, Body::new(http_body_util::Full::new(body.clone())));
                // A connection that takes long to make counts against the call's deadline too.
                let limit = left.unwrap_or(Duration::MAX);
                let sent = tokio::time::timeout(limit, send(&replica.channel, request)).await.unwrap_or_else(|_| {
                    Err(Box::new(tonic::Status::deadline_exceeded("no replica answered in time")) as BoxError)
                });
                let error = match sent {
                    Ok(response) => {
                        replica.mark(false);
                        return Ok(response);
                    }
                    Err(error) => error,
                };
                let reached = Reached::of(&*error);
                replica.mark(reached == Reached::NotConnected);
                let out_of_time = budget.is_some_and(|b| started.elapsed() >= b);
                if reached == Reached::Maybe || attempt + 1 == attempts || out_of_time {
                    return Err(error);
                }
                tracing::info!(url = %replica.url, error = %chain(&*error), "replica did not take the call; trying again");
                if count == 1 {
                    tokio::time::sleep(SINGLE_URL_PAUSE * (attempt as u32 + 1)).await;
                }
            }
            unreachable!("the last attempt returns")
        })
    }
}

async fn send(channel: &Channel, request: Request<Body>) -> Result<Response<Body>, BoxError> {
    Ok(channel.clone().ready().await?.call(request).await?)
}

/// How far a failed call got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reached {
    /// No connection could be made (refused, unreachable, timed out): nothing was sent.
    NotConnected,
    /// The server turned the call away unread: it refused the stream (`REFUSED_STREAM`) or went away gracefully
    /// before it (a `GOAWAY` without error covers only streams the server did not take, which is how a draining
    /// server turns calls away), or the connection closed before the request was written.
    Refused,
    /// The server may have taken it: never resent.
    Maybe,
}

impl Reached {
    fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut source = Some(error);
        while let Some(e) = source {
            if e.downcast_ref::<tonic::ConnectError>().is_some() {
                return Self::NotConnected;
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::ConnectionRefused
            {
                return Self::NotConnected;
            }
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                let graceful_go_away = h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
                let refused_stream = h2.is_reset() && h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM);
                let refused = graceful_go_away || refused_stream;
                return if refused { Self::Refused } else { Self::Maybe };
            }
            if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled) {
                return Self::Refused;
            }
            source = e.source();
        }
        Self::Maybe
    }
}

/// An error with its sources, for logs and messages (a transport error's own text is often just "transport error").
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_call_that_never_reached_a_server_is_resent() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(Reached::of(&refused), Reached::NotConnected);
        let connect = tonic::ConnectError(Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)));
        assert_eq!(Reached::of(&connect), Reached::NotConnected);
        // A read that timed out or a reset after sending may have reached the server.
        for kind in [std::io::ErrorKind::TimedOut, std::io::ErrorKind::ConnectionReset, std::io::ErrorKind::BrokenPipe]
        {
            assert_eq!(Reached::of(&std::io::Error::from(kind)), Reached::Maybe, "{kind:?}");
        }
        // Only the server's own reset of the stream counts, not the reason alone.
        assert_eq!(Reached::of(&h2::Error::from(h2::Reason::REFUSED_STREAM)), Reached::Maybe);
        assert_eq!(Reached::of(&h2::Error::from(h2::Reason::INTERNAL_ERROR)), Reached::Maybe);
    }
}
