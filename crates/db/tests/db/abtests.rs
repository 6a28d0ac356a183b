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
