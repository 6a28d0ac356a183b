//! Background jobs end to end: leases between replicas and run records.

use std::time::Duration;

use anyhow::ensure;
use cio_sim::{Fault, SimApi};
use sharpsend_core::{
    AppContext,
    jobs::{self, Job, JobOutcome, RunError},
};
use sharpsend_db::{db_test, jobs::RunOutcome, testing::TestDatabase};
use sharpsend_tests::TestApp;

db_test!(
    a_lease_stops_two_replicas_running_the_same_job,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        // A second "replica": its own connection pool and holder name.
        let other = AppContext::new(
            db.connect_again().await?,
            app.ctx.cio.clone(),
            (*app.ctx.workspace).clone(),
            app.ctx.settings.clone(),
            app.ctx.clock.clone(),
        );
        // Slow Customer.io down so the first run is still going when the second starts.
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::from_millis(1500))],
        );

        let (a, b) = tokio::join!(
            jobs::run_job(&app.ctx, Job::SegmentSync, "replica-a"),
            async {
                // Start once replica-a holds the lease (its run is then held up by the delay).
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while sharpsend_db::jobs::get_lease(&other.db, other.workspace_id(), "segment-sync")
                    .await
                    .ok()
                    .flatten()
                    .is_none_or(|l| l.holder != "replica-a")
                    && std::time::Instant::now() < deadline
                {
                    tokio::task::yield_now().await;
                }
                jobs::run_job(&other, Job::SegmentSync, "replica-b").await
            }
        );
        ensure!(matches!(a, Ok(JobOutcome::Succeeded { .. })), "{a:?}");
        ensure!(matches!(b, Ok(JobOutcome::Skipped { .. })), "{b:?}");
        let lists = app
            .sim
            .sim
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/v1/segments")
            .count();
        ensure!(lists == 1, "the job ran {lists} times");

        // Once released, the other replica gets it.
        let c = jobs::run_job(&other, Job::SegmentSync, "replica-b").await;
        ensure!(matches!(c, Ok(JobOutcome::Succeeded { .. })), "{c:?}");

        let runs = sharpsend_db::jobs::recent_runs(
            &app.ctx.db,
            app.ctx.workspace_id(),
            Some("segment-sync"),
            10,
        )
        .await?;
        let outcomes: Vec<RunOutcome> = runs.iter().map(|r| r.outcome).collect();
        ensure!(
            outcomes
                == vec![
                    RunOutcome::Succeeded,
                    RunOutcome::Skipped,
                    RunOutcome::Succeeded
                ],
            "{outcomes:?}"
        );
        ensure!(runs.iter().all(|r| r.finished_at.is_some()));
        ensure!(
            runs[0].details["created"] == 0 && runs[2].details["created"].as_u64().unwrap_or(0) > 0,
            "{:?}",
            runs[2].details
        );
        app.stop().await
    }
);

db_test!(
    a_failed_run_is_recorded_with_its_error,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        app.sim.sim.push_faults(
            Some(SimApi::App),
            (0..10).map(|_| Fault::Status {
                status: 500,
                retry_after_secs: None,
            }),
        );
        let result = app.run_job(Job::SegmentSync).await;
        let Err(RunError::Failed(failed)) = result else {
            anyhow::bail!("expected a failure: {result:?}")
        };
        let runs =
            sharpsend_db::jobs::recent_runs(&app.ctx.db, app.ctx.workspace_id(), None, 10).await?;
        ensure!(
            runs.len() == 1 && runs[0].id == failed.run_id && runs[0].outcome == RunOutcome::Failed
        );
        let error = runs[0].error.clone().unwrap_or_default();
        ensure!(error.contains("500"), "recorded error: {error}");
        // The lease was released: the next run goes ahead.
        app.sim.sim.clear_faults();
        ensure!(matches!(
            app.run_job(Job::SegmentSync).await,
            Ok(JobOutcome::Succeeded { .. })
        ));
        app.stop().await
    }
);

db_test!(
    a_run_seen_ended_can_be_started_again_at_once,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let ws = app.ctx.workspace_id();
        // The caller's view (SyncSegments then GetJobRun): the moment a run reads as ended, the
        // lease is free, so a next run started then is not skipped. The window this guards was
        // one statement wide: follow the run as closely as possible, many times.
        for i in 0..10 {
            let run = jobs::start(&app.ctx, Job::SegmentSync, "caller").await?;
            let deadline = std::time::Instant::now() + sharpsend_tests::RUN_WAIT;
            let ended = loop {
                let seen = jobs::get_run(&app.ctx, run.id).await?;
                if seen.finished_at.is_some() {
                    break seen;
                }
                ensure!(std::time::Instant::now() < deadline, "run {i} never ended");
                tokio::task::yield_now().await;
            };
            ensure!(
                ended.state == jobs::RunState::Succeeded,
                "run {i}: {ended:?}"
            );
            let lease = sharpsend_db::jobs::get_lease(&app.ctx.db, ws, "segment-sync").await?;
            ensure!(
                lease.is_none(),
                "run {i} read as ended with its lease held: {lease:?}"
            );
        }
        app.stop().await
    }
);
