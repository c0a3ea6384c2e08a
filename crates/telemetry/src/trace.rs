//! Traces: spans from `tracing`, exported over OTLP/gRPC when `telemetry.otlp_endpoint` is set, and the W3C trace
//! context carried between services: HTTP headers from clients, gRPC metadata from the gateway to the
//! dialogue-manager, and the job's `trace_context` from the dialogue-manager to a worker. Without an endpoint
//! every function here costs next to nothing and carries nothing.

use std::collections::HashMap;

use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C trace-context fields.
const FIELDS: [&str; 2] = ["traceparent", "tracestate"];

/// The trace-context fields of HTTP headers or gRPC metadata.
pub fn from_headers(headers: &axum::http::HeaderMap) -> HashMap<String, String> {
    FIELDS.iter().filter_map(|&field| Some((field.to_owned(), headers.get(field)?.to_str().ok()?.to_owned()))).collect()
}

/// The current span's trace context, to send on (empty when tracing is off).
pub fn current() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.inject_context(&context, &mut carrier));
    carrier
}

/// Writes the current span's trace context into an outgoing call's `headers` (nothing when tracing is off, or
/// outside a traced span, so a context set by hand stays).
pub fn inject(headers: &mut axum::http::HeaderMap) {
    for (field, value) in current() {
        if let (Ok(name), Ok(value)) =
            (axum::http::HeaderName::from_bytes(field.as_bytes()), axum::http::HeaderValue::from_str(&value))
        {
            headers.insert(name, value);
        }
    }
}

/// Makes `span` a child of the trace in `carrier` (a client's `traceparent`, one carried by a call or a job), and
/// records the trace id in its `trace_id` field, so every log line inside names it.
pub fn adopt(span: &tracing::Span, carrier: &HashMap<String, String>) {
    if !carrier.is_empty() {
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(carrier));
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let trace = context.span().span_context().trace_id();
    if trace != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace));
    }
}

/// Exporting spans; dropping it sends what is still buffered.
pub struct Tracing {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Drop for Tracing {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("traces: the last spans were not sent: {e}");
        }
    }
}

/// The OpenTelemetry layer for `tracing`, exporting to `endpoint` as `service`, keeping `ratio` of new traces.
pub(crate) fn layer<S>(
    endpoint: &str,
    service: &str,
    ratio: f64,
) -> Result<(tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>, Tracing), String>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::trace::Sampler;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint {endpoint}: {e}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build())
        .build();
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let tracer = provider.tracer("moltbot");
    Ok((tracing_opentelemetry::layer().with_tracer(tracer), Tracing { provider }))
}
