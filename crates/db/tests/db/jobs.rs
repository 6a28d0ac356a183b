use std::time::Duration;

use serde_json::json;
use sharpsend_db::jobs::{self, RunOutcome};
use sharpsend_db::testing::{TestDatabase, TestResult};
use sharpsend_db::{DatabaseConnection, DbError};

use crate::helpers::{ts, workspace};

const MINUTE: Duration = Duration::from_secs(60);

/// `contenders` holders race for one lease over two independent pools (two "replicas");
/// returns the winners.
async fn race(
    pools: [&DatabaseConnection; 2],
    ws: i64,
    job: &str,
    contenders: usize,
    now_secs: i64,
) -> Result<Vec<String>, DbError> {
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(contenders));
    let mut tasks = Vec::new();
    for i in 0..contenders {
        let conn = pools[i % 2].clone();
        let job = job.to_owned();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let holder = format!("replica-{i}");
            start.wait().await;
            let won =
                jobs::try_acquire_lease(&conn, ws, &job, &holder, MINUTE, ts(now_secs)).await?;
            Ok::<_, DbError>(won.then_some(holder))
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let joined = t
            .await
            .map_err(|e| DbError::Db(sea_orm::DbErr::Custom(e.to_string())))?;
        winners.extend(joined?);
    }
    Ok(winners)
}

