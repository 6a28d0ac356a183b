//! Telemetry shared by the binaries: logs and, when an OTLP collector is configured,
//! OpenTelemetry traces and metrics.
//!
//! - Logs: an `EnvFilter` (`RUST_LOG` from the settings, default [`DEFAULT_FILTER`]), human or
//!   JSON output.
//! - Traces and metrics: exported over OTLP/gRPC ONLY when `OTEL_EXPORTER_OTLP_ENDPOINT` (or a
//!   signal's own `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT`) is set. The usual `OTEL_*`
//!   variables apply (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SDK_DISABLED`,
//!   `OTEL_TRACES_EXPORTER=none`, `OTEL_METRICS_EXPORTER=none`, `OTEL_TRACES_SAMPLER`,
//!   `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//!   …). Without an endpoint nothing is exported, no exporter is built and start-up does not
//!   wait; instruments are then the API's no-ops. The exporter connects lazily, so a collector
//!   that is down delays nothing either (exports fail in the background and are logged).
//! - Tracing spans become OpenTelemetry spans (`tracing-opentelemetry`); which spans is chosen by
//!   `SHARPSEND_TRACE_FILTER` (default [`DEFAULT_FILTER`]), independent of `RUST_LOG`. Incoming
//!   `traceparent` headers are read with the W3C trace-context propagator installed here.
//! - [`TelemetryGuard`] flushes and shuts the providers down when dropped (or on
//!   [`TelemetryGuard::shutdown`]), so the last spans and metrics of a run are not lost.
//! - [`metrics`]: the instruments of this crate (job runs, outbox delivery and depth).

pub mod metrics;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use tracing_subscriber::{
    EnvFilter, Layer as _, fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use crate::settings::{ConfigError, Env};

/// Default filter: our logs at info; sqlx logs every statement at info, so keep it at warn.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,sea_orm=warn,h2=warn,hyper=warn,tower=warn";

/// The variable choosing which spans are exported (EnvFilter syntax).
pub const TRACE_FILTER_VARIABLE: &str = "SHARPSEND_TRACE_FILTER";

/// How long shutdown waits for the last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// What to set up.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// One JSON object per log line instead of human-readable lines.
    pub json_logs: bool,
    /// Log filter (`RUST_LOG`, read with the other settings); `None`: [`DEFAULT_FILTER`]. Spans
    /// are exported by their own filter ([`OtlpConfig::trace_filter`]).
    pub log_filter: Option<String>,
    /// `service.name` of the exported telemetry (`OTEL_SERVICE_NAME` wins when set).
    pub service_name: String,
    /// OTLP export; `None`: logs only.
    pub otlp: Option<OtlpConfig>,
}

/// OTLP/gRPC export settings.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The collector, e.g. `http://otel-collector:4317`. `None`: the exporter reads
    /// `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` itself.
    pub endpoint: Option<String>,
    /// Export traces.
    pub traces: bool,
    /// Export metrics.
    pub metrics: bool,
    /// Metric export interval; `None`: `OTEL_METRIC_EXPORT_INTERVAL` (ms) or 60 s.
    pub metric_interval: Option<Duration>,
    /// Which spans are exported (EnvFilter syntax).
    pub trace_filter: String,
}

impl OtlpConfig {
    /// Traces and metrics to `endpoint` with the default filter.
    pub fn to_endpoint(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: Some(endpoint.into()),
            traces: true,
            metrics: true,
            metric_interval: None,
            trace_filter: DEFAULT_FILTER.to_string(),
        }
    }
}

impl TelemetryConfig {
    /// Logs only: nothing exported.
    pub fn logs_only(service_name: &str, json_logs: bool) -> Self {
        Self {
            json_logs,
            log_filter: None,
            service_name: service_name.to_string(),
            otlp: None,
        }
    }

