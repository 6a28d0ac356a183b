//! Assembles the gRPC server: health and reflection (v1 and v1alpha) open to all, business
//! services behind the API-key interceptor, a server-wide timeout, a per-connection concurrency
//! limit with load shedding, a span and metrics per call (`telemetry`: the caller's `traceparent`
//! is honoured), and graceful shutdown that reports NOT_SERVING before draining.

use sharpsend_core::AppContext;
use sharpsend_proto::v1::{
    campaign_service_server::CampaignServiceServer, ops_service_server::OpsServiceServer,
    profile_service_server::ProfileServiceServer, segment_service_server::SegmentServiceServer,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::{
    auth::{ApiKeys, Authenticator},
    campaigns::Campaigns,
    ops::Ops,
    profiles::Profiles,
    segments::Segments,
};

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport failed")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves every service on `listener` until `shutdown` resolves, then flips health to
/// NOT_SERVING and drains in-flight calls. Keys, deadline and limits come from
/// `ctx.settings.server`.
pub async fn serve(
    listener: TcpListener,
    ctx: AppContext,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let options = ctx.settings.server.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SegmentServiceServer<Segments>>().await;
    health.set_serving::<ProfileServiceServer<Profiles>>().await;
    health.set_serving::<OpsServiceServer<Ops>>().await;
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

    let auth = Authenticator::new(ApiKeys::new(&options.api_keys));
    let segments = SegmentServiceServer::with_interceptor(Segments::new(ctx.clone()), auth.clone());
    let ops = OpsServiceServer::with_interceptor(Ops::new(ctx.clone()), auth.clone());
    let campaigns =
        CampaignServiceServer::with_interceptor(Campaigns::new(ctx.clone()), auth.clone());
    let profiles = ProfileServiceServer::with_interceptor(Profiles::new(ctx), auth);

    let signal = async move {
        shutdown.await;
        tracing::info!("shutdown requested: reporting NOT_SERVING and draining in-flight calls");
        health
            .set_not_serving::<SegmentServiceServer<Segments>>()
            .await;
        health
            .set_not_serving::<ProfileServiceServer<Profiles>>()
            .await;
        health.set_not_serving::<OpsServiceServer<Ops>>().await;
        health
            .set_not_serving::<CampaignServiceServer<Campaigns>>()
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
    };

    Server::builder()
        .timeout(options.request_timeout)
        .concurrency_limit_per_connection(options.concurrency_per_connection)
        .load_shed(true)
        .layer(crate::telemetry::GrpcTelemetryLayer::new(
            &[
                sharpsend_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
            options.request_timeout,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(segments)
        .add_service(profiles)
        .add_service(ops)
        .add_service(campaigns)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
        .await?;
    tracing::info!("server stopped");
    Ok(())
}
