//! [`CioClient`]: construction, auth, and the one generic request path every call goes through
//! (URL building, rate limiting, timeout, retries, status → [`CioError`] mapping, decoding).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use secrecy::ExposeSecret as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::Instrument as _;
use url::Url;

use crate::config::{Api, ClientConfig, Region, RetryConfig};
use crate::deadline::{NotSent, SendError};
use crate::endpoint::Endpoint;
use crate::error::{CioError, parse_error_details};
use crate::limiter::{RateLimiter, shared_limiter};
use crate::retry::{Decision, MAX_HONOURED_RETRY_AFTER, decide, parse_retry_after, throttle_wait};

/// `User-Agent` sent with every request.
pub const USER_AGENT: &str = concat!("sharpsend-cio/", env!("CARGO_PKG_VERSION"));

/// Installs rustls' `ring` crypto provider as the process default (reqwest is built without
/// one). Safe to call any number of times; [`CioClient::new`] calls it.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is exactly what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Typed Customer.io client for the Track and App APIs of one workspace.
///
/// Cheap to clone (one `Arc`); clones share the HTTP connection pool. Rate limiters are shared
/// even more widely: by every client in the process built for the same workspace and base URL.
#[derive(Clone)]
pub struct CioClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// For signed download links on other hosts: no Customer.io credentials, no JSON headers,
    /// no whole-request timeout (reads are timed one by one).
    files: reqwest::Client,
    site_id: String,
    region: Region,
    retry: RetryConfig,
    timeout: Duration,
    metrics_tz: String,
    track: Target,
    app: Target,
}

/// Base URL, auth header and limiter of one API.
struct Target {
    base: Url,
    /// Marked sensitive: hyper and reqwest never print it.
    auth: HeaderValue,
    limiter: Arc<RateLimiter>,
}

/// A URL for display with any user:password removed.
fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_password(None);
    let _ = shown.set_username("");
    shown.to_string()
}

impl fmt::Debug for CioClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("CioClient")
            .field("site_id", &i.site_id)
            .field("region", &i.region)
            .field("track_base_url", &redacted(&i.track.base))
            .field("app_base_url", &redacted(&i.app.base))
            .field("timeout", &i.timeout)
            .field("metrics_tz", &i.metrics_tz)
            .field("retry", &i.retry)
            .field("track_requests_per_sec", &i.track.limiter.per_sec())
            .field("app_requests_per_sec", &i.app.limiter.per_sec())
            .finish_non_exhaustive()
    }
}

fn config_error(message: impl Into<String>) -> CioError {
    CioError::Config {
        message: message.into(),
    }
}

fn check_base_url(api: Api, url: &Url) -> Result<(), CioError> {
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() || url.host().is_none() {
        return Err(config_error(format!(
            "{api} base URL must be an absolute http(s) URL, got {}",
            redacted(url)
        )));
    }
    Ok(())
}

/// An IANA time zone name Customer.io's metrics accept (region format, e.g. `Europe/Paris`).
pub(crate) fn check_time_zone(tz: &str) -> Result<(), CioError> {
    tz.parse::<chrono_tz::Tz>().map(|_| ()).map_err(|_| {
        config_error(format!(
            "metrics time zone {tz:?} is not an IANA time zone (e.g. America/New_York)"
        ))
    })
}

fn sensitive_header(value: String, what: &str) -> Result<HeaderValue, CioError> {
    let mut header = HeaderValue::try_from(value)
        // Never echo the value: it holds a key.
        .map_err(|_| {
            config_error(format!(
                "{what} contains characters not allowed in a header"
            ))
        })?;
    header.set_sensitive(true);
    Ok(header)
}

