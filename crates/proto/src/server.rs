//! Serves one MoltBot gRPC service the way every MoltBot server does: with `grpc.health.v1`, server
//! reflection, and a graceful stop when `shutdown` resolves.

use std::{convert::Infallible, future::Future};

use tokio::net::TcpListener;
use tonic::{
    body::Body,
    codegen::http::{Request, Response},
    server::NamedService,
    transport::Server,
};

pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error>
where
    S: tower_service::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<S>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptor set compiled into this crate is valid");
    tracing::info!(service = S::NAME, addr = ?listener.local_addr().ok(), "gRPC server listening");
    // Small request/response messages must not wait for Nagle's algorithm (40 ms against delayed ACKs).
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        if let Ok(stream) = &s {
            let _ = stream.set_nodelay(true);
        }
        s
    });
    Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
