//! A/B test records (`sharpsend_db::abtests`).

use serde_json::json;
use sharpsend_db::DbError;
use sharpsend_db::abtests::{self, Created, NewTest, REMAINDER, TestRecord, TestState};
use sharpsend_db::sends::{self, Claim, Delivery, NewSend, NewSubmission, SendState, Transition};
use sharpsend_db::testing::{TestDatabase, TestResult};

use crate::helpers::{ts, workspace};

fn new_test(request_id: &str, assignment_id: &str) -> NewTest {
    NewTest {
        public_id: format!("abt_{request_id}"),
        request_id: request_id.to_owned(),
        assignment_id: assignment_id.to_owned(),
        title: "Subject lines".to_owned(),
        spec: json!({"variants": ["a", "b"]}),
        planned_per_variant: 4873,
        audience_estimate: 50_000,
        warnings: json!([]),
        created_by: "tests".to_owned(),
    }
}

sharpsend_db::db_test!(
    one_test_per_request_id_per_workspace,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-ab").await?;
        let other = workspace(&db, "site-ab-other").await?;
        let first = abtests::create(&db.conn, ws, &new_test("r1", "asg-1"), ts(0)).await?;
        let Created::New(first) = first else {
            panic!("expected a new test")
        };
        assert_eq!(first.state, TestState::Draft);
        assert_eq!(first.decision, None);

        let mut again = new_test("r1", "asg-2");
        again.public_id = "abt_other".to_owned();
        match abtests::create(&db.conn, ws, &again, ts(5)).await? {
            Created::Existing(existing) => assert_eq!(existing, first),
            other => panic!("expected the first test, got {other:?}"),
        }
        // Another workspace has its own request ids.
        let mut elsewhere = new_test("r1", "asg-1");
        elsewhere.public_id = "abt_elsewhere".to_owned();
        assert!(matches!(
            abtests::create(&db.conn, other, &elsewhere, ts(0)).await?,
            Created::New(_)
        ));
        assert_eq!(abtests::get(&db.conn, ws, "abt_r1").await?, Some(first));
        assert_eq!(abtests::get(&db.conn, other, "abt_r1").await?, None);
        Ok(()) as TestResult
    }
);

sharpsend_db::db_test!(
    lists_newest_first_by_assignment_and_page,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-ab-list").await?;
        for (n, assignment) in ["asg-1", "asg-2", "asg-1", "asg-1"].iter().enumerate() {
            abtests::create(
                &db.conn,
                ws,
                &new_test(&format!("r{n}"), assignment),
                ts(n as i64),
            )
            .await?;
        }
        let all = abtests::list(&db.conn, ws, None, None, 10).await?;
        let ids: Vec<_> = all.iter().map(|t| t.request_id.as_str()).collect();
        assert_eq!(ids, ["r3", "r2", "r1", "r0"]);
        let first = abtests::list(&db.conn, ws, Some("asg-1"), None, 2).await?;
        let ids: Vec<_> = first.iter().map(|t| t.request_id.as_str()).collect();
        assert_eq!(ids, ["r3", "r2"]);
        let rest = abtests::list(&db.conn, ws, Some("asg-1"), Some(first[1].id), 2).await?;
        let ids: Vec<_> = rest.iter().map(|t| t.request_id.as_str()).collect();
        assert_eq!(ids, ["r0"]);
        Ok(()) as TestResult
    }
);

sharpsend_db::db_test!(a_decision_is_taken_once, |db: TestDatabase| async move {
    let ws = workspace(&db, "site-ab-decide").await?;
    let Created::New(test) = abtests::create(&db.conn, ws, &new_test("r1", "a"), ts(0)).await?
    else {
        panic!("expected a new test")
    };
    let open = [TestState::Draft, TestState::Running];
    let winner = json!({"winner": 1, "actor": "ops"});
    assert!(
        abtests::decide(
            &db.conn,
            ws,
            test.id,
            &open,
            TestState::Decided,
            &winner,
            ts(10)
        )
        .await?
    );
    let cancel = json!({"winner": -1, "actor": "late"});
    assert!(
        !abtests::decide(
            &db.conn,
            ws,
            test.id,
            &open,
            TestState::Cancelled,
            &cancel,
            ts(11)
        )
        .await?
    );
    let stored = abtests::get(&db.conn, ws, "abt_r1").await?.expect("stored");
    assert_eq!(stored.state, TestState::Decided);
    assert_eq!(stored.decision, Some(winner));
    assert_eq!(stored.updated_at, ts(10));
    Ok(()) as TestResult
});

