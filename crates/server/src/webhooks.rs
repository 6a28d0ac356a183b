//! The HTTP endpoint for Customer.io's reporting webhooks: `POST /webhooks/customerio` on
//! `SHARPSEND_WEBHOOK_LISTEN` (a listener of its own, plain HTTP/1.1, next to gRPC).
//!
//! | outcome | answer |
//! |---|---|
//! | signed, understood (stored now or already) | `200 {"status":"stored"}` |
//! | signed, not understood (kept in the quarantine) | `200 {"status":"quarantined"}` |
//! | unsigned, forged or stale (nothing stored) | `401` |
//! | the database failed (Customer.io retries) | `503` |
//!
//! All the logic is in `sharpsend_core::engagement::webhooks`; this maps HTTP to it. The
//! reason of a 401 is logged, never the key.

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use cio_client::webhooks::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
use serde_json::json;
use sharpsend_core::engagement::webhooks::{Received, Refused, WebhookReceiver};
use tokio::net::TcpListener;

/// The path Customer.io posts to.
pub const WEBHOOK_PATH: &str = "/webhooks/customerio";
/// Largest body accepted (a `sent` event with the body-content option can be large).
pub const MAX_BODY_BYTES: usize = 5 * 1024 * 1024;

/// The webhook routes over `receiver`.
pub fn router(receiver: WebhookReceiver) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(receiver)
}

/// Serves the webhook endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    receiver: WebhookReceiver,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(receiver))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` and serves the endpoint for `ctx`'s workspace with `signing_key` in a task
/// until `shutdown` resolves; answers the bound address (port 0 picks a free one).
pub async fn spawn(
    ctx: sharpsend_core::AppContext,
    addr: std::net::SocketAddr,
    signing_key: secrecy::SecretString,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let receiver = WebhookReceiver::start(ctx, signing_key);
    Ok((bound, tokio::spawn(serve(listener, receiver, shutdown))))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn receive(
    State(receiver): State<WebhookReceiver>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match receiver
        .receive(
            header(&headers, TIMESTAMP_HEADER),
            header(&headers, SIGNATURE_HEADER),
            &body,
        )
        .await
    {
        Ok(Received::Stored) => (StatusCode::OK, Json(json!({"status": "stored"}))).into_response(),
        Ok(Received::Quarantined(reason)) => (
            StatusCode::OK,
            Json(json!({"status": "quarantined", "reason": reason})),
        )
            .into_response(),
        Err(Refused::Unauthenticated(why)) => {
            tracing::warn!(reason = %why, "reporting webhook refused");
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "unauthenticated", "reason": why.to_string()})),
            )
                .into_response()
        }
        Err(Refused::Unavailable) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "unavailable: retry later"})),
        )
            .into_response(),
    }
}
