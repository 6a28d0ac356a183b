//! Per-call telemetry of the gRPC server, as one tower layer around every service:
//!
//! - a `grpc` span per call (OpenTelemetry kind `server`, named `package.Service/Method`), whose
//!   parent is the caller's trace when the request carries W3C `traceparent` metadata; the
//!   handler's work (and so every Customer.io request it makes) happens inside it, and it ends
//!   when the response — streamed or not — is finished;
//! - `rpc.server.requests` (counter) and `rpc.server.call.duration` (histogram, s) by `rpc.method`
//!   and `rpc.grpc.status_code`.
//!
//! Health checks and reflection are counted but get no span (a container health check every few
//! seconds would bury the traces that matter).
//!
//! Methods are labelled only when the server knows them (from the descriptor sets it serves), so
//! a caller probing random paths cannot grow the label set: those are `unknown`. Nothing from the
//! request but its method goes into a span or a metric (metadata holds the API key).

use std::{
    collections::HashSet,
    pin::Pin,
    sync::{Arc, LazyLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http_body::{Body, Frame, SizeHint};
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram},
    propagation::Extractor,
    trace::TraceContextExt as _,
};
use prost::Message as _;
use tonic::Code;
use tower::{Layer, Service};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The label of a method the server does not serve.
pub const UNKNOWN_METHOD: &str = "unknown";

/// Adds [`GrpcTelemetry`] to every service.
#[derive(Debug, Clone)]
pub struct GrpcTelemetryLayer {
    known: Arc<HashSet<String>>,
    timeout: Duration,
}

impl GrpcTelemetryLayer {
    /// `descriptor_sets`: the encoded `FileDescriptorSet`s of every service served (their
    /// methods are the known ones). `timeout`: the server's deadline, to tell a call cut off by
    /// it (`DEADLINE_EXCEEDED`) from one the caller abandoned (`CANCELLED`).
    pub fn new(descriptor_sets: &[&[u8]], timeout: Duration) -> Self {
        let mut known = HashSet::new();
        for set in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                tracing::warn!(
                    "a descriptor set did not decode; its methods are labelled `unknown`"
                );
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let service_name = service.name.unwrap_or_default();
                    let full = if package.is_empty() {
                        service_name
                    } else {
                        format!("{package}.{service_name}")
                    };
                    for method in service.method {
                        known.insert(format!("{full}/{}", method.name.unwrap_or_default()));
                    }
                }
            }
        }
        Self {
            known: Arc::new(known),
            timeout,
        }
    }

    /// The label of a request path: `package.Service/Method` if served, else [`UNKNOWN_METHOD`].
    pub fn method_label(&self, path: &str) -> String {
        let method = path.strip_prefix('/').unwrap_or(path);
        if self.known.contains(method) {
            method.to_string()
        } else {
            UNKNOWN_METHOD.to_string()
        }
    }
}

impl<S> Layer<S> for GrpcTelemetryLayer {
    type Service = GrpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTelemetry {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`GrpcTelemetryLayer`].
#[derive(Debug, Clone)]
pub struct GrpcTelemetry<S> {
    inner: S,
    layer: GrpcTelemetryLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcTelemetry<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = self.layer.method_label(request.uri().path());
        let span = call_span(&method, request.headers());
        let record = CallRecord {
            method,
            started: Instant::now(),
            span: span.clone(),
            code: None,
            timeout: self.layer.timeout,
            finished: false,
        };
        // Interceptors (auth) run inside `call`: give them the span too.
        let future = span.in_scope(|| self.inner.call(request));
        Box::pin(async move {
            let mut record = record;
            match future.instrument(record.span.clone()).await {
                Ok(response) => {
                    // A trailers-only answer (every error) carries its status in the headers.
                    record.code = grpc_status(response.headers());
                    Ok(response.map(|inner| CallBody {
                        inner,
                        record: Some(record),
                    }))
                }
                Err(error) => {
                    record.finish(Code::Unknown);
                    Err(error)
                }
            }
        })
    }
}

