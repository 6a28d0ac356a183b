//! Assembles the gRPC server: health and reflection (v1 and v1alpha) open to all, business
//! services behind the access layer ([`crate::auth`]: API keys, the role each RPC needs from
//! [`crate::access`], the audit record), TLS / mTLS when configured ([`crate::tls`]), a span and metrics per call (`telemetry`: the
//! caller's `traceparent` is honoured), the serving limits ([`crate::limits`]: a global in-flight
//! limit that sheds with `UNAVAILABLE` + `RetryInfo`, and a deadline answered
//! `DEADLINE_EXCEEDED`), and graceful shutdown that reports NOT_SERVING before draining.
//!
//! One connection is never limited by shedding: internal services multiplex their calls on one
//! channel, and HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS` (`SHARPSEND_MAX_CONCURRENT_STREAMS`)
//! makes the client queue calls beyond it. Accepted connections get `TCP_NODELAY` (an answer
//! written in several pieces must not wait ~40 ms for the client's delayed ACK) and TCP
//! keepalive (tonic's builder settings for these do not apply to `serve_with_incoming`).

use sharpsend_core::tenants::Tenants;
use sharpsend_proto::v1::{
    ab_test_service_server::AbTestServiceServer, admin_service_server::AdminServiceServer,
    analytics_service_server::AnalyticsServiceServer,
    campaign_service_server::CampaignServiceServer, ops_service_server::OpsServiceServer,
    profile_service_server::ProfileServiceServer, segment_service_server::SegmentServiceServer,
};
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::ServingStatus;

use crate::{
    abtests::AbTests,
    admin::Admin,
    analytics::Analytics,
    auth::{AccessLayer, KeyStore},
    cache_layer::InvalidateAfterWritesLayer,
    campaigns::Campaigns,
    limits::{DeadlineLayer, InFlightLayer},
    ops::Ops,
    profiles::Profiles,
    segments::Segments,
};

/// Idle time before TCP keepalive probes on accepted connections (a peer that vanished without a
/// FIN is noticed instead of holding its calls forever).
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Request metadata (HTTP/2 header list) a call may carry; a larger one is refused by HTTP/2
/// itself (the caller sees `RESOURCE_EXHAUSTED`, as gRPC specifies for oversized metadata), and
/// the connection goes on serving.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport failed")]
    Transport(#[from] tonic::transport::Error),
    #[error("TLS set-up failed")]
    Tls(#[from] crate::tls::TlsError),
}

/// Serves every service on `listener` until `shutdown` resolves, then flips health to
/// NOT_SERVING and drains in-flight calls. Keys, deadline and limits come from the settings;
/// each call is served by its workspace's context ([`crate::tenancy`]).
pub async fn serve(
    listener: TcpListener,
    tenants: impl Into<Tenants>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tenants: Tenants = tenants.into();
    let ctx = tenants.default_context().clone();
    let options = ctx.settings.server.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SegmentServiceServer<Segments>>().await;
    health.set_serving::<ProfileServiceServer<Profiles>>().await;
    health.set_serving::<OpsServiceServer<Ops>>().await;
    health.set_serving::<AbTestServiceServer<AbTests>>().await;
    health.set_serving::<AdminServiceServer<Admin>>().await;
    health
        .set_serving::<AnalyticsServiceServer<Analytics>>()
        .await;
    health
        .set_serving::<CampaignServiceServer<Campaigns>>()
        .await;
    health.set_service_status("", ServingStatus::Serving).await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sharpsend_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details (BadRequest, PreconditionFailure, RetryInfo), so grpcurl
            // can show them.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // Cached reads while serving (`sharpsend_core::cache`); on PostgreSQL a task listens for
    // committed changes until serving ends.
    let cache = ctx.read_cache.clone();
    let cache_listener = cache.start(&ctx.db);
    let invalidate_after_writes = InvalidateAfterWritesLayer::new(cache.clone());

    // TLS is set up (and its files read) before anything is served: a bad file stops start-up.
    let tls = options
        .tls
        .as_ref()
        .map(crate::tls::ServerTls::new)
        .transpose()?;
    if tls.is_none() {
        tracing::info!("serving gRPC in plaintext (SHARPSEND_TLS_CERT / SHARPSEND_TLS_KEY unset)");
    }

    let keys = KeyStore::new(&ctx);
    let access = AccessLayer::new(&ctx, keys.clone(), &[sharpsend_proto::FILE_DESCRIPTOR_SET]);
    let segments = SegmentServiceServer::new(Segments::new(tenants.clone()));
    let ops = OpsServiceServer::new(Ops::new(tenants.clone()));
    let campaigns = CampaignServiceServer::new(Campaigns::new(tenants.clone()));
    let abtests = AbTestServiceServer::new(AbTests::new(tenants.clone()));
    let admin = AdminServiceServer::new(Admin::new(ctx.clone(), keys));
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let analytics = AnalyticsServiceServer::new(Analytics::new(tenants.clone(), stopping));
    let profiles = ProfileServiceServer::new(Profiles::new(tenants));

    let signal = async move {
        shutdown.await;
        tracing::info!("shutdown requested: reporting NOT_SERVING and draining in-flight calls");
        // Endless streams (WatchEngagement) end now; their callers resume elsewhere.
        let _ = stopping_tx.send(true);
        health
            .set_not_serving::<SegmentServiceServer<Segments>>()
            .await;
        health
            .set_not_serving::<ProfileServiceServer<Profiles>>()
            .await;
        health.set_not_serving::<OpsServiceServer<Ops>>().await;
        health
            .set_not_serving::<AbTestServiceServer<AbTests>>()
            .await;
        health.set_not_serving::<AdminServiceServer<Admin>>().await;
        health
            .set_not_serving::<CampaignServiceServer<Campaigns>>()
            .await;
        health
            .set_not_serving::<AnalyticsServiceServer<Analytics>>()
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
    };

    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    let router = Server::builder()
        .max_concurrent_streams(options.max_concurrent_streams)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .layer(crate::telemetry::GrpcTelemetryLayer::new(
            &[
                sharpsend_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
            options.request_timeout,
        ))
        .layer(InFlightLayer::new(options.max_in_flight))
        .layer(DeadlineLayer::new(options.request_timeout))
        .layer(access)
        .layer(invalidate_after_writes)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(segments)
        .add_service(profiles)
        .add_service(ops)
        .add_service(campaigns)
        .add_service(abtests)
        .add_service(admin)
        .add_service(analytics);
    let served = match tls {
        Some(config) => {
            let (incoming, acceptor) = crate::tls::incoming(incoming, config);
            let served = router.serve_with_incoming_shutdown(incoming, signal).await;
            acceptor.abort();
            served
        }
        None => router.serve_with_incoming_shutdown(incoming, signal).await,
    };
    if let Some(listener) = cache_listener {
        listener.abort();
    }
    cache.stop();
    served?;
    tracing::info!("server stopped");
    Ok(())
}

/// Asks the gRPC health service at `addr` (over TLS when `tls` is given) whether the server is
/// SERVING: `sharpsend-server health`, for container health checks.
pub async fn check_health(
    addr: std::net::SocketAddr,
    tls: Option<&crate::tls::ClientTls>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let timeout = std::time::Duration::from_secs(3);
    let channel = match tls {
        Some(tls) => crate::tls::channel(addr, tls, timeout).await,
        None => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .map_err(anyhow::Error::from),
    }
    .with_context(|| format!("connecting to {addr}"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    anyhow::ensure!(
        status == ServingStatus::Serving as i32,
        "server at {addr} is not serving (status {status})"
    );
    Ok(())
}
