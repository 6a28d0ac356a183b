//! OpsService end to end: listing jobs and runs, running a job now under the scheduler's lease.

use std::time::Duration;

use anyhow::ensure;
use chrono::Utc;
use cio_sim::{Fault, SimApi};
use sharpsend_core::jobs::{Job, LEASE_TTL};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{self as pb, JobRunOutcome};
use sharpsend_tests::TestApp;
use tonic::Code;
use tonic_types::StatusExt;

fn segment_list_requests(app: &TestApp) -> usize {
    app.sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/v1/segments")
        .count()
}

db_test!(
    list_jobs_shows_every_job_with_schedule_and_description,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let jobs = app
            .ops()
            .await?
            .list_jobs(pb::ListJobsRequest {})
            .await?
            .into_inner()
            .jobs;
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        let expected: Vec<&str> = Job::ALL.iter().map(|j| j.name()).collect();
        ensure!(names == expected, "{names:?}");
        for (info, job) in jobs.iter().zip(Job::ALL) {
            ensure!(info.description == job.description() && !info.description.is_empty());
            ensure!(info.schedule_variable == job.schedule_variable());
            ensure!(
                Some(info.default_schedule.as_str())
                    == sharpsend_core::settings::declared_default(job.schedule_variable())
            );
            ensure!(info.schedule.split_whitespace().count() == 6, "{info:?}");
        }
        // Same key rules as every business service.
        let refused = app
            .ops_with_key(None)
            .await?
            .list_jobs(pb::ListJobsRequest {})
            .await;
        ensure!(refused.err().map(|s| s.code()) == Some(Code::Unauthenticated));
        app.stop().await
    }
);

db_test!(
    run_job_runs_now_and_runs_are_listed_newest_first,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut ops = app.ops().await?;

        let run = ops
            .run_job(pb::RunJobRequest {
                job: "segment-sync".into(),
            })
            .await?
            .into_inner()
            .run;
        let Some(sync) = run else {
            anyhow::bail!("no run in the answer")
        };
        ensure!(sync.outcome == JobRunOutcome::Succeeded as i32, "{sync:?}");
        ensure!(sync.job == "segment-sync" && sync.error.is_empty());
        ensure!(
            sync.holder.starts_with("server-ops(e2e)"),
            "holder {}",
            sync.holder
        );
        ensure!(
            sync.started_at.is_some() && sync.finished_at.is_some() && sync.duration.is_some(),
            "{sync:?}"
        );
        let created = sync
            .details
            .as_ref()
            .and_then(|d| d.fields.get("created"))
            .and_then(|v| match v.kind {
                Some(prost_types::value::Kind::NumberValue(n)) => Some(n),
                _ => None,
            });
        ensure!(
            created == Some(app.sim.sim.segments().len() as f64),
            "details {:?}",
            sync.details
        );
        // It really ran: the mirror is filled.
        let listed = app
            .segments()
            .await?
            .list_segments(pb::ListSegmentsRequest {
                page_size: 500,
                ..Default::default()
            })
            .await?;
        ensure!(listed.into_inner().segments.len() == app.sim.sim.segments().len());

        let delivery = ops
            .run_job(pb::RunJobRequest {
                job: "outbox-delivery".into(),
            })
            .await?
            .into_inner()
            .run;
        ensure!(
            delivery.as_ref().is_some_and(
                |r| r.outcome == JobRunOutcome::Succeeded as i32 && r.job == "outbox-delivery"
            ),
            "{delivery:?}"
        );

        let all = ops
            .list_job_runs(pb::ListJobRunsRequest::default())
            .await?
            .into_inner()
            .runs;
        let order: Vec<&str> = all.iter().map(|r| r.job.as_str()).collect();
        ensure!(order == ["outbox-delivery", "segment-sync"], "{order:?}");
        ensure!(all[1].id == sync.id);
        let only_sync = ops
            .list_job_runs(pb::ListJobRunsRequest {
                job: "segment-sync".into(),
                limit: 0,
            })
            .await?
            .into_inner()
            .runs;
        ensure!(only_sync.len() == 1 && only_sync[0].id == sync.id);
        let one = ops
            .list_job_runs(pb::ListJobRunsRequest {
                job: String::new(),
                limit: 1,
            })
            .await?
            .into_inner()
            .runs;
        ensure!(one.len() == 1 && one[0].job == "outbox-delivery");
        app.stop().await
    }
);