fn call_span(method: &str, headers: &http::HeaderMap) -> tracing::Span {
    if method.starts_with("grpc.health.") || method.starts_with("grpc.reflection.") {
        return tracing::Span::none();
    }
    let (service, name) = method.split_once('/').unwrap_or((method, ""));
    let span = tracing::info_span!(
        "grpc",
        otel.name = %method,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %name,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed: then there is nothing to link.
        let _ = span.set_parent(parent);
    }
    span
}

/// Reads propagation headers (`traceparent`, `tracestate`) from request metadata.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.trim().parse::<i32>().ok().map(Code::from_i32)
}

/// What one call records when it ends.
struct CallRecord {
    method: String,
    started: Instant,
    span: tracing::Span,
    code: Option<Code>,
    timeout: Duration,
    finished: bool,
}

impl CallRecord {
    fn finish(&mut self, code: Code) {
        if self.finished {
            return;
        }
        self.finished = true;
        let numeric = code as i32;
        self.span.record("rpc.grpc.status_code", numeric);
        if is_server_error(code) {
            self.span.record("otel.status_code", "error");
        }
        let attributes = [
            KeyValue::new("rpc.method", self.method.clone()),
            KeyValue::new("rpc.grpc.status_code", i64::from(numeric)),
        ];
        INSTRUMENTS.requests.add(1, &attributes);
        INSTRUMENTS
            .duration
            .record(self.started.elapsed().as_secs_f64(), &attributes);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // Dropped before a status was seen: the response was abandoned, by the server's deadline
        // or by the caller going away.
        let code = self
            .code
            .unwrap_or(if self.started.elapsed() >= self.timeout {
                Code::DeadlineExceeded
            } else {
                Code::Cancelled
            });
        self.finish(code);
    }
}

/// The codes OpenTelemetry's gRPC conventions count as server errors.
fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

pin_project_lite::pin_project! {
    /// The response body: passes everything through, notes the `grpc-status` trailer and
    /// records the call when the body ends or is dropped.
    pub struct CallBody<B> {
        #[pin]
        inner: B,
        record: Option<CallRecord>,
    }
}

impl<B: Body> Body for CallBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(record)) = (frame.trailers_ref(), this.record.as_mut())
                    && let Some(code) = grpc_status(trailers)
                {
                    record.code = Some(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(record) = this.record.as_mut() {
                    record.code.get_or_insert(Code::Internal);
                }
            }
            Poll::Ready(None) => {
                if let Some(mut record) = this.record.take() {
                    let code = record.code.unwrap_or(Code::Unknown);
                    record.finish(code);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct Instruments {
    requests: Counter<u64>,
    duration: Histogram<f64>,
}

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(|| {
    let meter = opentelemetry::global::meter("sharpsend-server");
    Instruments {
        requests: meter
            .u64_counter("rpc.server.requests")
            .with_description("gRPC calls by method and status code")
            .build(),
        duration: meter
            .f64_histogram("rpc.server.call.duration")
            .with_description("Duration of gRPC calls, until the last response message")
            .with_unit("s")
            .with_boundaries(sharpsend_core::telemetry::metrics::SECONDS_BOUNDARIES.to_vec())
            .build(),
    }
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_get_their_own_label() {
        let layer = GrpcTelemetryLayer::new(
            &[
                sharpsend_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
            Duration::from_secs(1),
        );
        assert_eq!(
            layer.method_label("/sharpsend.cio.v1.SegmentService/ListSegments"),
            "sharpsend.cio.v1.SegmentService/ListSegments"
        );
        assert_eq!(
            layer.method_label("/sharpsend.cio.v1.OpsService/RunJob"),
            "sharpsend.cio.v1.OpsService/RunJob"
        );
        assert_eq!(
            layer.method_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        for probe in [
            "/sharpsend.cio.v1.SegmentService/DropTables",
            "/x/y",
            "/",
            "/sharpsend.cio.v1.SegmentService/ListSegments/extra",
        ] {
            assert_eq!(layer.method_label(probe), UNKNOWN_METHOD, "{probe}");
        }
    }

    #[test]
    fn status_comes_from_the_grpc_status_header_or_trailer() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&headers), Some(Code::Unavailable));
        assert!(
            is_server_error(Code::Unavailable)
                && !is_server_error(Code::InvalidArgument)
                && !is_server_error(Code::NotFound)
        );
    }
}
