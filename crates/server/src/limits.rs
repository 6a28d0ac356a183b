//! The serving stack's two limits, as tower layers around every service:
//!
//! - [`InFlightLayer`]: at most `SHARPSEND_MAX_IN_FLIGHT` calls are handled at once across all
//!   connections; a call beyond it is shed at once with `UNAVAILABLE` + `google.rpc.RetryInfo`
//!   (reason `OVERLOADED`). Health checks are never shed (an orchestrator must not see a busy
//!   server as a dead one). Calls of one connection are not limited here: HTTP/2's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS` makes a client queue its further calls, so a burst over
//!   one channel waits instead of being refused.
//! - [`DeadlineLayer`]: a call still running after the server's deadline
//!   (`SHARPSEND_REQUEST_TIMEOUT_SECS`), or the caller's `grpc-timeout` if shorter, is answered
//!   `DEADLINE_EXCEEDED` (tonic's own server timeout answers `CANCELLED`, which tells the caller
//!   it cancelled).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::status;

/// How long a shed caller is told to wait before retrying.
pub const SHED_RETRY_AFTER: Duration = Duration::from_secs(1);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Sheds calls beyond `limit` in flight (see the module doc).
#[derive(Debug, Clone)]
pub struct InFlightLayer {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl InFlightLayer {
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

impl<S> Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlight {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`InFlightLayer`].
#[derive(Debug, Clone)]
pub struct InFlight<S> {
    inner: S,
    layer: InFlightLayer,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for InFlight<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if request.uri().path().starts_with("/grpc.health.") {
            return Box::pin(self.inner.call(request));
        }
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            let limit = self.layer.limit;
            tracing::warn!(limit, "call shed: SHARPSEND_MAX_IN_FLIGHT calls in flight");
            return Box::pin(
                async move { Ok(status::overloaded(limit, SHED_RETRY_AFTER).into_http()) },
            );
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            drop(permit);
            response
        })
    }
}

/// Answers `DEADLINE_EXCEEDED` for calls past their deadline (see the module doc).
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    timeout: Duration,
}

impl DeadlineLayer {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Deadline<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.as_bytes()))
            .map_or(self.timeout, |caller| caller.min(self.timeout));
        let future = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(deadline, future).await {
                Ok(response) => response,
                Err(_) => Ok(status::deadline_exceeded(deadline).into_http()),
            }
        })
    }
}

/// A `grpc-timeout` value: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::sync::Notify;
    use tonic::Code;
    use tonic_types::StatusExt as _;

    use super::*;

    fn code_of(response: &http::Response<tonic::body::Body>) -> Option<Code> {
        tonic::Status::from_header_map(response.headers()).map(|s| s.code())
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        for bad in [&b""[..], b"m", b"123456789S", b"10x", b"-1S"] {
            assert_eq!(grpc_timeout(bad), None);
        }
    }

    #[tokio::test]
    async fn calls_beyond_the_limit_are_shed_with_retry_info_and_health_never() {
        let release = Arc::new(Notify::new());
        let gate = release.clone();
        let inner = tower::service_fn(move |_request: http::Request<()>| {
            let gate = gate.clone();
            async move {
                gate.notified().await;
                Ok::<_, Infallible>(http::Response::new(tonic::body::Body::default()))
            }
        });
        let mut service = InFlightLayer::new(2).layer(inner);
        let call = |service: &mut InFlight<_>, path: &str| {
            let request = http::Request::builder()
                .uri(path)
                .body(())
                .unwrap_or_default();
            service.call(request)
        };
        let first = tokio::spawn(call(
            &mut service,
            "/sharpsend.cio.v1.SegmentService/ListSegments",
        ));
        let second = tokio::spawn(call(
            &mut service,
            "/sharpsend.cio.v1.SegmentService/ListSegments",
        ));
        tokio::task::yield_now().await;
        let shed = call(
            &mut service,
            "/sharpsend.cio.v1.SegmentService/ListSegments",
        )
        .await
        .unwrap_or_default();
        let status = tonic::Status::from_header_map(shed.headers());
        assert_eq!(
            status.as_ref().map(tonic::Status::code),
            Some(Code::Unavailable)
        );
        assert_eq!(
            status
                .and_then(|s| s.get_error_details().retry_info().cloned())
                .and_then(|r| r.retry_delay),
            Some(SHED_RETRY_AFTER)
        );
        // Health checks pass even now.
        let health = tokio::spawn(call(&mut service, "/grpc.health.v1.Health/Check"));
        tokio::task::yield_now().await;
        release.notify_waiters();
        for handle in [first, second, health] {
            let response = handle.await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(response.ok().and_then(|r| code_of(&r)), None);
        }
        // Permits came back.
        let release_again = release.clone();
        let again = tokio::spawn(call(
            &mut service,
            "/sharpsend.cio.v1.SegmentService/ListSegments",
        ));
        tokio::task::yield_now().await;
        release_again.notify_waiters();
        let response = again.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.ok().and_then(|r| code_of(&r)), None);
    }

    /// A service that answers after a minute.
    fn slow_service() -> impl Service<
        http::Request<()>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<http::Response<tonic::body::Body>, Infallible>>
                 + Send
                 + 'static,
    > {
        tower::service_fn(|_request: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, Infallible>(http::Response::new(tonic::body::Body::default()))
        })
    }

    #[tokio::test]
    async fn a_call_past_the_deadline_is_deadline_exceeded() {
        let mut service = DeadlineLayer::new(Duration::from_millis(50)).layer(slow_service());
        let response = service
            .call(http::Request::new(()))
            .await
            .unwrap_or_default();
        assert_eq!(code_of(&response), Some(Code::DeadlineExceeded));

        // The caller's shorter deadline wins.
        let mut service = DeadlineLayer::new(Duration::from_secs(30)).layer(slow_service());
        let mut request = http::Request::new(());
        request
            .headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("20m"));
        let started = std::time::Instant::now();
        let response = service.call(request).await.unwrap_or_default();
        assert_eq!(code_of(&response), Some(Code::DeadlineExceeded));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