sharpsend_db::db_test!(
    a_start_stores_the_allocation_once_and_arms_record_each_step_once,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-ab-start").await?;
        let Created::New(test) =
            abtests::create(&db.conn, ws, &new_test("r-start", "asg-1"), ts(0)).await?
        else {
            panic!("expected a new test")
        };
        let allocations: Vec<(String, i32)> = (0..2_500_i32)
            .map(|n| (format!("u{n:05}"), n % 3 - 1))
            .collect();
        let state = json!({"variants": 2});
        assert!(abtests::start(&db.conn, ws, test.id, 2, &allocations, &state, ts(10)).await?);
        // A second start stores nothing and says so.
        let other: Vec<(String, i32)> = vec![("someone-else".into(), 0)];
        assert!(!abtests::start(&db.conn, ws, test.id, 2, &other, &state, ts(20)).await?);
        let started = abtests::get(&db.conn, ws, "abt_r-start")
            .await?
            .expect("test");
        assert_eq!(started.state, TestState::Running);
        assert_eq!(started.started_at, Some(ts(10)));
        assert_eq!(started.sequential, Some(state));
        let mut counts = abtests::allocation_counts(&db.conn, test.id).await?;
        counts.sort();
        assert_eq!(counts, vec![(-1, 834), (0, 833), (1, 833)]);
        let arms = abtests::arms(&db.conn, test.id).await?;
        assert_eq!(
            arms.iter().map(|a| (a.arm, a.members)).collect::<Vec<_>>(),
            vec![(-1, 834), (0, 833), (1, 833)]
        );
        // Paged members of one arm, in order.
        let first = abtests::arm_members_page(&db.conn, test.id, 0, None, 500).await?;
        let rest =
            abtests::arm_members_page(&db.conn, test.id, 0, first.last().map(String::as_str), 500)
                .await?;
        assert_eq!(first.len() + rest.len(), 833);
        assert!(first.iter().chain(&rest).all(|c| c.starts_with('u')));

        // Each step is recorded once: the first segment and send stay.
        assert_eq!(
            abtests::set_arm_segment(&db.conn, test.id, 0, 77).await?,
            Some(77)
        );
        assert_eq!(
            abtests::set_arm_segment(&db.conn, test.id, 0, 78).await?,
            Some(77)
        );
        abtests::set_arm_send(&db.conn, test.id, 0, Some((5, "snd_a")), None).await?;
        abtests::set_arm_send(&db.conn, test.id, 0, Some((6, "snd_b")), None).await?;
        let arm = abtests::arms(&db.conn, test.id)
            .await?
            .into_iter()
            .find(|a| a.arm == 0)
            .expect("arm 0");
        assert_eq!(
            (arm.send_id, arm.send_public_id.as_deref()),
            (Some(5), Some("snd_a"))
        );
        // A look counts only while the test runs.
        assert!(abtests::record_look(&db.conn, test.id, &json!({"looked": 1})).await?);
        assert!(
            abtests::decide(
                &db.conn,
                ws,
                test.id,
                &[TestState::Running],
                TestState::Decided,
                &json!({}),
                ts(30)
            )
            .await?
        );
        assert!(!abtests::record_look(&db.conn, test.id, &json!({"looked": 2})).await?);
        let decided = abtests::get(&db.conn, ws, "abt_r-start")
            .await?
            .expect("test");
        assert_eq!(decided.looks, 1);
        assert_eq!(
            abtests::active(&db.conn, ws).await?.len(),
            1,
            "decided, not completed"
        );
        abtests::complete(&db.conn, test.id, ts(40)).await?;
        assert!(abtests::active(&db.conn, ws).await?.is_empty());
        Ok(()) as TestResult
    }
);