    /// Reads the standard `OTEL_*` variables: OTLP export is on only when an endpoint variable is
    /// set and `OTEL_SDK_DISABLED` is not `true`. Errors name the variable, never its value.
    pub fn from_env(
        env: &dyn Env,
        default_service_name: &str,
        json_logs: bool,
    ) -> Result<Self, ConfigError> {
        // The spec's precedence: OTEL_SERVICE_NAME, then service.name in OTEL_RESOURCE_ATTRIBUTES.
        let from_attributes = env.var("OTEL_RESOURCE_ATTRIBUTES").and_then(|attributes| {
            attributes.split(',').find_map(|kv| {
                kv.split_once('=')
                    .filter(|(k, _)| k.trim() == "service.name")
                    .map(|(_, v)| v.trim().to_string())
            })
        });
        let service_name = env
            .var("OTEL_SERVICE_NAME")
            .or(from_attributes)
            .unwrap_or_else(|| default_service_name.to_string());
        let mut config = Self {
            json_logs,
            log_filter: None,
            service_name,
            otlp: None,
        };
        if env
            .var("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        {
            return Ok(config);
        }
        let generic = endpoint_var(env, "OTEL_EXPORTER_OTLP_ENDPOINT")?;
        let traces_endpoint = endpoint_var(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")?;
        let metrics_endpoint = endpoint_var(env, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")?;
        let wanted = |variable: &str| {
            env.var(variable)
                .is_none_or(|v| !v.trim().eq_ignore_ascii_case("none"))
        };
        let traces = (generic || traces_endpoint) && wanted("OTEL_TRACES_EXPORTER");
        let metrics = (generic || metrics_endpoint) && wanted("OTEL_METRICS_EXPORTER");
        if !traces && !metrics {
            return Ok(config);
        }
        for variable in [
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        ] {
            if let Some(protocol) = env.var(variable)
                && protocol.trim() != "grpc"
            {
                return Err(ConfigError {
                    variable,
                    problem: "only `grpc` is supported (OTLP over gRPC, usually port 4317)".into(),
                });
            }
        }
        let trace_filter = env
            .var(TRACE_FILTER_VARIABLE)
            .unwrap_or_else(|| DEFAULT_FILTER.to_string());
        if EnvFilter::try_new(&trace_filter).is_err() {
            return Err(ConfigError {
                variable: TRACE_FILTER_VARIABLE,
                problem: "is not a valid filter (tracing EnvFilter syntax, e.g. `info,sqlx=warn`)"
                    .into(),
            });
        }
        config.otlp = Some(OtlpConfig {
            endpoint: None,
            traces,
            metrics,
            metric_interval: None,
            trace_filter,
        });
        Ok(config)
    }
}

/// Whether an endpoint variable is set; a set one must be a plain `http://host:port` URL.
fn endpoint_var(env: &dyn Env, variable: &'static str) -> Result<bool, ConfigError> {
    let Some(raw) = env.var(variable) else {
        return Ok(false);
    };
    let error = |problem: &str| ConfigError {
        variable,
        problem: problem.to_string(),
    };
    let url = url::Url::parse(raw.trim())
        .map_err(|_| error("expected a URL such as http://otel-collector:4317"))?;
    match url.scheme() {
        "http" if url.host().is_some() => Ok(true),
        "https" => Err(error(
            "https is not supported by this build: export to a collector beside the service over http (e.g. http://otel-collector:4317), which forwards with TLS",
        )),
        _ => Err(error("expected a URL such as http://otel-collector:4317")),
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP export needs a Tokio runtime; call telemetry::init inside one")]
    NoRuntime,
    #[error("could not build the OTLP {signal} exporter: {message}")]
    Exporter {
        signal: &'static str,
        message: String,
    },
    #[error("invalid log or trace filter: {0}")]
    Filter(String),
}

/// Keeps the providers alive; flushes and shuts them down when dropped.
#[must_use = "dropping the guard shuts telemetry export down"]
#[derive(Default)]
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("traces", &self.tracer_provider.is_some())
            .field("metrics", &self.meter_provider.is_some())
            .finish()
    }
}

impl TelemetryGuard {
    /// Whether anything is exported.
    pub fn is_exporting(&self) -> bool {
        self.tracer_provider.is_some() || self.meter_provider.is_some()
    }

