//! The gateway's HTTP server: hyper's HTTP/1 under limits a public listener needs. At most
//! `gateway.max_connections` connections are open (more wait in the kernel's backlog); a client has
//! `gateway.header_read_timeout` seconds to send a request's headers, which also closes a keep-alive connection
//! left idle that long, so sockets that trickle bytes (slow loris) cannot hold the server. On shutdown the
//! listener closes and open requests finish.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, body::Body, extract::Request};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tower::ServiceExt;

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then waits for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken: not the server's end.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        spawn_connection(stream, peer, &app, limits, slot, Some(closed.clone()));
    }
    // Open connections finish the request they are on, then close.
    let _ = closing.send(true);
    // Connections the kernel already completed are served, not reset: a proxy in front may have sent them a
    // request it cannot resend elsewhere. Then the listener closes, so new connections are refused and go to
    // another replica. Bounded: at most `max_connections` of them, within one `header_read_timeout`.
    match listener.into_std() {
        Ok(listener) => {
            let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
            for _ in 0..limits.max_connections {
                let Ok((stream, peer)) = listener.accept() else { break };
                let Ok(Ok(slot)) = tokio::time::timeout_at(deadline, slots.clone().acquire_owned()).await else {
                    break;
                };
                let stream = stream.set_nonblocking(true).and_then(|()| tokio::net::TcpStream::from_std(stream));
                match stream {
                    Ok(stream) => spawn_connection(stream, peer, &app, limits, slot, None),
                    Err(e) => tracing::debug!(error = %e, %peer, "cannot take a connection while stopping"),
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot look for connections waiting to be accepted"),
    }
    // Every connection task holds a slot: all slots back means all connections are done.
    let _ = slots.acquire_many(limits.max_connections.max(1) as u32).await;
    Ok(())
}

/// Serves one connection until it ends, or, once `closed` says so, until its open request is answered. Without
/// `closed` (a connection taken while the server stops), it serves one request.
fn spawn_connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    app: &Router,
    limits: Limits,
    slot: tokio::sync::OwnedSemaphorePermit,
    closed: Option<tokio::sync::watch::Receiver<bool>>,
) {
    // Streamed tokens are small writes: Nagle's algorithm would hold each one back for a delayed ACK.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let service =
        TowerToHyperService::new(app.clone().map_request(|request: Request<Incoming>| request.map(Body::new)));
    tokio::spawn(async move {
        let _slot = slot;
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(closed.is_some());
        let connection = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let mut connection = std::pin::pin!(connection);
        let closing = async move {
            match closed {
                Some(mut closed) => drop(closed.wait_for(|closed| *closed).await),
                None => std::future::pending().await,
            }
        };
        let served = tokio::select! {
            served = connection.as_mut() => served,
            () = closing => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = served {
            tracing::debug!(error = %e, %peer, "connection ended");
        }
    });
}