// ---- A cancelled (or decided) test sends nothing more: every interleaving of the runner's
// ---- send creation, the cancel and the dispatcher's claim.

const TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// A started two-variant test of assignment `asg-cancel`.
async fn running(db: &TestDatabase, ws: i64, request_id: &str) -> Result<TestRecord, DbError> {
    let Created::New(test) =
        abtests::create(&db.conn, ws, &new_test(request_id, "asg-cancel"), ts(0)).await?
    else {
        return Err(DbError::Db(sea_orm::DbErr::Custom("not new".into())));
    };
    let allocations = vec![("u1".to_owned(), 0), ("u2".to_owned(), 1)];
    abtests::start(&db.conn, ws, test.id, 2, &allocations, &json!({}), ts(1)).await?;
    Ok(test)
}

/// The send of `arm` as the runner records it.
fn arm_send(test: &TestRecord, arm: i32) -> NewSend {
    let key = abtests::send_key(&test.public_id, arm);
    NewSend {
        public_id: format!("snd_{}_{arm}", test.public_id),
        assignment_id: test.assignment_id.clone(),
        request_id: key.clone(),
        title: "Subject lines".into(),
        subject: format!("variant {arm}"),
        delivery: Delivery::Broadcast { broadcast_id: 3 },
        request: json!({"arm": arm}),
        created_by: "abtest-evaluation".into(),
        submissions: vec![NewSubmission {
            segment_id: 100 + i64::from(arm),
            subject: format!("variant {arm}"),
            body: "<p>x</p>".into(),
            data: None,
            recipients: json!({"segment": {"id": 100 + arm}}),
            marker: format!("ss:{key}"),
        }],
    }
}

async fn cancel(
    db: &impl sea_orm::TransactionTrait,
    ws: i64,
    test: &TestRecord,
    at: i64,
) -> Result<bool, DbError> {
    abtests::decide(
        db,
        ws,
        test.id,
        &[TestState::Draft, TestState::Running],
        TestState::Cancelled,
        &json!({"winner": null, "actor": "ops"}),
        ts(at),
    )
    .await
}

/// The only submission of the send of `arm`, if that send exists.
async fn arm_submission(
    db: &TestDatabase,
    ws: i64,
    test: &TestRecord,
    arm: i32,
) -> Result<Option<sends::Submission>, DbError> {
    let key = abtests::send_key(&test.public_id, arm);
    let Some(send) = sends::get_by_key(&db.conn, ws, &test.assignment_id, &key).await? else {
        return Ok(None);
    };
    Ok(sends::submissions(&db.conn, send.id)
        .await?
        .into_iter()
        .next())
}

sharpsend_db::db_test!(
    a_cancel_before_the_send_is_created_records_no_send,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-ab-c1").await?;
        let test = running(&db, ws, "c1").await?;
        assert!(cancel(&db.conn, ws, &test, 5).await?);
        let created = abtests::create_arm_send(
            &db.conn,
            ws,
            test.id,
            TestState::Running,
            &arm_send(&test, 0),
            ts(6),
        )
        .await?;
        assert!(created.is_none(), "{created:?}");
        assert_eq!(arm_submission(&db, ws, &test, 0).await?, None);
        Ok(()) as TestResult
    }
);

