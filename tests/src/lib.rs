//! End-to-end test support: [`TestApp`] runs the Customer.io simulator (port 0), a real gRPC
//! server (port 0) over a test database of its own (SQLite or PostgreSQL, see
//! `sharpsend_db::testing`), and hands out typed gRPC clients. Background jobs are driven by
//! calling them ([`TestApp::run_job`]), never by waiting for cron.
//!
//! Logs stay silent unless `TEST_LOG` is set.

pub mod bench_data;
pub mod proc_stats;

use std::{net::SocketAddr, time::Duration};

use cio_sim::{RunningSim, SimConfig, Simulator};
use sharpsend_core::{
    AppContext,
    clock::Clock,
    context::Migrations,
    jobs::{self, Job, JobOutcome, RunError},
    outbox::{self, DeliveryConfig, DeliveryReport},
    settings::{ApiKeySetting, CioSettings, ServerSettings, Settings},
};
use sharpsend_db::testing::TestDatabase;
use sharpsend_proto::v1::{
    GetJobRunRequest, JobRun, JobRunOutcome, SyncSegmentsRequest,
    ab_test_service_client::AbTestServiceClient, admin_service_client::AdminServiceClient,
    analytics_service_client::AnalyticsServiceClient,
    campaign_service_client::CampaignServiceClient, ops_service_client::OpsServiceClient,
    profile_service_client::ProfileServiceClient, segment_service_client::SegmentServiceClient,
};
use sharpsend_server::serve;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

/// Customer.io's one-trigger-per-broadcast window in tests' simulators (10 s in production).
pub const TEST_TRIGGER_INTERVAL: Duration = Duration::from_millis(300);

/// Send settings for tests: the trigger spacing just above [`TEST_TRIGGER_INTERVAL`], a short
/// reconciliation grace period, a small clock skew (one machine), and the shortest claim that
/// holds a whole request (10 s timeout) plus the fence margin (tests move the clock past it).
pub fn test_send_config() -> sharpsend_core::sends::SendConfig {
    sharpsend_core::sends::SendConfig {
        trigger_spacing: TEST_TRIGGER_INTERVAL + Duration::from_millis(50),
        claim_ttl: Duration::from_secs(15),
        reconcile_grace: Duration::from_secs(1),
        max_attempts: 3,
        max_clock_skew: Duration::from_millis(100),
        ..sharpsend_core::sends::SendConfig::default()
    }
}

/// The master key (`SHARPSEND_MASTER_KEY`) of every [`TestApp`]: id `e2e-1`.
pub const TEST_MASTER_KEY: &str = "e2e-1:ZTJlLW1hc3Rlci1rZXktMzItYnl0ZXMtZXhhY3RseSE=";

/// The API key every [`TestApp`] accepts.
pub const TEST_API_KEY: &str = "e2e-test-key-0123456789";

/// A running server + simulator over one test database.
pub struct TestApp {
    pub sim: RunningSim,
    pub ctx: AppContext,
    pub addr: SocketAddr,
    pub database_url: String,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), sharpsend_server::app::ServeError>>,
}

/// Customer.io settings pointing at `sim` with its own credentials.
pub fn sim_settings(sim: &RunningSim) -> CioSettings {
    let config = sim.sim.config();
    let url = url::Url::parse(&sim.base_url()).unwrap_or_else(|e| panic!("simulator URL: {e}"));
    CioSettings::for_simulator(
        url,
        &config.site_id,
        &config.track_api_key,
        &config.app_api_key,
    )
}

impl TestApp {
    /// Simulator with the demo audience, server on `db`.
    pub async fn spawn(db: &TestDatabase) -> anyhow::Result<Self> {
        Self::spawn_with(db, SimConfig::demo(), |_| {}).await
    }

    /// Simulator from `sim_config`; `adjust` may change the service's Customer.io settings
    /// (e.g. a wrong key) before the server starts.
    pub async fn spawn_with(
        db: &TestDatabase,
        sim_config: SimConfig,
        adjust: impl FnOnce(&mut CioSettings),
    ) -> anyhow::Result<Self> {
        Self::spawn_with_settings(db, sim_config, |settings| {
            if let Some(cio) = settings.cio.as_mut() {
                adjust(cio);
            }
        })
        .await
    }

