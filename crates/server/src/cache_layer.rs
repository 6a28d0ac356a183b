//! [`InvalidateAfterWritesLayer`]: makes this server's own writes visible to the very next read
//! through the read cache (`sharpsend_core::cache`). When a call that may write has finished
//! (answered, failed or cancelled), every cached read is forgotten. Only the calls known to be
//! pure reads skip it, so a call added later is treated as a write until listed here.
//!
//! On SQLite the cache checks the database's change counters anyway; on PostgreSQL the
//! notification of the commit may reach the cache a moment after the answer, and this closes
//! that gap for the caller who wrote.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use sharpsend_core::cache::ReadCache;
use tower::{Layer, Service};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Calls that never write (GetProfile with `fresh` invalidates in core itself).
const READ_ONLY: &[&str] = &[
    "/sharpsend.cio.v1.SegmentService/GetSegment",
    "/sharpsend.cio.v1.SegmentService/ListSegments",
    "/sharpsend.cio.v1.ProfileService/GetProfile",
    "/sharpsend.cio.v1.CampaignService/GetSend",
    "/sharpsend.cio.v1.CampaignService/ListSends",
    "/sharpsend.cio.v1.AnalyticsService/WatchEngagement",
    "/sharpsend.cio.v1.AnalyticsService/ListQuarantinedWebhooks",
    "/sharpsend.cio.v1.AnalyticsService/GetAssignmentAnalytics",
    "/sharpsend.cio.v1.AnalyticsService/ListAssignmentPerformance",
    "/sharpsend.cio.v1.AnalyticsService/ExportReport",
    "/sharpsend.cio.v1.AnalyticsService/SuggestSegments",
];

fn is_read_only(path: &str) -> bool {
    path.starts_with("/grpc.health.")
        || path.starts_with("/grpc.reflection.")
        || READ_ONLY.contains(&path)
}

/// See the module doc.
#[derive(Clone)]
pub struct InvalidateAfterWritesLayer {
    cache: ReadCache,
}

impl InvalidateAfterWritesLayer {
    pub fn new(cache: ReadCache) -> Self {
        Self { cache }
    }
}

impl<S> Layer<S> for InvalidateAfterWritesLayer {
    type Service = InvalidateAfterWrites<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InvalidateAfterWrites {
            inner,
            cache: self.cache.clone(),
        }
    }
}

/// The service made by [`InvalidateAfterWritesLayer`].
#[derive(Clone)]
pub struct InvalidateAfterWrites<S> {
    inner: S,
    cache: ReadCache,
}

/// Forgets the cached reads when dropped: after the call's future ends, however it ends.
struct InvalidateOnDrop(ReadCache);

impl Drop for InvalidateOnDrop {
    fn drop(&mut self) {
        self.0.invalidate_all();
    }
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for InvalidateAfterWrites<S>
where
    S: Service<http::Request<ReqBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if is_read_only(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let guard = InvalidateOnDrop(self.cache.clone());
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            drop(guard);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_reads_skip_invalidation() {
        assert!(is_read_only("/sharpsend.cio.v1.SegmentService/GetSegment"));
        assert!(is_read_only("/grpc.health.v1.Health/Check"));
        assert!(!is_read_only(
            "/sharpsend.cio.v1.SegmentService/SyncSegments"
        ));
        assert!(!is_read_only(
            "/sharpsend.cio.v1.ProfileService/UpdateAttributes"
        ));
        assert!(!is_read_only("/sharpsend.cio.v1.SomeService/NewCall"));
    }
}