sharpsend_db::db_test!(
    a_cancel_after_the_send_is_created_stops_it_before_any_claim,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-ab-c2").await?;
        let test = running(&db, ws, "c2").await?;
        for arm in [0, 1] {
            let created = abtests::create_arm_send(
                &db.conn,
                ws,
                test.id,
                TestState::Running,
                &arm_send(&test, arm),
                ts(5),
            )
            .await?;
            assert!(
                matches!(created, Some(sends::Created::New(_))),
                "{created:?}"
            );
        }
        // Arm 1 is claimed by a dispatcher before the cancel; arm 0 is not.
        let claimed = arm_submission(&db, ws, &test, 1).await?.ok_or("arm 1")?;
        assert!(matches!(
            sends::claim(&db.conn, ws, claimed.id, "d1", TTL, None, ts(6)).await?,
            Claim::Claimed(_)
        ));
        assert!(cancel(&db.conn, ws, &test, 7).await?);

        let stopped = arm_submission(&db, ws, &test, 0).await?.ok_or("arm 0")?;
        assert_eq!(stopped.state, SendState::Cancelled);
        assert_eq!(
            sends::claim(&db.conn, ws, stopped.id, "d2", TTL, None, ts(8)).await?,
            Claim::Gone,
            "a cancelled submission is never claimed"
        );
        assert!(
            sends::due(&db.conn, ws, None, ts(100), 10)
                .await?
                .iter()
                .all(|s| s.id != stopped.id)
        );
        let send = sends::get_by_id(&db.conn, stopped.send_id)
            .await?
            .ok_or("send")?;
        assert_eq!(send.state, SendState::Cancelled);
        let history = sends::history(&db.conn, send.id).await?;
        assert!(
            history
                .iter()
                .any(|h| h.from_state == Some(SendState::Pending)
                    && h.to_state == SendState::Cancelled
                    && h.reason.contains("cancelled"))
        );

        // The claimed one goes on: its outcome is recorded as it comes.
        let in_flight = arm_submission(&db, ws, &test, 1).await?.ok_or("arm 1")?;
        assert_eq!(in_flight.state, SendState::Submitting);
        let accepted = Transition {
            cio_trigger_id: Some(91),
            ..Transition::new(
                SendState::Submitting,
                SendState::Submitted,
                "d1",
                "accepted",
            )
        }
        .held_by("d1");
        assert!(sends::transition(&db.conn, in_flight.id, &accepted, ts(9)).await?);
        assert_eq!(
            arm_submission(&db, ws, &test, 1).await?.map(|s| s.state),
            Some(SendState::Submitted)
        );
        // A later runner pass cannot record a send for the cancelled test.
        let late = abtests::create_arm_send(
            &db.conn,
            ws,
            test.id,
            TestState::Running,
            &arm_send(&test, 0),
            ts(10),
        )
        .await?;
        assert!(late.is_none());
        Ok(()) as TestResult
    }
);

sharpsend_db::db_test!(
    a_claimed_attempt_that_did_not_go_out_is_cancelled_not_queued_again,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-ab-c3").await?;
        let test = running(&db, ws, "c3").await?;
        for arm in [0, 1] {
            abtests::create_arm_send(
                &db.conn,
                ws,
                test.id,
                TestState::Running,
                &arm_send(&test, arm),
                ts(5),
            )
            .await?;
            let s = arm_submission(&db, ws, &test, arm).await?.ok_or("arm")?;
            assert!(matches!(
                sends::claim(&db.conn, ws, s.id, "d1", TTL, None, ts(6)).await?,
                Claim::Claimed(_)
            ));
        }
        // Arm 1's attempt has become uncertain before the cancel.
        let uncertain = arm_submission(&db, ws, &test, 1).await?.ok_or("arm 1")?;
        let lost = Transition::new(SendState::Submitting, SendState::Uncertain, "d1", "timeout")
            .held_by("d1");
        assert!(sends::transition(&db.conn, uncertain.id, &lost, ts(7)).await?);
        assert!(cancel(&db.conn, ws, &test, 8).await?);

        // Arm 0: Customer.io answered 429 (not processed): back to pending would send it later.
        let s0 = arm_submission(&db, ws, &test, 0).await?.ok_or("arm 0")?;
        assert_eq!(
            s0.state,
            SendState::Submitting,
            "a claimed attempt is not cut off"
        );
        let requeue = Transition {
            next_attempt_at: Some(ts(20)),
            uncount_attempt: true,
            ..Transition::new(SendState::Submitting, SendState::Pending, "d1", "429")
        }
        .held_by("d1");
        assert!(sends::transition(&db.conn, s0.id, &requeue, ts(9)).await?);
        // Arm 1: the reconciler settles it as not sent and would queue it again.
        let settle = Transition {
            next_attempt_at: Some(ts(30)),
            ..Transition::new(
                SendState::Uncertain,
                SendState::Pending,
                "reconciler",
                "absent",
            )
        };
        assert!(sends::transition(&db.conn, uncertain.id, &settle, ts(10)).await?);
        for arm in [0, 1] {
            let s = arm_submission(&db, ws, &test, arm).await?.ok_or("arm")?;
            assert_eq!(s.state, SendState::Cancelled, "arm {arm}");
            let history = sends::history(&db.conn, s.send_id).await?;
            let last = history.last().ok_or("history")?;
            assert_eq!(last.to_state, SendState::Cancelled);
            assert!(
                last.reason.contains("cancelled instead of queued again"),
                "{last:?}"
            );
        }
        assert!(
            sends::due(&db.conn, ws, None, ts(100), 10)
                .await?
                .is_empty()
        );
        Ok(()) as TestResult
    }
);

