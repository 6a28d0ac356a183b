//! A/B test records (`sharpsend_db::abtests`).

use serde_json::json;
use sharpsend_db::abtests::{self, Created, NewTest, TestState};
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
