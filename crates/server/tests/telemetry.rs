//! OpenTelemetry end to end, against an in-process OTLP receiver (the collector's gRPC trace and
//! metrics services from `opentelemetry-proto`): gRPC calls to a real server backed by the
//! Customer.io simulator must arrive as spans with the right parent/child links (the caller's
//! `traceparent` honoured; gRPC span → job span → Customer.io request spans) and as metrics,
//! with no secret or personal value anywhere in them.
//!
//! The OpenTelemetry globals are per process, so this file is its own test binary with ONE test.

// Tests read the environment and the time directly; the product code may not.
#![allow(clippy::disallowed_methods)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use cio_sim::{SimConfig, Simulator};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    metrics::v1::{Metric, metric::Data},
    trace::v1::{Span, span::SpanKind},
};
use sharpsend_core::testing::{Backend, TestDatabase};
use sharpsend_core::{
    AppContext,
    clock::Clock,
    context::Migrations,
    settings::{ApiKeySetting, CioSettings, ServerSettings, Settings},
    telemetry::{self, OtlpConfig, TelemetryConfig},
};
use sharpsend_proto::v1::{
    self as pb, ops_service_client::OpsServiceClient, profile_service_client::ProfileServiceClient,
    segment_service_client::SegmentServiceClient,
};
use sharpsend_server::serve;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, metadata::MetadataValue, transport::Channel};

const API_KEY: &str = "telemetry-test-key-5f3a9c";
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_SPAN_ID: &str = "b7ad6b7169203331";
/// A customer id and an attribute value: personal data that must appear in no span.
const CUSTOMER_ID: &str = "telemetry-person-7731";
const ATTRIBUTE_VALUE: &str = "telemetry-private-value-9184";

/// What the receiver got.
#[derive(Clone, Default)]
struct Received {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.traces
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.metrics
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .push(request.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

impl Received {
    fn spans(&self) -> Vec<Span> {
        let traces = self.traces.lock().map(|t| t.clone()).unwrap_or_default();
        traces
            .into_iter()
            .flat_map(|r| r.resource_spans)
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans)
            .collect()
    }

    fn service_names(&self) -> Vec<String> {
        let traces = self.traces.lock().map(|t| t.clone()).unwrap_or_default();
        traces
            .iter()
            .flat_map(|r| &r.resource_spans)
            .filter_map(|rs| rs.resource.as_ref())
            .filter_map(|r| attr(&r.attributes, "service.name"))
            .collect()
    }

    fn metrics(&self) -> Vec<Metric> {
        let requests = self.metrics.lock().map(|m| m.clone()).unwrap_or_default();
        requests
            .into_iter()
            .flat_map(|r| r.resource_metrics)
            .flat_map(|rm| rm.scope_metrics)
            .flat_map(|sm| sm.metrics)
            .collect()
    }
}

fn text(value: &AnyValue) -> Option<String> {
    match value.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(text)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Data points of `name` as (attributes, value): sums and gauges by value, histograms by count.
fn points(metrics: &[Metric], name: &str) -> Vec<(HashMap<String, String>, f64)> {
    let to_map = |attributes: &[KeyValue]| -> HashMap<String, String> {
        attributes
            .iter()
            .filter_map(|kv| Some((kv.key.clone(), kv.value.as_ref().and_then(text)?)))
            .collect()
    };
    let number =
        |v: &Option<opentelemetry_proto::tonic::metrics::v1::number_data_point::Value>| match v {
            Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i)) => {
                *i as f64
            }
            Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(
                d,
            )) => *d,
            None => 0.0,
        };
    let mut out = Vec::new();
    for metric in metrics.iter().filter(|m| m.name == name) {
        match &metric.data {
            Some(Data::Sum(sum)) => out.extend(
                sum.data_points
                    .iter()
                    .map(|p| (to_map(&p.attributes), number(&p.value))),
            ),
            Some(Data::Gauge(gauge)) => out.extend(
                gauge
                    .data_points
                    .iter()
                    .map(|p| (to_map(&p.attributes), number(&p.value))),
            ),
            Some(Data::Histogram(h)) => out.extend(
                h.data_points
                    .iter()
                    .map(|p| (to_map(&p.attributes), p.count as f64)),
            ),
            _ => {}
        }
    }
    out
}

fn has_point(metrics: &[Metric], name: &str, want: &[(&str, &str)], at_least: f64) -> bool {
    points(metrics, name).iter().any(|(attrs, value)| {
        *value >= at_least
            && want
                .iter()
                .all(|(k, v)| attrs.get(*k).map(String::as_str) == Some(*v))
    })
}