sharpsend_db::db_test!(
    a_declared_winner_stops_unclaimed_variants_and_the_remainder_is_recorded_once_decided,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-ab-c4").await?;
        let test = running(&db, ws, "c4").await?;
        abtests::create_arm_send(
            &db.conn,
            ws,
            test.id,
            TestState::Running,
            &arm_send(&test, 0),
            ts(5),
        )
        .await?;
        // The remainder is not recorded while the test runs.
        assert!(
            abtests::create_arm_send(
                &db.conn,
                ws,
                test.id,
                TestState::Decided,
                &arm_send(&test, REMAINDER),
                ts(5)
            )
            .await?
            .is_none()
        );
        assert!(
            abtests::decide(
                &db.conn,
                ws,
                test.id,
                &[TestState::Running],
                TestState::Decided,
                &json!({"winner": 0}),
                ts(6)
            )
            .await?
        );
        assert_eq!(
            arm_submission(&db, ws, &test, 0).await?.map(|s| s.state),
            Some(SendState::Cancelled)
        );
        assert!(matches!(
            abtests::create_arm_send(
                &db.conn,
                ws,
                test.id,
                TestState::Decided,
                &arm_send(&test, REMAINDER),
                ts(7)
            )
            .await?,
            Some(sends::Created::New(_))
        ));
        assert_eq!(
            arm_submission(&db, ws, &test, REMAINDER)
                .await?
                .map(|s| s.state),
            Some(SendState::Pending),
            "the remainder's send is not stopped by the decision it follows"
        );
        Ok(()) as TestResult
    }
);

sharpsend_db::db_test!(
    a_cancel_racing_the_runner_and_the_dispatcher_never_leaves_a_send_to_go_out,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-ab-c5").await?;
        let other = db.connect_again().await?;
        for round in 0..12 {
            let test = running(&db, ws, &format!("c5-{round}")).await?;
            // Arm 0's send exists; a dispatcher claims it while the test is cancelled.
            abtests::create_arm_send(
                &db.conn,
                ws,
                test.id,
                TestState::Running,
                &arm_send(&test, 0),
                ts(5),
            )
            .await?;
            let s0 = arm_submission(&db, ws, &test, 0).await?.ok_or("arm 0")?;
            let new1 = arm_send(&test, 1);
            // Arm 1's send is being created by the runner at the same time.
            let (claim, cancelled, created) = tokio::join!(
                sends::claim(&other, ws, s0.id, "d1", TTL, None, ts(6)),
                cancel(&db.conn, ws, &test, 6),
                abtests::create_arm_send(&other, ws, test.id, TestState::Running, &new1, ts(6)),
            );
            assert!(cancelled?);
            let after0 = arm_submission(&db, ws, &test, 0).await?.ok_or("arm 0")?;
            match claim? {
                Claim::Claimed(_) => {
                    assert_eq!(after0.state, SendState::Submitting, "round {round}")
                }
                Claim::Gone => assert_eq!(after0.state, SendState::Cancelled, "round {round}"),
                other => panic!("round {round}: {other:?}"),
            }
            // The runner's send either never existed or was stopped: nothing of it is due.
            match (created?, arm_submission(&db, ws, &test, 1).await?) {
                (None, None) => {}
                (Some(_), Some(s)) => assert_eq!(s.state, SendState::Cancelled, "round {round}"),
                other => panic!("round {round}: {other:?}"),
            }
            assert!(
                sends::due(&db.conn, ws, None, ts(100), 10)
                    .await?
                    .is_empty(),
                "round {round}"
            );
        }
        Ok(()) as TestResult
    }
);