    /// Exports every finished span and the current metrics now. Blocks until done: call it
    /// from a multi-threaded runtime (or `spawn_blocking`).
    pub fn force_flush(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if let Some(p) = &self.tracer_provider
            && let Err(e) = p.force_flush()
        {
            problems.push(format!("traces: {e}"));
        }
        if let Some(p) = &self.meter_provider
            && let Err(e) = p.force_flush()
        {
            problems.push(format!("metrics: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Flushes and shuts the providers down (what dropping the guard does).
    pub fn shutdown(mut self) {
        self.shutdown_providers();
    }

    fn shutdown_providers(&mut self) {
        if let Some(p) = self.tracer_provider.take()
            && let Err(e) = p.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            eprintln!("telemetry: flushing traces at shutdown failed: {e}");
        }
        if let Some(p) = self.meter_provider.take()
            && let Err(e) = p.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            eprintln!("telemetry: flushing metrics at shutdown failed: {e}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown_providers();
    }
}

/// Logs only (nothing exported): for tests and one-shot commands. Safe to call more than once.
pub fn init_logs(json_logs: bool) {
    let _ = init(TelemetryConfig::logs_only("sharpsend", json_logs));
}

/// Installs the global log subscriber and, when `config.otlp` is set, the OpenTelemetry tracer
/// and meter providers (global, so every crate's instruments export), the OTel layer and the
/// W3C trace-context propagator. A second call finds a subscriber installed and leaves it.
///
/// With OTLP on it must run inside a Tokio runtime (the gRPC exporter lives on it); keep the
/// guard until the end of `main`.
pub fn init(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let log_filter = match &config.log_filter {
        Some(filter) => {
            EnvFilter::try_new(filter).map_err(|e| TelemetryError::Filter(e.to_string()))?
        }
        None => EnvFilter::new(DEFAULT_FILTER),
    };
    let fmt_layer = if config.json_logs {
        fmt::layer()
            .json()
            .with_current_span(false)
            .with_filter(log_filter)
            .boxed()
    } else {
        fmt::layer()
            .with_target(true)
            .with_filter(log_filter)
            .boxed()
    };

    let Some(otlp) = config.otlp else {
        // Err means a subscriber is already installed (tests, or dev mode's in-process parts).
        let _ = tracing_subscriber::registry().with(fmt_layer).try_init();
        return Ok(TelemetryGuard::default());
    };
    if tokio::runtime::Handle::try_current().is_err() {
        let _ = tracing_subscriber::registry().with(fmt_layer).try_init();
        return Err(TelemetryError::NoRuntime);
    }

    let resource = resource(&config.service_name);
    let mut guard = TelemetryGuard::default();
    let mut otel_layer = None;
    if otlp.traces {
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if let Some(endpoint) = &otlp.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let exporter = builder.build().map_err(|e| TelemetryError::Exporter {
            signal: "trace",
            message: e.to_string(),
        })?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.clone())
            .build();
        let tracer = provider.tracer("sharpsend");
        opentelemetry::global::set_tracer_provider(provider.clone());
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let filter = EnvFilter::try_new(&otlp.trace_filter)
            .map_err(|e| TelemetryError::Filter(e.to_string()))?;
        otel_layer = Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_filter(filter),
        );
        guard.tracer_provider = Some(provider);
    }
    if otlp.metrics {
        let mut builder = opentelemetry_otlp::MetricExporter::builder().with_tonic();
        if let Some(endpoint) = &otlp.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let exporter = builder.build().map_err(|e| TelemetryError::Exporter {
            signal: "metric",
            message: e.to_string(),
        })?;
        let mut reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter);
        if let Some(interval) = otlp.metric_interval {
            reader = reader.with_interval(interval);
        }
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.build())
            .with_resource(resource)
            .build();
        opentelemetry::global::set_meter_provider(provider.clone());
        guard.meter_provider = Some(provider);
    }
    if tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .is_err()
    {
        tracing::warn!(
            "a log subscriber was already installed: spans are not exported, metrics are"
        );
    }
    tracing::info!(service = %config.service_name, traces = otlp.traces, metrics = otlp.metrics, "exporting telemetry over OTLP/gRPC");
    Ok(guard)
}

/// The SDK's detected resource (`OTEL_RESOURCE_ATTRIBUTES`, `telemetry.sdk.*`) with our service
/// name (already resolved from `OTEL_SERVICE_NAME` / the attributes) and version.
fn resource(service_name: &str) -> Resource {
    Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        let config = TelemetryConfig::from_env(
            &env(&[("OTEL_SERVICE_NAME", "x")]),
            "sharpsend-server",
            false,
        );
        let config = config.map_err(|e| e.to_string());
        assert!(
            matches!(&config, Ok(c) if c.otlp.is_none() && c.service_name == "x"),
            "{config:?}"
        );
    }

