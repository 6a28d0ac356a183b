//! The HTTP endpoint for Customer.io's reporting webhooks on `SHARPSEND_WEBHOOK_LISTEN` (a
//! listener of its own, plain HTTP/1.1, next to gRPC): `POST /webhooks/customerio` for the
//! default workspace (signed with `CIO_WEBHOOK_SIGNING_KEY`), `POST
//! /webhooks/customerio/{workspace id}` for a workspace stored by `AdminService/CreateWorkspace`
//! (signed with its own key; the default workspace's id works too).
//!
//! | outcome | answer |
//! |---|---|
//! | signed, understood (stored now or already) | `200 {"status":"stored"}` |
//! | signed, not understood (kept in the quarantine) | `200 {"status":"quarantined"}` |
//! | unsigned, forged or stale, or the workspace has no signing key (nothing stored) | `401` |
//! | no such workspace, or disabled | `404` |
//! | the database failed (Customer.io retries) | `503` |
//!
//! All the logic is in `sharpsend_core::engagement::webhooks`; this maps HTTP to it. The
//! reason of a 401 is logged, never the key.

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use cio_client::webhooks::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
use serde_json::json;
use sharpsend_core::{
    CoreError,
    engagement::webhooks::{Received, Refused, WebhookReceiver},
    tenants::Tenants,
};
use tokio::net::TcpListener;

/// The path Customer.io posts to.
pub const WEBHOOK_PATH: &str = "/webhooks/customerio";
/// Largest body accepted (a `sent` event with the body-content option can be large).
pub const MAX_BODY_BYTES: usize = 5 * 1024 * 1024;

/// Receivers: the default workspace's, and the stored workspaces' through [`Tenants`].
#[derive(Clone)]
struct Receivers {
    default: WebhookReceiver,
    tenants: Tenants,
}

/// The webhook routes: the default workspace's receiver `default`, the others from `tenants`.
pub fn router(default: WebhookReceiver, tenants: Tenants) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(receive_default))
        .route(
            &format!("{WEBHOOK_PATH}/{{workspace}}"),
            post(receive_workspace),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Receivers { default, tenants })
}

/// Serves the endpoints on `listener` until `shutdown` resolves, the default workspace's checked
/// with `signing_key`.
pub async fn serve(
    listener: TcpListener,
    tenants: impl Into<Tenants> + Send,
    signing_key: secrecy::SecretString,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tenants: Tenants = tenants.into();
    let default = WebhookReceiver::start(tenants.default_context().clone(), signing_key);
    axum::serve(listener, router(default, tenants))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` and [`serve`]s in a task; answers the bound address (port 0 picks a free one).
pub async fn spawn(
    tenants: impl Into<Tenants> + Send + 'static,
    addr: std::net::SocketAddr,
    signing_key: secrecy::SecretString,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((
        bound,
        tokio::spawn(serve(listener, tenants, signing_key, shutdown)),
    ))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn receive_default(
    State(receivers): State<Receivers>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    receive(&receivers.default, &headers, &body).await
}

async fn receive_workspace(
    State(receivers): State<Receivers>,
    Path(workspace): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such workspace"})),
        )
            .into_response()
    };
    let Some(workspace) = workspace.parse::<i64>().ok().filter(|id| *id > 0) else {
        return not_found();
    };
    if workspace == receivers.tenants.default_context().workspace_id() {
        return receive(&receivers.default, &headers, &body).await;
    }
    match receivers.tenants.webhook_receiver(workspace).await {
        Ok(Some(receiver)) => receive(&receiver, &headers, &body).await,
        Ok(None) => {
            tracing::warn!(
                workspace,
                "reporting webhook refused: the workspace has no signing key"
            );
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "unauthenticated", "reason": "the workspace has no webhook signing key"})),
            )
                .into_response()
        }
        Err(CoreError::NotFound { .. } | CoreError::FailedPrecondition(_)) => not_found(),
        Err(e) => {
            tracing::error!(workspace, error = %sharpsend_core::error::error_chain(&e), "reporting webhook: the workspace could not be loaded");
            unavailable()
        }
    }
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "unavailable: retry later"})),
    )
        .into_response()
}

async fn receive(receiver: &WebhookReceiver, headers: &HeaderMap, body: &[u8]) -> Response {
    match receiver
        .receive(
            header(headers, TIMESTAMP_HEADER),
            header(headers, SIGNATURE_HEADER),
            body,
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
        Err(Refused::Unavailable) => unavailable(),
    }
}
