//! Serves one MoltBot gRPC service the way every MoltBot server does: with `grpc.health.v1`, server
//! reflection (v1 and v1alpha, listing this port's services only), request metrics, and a graceful stop when
//! `shutdown` resolves.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

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
    credential: crate::Credential,
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
    // Reflection in both versions (grpcurl 1.8 and Python's grpcio-reflection speak only v1alpha), listing only what
    // this port serves.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(S::NAME)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let reflection_v1 = reflection().build_v1().expect("the descriptor set compiled into this crate is valid");
    let reflection_v1alpha =
        reflection().build_v1alpha().expect("the descriptor set compiled into this crate is valid");
    tracing::info!(service = S::NAME, addr = ?listener.local_addr().ok(), "gRPC server listening");
    // Small request/response messages must not wait for Nagle's algorithm (40 ms against delayed ACKs).
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        if let Ok(stream) = &s {
            let _ = stream.set_nodelay(true);
        }
        s
    });
    Server::builder()
        .layer(tower::layer::layer_fn(move |inner| Observed(inner, credential.clone())))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Runs each call that carries a trace context in a span of its own (`grpc`, named `service/method` in traces), a
/// child of the caller's; calls outside a trace (a readiness probe's, a tool's) and health checks start none.
/// Counts each call by service, method and status code (`moltbot_grpc_requests_total`) and times it until the
/// response head (`moltbot_grpc_request_duration_seconds`). A call that fails before answering has its code in the
/// head; a stream that fails later has it in the trailers, which this does not wait for (a model call's outcome is
/// counted by the dialogue-manager, `moltbot_model_requests_total`, and the worker, `moltbot_model_calls_total`).
///
/// A call without the deployment's credential (`Credential`) is refused `UNAUTHENTICATED` here, before any service
/// sees it; health checks and reflection need none.
#[derive(Clone)]
struct Observed<S>(S, crate::Credential);

/// The services any caller may use: health checks (what orchestrators probe) and reflection.
const OPEN: [&str; 3] =
    ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

impl<S, B> tower_service::Service<Request<B>> for Observed<S>
where
    S: tower_service::Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let started = Instant::now();
        let (service, method) = match request.uri().path().trim_start_matches('/').split_once('/') {
            Some((service, method)) => (service.to_owned(), method.to_owned()),
            None => ("unknown".to_owned(), "unknown".to_owned()),
        };
        let open = OPEN.contains(&service.as_str());
        let trusted = open || self.1.admits(request.headers());
        // A refused call names no labels and starts no span of its own choosing.
        let (service, method) = if trusted { (service, method) } else { ("unknown".to_owned(), "unknown".to_owned()) };
        let carrier = moltbot_telemetry::trace::from_headers(request.headers());
        let span = if open || !trusted || carrier.is_empty() {
            tracing::Span::none()
        } else {
            let span = tracing::info_span!(
                "grpc",
                otel.name = %format_args!("{service}/{method}"),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = %method,
                trace_id = tracing::field::Empty,
            );
            moltbot_telemetry::trace::adopt(&span, &carrier);
            span
        };
        let call = trusted.then(|| span.in_scope(|| self.0.call(request)));
        Box::pin(tracing::Instrument::instrument(
            async move {
                let response = match call {
                    Some(call) => call.await?,
                    None => tonic::Status::unauthenticated(
                        "this service takes calls only from its own deployment: present its internal.service_token",
                    )
                    .into_http(),
                };
                let code = response
                    .headers()
                    .get("grpc-status")
                    .map_or(tonic::Code::Ok, |v| tonic::Code::from_bytes(v.as_bytes()));
                // A path no service has (answered Unimplemented) is not a label value: clients choose paths.
                let (service, method) = if code == tonic::Code::Unimplemented {
                    ("unknown".to_owned(), "unknown".to_owned())
                } else {
                    (service, method)
                };
                let code = format!("{code:?}");
                metrics::counter!("moltbot_grpc_requests_total", "service" => service.clone(), "method" => method.clone(), "code" => code)
                .increment(1);
                metrics::histogram!("moltbot_grpc_request_duration_seconds", "service" => service, "method" => method)
                    .record(started.elapsed().as_secs_f64());
                Ok(response)
            },
            span,
        ))
    }
}