    #[test]
    fn an_endpoint_turns_export_on_and_standard_switches_turn_it_off() {
        let on = TelemetryConfig::from_env(
            &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")]),
            "svc",
            true,
        );
        let otlp = on.as_ref().ok().and_then(|c| c.otlp.clone());
        assert!(
            otlp.as_ref()
                .is_some_and(|o| o.traces && o.metrics && o.endpoint.is_none()),
            "{on:?}"
        );
        assert_eq!(on.map(|c| c.service_name).ok().as_deref(), Some("svc"));

        let only_traces = TelemetryConfig::from_env(
            &env(&[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317"),
                ("OTEL_METRICS_EXPORTER", "none"),
            ]),
            "svc",
            false,
        );
        let otlp = only_traces.ok().and_then(|c| c.otlp);
        assert!(otlp.is_some_and(|o| o.traces && !o.metrics));

        for off in [
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_SDK_DISABLED", "true"),
            ]),
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_TRACES_EXPORTER", "none"),
                ("OTEL_METRICS_EXPORTER", "none"),
            ]),
        ] {
            let config = TelemetryConfig::from_env(&off, "svc", false);
            assert!(config.is_ok_and(|c| c.otlp.is_none()));
        }
    }

    #[test]
    fn bad_settings_name_their_variable_never_their_value() {
        let cases = [
            (
                env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url secret-token")]),
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                env(&[(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "https://user:secret-token@c:4317",
                )]),
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                env(&[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "ftp://secret-token")]),
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            ),
            (
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ]),
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    (TRACE_FILTER_VARIABLE, "info,[secret-token"),
                ]),
                TRACE_FILTER_VARIABLE,
            ),
        ];
        for (env, variable) in cases {
            let err = TelemetryConfig::from_env(&env, "svc", false).err();
            assert_eq!(err.as_ref().map(|e| e.variable), Some(variable), "{env:?}");
            assert!(err.is_some_and(|e| !e.to_string().contains("secret-token")));
        }
    }

    #[test]
    fn the_service_name_follows_the_standard_precedence() {
        let name = |pairs: &[(&str, &str)]| {
            TelemetryConfig::from_env(&env(pairs), "default-svc", false)
                .map(|c| c.service_name)
                .ok()
        };
        assert_eq!(name(&[]).as_deref(), Some("default-svc"));
        assert_eq!(
            name(&[(
                "OTEL_RESOURCE_ATTRIBUTES",
                "team=ops, service.name=from-attrs"
            )])
            .as_deref(),
            Some("from-attrs")
        );
        assert_eq!(
            name(&[
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"),
                ("OTEL_SERVICE_NAME", "from-var")
            ])
            .as_deref(),
            Some("from-var")
        );
    }

    #[test]
    fn the_guard_of_logs_only_exports_nothing() {
        let guard = TelemetryGuard::default();
        assert!(!guard.is_exporting());
        assert_eq!(guard.force_flush(), Ok(()));
    }
}
