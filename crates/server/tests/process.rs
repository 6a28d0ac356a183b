//! The real `sharpsend-server` binary: `migrate`, refusing to start with pending migrations or
//! without keys, serving, the `health` probe, and a clean stop on SIGTERM.

// Tests read the environment and the time directly; the product code may not.
#![allow(clippy::disallowed_methods)]

use std::{process::Output, time::Duration};

use cio_sim::{SimConfig, Simulator};
use sharpsend_core::testing::{TestDatabase, db_test};
use tokio::process::Command;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn server(database_url: &str, sim_url: &str, sim: &SimConfig) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sharpsend-server"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("SHARPSEND_API_KEYS", "svc=process-test-key")
        .env("CIO_SITE_ID", &sim.site_id)
        .env("CIO_TRACK_API_KEY", &sim.track_api_key)
        .env("CIO_APP_API_KEY", &sim.app_api_key)
        .env("CIO_TRACK_BASE_URL", sim_url)
        .env("CIO_APP_BASE_URL", sim_url)
        .env("RUST_LOG", "warn");
    command
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn check(condition: bool, message: String) -> TestResult {
    if condition {
        Ok(())
    } else {
        Err(message.into())
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

db_test!(
    migrate_then_serve_then_stop_on_sigterm,
    unmigrated,
    |db: TestDatabase| async move {
        let sim = Simulator::spawn(SimConfig::demo()).await?;
        let config = sim.sim.config().clone();
        let url = sim.base_url();

        let refused = server(&db.url, &url, &config).output().await?;
        check(
            !refused.status.success(),
            format!("served with pending migrations: {}", text(&refused)),
        )?;
        check(
            text(&refused).contains("sharpsend-server migrate"),
            text(&refused),
        )?;

        let migrated = server(&db.url, &url, &config)
            .arg("migrate")
            .output()
            .await?;
        check(migrated.status.success(), text(&migrated))?;
        // Every migration, however many there are by now.
        check(
            text(&migrated).contains("migration(s): m20261128_000001_create_workspaces")
                && !text(&migrated).contains("applied 0 migration(s)"),
            text(&migrated),
        )?;
        let again = server(&db.url, &url, &config)
            .arg("migrate")
            .output()
            .await?;
        check(
            text(&again).contains("applied 0 migration(s)"),
            text(&again),
        )?;

        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut running = server(&db.url, &url, &config)
            .env("SHARPSEND_LISTEN", &addr)
            .spawn()?;
        let probe = || {
            server(&db.url, &url, &config)
                .args(["health", "--addr", &addr])
                .output()
        };
        let mut healthy = false;
        for _ in 0..100 {
            if probe().await?.status.success() {
                healthy = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        check(healthy, "server never became healthy".into())?;

        let pid = running.id().ok_or("no pid")?;
        let killed = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        check(killed.success(), "kill failed".into())?;
        let status = tokio::time::timeout(Duration::from_secs(10), running.wait()).await??;
        check(status.success(), format!("exit after SIGTERM: {status}"))?;
        check(
            !probe().await?.status.success(),
            "health probe passes with the server gone".into(),
        )?;
        sim.shutdown().await;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
);

#[tokio::test]
async fn refuses_to_start_without_keys_or_with_malformed_settings() -> TestResult {
    let config = SimConfig::demo();
    let no_keys = server("sqlite::memory:", "http://127.0.0.1:9", &config)
        .env_remove("SHARPSEND_API_KEYS")
        .output()
        .await?;
    check(
        !no_keys.status.success() && text(&no_keys).contains("SHARPSEND_API_KEYS"),
        text(&no_keys),
    )?;

    for (variable, value) in [
        ("CIO_REGION", "mars"),
        ("SHARPSEND_LISTEN", "nowhere"),
        ("CIO_APP_BASE_URL", "::"),
        ("SHARPSEND_METRICS_TZ", "Mars/Olympus_Mons"),
        ("SHARPSEND_TRIGGER_SCOPE", "campaign"),
        ("SHARPSEND_SEND_CLAIM_TTL_SECS", "5"),
    ] {
        let out = server("sqlite::memory:", "http://127.0.0.1:9", &config)
            .env(variable, value)
            .output()
            .await?;
        check(
            !out.status.success() && text(&out).contains(variable),
            format!("{variable}: {}", text(&out)),
        )?;
    }
    let secret = "process-test-key";
    let out = server("sqlite::memory:", "http://127.0.0.1:9", &config)
        .env("CIO_REGION", "mars")
        .output()
        .await?;
    check(
        !text(&out).contains(secret) && !text(&out).contains(&config.app_api_key),
        "a key was printed".into(),
    )?;
    Ok(())
}

/// A request carrying the test key.
fn authed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = "Bearer process-test-key".parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn wait_healthy(
    database_url: &str,
    sim_url: &str,
    sim: &SimConfig,
    addr: &str,
) -> TestResult {
    for _ in 0..100 {
        if server(database_url, sim_url, sim)
            .args(["health", "--addr", addr])
            .output()
            .await?
            .status
            .success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("server never became healthy".into())
}

db_test!(
    killed_mid_send_and_restarted_still_triggers_once,
    |db: TestDatabase| async move {
        use cio_sim::{Fault, SimApi};
        use sharpsend_proto::v1::{
            self as pb, campaign_service_client::CampaignServiceClient,
            ops_service_client::OpsServiceClient,
        };

        let sim = Simulator::spawn(SimConfig::demo()).await?;
        sim.sim.set_trigger_interval(Duration::from_millis(300));
        let config = sim.sim.config().clone();
        let url = sim.base_url();
        let addr = format!("127.0.0.1:{}", free_port()?);
        let start = || {
            let mut command = server(&db.url, &url, &config);
            command
                .env("SHARPSEND_LISTEN", &addr)
                .env("SHARPSEND_SEND_CLAIM_TTL_SECS", "3")
                .env("CIO_TIMEOUT_SECS", "1")
                .env("SHARPSEND_MAX_CLOCK_SKEW_MS", "100")
                .env("SHARPSEND_SEND_RECONCILE_GRACE_SECS", "1")
                .env("SHARPSEND_TRIGGER_SPACING_MS", "350")
                .kill_on_drop(true);
            command.spawn()
        };
        let mut first = start()?;
        wait_healthy(&db.url, &url, &config, &addr).await?;
        let endpoint = format!("http://{addr}");
        let channel = tonic::transport::Channel::from_shared(endpoint.clone())?
            .connect()
            .await?;
        let sync = OpsServiceClient::new(channel.clone())
            .run_job(authed(pb::RunJobRequest {
                job: "segment-sync".into(),
                ..Default::default()
            }))
            .await?
            .into_inner();
        finished(&channel, sync.run.ok_or("no run")?.id).await?;
        let engaged = sim
            .sim
            .segments()
            .into_iter()
            .find(|s| s.name == "High Engagement")
            .ok_or("no segment")?
            .id;
        let request = pb::SendAssignmentRequest {
            assignment_id: "asg-killed".into(),
            title: "Q4".into(),
            subject: "Q4 outlook".into(),
            segment_ids: vec![engaged],
            variations: vec![pb::ContentVariation {
                segment_id: engaged,
                body: "<p>Q4</p>".into(),
                ..Default::default()
            }],
            delivery: Some(pb::send_assignment_request::Delivery::Broadcast(
                pb::BroadcastDelivery { broadcast_id: 3 },
            )),
            ..Default::default()
        };

        // The broadcast check passes; the trigger is processed by Customer.io but its answer is slow.
        sim.sim.push_faults(
            Some(SimApi::App),
            [
                Fault::Delay(Duration::ZERO),
                Fault::AcceptThenDelay(Duration::from_secs(60)),
            ],
        );
        let mut campaigns = CampaignServiceClient::new(channel);
        let pending_call = {
            let request = request.clone();
            tokio::spawn(async move { campaigns.send_assignment(authed(request)).await })
        };
        let mut processed = false;
        for _ in 0..200 {
            if sim.sim.triggers(Some(3)).len() == 1 {
                processed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        check(processed, "the trigger never reached the simulator".into())?;
        first.kill().await?; // SIGKILL while the answer is on its way
        check(
            pending_call.await?.is_err(),
            "the call cannot have succeeded".into(),
        )?;

        let _second = start()?;
        wait_healthy(&db.url, &url, &config, &addr).await?;
        let channel = tonic::transport::Channel::from_shared(endpoint)?
            .connect()
            .await?;
        let mut campaigns = CampaignServiceClient::new(channel.clone());
        // The caller retries its approval: the same send, nothing sent again.
        let retried = campaigns
            .send_assignment(authed(request))
            .await?
            .into_inner();
        check(!retried.created, "a second send was created".into())?;
        let send_id = retried.send.ok_or("no send")?.id;
        tokio::time::sleep(Duration::from_millis(3200)).await; // the dead server's claim expires
        let started = OpsServiceClient::new(channel.clone())
            .run_job(authed(pb::RunJobRequest {
                job: "send-reconcile".into(),
                ..Default::default()
            }))
            .await?
            .into_inner();
        let run = pb::RunJobResponse {
            run: Some(finished(&channel, started.run.ok_or("no run")?.id).await?),
        };
        check(
            run.run
                .as_ref()
                .is_some_and(|r| r.outcome == pb::JobRunOutcome::Succeeded as i32),
            format!("{run:?}"),
        )?;
        let send = campaigns
            .get_send(authed(pb::GetSendRequest {
                send_id,
                ..Default::default()
            }))
            .await?
            .into_inner()
            .send
            .ok_or("no send")?;
        let triggers = sim.sim.triggers(Some(3));
        check(triggers.len() == 1, format!("{} triggers", triggers.len()))?;
        let sub = send.submissions.first().ok_or("no submission")?;
        check(
            matches!(
                sub.state(),
                pb::SendState::Submitted | pb::SendState::Completed
            ) && sub.cio_trigger_id == triggers[0].id,
            format!("{send:#?}"),
        )?;
        check(
            send.history
                .iter()
                .any(|h| h.to_state() == pb::SendState::Uncertain)
                && sub.attempts == 1,
            format!("{:#?}", send.history),
        )?;
        sim.shutdown().await;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
);

/// Follows a job run (RunJob answers at once) with GetJobRun until it has ended.
async fn finished(
    channel: &tonic::transport::Channel,
    run_id: i64,
) -> Result<sharpsend_proto::v1::JobRun, Box<dyn std::error::Error + Send + Sync>> {
    use sharpsend_proto::v1::{self as pb, ops_service_client::OpsServiceClient};
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let run = OpsServiceClient::new(channel.clone())
            .get_job_run(authed(pb::GetJobRunRequest { run_id }))
            .await?
            .into_inner()
            .run
            .ok_or("no run")?;
        if run.outcome != pb::JobRunOutcome::Running as i32 {
            return Ok(run);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("run {run_id} still running").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