impl CioClient {
    /// Builds a client. Installs the rustls crypto provider, validates the configuration and
    /// joins (or creates) the process-wide rate limiters of this workspace.
    pub fn new(config: ClientConfig) -> Result<Self, CioError> {
        install_crypto_provider();

        if config.timeout.is_zero() {
            return Err(config_error("timeout must be greater than zero"));
        }
        if config.app_requests_per_sec == 0 {
            return Err(config_error("app_requests_per_sec must be at least 1"));
        }
        if config.track_requests_per_sec == 0 {
            return Err(config_error("track_requests_per_sec must be at least 1"));
        }

        check_time_zone(&config.metrics_tz)?;

        let creds = &config.credentials;
        let basic = BASE64.encode(format!(
            "{}:{}",
            creds.site_id,
            creds.track_api_key.expose_secret()
        ));
        let track_auth = sensitive_header(format!("Basic {basic}"), "site_id or track_api_key")?;
        let app_auth = sensitive_header(
            format!("Bearer {}", creds.app_api_key.expose_secret()),
            "app_api_key",
        )?;

        let track_base = config.base_url(Api::Track)?;
        let app_base = config.base_url(Api::App)?;
        check_base_url(Api::Track, &track_base)?;
        check_base_url(Api::App, &app_base)?;

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .default_headers(headers)
            .timeout(config.timeout)
            // A connect failure proves the request never left; keep it distinguishable from a
            // whole-request timeout.
            .connect_timeout((config.timeout / 2).min(Duration::from_secs(5)))
            // A wrong region answers with a redirect: surface it instead of following it.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| config_error(format!("building the HTTP client: {e}")))?;
        let files = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout((config.timeout / 2).min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| config_error(format!("building the download HTTP client: {e}")))?;

        let track = Target {
            limiter: shared_limiter(
                Api::Track,
                &creds.site_id,
                &track_base,
                config.track_requests_per_sec,
            ),
            base: track_base,
            auth: track_auth,
        };
        let app = Target {
            limiter: shared_limiter(
                Api::App,
                &creds.site_id,
                &app_base,
                config.app_requests_per_sec,
            ),
            base: app_base,
            auth: app_auth,
        };

        Ok(Self {
            inner: Arc::new(Inner {
                http,
                files,
                site_id: creds.site_id.clone(),
                region: config.region,
                retry: config.retry,
                timeout: config.timeout,
                metrics_tz: config.metrics_tz,
                track,
                app,
            }),
        })
    }

    /// The workspace's site id.
    pub fn site_id(&self) -> &str {
        &self.inner.site_id
    }

    /// The configured region.
    pub fn region(&self) -> Region {
        self.inner.region
    }

    /// The whole-request timeout ([`ClientConfig::timeout`]).
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The time zone metrics series are bucketed in ([`ClientConfig::metrics_tz`]).
    pub fn metrics_tz(&self) -> &str {
        &self.inner.metrics_tz
    }

    /// The HTTP client for signed download links (never carries credentials).
    pub(crate) fn files_http(&self) -> &reqwest::Client {
        &self.inner.files
    }

    /// The base URL used for `api`.
    pub fn base_url(&self, api: Api) -> &Url {
        &self.target(api).base
    }

    fn target(&self, api: Api) -> &Target {
        match api {
            Api::Track => &self.inner.track,
            Api::App => &self.inner.app,
        }
    }

    fn url(
        &self,
        endpoint: &Endpoint,
        path_params: &[&str],
        query: &[(&str, String)],
    ) -> Result<Url, CioError> {
        let path = endpoint.path(path_params)?;
        let base = self
            .target(endpoint.api)
            .base
            .as_str()
            .trim_end_matches('/');
        let mut url = Url::parse(&format!("{base}{path}"))
            .map_err(|e| config_error(format!("URL for {}: {e}", endpoint.template)))?;
        // Defence in depth: URL parsing resolves dot segments (WHATWG rules treat `%2E` and
        // `%2E%2E` as `.` and `..` too), so an id like `..` would silently address another
        // resource. Refuse anything whose path is not the template filled in as encoded.
        let base_path = self.target(endpoint.api).base.path().trim_end_matches('/');
        if url.path().strip_prefix(base_path) != Some(path.as_str()) {
            return Err(config_error(format!(
                "{}: a path parameter cannot be addressed in a URL (`.` and `..` are dot \
                 segments that URLs collapse); nothing was sent. Ids like these can only travel \
                 in a request body (Track v2 entity/batch, POST /v1/customers/attributes)",
                endpoint.template
            )));
        }
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        Ok(url)
    }