db_test!(
    an_unknown_job_is_invalid_argument_naming_it,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut ops = app.ops().await?;
        for status in [
            ops.run_job(pb::RunJobRequest {
                job: "segment-synk".into(),
            })
            .await
            .err(),
            ops.list_job_runs(pb::ListJobRunsRequest {
                job: "segment-synk".into(),
                limit: 5,
            })
            .await
            .err(),
        ] {
            let Some(status) = status else {
                anyhow::bail!("an unknown job was accepted")
            };
            ensure!(status.code() == Code::InvalidArgument, "{status:?}");
            ensure!(
                status.message().contains("segment-synk")
                    && status.message().contains("segment-sync"),
                "{}",
                status.message()
            );
            let fields: Vec<String> = status
                .get_error_details()
                .bad_request()
                .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
                .unwrap_or_default();
            ensure!(fields == ["job"], "{fields:?}");
        }
        let empty = ops
            .run_job(pb::RunJobRequest { job: String::new() })
            .await
            .err()
            .map(|s| s.code());
        ensure!(empty == Some(Code::InvalidArgument));
        // Nothing ran.
        ensure!(
            ops.list_job_runs(pb::ListJobRunsRequest::default())
                .await?
                .into_inner()
                .runs
                .is_empty()
        );
        app.stop().await
    }
);

db_test!(
    a_lease_held_elsewhere_makes_run_job_answer_skipped,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        // The scheduler (another holder) is running segment-sync.
        let held = sharpsend_db::jobs::try_acquire_lease(
            &app.ctx.db,
            app.ctx.workspace_id(),
            "segment-sync",
            "scheduler@elsewhere",
            LEASE_TTL,
            Utc::now(),
        )
        .await?;
        ensure!(held);
        let run = app
            .ops()
            .await?
            .run_job(pb::RunJobRequest {
                job: "segment-sync".into(),
            })
            .await?
            .into_inner()
            .run;
        ensure!(
            run.as_ref()
                .is_some_and(|r| r.outcome == JobRunOutcome::Skipped as i32 && r.error.is_empty()),
            "{run:?}"
        );
        ensure!(
            segment_list_requests(&app) == 0,
            "the job ran although the lease is held"
        );
        app.stop().await
    }
);

db_test!(
    a_failed_run_is_answered_failed_with_its_error,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        app.sim.sim.push_faults(
            Some(SimApi::App),
            (0..10).map(|_| Fault::Status {
                status: 500,
                retry_after_secs: None,
            }),
        );
        let run = app
            .ops()
            .await?
            .run_job(pb::RunJobRequest {
                job: "segment-sync".into(),
            })
            .await?
            .into_inner()
            .run;
        let Some(run) = run else {
            anyhow::bail!("no run in the answer")
        };
        ensure!(run.outcome == JobRunOutcome::Failed as i32, "{run:?}");
        ensure!(
            run.error.contains("500") && run.finished_at.is_some(),
            "{run:?}"
        );
        app.stop().await
    }
);

db_test!(
    a_run_outlives_a_caller_that_stops_waiting,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::from_millis(1500))],
        );
        let mut ops = app.ops().await?;
        let mut request = tonic::Request::new(pb::RunJobRequest {
            job: "segment-sync".into(),
        });
        request.set_timeout(Duration::from_millis(300));
        let cut = ops.run_job(request).await;
        ensure!(
            cut.as_ref().err().map(|s| s.code()) == Some(Code::DeadlineExceeded)
                || cut.as_ref().err().map(|s| s.code()) == Some(Code::Cancelled),
            "{cut:?}"
        );

        // The run goes on to the end, is recorded, and releases its lease.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let runs = ops
                .list_job_runs(pb::ListJobRunsRequest::default())
                .await?
                .into_inner()
                .runs;
            if runs
                .first()
                .is_some_and(|r| r.outcome == JobRunOutcome::Succeeded as i32)
            {
                ensure!(runs.len() == 1);
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "the run never finished: {runs:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let again = ops
            .run_job(pb::RunJobRequest {
                job: "segment-sync".into(),
            })
            .await?
            .into_inner()
            .run;
        ensure!(again.is_some_and(|r| r.outcome == JobRunOutcome::Succeeded as i32));
        app.stop().await
    }
);