    /// Simulator from `sim_config`; `adjust` may change any of the service's settings before
    /// the server starts.
    pub async fn spawn_with_settings(
        db: &TestDatabase,
        sim_config: SimConfig,
        adjust: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<Self> {
        init_test_logging();
        let sim = Simulator::spawn(sim_config).await?;
        let mut settings = test_settings(&db.url, sim_settings(&sim));
        adjust(&mut settings);
        sim.sim.set_trigger_interval(TEST_TRIGGER_INTERVAL);
        let ctx = AppContext::bootstrap(settings, Migrations::Apply, Clock::adjustable()).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, ctx.clone(), async move {
            let _ = rx.await;
        }));
        Ok(Self {
            sim,
            ctx,
            addr,
            database_url: db.url.clone(),
            shutdown: Some(tx),
            server,
        })
    }

    /// A channel to the server.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await?)
    }

    /// A SegmentService client presenting `key` (`None`: no authorization metadata).
    pub async fn segments_with_key(
        &self,
        key: Option<&str>,
    ) -> anyhow::Result<SegmentServiceClient<InterceptedService<Channel, Bearer>>> {
        Ok(SegmentServiceClient::with_interceptor(
            self.channel().await?,
            Bearer(key.map(str::to_string)),
        ))
    }

    /// A SegmentService client with the test API key.
    pub async fn segments(
        &self,
    ) -> anyhow::Result<SegmentServiceClient<InterceptedService<Channel, Bearer>>> {
        self.segments_with_key(Some(TEST_API_KEY)).await
    }

    /// A ProfileService client with the test API key.
    pub async fn profiles(
        &self,
    ) -> anyhow::Result<ProfileServiceClient<InterceptedService<Channel, Bearer>>> {
        Ok(ProfileServiceClient::with_interceptor(
            self.channel().await?,
            Bearer(Some(TEST_API_KEY.to_string())),
        ))
    }

    /// An OpsService client presenting `key` (`None`: no authorization metadata).
    pub async fn ops_with_key(
        &self,
        key: Option<&str>,
    ) -> anyhow::Result<OpsServiceClient<InterceptedService<Channel, Bearer>>> {
        Ok(OpsServiceClient::with_interceptor(
            self.channel().await?,
            Bearer(key.map(str::to_string)),
        ))
    }

    /// A CampaignService client with the test API key.
    pub async fn campaigns(
        &self,
    ) -> anyhow::Result<CampaignServiceClient<InterceptedService<Channel, Bearer>>> {
        Ok(CampaignServiceClient::with_interceptor(
            self.channel().await?,
            Bearer(Some(TEST_API_KEY.to_string())),
        ))
    }

    /// An ABTestService client with the test API key.
    pub async fn abtests(
        &self,
    ) -> anyhow::Result<AbTestServiceClient<InterceptedService<Channel, Bearer>>> {
        Ok(AbTestServiceClient::with_interceptor(
            self.channel().await?,
            Bearer(Some(TEST_API_KEY.to_string())),
        ))
    }

    /// An AdminService client presenting `key` (`None`: no authorization metadata).
    pub async fn admin_with_key(
        &self,
        key: Option<&str>,
    ) -> anyhow::Result<AdminServiceClient<InterceptedService<Channel, Bearer>>> {
        Ok(AdminServiceClient::with_interceptor(
            self.channel().await?,
            Bearer(key.map(str::to_string)),
        ))
    }

    /// An AdminService client with the test API key (an admin key of the default workspace).
    pub async fn admin(
        &self,
    ) -> anyhow::Result<AdminServiceClient<InterceptedService<Channel, Bearer>>> {
        self.admin_with_key(Some(TEST_API_KEY)).await
    }

    /// An AnalyticsService client with the test API key.
    pub async fn analytics(
        &self,
    ) -> anyhow::Result<AnalyticsServiceClient<InterceptedService<Channel, Bearer>>> {
        Ok(AnalyticsServiceClient::with_interceptor(
            self.channel().await?,
            Bearer(Some(TEST_API_KEY.to_string())),
        ))
    }

    /// An OpsService client with the test API key.
    pub async fn ops(
        &self,
    ) -> anyhow::Result<OpsServiceClient<InterceptedService<Channel, Bearer>>> {
        self.ops_with_key(Some(TEST_API_KEY)).await
    }

    /// Delivers the outbox until nothing is pending or in flight (retries included), as a
    /// worker named `worker`; fails after `limit`.
    pub async fn deliver_all(
        &self,
        worker: &str,
        limit: Duration,
    ) -> anyhow::Result<DeliveryReport> {
        let started = std::time::Instant::now();
        let mut total = DeliveryReport::default();
        loop {
            total.absorb(outbox::drain(&self.ctx, worker, &self.ctx.settings.delivery).await?);
            let stats = sharpsend_db::outbox::stats(&self.ctx.db, self.ctx.workspace_id()).await?;
            if stats.pending == 0 && stats.in_flight == 0 {
                return Ok(total);
            }
            anyhow::ensure!(
                started.elapsed() < limit,
                "outbox not delivered within {limit:?}: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Moves time forward by `by` for the service (its clock) and the simulator (its sends,
    /// trigger windows and deliveries), instead of sleeping.
    pub fn advance(&self, by: Duration) {
        self.ctx.clock.advance(by);
        self.sim.sim.advance(by);
    }

    /// Calls SegmentService/SyncSegments and follows its run (OpsService/GetJobRun) until it has
    /// ended; fails unless it SUCCEEDED. Answers the run (its counts are in `details`).
    pub async fn sync_segments(&self) -> anyhow::Result<JobRun> {
        let run = self
            .segments()
            .await?
            .sync_segments(SyncSegmentsRequest {})
            .await?
            .into_inner()
            .run
            .ok_or_else(|| anyhow::anyhow!("SyncSegments answered no run"))?;
        let run = wait_for_run(&mut self.ops().await?, run.id, RUN_WAIT).await?;
        anyhow::ensure!(
            run.outcome == JobRunOutcome::Succeeded as i32,
            "segment-sync run {} ended {:?}: {}",
            run.id,
            run.outcome(),
            run.error
        );
        Ok(run)
    }

    /// The id of the simulator's segment named `name` (a demo segment).
    pub fn sim_segment_id(&self, name: &str) -> anyhow::Result<i64> {
        self.sim
            .sim
            .segments()
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.id)
            .ok_or_else(|| anyhow::anyhow!("the simulator has no segment named {name:?}"))
    }

    /// Sends assignment `assignment_id` (of `content_type`) to the demo audience's "High
    /// Engagement" segment through broadcast `broadcast_id` (segments synced first) and
    /// dispatches it until its trigger is submitted; answers the send as it then stands.
    pub async fn send_to_high_engagement(
        &self,
        assignment_id: &str,
        content_type: &str,
        broadcast_id: i64,
    ) -> anyhow::Result<sharpsend_proto::v1::Send> {
        use sharpsend_proto::v1 as pb;
        self.run_job(Job::SegmentSync).await?;
        let segment = self.sim_segment_id("High Engagement")?;
        let sent = self
            .campaigns()
            .await?
            .send_assignment(pb::SendAssignmentRequest {
                assignment_id: assignment_id.into(),
                title: assignment_id.into(),
                subject: assignment_id.into(),
                segment_ids: vec![segment],
                variations: vec![pb::ContentVariation {
                    segment_id: segment,
                    body: format!("<p>{assignment_id}</p>"),
                    ..Default::default()
                }],
                delivery: Some(pb::send_assignment_request::Delivery::Broadcast(
                    pb::BroadcastDelivery { broadcast_id },
                )),
                content_types: vec![content_type.into()],
                ..Default::default()
            })
            .await?
            .into_inner()
            .send
            .ok_or_else(|| anyhow::anyhow!("SendAssignment answered no send"))?;
        self.dispatch_until_submitted(&sent.id, 1, Duration::ZERO, Duration::from_secs(60))
            .await
    }

    /// Runs `send-dispatch` until `submissions` of send `send_id`'s submissions have reached
    /// Customer.io (a trigger id), within `within`; between tries the service's and the
    /// simulator's clocks move by `advance` (a broadcast window still closed opens). Answers the
    /// send as it then stands.
    pub async fn dispatch_until_submitted(
        &self,
        send_id: &str,
        submissions: usize,
        advance: Duration,
        within: Duration,
    ) -> anyhow::Result<sharpsend_proto::v1::Send> {
        let deadline = std::time::Instant::now() + within;
        loop {
            self.run_job(Job::SendDispatch).await?;
            let send = self
                .campaigns()
                .await?
                .get_send(sharpsend_proto::v1::GetSendRequest {
                    send_id: send_id.to_owned(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .send
                .ok_or_else(|| anyhow::anyhow!("GetSend answered no send"))?;
            let triggered = send
                .submissions
                .iter()
                .filter(|s| s.cio_trigger_id > 0)
                .count();
            if triggered >= submissions {
                return Ok(send);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "send not submitted within {within:?}: {send:?}"
            );
            if !advance.is_zero() {
                self.advance(advance);
                self.sim.sim.advance(advance);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs one background job to completion, as the scheduler would.
    pub async fn run_job(&self, job: Job) -> Result<JobOutcome, RunError> {
        jobs::run_job(&self.ctx, job, "e2e-test").await
    }

    /// Signals shutdown and waits for the server to drain, then stops the simulator.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.server).await??;
        self.sim.shutdown().await;
        Ok(())
    }

    /// Requests the shutdown signal without waiting (to observe draining).
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The settings of a test app on `database_url` talking to `cio`: the test API key, short
/// delivery retries and claims ([`test_delivery_config`]), fast sends ([`test_send_config`]).
pub fn test_settings(database_url: &str, cio: CioSettings) -> Settings {
    Settings {
        database_url: database_url.to_string(),
        cio: Some(cio),
        server: ServerSettings {
            api_keys: vec![ApiKeySetting {
                name: "e2e".into(),
                key: TEST_API_KEY.to_string().into(),
            }],
            ..ServerSettings::default()
        },
        master_keys: sharpsend_core::secrets::MasterKeys::parse(TEST_MASTER_KEY)
            .ok()
            .map(Into::into),
        delivery: test_delivery_config(),
        sends: test_send_config(),
        ..Settings::default()
    }
}

/// Delivery settings for tests: short retry delays and claims, so retries happen within a test.
pub fn test_delivery_config() -> DeliveryConfig {
    DeliveryConfig {
        claim_ttl: Duration::from_secs(5),
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        poll_interval: Duration::from_millis(50),
        ..DeliveryConfig::default()
    }
}

/// How long [`TestApp::sync_segments`] follows a run before giving up.
pub const RUN_WAIT: Duration = Duration::from_secs(120);

/// Polls OpsService/GetJobRun until run `run_id` is no longer RUNNING, for at most `limit`;
/// answers the run as it ended.
pub async fn wait_for_run(
    ops: &mut OpsServiceClient<InterceptedService<Channel, Bearer>>,
    run_id: i64,
    limit: Duration,
) -> anyhow::Result<JobRun> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let run = ops
            .get_job_run(GetJobRunRequest { run_id })
            .await?
            .into_inner()
            .run
            .ok_or_else(|| anyhow::anyhow!("GetJobRun answered no run"))?;
        if run.outcome != JobRunOutcome::Running as i32 {
            return Ok(run);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "run {run_id} still running after {limit:?}: {:?}",
            run.details
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Adds `authorization: Bearer <key>` when a key is set.
#[derive(Clone)]
pub struct Bearer(Option<String>);

impl Bearer {
    /// Presents `key` (`None`: no authorization metadata).
    pub fn new(key: Option<&str>) -> Self {
        Self(key.map(str::to_string))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(key) = &self.0 {
            let value: MetadataValue<_> = format!("Bearer {key}")
                .parse()
                .map_err(|_| Status::internal("bad test key"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// Installs a log subscriber when `TEST_LOG` is set (once per process).
pub fn init_test_logging() {
    let Ok(wanted) = std::env::var("TEST_LOG") else {
        return;
    };
    let mut config = sharpsend_core::telemetry::TelemetryConfig::logs_only("e2e", false);
    // `TEST_LOG=1` logs at the default level; `TEST_LOG=debug,sqlx=info` picks a filter.
    if !matches!(wanted.trim(), "" | "1" | "true") {
        config.log_filter = Some(wanted);
    }
    let _ = sharpsend_core::telemetry::init(config);
}

/// The fields named by an `InvalidArgument` status's `google.rpc.BadRequest` details, in order.
pub fn bad_request_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}