/// Adds the API key and, when given, a `traceparent`.
#[derive(Clone)]
struct Meta(Option<String>);

impl tonic::service::Interceptor for Meta {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let key: MetadataValue<_> = format!("Bearer {API_KEY}")
            .parse()
            .map_err(|_| Status::internal("key"))?;
        request.metadata_mut().insert("authorization", key);
        if let Some(traceparent) = &self.0 {
            let value: MetadataValue<_> = traceparent
                .parse()
                .map_err(|_| Status::internal("traceparent"))?;
            request.metadata_mut().insert("traceparent", value);
        }
        Ok(request)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_arrive_as_linked_spans_and_metrics_without_secrets() -> anyhow::Result<()> {
    // The receiver, on port 0.
    let received = Received::default();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let otlp_addr = listener.local_addr()?;
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .add_service(MetricsServiceServer::new(received.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let guard = telemetry::init(TelemetryConfig {
        json_logs: false,
        log_filter: Some(
            std::env::var("TEST_LOG")
                .map(|_| "info".to_string())
                .unwrap_or_else(|_| "off".to_string()),
        ),
        service_name: "sharpsend-telemetry-test".into(),
        otlp: Some(OtlpConfig {
            // Only flushes export metrics in this test.
            metric_interval: Some(Duration::from_secs(3600)),
            ..OtlpConfig::to_endpoint(format!("http://{otlp_addr}"))
        }),
    })?;
    ensure!(guard.is_exporting());

    // A server like TestApp's: simulator + SQLite + the real gRPC server on port 0.
    let sim = Simulator::spawn(SimConfig::demo()).await?;
    let sim_config = sim.sim.config().clone();
    let db = TestDatabase::create(Backend::Sqlite)
        .await?
        .context("a SQLite test database")?;
    let settings = CioSettings::for_simulator(
        url::Url::parse(&sim.base_url())?,
        &sim_config.site_id,
        &sim_config.track_api_key,
        &sim_config.app_api_key,
    );
    let settings = Settings {
        database_url: db.url.clone(),
        cio: Some(settings),
        server: ServerSettings {
            api_keys: vec![ApiKeySetting {
                name: "telemetry-test".into(),
                key: API_KEY.to_string().into(),
            }],
            ..ServerSettings::default()
        },
        ..Settings::default()
    };
    let ctx = AppContext::bootstrap(settings, Migrations::Apply, Clock::system()).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, ctx.clone(), async move {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;

    // 1. A call carrying the caller's trace context, which reaches Customer.io.
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    let mut segments =
        SegmentServiceClient::with_interceptor(channel.clone(), Meta(Some(traceparent)));
    segments
        .sync_segments(pb::SyncSegmentsRequest::default())
        .await?;

    // 2. A write with personal data, delivered by a job run now (no caller trace: a new trace).
    let mut profiles = ProfileServiceClient::with_interceptor(channel.clone(), Meta(None));
    let attributes = prost_types::Struct {
        fields: [(
            "plan_note".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(
                    ATTRIBUTE_VALUE.into(),
                )),
            },
        )]
        .into(),
    };
    profiles
        .update_attributes(pb::UpdateAttributesRequest {
            customer_id: CUSTOMER_ID.into(),
            attributes: Some(attributes),
        })
        .await?;
    let mut ops = OpsServiceClient::with_interceptor(channel.clone(), Meta(None));
    let started = ops
        .run_job(pb::RunJobRequest {
            job: "outbox-delivery".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run;
    // RunJob answers at once; follow the run until it has ended.
    let run_id = started.map(|r| r.id).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let run = loop {
        let run = ops
            .get_job_run(pb::GetJobRunRequest { run_id })
            .await?
            .into_inner()
            .run;
        let running = run
            .as_ref()
            .is_some_and(|r| r.outcome == pb::JobRunOutcome::Running as i32);
        if !running || std::time::Instant::now() > deadline {
            break run;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    ensure!(
        run.as_ref()
            .is_some_and(|r| r.outcome == pb::JobRunOutcome::Succeeded as i32),
        "{run:?}"
    );

    // 3. A refused call: its code is counted too.
    let mut unauthenticated = SegmentServiceClient::new(channel.clone());
    let refused = unauthenticated
        .list_segments(pb::ListSegmentsRequest::default())
        .await;
    ensure!(
        refused.as_ref().err().map(Status::code) == Some(tonic::Code::Unauthenticated),
        "{refused:?}"
    );

    // 4. A health check: counted, but no span.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;

    // Flush (blocking: off the async threads) and wait for the receiver to have it all.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let guard = Arc::new(guard);
    loop {
        let g = guard.clone();
        let flushed = tokio::task::spawn_blocking(move || g.force_flush()).await?;
        let spans = received.spans();
        let have_all = spans
            .iter()
            .any(|s| s.name == "sharpsend.cio.v1.SegmentService/SyncSegments")
            && spans
                .iter()
                .any(|s| s.name == "sharpsend.cio.v1.OpsService/RunJob")
            && spans.iter().any(|s| s.name == "POST /api/v2/batch")
            && received
                .metrics()
                .iter()
                .any(|m| m.name == "sharpsend.job.runs");
        if have_all {
            break;
        }
        if std::time::Instant::now() > deadline {
            let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
            bail!("telemetry did not arrive: flush {flushed:?}, spans {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spans = received.spans();
    let children_of = |parent: &Span| -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
            .collect()
    };

    // The gRPC span continues the caller's trace...
    let sync = spans
        .iter()
        .find(|s| s.name == "sharpsend.cio.v1.SegmentService/SyncSegments")
        .context("SyncSegments span")?;
    ensure!(sync.kind == SpanKind::Server as i32);
    ensure!(
        hex(&sync.trace_id) == TRACE_ID,
        "trace id {}",
        hex(&sync.trace_id)
    );
    ensure!(
        hex(&sync.parent_span_id) == PARENT_SPAN_ID,
        "parent {}",
        hex(&sync.parent_span_id)
    );
    ensure!(
        attr(&sync.attributes, "rpc.grpc.status_code").as_deref() == Some("0"),
        "{:?}",
        sync.attributes
    );
    // ...its job run is its child (the sync answers at once and goes on in a task), and the
    // run's Customer.io requests are the run's children, named by endpoint template.
    let job = children_of(sync);
    let job = job
        .iter()
        .find(|s| s.name == "job segment-sync")
        .context("job span child of SyncSegments")?;
    let list = children_of(job);
    let list = list
        .iter()
        .find(|s| s.name == "GET /v1/segments")
        .context("GET /v1/segments child of the segment-sync job")?;
    ensure!(list.kind == SpanKind::Client as i32);
    for (key, want) in [
        ("api", "app"),
        ("endpoint", "/v1/segments"),
        ("status", "200"),
        ("attempts", "1"),
    ] {
        ensure!(
            attr(&list.attributes, key).as_deref() == Some(want),
            "{key}: {:?}",
            list.attributes
        );
    }
    ensure!(
        attr(&list.attributes, "rate_limit_wait_ms").is_some(),
        "{:?}",
        list.attributes
    );
    let counts: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            s.trace_id == sync.trace_id && s.name == "GET /v1/segments/{segment_id}/customer_count"
        })
        .collect();
    ensure!(
        !counts.is_empty(),
        "no member-count requests in the SyncSegments trace"
    );
    ensure!(
        counts.iter().all(|s| s.parent_span_id == job.span_id),
        "member-count requests not under the job run's span"
    );

    // RunJob: a new trace (no traceparent): gRPC span → job span → delivery step → batch request.
    let run_job = spans
        .iter()
        .find(|s| s.name == "sharpsend.cio.v1.OpsService/RunJob")
        .context("RunJob span")?;
    ensure!(run_job.parent_span_id.is_empty() && hex(&run_job.trace_id) != TRACE_ID);
    let job = children_of(run_job);
    let job = job
        .iter()
        .find(|s| s.name == "job outbox-delivery")
        .context("job span child of RunJob")?;
    ensure!(
        attr(&job.attributes, "outcome").as_deref() == Some("succeeded"),
        "{:?}",
        job.attributes
    );
    let step = children_of(job);
    let step = step
        .iter()
        .find(|s| s.name == "outbox_step")
        .context("outbox_step child of the job span")?;
    ensure!(
        attr(&step.attributes, "delivered").as_deref() == Some("1"),
        "{:?}",
        step.attributes
    );
    let batch = children_of(step);
    let batch = batch
        .iter()
        .find(|s| s.name == "POST /api/v2/batch")
        .context("batch request child of the step")?;
    ensure!(
        attr(&batch.attributes, "api").as_deref() == Some("track"),
        "{:?}",
        batch.attributes
    );

    // The resource names the service.
    ensure!(
        received
            .service_names()
            .iter()
            .all(|n| n == "sharpsend-telemetry-test"),
        "{:?}",
        received.service_names()
    );

    // No secret or personal value in any span name, attribute or event.
    let secrets = [
        API_KEY,
        CUSTOMER_ID,
        ATTRIBUTE_VALUE,
        &sim_config.track_api_key,
        &sim_config.app_api_key,
    ];
    for span in &spans {
        let mut values: Vec<String> = vec![span.name.clone()];
        values.extend(
            span.attributes
                .iter()
                .filter_map(|kv| kv.value.as_ref().and_then(text)),
        );
        for event in &span.events {
            values.push(event.name.clone());
            values.extend(
                event
                    .attributes
                    .iter()
                    .filter_map(|kv| kv.value.as_ref().and_then(text)),
            );
        }
        for value in &values {
            for secret in secrets {
                ensure!(
                    !value.contains(secret),
                    "span {} carries {secret:?}: {value}",
                    span.name
                );
            }
        }
    }

    // Metrics: gRPC calls by method and code, Customer.io requests by endpoint and status, jobs,
    // outbox delivery and depth.
    let metrics = received.metrics();
    let sync_ok = [
        ("rpc.method", "sharpsend.cio.v1.SegmentService/SyncSegments"),
        ("rpc.grpc.status_code", "0"),
    ];
    ensure!(
        has_point(&metrics, "rpc.server.requests", &sync_ok, 1.0),
        "{:?}",
        points(&metrics, "rpc.server.requests")
    );
    ensure!(has_point(
        &metrics,
        "rpc.server.call.duration",
        &sync_ok,
        1.0
    ));
    let refused = [
        ("rpc.method", "sharpsend.cio.v1.SegmentService/ListSegments"),
        ("rpc.grpc.status_code", "16"),
    ];
    ensure!(
        has_point(&metrics, "rpc.server.requests", &refused, 1.0),
        "{:?}",
        points(&metrics, "rpc.server.requests")
    );
    let health_ok = [
        ("rpc.method", "grpc.health.v1.Health/Check"),
        ("rpc.grpc.status_code", "0"),
    ];
    ensure!(
        has_point(&metrics, "rpc.server.requests", &health_ok, 1.0),
        "{:?}",
        points(&metrics, "rpc.server.requests")
    );
    ensure!(
        !spans.iter().any(|s| s.name.starts_with("grpc.health")),
        "health checks are traced"
    );
    let list_ok = [
        ("api", "app"),
        ("method", "GET"),
        ("endpoint", "/v1/segments"),
        ("status", "200"),
    ];
    ensure!(
        has_point(&metrics, "cio.client.requests", &list_ok, 1.0),
        "{:?}",
        points(&metrics, "cio.client.requests")
    );
    ensure!(has_point(
        &metrics,
        "cio.client.request.duration",
        &list_ok,
        1.0
    ));
    ensure!(has_point(
        &metrics,
        "cio.client.rate_limit.wait",
        &[("api", "app")],
        1.0
    ));
    let job_ok = [("job", "outbox-delivery"), ("outcome", "succeeded")];
    ensure!(
        has_point(&metrics, "sharpsend.job.runs", &job_ok, 1.0),
        "{:?}",
        points(&metrics, "sharpsend.job.runs")
    );
    ensure!(has_point(&metrics, "sharpsend.job.duration", &job_ok, 1.0));
    ensure!(
        has_point(&metrics, "sharpsend.outbox.delivered", &[], 1.0),
        "{:?}",
        points(&metrics, "sharpsend.outbox.delivered")
    );
    let depth = points(&metrics, "sharpsend.outbox.depth");
    ensure!(
        depth
            .iter()
            .any(|(a, v)| a.get("status").map(String::as_str) == Some("pending") && *v == 0.0),
        "{depth:?}"
    );
    ensure!(!points(&metrics, "sharpsend.outbox.oldest_age").is_empty());
    for metric in &metrics {
        for (attributes, _) in points(&metrics, &metric.name) {
            for value in attributes.values() {
                ensure!(
                    !value.contains(CUSTOMER_ID) && !value.contains(API_KEY),
                    "{}: {value}",
                    metric.name
                );
            }
        }
    }

    // Shutting down flushes what is still buffered (the batch exporter waits 5 s otherwise).
    ops.list_jobs(pb::ListJobsRequest {}).await?;
    let _ = stop.send(());
    server.await??;
    sim.shutdown().await;
    db.cleanup().await;
    let guard = Arc::try_unwrap(guard).map_err(|_| anyhow::anyhow!("guard still shared"))?;
    tokio::task::spawn_blocking(move || guard.shutdown()).await?;
    let names: Vec<String> = received.spans().into_iter().map(|s| s.name).collect();
    ensure!(
        names
            .iter()
            .any(|n| n == "sharpsend.cio.v1.OpsService/ListJobs"),
        "not flushed at shutdown: {names:?}"
    );
    receiver.abort();
    Ok(())
}