sharpsend_db::db_test!(
    exactly_one_of_many_racing_holders_wins,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let other = db.connect_again().await?;

        // A free lease: one winner.
        let winners = race([&db.conn, &other], ws, "segment_sync", 20, 0).await?;
        assert_eq!(winners.len(), 1, "{winners:?}");
        let lease = jobs::get_lease(&db.conn, ws, "segment_sync")
            .await?
            .ok_or("no lease")?;
        assert_eq!(lease.holder, winners[0]);

        // Held and unexpired: nobody else wins (the holder re-acquiring would).
        let winners_again = race([&db.conn, &other], ws, "segment_sync", 20, 30).await?;
        assert!(
            winners_again.iter().all(|w| *w == winners[0]),
            "{winners_again:?}"
        );

        // Expired: again exactly one taker.
        let takeover = race([&db.conn, &other], ws, "segment_sync", 20, 3_600).await?;
        assert_eq!(takeover.len(), 1, "{takeover:?}");
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(lease_lifecycle, |db: TestDatabase| async move {
    let c = &db.conn;
    let ws = workspace(&db, "site-1").await?;
    let job = "metrics_poll";

    assert!(jobs::try_acquire_lease(c, ws, job, "a", MINUTE, ts(0)).await?);
    assert!(!jobs::try_acquire_lease(c, ws, job, "b", MINUTE, ts(30)).await?);
    // Re-acquiring one's own lease extends it and keeps acquired_at.
    assert!(jobs::try_acquire_lease(c, ws, job, "a", MINUTE, ts(30)).await?);
    let lease = jobs::get_lease(c, ws, job).await?.ok_or("no lease")?;
    assert_eq!(
        (lease.holder.as_str(), lease.acquired_at, lease.expires_at),
        ("a", ts(0), ts(90))
    );

    // Renewal by the holder; not by anyone else.
    assert!(jobs::renew_lease(c, ws, job, "a", MINUTE, ts(60)).await?);
    assert_eq!(
        jobs::get_lease(c, ws, job)
            .await?
            .ok_or("no lease")?
            .expires_at,
        ts(120)
    );
    assert!(!jobs::renew_lease(c, ws, job, "b", MINUTE, ts(60)).await?);

    // Just before expiry it is still a's; at expiry it can be taken over.
    assert!(!jobs::try_acquire_lease(c, ws, job, "b", MINUTE, ts(119)).await?);
    assert!(jobs::try_acquire_lease(c, ws, job, "b", MINUTE, ts(120)).await?);
    let lease = jobs::get_lease(c, ws, job).await?.ok_or("no lease")?;
    assert_eq!(
        (lease.holder.as_str(), lease.acquired_at, lease.expires_at),
        ("b", ts(120), ts(180))
    );
    // a has lost it: renewing says so.
    assert!(!jobs::renew_lease(c, ws, job, "a", MINUTE, ts(121)).await?);

    // Releasing by a non-holder does nothing; by the holder frees it at once.
    jobs::release_lease(c, ws, job, "a").await?;
    assert!(!jobs::try_acquire_lease(c, ws, job, "a", MINUTE, ts(122)).await?);
    jobs::release_lease(c, ws, job, "b").await?;
    assert_eq!(jobs::get_lease(c, ws, job).await?, None);
    assert!(jobs::try_acquire_lease(c, ws, job, "a", MINUTE, ts(123)).await?);
    // Renewing a lease that does not exist fails.
    assert!(!jobs::renew_lease(c, ws, "never_taken", "a", MINUTE, ts(123)).await?);

    // Leases are per job and per workspace.
    let ws2 = workspace(&db, "site-2").await?;
    assert!(jobs::try_acquire_lease(c, ws, "other_job", "b", MINUTE, ts(123)).await?);
    assert!(jobs::try_acquire_lease(c, ws2, job, "b", MINUTE, ts(123)).await?);

    // An absurd TTL is clamped rather than overflowing.
    assert!(jobs::try_acquire_lease(c, ws2, "forever", "c", Duration::MAX, ts(0)).await?);
    assert!(!jobs::try_acquire_lease(c, ws2, "forever", "d", MINUTE, ts(10_000_000)).await?);
    TestResult::Ok(())
});

sharpsend_db::db_test!(
    job_runs_are_recorded_and_listed_newest_first,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let ws2 = workspace(&db, "site-2").await?;

        let r1 = jobs::start_run(c, ws, "segment_sync", "replica-1", ts(0)).await?;
        let r2 = jobs::start_run(c, ws, "metrics_poll", "replica-1", ts(10)).await?;
        let r3 = jobs::start_run(c, ws, "segment_sync", "replica-2", ts(20)).await?;
        let r4 = jobs::start_run(c, ws, "segment_sync", "replica-2", ts(30)).await?;
        jobs::start_run(c, ws2, "segment_sync", "replica-1", ts(40)).await?;

        let details = json!({"created": 3, "updated": 1, "removed": 0, "unchanged": 12});
        jobs::finish_run(c, r1, RunOutcome::Succeeded, ts(5), details.clone(), None).await?;
        jobs::finish_run(
            c,
            r3,
            RunOutcome::Failed,
            ts(25),
            json!({}),
            Some("Customer.io unavailable"),
        )
        .await?;
        jobs::finish_run(
            c,
            r2,
            RunOutcome::Skipped,
            ts(11),
            json!({"reason": "lease held"}),
            None,
        )
        .await?;

        let all = jobs::recent_runs(c, ws, None, 10).await?;
        assert_eq!(
            all.iter().map(|r| r.id).collect::<Vec<_>>(),
            [r4, r3, r2, r1]
        );
        let newest = &all[0];
        assert_eq!(newest.outcome, RunOutcome::Running);
        assert_eq!(newest.finished_at, None);
        assert_eq!(newest.details, json!({}));
        assert_eq!(newest.holder, "replica-2");

        let sync = jobs::recent_runs(c, ws, Some("segment_sync"), 2).await?;
        assert_eq!(sync.iter().map(|r| r.id).collect::<Vec<_>>(), [r4, r3]);
        assert_eq!(sync[1].outcome, RunOutcome::Failed);
        assert_eq!(sync[1].error.as_deref(), Some("Customer.io unavailable"));
        assert_eq!(sync[1].finished_at, Some(ts(25)));

        let first = jobs::recent_runs(c, ws, Some("segment_sync"), 10).await?;
        let r1_row = first.last().ok_or("r1 missing")?;
        assert_eq!(
            (r1_row.id, r1_row.outcome, &r1_row.details),
            (r1, RunOutcome::Succeeded, &details)
        );
        assert_eq!(
            (r1_row.workspace_id, r1_row.job.as_str(), r1_row.started_at),
            (ws, "segment_sync", ts(0))
        );

        assert_eq!(jobs::recent_runs(c, ws2, None, 10).await?.len(), 1);
        assert!(
            jobs::recent_runs(c, ws, Some("unknown"), 10)
                .await?
                .is_empty()
        );

        // Foreign keys are enforced (also on SQLite).
        assert!(
            jobs::start_run(c, 9_999, "segment_sync", "replica-1", ts(0))
                .await
                .is_err()
        );
        assert!(
            jobs::try_acquire_lease(c, 9_999, "x", "a", MINUTE, ts(0))
                .await
                .is_err()
        );

        let missing =
            jobs::finish_run(c, 999_999, RunOutcome::Succeeded, ts(0), json!({}), None).await;
        assert!(
            matches!(missing, Err(DbError::Db(sea_orm::DbErr::RecordNotUpdated))),
            "{missing:?}"
        );
        TestResult::Ok(())
    }
);