    /// The one request path. Fills `endpoint`'s template with percent-encoded `path_params`,
    /// adds `query`, sends `body` as JSON, paces through the API's shared limiter, retries per
    /// the endpoint's [`RetryPolicy`](crate::RetryPolicy), maps failures to [`CioError`] and
    /// decodes a 2xx body into `T` (an empty body decodes as JSON `null`, so `()` and
    /// `serde::de::IgnoredAny` work for 204s).
    pub(crate) async fn request<T, B>(
        &self,
        endpoint: &Endpoint,
        path_params: &[&str],
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<T, CioError>
    where
        T: DeserializeOwned,
        B: Serialize + ?Sized,
    {
        self.request_by(endpoint, path_params, query, body, None)
            .await
            .map_err(CioError::from)
    }

    /// [`request`](Self::request) fenced by an absolute `deadline` (see [`crate::deadline`]):
    /// [`SendError::NotSent`] when it cannot start by `deadline - timeout`.
    pub(crate) async fn request_by<T, B>(
        &self,
        endpoint: &Endpoint,
        path_params: &[&str],
        query: &[(&str, String)],
        body: Option<&B>,
        deadline: Option<Instant>,
    ) -> Result<T, SendError>
    where
        T: DeserializeOwned,
        B: Serialize + ?Sized,
    {
        let body = body.map(serde_json::to_vec).transpose().map_err(|e| {
            config_error(format!(
                "serialising the body for {}: {e}",
                endpoint.template
            ))
        })?;
        let answer = self
            .request_bytes_by(endpoint, path_params, query, body, deadline)
            .await?;
        Ok(decode(endpoint, &answer.body)?)
    }

    /// [`request`](Self::request) for a body that is already JSON bytes, answering the 2xx
    /// status and raw body (for endpoints whose 2xx statuses mean different things, like the
    /// v2 batch's 207).
    pub(crate) async fn request_bytes(
        &self,
        endpoint: &Endpoint,
        path_params: &[&str],
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Answer, CioError> {
        self.request_bytes_by(endpoint, path_params, query, body, None)
            .await
            .map_err(CioError::from)
    }

    async fn request_bytes_by(
        &self,
        endpoint: &Endpoint,
        path_params: &[&str],
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        deadline: Option<Instant>,
    ) -> Result<Answer, SendError> {
        let url = self.url(endpoint, path_params, query)?;
        // The endpoint TEMPLATE only: the filled-in path holds ids and emails.
        let span = tracing::info_span!(
            "cio_request",
            otel.name = %format_args!("{} {}", endpoint.method, endpoint.template),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            api = endpoint.api.as_str(),
            method = %endpoint.method,
            endpoint = endpoint.template,
            status = tracing::field::Empty,
            attempts = tracing::field::Empty,
            rate_limit_wait_ms = tracing::field::Empty,
            throttled_ms = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let result = self
            .execute(endpoint, url, body, deadline)
            .instrument(span.clone())
            .await;
        if let Err(error) = &result {
            span.record("otel.status_code", "error");
            let kind = match error {
                SendError::NotSent(_) => "not_sent",
                SendError::Failed(error) => metrics::error_kind(error),
            };
            span.record("error", kind);
        }
        result
    }

    async fn execute(
        &self,
        endpoint: &Endpoint,
        url: Url,
        body: Option<Vec<u8>>,
        deadline: Option<Instant>,
    ) -> Result<Answer, SendError> {
        let api = endpoint.api;
        let target = self.target(api);
        let scope = endpoint.throttle_scope();
        // A request that starts by then is answered or timed out by the deadline.
        let latest_start = deadline.map(|d| d.checked_sub(self.inner.timeout));
        let span = tracing::Span::current();
        let mut limiter_wait = Duration::ZERO;
        let mut attempt: u32 = 0;
        let mut sends: u32 = 0;
        let mut throttled = Duration::ZERO;
        loop {
            // Held until the answer is in: the request counts in the limiter's window from
            // its start until a second after its answer.
            let slot = match latest_start {
                None => target.limiter.acquire_slot(scope).await,
                Some(latest) => {
                    let refused = |earliest: Option<Instant>| NotSent {
                        api,
                        endpoint: endpoint.template,
                        earliest_start_in: earliest.map(|at| at - Instant::now()),
                    };
                    let Some(latest) = latest else {
                        return Err(refused(None).into());
                    };
                    match target.limiter.acquire_by(scope, Some(latest)).await {
                        Ok(slot) => slot,
                        Err(too_late) => {
                            tracing::debug!(
                                earliest_in_ms = too_late
                                    .earliest
                                    .map(|at| (at - Instant::now()).as_millis() as u64),
                                "not sent: no turn in the rate limiter before the deadline"
                            );
                            return Err(refused(too_late.earliest).into());
                        }
                    }
                }
            };
            let waited = slot.waited();
            metrics::limiter_wait(api, waited);
            limiter_wait += waited;
            sends += 1;
            span.record("attempts", sends);
            span.record("rate_limit_wait_ms", limiter_wait.as_millis() as u64);

            let sent_at = std::time::Instant::now();
            let sent = self
                .send_once(endpoint, target, &url, body.as_deref())
                .await;
            drop(slot);
            metrics::request(endpoint, &sent, sent_at.elapsed());
            let (error, server_hint) = match sent {
                Ok((status, retry_after, bytes)) => {
                    span.record("status", status);
                    tracing::debug!(
                        attempt,
                        status,
                        limiter_wait_ms = waited.as_millis() as u64,
                        "Customer.io answered"
                    );
                    if (200..300).contains(&status) {
                        return Ok(Answer {
                            status,
                            body: bytes,
                        });
                    }
                    if status == 429
                        && let Some(pause) = retry_after
                    {
                        // Hold back every caller of what was throttled, in this workspace:
                        // the endpoint's own limit (triggers) or the whole API (bounded, so a
                        // bogus header cannot stall the process).
                        let pause = pause.min(MAX_HONOURED_RETRY_AFTER);
                        match scope {
                            Some(scope) => target.limiter.pause_scope_for(scope, pause),
                            None => target.limiter.pause_for(pause),
                        }
                    }
                    (
                        status_error(endpoint, status, retry_after, &bytes),
                        retry_after,
                    )
                }
                Err(error) => {
                    tracing::debug!(attempt, error = %error, "Customer.io request failed");
                    (error, None)
                }
            };

            if let Some(wait) = throttle_wait(
                &self.inner.retry,
                endpoint.retry,
                &error,
                server_hint,
                throttled,
            ) {
                tracing::debug!(
                    wait_ms = wait.as_millis() as u64,
                    "rate limited; waiting as told"
                );
                throttled += wait;
                span.record("throttled_ms", throttled.as_millis() as u64);
                metrics::retry(endpoint, &error);
                tokio::time::sleep(wait).await;
                continue;
            }
            match decide(
                &self.inner.retry,
                endpoint.retry,
                &error,
                server_hint,
                attempt,
            ) {
                Decision::GiveUp => return Err(error.into()),
                Decision::RetryAfter(delay) => {
                    tracing::debug!(
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        error = %error,
                        "retrying Customer.io request"
                    );
                    metrics::retry(endpoint, &error);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One HTTP exchange: status, `Retry-After`, and the whole body.
    async fn send_once(
        &self,
        endpoint: &Endpoint,
        target: &Target,
        url: &Url,
        body: Option<&[u8]>,
    ) -> Result<(u16, Option<Duration>, Vec<u8>), CioError> {
        let mut request = self
            .inner
            .http
            .request(endpoint.method.clone(), url.clone())
            .header(AUTHORIZATION, target.auth.clone());
        if let Some(body) = body {
            request = request.body(body.to_vec());
        }
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(endpoint, e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport_error(endpoint, e))?;
        Ok((status, retry_after, bytes.to_vec()))
    }
}

/// A 2xx answer: its status and whole body.
pub(crate) struct Answer {
    /// HTTP status, 200..=299.
    pub(crate) status: u16,
    /// The body as received.
    pub(crate) body: Vec<u8>,
}

/// Decodes a 2xx body into `T`; an empty body decodes as JSON `null`.
pub(crate) fn decode<T: DeserializeOwned>(
    endpoint: &Endpoint,
    bytes: &[u8],
) -> Result<T, CioError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| CioError::Decode {
        api: endpoint.api,
        endpoint: endpoint.template,
        message: e.to_string(),
    })
}

/// Maps a non-2xx answer to its error.
pub(crate) fn status_error(
    endpoint: &Endpoint,
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> CioError {
    let api = endpoint.api;
    match status {
        401 | 403 => CioError::Unauthorized { api, status },
        404 => CioError::NotFound {
            api,
            endpoint: endpoint.template,
        },
        429 => CioError::RateLimited { api, retry_after },
        500..=599 => CioError::Server { api, status },
        300..=399 => CioError::Rejected {
            api,
            status,
            details: vec![crate::ErrorDetail {
                message: "unexpected redirect (wrong region or base URL?)".to_owned(),
                ..crate::ErrorDetail::default()
            }],
        },
        _ => CioError::Rejected {
            api,
            status,
            details: parse_error_details(body),
        },
    }
}

/// Maps a reqwest failure, keeping the URL (which can hold ids and emails) out of the message.
fn transport_error(endpoint: &Endpoint, error: reqwest::Error) -> CioError {
    let api = endpoint.api;
    let connect = error.is_connect();
    if error.is_timeout() && !connect {
        return CioError::Timeout {
            api,
            endpoint: endpoint.template,
        };
    }
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    CioError::Transport {
        api,
        endpoint: endpoint.template,
        message,
        maybe_sent: !connect,
    }
}

/// The client's OpenTelemetry instruments, from the global meter provider on first use (no-ops
/// when none is installed). Attributes are the API, method, endpoint TEMPLATE and status: never
/// a filled-in path, id or email.
///
/// | instrument | kind | attributes |
/// |---|---|---|
/// | `cio.client.requests` | counter, one per HTTP request sent | `api`, `method`, `endpoint`, `status` (`200`, `429`, …, `timeout`, `transport`) |
/// | `cio.client.request.duration` | histogram, s | same |
/// | `cio.client.rate_limited` | counter (429 answers) | `api`, `endpoint` |
/// | `cio.client.retries` | counter (requests sent again) | `api`, `endpoint`, `reason` |
/// | `cio.client.rate_limit.wait` | histogram, s (time spent in the shared limiter) | `api` |
mod metrics {
    use std::sync::LazyLock;
    use std::time::Duration;

    use opentelemetry::KeyValue;
    use opentelemetry::metrics::{Counter, Histogram};

    use crate::config::Api;
    use crate::endpoint::Endpoint;
    use crate::error::CioError;

    const SECONDS: &[f64] = &[
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];

    struct Instruments {
        requests: Counter<u64>,
        duration: Histogram<f64>,
        rate_limited: Counter<u64>,
        retries: Counter<u64>,
        limiter_wait: Histogram<f64>,
    }

    static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(|| {
        let meter = opentelemetry::global::meter("cio-client");
        Instruments {
            requests: meter
                .u64_counter("cio.client.requests")
                .with_description("HTTP requests sent to Customer.io")
                .build(),
            duration: meter
                .f64_histogram("cio.client.request.duration")
                .with_description("Duration of HTTP requests to Customer.io")
                .with_unit("s")
                .with_boundaries(SECONDS.to_vec())
                .build(),
            rate_limited: meter
                .u64_counter("cio.client.rate_limited")
                .with_description("429 answers from Customer.io")
                .build(),
            retries: meter
                .u64_counter("cio.client.retries")
                .with_description("Customer.io requests sent again after a failure or a 429")
                .build(),
            limiter_wait: meter
                .f64_histogram("cio.client.rate_limit.wait")
                .with_description("Time a request waited in the shared per-workspace rate limiter")
                .with_unit("s")
                .with_boundaries(SECONDS.to_vec())
                .build(),
        }
    });

    /// A short, bounded label for a failure (never its message).
    pub(super) fn error_kind(error: &CioError) -> &'static str {
        match error {
            CioError::Unauthorized { .. } => "unauthorized",
            CioError::NotFound { .. } => "not_found",
            CioError::RateLimited { .. } => "rate_limited",
            CioError::Rejected { .. } => "rejected",
            CioError::Server { .. } => "server_error",
            CioError::Timeout { .. } => "timeout",
            CioError::Transport { .. } => "transport",
            CioError::Decode { .. } => "decode",
            _ => "other",
        }
    }

    /// One HTTP exchange (or its failure to complete).
    pub(super) fn request(
        endpoint: &Endpoint,
        sent: &Result<(u16, Option<Duration>, Vec<u8>), CioError>,
        took: Duration,
    ) {
        let status = match sent {
            Ok((status, ..)) => status.to_string(),
            Err(error) => error_kind(error).to_string(),
        };
        let attributes = [
            KeyValue::new("api", endpoint.api.as_str()),
            KeyValue::new("method", endpoint.method.as_str().to_string()),
            KeyValue::new("endpoint", endpoint.template),
            KeyValue::new("status", status),
        ];
        let i = &*INSTRUMENTS;
        i.requests.add(1, &attributes);
        i.duration.record(took.as_secs_f64(), &attributes);
        if matches!(sent, Ok((429, ..))) {
            i.rate_limited.add(
                1,
                &[
                    KeyValue::new("api", endpoint.api.as_str()),
                    KeyValue::new("endpoint", endpoint.template),
                ],
            );
        }
    }

    /// A request about to be sent again because of `error`.
    pub(super) fn retry(endpoint: &Endpoint, error: &CioError) {
        INSTRUMENTS.retries.add(
            1,
            &[
                KeyValue::new("api", endpoint.api.as_str()),
                KeyValue::new("endpoint", endpoint.template),
                KeyValue::new("reason", error_kind(error)),
            ],
        );
    }

    /// Time spent waiting for the shared limiter before one send.
    pub(super) fn limiter_wait(api: Api, waited: Duration) {
        INSTRUMENTS
            .limiter_wait
            .record(waited.as_secs_f64(), &[KeyValue::new("api", api.as_str())]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Credentials;
    use crate::endpoint::endpoints;

    const TRACK_KEY: &str = "track-KEY-do-not-print-1234";
    const APP_KEY: &str = "app-KEY-do-not-print-5678";

    fn config() -> ClientConfig {
        ClientConfig::new(Credentials::new("site-abc", TRACK_KEY, APP_KEY), Region::Us)
    }

    #[test]
    fn secrets_never_appear_in_debug_or_display() {
        let cfg = config();
        let client = CioClient::new(cfg.clone()).unwrap();
        let basic = BASE64.encode(format!("site-abc:{TRACK_KEY}"));
        let errors = [
            CioError::Unauthorized {
                api: Api::App,
                status: 401,
            },
            CioError::Rejected {
                api: Api::Track,
                status: 400,
                details: parse_error_details(br#"{"meta":{"errors":["bad"]}}"#),
            },
            CioError::Config {
                message: "x".into(),
            },
            sensitive_header("bad\nvalue".into(), "app_api_key").unwrap_err(),
        ];
        let mut printed = vec![
            format!("{client:?}"),
            format!("{client:#?}"),
            format!("{cfg:?}"),
            format!("{cfg:#?}"),
            format!("{:?}", cfg.credentials),
            format!("{:?}", client.inner.app.auth),
            format!("{:?}", client.inner.track.auth),
        ];
        for e in &errors {
            printed.push(format!("{e}"));
            printed.push(format!("{e:?}"));
        }
        for text in &printed {
            for secret in [TRACK_KEY, APP_KEY, basic.as_str(), "Bearer", "Basic "] {
                assert!(!text.contains(secret), "{secret:?} leaked in {text}");
            }
        }
        assert!(printed[0].contains("site-abc"));
    }

    #[test]
    fn a_key_with_a_newline_is_a_config_error_that_does_not_echo_it() {
        let mut cfg = config();
        cfg.credentials.app_api_key = "secret\nkey".into();
        let err = CioClient::new(cfg).unwrap_err();
        assert!(matches!(err, CioError::Config { .. }));
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn rejects_bad_settings() {
        let mut cfg = config();
        cfg.app_requests_per_sec = 0;
        assert!(CioClient::new(cfg).is_err());
        let mut cfg = config();
        cfg.timeout = Duration::ZERO;
        assert!(CioClient::new(cfg).is_err());
        let mut cfg = config();
        cfg.app_base_url = Some(Url::parse("mailto:x@y").unwrap());
        assert!(CioClient::new(cfg).is_err());
        for bad in ["", "EST5EDT/x", "Nowhere/Land", "America/New York"] {
            let mut cfg = config();
            cfg.metrics_tz = bad.into();
            let err = CioClient::new(cfg).unwrap_err();
            assert!(err.to_string().contains("time zone"), "{err}");
        }
        let mut cfg = config();
        cfg.metrics_tz = "Asia/Tokyo".into();
        assert_eq!(CioClient::new(cfg).unwrap().metrics_tz(), "Asia/Tokyo");
    }

    #[test]
    fn builds_urls_with_encoded_segments_and_query() {
        let cfg = config().with_base_url(Url::parse("http://127.0.0.1:9/prefix/").unwrap());
        let client = CioClient::new(cfg).unwrap();
        let url = client
            .url(
                &endpoints::SEGMENT_MEMBERSHIP,
                &["1/ x@y"],
                &[("start", "a b&c".into()), ("limit", "10".into())],
            )
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/prefix/v1/segments/1%2F%20x%40y/membership?start=a+b%26c&limit=10"
        );
        let default = CioClient::new(config()).unwrap();
        assert_eq!(
            default
                .url(&endpoints::ACCOUNT_REGION, &[], &[])
                .unwrap()
                .as_str(),
            "https://track.customer.io/api/v1/accounts/region"
        );
        assert_eq!(
            default
                .url(&endpoints::LIST_SEGMENTS, &[], &[])
                .unwrap()
                .as_str(),
            "https://api.customer.io/v1/segments"
        );
    }

    #[test]
    fn refuses_urls_whose_path_left_the_template() {
        let cfg = config().with_base_url(Url::parse("http://127.0.0.1:9/prefix/").unwrap());
        let client = CioClient::new(cfg).unwrap();
        for id in [".", ".."] {
            let err = client
                .url(&endpoints::CUSTOMER_ATTRIBUTES, &[id], &[])
                .unwrap_err();
            assert!(matches!(err, CioError::Config { .. }), "{err:?}");
            assert!(err.to_string().contains("{customer_id}"), "{err}");
        }
        for (id, path) in [
            ("../x", "/prefix/api/v1/customers/..%2Fx"),
            ("a/b c", "/prefix/api/v1/customers/a%2Fb%20c"),
            ("...", "/prefix/api/v1/customers/..."),
            (".x.", "/prefix/api/v1/customers/.x."),
        ] {
            let url = client.url(&endpoints::IDENTIFY, &[id], &[]).unwrap();
            assert_eq!(url.path(), path);
        }
    }

    #[test]
    fn auth_headers() {
        let client = CioClient::new(config()).unwrap();
        let basic = BASE64.encode(format!("site-abc:{TRACK_KEY}"));
        assert_eq!(
            client.inner.track.auth.to_str().unwrap(),
            format!("Basic {basic}")
        );
        assert_eq!(
            client.inner.app.auth.to_str().unwrap(),
            format!("Bearer {APP_KEY}")
        );
        assert!(client.inner.app.auth.is_sensitive());
        assert!(USER_AGENT.starts_with("sharpsend-cio/"));
    }

    #[test]
    fn two_clients_of_one_workspace_share_limiters() {
        let a = CioClient::new(config()).unwrap();
        let b = CioClient::new(config()).unwrap();
        assert!(Arc::ptr_eq(&a.inner.app.limiter, &b.inner.app.limiter));
        assert!(Arc::ptr_eq(&a.inner.track.limiter, &b.inner.track.limiter));
        assert!(!Arc::ptr_eq(&a.inner.app.limiter, &a.inner.track.limiter));
        let mut other = config();
        other.credentials.site_id = "another-site".into();
        let c = CioClient::new(other).unwrap();
        assert!(!Arc::ptr_eq(&a.inner.app.limiter, &c.inner.app.limiter));
    }

    #[test]
    fn status_mapping() {
        let ep = &endpoints::GET_SEGMENT;
        assert!(matches!(
            status_error(ep, 401, None, b""),
            CioError::Unauthorized { status: 401, .. }
        ));
        assert!(matches!(
            status_error(ep, 403, None, b""),
            CioError::Unauthorized { status: 403, .. }
        ));
        assert!(matches!(
            status_error(ep, 404, None, b""),
            CioError::NotFound {
                endpoint: "/v1/segments/{segment_id}",
                ..
            }
        ));
        assert_eq!(
            status_error(ep, 429, Some(Duration::from_secs(1)), b"").retry_after(),
            Some(Duration::from_secs(1))
        );
        assert!(matches!(
            status_error(ep, 503, None, b""),
            CioError::Server { status: 503, .. }
        ));
        let e = status_error(ep, 422, None, br#"{"errors":[{"detail":"nope"}]}"#);
        assert_eq!(e.details()[0].message, "nope");
        assert!(matches!(
            status_error(ep, 302, None, b""),
            CioError::Rejected { status: 302, .. }
        ));
    }

    #[test]
    fn decodes_empty_bodies_as_null() {
        let ep = &endpoints::DELETE_SEGMENT;
        let _: () = decode(ep, b"").unwrap();
        let _: serde::de::IgnoredAny = decode(ep, b"{}").unwrap();
        let err = decode::<u64>(ep, b"{\"x\":1}").unwrap_err();
        assert!(matches!(
            err,
            CioError::Decode {
                endpoint: "/v1/segments/{segment_id}",
                ..
            }
        ));
    }
}
