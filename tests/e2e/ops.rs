//! OpsService end to end: listing jobs and runs, starting a job now under the scheduler's lease
//! (answered at once), following a run with GetJobRun, idempotent RunJob with a request_id.

use std::time::Duration;

use anyhow::{Context, ensure};
use chrono::Utc;
use cio_sim::{Fault, SimApi};
use sharpsend_core::jobs::{Job, LEASE_TTL};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{self as pb, JobRunOutcome};
use sharpsend_tests::{RUN_WAIT, TestApp, bad_request_fields, wait_for_run};
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
                ..Default::default()
            })
            .await?
            .into_inner()
            .run;
        let Some(started) = run else {
            anyhow::bail!("no run in the answer")
        };
        ensure!(
            started.outcome == JobRunOutcome::Running as i32 && started.finished_at.is_none(),
            "RunJob did not answer at once: {started:?}"
        );
        let sync = wait_for_run(&mut ops, started.id, RUN_WAIT).await?;
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
                ..Default::default()
            })
            .await?
            .into_inner()
            .run
            .context("no run")?;
        let delivery = Some(wait_for_run(&mut ops, delivery.id, RUN_WAIT).await?);
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
                ..Default::default()
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
            .run_job(pb::RunJobRequest::default())
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
                ..Default::default()
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
        let mut ops = app.ops().await?;
        let run = ops
            .run_job(pb::RunJobRequest {
                job: "segment-sync".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .run;
        let Some(run) = run else {
            anyhow::bail!("no run in the answer")
        };
        let run = wait_for_run(&mut ops, run.id, RUN_WAIT).await?;
        ensure!(run.outcome == JobRunOutcome::Failed as i32, "{run:?}");
        ensure!(
            run.error.contains("500") && run.finished_at.is_some(),
            "{run:?}"
        );
        app.stop().await
    }
);

db_test!(
    run_job_answers_at_once_and_the_run_goes_on_past_any_deadline,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        // Customer.io takes 1.5 s to list segments; the caller allows 300 ms.
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::from_millis(1500))],
        );
        let mut ops = app.ops().await?;
        let mut request = tonic::Request::new(pb::RunJobRequest {
            job: "segment-sync".into(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_millis(300));
        let run = ops
            .run_job(request)
            .await?
            .into_inner()
            .run
            .context("no run")?;
        ensure!(run.outcome == JobRunOutcome::Running as i32, "{run:?}");

        // GetJobRun follows it: running, then succeeded with its counts; the lease is released.
        let running = ops
            .get_job_run(pb::GetJobRunRequest { run_id: run.id })
            .await?
            .into_inner()
            .run
            .context("no run")?;
        ensure!(running.id == run.id && running.job == "segment-sync");
        let done = wait_for_run(&mut ops, run.id, RUN_WAIT).await?;
        ensure!(
            done.outcome == JobRunOutcome::Succeeded as i32
                && done.finished_at.is_some()
                && done.error.is_empty(),
            "{done:?}"
        );
        let listed = done
            .details
            .as_ref()
            .and_then(|d| d.fields.get("listed"))
            .and_then(|v| match v.kind {
                Some(prost_types::value::Kind::NumberValue(n)) => Some(n),
                _ => None,
            });
        ensure!(
            listed == Some(app.sim.sim.segments().len() as f64),
            "{done:?}"
        );
        let again = ops
            .run_job(pb::RunJobRequest {
                job: "segment-sync".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .run
            .context("no run")?;
        ensure!(again.outcome == JobRunOutcome::Running as i32, "{again:?}");
        let again = wait_for_run(&mut ops, again.id, RUN_WAIT).await?;
        ensure!(
            again.outcome == JobRunOutcome::Succeeded as i32,
            "{again:?}"
        );
        app.stop().await
    }
);

db_test!(
    get_job_run_of_an_unknown_run_is_not_found,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut ops = app.ops().await?;
        let missing = ops
            .get_job_run(pb::GetJobRunRequest { run_id: 987_654 })
            .await
            .err()
            .context("an unknown run was found")?;
        ensure!(missing.code() == Code::NotFound, "{missing:?}");
        for bad in [0, -1] {
            let status = ops
                .get_job_run(pb::GetJobRunRequest { run_id: bad })
                .await
                .err()
                .context("a bad run id was accepted")?;
            ensure!(status.code() == Code::InvalidArgument, "{status:?}");
            ensure!(bad_request_fields(&status) == ["run_id"], "{status:?}");
        }
        app.stop().await
    }
);

db_test!(
    run_job_with_a_request_id_starts_one_run_however_often_it_is_sent,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut ops = app.ops().await?;
        let request = |job: &str, request_id: &str| pb::RunJobRequest {
            job: job.into(),
            request_id: request_id.into(),
        };
        // Eight concurrent duplicates start one run; all answer it.
        let calls = (0..8).map(|_| {
            let mut ops = ops.clone();
            let request = request("segment-sync", "sync-2026-12-06");
            tokio::spawn(async move { ops.run_job(request).await })
        });
        let mut ids = Vec::new();
        for call in futures::future::join_all(calls).await {
            let run = call??.into_inner().run.context("no run")?;
            ids.push(run.id);
        }
        ids.dedup();
        ensure!(ids.len() == 1, "several runs: {ids:?}");
        let done = wait_for_run(&mut ops, ids[0], RUN_WAIT).await?;
        ensure!(done.outcome == JobRunOutcome::Succeeded as i32, "{done:?}");

        // A later retry answers the finished run and starts nothing.
        let retry = ops
            .run_job(request("segment-sync", "sync-2026-12-06"))
            .await?
            .into_inner()
            .run
            .context("no run")?;
        ensure!(
            retry.id == done.id && retry.outcome == JobRunOutcome::Succeeded as i32,
            "{retry:?}"
        );
        let runs = ops
            .list_job_runs(pb::ListJobRunsRequest::default())
            .await?
            .into_inner()
            .runs;
        ensure!(runs.len() == 1, "{runs:?}");
        ensure!(
            segment_list_requests(&app) == 1,
            "Customer.io was listed more than once"
        );

        // The same request id for another job: ALREADY_EXISTS saying what differs.
        let reused = ops
            .run_job(request("outbox-delivery", "sync-2026-12-06"))
            .await
            .err()
            .context("a reused request id was accepted")?;
        ensure!(reused.code() == Code::AlreadyExists, "{reused:?}");
        ensure!(
            reused.message().contains("request_id")
                && reused.message().contains("job")
                && reused.message().contains(&format!("job run {}", done.id)),
            "{}",
            reused.message()
        );
        // Another request id is another run.
        let other = ops
            .run_job(request("segment-sync", "sync-2"))
            .await?
            .into_inner()
            .run
            .context("no run")?;
        ensure!(other.id != done.id);
        wait_for_run(&mut ops, other.id, RUN_WAIT).await?;

        // Bad request ids name the field and start nothing.
        for bad in [
            "x".repeat(201),
            "a\0b".into(),
            " padded".into(),
            "\n".into(),
        ] {
            let status = ops
                .run_job(request("segment-sync", &bad))
                .await
                .err()
                .context("a bad request id was accepted")?;
            ensure!(
                status.code() == Code::InvalidArgument,
                "{bad:?}: {status:?}"
            );
            ensure!(bad_request_fields(&status) == ["request_id"], "{status:?}");
            ensure!(status.message().len() < 400, "{}", status.message());
        }
        let runs = ops
            .list_job_runs(pb::ListJobRunsRequest::default())
            .await?
            .into_inner()
            .runs;
        ensure!(runs.len() == 2, "{runs:?}");
        app.stop().await
    }
);