#[test]
fn run_outcome_round_trips_through_text() {
    for o in [
        RunOutcome::Running,
        RunOutcome::Succeeded,
        RunOutcome::Failed,
        RunOutcome::Skipped,
    ] {
        assert_eq!(o.as_str().parse::<RunOutcome>(), Ok(o));
        assert_eq!(o.to_string(), o.as_str());
    }
    assert!("done".parse::<RunOutcome>().is_err());
}

sharpsend_db::db_test!(
    racing_duplicates_of_one_request_id_record_one_run,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let other = db.connect_again().await?;
        let request = json!({"job": "segment-sync"});
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(12));
        let mut tasks = Vec::new();
        for i in 0..12 {
            let conn = if i % 2 == 0 {
                db.conn.clone()
            } else {
                other.clone()
            };
            let start = start.clone();
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                jobs::start_run_once(
                    &conn,
                    ws,
                    "segment-sync",
                    &format!("caller-{i}"),
                    ts(0),
                    "RunJob",
                    "run-1",
                    &request,
                )
                .await
            }));
        }
        let mut new = Vec::new();
        let mut existing = Vec::new();
        for t in tasks {
            match t.await?? {
                jobs::StartedRun::New(id) => new.push(id),
                jobs::StartedRun::Existing(key) => existing.push(key),
            }
        }
        assert_eq!(new.len(), 1, "{new:?}");
        assert!(
            existing
                .iter()
                .all(|k| k.result_id == Some(new[0]) && k.request == request),
            "{existing:?}"
        );
        let runs = jobs::recent_runs(&db.conn, ws, None, 50).await?;
        assert_eq!(runs.len(), 1);
        // Another request id, or another workspace, is another run.
        let again = jobs::start_run_once(
            &db.conn,
            ws,
            "segment-sync",
            "c",
            ts(1),
            "RunJob",
            "run-2",
            &request,
        )
        .await?;
        assert!(matches!(again, jobs::StartedRun::New(id) if id != new[0]));
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    an_idempotency_key_is_claimed_once_released_on_failure_and_taken_over_when_stale,
    |db: TestDatabase| async move {
        use sharpsend_db::idempotency::{self, Claim};
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let request = json!({"name": "VIPs"});
        let claim = idempotency::claim(c, ws, "CreateSegment", "k1", &request, ts(0)).await?;
        assert_eq!(claim, Claim::New);
        let Claim::Existing(key) =
            idempotency::claim(c, ws, "CreateSegment", "k1", &json!({"name": "x"}), ts(1)).await?
        else {
            panic!("claimed twice")
        };
        assert_eq!((key.request, key.result_id), (request.clone(), None));
        // The same request id of another operation is another key.
        assert_eq!(
            idempotency::claim(c, ws, "RunJob", "k1", &request, ts(1)).await?,
            Claim::New
        );

        // A failed first call frees the key.
        idempotency::release(c, ws, "CreateSegment", "k1").await?;
        assert_eq!(
            idempotency::claim(c, ws, "CreateSegment", "k1", &request, ts(2)).await?,
            Claim::New
        );
        // Not stale yet: no take-over; stale: exactly one.
        assert!(!idempotency::take_over(c, ws, "CreateSegment", "k1", ts(1), ts(3)).await?);
        assert!(idempotency::take_over(c, ws, "CreateSegment", "k1", ts(2), ts(200)).await?);
        assert!(!idempotency::take_over(c, ws, "CreateSegment", "k1", ts(2), ts(201)).await?);

        // Completed: it answers its result; release no longer forgets it.
        idempotency::complete(c, ws, "CreateSegment", "k1", 77, ts(210)).await?;
        idempotency::release(c, ws, "CreateSegment", "k1").await?;
        let key = idempotency::get(c, ws, "CreateSegment", "k1")
            .await?
            .ok_or("key gone")?;
        assert_eq!(key.result_id, Some(77));
        assert!(
            !idempotency::take_over(c, ws, "CreateSegment", "k1", ts(10_000), ts(10_000)).await?
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    progress_is_recorded_only_while_a_run_is_running,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let run = jobs::start_run(c, ws, "segment-sync", "h", ts(0)).await?;
        assert!(jobs::record_progress(c, run, json!({"synced": 25})).await?);
        let got = jobs::get_run(c, ws, run).await?.ok_or("no run")?;
        assert_eq!(got.details, json!({"synced": 25}));
        jobs::finish_run(c, run, RunOutcome::Failed, ts(5), got.details, Some("x")).await?;
        assert!(!jobs::record_progress(c, run, json!({"synced": 50})).await?);
        let got = jobs::get_run(c, ws, run).await?.ok_or("no run")?;
        assert_eq!(got.details, json!({"synced": 25}));
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    runs_left_running_by_a_dead_process_are_abandoned_once_old,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let dead = jobs::start_run(&db.conn, ws, "profile-sync", "dead", ts(0)).await?;
        let other_job = jobs::start_run(&db.conn, ws, "segment-sync", "dead", ts(0)).await?;
        let young = jobs::start_run(&db.conn, ws, "profile-sync", "alive", ts(200)).await?;
        let done = jobs::start_run(&db.conn, ws, "profile-sync", "old", ts(0)).await?;
        jobs::finish_run(
            &db.conn,
            done,
            RunOutcome::Succeeded,
            ts(10),
            json!({}),
            None,
        )
        .await?;

        // One lease term (120 s) before t = 240: only the run started at 0 and still running.
        let closed =
            jobs::abandon_stale_runs(&db.conn, ws, "profile-sync", ts(120), ts(240)).await?;
        assert_eq!(closed, 1);
        let run = |id| jobs::get_run(&db.conn, ws, id);
        let dead = run(dead).await?.ok_or("dead run")?;
        assert_eq!(dead.outcome, RunOutcome::Failed);
        assert_eq!(dead.error.as_deref(), Some(jobs::ABANDONED));
        assert_eq!(dead.finished_at, Some(ts(240)));
        for (id, outcome) in [
            (other_job, RunOutcome::Running),
            (young, RunOutcome::Running),
            (done, RunOutcome::Succeeded),
        ] {
            assert_eq!(run(id).await?.ok_or("run")?.outcome, outcome, "run {id}");
        }
        // Nothing twice.
        assert_eq!(
            jobs::abandon_stale_runs(&db.conn, ws, "profile-sync", ts(120), ts(250)).await?,
            0
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    postgres_plans_each_execution_for_the_table_as_it_is,
    |db: TestDatabase| async move {
        use sea_orm::{ConnectionTrait, DbBackend, Statement};

        // A connection from `connect` (the product's pools): a generic plan cached while a
        // table was empty would keep scanning it once it is large.
        let conn = db.connect_again().await?;
        if conn.get_database_backend() != DbBackend::Postgres {
            return TestResult::Ok(());
        }
        let row = conn
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SHOW plan_cache_mode",
            ))
            .await?
            .ok_or("no answer")?;
        let mode: String = row.try_get_by_index(0)?;
        assert_eq!(mode, "force_custom_plan");
        TestResult::Ok(())
    }
);
